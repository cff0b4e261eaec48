"""AGM: adaptive gradient modulation from Shapley mono-modal responses (docs/methods.md#agm).

The fused output is split into per-modality responses by Shapley values over the modality
subsets (an absent modality is zero-filled, f(empty) := 0). Each response is scored by its
clamped cross-entropy; a modality whose strength exceeds its running level is slowed down
(k_m < 1), one that falls behind is sped up (k_m > 1), by scaling its encoder's gradients.

The subset outputs come from cached encoder outputs: one eval-mode pass per encoder (and one
on a single zero sample), then the fusion head over every subset in one batched call, instead
of a full model forward per subset; for late fusion this is exact. Scores, coefficients and
the running scores stay on the device: no host sync per step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from fractions import Fraction

import torch
from torch import nn

from . import distributed
from ._checks import check_float_tensor, check_labels, finite_number
from ._grad_groups import check_params, flatten, grads_of, modulate_
from ._method import MethodScaffold
from .ops.combined_nll import combined_nll

MAX_MODALITIES = 8            # 2^M - 1 subsets: 255 head evaluations per sample at M = 8
PROB_FLOOR = 1e-8             # the authors' score replaces -log p by -log 1e-8 below this p
MAX_NLL = -math.log(PROB_FLOOR)

Head = Callable[[dict[str, torch.Tensor]], torch.Tensor]

_WEIGHTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def subset_masks(n_modalities: int) -> torch.Tensor:
    """bool [2^M - 1, M]: row j is the subset with bitmask j + 1 (bit m: modality m present);
    the last row is the full set."""
    _check_count(n_modalities)
    codes = torch.arange(1, 2 ** n_modalities)
    return (codes[:, None] >> torch.arange(n_modalities)) & 1 == 1


def shapley_weights(n_modalities: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [M, 2^M - 1]: phi_m = sum_j W[m, j] f(S_j) is modality m's Shapley value over the
    subsets S_j of `subset_masks` with f(empty) := 0.

    phi_m = sum_{S not containing m} |S|! (M - |S| - 1)! / M! (f(S + m) - f(S)), every S
    included (also S = empty, which contributes the single-modality term f({m}) / M).
    """
    _check_count(n_modalities)
    key = (n_modalities, torch.device(device))
    if key not in _WEIGHTS:
        m_count = n_modalities
        table = [[Fraction(0)] * (2 ** m_count - 1) for _ in range(m_count)]
        for m in range(m_count):
            for subset in range(2 ** m_count):
                if subset >> m & 1:
                    continue
                size = bin(subset).count("1")
                w = Fraction(math.factorial(size) * math.factorial(m_count - size - 1),
                             math.factorial(m_count))
                table[m][(subset | 1 << m) - 1] += w
                if subset:  # f(empty) := 0
                    table[m][subset - 1] -= w
        _WEIGHTS[key] = torch.tensor([[float(w) for w in row] for row in table],
                                     dtype=torch.float32, device=key[1])
    return _WEIGHTS[key]


def _check_count(n_modalities: object) -> None:
    if (isinstance(n_modalities, bool) or not isinstance(n_modalities, int)
            or not 2 <= n_modalities <= MAX_MODALITIES):
        raise ValueError(f"AGM needs 2 to {MAX_MODALITIES} modalities, got {n_modalities!r}")


def _check_subset_logits(subset_logits: object, n_modalities: int) -> torch.Tensor:
    check_float_tensor(subset_logits, "subset_logits")
    expected = 2 ** n_modalities - 1
    if subset_logits.dim() != 3 or subset_logits.shape[0] != expected:
        raise ValueError(f"subset_logits must be [2^M - 1 = {expected}, B, C] for M = "
                         f"{n_modalities}, got shape {tuple(subset_logits.shape)}")
    if subset_logits.shape[2] == 0:
        raise ValueError("subset_logits have 0 classes")
    return subset_logits.detach()


def agm_score_sums(subset_logits: torch.Tensor, labels: torch.Tensor, n_modalities: int, *,
                   backend: str = "auto") -> torch.Tensor:
    """float32 [M]: sum over the batch of min(-log softmax(phi_m,i)[y_i], -log 1e-8), phi_m the
    Shapley response of modality m built from `subset_logits` [2^M - 1, B, C] (rows ordered as
    `subset_masks`). Divide by the batch size for the authors' score (a mean)."""
    _check_count(n_modalities)
    logits = _check_subset_logits(subset_logits, n_modalities)
    labels = check_labels(labels, logits.shape[1], logits.device)
    return combined_nll(logits, shapley_weights(n_modalities, logits.device), labels, MAX_NLL,
                        backend=backend)


