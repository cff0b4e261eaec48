"""`multi_tensor_lerp_`: x <- x + w * (y - x) over many tensors, w read from a device vector.

Computed in float32 whatever the storage dtype, with torch.lerp's two-sided formula
(w < 0.5 ? x + w (y - x) : y - (y - x) (1 - w)), so weight 1 gives the target's values exactly
and weight 0 leaves the values bit for bit unchanged on every backend (-0.0, and x where the
target holds NaN, included); the cpp and triton backends skip such tensors altogether (no
memory traffic).
Registered as `torch.ops.fastbml.lerp_`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backend import require_cpp, resolve_backend
from . import _library
from ._multi_tensor import CPP_DTYPE_CODES, ContiguousWork


def _torch_impl(tensors, targets, weight_index, weights):
    per_group = weights.unbind(0)
    # In float32 (a tensor weight would be rounded to bf16/fp16); a tensor whose weight is 0
    # keeps its values bit for bit, as the fast backends (which skip it) do: NaN in the
    # target, and -0.0, included.
    w = [per_group[g] for g in weight_index]
    work = [t.float() for t in tensors]
    results = torch._foreach_lerp(work, [t.float() for t in targets], w)
    results = [torch.where(wi == 0, x, r) for x, r, wi in zip(work, results, w)]
    torch._foreach_copy_(tensors, results)


def _cpp_kernel(tensors, targets, weight_index, weights):
    work = ContiguousWork(tensors)
    targets = [t.contiguous() for t in targets]  # kept alive across the call
    require_cpp().multi_tensor_lerp(
        [t.data_ptr() for t in work.tensors], [t.data_ptr() for t in targets],
        [CPP_DTYPE_CODES[t.dtype] for t in work.tensors], [t.numel() for t in work.tensors],
        weight_index, weights.data_ptr())
    work.write_back()


def _triton_kernel(tensors, targets, weight_index, weights):
    from ..kernels.lerp import multi_tensor_lerp_ as launch

    work = ContiguousWork(tensors)
    launch(work.tensors, [t.contiguous() for t in targets], weight_index, weights)
    work.write_back()


def _fake(tensors, targets, weight_index, weights):
    return None


lerp_op = _library.define(
    "lerp_", "(Tensor(a!)[] tensors, Tensor[] targets, int[] weight_index, Tensor weights) -> ()",
    cpu=_cpp_kernel, cuda=_triton_kernel, fake=_fake)


def multi_tensor_lerp_(tensors: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                       weight_index: Sequence[int], weights: torch.Tensor, *,
                       backend: str = "auto") -> None:
    """In place: tensors[t] <- lerp(tensors[t], targets[t], weights[weight_index[t]]).

    Arguments are trusted (validated by the caller): floating tensors on one device, each target
    of its tensor's shape and dtype, `weights` a floating vector on that device. No host sync.
    """
    tensors = list(tensors)
    if not tensors:
        return
    device = tensors[0].device
    weights = weights.to(torch.float32).contiguous()
    impl = resolve_backend(backend, device)
    args = (tensors, list(targets), list(weight_index), weights)
    if impl == "torch":
        _torch_impl(*args)
    else:
        _library.call(lerp_op, _triton_kernel, impl, device, *args)
