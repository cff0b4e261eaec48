"""The balancing methods a run composes (`--method joint | ogm | ogm-ge | opm | dr | agm | pmr |
mmpareto | a+b`).

`MethodStack` wires the fastbml helpers into the loop at their points: OPM between the encoders
and the fusion head, PMR's prototypical loss added to the training loss (its prototypes rebuilt
before training and after each epoch), MMPareto as the backward pass itself (over the model's
uni-modal heads), OGM / OGM-GE and AGM after backward (after unscaling with AMP), D&R after
each epoch's evaluation. It also gathers what each method did for the logs, on device, and
syncs once per epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch.nn import functional as F

import fastbml

from ..models import MultimodalClassifier
from .config import AMP_DTYPES, TrainConfig

METHODS = ("joint", "ogm", "ogm-ge", "opm", "dr", "agm", "pmr", "mmpareto")
# Methods whose model carries trained uni-modal heads (MultimodalClassifier(unimodal_heads=True)).
UNIMODAL_HEAD_METHODS = ("mmpareto",)
_REWRITES = ("MMPareto's combination of the uni-modal and multimodal gradients would be "
             "rescaled by coefficients scored for the fused loss alone; combine mmpareto with "
             "opm or dr")
# Parts that cannot share a run, and why.
EXCLUSIVE = (
    ({"ogm", "ogm-ge"}, "choose one of 'ogm' and 'ogm-ge'"),
    ({"agm", "ogm"}, "'agm' and 'ogm' both rescale the encoders' gradients; choose one"),
    ({"agm", "ogm-ge"}, "'agm' and 'ogm-ge' both rescale the encoders' gradients; choose one"),
    ({"agm", "opm"}, "'agm' decomposes the fused output that 'opm' perturbs; they cannot be "
                     "combined"),
    ({"pmr", "dr"}, "'pmr' cannot be combined with 'dr': D&R re-initialises the encoders whose "
                    "feature space PMR's prototypes describe, and their EMA would blend "
                    "prototypes of two different encoders"),
    *(({"mmpareto", other}, f"'mmpareto' and '{other}' both rewrite the encoders' gradients "
                            f"after backward ({_REWRITES})") for other in ("ogm", "ogm-ge", "agm")),
    ({"mmpareto", "pmr"}, "'mmpareto' and 'pmr' cannot be combined: PMR's prototype loss on the "
                          "encoders' features would be counted as part of MMPareto's multimodal "
                          "objective, a combination neither method defines"),
)

FeatureFn = Callable[[], tuple[dict[str, torch.Tensor], torch.Tensor]]
# PMR's prototype subset: eval-mode (features, labels) batches, produced on demand
BatchesFn = Callable[[], Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]]


def compiled(cfg: TrainConfig, fn: Callable, *, fullgraph: bool = True) -> Callable:
    """`fn` under torch.compile as `cfg` asks (`--compile`), else `fn` itself."""
    if not cfg.compile:
        return fn
    mode = cfg.compile_mode if cfg.compile_backend == "inductor" else None
    return torch.compile(fn, fullgraph=fullgraph, backend=cfg.compile_backend, mode=mode)


def _gradient_step(cfg: TrainConfig, fn: Callable) -> Callable:
    """A gradient-modulating step under --compile; eager under --fsdp, where the helpers read
    each DTensor shard's layout on the host (docs/design.md#fsdp2)."""
    return fn if cfg.fsdp else compiled(cfg, fn)


def parse_method(method: str) -> tuple[str, ...]:
    """The components of a method string such as "opm+ogm-ge" (sorted, "joint" alone)."""
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a string such as 'ogm-ge' or 'opm+ogm-ge', got {method!r}")
    parts = tuple(sorted(set(method.lower().split("+"))))
    bad = [p for p in parts if p not in METHODS]
    if bad:
        raise ValueError(f"method has unknown parts {bad}; choose from {METHODS}, joined by '+'")
    if "joint" in parts and len(parts) > 1:
        raise ValueError("method 'joint' (plain training) cannot be combined with others")
    for together, why in EXCLUSIVE:
        if together <= set(parts):
            raise ValueError(f"method: {why}")
    return parts