def agm_coefficients(scores: torch.Tensor, running: torch.Tensor, alpha: float,
                     cap: float) -> torch.Tensor:
    """k [M] (float32) from this step's scores s [M] and the running scores t [M] (losses:
    lower is stronger).

    r_m = exp(M / (M - 1) (mean(s) - s_m)) is the current strength, r^_m the same from t, and
    k_m = exp(alpha min(r^_m - r_m, cap)): a modality stronger than its running level gets
    k < 1 (slowed), a weaker one k > 1. For M = 2, r_a = exp(s_v - s_a).
    """
    for name, value in (("scores", scores), ("running", running)):
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() < 2:
            raise ValueError(f"{name} must be a vector of M >= 2 values")
    if running.shape != scores.shape:
        raise ValueError(f"running has shape {tuple(running.shape)} but scores "
                         f"{tuple(scores.shape)}")
    alpha = finite_number(alpha, "alpha", low=0.0)
    cap = finite_number(cap, "cap")
    s, t = scores.detach().to(torch.float32), running.detach().to(torch.float32)
    factor = s.numel() / (s.numel() - 1)
    strength = torch.exp(factor * (s.mean() - s))
    target = torch.exp(factor * (t.mean() - t))
    return torch.exp(alpha * (target - strength).clamp(max=cap))


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Every submodule in eval mode inside the block; each one's own flag restored after."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class AGM(MethodScaffold):
    """Drop-in AGM for a training loop (docs/methods.md#agm).

        agm = fastbml.AGM({"audio": model.audio_net, "visual": model.visual_net}, model.head)
        loss.backward()                      # loss on out = the fused logits of this forward
        agm.step({"audio": x_a, "visual": x_v}, out, labels, epoch=epoch)
        optimizer.step()

    `encoders` maps each modality to its encoder module; its parameters' gradients are scaled
    by k_m (all of them, as the authors' response hooks do; `weights_only=True` keeps only
    weights with ndim >= 2, BalanceBenchmark's rule). `head` is called with {modality: [N, d_m]}
    features and returns fused logits [N, C]. `step` runs every encoder once in eval mode on
    its inputs and once on a single zero sample (no gradient), the head over the 2^M - 2 proper
    subsets in one call, and takes the full set's output from the training forward (`logits`),
    as the authors do. Modulation runs for start <= epoch <= end (inclusive, `end=None` open);
    outside it `step` does nothing and returns ones. `cap` bounds r^ - r (default: 10 for two
    modalities, 7 otherwise, the authors' constants).

    The running scores t (the mean of every active step's scores) are checkpointed by
    `state_dict`. Under DDP (`process_group="auto"` with torch.distributed initialised, or an
    explicit group) the score sums and the batch size are summed over the ranks with one
    all_reduce per step, so every rank computes the same k and t. With gradient accumulation
    call `step` once per optimizer step, after the last backward. `update` (the part after the
    eval passes) compiles with `torch.compile(fullgraph=True)`. `last_scores`, `last_coeffs`
    (device tensors, no sync) hold the latest step's values.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], head: Head, *, alpha: float = 1.0,
                 cap: float | None = None, start: int = 0, end: int | None = None,
                 weights_only: bool = False, backend: str = "auto",
                 process_group: object = distributed.GROUP_AUTO):
        if not isinstance(encoders, Mapping) or len(encoders) < 2:
            raise ValueError("encoders must map at least two modality names to modules")
        _check_count(len(encoders))
        for name, enc in encoders.items():
            if not isinstance(enc, nn.Module):
                raise TypeError(f"encoders[{name!r}] must be an nn.Module, got "
                                f"{type(enc).__name__}")
        if not callable(head):
            raise TypeError(f"head must be callable (features dict -> logits), got "
                            f"{type(head).__name__}")
        self.alpha = finite_number(alpha, "alpha", low=0.0)
        cap = (10.0 if len(encoders) == 2 else 7.0) if cap is None else cap
        self.cap = finite_number(cap, "cap")
        self._setup(list(encoders), start=start, end=end, warmup_epochs=0, seed=0,
                    backend=backend, process_group=process_group)
        self.encoders = [encoders[m] for m in self.modalities]
        self.head = head
        wanted = (lambda p: p.dim() >= 2) if weights_only else (lambda p: True)
        self.params = [[p for p in enc.parameters() if p.requires_grad and wanted(p)]
                       for enc in self.encoders]
        check_params(self.params)
        self._flat, self._scale_index = flatten(self.params)
        self.weights_only = weights_only
        device = self._flat[0].device if self._flat else torch.device("cpu")
        # n (the running mean's count) and t live on the device: no step number reaches the host
        self._step = torch.zeros((), dtype=torch.int64, device=device)
        self.running = torch.zeros(len(self.modalities), dtype=torch.float32, device=device)
        self._masks = subset_masks(len(self.modalities))[:-1].to(device)  # the proper subsets
        self._no_seed = torch.zeros((), dtype=torch.int64, device=device)  # the scale draws nothing
        self.last_scores: torch.Tensor | None = None
        self.last_coeffs: torch.Tensor | None = None
        self._check_ranks()

    def active(self, epoch: int) -> bool:
        """Whether gradients are modulated in `epoch` (0-based)."""
        return self.in_window(epoch)

    @torch.no_grad()
    def subset_logits(self, inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                      logits: torch.Tensor) -> torch.Tensor:
        """[2^M - 1, B, C] fused logits of every non-empty modality subset (rows as
        `subset_masks`): absent modalities zero-filled, encoders and head in eval mode; the
        full set is `logits` (the training forward's output), detached."""
        xs = self._ordered(inputs, "inputs")
        check_float_tensor(logits, "logits")
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
        batch = logits.shape[0]
        for m, x in zip(self.modalities, xs):
            if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != batch:
                raise ValueError(f"inputs[{m!r}] must be a tensor with the batch ({batch}) "
                                 "first")
        if self._masks.device != logits.device:
            self._masks = self._masks.to(logits.device)
        masks = self._masks
        modules = self.encoders + ([self.head] if isinstance(self.head, nn.Module) else [])
        with _eval_mode(modules):
            mixed = {}
            for j, (m, enc, x) in enumerate(zip(self.modalities, self.encoders, xs)):
                both = enc(torch.cat([x, x.new_zeros((1, *x.shape[1:]))]))  # [B + 1, d]: x, then 0
                present, absent = both[:batch], both[batch:]
                rows = torch.where(masks[:, j, None, None], present[None], absent[None])
                mixed[m] = rows.reshape(-1, *present.shape[1:])
            out = self.head(mixed)
        out = out.reshape(masks.shape[0], batch, out.shape[-1])
        return torch.cat([out, logits.detach()[None].to(out.dtype)])

    def step(self, inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
             logits: torch.Tensor, labels: torch.Tensor, epoch: int) -> torch.Tensor:
        """Score the modalities on this batch and modulate the gradients; returns k [M]."""
        if not self.active(epoch):
            self.last_coeffs = torch.ones_like(self.running)
            return self.last_coeffs
        return self.update(self.subset_logits(inputs, logits), labels)

    def update(self, subset_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """From the subset outputs: scores, k, the running scores, and k_m applied to encoder
        m's gradients; returns k [M]."""
        self._check_ranks()
        sums = agm_score_sums(subset_logits, labels, len(self.modalities), backend=self.backend)
        if self.running.device != sums.device:  # the model moved after construction
            self.running, self._step = self.running.to(sums.device), self._step.to(sums.device)
            self._no_seed = self._no_seed.to(sums.device)
        count = torch.full((1,), subset_logits.shape[1], dtype=torch.float32, device=sums.device)
        totals = distributed.all_reduce_sum_(torch.cat([sums, count]), self.group)
        scores = totals[:-1] / totals[-1:].clamp(min=1.0)
        coeffs = agm_coefficients(scores, self.running, self.alpha, self.cap)
        n = (self._step + 1).to(torch.float32)
        self.running.copy_(self.running * (n - 1) / n + scores / n)
        self._step.add_(1)
        grads, scale_index = grads_of(self.params, self._flat, self._scale_index, coeffs.device)
        # DTensor gradients (FSDP2) are scaled through their local shards
        modulate_(self.params, self._flat, grads, scale_index, coeffs, noise=False,
                   seed=self._no_seed, backend=self.backend)
        self.last_scores, self.last_coeffs = scores, coeffs
        return coeffs

    def _config(self) -> dict:
        return {"modalities": self.modalities, "alpha": self.alpha, "cap": self.cap,
                "weights_only": self.weights_only,
                "shapes": [[list(p.shape) for p in group] for group in self.params]}

    def state_dict(self) -> dict:
        """The running scores t and their count n (the steps inside the window so far)."""
        return {"steps": self.steps, "running_scores": self.running.detach().cpu().clone()}

    def load_state_dict(self, state: Mapping) -> None:
        running = torch.as_tensor(state["running_scores"], dtype=torch.float32)
        if running.shape != self.running.shape:
            raise ValueError(f"running_scores has shape {tuple(running.shape)}, expected "
                             f"{tuple(self.running.shape)} (one per modality)")
        self.running.copy_(running)
        self._step.fill_(int(state["steps"]))
        self._checked = self.group is None
