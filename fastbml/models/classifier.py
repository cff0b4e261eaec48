"""A multimodal classifier for any number of modalities, and its construction from input specs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .encoders import MLPEncoder, TransformerEncoder
from .fusion import FusionHead, build_fusion
from .resnet import FrameResNet18, SpectrogramResNet18

INPUT_KINDS = ("spectrogram", "frames", "flow", "vector", "sequence")
INIT_STYLES = ("ogm", "dr")


@dataclass(frozen=True)
class InputSpec:
    """What one modality's per-sample input is.

    kind: "spectrogram" [1, F, T], "frames" [3, T, H, W], "flow" [2, T, H, W] (ResNet-18 encoders),
    "vector" [D] (MLP) or "sequence" [L, D] (transformer); shape: the per-sample tensor shape.
    """

    kind: str
    shape: tuple[int, ...]

    def __post_init__(self):
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"kind must be one of {INPUT_KINDS}, got {self.kind!r}")


@dataclass
class ModelOutput:
    """Fused logits [B, C], per-modality pooled features {m: [B, d_m]} and uni-modal logits {m: [B, C]}."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor]
    unimodal: dict[str, torch.Tensor]


class MultimodalClassifier(nn.Module):
    """Per-modality encoders -> pooled features -> a fusion head.

    `encode` and `classify` are exposed separately so a feature-level method (OPM) can sit
    between them; `forward` chains them. `unimodal_heads=True` adds a trained Linear(d_m, C) on
    each encoder's feature (the uni-modal losses of MMPareto, docs/methods.md#mmpareto); the
    per-modality logits of `classify` are then theirs.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], head: FusionHead, *,
                 unimodal_heads: bool = False):
        super().__init__()
        if set(encoders) != set(head.modalities):
            raise ValueError(f"encoders {sorted(encoders)} and head modalities "
                             f"{sorted(head.modalities)} differ")
        self.encoders = nn.ModuleDict({m: encoders[m] for m in head.modalities})
        self.head = head
        self.modalities = head.modalities
        self.unimodal_heads = nn.ModuleDict(
            {m: nn.Linear(head.dims[m], head.num_classes) for m in head.modalities}
        ) if unimodal_heads else None

    def unimodal_head_logits(self, features: Mapping[str, torch.Tensor]
                             ) -> dict[str, torch.Tensor] | None:
        """The trained uni-modal heads' logits {m: [B, C]} (with gradient), None without them."""
        if self.unimodal_heads is None:
            return None
        return {m: self.unimodal_heads[m](features[m]) for m in self.modalities}

    def encode(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise ValueError(f"inputs lack modalities {missing} (got {sorted(inputs)})")
        return {m: self.encoders[m](inputs[m]) for m in self.modalities}

    def classify(self, features: Mapping[str, torch.Tensor]) -> ModelOutput:
        unimodal = self.unimodal_head_logits(features) or self.head.unimodal_logits(features)
        return ModelOutput(self.head(features), dict(features), unimodal)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> ModelOutput:
        return self.classify(self.encode(inputs))


def build_encoder(spec: InputSpec, *, hidden: int = 128, feature_dim: int = 128) -> nn.Module:
    """The reference encoder for an input kind (ResNet-18 for images, MLP / transformer for features).

    `hidden` and `feature_dim` size the MLP and transformer; ResNet-18 features are always 512-d.
    """
    if spec.kind == "spectrogram":
        return SpectrogramResNet18(spec.shape[0])
    if spec.kind in ("frames", "flow"):
        return FrameResNet18(spec.shape[0])
    if spec.kind == "vector":
        return MLPEncoder(spec.shape[-1], out_dim=feature_dim, hidden=hidden)
    return TransformerEncoder(spec.shape[-1], max_len=spec.shape[0], d_model=feature_dim)


def reference_init_(model: nn.Module, style: str = "ogm") -> None:
    """The init the reference mains apply after construction (docs/methods.md#models-and-initialisation).

    "ogm" (OGM-GE / T-PAMI): Linear Xavier-normal with zero bias, Conv2d Kaiming-normal
    (fan_out, ReLU), BatchNorm weight 1 and bias 0. "dr" (D&R): ResNet's own init kept
    (BN weight ~ N(1, 0.02)), Linear layers keep PyTorch's default.
    """
    if style not in INIT_STYLES:
        raise ValueError(f"init style must be one of {INIT_STYLES}, got {style!r}")
    if style == "dr":
        return
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(inputs: Mapping[str, InputSpec], num_classes: int, *, fusion: str = "concat",
                init: str = "ogm", hidden: int = 128, feature_dim: int = 128,
                unimodal_heads: bool = False) -> MultimodalClassifier:
    """A classifier over the modalities of `inputs` (in its order) with the named fusion head
    (and trained uni-modal heads with `unimodal_heads`).

    One modality with concat or sum fusion is a uni-modal baseline (encoder + linear head).
    """
    if not isinstance(inputs, Mapping) or not inputs:
        raise ValueError("inputs must map modality names to InputSpec")
    encoders = {m: build_encoder(spec, hidden=hidden, feature_dim=feature_dim)
                for m, spec in inputs.items()}
    head = build_fusion(fusion, {m: e.out_dim for m, e in encoders.items()}, num_classes)
    model = MultimodalClassifier(encoders, head, unimodal_heads=unimodal_heads)
    reference_init_(model, init)
    return model
