"""`modality_scores`: how much probability each modality's logits give the true labels, the
quantity OGM and OPM take ratios of (docs/methods.md#scores)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import check_float_tensor, check_labels
from .ops.true_class_prob import true_class_prob


def _logit_parts(logits: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The M detached [B, C] logits, checked to share shape, dtype and device."""
    if isinstance(logits, torch.Tensor):
        check_float_tensor(logits, "logits")
        if logits.dim() != 3:
            raise ValueError(f"logits as one tensor must be [M, B, C], got shape {tuple(logits.shape)}")
        parts = list(logits.detach().unbind(0))
    else:
        if isinstance(logits, (str, bytes)) or not isinstance(logits, Sequence) or not logits:
            raise TypeError("logits must be a non-empty sequence of [B, C] tensors or one [M, B, C] tensor")
        for m, u in enumerate(logits):
            check_float_tensor(u, f"logits[{m}]")
            if u.dim() != 2:
                raise ValueError(f"logits[{m}] must be [B, C], got shape {tuple(u.shape)}")
            if u.shape != logits[0].shape:
                raise ValueError(f"logits[{m}] has shape {tuple(u.shape)} but logits[0] has "
                                 f"{tuple(logits[0].shape)}: modalities must share [B, C]")
            if u.device != logits[0].device or u.dtype != logits[0].dtype:
                raise ValueError(f"logits[{m}] is {u.dtype} on {u.device} but logits[0] is "
                                 f"{logits[0].dtype} on {logits[0].device}")
        parts = [u.detach() for u in logits]
    if not parts or parts[0].shape[1] == 0:
        raise ValueError("logits have 0 modalities or 0 classes")
    return parts


def modality_scores(logits: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor, *,
                    backend: str = "auto") -> torch.Tensor:
    """s_m = sum_i softmax(logits_m[i])[labels[i]] for each modality m: float32 [M], detached.

    `logits` is a sequence of M tensors [B, C] or one [M, B, C] tensor; `labels` is [B]. The sum
    (not the mean) over the batch is what OGM and OPM take ratios of. Labels out of range raise
    ValueError on CPU and trip a device-side assert on CUDA (no host sync).
    """
    parts = _logit_parts(logits)
    labels = check_labels(labels, parts[0].shape[0], parts[0].device)
    return true_class_prob(parts, labels, backend=backend)


def strongest_other(scores: torch.Tensor) -> torch.Tensor:
    """max_{j != m} s_j for each m of a score vector s [M] (M >= 2): the denominator of the
    ratios rho_m = s_m / max_{j != m} s_j of OGM and PMR. Pure device math."""
    n = scores.numel()
    if n == 2:  # the other modality (the common case, in the fewest device ops)
        return scores.flip(0)
    return scores.expand(n, n).masked_fill(
        torch.eye(n, dtype=torch.bool, device=scores.device), float("-inf")).amax(dim=1)
