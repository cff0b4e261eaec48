"""OPM: on-the-fly prediction modulation (T-PAMI 2024; docs/methods.md#opm).

In the forward pass, the pooled features of a dominant modality are dropped for random samples
(before fusion) with a probability that grows with its dominance, and every feature is rescaled by
1 / (1 - theta). Scores, probabilities, coin and masks stay on the device: no host sync per step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from . import distributed, rng
from ._checks import check_float_tensor, check_scores, check_unit_range, finite_number, probability
from ._method import MethodScaffold
from .ops.row_drop import row_drop
from .scores import modality_scores


def opm_drop_probs(scores: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """Per-modality drop probabilities q [M] (float32, detached) from the scores s [M].

    rho_m = s_m / sum_{j != m} s_j (for M = 2, the ratio to the other modality; for M > 2 a
    modality dominates only if it beats the others together: docs/methods.md#opm-with-n-modalities). Only a strictly dominant modality
    (rho_m > 1; an exact tie drops nothing) gets q_m = clip(q_base * (1 + lam * tanh(rho_m - 1)),
    0, 1); every other modality gets 0. Pure device math.
    """
    check_scores(scores)
    q_base = probability(q_base, "q_base")
    lam = finite_number(lam, "lam", low=0.0)
    s = scores.detach().to(torch.float32)
    n = s.numel()
    others = (s.expand(n, n) * ~torch.eye(n, dtype=torch.bool, device=s.device)).sum(dim=1)
    rho = s / others
    q = (q_base * (1.0 + lam * torch.tanh(torch.relu(rho - 1.0)))).clamp(0.0, 1.0)
    return torch.where(rho > 1.0, q, torch.zeros_like(q))


def _check_features(features: object) -> list[torch.Tensor]:
    """The per-modality features as a list of [B, ...] tensors sharing batch, dtype and device."""
    if isinstance(features, torch.Tensor) or not isinstance(features, Sequence) or not features:
        raise TypeError("features must be a non-empty sequence of tensors [B, ...], one per "
                        "modality")
    features = list(features)
    for m, f in enumerate(features):
        check_float_tensor(f, f"features[{m}]")
        if f.dim() < 1:
            raise ValueError(f"features[{m}] must be [B, ...] with a batch dimension, got a scalar")
        first = features[0]
        if f.shape[0] != first.shape[0]:
            raise ValueError(f"features[{m}] has batch size {f.shape[0]} but features[0] has "
                             f"{first.shape[0]}")
        if f.device != first.device or f.dtype != first.dtype:
            raise ValueError(f"features[{m}] is {f.dtype} on {f.device} but features[0] is "
                             f"{first.dtype} on {first.device}: all modalities must share both")
    return features


def _check_q(q: object, n_mod: int, device: torch.device) -> torch.Tensor:
    """q as a detached float32 [M] tensor on `device`; its range is checked without a host sync."""
    if isinstance(q, torch.Tensor):
        if not q.dtype.is_floating_point:
            raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
        if q.shape != (n_mod,):
            raise ValueError(f"q must have shape [{n_mod}] (one drop probability per modality), "
                             f"got {tuple(q.shape)}")
        if q.device != device:
            raise ValueError(f"q is on {q.device} but features on {device}")
        q = q.detach().to(torch.float32).contiguous()
        check_unit_range(q, "q")
        return q
    if isinstance(q, (str, bytes)) or not isinstance(q, Sequence):
        raise TypeError(f"q must be a tensor or a sequence of floats, got {type(q).__name__}")
    if len(q) != n_mod:
        raise ValueError(f"q must have {n_mod} entries (one per modality), got {len(q)}")
    q = [probability(value, f"q[{m}]") for m, value in enumerate(q)]
    return torch.tensor(q, dtype=torch.float32, device=device)


def opm_drop(features: Sequence[torch.Tensor], q: torch.Tensor | Sequence[float], *,
             p_exe: float = 1.0, seed: rng.Seed | None = None,
             mask_seed: rng.Seed | None = None,
             backend: str = "auto") -> tuple[list[torch.Tensor], torch.Tensor]:
    """OPM's modality drop: (modulated features, per-sample loss weights [B] float32).

    `features` holds one tensor [B, ...] per modality (same batch, dtype and device; d_m is the
    product of the trailing sizes), `q` the per-modality drop probabilities [M] in [0, 1] (a
    device tensor, typically from `opm_drop_probs`; detached here), `p_exe` the probability that
    the drop runs at all this call. With probability p_exe every row i of modality m is kept with
    probability 1 - q_m, and every kept feature is scaled by 1 / (1 - theta),
    theta = sum_m d_m q_m / sum_m d_m (docs/methods.md#opm). Autograd-aware: gradients see the
    same mask and scale; no gradient flows into q. Use the weights as
    `loss = (F.cross_entropy(logits, y, reduction="none") * weights).sum()`: the mean loss over
    the rows that kept a modality (the reference compacts the batch instead), the plain mean when
    nothing is dropped, and 0 when everything is. The same `seed` gives the same result on every
    backend (masks bit-identical); None draws one from torch's generator. `mask_seed` (default:
    `seed`) keys the masks alone: under DDP every rank passes the same `seed` (one coin for the
    global batch) and its own `mask_seed` (independent masks per rank). No host sync.
    """
    features = _check_features(features)
    device = features[0].device
    q = _check_q(q, len(features), device)
    threshold = 1.0 - probability(p_exe, "p_exe")
    seed = rng.seed_tensor(seed, device)
    mask_seed = seed if mask_seed is None else rng.seed_tensor(mask_seed, device, "mask_seed")
    outputs, weights, _ = row_drop(features, q, threshold=threshold, seed=seed,
                                   mask_seed=mask_seed, coin_stream=rng.STREAM_COIN,
                                   mask_stream=rng.STREAM_MASK, backend=backend)
    return outputs, weights


Tensors = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


class OPM(MethodScaffold, nn.Module):
    """Drop-in OPM for a training loop: modulate the pooled features before the fusion head.

        opm = fastbml.OPM(["audio", "visual"], q_base=0.5, lam=0.5, p_exe=0.7)
        feats, w = opm({"audio": f_a, "visual": f_v}, {"audio": u_a, "visual": u_v}, y, epoch)
        logits = head(torch.cat([feats["audio"], feats["visual"]], dim=1))
        loss = (F.cross_entropy(logits, y, reduction="none") * w).sum()
        loss.backward()
        ogm.step(...)            # optional: OGM composes, after backward, as in the T-PAMI code
        optimizer.step()

    Each training call scores the modalities on the batch with the uni-modal logits (docs/methods.md#scores;
    derive them from the head with fastbml.concat_unimodal_logits / sum_unimodal_logits), turns
    the scores into drop probabilities (`opm_drop_probs`) and applies `opm_drop` with probability
    `p_exe`. Features and logits are mappings keyed by modality name or sequences in the order of
    `modalities`; the features come back in the same form. The weights `w` [B] (float32) always
    make `(per_sample_loss * w).sum()` the right loss: the mean over the kept rows while OPM acts,
    the plain batch mean (w = 1/B) otherwise.

    OPM acts for start <= epoch <= end (inclusive; `end=None` is open), epoch >= warmup_epochs
    (the T-PAMI code hard-codes 6 warm-up epochs: pass warmup_epochs=6 to reproduce it) and only
    in training mode: `opm.eval()` (or `model.eval()` when the OPM is a submodule of the model)
    makes it the identity (no drop and no rescale, as the reference evaluates). Training call t
    draws from rng.step_seed(seed, t), so a resumed run (state_dict) continues the same stream.
    Under DDP (`process_group="auto"` with torch.distributed initialised, or an explicit group)
    the scores are summed over the ranks every training call, so every rank uses the q and theta
    of the global batch; all ranks share the coin (rank 0's seed is shared when none is given, and
    construction checks that the ranks agree on the configuration and seed), while each rank
    draws its own per-sample masks (mask seed: rng.step_seed(step seed, rank)). The call count
    is a device buffer, so a model whose forward calls OPM compiles with
    `torch.compile(fullgraph=True)` into one graph for every step. Each rank's
    weights normalise over its own kept rows; with M = 2 no row is ever removed, so DDP's gradient
    average equals the reference's global mean. `last_scores`, `last_q`, `last_theta` and
    `last_executed` give the latest training call's values as device tensors (no sync); q is
    zeros outside the window. State (seed, step count) travels in `state_dict()` as extra state.
    """

    def __init__(self, modalities: Sequence[str], *, q_base: float = 0.5, lam: float = 0.5,
                 p_exe: float = 0.7, start: int = 0, end: int | None = None,
                 warmup_epochs: int = 0, seed: int | None = None, backend: str = "auto",
                 process_group: object = distributed.GROUP_AUTO):
        super().__init__()
        if isinstance(modalities, (str, bytes)) or not isinstance(modalities, Sequence):
            raise TypeError("modalities must be a sequence of modality names")
        self.q_base = probability(q_base, "q_base")
        self.lam = finite_number(lam, "lam", low=0.0)
        self.p_exe = probability(p_exe, "p_exe")
        self._setup(modalities, start=start, end=end, warmup_epochs=warmup_epochs, seed=seed,
                    backend=backend, process_group=process_group)
        # The call counter lives on the device (moved with the module): a compiled forward
        # reads and increments it there, so the graph is not specialised on the step number.
        self.register_buffer("_step", torch.zeros((), dtype=torch.int64), persistent=False)
        self.last_scores: torch.Tensor | None = None
        self.last_q: torch.Tensor | None = None
        self._last_dims: list[int] = []
        self.last_executed: torch.Tensor | None = None  # the coin (device bool)
        self._check_ranks()

    def active(self, epoch: int) -> bool:
        """Whether features are modulated in `epoch` (0-based) while training."""
        return self.training and self.in_window(epoch)

    def forward(self, features: Tensors, logits: Tensors, labels: torch.Tensor,
                epoch: int) -> tuple[Tensors, torch.Tensor]:
        """(modulated features, loss weights [B]); see the class docstring."""
        ordered = _check_features(self._ordered(features, "features"))
        batch, device = ordered[0].shape[0], ordered[0].device
        if not self.training:
            return features, torch.full((batch,), 1.0 / max(batch, 1), device=device)
        self._check_ranks()
        scores = modality_scores(self._ordered(logits, "logits"), labels, backend=self.backend)
        distributed.all_reduce_sum_(scores, self.group)
        if self._step.device != scores.device:  # features on a device the module is not on
            self._step = self._step.to(scores.device)
        seed = rng.step_seed_tensor(self.seed, self._step)
        mask_seed = seed if self.group is None else rng.step_seed_tensor(seed, self._rank)
        self._step.add_(1)
        self.last_scores = scores
        self._last_dims = [math.prod(f.shape[1:]) for f in ordered]
        if not self.active(epoch):
            self.last_q = torch.zeros_like(scores)
            self.last_executed = torch.zeros((), dtype=torch.bool, device=device)
            return features, torch.full((batch,), 1.0 / max(batch, 1), device=device)
        q = opm_drop_probs(scores, self.q_base, self.lam)
        if q.device != ordered[0].device:
            raise ValueError(f"the logits are on {q.device} but the features on "
                             f"{ordered[0].device}")
        out, weights, self.last_executed = row_drop(
            ordered, q, threshold=1.0 - self.p_exe, seed=seed, mask_seed=mask_seed,
            coin_stream=rng.STREAM_COIN, mask_stream=rng.STREAM_MASK, backend=self.backend)
        self.last_q = q
        if isinstance(features, Mapping):
            return dict(zip(self.modalities, out)), weights
        return out, weights

    @property
    def last_theta(self) -> torch.Tensor | None:
        """theta = sum_m d_m q_m / sum_m d_m of the latest training call (device scalar)."""
        if self.last_q is None:
            return None
        d = torch.tensor(self._last_dims, dtype=torch.float32, device=self.last_q.device)
        return (self.last_q * d).sum() / max(sum(self._last_dims), 1)

    def _config(self) -> dict:
        return {"modalities": self.modalities, "seed": self.seed, "steps": self.steps,
                "q_base": self.q_base, "lam": self.lam, "p_exe": self.p_exe,
                "window": [self.start, self.end, self.warmup_epochs]}

    def get_extra_state(self) -> dict:
        return self._counters()

    def set_extra_state(self, state: Mapping) -> None:
        self._load_counters(state)

    def extra_repr(self) -> str:
        return (f"modalities={self.modalities}, q_base={self.q_base}, lam={self.lam}, "
                f"p_exe={self.p_exe}, start={self.start}, end={self.end}, "
                f"warmup_epochs={self.warmup_epochs}")
