"""Uni-modal logits from a fusion head: the per-modality predictions OGM and OPM score
(docs/methods.md#uni-modal-logits).

The methods never train on these logits; they only compare how much probability each modality's
part of the head gives the true class. Concat and sum heads split exactly into per-modality parts;
FiLM and gated heads do not (one modality conditions the other), so their uni-modal logits must
come from the user, e.g. from auxiliary linear heads on each encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

FUSIONS = ("concat", "sum", "film", "gated")


def _check_features(features) -> list[torch.Tensor]:
    if isinstance(features, torch.Tensor) or not isinstance(features, Sequence) or not features:
        raise TypeError("features must be a non-empty sequence of [B, d_m] tensors")
    for m, f in enumerate(features):
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"features[{m}] must be a tensor, got {type(f).__name__}")
        if f.dim() != 2:
            raise ValueError(f"features[{m}] must be [B, d_m], got shape {tuple(f.shape)}")
        if f.shape[0] != features[0].shape[0]:
            raise ValueError(f"features[{m}] has batch size {f.shape[0]} but features[0] has "
                             f"{features[0].shape[0]}")
    return list(features)


def concat_unimodal_logits(features: Sequence[torch.Tensor], weight: torch.Tensor,
                           bias: torch.Tensor | None = None) -> list[torch.Tensor]:
    """u_m = f_m W_m^T + b / M for a concat head z = [f_1; ...; f_M] W^T + b.

    W_m is the column block of `weight` [C, sum d_m] that multiplies f_m (blocks in the order of
    `features`), so sum_m u_m == z up to float rounding. Differentiable like the head itself;
    pass `weight.detach()` (and the bias) to keep the scoring out of the head's graph, as the
    T-PAMI code does. Returns one [B, C] tensor per modality.
    """
    features = _check_features(features)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError("weight must be the concat head's [C, sum d_m] weight tensor")
    dims = [f.shape[1] for f in features]
    if weight.shape[1] != sum(dims):
        raise ValueError(f"weight has {weight.shape[1]} input columns but the features have "
                         f"{sum(dims)} (= {' + '.join(map(str, dims))})")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        raise ValueError(f"bias must be None or a [{weight.shape[0]}] tensor")
    share = None if bias is None else bias / len(features)
    return [F.linear(f, w, share) for f, w in zip(features, weight.split(dims, dim=1))]


def sum_unimodal_logits(features: Sequence[torch.Tensor],
                        linears: Sequence[nn.Linear]) -> list[torch.Tensor]:
    """u_m = W_m f_m + b_m for a sum head z = sum_m linears[m](f_m): each modality keeps its full
    own bias, as the OGM-GE training loop does, so sum_m u_m == z."""
    features = _check_features(features)
    if isinstance(linears, nn.Module) or not isinstance(linears, Sequence):
        raise TypeError("linears must be a sequence of nn.Linear, one per modality")
    if len(linears) != len(features):
        raise ValueError(f"got {len(linears)} linears for {len(features)} modalities")
    for m, layer in enumerate(linears):
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"linears[{m}] must be an nn.Linear, got {type(layer).__name__}")
    return [layer(f) for f, layer in zip(features, linears)]


def unimodal_logits(fusion: str, features: Sequence[torch.Tensor], *,
                    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    linears: Sequence[nn.Linear] | None = None,
                    logits: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The uni-modal logits of a `fusion` head ("concat", "sum", "film" or "gated").

    `logits`, when given, are the user's own per-modality logits and win for every head.
    Otherwise concat needs the head's `weight`/`bias`, sum its per-modality `linears`; FiLM and
    gated heads raise a ValueError, because their output does not split into per-modality parts
    (the reference code fails there with a matmul shape error; docs/methods.md#uni-modal-logits).
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if logits is not None:
        features = _check_features(features)
        if isinstance(logits, torch.Tensor) or not isinstance(logits, Sequence) or len(
                logits) != len(features):
            raise ValueError(f"logits must be a sequence of {len(features)} [B, C] tensors, one "
                             "per modality")
        return list(logits)
    if fusion == "concat":
        if weight is None:
            raise ValueError("fusion='concat' needs the head's weight (and bias)")
        return concat_unimodal_logits(features, weight, bias)
    if fusion == "sum":
        if linears is None:
            raise ValueError("fusion='sum' needs the head's per-modality linears")
        return sum_unimodal_logits(features, linears)
    raise ValueError(f"uni-modal logits cannot be derived from a {fusion!r} fusion head (one "
                     "modality conditions the other): pass logits=, one [B, C] tensor per "
                     "modality, e.g. from auxiliary linear heads on each encoder's features")
