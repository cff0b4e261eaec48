"""Multi-tensor lerp `x <- x + w[g(t)] * (y - x)`: one launch per dtype, however many tensors.

Tensors and their targets are addressed through device tables (pointers, lengths, weight index)
and a table of fixed-size chunks, as in scale_noise.py. Each program rewrites one chunk in
float32 with torch.lerp's two-sided formula; a chunk whose weight is exactly 0 is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .chunks import by_dtype, chunk_ptr, chunk_table, default_block, load_chunk, store_chunk
from .tables import TL_DTYPES, device_table


@triton.jit
def _lerp_kernel(ptr_table, target_table, numel_table, weight_index, weights, chunk_tensor,
                 chunk_start, DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    t, start, ptr = chunk_ptr(ptr_table, chunk_tensor, chunk_start, pid, DTYPE, ALIGNED)
    w = tl.load(weights + tl.load(weight_index + t))
    if w != 0.0:  # weight 0: no traffic, and the tensor stays bit-identical
        _, _, target = chunk_ptr(target_table, chunk_tensor, chunk_start, pid, DTYPE, ALIGNED)
        count = tl.minimum(tl.load(numel_table + t) - start, BLOCK)
        x = load_chunk(ptr, count, BLOCK)
        y = load_chunk(target, count, BLOCK)
        # Exact at w = 1 (gives y), like torch.lerp.
        out = tl.where(w < 0.5, x + w * (y - x), y - (y - x) * (1.0 - w))
        store_chunk(ptr, out.to(DTYPE), count, BLOCK)


def multi_tensor_lerp_(tensors: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                       weight_index: Sequence[int], weights: torch.Tensor, *,
                       block: int | None = None) -> None:
    """In place on contiguous tensors, each with a contiguous target of its shape and dtype;
    `weights` is a float32 device vector. One launch per dtype."""
    if not tensors:
        return
    device = tensors[0].device
    block = block or default_block(device)
    for dtype, members in by_dtype(tensors).items():
        chunk_tensor, chunk_start, _ = chunk_table([tensors[i].numel() for i in members], block)
        ptrs, target_ptrs, numels, groups = device_table(
            [[tensors[i].data_ptr() for i in members], [targets[i].data_ptr() for i in members],
             [tensors[i].numel() for i in members], [weight_index[i] for i in members]],
            device).unbind(0)
        chunks = device_table([chunk_tensor, chunk_start], device)
        aligned = all(tensors[i].data_ptr() % 16 == 0 and targets[i].data_ptr() % 16 == 0
                      for i in members)
        _lerp_kernel[(len(chunk_tensor),)](ptrs, target_ptrs, numels, groups, weights, chunks[0],
                                           chunks[1], DTYPE=TL_DTYPES[dtype], BLOCK=block,
                                           ALIGNED=aligned, num_warps=8 if block >= 4096 else 4)
