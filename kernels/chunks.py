"""Chunked access to many tensors from one launch: device-side helpers that locate, load and
store one fixed-size chunk of a tensor through pointer tables, and the host-side tables.

A multi-tensor kernel runs one program per chunk; chunk c belongs to tensor chunk_tensor[c] and
starts at element chunk_start[c]. Full chunks load and store unmasked, so that the compiler can
use vector accesses (16 bytes when ALIGNED says every tensor and chunk is 16-byte aligned).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def chunk_ptr(ptr_table, chunk_tensor, chunk_start, pid, DTYPE: tl.constexpr,
              ALIGNED: tl.constexpr):
    t = tl.load(chunk_tensor + pid)
    start = tl.load(chunk_start + pid)
    ptr = tl.load(ptr_table + t).to(tl.pointer_type(DTYPE)) + start
    if ALIGNED:  # every tensor 16-byte aligned and chunks a multiple of 16 bytes: vector access
        ptr = tl.multiple_of(ptr, 16)
    return t, start, ptr


@triton.jit
def load_chunk(ptr, count, BLOCK: tl.constexpr):
    """The chunk's values in float32 (0 past `count`); full chunks load without a mask, so
    that the compiler can use vector loads."""
    offs = tl.arange(0, BLOCK)
    if count == BLOCK:  # noqa: SIM108 - a runtime branch in a Triton kernel, not a ternary
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=offs < count, other=0.0)
    return x.to(tl.float32)


@triton.jit
def store_chunk(ptr, values, count, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    if count == BLOCK:
        tl.store(ptr + offs, values)
    else:
        tl.store(ptr + offs, values, mask=offs < count)


def default_block(device: torch.device) -> int:
    """Elements per chunk: large on CPU (the interpreter pays per program), 4096 on GPU."""
    return 16384 if device.type == "cpu" else 4096


def by_dtype(tensors: Sequence[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    """Indices of the non-empty tensors, grouped by dtype (one launch per dtype)."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel():
            groups.setdefault(t.dtype, []).append(i)
    return groups


def chunk_table(numels: Sequence[int], block: int) -> tuple[list[int], list[int], list[int]]:
    """(chunk_tensor, chunk_start, first_chunk): each chunk's tensor and first element, and
    where each tensor's chunks begin (with a final end marker)."""
    chunk_tensor, chunk_start, first_chunk = [], [], [0]
    for t, n in enumerate(numels):
        starts = range(0, n, block)
        chunk_tensor += [t] * len(starts)
        chunk_start += starts
        first_chunk.append(len(chunk_tensor))
    return chunk_tensor, chunk_start, first_chunk
