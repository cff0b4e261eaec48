"""MMPareto: multitask learning with innocent uni-modal assistance (docs/methods.md#mmpareto).

Each encoder m is trained by two losses, the multimodal loss and its own uni-modal loss. Their
gradients on the encoder, g_mm and g_uni, are measured separately; where they conflict (cosine
<= 0 over the encoder's parameters) the encoder gets their minimum-norm convex combination (a
Pareto-stationary direction) instead of their sum, each tensor's combination is never shorter
than its plain sum, and the result is enlarged by gamma. The step takes two backward passes for
any number of modalities and no host sync: the branch is selected on the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from . import distributed
from ._checks import FLOAT_DTYPES, check_disjoint, check_plain, finite_number
from ._grad_groups import check_params, flatten, grouped, reject_grad, usable_grad
from ._method import MethodScaffold
from .ops.axpby import multi_tensor_axpby_
from .ops.split_gram import multi_tensor_split_gram

# The authors' min-norm solver clamps the weight of the multimodal gradient to [0.001, 0.999].
WEIGHT_CLAMP = (0.001, 0.999)


def mmpareto_weights(gram: torch.Tensor) -> torch.Tensor:
    """Per-modality weights (w_mm, w_uni) [M, 2] of the two gradients, from their Gram entries
    gram [M, 3] = (||g_mm||^2, <g_mm, g_uni>, ||g_uni||^2) over each encoder.

    Agreeing gradients (<g_mm, g_uni> > 0) get (1/2, 1/2). Conflicting ones get the two-task
    minimum-norm solution w_mm = (c - p) / (a + c - 2 p), or 0.999 when p >= a and 0.001 when
    p >= c (the authors' solver, in that order). Selected on the device with torch.where.
    """
    if not isinstance(gram, torch.Tensor) or gram.dim() != 2 or gram.shape[1] != 3:
        raise ValueError(f"gram must be an [M, 3] tensor, got {getattr(gram, 'shape', gram)!r}")
    if not gram.dtype.is_floating_point:
        raise TypeError(f"gram must be floating point, got {gram.dtype}")
    a, p, c = gram.unbind(1)
    low, high = WEIGHT_CLAMP
    interior = (c - p) / (a + c - 2 * p)  # where it is selected, p <= 0 < a + c
    w_mm = torch.where(p >= a, high, torch.where(p >= c, low, interior))
    w_mm = torch.where(p > 0, 0.5, w_mm)
    return torch.stack([w_mm, 1 - w_mm], dim=1)


def _gram_cosine(gram: torch.Tensor) -> torch.Tensor:
    a, p, c = gram.unbind(1)
    norms = (a * c).sqrt()
    return torch.where(norms > 0, p / norms, 0.0)


def _combine_(totals: list[torch.Tensor], parts: list[torch.Tensor], counts: list[int],
              gamma: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewrite on validated, flat lists ordered by modality (counts[m] tensors each)."""
    stats = multi_tensor_split_gram(totals, parts, backend=backend)  # [n, 4] float64
    gram = torch.stack([rows.sum(0) for rows in stats[:, :3].split(counts)])  # [M, 3]
    weights = mmpareto_weights(gram)
    w = torch.cat([weights[m].expand(n, 2) for m, n in enumerate(counts)])
    w_mm, w_uni = w.unbind(1)
    a, p, c, total_sq = stats.unbind(1)
    # ||2 (w_mm g_mm + w_uni g_uni)||^2 per tensor, from its Gram entries
    new_sq = (4 * (w_mm * w_mm * a + 2 * w_mm * w_uni * p + w_uni * w_uni * c)).clamp_min(0)
    restore = torch.where(new_sq > 0, (total_sq / new_sq).sqrt().clamp_min(1), 1.0)
    # grad = gamma * restore * 2 (w_mm (total - part) + w_uni part)
    scale = 2 * gamma * restore
    coeffs = torch.stack([scale * w_mm, scale * (w_uni - w_mm)], dim=1)
    multi_tensor_axpby_(totals, parts, coeffs, backend=backend)
    return _gram_cosine(gram).float(), weights.float()


def _check_pairs(totals: list[list[torch.Tensor]],
                 parts: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """`parts` if it pairs every gradient with a plain dense tensor of its shape and dtype."""
    if len(parts) != len(totals):
        raise ValueError(f"unimodal_grads has {len(parts)} groups for {len(totals)} modalities")
    for m, (tg, pg) in enumerate(zip(totals, parts)):
        if len(tg) != len(pg):
            raise ValueError(f"unimodal_grads[{m}] has {len(pg)} tensors for {len(tg)} grads")
        for j, (t, b) in enumerate(zip(tg, pg)):
            for name, x in ((f"grads[{m}][{j}]", t), (f"unimodal_grads[{m}][{j}]", b)):
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
                check_plain(x, name)
                if x.dtype not in FLOAT_DTYPES:
                    raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
                if x.layout != torch.strided:
                    raise TypeError(f"{name} is sparse; MMPareto needs dense gradients")
            if b.shape != t.shape or b.dtype != t.dtype or b.device != t.device:
                raise ValueError(f"unimodal_grads[{m}][{j}] ({tuple(b.shape)}, {b.dtype}, "
                                 f"{b.device}) does not match grads[{m}][{j}] "
                                 f"({tuple(t.shape)}, {t.dtype}, {t.device})")
    return parts


def mmpareto_combine_(grads, unimodal_grads, *, gamma: float = 1.5,
                      modality_index: Sequence[int] | None = None,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """In place on `grads`: MMPareto's encoder gradients from the per-loss gradients.

    `grads` is one list of gradient tensors per modality (or a flat list with
    `modality_index`), each holding g_mm + g_uni, the gradient of the multimodal loss plus the
    modality's uni-modal loss; `unimodal_grads` the matching g_uni. Per modality m the Gram
    entries over all of its tensors give the weights (`mmpareto_weights`); then every tensor
    becomes gamma * max(1, ||g_mm + g_uni|| / ||new||) * new with
    new = 2 (w_mm g_mm + w_uni g_uni) (a tensor whose new is 0 becomes 0). Returns the cosine of
    (g_mm, g_uni) per modality [M] and the weights [M, 2], float32 device tensors. No host sync.
    """
    groups = grouped(grads, modality_index, "grads")
    parts = _check_pairs(groups, grouped(unimodal_grads, modality_index, "unimodal_grads"))
    gamma = finite_number(gamma, "gamma", low=0.0)
    totals, flat_parts = flatten(groups)[0], flatten(parts)[0]
    if not totals:
        raise ValueError("grads must hold at least one tensor")
    device = totals[0].device
    for i, t in enumerate(totals):
        if t.device != device:
            raise ValueError(f"all gradients must be on one device; tensor {i} is on {t.device}, "
                             f"tensor 0 on {device}")

    def name(kind: str):
        where = [(m, j) for m, group in enumerate(groups) for j in range(len(group))]
        return lambda i: f"{kind}[{where[i][0]}][{where[i][1]}]"
    check_disjoint(totals, name("grads"), flat_parts, name("unimodal_grads"))
    return _combine_(totals, flat_parts, [len(g) for g in groups], gamma, backend)


GroupSpec = nn.Module | Iterable[torch.Tensor]


class MMPareto(MethodScaffold):
    """Drop-in MMPareto for a training loop: replaces `loss.backward()`.

        mmpareto = fastbml.MMPareto({"audio": model.audio_net, "visual": model.visual_net})
        mmpareto.backward(F.cross_entropy(z, y), {"audio": F.cross_entropy(u_a, y),
                                                  "visual": F.cross_entropy(u_v, y)})
        optimizer.step()

    `groups` maps each modality to its encoder (all of its trainable parameters, as the
    authors' code) or to an explicit parameter list. The uni-modal loss of modality m must
    depend on no other encoder (for instance a linear head on encoder m's pooled feature).

    `backward` runs two backward passes whatever the number of modalities: the sum of the
    uni-modal losses through `torch.autograd.grad` (each encoder's g_uni), then the total loss
    into `.grad` (g_mm + g_uni on the encoders; every other parameter, heads included, keeps
    this gradient of the total loss, as in the authors' code). The encoder gradients are then
    rewritten by `mmpareto_combine_` with no host sync. Gradients already in `.grad` are kept
    and added to (gradient accumulation: each micro-batch is combined on its own).

    Outside the epoch window (start <= epoch <= end, epoch >= warmup_epochs) `backward` is one
    plain backward of the total loss. With AMP pass `scaler=`: the losses are scaled, the
    combination is taken on the scaled gradients (it is invariant to a common scale) and
    `scaler.step(optimizer)` unscales them as usual; non-finite gradients stay non-finite.

    Under DDP (`process_group="auto"` with torch.distributed initialised) the total loss's
    backward is all-reduced by DDP (its averages are assumed); the uni-modal gradients, taken
    with `autograd.grad`, are invisible to DDP, and `backward` averages them over the group
    itself (one all_reduce per dtype). Every rank then holds the gradients of the global batch
    and applies the same combination. `last_cos` [M] and `last_weights` [M, 2] (device
    tensors) hold the latest step's cosines and (w_mm, w_uni).
    """

    def __init__(self, groups: Mapping[str, GroupSpec], *, gamma: float = 1.5, start: int = 0,
                 end: int | None = None, warmup_epochs: int = 0, backend: str = "auto",
                 process_group: object = distributed.GROUP_AUTO):
        if not isinstance(groups, Mapping) or len(groups) < 2:
            raise ValueError("groups must map at least two modality names to modules or "
                             "parameter lists")
        self.gamma = finite_number(gamma, "gamma", low=0.0)
        # no randomness: the scaffold's seed is fixed
        self._setup(list(groups), start=start, end=end, warmup_epochs=warmup_epochs, seed=0,
                    backend=backend, process_group=process_group)
        self.params = [self._select(name, spec) for name, spec in groups.items()]
        check_params(self.params)
        for name, group in zip(self.modalities, self.params):
            if not group:
                raise ValueError(f"groups[{name!r}] has no trainable parameters")
        self._flat, _ = flatten(self.params)
        self._where = [(m, j) for m, group in enumerate(self.params) for j in range(len(group))]
        self._step = torch.zeros((), dtype=torch.int64, device=self._flat[0].device)
        self.last_cos: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self._check_ranks()

    @staticmethod
    def _select(name: str, spec: GroupSpec) -> list[torch.Tensor]:
        if isinstance(spec, nn.Module):
            return [p for p in spec.parameters() if p.requires_grad]
        if isinstance(spec, torch.Tensor) or not isinstance(spec, Iterable):
            raise TypeError(f"groups[{name!r}] must be an nn.Module or a list of parameters, got "
                            f"{type(spec).__name__}")
        params = list(spec)
        for j, p in enumerate(params):
            if isinstance(p, torch.Tensor) and not p.requires_grad:
                raise ValueError(f"groups[{name!r}][{j}] does not require grad")
        return params

    def active(self, epoch: int) -> bool:
        """Whether the gradients are combined in `epoch` (0-based)."""
        return self.in_window(epoch)

    def _losses(self, multimodal_loss, unimodal_losses) -> tuple[torch.Tensor, torch.Tensor]:
        losses = [("multimodal_loss", multimodal_loss)]
        losses += [(f"unimodal_losses[{m!r}]", loss) for m, loss in
                   zip(self.modalities, self._ordered(unimodal_losses, "unimodal_losses"))]
        for name, loss in losses:
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"{name} must be a scalar tensor, got "
                                 f"{getattr(loss, 'shape', type(loss).__name__)}")
            if not loss.requires_grad:
                raise ValueError(f"{name} does not require grad (computed under no_grad, or "
                                 "from detached tensors?)")
        unimodal = losses[1][1]
        for _, loss in losses[2:]:
            unimodal = unimodal + loss
        return multimodal_loss, unimodal

    def backward(self, multimodal_loss: torch.Tensor,
                 unimodal_losses: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                 epoch: int = 0, *, scaler: torch.amp.GradScaler | None = None) -> None:
        """Backpropagate multimodal_loss + sum_m unimodal_losses[m] and combine each encoder's
        gradients (two backward passes, no host sync)."""
        self._check_ranks()
        multimodal, unimodal = self._losses(multimodal_loss, unimodal_losses)
        total = multimodal + unimodal
        if scaler is not None:
            total, unimodal = scaler.scale(total), scaler.scale(unimodal)
        if self._step.device != multimodal.device:  # the model moved after construction
            self._step = self._step.to(multimodal.device)
        self._step.add_(1)
        if not self.active(epoch):
            total.backward()
            return
        previous = [p.grad for p in self._flat]  # accumulated by earlier micro-batches
        for p in self._flat:
            p.grad = None
        parts = list(torch.autograd.grad(unimodal, self._flat, retain_graph=True,
                                         allow_unused=True, materialize_grads=True))
        total.backward()
        distributed.all_reduce_mean_(parts, self.group)  # invisible to DDP
        totals, pairs, counts = [], [], [0] * len(self.params)
        for p, part, (m, j) in zip(self._flat, parts, self._where):
            if p.grad is not None:  # a parameter the total loss does not reach is left alone
                if not usable_grad(p.grad, multimodal.device, sharded=False):
                    reject_grad(p.grad, f"groups[{self.modalities[m]!r}][{j}].grad",
                                multimodal.device, against="the losses", sharded=False)
                totals.append(p.grad)
                pairs.append(part)
                counts[m] += 1
        if totals:
            self.last_cos, self.last_weights = _combine_(totals, pairs, counts, self.gamma,
                                                         self.backend)
        now, before = [], []
        for p, g in zip(self._flat, previous):
            if g is not None and p.grad is None:
                p.grad = g
            elif g is not None:
                now.append(p.grad)
                before.append(g)
        if now:
            torch._foreach_add_(now, before)

    def _config(self) -> dict:
        return {"modalities": self.modalities, "gamma": self.gamma, "steps": self.steps,
                "start": self.start, "end": self.end, "warmup_epochs": self.warmup_epochs,
                "shapes": [[list(p.shape) for p in group] for group in self.params]}

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: Mapping) -> None:
        self._step.fill_(int(state["steps"]))
        self._checked = self.group is None
