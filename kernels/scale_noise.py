"""Multi-tensor `x <- scale[g(t)] * x + (std(x) + eps) * N(0, 1)`: three launches per dtype.

Tensors are addressed through device tables (pointer, length, stream offset, scale index) and a
table of fixed-size chunks, so the launch count does not grow with the number of tensors:
  1. moments: each chunk's count, mean and M2 (in float64: no overflow for any float32 input);
  2. sigma:   each tensor's unbiased std + eps from its chunks (parallel Chan combine);
  3. rewrite: each chunk scaled, plus sigma times the Philox normals of its flattened indices.
With the stds supplied by the caller only the rewrite runs. `multi_tensor_moments` is phases 1
and 2 with each tensor's (count, sum, sum of squares) as the result.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .chunks import by_dtype, chunk_ptr, chunk_table, default_block, load_chunk, store_chunk
from .philox import normal_at, normal_block
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
def _combine(moments, first_chunk, n_iters, CHUNKS: tl.constexpr):
    """Program t's tensor: (count, mean, M2) from the chunk moments of first_chunk[t] ..
    first_chunk[t + 1] - 1 (parallel Chan combine)."""
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
    return total, mean, m2


@triton.jit
def _sigma_kernel(moments, first_chunk, sigma, eps, n_iters, CHUNKS: tl.constexpr):
    total, _, m2 = _combine(moments, first_chunk, n_iters, CHUNKS)
    var = tl.where(total > 1.0, m2 / tl.maximum(total - 1.0, 1.0), 0.0)
    tl.store(sigma + tl.program_id(0), (tl.sqrt(var) + eps).to(tl.float32))


@triton.jit
def _sums_kernel(moments, first_chunk, out, n_iters, CHUNKS: tl.constexpr):
    total, mean, m2 = _combine(moments, first_chunk, n_iters, CHUNKS)
    t = tl.program_id(0)
    tl.store(out + 3 * t, total)
    tl.store(out + 3 * t + 1, total * mean)
    tl.store(out + 3 * t + 2, m2 + total * mean * mean)


@triton.jit(do_not_specialize=["stream"])
def _rewrite_kernel(ptr_table, numel_table, offset_table, scale_index, scales, sigma,
                    chunk_tensor, chunk_start, seed_ptr, stream,
                    NOISE: tl.constexpr, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK_STARTS: tl.constexpr):
    pid = tl.program_id(0)
    t, start, ptr = chunk_ptr(ptr_table, chunk_tensor, chunk_start, pid, DTYPE, ALIGNED)
    count = tl.minimum(tl.load(numel_table + t) - start, BLOCK)
    y = tl.load(scales + tl.load(scale_index + t)) * load_chunk(ptr, count, BLOCK)
    if NOISE:
        first = tl.load(offset_table + t) + start
        if BLOCK_STARTS:  # every stream offset a multiple of 4: whole Philox blocks
            z = normal_block(tl.load(seed_ptr), stream, first, BLOCK)
        else:  # a shard that starts inside a block
            z = normal_at(tl.load(seed_ptr), stream, first + tl.arange(0, BLOCK).to(tl.int64))
        y += tl.load(sigma + t) * z
    store_chunk(ptr, y.to(DTYPE), count, BLOCK)


def _chunk_moments(ptrs: torch.Tensor, numels: torch.Tensor, chunks: torch.Tensor,
                   first_chunk: list[int], dtype: torch.dtype, block: int, aligned: bool,
                   warps: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Phase 1 over one dtype's tensors (device tables of their pointers and lengths, and of
    the chunks): (each chunk's moments [n_chunks, 3], where each tensor's chunks begin as a
    device table, the iterations of a combine over the most chunks any tensor has)."""
    n_chunks = chunks.shape[1]
    moments = torch.empty(n_chunks, 3, dtype=torch.float64, device=ptrs.device)
    _moments_kernel[(n_chunks,)](ptrs, numels, chunks[0], chunks[1], moments,
                                 DTYPE=TL_DTYPES[dtype], BLOCK=block, ALIGNED=aligned,
                                 num_warps=warps)
    most = max(b - a for a, b in itertools.pairwise(first_chunk))
    return moments, device_table([first_chunk], ptrs.device)[0], triton.cdiv(most, 1024)


