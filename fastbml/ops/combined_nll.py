"""`combined_nll`: per group m, the cross-entropy of a linear combination of logit sets,
sum_i min(-log softmax(sum_s w[m, s] logits[s, i])[labels[i]], max_nll), summed over the batch
(float32 [M]); registered as `torch.ops.fastbml.combined_nll`.

The combination is formed row by row inside the kernel: the M combined [B, C] logits are never
written out. A label outside [0, C) would make the kernels read out of bounds, so the op guards
the range itself (inside the C++ kernel; one device-side check elsewhere, no host sync).
"""

from __future__ import annotations

import torch

from ..backend import require_cpp, resolve_backend
from . import _library
from ._multi_tensor import CPP_DTYPE_CODES
from .true_class_prob import _check_label_range, _labels_outside


def _torch_impl(logits: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor,
                max_nll: float) -> torch.Tensor:
    combined = torch.einsum("ms,sbc->mbc", weights, logits.to(torch.float32))
    log_probs = torch.log_softmax(combined, dim=-1)
    index = labels.expand(weights.shape[0], -1).unsqueeze(-1)
    nll = -log_probs.gather(-1, index).squeeze(-1)
    return nll.clamp(max=max_nll).sum(dim=1)


def _cpp_kernel(logits: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor,
                max_nll: float) -> torch.Tensor:
    logits, weights, labels = logits.contiguous(), weights.contiguous(), labels.contiguous()
    n_sets, batch, n_classes = logits.shape
    out = torch.empty(weights.shape[0], dtype=torch.float32)
    outside = require_cpp().combined_nll_sums(logits.data_ptr(), CPP_DTYPE_CODES[logits.dtype],
                                              n_sets, batch, n_classes, weights.data_ptr(),
                                              weights.shape[0], labels.data_ptr(), max_nll,
                                              out.data_ptr())
    if outside:
        raise _labels_outside(n_classes)
    return out


def _triton_kernel(logits: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor,
                   max_nll: float) -> torch.Tensor:
    from ..kernels.combined_nll import combined_nll_sums

    return combined_nll_sums(logits, weights.contiguous(), labels.contiguous(), max_nll)


def _fake(logits: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor,
          max_nll: float) -> torch.Tensor:
    return logits.new_empty(weights.shape[0], dtype=torch.float32)


combined_nll_op = _library.define(
    "combined_nll", "(Tensor logits, Tensor weights, Tensor labels, float max_nll) -> Tensor",
    cpu=_cpp_kernel, cuda=_triton_kernel, fake=_fake)


def combined_nll(logits: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor,
                 max_nll: float, *, backend: str) -> torch.Tensor:
    """sum_i min(-log softmax(sum_s weights[m, s] logits[s, i])[labels[i]], max_nll) for each
    m: float32 [M], on `backend`.

    Trusts its inputs (detached logits [S, B, C] in a kernel dtype, float32 weights [M, S] and
    int64 labels [B] on the same device); guards the label range (see the module docstring).
    The scores carry no gradient: the op has no backward.
    """
    _, batch, n_classes = logits.shape
    device = logits.device
    if batch == 0:
        return torch.zeros(weights.shape[0], dtype=torch.float32, device=device)
    impl = resolve_backend(backend, device)
    if impl != "cpp":  # the cpp kernel checks the range itself
        _check_label_range(labels, n_classes)
    if impl == "torch":
        return _torch_impl(logits, weights, labels, max_nll)
    return _library.call(combined_nll_op, _triton_kernel, impl, device, logits, weights,
                         labels, float(max_nll))
