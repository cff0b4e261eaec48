"""Multi-tensor Gram entries of sums split into (sum - part, part): two launches per dtype.

For each pair (s, b): ||s - b||^2, <s - b, b>, ||b||^2 and ||s||^2, in float64.
Tensors are addressed through device tables (pointers, lengths) and a table of fixed-size
chunks, as in scale_noise.py:
  1. partial: each chunk's four sums;
  2. combine: each tensor's chunks added in chunk order (deterministic, no atomics).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .chunks import by_dtype, chunk_ptr, chunk_table, default_block, load_chunk
from .tables import TL_DTYPES, device_table


@triton.jit
def _partial_kernel(sum_table, part_table, numel_table, chunk_tensor, chunk_start, partial,
                    DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    t, start, s_ptr = chunk_ptr(sum_table, chunk_tensor, chunk_start, pid, DTYPE, ALIGNED)
    _, _, b_ptr = chunk_ptr(part_table, chunk_tensor, chunk_start, pid, DTYPE, ALIGNED)
    count = tl.minimum(tl.load(numel_table + t) - start, BLOCK)
    # float64, as the cpp kernel: s - b is exact and the squares neither overflow nor round
    s = load_chunk(s_ptr, count, BLOCK).to(tl.float64)  # 0 past `count`
    b = load_chunk(b_ptr, count, BLOCK).to(tl.float64)
    d = s - b
    tl.store(partial + 4 * pid, tl.sum(d * d))
    tl.store(partial + 4 * pid + 1, tl.sum(d * b))
    tl.store(partial + 4 * pid + 2, tl.sum(b * b))
    tl.store(partial + 4 * pid + 3, tl.sum(s * s))


@triton.jit
def _combine_kernel(partial, first_chunk, out_row, out, n_iters, CHUNKS: tl.constexpr):
    t = tl.program_id(0)
    lo = tl.load(first_chunk + t)
    hi = tl.load(first_chunk + t + 1)
    col = tl.arange(0, 4)
    total = tl.zeros((4,), tl.float64)
    for i in range(n_iters):
        c = lo + i * CHUNKS + tl.arange(0, CHUNKS)
        values = tl.load(partial + 4 * c[:, None] + col[None, :], mask=(c < hi)[:, None],
                         other=0.0)
        total += tl.sum(values, axis=0)
    tl.store(out + 4 * tl.load(out_row + t) + col, total)


def multi_tensor_split_gram(sums: Sequence[torch.Tensor], parts: Sequence[torch.Tensor], *,
                            block: int | None = None) -> torch.Tensor:
    """[n, 4] float64 on the tensors' device, for contiguous pairs of equal shape and dtype.
    Empty tensors give rows of zeros; one pair of launches per dtype."""
    device = sums[0].device
    out = torch.zeros(len(sums), 4, dtype=torch.float64, device=device)
    block = block or default_block(device)
    for dtype, members in by_dtype(sums).items():
        chunk_tensor, chunk_start, first_chunk = chunk_table([sums[i].numel() for i in members],
                                                             block)
        sum_ptrs, part_ptrs, numels, rows = device_table(
            [[sums[i].data_ptr() for i in members], [parts[i].data_ptr() for i in members],
             [sums[i].numel() for i in members], list(members)], device).unbind(0)
        chunks = device_table([chunk_tensor, chunk_start], device)
        n_chunks = len(chunk_tensor)
        aligned = all(sums[i].data_ptr() % 16 == 0 and parts[i].data_ptr() % 16 == 0
                      for i in members)
        partial = torch.empty(n_chunks, 4, dtype=torch.float64, device=device)
        _partial_kernel[(n_chunks,)](sum_ptrs, part_ptrs, numels, chunks[0], chunks[1], partial,
                                     DTYPE=TL_DTYPES[dtype], BLOCK=block, ALIGNED=aligned,
                                     num_warps=8 if block >= 4096 else 4)
        most = max(b - a for a, b in itertools.pairwise(first_chunk))
        _combine_kernel[(len(members),)](partial, device_table([first_chunk], device)[0], rows,
                                         out, triton.cdiv(most, 256), CHUNKS=256)
    return out
