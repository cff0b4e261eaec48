"""Per-row drop + rescale over M row buffers in one launch, plus the per-row weights and the coin.

Program p owns a [ROWS, COLS] tile of one buffer (found from a table of each buffer's first
program); it draws the Philox uniforms of its ROWS rows (element m * B + i of `mask_stream` under
`mask_seed`), the coin (element 0 of `coin_stream` under `seed`) and theta from q, and writes
x * (coin ? keep * 1/(1 - theta) : 1). The same launch serves forward (inputs) and backward
(output gradients): the factors are regenerated from the seeds, never stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .philox import uniform_open
from .tables import TL_DTYPES, device_table


@triton.jit
def _uniform_at(seed, stream, index):
    """The Philox uniform of flattened element `index` (int64 tensor) of `stream`."""
    block = index // 4
    c0 = (block & 0xFFFFFFFF).to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    c2 = (tl.zeros_like(c0) + stream).to(tl.uint32)
    w0, w1, w2, w3 = tl.philox(seed, c0, c1, c2, tl.zeros_like(c0))
    word = index % 4
    return uniform_open(tl.where(word == 0, w0, tl.where(word == 1, w1,
                                                          tl.where(word == 2, w2, w3))))


@triton.jit
def _row_keep(mask_seed, mask_stream, q, m, batch, rows):
    """keep[m, rows]: the Bernoulli(1 - q[m]) mask of those rows (True = kept)."""
    flat = rows.to(tl.int64) + m * batch  # M * B < 2**31
    return _uniform_at(mask_seed, mask_stream, flat) >= tl.load(q + m)


@triton.jit
def _coin(seed, coin_stream, threshold, like):
    """Whether the drop runs this call, broadcast to the shape of `like` (an int tensor)."""
    return _uniform_at(seed, coin_stream, tl.zeros_like(like).to(tl.int64)) >= threshold


@triton.jit(do_not_specialize=["batch", "n_mod"])
def _drop_scale_kernel(in_table, out_table, stride_table, dim_table, first_prog, q, n_mod, batch,
                       total_dim, threshold, seed_ptr, mask_seed_ptr, coin_stream, mask_stream,
                       DTYPE: tl.constexpr,
                       MP: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                       ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    seed = tl.load(seed_ptr)
    mask_seed = tl.load(mask_seed_ptr)
    mods = tl.arange(0, MP)
    starts = tl.load(first_prog + mods, mask=mods < n_mod, other=2**62)
    m = tl.sum((starts <= pid).to(tl.int32)) - 1
    dim = tl.load(dim_table + m)
    col_blocks = tl.cdiv(dim, COLS)
    local = pid - tl.load(first_prog + m)
    rows = (local // col_blocks) * ROWS + tl.arange(0, ROWS)
    cols = (local % col_blocks) * COLS + tl.arange(0, COLS)

    q_all = tl.load(q + mods, mask=mods < n_mod, other=0.0)
    dims_all = tl.load(dim_table + mods, mask=mods < n_mod, other=0).to(tl.float32)
    theta = tl.sum(q_all * dims_all) / total_dim
    inv = tl.where(theta < 1.0, 1.0 / tl.maximum(1.0 - theta, 1e-30), 0.0)
    keep = _row_keep(mask_seed, mask_stream, q, m, batch, rows)
    factor = tl.where(_coin(seed, coin_stream, threshold, rows), tl.where(keep, inv, 0.0), 1.0)

    src = tl.load(in_table + m).to(tl.pointer_type(DTYPE))
    dst = tl.load(out_table + m).to(tl.pointer_type(DTYPE))
    stride = tl.load(stride_table + m)
    if ALIGNED:  # every base address 16-byte aligned, every dim and row stride a multiple of 16
        src = tl.multiple_of(src, 16)
        dst = tl.multiple_of(dst, 16)
        stride = tl.multiple_of(stride, 16)
        dim = tl.multiple_of(dim, 16)
    ok = (rows < batch)[:, None] & (cols < dim)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(src + rows64 * stride + cols[None, :], mask=ok).to(tl.float32)
    tl.store(dst + rows64 * dim + cols[None, :], (x * factor[:, None]).to(DTYPE), mask=ok)


@triton.jit(do_not_specialize=["batch", "n_mod"])
def _weights_kernel(q, weights, executed_ptr, n_mod, batch, threshold, seed_ptr, mask_seed_ptr,
                    coin_stream, mask_stream, ROWS: tl.constexpr):
    """One program: the coin into executed_ptr, kappa_i = coin ? any_m keep[m, i] : 1, then
    weights = kappa / sum(kappa)."""
    offs = tl.arange(0, ROWS)
    seed = tl.load(seed_ptr)
    mask_seed = tl.load(mask_seed_ptr)
    executed = _coin(seed, coin_stream, threshold, offs)
    tl.store(executed_ptr + offs, executed.to(tl.int8), mask=offs == 0)
    total = tl.zeros((ROWS,), tl.float32)
    for r0 in range(0, batch, ROWS):
        rows = r0 + offs
        kept = executed == 0
        for m in range(0, n_mod):
            kept = kept | _row_keep(mask_seed, mask_stream, q, m, batch, rows)
        kappa = tl.where(rows < batch, kept.to(tl.float32), 0.0)
        tl.store(weights + rows, kappa, mask=rows < batch)
        total += kappa
    count = tl.sum(total)
    norm = tl.where(count > 0.0, 1.0 / tl.maximum(count, 1.0), 0.0)
    for r0 in range(0, batch, ROWS):
        rows = r0 + offs
        w = tl.load(weights + rows, mask=rows < batch)
        tl.store(weights + rows, w * norm, mask=rows < batch)


def row_drop_scale(inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
                   q: torch.Tensor, *, threshold: float, seed: torch.Tensor,
                   mask_seed: torch.Tensor, coin_stream: int, mask_stream: int,
                   weights: torch.Tensor | None = None, executed: torch.Tensor | None = None,
                   block: int | None = None) -> None:
    """outputs[m] <- inputs[m] * factor[m, row] (see the module docstring); with `weights` and
    `executed`, also the weights [B] and the coin (a bool scalar).

    inputs[m] is [B, d_m] with unit column stride (any row stride), outputs[m] a contiguous
    [B, d_m] tensor of the same dtype (may be inputs[m] itself); q is float32 [M] on the device;
    the seeds are int64 0-dim device tensors, read by the kernels (no host sync).
    """
    device = inputs[0].device
    batch = inputs[0].shape[0]
    dims = [x.shape[1] for x in inputs]
    if block is None:
        block = 16384 if device.type == "cpu" else 4096
    cols = min(triton.next_power_of_2(max(max(dims), 1)), block // 2)  # ROWS >= 2
    rows = max(1, block // cols)
    programs = [triton.cdiv(batch, rows) * triton.cdiv(d, cols) for d in dims]
    first = [sum(programs[:m]) for m in range(len(dims))]
    threshold = float(threshold)
    n_mod = len(dims)
    aligned = all(t.data_ptr() % 16 == 0 for t in (*inputs, *outputs)) and all(
        d % 16 == 0 and x.stride(0) % 16 == 0 for d, x in zip(dims, inputs))
    if sum(programs):
        table = device_table([[x.data_ptr() for x in inputs], [y.data_ptr() for y in outputs],
                               [x.stride(0) for x in inputs], dims, first], device)
        _drop_scale_kernel[(sum(programs),)](
            table[0], table[1], table[2], table[3], table[4], q, n_mod, batch,
            float(max(sum(dims), 1)), threshold, seed, mask_seed, coin_stream, mask_stream,
            DTYPE=TL_DTYPES[inputs[0].dtype],
            MP=max(2, triton.next_power_of_2(n_mod)), ROWS=rows, COLS=cols, ALIGNED=aligned,
            num_warps=8 if block >= 4096 else 4)
    if weights is not None:
        weight_rows = 1024 if device.type == "cpu" else 256
        _weights_kernel[(1,)](q, weights, executed.view(torch.int8), n_mod, batch, threshold, seed,
                              mask_seed, coin_stream, mask_stream, ROWS=weight_rows, num_warps=4)