def needs_unimodal_heads(method: str) -> bool:
    """Whether the model of a run of `method` needs trained uni-modal heads."""
    return any(p in UNIMODAL_HEAD_METHODS for p in parse_method(method))


class MethodStack:
    """The helpers of one run's method, built for `model` from `cfg`."""

    def __init__(self, cfg: TrainConfig, model: MultimodalClassifier, num_classes: int,
                 device: torch.device):
        self.parts = parse_method(cfg.method)
        modalities = list(model.modalities)
        if self.parts != ("joint",) and len(modalities) < 2:
            raise ValueError(f"method {cfg.method!r} needs at least two modalities")
        if cfg.fsdp and "mmpareto" in self.parts:
            raise ValueError("method 'mmpareto' does not run under --fsdp: MMPareto combines "
                             "whole per-modality gradients, which it averages over the ranks "
                             "itself; train it with DDP (no --fsdp)")
        seed = cfg.seed
        self.ogm = self.opm = self.dr = self.agm = self.pmr = self.mmpareto = None
        if "ogm" in self.parts or "ogm-ge" in self.parts:
            self.ogm = fastbml.OGM({m: model.encoders[m] for m in modalities}, alpha=cfg.alpha,
                                   form=cfg.ogm_form, noise="ogm-ge" in self.parts,
                                   start=cfg.ogm_start, end=cfg.ogm_end,
                                   warmup_epochs=cfg.warmup_epochs, seed=seed,
                                   conv_only=cfg.conv_only, backend=cfg.backend)
            self._ogm_step = _gradient_step(cfg, self.ogm.step)
        if "opm" in self.parts:
            self.opm = fastbml.OPM(modalities, q_base=cfg.q_base, lam=cfg.opm_lambda,
                                   p_exe=cfg.p_exe, start=cfg.opm_start, end=cfg.opm_end,
                                   warmup_epochs=cfg.warmup_epochs, seed=seed + 1,
                                   backend=cfg.backend).to(device)
        if "mmpareto" in self.parts:
            if model.unimodal_heads is None:
                raise ValueError("method 'mmpareto' needs a model with uni-modal heads "
                                 "(build_model(..., unimodal_heads=True))")
            self.mmpareto = fastbml.MMPareto({m: model.encoders[m] for m in modalities},
                                             gamma=cfg.mmpareto_gamma, start=cfg.mmpareto_start,
                                             end=cfg.mmpareto_end, backend=cfg.backend)
        if "dr" in self.parts:
            self.dr = fastbml.DiagnoseRelearn(
                {m: model.encoders[m] for m in modalities}, every=cfg.dr_every,
                times=cfg.dr_times, lam=cfg.dr_lambda,
                n_clusters=cfg.dr_clusters or num_classes, seed=seed, backend=cfg.backend)
        if "agm" in self.parts:
            self.agm = fastbml.AGM({m: model.encoders[m] for m in modalities}, model.head,
                                   alpha=cfg.agm_alpha, start=cfg.agm_start, end=cfg.agm_end,
                                   backend=cfg.backend)
            self._agm_update = _gradient_step(cfg, self.agm.update)
        self._autocast = (device.type, AMP_DTYPES.get(cfg.amp))
        if "pmr" in self.parts:
            self.pmr = fastbml.PMR(modalities, num_classes, alpha=cfg.pmr_alpha,
                                   momentum=cfg.pmr_momentum, start=cfg.pmr_start,
                                   end=cfg.pmr_end, backend=cfg.backend)
        self.modalities = modalities
        self._sums: dict[str, torch.Tensor] = {}
        self._steps = 0

    def train(self, mode: bool = True) -> None:
        if self.opm is not None:
            self.opm.train(mode)

    def features(self, features: dict[str, torch.Tensor], unimodal: dict[str, torch.Tensor],
                 labels: torch.Tensor, epoch: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Features for the fusion head and per-sample loss weights (None: the plain batch mean)."""
        if self.opm is None:
            return features, None
        return self.opm(features, unimodal, labels, epoch)

    def extra_loss(self, features: Mapping[str, torch.Tensor], labels: torch.Tensor,
                   epoch: int) -> torch.Tensor | None:
        """What the methods add to the training loss, from the encoders' pooled features (PMR's
        prototypical loss); None when no method adds one."""
        if self.pmr is None:
            return None
        return self.pmr.loss(features, labels, epoch)

    def refresh_prototypes(self, epoch: int, batches: BatchesFn) -> None:
        """PMR's prototypes from `batches()` (the prototype subset's eval-mode features), before
        training (epoch 0) and after each epoch (the epoch just trained); nothing otherwise."""
        if self.pmr is None:
            return
        self.pmr.update_prototypes(epoch, batches())

    def backward(self, loss: torch.Tensor, head_logits: Mapping[str, torch.Tensor] | None,
                 labels: torch.Tensor, epoch: int,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        """The step's backward pass: MMPareto's (the uni-modal heads' losses next to `loss`,
        two passes and the combination of the encoders' gradients), else one backward of
        `loss`; scaled by `scaler` when given (the caller unscales afterwards)."""
        if self.mmpareto is None:
            (loss if scaler is None else scaler.scale(loss)).backward()
            return
        unimodal = {m: F.cross_entropy(u.float(), labels) for m, u in head_logits.items()}
        self.mmpareto.backward(loss, unimodal, epoch, scaler=scaler)
        if self.mmpareto.active(epoch):
            self._add("cos", self.mmpareto.last_cos)
            self._add("conflict", (self.mmpareto.last_cos <= 0).float())

    def after_backward(self, unimodal: Mapping[str, torch.Tensor], labels: torch.Tensor,
                       epoch: int, *, inputs: Mapping[str, torch.Tensor],
                       logits: torch.Tensor) -> None:
        """Modulate the encoders' gradients (OGM / OGM-GE from the uni-modal logits, AGM from
        the batch's inputs and fused logits) and accumulate the step's logs."""
        if self.ogm is not None:
            self._ogm_step(unimodal, labels, epoch)
            self._add("coeff", self.ogm.last_coeffs)
        if self.agm is not None and self.agm.active(epoch):
            device_type, amp_dtype = self._autocast
            with torch.autocast(device_type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):  # the eval passes, as in forward
                subsets = self.agm.subset_logits(inputs, logits)
            self._agm_update(subsets, labels)
            self._add("coeff", self.agm.last_coeffs)
            self._add("agm_score", self.agm.last_scores)
        if self.opm is not None and self.opm.last_q is not None:
            self._add("drop_prob", self.opm.last_q)
        if self.pmr is not None and self.pmr.last_weights is not None:
            self._add("pmr_weight", self.pmr.last_weights)
        self._steps += 1

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()

    def epoch_logs(self) -> dict[str, float]:
        """Per-modality means over the epoch's steps (coeff_<m>, drop_prob_<m>, agm_score_<m>,
        pmr_weight_<m>: the fraction of steps PMR's loss acted on m, and MMPareto's cos_<m> and
        conflict_<m>, the fraction of steps whose gradients conflicted); resets the sums."""
        out = {}
        for key, total in self._sums.items():
            for m, v in zip(self.modalities, (total / max(self._steps, 1)).tolist()):
                out[f"{key}_{m}"] = v
        self._sums, self._steps = {}, 0
        return out

    def after_epoch(self, epoch: int, train_features: FeatureFn,
                    val_features: FeatureFn) -> dict[str, float]:
        """D&R's diagnosis and soft re-initialisation when due; returns what it measured."""
        if self.dr is None:
            return {}
        return dict(self.dr.step(epoch, train_features, val_features) or {})

    def _helpers(self) -> tuple:
        return (("ogm", self.ogm), ("opm", self.opm), ("dr", self.dr), ("agm", self.agm),
                ("pmr", self.pmr), ("mmpareto", self.mmpareto))

    def state_dict(self) -> dict:
        return {name: helper.state_dict() for name, helper in
                self._helpers() if helper is not None}

    def load_state_dict(self, state: Mapping) -> None:
        for name, helper in self._helpers():
            if helper is None:
                continue
            if name not in state:
                raise ValueError(f"checkpoint has no state for method part {name!r}")
            helper.load_state_dict(state[name])
