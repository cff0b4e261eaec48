"""`fastbml.DiagnoseRelearn`: the drop-in D&R helper for a training loop (ECCV 2024;
docs/methods.md#diagnosing-and-re-learning).

It snapshots every encoder's initial parameters in memory at construction (no file in the
working directory, unlike the reference), and every `every` epochs (at most `times` times) diagnoses each
modality on a train split and a held-out split (cluster purity of the pooled features) and pulls
each encoder back toward its snapshot by tanh(lam * |purity gap|).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

from . import distributed
from ._checks import integer, renamed_keyword
from ._sharded import is_dtensor, local_slice, replicate_groups
from .purity import check_kmeans, cluster_purity
from .relearn import relearn_strength, soft_reinit_

Features = tuple[Mapping[str, torch.Tensor], torch.Tensor]
FeatureSource = Features | Callable[[], Features]
GroupSpec = nn.Module | Iterable[torch.Tensor]


class FeatureLoader:
    """A D&R feature source over a data loader: calling it runs `encode` on every batch (no grad;
    `model`, when given, in eval mode for the pass and restored after) and returns
    ({modality: features [N, D]}, labels [N]). `split` names the split ("test" is refused by
    DiagnoseRelearn.step).

        train = fastbml.FeatureLoader(lambda x: model.encode(x), train_loader, split="train",
                                      model=model)
    """

    def __init__(self, encode: Callable[[object], Mapping[str, torch.Tensor]],
                 loader: Iterable, *, split: str, model: nn.Module | None = None,
                 device: torch.device | str | None = None):
        if not callable(encode):
            raise TypeError(f"encode must be callable, got {type(encode).__name__}")
        if not isinstance(split, str):
            raise TypeError(f"split must be a string such as 'train' or 'val', got {split!r}")
        self.encode, self.loader, self.split, self.model = encode, loader, split, model
        self.device = None if device is None else torch.device(device)

    def _to_device(self, value):
        if self.device is None:
            return value
        if isinstance(value, Mapping):
            return {k: v.to(self.device, non_blocking=True) for k, v in value.items()}
        return value.to(self.device, non_blocking=True)

    @torch.no_grad()
    def __call__(self) -> Features:
        was_training = self.model is not None and self.model.training
        if self.model is not None:
            self.model.eval()
        try:
            features: dict[str, list[torch.Tensor]] = {}
            labels = []
            for inputs, y in self.loader:
                for m, f in self.encode(self._to_device(inputs)).items():
                    features.setdefault(m, []).append(f.float())
                labels.append(self._to_device(y))
        finally:
            if was_training:
                self.model.train()
        if not labels:
            raise ValueError(f"the {self.split} loader gave no batches")
        return {m: torch.cat(v) for m, v in features.items()}, torch.cat(labels)


class DiagnoseRelearn:
    """Drop-in Diagnosing & Re-learning.

        dr = fastbml.DiagnoseRelearn({"audio": model.audio_net, "visual": model.visual_net},
                                     every=20, times=3)       # right after building the model
        train = fastbml.FeatureLoader(model.encode, train_loader, split="train", model=model)
        held_out = fastbml.FeatureLoader(model.encode, val_loader, split="val", model=model)
        for epoch in range(epochs):
            train_one_epoch(...)
            dr.step(epoch, train, held_out)

    `train` and `held_out` are ({modality: features [N, D]}, labels [N]) or a callable returning
    that (called only when a diagnosis is due): the pooled per-modality features that feed the
    fusion head, taken in eval mode. The held-out split must not be the test set
    (`held_out_split="test"`, or a source with attribute `split == "test"`, is refused). A
    diagnosis runs after epochs e > 0 with e % every == 0, at most `times` times. `n_clusters`
    defaults to the number of classes the labels show. Every parameter of each encoder is
    re-initialised (BN gamma/beta included; buffers, the fusion head and optimizer state are not).
    Under DDP each rank passes its own shard of the features: purities come from a distributed
    k-means over all shards, and every rank applies the same re-initialisation toward rank 0's
    snapshot. Under FSDP2 the snapshot is a DTensor sharded like each parameter and the
    re-initialisation is local to each rank's shards; `state_dict()` holds the snapshot
    (DTensors under FSDP2, what torch.distributed.checkpoint saves and loads sharded), so a
    resumed run re-learns toward the same init.
    `kmeans` picks the k-means implementation (`cluster_purity`; `kmeans_backend=` is its
    deprecated name), `backend` the kernel tier of the re-initialisation.
    """

    def __init__(self, groups: Mapping[str, GroupSpec], *, every: int = 20, times: int = 3,
                 lam: float = 3.0, n_clusters: int | None = None, kmeans: str = "auto",
                 n_init: int = 10, seed: int = 0, backend: str = "auto",
                 process_group: object = distributed.GROUP_AUTO,
                 kmeans_backend: str | None = None):
        if not isinstance(groups, Mapping) or not groups:
            raise ValueError("groups must map modality names to encoder modules or parameter "
                             "lists")
        self.every = integer(every, "every", low=1)
        self.times = integer(times, "times")
        relearn_strength(0.0, 0.0, lam)  # validates lam
        self.lam = float(lam)
        self.n_clusters = None if n_clusters is None else integer(n_clusters, "n_clusters", low=1)
        self.n_init = integer(n_init, "n_init", low=1)
        self.kmeans = check_kmeans(renamed_keyword("kmeans_backend", kmeans_backend, "kmeans",
                                                   kmeans, "auto"))
        self.backend, self.seed = backend, int(seed)
        self.modalities = list(groups)
        self.params = [self._parameters(name, spec) for name, spec in groups.items()]
        owner: dict[int, str] = {}
        for name, group in zip(self.modalities, self.params):
            for p in group:
                if owner.setdefault(id(p), name) != name:
                    raise ValueError(f"groups[{owner[id(p)]!r}] and groups[{name!r}] share a "
                                     "parameter: each encoder belongs to one modality")
        with torch.no_grad():
            self.init_params = [[p.detach().clone() for p in group] for group in self.params]
        self.group = distributed.resolve_group(process_group)
        self._synced = self.group is None
        self.count = 0

    @staticmethod
    def _parameters(name: str, spec: GroupSpec) -> list[torch.Tensor]:
        if isinstance(spec, nn.Module):
            return list(spec.parameters())
        if isinstance(spec, torch.Tensor) or not isinstance(spec, Iterable):
            raise TypeError(f"groups[{name!r}] must be an nn.Module or a list of parameters, got "
                            f"{type(spec).__name__}")
        return list(spec)

    def due(self, epoch: int) -> bool:
        """Whether `step(epoch, ...)` diagnoses and re-learns (after epoch `epoch`, 0-based)."""
        return epoch > 0 and epoch % self.every == 0 and self.count < self.times

    def _features(self, source: FeatureSource, name: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        features, labels = source() if callable(source) else source
        if not isinstance(features, Mapping) or set(features) != set(self.modalities):
            got = sorted(features) if isinstance(features, Mapping) else type(features).__name__
            raise ValueError(f"{name} must give features for exactly the modalities "
                             f"{self.modalities}, got {got}")
        return [features[m] for m in self.modalities], labels

    def diagnose(self, train: FeatureSource, held_out: FeatureSource) -> dict[str, float]:
        """Purities, gaps and strengths per modality (no re-initialisation):
        purity_train_<m>, purity_val_<m>, purity_gap_<m>, relearn_<m>."""
        train_x, train_y = self._features(train, "train")
        val_x, val_y = self._features(held_out, "held_out")
        for name, y in (("train", train_y), ("held_out", val_y)):
            if self.group is None and (not isinstance(y, torch.Tensor) or y.numel() == 0):
                raise ValueError(f"{name} gave no labels: D&R needs a non-empty split to "
                                 "diagnose")
        k = self.n_clusters
        if k is None:  # D&R clusters into as many groups as there are classes
            top = torch.stack([train_y.max(), val_y.max()]).max().to(torch.int64)
            if self.group is not None:
                dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
            k = int(top) + 1
        report = {}
        for m, xt, xv in zip(self.modalities, train_x, val_x):
            purity = [cluster_purity(x, y, k, kmeans=self.kmeans, seed=self.seed,
                                     n_init=self.n_init, num_classes=k,
                                     group=self.group)
                      for x, y in ((xt, train_y), (xv, val_y))]
            report[f"purity_train_{m}"], report[f"purity_val_{m}"] = purity
            report[f"purity_gap_{m}"] = abs(purity[0] - purity[1])
            report[f"relearn_{m}"] = relearn_strength(purity[0], purity[1], self.lam)
        return report

    def relearn(self, strengths: Mapping[str, float]) -> None:
        """theta <- (1 - a_m) theta + a_m theta_init for every encoder, in one multi-tensor op."""
        if set(strengths) != set(self.modalities):
            raise ValueError(f"strengths must have one value per modality {self.modalities}, "
                             f"got {sorted(strengths)}")
        self._sync_snapshot()
        soft_reinit_(self.params, self.init_params, [strengths[m] for m in self.modalities],
                     backend=self.backend)

    def step(self, epoch: int, train: FeatureSource, held_out: FeatureSource, *,
             held_out_split: str = "val") -> dict[str, float] | None:
        """Diagnose and re-learn when due (see `due`); returns the report, or None."""
        if held_out_split == "test" or getattr(held_out, "split", None) == "test":
            raise ValueError("held_out must not be the test split: D&R diagnoses on data held "
                             "out from training but disjoint from the test set (docs/methods.md#held-out-split)")
        self._sync_snapshot()  # at the first step, before any rank can start a collective alone
        if not self.due(epoch):
            return None
        report = self.diagnose(train, held_out)
        self.relearn({m: report[f"relearn_{m}"] for m in self.modalities})
        self.count += 1
        return report

    def _config(self) -> dict:
        return {"modalities": self.modalities, "every": self.every, "times": self.times,
                "lam": self.lam, "n_clusters": self.n_clusters, "seed": self.seed,
                "shapes": [[list(p.shape) for p in group] for group in self.params]}

    def _sync_snapshot(self) -> None:
        """Once, under DDP: check the ranks agree, then take rank 0's snapshot everywhere.
        A DTensor snapshot (FSDP2) is sharded like its parameter: each rank keeps its own
        shards, and only a replicated mesh dimension (HSDP's) takes its first rank's."""
        if self._synced:
            return
        distributed.check_same_on_all_ranks(self._config(), self.group,
                                            "fastbml.DiagnoseRelearn")
        snapshot = [p for group in self.init_params for p in group]
        distributed.broadcast_([p for p in snapshot if not is_dtensor(p)], self.group)
        replicated: dict[object, list[torch.Tensor]] = {}
        for p in snapshot:
            if is_dtensor(p):
                for group in replicate_groups(p):
                    replicated.setdefault(group, []).append(p.to_local())
        for group, local in replicated.items():
            distributed.broadcast_(local, group)
        self._synced = True

    def state_dict(self) -> dict:
        return {"count": self.count, "init_params": self.init_params, "config": self._config()}

    def load_state_dict(self, state: Mapping) -> None:
        init = state["init_params"]
        if len(init) != len(self.init_params):
            raise ValueError(f"state_dict has a snapshot of {len(init)} modalities, this helper "
                             f"has {len(self.init_params)}")
        for m, (saved, mine) in enumerate(zip(init, self.init_params)):
            if [tuple(t.shape) for t in saved] != [tuple(t.shape) for t in mine]:
                raise ValueError(f"state_dict snapshot of modality {self.modalities[m]!r} has "
                                 "parameter shapes that differ from this model's")
        with torch.no_grad():
            for saved, mine in zip(init, self.init_params):
                for t, p in zip(saved, mine):
                    if is_dtensor(p) and not is_dtensor(t):  # a whole (unsharded) snapshot
                        p.to_local().copy_(local_slice(t, p))
                    else:
                        p.copy_(t)
        self.count = int(state["count"])

    def __repr__(self) -> str:
        return (f"DiagnoseRelearn(modalities={self.modalities}, every={self.every}, "
                f"times={self.times}, lam={self.lam}, done={self.count})")
