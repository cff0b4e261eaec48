"""CMU-MOSI / CMU-MOSEI (sentiment; text, audio, vision), as the aligned feature pickles of the
MulT preprocessing.

    <root>/mosi_data.pkl  (MOSI)   or   <root>/mosei_senti_data.pkl  (MOSEI)
      {"train" | "valid" | "test": {"text":   [N, L, 300]  (GloVe),
                                    "audio":  [N, L, 74]   (COVAREP),
                                    "vision": [N, L, 35 or 47] (Facet),
                                    "labels": [N, 1, 1]    sentiment in [-3, 3]}}

Three modalities of [L, D] sequences (transformer encoders). Labels: `labels="binary"`
(default; non-negative vs negative) or "7class" (round(clip(s, -3, 3)) + 3). Non-finite feature
values (MOSEI's audio holds -inf) are set to 0. `file` overrides the pickle name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..models import InputSpec
from . import safe_pickle
from .base import DataError, DatasetInfo, Splits, TensorDataset, require_file

MODALITIES = ("text", "audio", "vision")
SPLITS = ("train", "valid", "test")


def _labels(values: np.ndarray, mode: str, where: str) -> torch.Tensor:
    s = torch.as_tensor(np.asarray(values, dtype=np.float32)).reshape(-1)
    bad = (~torch.isfinite(s)).nonzero()
    if bad.numel():
        raise DataError(f"{where}: {bad.numel()} non-finite sentiment labels (first at row "
                        f"{int(bad[0])})")
    if mode == "binary":
        return (s >= 0).long()
    return (torch.round(s.clamp(-3, 3)) + 3).long()


def mosi_loader(name: str, default_file: str):
    """The loader of CMU-MOSI or -MOSEI reading `default_file` (overridable) under the root."""
    def load(root: Path, seed: int, options: dict) -> Splits:
        path = root / str(options.pop("file", default_file))
        mode = options.pop("labels", "binary")
        if options:
            raise ValueError(f"unknown {name} options: {sorted(options)}")
        if mode not in ("binary", "7class"):
            raise ValueError(f"{name} labels must be 'binary' or '7class', got {mode!r}")
        try:
            with open(require_file(path, f"{name} feature pickle"), "rb") as fh:
                data = safe_pickle.load(fh)
            parts = {}
            for split in SPLITS:
                inputs = {m: torch.nan_to_num(torch.as_tensor(np.asarray(data[split][m],
                                                                         dtype=np.float32)),
                                              nan=0.0, posinf=0.0, neginf=0.0)
                          for m in MODALITIES}
                parts[split] = TensorDataset(inputs, _labels(data[split]["labels"], mode, f"{path} {split}"))
        except DataError:
            raise
        except Exception as exc:  # unpickling, missing keys, ragged arrays: name the file
            raise DataError(f"malformed {name} feature pickle {path}: {exc!r}") from exc
        shapes = {m: tuple(parts["train"].inputs[m].shape[1:]) for m in MODALITIES}
        for m, shape in shapes.items():
            if len(shape) != 2:
                raise DataError(f"{path}: train/{m} must be [N, L, D], got {shape}")
        n_classes = 2 if mode == "binary" else 7
        info = DatasetInfo(name, {m: InputSpec("sequence", shapes[m]) for m in MODALITIES},
                           n_classes)
        return Splits(info, parts["train"], parts["valid"], parts["test"])
    return load
