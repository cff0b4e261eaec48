"""Multi-tensor `x <- a_t x + b_t y`: one launch per dtype, however many tensors.

Tensors and their partners are addressed through device tables (pointers, lengths, the row of
each tensor's coefficients) and a table of fixed-size chunks, as in scale_noise.py. Each program
rewrites one chunk in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .chunks import by_dtype, chunk_ptr, chunk_table, default_block, load_chunk, store_chunk
from .tables import TL_DTYPES, device_table


@triton.jit
def _axpby_kernel(x_table, y_table, numel_table, coeff_row, coeffs, chunk_tensor, chunk_start,
                  DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    t, start, x_ptr = chunk_ptr(x_table, chunk_tensor, chunk_start, pid, DTYPE, ALIGNED)
    _, _, y_ptr = chunk_ptr(y_table, chunk_tensor, chunk_start, pid, DTYPE, ALIGNED)
    row = tl.load(coeff_row + t)
    a = tl.load(coeffs + 2 * row)
    b = tl.load(coeffs + 2 * row + 1)
    count = tl.minimum(tl.load(numel_table + t) - start, BLOCK)
    out = a * load_chunk(x_ptr, count, BLOCK) + b * load_chunk(y_ptr, count, BLOCK)
    store_chunk(x_ptr, out.to(DTYPE), count, BLOCK)


def multi_tensor_axpby_(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor],
                        coeffs: torch.Tensor, *, block: int | None = None) -> None:
    """In place on contiguous tensors, each with a contiguous partner of its shape and dtype;
    `coeffs` is a contiguous float32 [n, 2] device tensor (a_t, b_t). One launch per dtype."""
    if not xs:
        return
    device = xs[0].device
    block = block or default_block(device)
    for dtype, members in by_dtype(xs).items():
        chunk_tensor, chunk_start, _ = chunk_table([xs[i].numel() for i in members], block)
        x_ptrs, y_ptrs, numels, rows = device_table(
            [[xs[i].data_ptr() for i in members], [ys[i].data_ptr() for i in members],
             [xs[i].numel() for i in members], list(members)], device).unbind(0)
        chunks = device_table([chunk_tensor, chunk_start], device)
        aligned = all(xs[i].data_ptr() % 16 == 0 and ys[i].data_ptr() % 16 == 0 for i in members)
        _axpby_kernel[(len(chunk_tensor),)](x_ptrs, y_ptrs, numels, rows, coeffs, chunks[0],
                                            chunks[1], DTYPE=TL_DTYPES[dtype], BLOCK=block,
                                            ALIGNED=aligned, num_warps=8 if block >= 4096 else 4)
