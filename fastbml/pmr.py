"""PMR: prototypical modal rebalance (CVPR 2023; docs/methods.md#pmr).

Each modality keeps class prototypes, the per-class means of its features over a subset of the
training data. A softmax over the negative distances to them scores, without any classifier,
how well each modality separates the classes; every modality whose score falls behind another's
gets the prototypical cross-entropy as an extra loss, which speeds up its encoder alone. The
distances, softmax and cross-entropy are one fused op with its backward; the choice of
modalities is device arithmetic: no host sync per step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from . import distributed
from ._checks import (
    check_float_tensor,
    check_labels,
    check_on_device,
    check_scores,
    finite_number,
    integer,
    probability,
)
from ._method import MethodScaffold
from .ops.prototype_cross_entropy import prototype_cross_entropy
from .scores import strongest_other


def pmr_loss_weights(scores: torch.Tensor) -> torch.Tensor:
    """Which modalities get the prototypical loss: w [M] (float32, 0 or 1) from the prototype
    scores s [M]. w_m = 1 iff rho_m = s_m / max_{j != m} s_j < 1, i.e. another modality scores
    strictly higher (for M = 2: the weaker one; an exact tie gives neither). Pure device math."""
    check_scores(scores)
    s = scores.detach().to(torch.float32)
    return (s < strongest_other(s)).to(torch.float32)


class PMR(MethodScaffold):
    """Drop-in PMR for a training loop.

        pmr = fastbml.PMR(["audio", "visual"], n_classes=31, alpha=1.0, momentum=0.2)
        pmr.update_prototypes(epoch, subset)   # before training (0) and after each epoch
        loss = F.cross_entropy(logits, y) + pmr.loss({"audio": f_a, "visual": f_v}, y, epoch)

    `loss` takes each modality's pooled features [B, d_m] (with their graph) and returns
    alpha * sum_m w_m * PCE_m, with PCE_m the prototypical cross-entropy of modality m (mean over
    the batch) and w = `pmr_loss_weights` of the prototype scores s_m = sum_i p_m(y_i | f_i)
    (float32 scalar; 0 outside start <= epoch <= end, epoch >= warmup_epochs).

    Prototypes follow the authors' schedule: before training, and after each epoch, the
    features of a subset of the training set (about 10% of its batches, encoders in eval mode)
    go to `update_prototypes` with the epoch just trained (0 before training), as an iterable
    `subset` of (features, labels) batches, or batch by batch through `collect`. Each class gets the mean of its collected
    features; from epoch 1 on it is blended with the previous prototype (EMA with `momentum`,
    the weight of the old one). A class with no sample keeps its previous prototype; one that
    never had a sample stays out of the softmax, and samples of that class are ignored, so the
    loss is never NaN. Under DDP the collected sums and counts are all-reduced once per update,
    and the M scores once per step, so every rank sees the global batch; each rank's loss is
    the mean over its own batch (DDP then averages the gradients, as for cross-entropy).
    `state_dict` holds the prototypes, which classes have one, and the step count.
    `last_scores`, `last_weights` and `last_losses` (device tensors, no sync) hold the latest
    step's s, w and PCE (None outside the window).
    """

    def __init__(self, modalities: Sequence[str], n_classes: int, *, alpha: float = 1.0,
                 momentum: float = 0.2, start: int = 0, end: int | None = None,
                 warmup_epochs: int = 0, backend: str = "auto",
                 process_group: object = distributed.GROUP_AUTO):
        if isinstance(modalities, (str, Mapping)) or not isinstance(modalities, Sequence):
            raise TypeError("modalities must be a sequence of modality names")
        self.n_classes = integer(n_classes, "n_classes", low=1)
        self.alpha = finite_number(alpha, "alpha", low=0.0)
        self.momentum = probability(momentum, "momentum")
        # PMR draws no random numbers: the scaffold's seed is fixed rather than shared
        self._setup(modalities, start=start, end=end, warmup_epochs=warmup_epochs, seed=0,
                    backend=backend, process_group=process_group)
        self._step = torch.zeros((), dtype=torch.int64)
        self.dims: list[int] | None = None
        self.prototypes: list[torch.Tensor] | None = None
        self.valid: torch.Tensor | None = None
        self._sums: torch.Tensor | None = None  # [C, sum_m d_m + 1]: feature sums | counts
        self.last_scores: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None
        self.last_losses: torch.Tensor | None = None
        self._check_ranks()

    def active(self, epoch: int) -> bool:
        """Whether the prototypical loss is added in `epoch` (0-based)."""
        return self.in_window(epoch)

    # ---------------------------------------------------------------- inputs and state
    def _features(self, features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                  ) -> list[torch.Tensor]:
        """The features in modality order, checked, with the state allocated on their device."""
        feats = self._ordered(features, "features")
        for name, f in zip(self.modalities, feats):
            check_float_tensor(f, f"features[{name!r}]")
            if f.dim() != 2:
                raise ValueError(f"features[{name!r}] must be [B, d], got shape "
                                 f"{tuple(f.shape)}")
            if f.shape[1] == 0:
                raise ValueError(f"features[{name!r}] has 0 columns")
            first = feats[0]
            if f.shape[0] != first.shape[0] or f.device != first.device:
                raise ValueError(f"features[{name!r}] is [{f.shape[0]}, ...] on {f.device} but "
                                 f"features[{self.modalities[0]!r}] is [{first.shape[0]}, ...] "
                                 f"on {first.device}: modalities must share batch and device")
        self._allocate([f.shape[1] for f in feats], feats[0].device)
        return feats

    def _allocate(self, dims: list[int], device: torch.device) -> None:
        if self.dims is None:
            self.dims = dims
            self.prototypes = [torch.zeros(self.n_classes, d, device=device) for d in dims]
            self.valid = torch.zeros(self.n_classes, dtype=torch.bool, device=device)
            self._sums = torch.zeros(self.n_classes, sum(dims) + 1, device=device)
        elif dims != self.dims:
            raise ValueError(f"features have widths {dict(zip(self.modalities, dims))} but the "
                             f"prototypes {dict(zip(self.modalities, self.dims))}")
        if self.valid.device != device:  # the model moved after the state was made
            self.prototypes = [p.to(device) for p in self.prototypes]
            self.valid, self._sums = self.valid.to(device), self._sums.to(device)
        if self._step.device != device:
            self._step = self._step.to(device)

    def _labels(self, labels: torch.Tensor, features: list[torch.Tensor], *,
                check_range: bool = True) -> torch.Tensor:
        labels = check_labels(labels, features[0].shape[0], features[0].device)
        if check_range and labels.numel():
            check_on_device(((labels >= 0) & (labels < self.n_classes)).all(),
                            f"labels must lie in [0, {self.n_classes}), got values outside it")
        return labels

    # ---------------------------------------------------------------- the loss
    def loss(self, features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
             labels: torch.Tensor, epoch: int) -> torch.Tensor:
        """alpha * sum_m w_m PCE_m for this batch (float32 scalar, differentiable with respect
        to the features); add it to the training loss before backward.

        Safe to compile with `torch.compile(fullgraph=True)`: one graph serves every step.
        """
        self._check_ranks()
        feats = self._features(features)
        labels = self._labels(labels, feats, check_range=False)  # the op guards the range
        self._step.add_(1)
        if not self.active(epoch):
            self.last_scores = self.last_weights = self.last_losses = None
            return torch.zeros((), device=feats[0].device)
        per_row = torch.stack([prototype_cross_entropy(f, p, self.valid, labels,
                                                       backend=self.backend)
                               for f, p in zip(feats, self.prototypes)])  # [M, B]
        kept = self.valid[labels].to(per_row.dtype)
        losses = per_row.sum(dim=1) / kept.sum().clamp(min=1.0)
        scores = (torch.exp(-per_row.detach()) * kept).sum(dim=1)
        distributed.all_reduce_sum_(scores, self.group)
        weights = pmr_loss_weights(scores)
        self.last_scores, self.last_weights, self.last_losses = scores, weights, losses.detach()
        return self.alpha * (weights * losses).sum()

    # ---------------------------------------------------------------- prototypes
    @torch.no_grad()
    def collect(self, features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                labels: torch.Tensor) -> None:
        """Add a batch of features (detached) to the per-class sums and counts of the next
        `update_prototypes`: one index_add_ per batch, on the device."""
        feats = self._features(features)
        labels = self._labels(labels, feats)
        ones = torch.ones(labels.shape[0], 1, device=feats[0].device)
        self._sums.index_add_(0, labels, torch.cat([*(f.float() for f in feats), ones], dim=1))

    @torch.no_grad()
    def update_prototypes(self, epoch: int,
                          batches: Iterable[tuple[Mapping[str, torch.Tensor] |
                                                  Sequence[torch.Tensor], torch.Tensor]]
                          | None = None) -> None:
        """Prototypes from `batches` (each (features, labels) is `collect`ed first) and what
        `collect` gathered since the last update, all-reduced once under DDP. `epoch` is the
        epoch just trained (0 before training): the EMA with the previous prototypes applies
        from epoch 1 on, as in the authors' code. Classes without a sample keep their
        prototype. No host sync."""
        integer(epoch, "epoch")
        for features, labels in batches or ():
            self.collect(features, labels)
        if self._sums is None:
            raise ValueError("update_prototypes: no features were collected (call collect "
                             "with a batch of each modality's features first)")
        distributed.all_reduce_sum_(self._sums, self.group)
        counts = self._sums[:, -1]
        fresh = (counts > 0)[:, None]
        means = self._sums[:, :-1] / counts.clamp(min=1.0)[:, None]
        blend = fresh & self.valid[:, None] if epoch > 0 else None
        for proto, mean in zip(self.prototypes, means.split(self.dims, dim=1)):
            if blend is not None:
                mean = torch.where(blend, mean.lerp(proto, self.momentum), mean)
            proto.copy_(torch.where(fresh, mean, proto))
        self.valid |= fresh[:, 0]
        self._sums.zero_()

    # ---------------------------------------------------------------- state
    def _config(self) -> dict:
        return {"modalities": self.modalities, "n_classes": self.n_classes,
                "alpha": self.alpha, "momentum": self.momentum, "start": self.start,
                "end": self.end, "warmup_epochs": self.warmup_epochs}

    def state_dict(self) -> dict:
        """{"prototypes": {modality: [C, d]} or None, "valid": [C] bool or None, "steps"}.
        Sums collected but not yet turned into prototypes are not part of it."""
        if self.prototypes is None:
            return {"prototypes": None, "valid": None, "steps": self.steps}
        return {"prototypes": {m: p.clone() for m, p in zip(self.modalities, self.prototypes)},
                "valid": self.valid.clone(), "steps": self.steps}

    def load_state_dict(self, state: Mapping) -> None:
        protos = state["prototypes"]
        self._step.fill_(int(state["steps"]))
        self._checked = self.group is None
        if protos is None:
            self.dims = self.prototypes = self.valid = self._sums = None
            return
        if set(protos) != set(self.modalities):
            raise ValueError(f"state has prototypes for {sorted(protos)}, expected "
                             f"{sorted(self.modalities)}")
        loaded = [protos[m] for m in self.modalities]
        valid = state["valid"]
        if any(p.dim() != 2 or p.shape[0] != self.n_classes for p in loaded) or \
                valid.shape != (self.n_classes,):
            raise ValueError(f"state's prototypes do not have {self.n_classes} classes")
        device = self.valid.device if self.valid is not None else loaded[0].device
        self.dims = None
        self._allocate([p.shape[1] for p in loaded], device)
        for proto, p in zip(self.prototypes, loaded):
            proto.copy_(p)
        self.valid.copy_(valid)
