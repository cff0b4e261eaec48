"""Fusion heads, each exposing per-modality (uni-modal) logits (docs/methods.md#uni-modal-logits).

* concat: z = W [f_1; ...; f_M] + b;  u_m = f_m W_m^T + b / M, so sum_m u_m = z exactly.
* sum:    z = sum_m (W_m f_m + b_m);  u_m = W_m f_m + b_m (the reference training loop's split).
* FiLM:   (gamma, beta) = Linear(f_x) split; z = W_o (gamma * f_y + beta) + b_o (x conditions y).
* gated:  g = sigmoid(W_x f_x + b_x); z = W_o (g * (W_y f_y + b_y)) + b_o (x is the gate).

Uni-modal logits carry no gradient: they are only scored and logged, never trained on.
FiLM and gated logits do not split into modalities, so those heads carry auxiliary
per-modality linear heads on *detached* features: they read each encoder without feeding
gradient back into it, so they change nothing in the multimodal training; `auxiliary_loss`
trains them. (MMPareto's uni-modal losses, which do train the encoders, use the classifier's
separate `unimodal_heads`.)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from ..unimodal import concat_unimodal_logits, sum_unimodal_logits

FUSIONS = ("concat", "sum", "film", "gated")


def _check_dims(dims: Mapping[str, int], num_classes: int) -> dict[str, int]:
    if not isinstance(dims, Mapping) or not dims:
        raise ValueError("dims must map modality names to feature sizes")
    for name, d in dims.items():
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"dims[{name!r}] must be a positive int, got {d!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return dict(dims)


class FusionHead(nn.Module):
    """Base: `forward(features) -> fused logits [B, C]`; `unimodal_logits(features) -> {m: [B, C]}`.

    The head is never modulated or re-initialised by any method (docs/methods.md#models-and-initialisation).
    """

    has_auxiliary = False  # True when the uni-modal logits come from trained auxiliary heads

    def __init__(self, dims: Mapping[str, int], num_classes: int):
        super().__init__()
        self.dims = _check_dims(dims, num_classes)
        self.modalities = tuple(self.dims)
        self.num_classes = num_classes

    def _ordered(self, features: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        if set(features) != set(self.modalities):
            raise ValueError(f"features have modalities {sorted(features)}, the head expects "
                             f"{sorted(self.modalities)}")
        out = [features[m] for m in self.modalities]
        for m, f in zip(self.modalities, out):
            if f.dim() != 2 or f.shape[1] != self.dims[m]:
                raise ValueError(f"features[{m!r}] must be [B, {self.dims[m]}], got {tuple(f.shape)}")
        return out

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def auxiliary_loss(self, unimodal: Mapping[str, torch.Tensor],
                       labels: torch.Tensor) -> torch.Tensor | None:
        """The loss that trains auxiliary uni-modal heads (None when the head has none)."""
        return None


class ConcatFusion(FusionHead):
    """z = W [f_1; ...; f_M] + b, modalities joined in `dims` order."""

    def __init__(self, dims: Mapping[str, int], num_classes: int):
        super().__init__(dims, num_classes)
        self.fc = nn.Linear(sum(self.dims.values()), num_classes)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.cat(self._ordered(features), dim=1))

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            logits = concat_unimodal_logits(self._ordered(features), self.fc.weight, self.fc.bias)
        return dict(zip(self.modalities, logits))


class SumFusion(FusionHead):
    """z = sum_m (W_m f_m + b_m), one Linear(d_m, C) per modality."""

    def __init__(self, dims: Mapping[str, int], num_classes: int):
        super().__init__(dims, num_classes)
        self.fc = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in self.dims.items()})

    def _parts(self, features: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return sum_unimodal_logits(self._ordered(features), [self.fc[m] for m in self.modalities])

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(self._parts(features)).sum(dim=0)

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return dict(zip(self.modalities, self._parts(features)))


class _AuxiliaryHeadFusion(FusionHead):
    """Two-modality head whose uni-modal logits come from linear heads on detached features."""

    has_auxiliary = True

    def __init__(self, dims: Mapping[str, int], num_classes: int):
        super().__init__(dims, num_classes)
        if len(self.dims) != 2:
            raise ValueError(f"{type(self).__name__} fuses exactly two modalities (the first "
                             f"conditions the second), got {len(self.dims)}")
        self.aux = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in self.dims.items()})

    def unimodal_logits(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.aux[m](f.detach()) for m, f in zip(self.modalities, self._ordered(features))}

    def auxiliary_loss(self, unimodal: Mapping[str, torch.Tensor],
                       labels: torch.Tensor) -> torch.Tensor:
        return sum(F.cross_entropy(u, labels) for u in unimodal.values())


class FiLMFusion(_AuxiliaryHeadFusion):
    """FiLM: the first modality's features give (gamma, beta) that modulate the second's."""

    def __init__(self, dims: Mapping[str, int], num_classes: int):
        super().__init__(dims, num_classes)
        (_, d_x), (_, d_y) = self.dims.items()
        self.film = nn.Linear(d_x, 2 * d_y)
        self.fc_out = nn.Linear(d_y, num_classes)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        f_x, f_y = self._ordered(features)
        gamma, beta = self.film(f_x).chunk(2, dim=1)
        return self.fc_out(gamma * f_y + beta)


class GatedFusion(_AuxiliaryHeadFusion):
    """Gated: sigmoid of the first modality's projection gates the second's projection."""

    def __init__(self, dims: Mapping[str, int], num_classes: int, hidden: int | None = None):
        super().__init__(dims, num_classes)
        (_, d_x), (_, d_y) = self.dims.items()
        hidden = hidden or max(d_x, d_y)
        self.fc_x = nn.Linear(d_x, hidden)
        self.fc_y = nn.Linear(d_y, hidden)
        self.fc_out = nn.Linear(hidden, num_classes)

    def forward(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        f_x, f_y = self._ordered(features)
        return self.fc_out(torch.sigmoid(self.fc_x(f_x)) * self.fc_y(f_y))


def build_fusion(kind: str, dims: Mapping[str, int], num_classes: int) -> FusionHead:
    """The fusion head named `kind` (one of FUSIONS) over modalities `dims` (name -> feature size)."""
    heads = {"concat": ConcatFusion, "sum": SumFusion, "film": FiLMFusion, "gated": GatedFusion}
    if kind not in heads:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {kind!r}")
    return heads[kind](dims, num_classes)
