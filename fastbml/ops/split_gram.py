"""`multi_tensor_split_gram`: per pair (s, b), the Gram entries of the split s = (s - b) + b.

Row t of the [n, 4] float64 result holds ||s_t - b_t||^2, <s_t - b_t, b_t>, ||b_t||^2 and
||s_t||^2, computed in float64 whatever the storage dtype (s - b is then exact, and no square of
a float32 value overflows or rounds). Given a sum of two vectors and one of them, it measures
both and their inner product without materialising the other. Empty tensors give rows of zeros;
non-finite values propagate into their row. Registered as `torch.ops.fastbml.split_gram`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backend import require_cpp, resolve_backend
from . import _library
from ._multi_tensor import CPP_DTYPE_CODES


def _torch_impl(sums, parts):
    rows = []
    for s, b in zip(sums, parts):  # one tensor at a time: float64 copies of one tensor only
        s, b = s.reshape(-1).to(torch.float64), b.reshape(-1).to(torch.float64)
        d = s - b
        rows.append(torch.stack([d @ d, d @ b, b @ b, s @ s]))
    return torch.stack(rows)


def _cpp_kernel(sums, parts):
    sums = [t.contiguous() for t in sums]  # kept alive across the call
    parts = [t.contiguous() for t in parts]
    out = torch.empty(len(sums), 4, dtype=torch.float64)
    require_cpp().multi_tensor_split_gram(
        [t.data_ptr() for t in sums], [t.data_ptr() for t in parts],
        [CPP_DTYPE_CODES[t.dtype] for t in sums], [t.numel() for t in sums], out.data_ptr())
    return out


def _triton_kernel(sums, parts):
    from ..kernels.split_gram import multi_tensor_split_gram as launch

    return launch([t.contiguous() for t in sums], [t.contiguous() for t in parts])


def _fake(sums, parts):
    return sums[0].new_empty((len(sums), 4), dtype=torch.float64)


split_gram_op = _library.define(
    "split_gram", "(Tensor[] sums, Tensor[] parts) -> Tensor",
    cpu=_cpp_kernel, cuda=_triton_kernel, fake=_fake)


def multi_tensor_split_gram(sums: Sequence[torch.Tensor], parts: Sequence[torch.Tensor], *,
                            backend: str = "auto") -> torch.Tensor:
    """[len(sums), 4] float64: ||s - b||^2, <s - b, b>, ||b||^2, ||s||^2 for each pair.

    Arguments are trusted (validated by the caller): at least one pair, floating tensors on one
    device, each part of its sum's shape and dtype. No host sync.
    """
    sums, parts = list(sums), list(parts)
    impl = resolve_backend(backend, sums[0].device)
    if impl == "torch":
        return _torch_impl(sums, parts)
    return _library.call(split_gram_op, _triton_kernel, impl, sums[0].device, sums, parts)
