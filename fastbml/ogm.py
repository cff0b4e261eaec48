"""OGM / OGM-GE: on-the-fly gradient modulation with generalisation-enhancing noise (docs/methods.md#ogm-and-ogm-ge).

After `loss.backward()`, each modality's encoder gradient is scaled by a coefficient that shrinks
when that modality dominates the others (k_m < 1), and OGM-GE adds Gaussian noise with each
tensor's own gradient std. All of it stays on the device: no host sync per step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from . import distributed, rng
from ._checks import check_scores, finite_number
from ._grad_groups import check_params, flatten, grads_of, grouped, modulate_
from ._method import MethodScaffold
from .scores import modality_scores, strongest_other

COEFF_FORMS = ("paper", "shifted")


def ogm_coefficients(scores: torch.Tensor, alpha: float, form: str = "paper") -> torch.Tensor:
    """Per-modality gradient coefficients k [M] (float32) from the scores s [M].

    rho_m = s_m / max_{j != m} s_j (for M = 2, the ratio to the other modality). A modality is
    modulated only when it leads strictly (rho_m > 1; an exact tie modulates neither):
    "paper" gives k_m = 1 - tanh(alpha * rho_m) (CVPR Eq. 10, discontinuous at rho = 1),
    "shifted" gives k_m = 1 - tanh(alpha * (rho_m - 1)); every other modality gets k = 1.
    """
    check_scores(scores)
    alpha = finite_number(alpha, "alpha", low=0.0)
    if form not in COEFF_FORMS:
        raise ValueError(f"form must be one of {COEFF_FORMS}, got {form!r}")
    s = scores.detach().to(torch.float32)
    rho = s / strongest_other(s)
    excess = rho if form == "paper" else rho - 1.0
    return torch.where(rho > 1.0, 1.0 - torch.tanh(alpha * excess), 1.0)


def _check_coeffs(coeffs: object, n_groups: int) -> None:
    if not isinstance(coeffs, torch.Tensor):
        raise TypeError(f"coeffs must be a tensor, got {type(coeffs).__name__}")
    if coeffs.dim() != 1 or coeffs.numel() != n_groups:
        raise ValueError(f"coeffs must have one entry per modality ({n_groups}), got shape "
                         f"{tuple(coeffs.shape)}")


def ogm_modulate_(params, coeffs: torch.Tensor, *, modality_index: Sequence[int] | None = None,
                  noise: bool = True, seed: rng.Seed | None = None,
                  backend: str = "auto") -> None:
    """In place on every param's `.grad`: g <- k_m * g (+ N(0, (std(g) + 1e-8)^2) if `noise`).

    `params` is one list of parameters per modality (or a flat list with `modality_index`);
    `coeffs` the device vector k [M]. The std is each tensor's unbiased std before scaling; a
    1-element gradient gets noise std 1e-8. Parameters whose grad is None are skipped. Non-finite
    gradients are not masked: a tensor holding inf/NaN stays non-finite, the others are
    unaffected (with AMP, GradScaler has already recorded the overflow and skips the step).
    Noise is drawn from the Philox stream of `seed`: an int, an int64 0-dim tensor on the
    gradients' device (what a compiled step should pass: it is read on the device and never
    specialises the graph), or None for a fresh seed from torch's CPU generator. DTensor
    gradients sharded on dim 0 or replicated (FSDP2, HSDP) are modulated shard by shard exactly
    as their whole tensors would be (docs/design.md#fsdp2), given the same `seed` on every
    rank (the helper `OGM` shares one); other placements are a ValueError.
    """
    groups = grouped(params, modality_index)
    _check_coeffs(coeffs, len(groups))
    check_params(groups)
    flat, index = flatten(groups)
    grads, scale_index = grads_of(groups, flat, index, coeffs.device)
    modulate_(groups, flat, grads, scale_index, coeffs.detach(), noise=noise, seed=seed,
               backend=backend)


GroupSpec = nn.Module | Iterable[torch.Tensor]


class OGM(MethodScaffold):
    """Drop-in OGM / OGM-GE for a training loop.

        ogm = fastbml.OGM({"audio": model.audio_net, "visual": model.visual_net}, alpha=0.8)
        loss.backward()                      # with AMP: scaler.unscale_(optimizer) first
        ogm.step({"audio": u_a, "visual": u_v}, labels, epoch=epoch)
        optimizer.step()

    `groups` maps each modality to its encoder module (modulated: its weights with ndim >= 2,
    or only 4-D conv kernels with `conv_only=True`, the original repository's rule) or to an
    explicit list of parameters (taken as given). Modulation runs for start <= epoch <= end
    (inclusive; `end=None` is open) and epoch >= warmup_epochs. `noise=False` gives plain OGM.
    Step t draws its noise from rng.step_seed(seed, t), so a resumed run (state_dict) continues
    the same stream; t is counted in a device tensor, so `step` compiles to one graph with
    `torch.compile(fullgraph=True)`. Under DDP (`process_group="auto"` with torch.distributed initialised, or an
    explicit group) the scores are summed over the ranks every step, so all ranks use the
    coefficients of the global batch, and every rank adds identical noise to its (already
    all-reduced) gradients; rank 0's seed is shared when none is given, and construction (like
    the first eager step after load_state_dict) checks that all ranks agree on modalities,
    parameter shapes and seed. Under FSDP2 (`fully_shard`, HSDP included) the gradients are
    DTensors sharded on dim 0: each rank modulates its shards, with each whole gradient's std
    (one all_reduce of 3 float64 per tensor over the sharding group) and the noise of the
    whole tensor's indices, so the result equals one process modulating the whole gradients
    (docs/design.md#fsdp2). With gradient accumulation, call `step` once per
    optimizer step, after the last backward; the scores are then the last micro-batch's.
    `last_scores` and `last_coeffs` (device tensors, no sync) hold the latest step's values;
    the coefficients are the ones applied (ones outside the window).
    """

    def __init__(self, groups: Mapping[str, GroupSpec], alpha: float, *, form: str = "paper",
                 noise: bool = True, start: int = 0, end: int | None = None,
                 warmup_epochs: int = 0, seed: int | None = None, conv_only: bool = False,
                 backend: str = "auto", process_group: object = distributed.GROUP_AUTO):
        if not isinstance(groups, Mapping) or len(groups) < 2:
            raise ValueError("groups must map at least two modality names to modules or "
                             "parameter lists")
        ogm_coefficients(torch.ones(2), alpha, form)  # validates alpha and form
        self._setup(list(groups), start=start, end=end, warmup_epochs=warmup_epochs, seed=seed,
                    backend=backend, process_group=process_group)
        selected = [self._select(name, spec, conv_only) for name, spec in groups.items()]
        self.params = [[p for _, p in group] for group in selected]
        self._labels = [label for group in selected for label, _ in group]
        check_params(self.params)
        self._flat, self._scale_index = flatten(self.params)
        self.alpha, self.form, self.noise = float(alpha), form, noise
        first = self._flat[0] if self._flat else None
        # The step counter lives on the device: a compiled step reads and increments it there,
        # so the graph is not specialised on the step number.
        self._step = torch.zeros((), dtype=torch.int64,
                                 device=first.device if first is not None else "cpu")
        self.last_scores: torch.Tensor | None = None
        self.last_coeffs: torch.Tensor | None = None
        self._check_ranks()

    @staticmethod
    def _select(name: str, spec: GroupSpec, conv_only: bool) -> list[tuple[str, torch.Tensor]]:
        """The modality's (label, parameter) pairs; a label names the parameter in errors."""
        if isinstance(spec, nn.Module):
            wanted = (lambda p: p.dim() == 4) if conv_only else (lambda p: p.dim() >= 2)
            return [(f"{name}.{key}", p) for key, p in spec.named_parameters()
                    if p.requires_grad and wanted(p)]
        if isinstance(spec, torch.Tensor) or not isinstance(spec, Iterable):
            raise TypeError(f"groups[{name!r}] must be an nn.Module or a list of parameters, got "
                            f"{type(spec).__name__}")
        return [(f"{name}[{j}]", p) for j, p in enumerate(spec)]

    def active(self, epoch: int) -> bool:
        """Whether gradients are modulated in `epoch` (0-based)."""
        return self.in_window(epoch)

    def step(self, logits: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
             labels: torch.Tensor, epoch: int) -> torch.Tensor:
        """Score the modalities on this batch and modulate the gradients; returns k [M].

        Safe to compile with `torch.compile(fullgraph=True)`: one graph serves every step of
        an epoch (the step counter and the step's seed live on the device).
        """
        self._check_ranks()
        scores = modality_scores(self._ordered(logits, "logits"), labels, backend=self.backend)
        distributed.all_reduce_sum_(scores, self.group)
        if self._step.device != scores.device:  # the model moved after construction
            self._step = self._step.to(scores.device)
        if self.active(epoch):
            coeffs = ogm_coefficients(scores, self.alpha, self.form)
            grads, scale_index = grads_of(self.params, self._flat, self._scale_index,
                                           coeffs.device)
            modulate_(self.params, self._flat, grads, scale_index, coeffs, noise=self.noise,
                       seed=rng.step_seed_tensor(self.seed, self._step), backend=self.backend,
                       labels=self._labels)
        else:
            coeffs = torch.ones_like(scores)
        self._step.add_(1)
        self.last_scores, self.last_coeffs = scores, coeffs
        return coeffs

    def _config(self) -> dict:
        return {"modalities": self.modalities, "seed": self.seed, "steps": self.steps,
                "alpha": self.alpha, "form": self.form, "noise": self.noise,
                "shapes": [[list(p.shape) for p in group] for group in self.params]}

    def state_dict(self) -> dict:
        return self._counters()

    def load_state_dict(self, state: Mapping) -> None:
        self._load_counters(state)
