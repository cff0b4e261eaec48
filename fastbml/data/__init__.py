"""Datasets: each returns train / val / test splits of (inputs dict, label) items."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from .base import DataError, DatasetInfo, FileDataset, Splits, TensorDataset, carve_split
from .batch import SeededSampler, default_workers, normalize_uint8, prepare_batch
from .cremad import load_cremad
from .encoded import EncodedBatch, EncodedClip, collate, decode_batch
from .kinetics import kinetics_loader
from .mosi import mosi_loader
from .synthetic import SyntheticConfig, make_synthetic
from .ucf101 import load_ucf101

# name -> loader(root, seed, options) -> Splits; real datasets read files under root.
_LOADERS: dict[str, Callable[..., Splits]] = {}


def _synthetic_config(options: dict) -> SyntheticConfig:
    known = {f.name for f in dataclasses.fields(SyntheticConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown synthetic dataset options {unknown}; known: {sorted(known)}")
    return SyntheticConfig(**options)


def _synthetic(root: Path | None, seed: int, options: dict) -> Splits:
    return make_synthetic(seed, _synthetic_config(options))


def _synthetic_av(root: Path | None, seed: int, options: dict) -> Splits:
    return make_synthetic(seed, _synthetic_config({"layout": "av", **options}))


# Options of the real datasets that count something: positive ints.
_POSITIVE_OPTIONS = ("frames", "image_size")


_LOADERS.update({
    "synthetic": _synthetic,
    "synthetic-av": _synthetic_av,
    "cremad": load_cremad,
    "kinetics-sounds": kinetics_loader("kinetics-sounds", "hdf5"),
    "kinetics-sounds-frames": kinetics_loader("kinetics-sounds", "frames"),
    "kinetics400": kinetics_loader("kinetics400", "hdf5"),
    "kinetics400-frames": kinetics_loader("kinetics400", "frames"),
    "ucf101": load_ucf101,
    "mosi": mosi_loader("mosi", "mosi_data.pkl"),
    "mosei": mosi_loader("mosei", "mosei_senti_data.pkl"),
})


def dataset_names() -> list[str]:
    return sorted(_LOADERS)


def register_dataset(name: str, loader: Callable[..., Splits]) -> None:
    """Make `loader(root, seed, options) -> Splits` available as `--dataset name`."""
    _LOADERS[name] = loader


def load_dataset(name: str, root: str | Path | None = None, *, seed: int = 0,
                 options: dict | None = None) -> Splits:
    """The splits of dataset `name`; `root` is its directory (unused by the synthetic ones)."""
    if name not in _LOADERS:
        raise ValueError(f"dataset must be one of {dataset_names()}, got {name!r}")
    root_path = None if root is None else Path(root)
    if root_path is None and not name.startswith("synthetic"):
        raise ValueError(f"dataset {name!r} needs a data root (--data-root)")
    if root_path is not None and not name.startswith("synthetic") and not root_path.is_dir():
        raise DataError(f"data root of {name!r} is not a directory: {root_path}")
    options = dict(options or {})
    for key in _POSITIVE_OPTIONS:
        value = options.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"dataset option {key} must be a positive int, got {value!r}")
    return _LOADERS[name](root_path, seed, options)


__all__ = [
    "DataError",
    "DatasetInfo",
    "EncodedBatch",
    "EncodedClip",
    "FileDataset",
    "SeededSampler",
    "Splits",
    "SyntheticConfig",
    "TensorDataset",
    "carve_split",
    "collate",
    "dataset_names",
    "decode_batch",
    "default_workers",
    "load_dataset",
    "make_synthetic",
    "normalize_uint8",
    "prepare_batch",
    "register_dataset",
]
