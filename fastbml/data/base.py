"""What every dataset provides: per-sample (inputs dict, label) items, split sets, metadata."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..models import InputSpec


class DataError(ValueError):
    """A dataset file is missing, unreadable or malformed; the message names the file."""


@dataclass(frozen=True)
class DatasetInfo:
    """Name, per-modality input specs (in fusion order) and number of classes of a dataset."""

    name: str
    inputs: Mapping[str, InputSpec]
    num_classes: int
    class_names: tuple[str, ...] = field(default=())

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.inputs)


@dataclass
class Splits:
    """train / val / test sets of one dataset.

    val is held out from training (an official validation split, or carved from train when the
    dataset has none); it is used for model selection and as D&R's held-out diagnosis split.
    test is only ever reported.
    """

    info: DatasetInfo
    train: Dataset
    val: Dataset
    test: Dataset


class TensorDataset(Dataset):
    """In-memory items: inputs {modality: [N, ...]} and labels [N].

    Indexing with a list of indices returns the whole batch at once (stacked inputs, labels
    tensor), so a loader can fetch batches without per-item Python work.
    """

    def __init__(self, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor):
        n = labels.shape[0]
        for m, x in inputs.items():
            if x.shape[0] != n:
                raise ValueError(f"inputs[{m!r}] has {x.shape[0]} rows for {n} labels")
        self.inputs, self.labels = dict(inputs), labels.long()

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        if isinstance(i, int):
            return {m: x[i] for m, x in self.inputs.items()}, int(self.labels[i])
        index = torch.as_tensor(i, dtype=torch.long)
        return {m: x[index] for m, x in self.inputs.items()}, self.labels[index]


def require_file(path: Path, what: str) -> Path:
    """`path` if it is an existing file, else a DataError naming it and what it should hold."""
    if not path.is_file():
        raise DataError(f"missing {what}: {path}")
    return path


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty stripped lines of a text file (split lists, class indices, CSVs)."""
    try:
        text = require_file(path, what).read_text()
    except UnicodeDecodeError as exc:
        raise DataError(f"{what} is not text: {path} ({exc})") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def carve_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Stratified split of indices into (kept, held_out), `fraction` of each class held out.

    Deterministic in `seed`; every class with >= 2 samples keeps at least one and holds out at
    least one.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    gen = torch.Generator().manual_seed(seed)
    labels_t = torch.as_tensor(list(labels))
    kept, held = [], []
    for c in torch.unique(labels_t).tolist():
        idx = torch.nonzero(labels_t == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)].tolist()
        n_held = min(max(1, round(fraction * len(idx))), len(idx) - 1) if len(idx) > 1 else 0
        held += idx[:n_held]
        kept += idx[n_held:]
    return sorted(kept), sorted(held)


class FileDataset(Dataset):
    """Items read from disk on access: `readers[m](sample_id, train) -> tensor` per modality.

    `train` switches on the readers' augmentation (random crop / flip); val and test read
    deterministically. Readers must be picklable for DataLoader workers.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], readers: Mapping, *, train: bool):
        if not samples:
            raise DataError("the split is empty: no samples found")
        self.samples, self.readers, self.train = list(samples), dict(readers), train

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        sample_id, label = self.samples[i]
        return {m: read(sample_id, self.train) for m, read in self.readers.items()}, label

    def subset(self, indices: Sequence[int], *, train: bool) -> FileDataset:
        return FileDataset([self.samples[i] for i in indices], self.readers, train=train)


def split_train_val(samples: list[tuple[str, int]], readers: Mapping, val_fraction: float,
                    seed: int) -> tuple[FileDataset, FileDataset]:
    """Train and a stratified held-out val carved from `samples` (val reads without augmentation)."""
    kept, held = carve_split([label for _, label in samples], val_fraction, seed)
    full = FileDataset(samples, readers, train=True)
    return full.subset(kept, train=True), full.subset(held, train=False)
