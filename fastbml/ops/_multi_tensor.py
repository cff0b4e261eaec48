"""Bookkeeping shared by the multi-tensor ops: flattened-stream offsets, dtype codes, contiguity."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

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
