"""What every dataset provides: per-sample (inputs dict, label) items, split sets, metadata."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..models import InputSpec


class DataError(ValueError):
    """A dataset file is missing, unreadable or malformed; the message names the file.

    Raised in a DataLoader worker, it reaches the main process rebuilt from the worker's
    traceback text; the message then leads with the worker's own message (the file and the
    dataset) and keeps the worker traceback in `worker_traceback`.
    """

    _WORKER = "Caught DataError in DataLoader worker process"

    def __init__(self, message: str = ""):
        self.worker_traceback = None
        if isinstance(message, str) and message.startswith(self._WORKER):
            where = message.split("\n", 1)[0][len("Caught DataError in "):].rstrip(".")
            original = message.rsplit("DataError: ", 1)[-1].strip()
            self.worker_traceback = message
            message = f"{original} (in {where})"
        super().__init__(message)


@dataclass(frozen=True)
class DatasetInfo:
    """Name, per-modality input specs (in fusion order) and number of classes of a dataset."""

    name: str
    inputs: Mapping[str, InputSpec]
    num_classes: int
    class_names: tuple[str, ...] = field(default=())
    # modality -> (mean, std) per channel, in [0, 1] units, of modalities read as uint8: the
    # trainer (or `fastbml.data.prepare_batch`) normalises them on the training device
    uint8_norm: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]] = field(
        default_factory=dict)

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

    `train` switches on the readers' augmentation (random crop / flip, drawn from torch's global
    RNG); val and test read deterministically. An index may be an (index, seed) pair: the
    augmentation of that read is then drawn from `seed` alone (the trainer's sampler does this,
    so augmentation does not depend on worker count or persistence). Readers must be picklable
    for DataLoader workers. Any failure is a DataError naming the dataset `name` and the sample.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], readers: Mapping, *, train: bool,
                 name: str = "dataset"):
        if not samples:
            raise DataError(f"{name}: the split is empty: no samples found")
        self.samples, self.readers, self.train = list(samples), dict(readers), train
        self.name = name

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int | tuple[int, int]) -> tuple[dict[str, torch.Tensor], int]:
        if isinstance(i, tuple):
            i, seed = i
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self._read(i)
        return self._read(i)

    def _read(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        sample_id, label = self.samples[i]
        split = "train" if self.train else "eval"
        try:
            return {m: read(sample_id, self.train) for m, read in self.readers.items()}, label
        except Exception as exc:  # every failure names the dataset and the sample
            raise DataError(f"{self.name} ({split}) sample {sample_id!r}: "
                            f"{type(exc).__name__ + ': ' if not isinstance(exc, DataError) else ''}"
                            f"{exc}") from exc

    def subset(self, indices: Sequence[int], *, train: bool) -> FileDataset:
        return FileDataset([self.samples[i] for i in indices], self.readers, train=train,
                           name=self.name)


def split_train_val(samples: list[tuple[str, int]], readers: Mapping, val_fraction: float,
                    seed: int, name: str = "dataset") -> tuple[FileDataset, FileDataset]:
    """Train and a stratified held-out val carved from `samples` (val reads without augmentation)."""
    kept, held = carve_split([label for _, label in samples], val_fraction, seed)
    full = FileDataset(samples, readers, train=True, name=name)
    return full.subset(kept, train=True), full.subset(held, train=False)