def multi_tensor_moments(tensors: Sequence[torch.Tensor], out: torch.Tensor,
                         block: int | None = None) -> None:
    """out[t] <- (count, sum, sum of squares) of contiguous tensor t, in float64 (out: a
    [T, 3] float64 device tensor; rows of empty tensors are zeros). Two launches per dtype."""
    device = out.device
    block = block or default_block(device)
    out.zero_()
    for dtype, members in by_dtype(tensors).items():
        chunk_tensor, chunk_start, first_chunk = chunk_table([tensors[i].numel() for i in members],
                                                             block)
        ptrs, numels = device_table([[tensors[i].data_ptr() for i in members],
                                     [tensors[i].numel() for i in members]], device).unbind(0)
        moments, first, n_iters = _chunk_moments(
            ptrs, numels, device_table([chunk_tensor, chunk_start], device), first_chunk, dtype,
            block, all(tensors[i].data_ptr() % 16 == 0 for i in members),
            8 if block >= 4096 else 4)
        sums = torch.empty(len(members), 3, dtype=torch.float64, device=device)
        _sums_kernel[(len(members),)](moments, first, sums, n_iters, CHUNKS=1024)
        out[device_table([members], device)[0]] = sums


def multi_tensor_scale_noise_(tensors: Sequence[torch.Tensor], offsets: Sequence[int],
                              scale_index: Sequence[int], scales: torch.Tensor, *, noise: bool,
                              seed: torch.Tensor, stream: int, eps: float,
                              std: torch.Tensor | None = None,
                              block: int | None = None) -> None:
    """In place on contiguous tensors; `offsets` are their starts in the random stream (any
    values >= 0), `seed` an int64 0-dim device tensor (read by the kernel: no host sync, and a
    captured CUDA graph draws the seed the tensor holds at replay), `std` None (each tensor's
    own unbiased std) or a float64 [T] device tensor of the stds to use.

    Tensors of different dtypes go in separate launches (one set per dtype)."""
    if not tensors:
        return
    device = tensors[0].device
    block = block or default_block(device)
    if noise and std is not None:
        all_sigma = (std + eps).to(torch.float32)
    for dtype, members in by_dtype(tensors).items():
        chunk_tensor, chunk_start, first_chunk = chunk_table([tensors[i].numel() for i in members],
                                                             block)
        per_tensor = device_table(
            [[tensors[i].data_ptr() for i in members], [tensors[i].numel() for i in members],
             [offsets[i] for i in members], [scale_index[i] for i in members]], device)
        ptrs, numels, starts_in_stream, groups = per_tensor.unbind(0)
        chunks = device_table([chunk_tensor, chunk_start], device)
        n_chunks = len(chunk_tensor)
        warps = 8 if block >= 4096 else 4
        aligned = all(tensors[i].data_ptr() % 16 == 0 for i in members)
        if noise and std is not None:
            sigma = all_sigma[device_table([members], device)[0]]
        else:
            sigma = torch.empty(len(members), dtype=torch.float32, device=device)
        if noise and std is None:
            moments, first, n_iters = _chunk_moments(ptrs, numels, chunks, first_chunk, dtype,
                                                     block, aligned, warps)
            _sigma_kernel[(len(members),)](moments, first, sigma, eps, n_iters, CHUNKS=1024)
        _rewrite_kernel[(n_chunks,)](ptrs, numels, starts_in_stream, groups, scales, sigma,
                                     chunks[0], chunks[1], seed, stream, NOISE=noise,
                                     DTYPE=TL_DTYPES[dtype], BLOCK=block, ALIGNED=aligned,
                                     BLOCK_STARTS=all(offsets[i] % 4 == 0 for i in members),
                                     num_warps=warps)
