"""Multi-tensor `x <- scale[g(t)] * x + (std(x) + eps) * N(0, 1)`: three launches per dtype.

Tensors are addressed through device tables (pointer, length, stream offset, scale index) and a
table of fixed-size chunks, so the launch count does not grow with the number of tensors:
  1. moments: each chunk's count, mean and M2 (in float64: no overflow for any float32 input);
  2. sigma:   each tensor's unbiased std + eps from its chunks (parallel Chan combine);
  3. rewrite: each chunk scaled, plus sigma times the Philox normals of its flattened indices.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .chunks import by_dtype, chunk_ptr, chunk_table, default_block, load_chunk, store_chunk
from .philox import normal_block
from .tables import TL_DTYPES, device_table


@triton.jit
def _moments_kernel(ptr_table, numel_table, chunk_tensor, chunk_start, moments,
                    DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    t, start, ptr = chunk_ptr(ptr_table, chunk_tensor, chunk_start, pid, DTYPE, ALIGNED)
    count = tl.minimum(tl.load(numel_table + t) - start, BLOCK)
    # float64: squares of float32 values (up to 3.4e38) neither overflow nor lose precision,
    # as in the cpp kernel
    x = load_chunk(ptr, count, BLOCK).to(tl.float64)
    mean = tl.sum(x) / count.to(tl.float64)
    m2 = tl.sum(tl.where(tl.arange(0, BLOCK) < count, (x - mean) * (x - mean), 0.0))
    tl.store(moments + 3 * pid, count.to(tl.float64))
    tl.store(moments + 3 * pid + 1, mean)
    tl.store(moments + 3 * pid + 2, m2)


@triton.jit
def _sigma_kernel(moments, first_chunk, sigma, eps, n_iters, CHUNKS: tl.constexpr):
    t = tl.program_id(0)
    lo = tl.load(first_chunk + t)
    hi = tl.load(first_chunk + t + 1)
    total = tl.zeros((), tl.float64)
    weighted = tl.zeros((), tl.float64)
    for i in range(n_iters):
        c = lo + i * CHUNKS + tl.arange(0, CHUNKS)
        m = c < hi
        n = tl.load(moments + 3 * c, mask=m, other=0.0)
        total += tl.sum(n)
        weighted += tl.sum(n * tl.load(moments + 3 * c + 1, mask=m, other=0.0))
    mean = weighted / tl.maximum(total, 1.0)
    m2 = tl.zeros((), tl.float64)
    for i in range(n_iters):
        c = lo + i * CHUNKS + tl.arange(0, CHUNKS)
        m = c < hi
        n = tl.load(moments + 3 * c, mask=m, other=0.0)
        d = tl.load(moments + 3 * c + 1, mask=m, other=0.0) - mean
        m2 += tl.sum(tl.load(moments + 3 * c + 2, mask=m, other=0.0) + n * d * d)
    var = tl.where(total > 1.0, m2 / tl.maximum(total - 1.0, 1.0), 0.0)
    tl.store(sigma + t, (tl.sqrt(var) + eps).to(tl.float32))


@triton.jit(do_not_specialize=["stream"])
def _rewrite_kernel(ptr_table, numel_table, offset_table, scale_index, scales, sigma,
                    chunk_tensor, chunk_start, seed_ptr, stream,
                    NOISE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                    ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    t, start, ptr = chunk_ptr(ptr_table, chunk_tensor, chunk_start, pid, DTYPE, ALIGNED)
    count = tl.minimum(tl.load(numel_table + t) - start, BLOCK)
    y = tl.load(scales + tl.load(scale_index + t)) * load_chunk(ptr, count, BLOCK)
    if NOISE:
        first = tl.load(offset_table + t) + start
        y += tl.load(sigma + t) * normal_block(tl.load(seed_ptr), stream, first, BLOCK)
    store_chunk(ptr, y.to(DTYPE), count, BLOCK)


def multi_tensor_scale_noise_(tensors: Sequence[torch.Tensor], offsets: Sequence[int],
                              scale_index: Sequence[int], scales: torch.Tensor, *, noise: bool,
                              seed: torch.Tensor, stream: int, eps: float,
                              block: int | None = None) -> None:
    """In place on contiguous tensors; `offsets` are their starts in the random stream (% 4 == 0),
    `seed` an int64 0-dim device tensor (read by the kernel: no host sync, and a captured CUDA
    graph draws the seed the tensor holds at replay).

    Tensors of different dtypes go in separate launches (one set per dtype)."""
    if not tensors:
        return
    device = tensors[0].device
    block = block or default_block(device)
    for dtype, members in by_dtype(tensors).items():
        chunk_tensor, chunk_start, first_chunk = chunk_table([tensors[i].numel() for i in members],
                                                             block)
        per_tensor = device_table(
            [[tensors[i].data_ptr() for i in members], [tensors[i].numel() for i in members],
             [offsets[i] for i in members], [scale_index[i] for i in members]], device)
        ptrs, numels, starts_in_stream, groups = per_tensor.unbind(0)
        chunks = device_table([chunk_tensor, chunk_start], device)
        n_chunks = len(chunk_tensor)
        sigma = torch.empty(len(members), dtype=torch.float32, device=device)
        warps = 8 if block >= 4096 else 4
        aligned = all(tensors[i].data_ptr() % 16 == 0 for i in members)
        if noise:
            moments = torch.empty(n_chunks, 3, dtype=torch.float64, device=device)
            _moments_kernel[(n_chunks,)](ptrs, numels, chunks[0], chunks[1], moments,
                                         DTYPE=TL_DTYPES[dtype], BLOCK=block, ALIGNED=aligned,
                                         num_warps=warps)
            first = device_table([first_chunk], device)[0]
            most = max(b - a for a, b in itertools.pairwise(first_chunk))
            _sigma_kernel[(len(members),)](moments, first, sigma, eps, triton.cdiv(most, 1024),
                                           CHUNKS=1024)
        _rewrite_kernel[(n_chunks,)](ptrs, numels, starts_in_stream, groups, scales, sigma,
                                     chunks[0], chunks[1], seed, stream, NOISE=noise,
                                     DTYPE=TL_DTYPES[dtype], BLOCK=block, ALIGNED=aligned,
                                     num_warps=warps)
