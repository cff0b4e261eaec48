"""Bookkeeping shared by the multi-tensor ops: flattened-stream offsets, dtype codes, contiguity."""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence

import torch

# Element-type codes of csrc/dtype.h.
CPP_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def stream_offsets(numels: Sequence[int]) -> list[int]:
    """Where each tensor starts in the op's flattened random stream: each start is rounded up to a
    multiple of 4 so that every tensor begins on a fresh Philox block."""
    return [0, *itertools.accumulate((n + 3) & ~3 for n in numels[:-1])] if numels else []


class ContiguousWork:
    """Contiguous stand-ins for tensors an in-place kernel rewrites; `write_back` copies the
    results into the originals that were not contiguous (the others were modified directly)."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.originals = list(tensors)
        self.tensors = [t if t.is_contiguous() else t.contiguous() for t in self.originals]

    def write_back(self) -> None:
        for original, work in zip(self.originals, self.tensors):
            if work is not original:
                original.copy_(work)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes [first, last + 1) of memory that `t`'s elements can occupy."""
    if t.is_contiguous():  # the common case, in three attribute reads
        lo = t.data_ptr()
        return (lo, lo + t.nbytes) if lo else (0, 0)  # meta and empty tensors have no memory
    if t.numel() == 0 or t.device.type == "meta":  # no memory
        return 0, 0
    lo = hi = t.data_ptr()
    size = t.element_size()
    for n, s in zip(t.shape, t.stride()):
        hi += (n - 1) * s * size
    return lo, hi + size


def check_disjoint(written: Sequence[torch.Tensor], written_name: Callable[[int], str],
                   read: Sequence[torch.Tensor] = (),
                   read_name: Callable[[int], str] | None = None) -> None:
    """ValueError naming the two arguments when a tensor an in-place op writes shares memory
    with another one it writes or reads (the same tensor twice included); tensors only read
    may overlap each other. `*_name(i)` names the i-th tensor (built only for the error).
    Host only: the memory spans of the tensors are compared (views that interleave within one
    span count as overlapping). Skipped while tracing (fake tensors have no memory)."""
    if torch.compiler.is_compiling():
        return
    spans = sorted(span for span in ((*_span(t), i) for i, t in enumerate(written))
                   if span[1] > span[0])
    # sorted by start: the first overlap is always between neighbours
    for (_, hi, i), (lo, _, j) in itertools.pairwise(spans):
        if lo < hi:
            raise ValueError(f"{written_name(i)} and {written_name(j)} share memory: an in-place "
                             "op on overlapping tensors gives undefined results; pass tensors "
                             "that do not alias")
    if not read or not spans:
        return
    starts = [s[0] for s in spans]
    for j, t in enumerate(read):
        lo, hi = _span(t)
        if hi == lo:
            continue
        k = bisect.bisect_left(starts, hi) - 1
        if k >= 0 and spans[k][1] > lo:
            raise ValueError(f"{written_name(spans[k][2])} and {read_name(j)} share memory: an "
                             "in-place op that reads what it writes gives undefined results; "
                             "pass tensors that do not alias")
