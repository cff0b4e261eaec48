"""`modality_scores`: how much probability each modality's logits give the true labels.

Registered as `torch.ops.fastbml.modality_scores` (the per-modality sums, float32 [M]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backend import require_cpp, resolve_backend
from . import _library
from ._multi_tensor import CPP_DTYPE_CODES, FLOAT_DTYPES


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


scores_op = _library.define("modality_scores", "(Tensor[] logits, Tensor labels) -> Tensor",
                            cpu=_cpp_kernel, cuda=_triton_kernel, fake=_fake)


def _logit_parts(logits: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The M detached [B, C] logits, checked to share shape, dtype and device."""
    if isinstance(logits, torch.Tensor):
        _library.check_plain(logits, "logits")
        if logits.dim() != 3:
            raise ValueError(f"logits as one tensor must be [M, B, C], got shape {tuple(logits.shape)}")
        parts = list(logits.detach().unbind(0))
    else:
        if isinstance(logits, (str, bytes)) or not isinstance(logits, Sequence) or not logits:
            raise TypeError("logits must be a non-empty sequence of [B, C] tensors or one [M, B, C] tensor")
        for m, u in enumerate(logits):
            if not isinstance(u, torch.Tensor):
                raise TypeError(f"logits[{m}] must be a tensor, got {type(u).__name__}")
            _library.check_plain(u, f"logits[{m}]")
            if u.dim() != 2:
                raise ValueError(f"logits[{m}] must be [B, C], got shape {tuple(u.shape)}")
            if u.shape != logits[0].shape:
                raise ValueError(f"logits[{m}] has shape {tuple(u.shape)} but logits[0] has "
                                 f"{tuple(logits[0].shape)}: modalities must share [B, C]")
            if u.device != logits[0].device or u.dtype != logits[0].dtype:
                raise ValueError(f"logits[{m}] is {u.dtype} on {u.device} but logits[0] is "
                                 f"{logits[0].dtype} on {logits[0].device}")
        parts = [u.detach() for u in logits]
    if parts and parts[0].dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {parts[0].dtype}")
    if not parts or parts[0].shape[1] == 0:
        raise ValueError("logits have 0 modalities or 0 classes")
    return parts


def _check_labels(labels: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    _library.check_plain(labels, "labels")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape [{batch}] (the batch of the logits), "
                         f"got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but logits on {device}")
    return labels.to(torch.int64).contiguous()


def _labels_outside(n_classes: int) -> ValueError:
    return ValueError(f"labels must lie in [0, {n_classes}), got values outside it")


def _check_label_range(labels: torch.Tensor, n_classes: int) -> None:
    in_range = ((labels >= 0) & (labels < n_classes)).all()
    _library.check_on_device(in_range, str(_labels_outside(n_classes)))


def modality_scores(logits: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor, *,
                    backend: str = "auto") -> torch.Tensor:
    """s_m = sum_i softmax(logits_m[i])[labels[i]] for each modality m: float32 [M], detached.

    `logits` is a sequence of M tensors [B, C] or one [M, B, C] tensor; `labels` is [B]. The sum
    (not the mean) over the batch is what OGM and OPM take ratios of (SPEC §0.4). Labels out of
    range raise ValueError on CPU and trip a device-side assert on CUDA (no host sync).
    """
    parts = _logit_parts(logits)
    batch, n_classes = parts[0].shape
    device = parts[0].device
    labels = _check_labels(labels, batch, device)
    if batch == 0:
        return torch.zeros(len(parts), dtype=torch.float32, device=device)
    impl = resolve_backend(backend, device)
    if impl != "cpp":  # the cpp kernel checks the range itself
        _check_label_range(labels, n_classes)
    if impl == "torch":
        return _torch_impl(parts, labels)
    return _library.call(scores_op, _triton_kernel, impl, device, parts, labels)
