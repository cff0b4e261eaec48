"""`true_class_prob`: per group of logits, the softmax probability of the true class, summed
over the batch (float32 [M]); registered as `torch.ops.fastbml.true_class_prob`.

A label outside [0, C) would make the kernels read out of bounds, so the op guards the range
itself (inside the C++ kernel; one device-side check elsewhere, no host sync).
"""

from __future__ import annotations

import torch

from .._checks import check_on_device
from ..backend import require_cpp, resolve_backend
from . import _library
from ._multi_tensor import CPP_DTYPE_CODES


def _torch_impl(parts: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    logits = torch.stack(parts)
    log_probs = torch.log_softmax(logits.to(torch.float32), dim=-1)
    index = labels.expand(logits.shape[0], -1).unsqueeze(-1)
    return log_probs.gather(-1, index).squeeze(-1).exp().sum(dim=1)


def _cpp_kernel(parts: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    parts = [u.contiguous() for u in parts]
    out = torch.empty(len(parts), dtype=torch.float32)
    batch, n_classes = parts[0].shape
    outside = require_cpp().true_class_prob_sums([u.data_ptr() for u in parts],
                                                 CPP_DTYPE_CODES[parts[0].dtype], batch,
                                                 n_classes, labels.data_ptr(), out.data_ptr())
    if outside:
        raise _labels_outside(n_classes)
    return out


def _triton_kernel(parts: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    from ..kernels.true_class_prob import true_class_prob_sums

    return true_class_prob_sums(torch.stack(parts), labels)


def _fake(parts: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    return parts[0].new_empty(len(parts), dtype=torch.float32)


true_class_prob_op = _library.define("true_class_prob", "(Tensor[] logits, Tensor labels) -> Tensor",
                                    cpu=_cpp_kernel, cuda=_triton_kernel, fake=_fake)


def _labels_outside(n_classes: int) -> ValueError:
    return ValueError(f"labels must lie in [0, {n_classes}), got values outside it")


def _check_label_range(labels: torch.Tensor, n_classes: int) -> None:
    in_range = ((labels >= 0) & (labels < n_classes)).all()
    check_on_device(in_range, str(_labels_outside(n_classes)))




def true_class_prob(parts: list[torch.Tensor], labels: torch.Tensor, *,
                    backend: str) -> torch.Tensor:
    """sum_i softmax(parts[m][i])[labels[i]] for each m, float32 [M], on `backend`.

    Trusts shapes and dtypes (M >= 1 detached [B, C] logits sharing dtype and device, int64
    labels [B] there); guards the label range (see the module docstring).
    """
    batch, n_classes = parts[0].shape
    device = parts[0].device
    if batch == 0:
        return torch.zeros(len(parts), dtype=torch.float32, device=device)
    impl = resolve_backend(backend, device)
    if impl != "cpp":  # the cpp kernel checks the range itself
        _check_label_range(labels, n_classes)
    if impl == "torch":
        return _torch_impl(parts, labels)
    return _library.call(true_class_prob_op, _triton_kernel, impl, device, parts, labels)
