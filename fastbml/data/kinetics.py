"""Kinetics-Sounds (31 classes) and Kinetics-400, in the layout of the T-PAMI 2024 preprocessing,
plus a plain frame-folder variant.

    <root>/
      annotations.json   {"labels": [class, ...],
                          "database": {video_id: {"subset": "training" | "validation" | "testing",
                                                  "label": class}, ...}}
      hdf5/<video_id>.hdf5      (HDF5 variant) dataset "video": one encoded JPEG per frame
      frames/<video_id>/*.jpg   (frame-folder variant) frames in name order
      audio/<video_id>.pkl      pickled 2-D numpy spectrogram [F, T] (or audio/<video_id>.npy)

Visual: first, middle and last frame (`frames` evenly spaced; 3 in T-PAMI), random resized crop
(scale 0.25-1) + flip when training, resize otherwise, ImageNet normalisation
-> [3, frames, size, size] with size 112. Audio: the spectrogram, time axis cropped or zero-padded
to the first training sample's length -> [1, F, T]. Test is the "testing" subset, or
"validation" when there is no "testing" (as the T-PAMI code evaluates); val is "validation"
when "testing" exists, otherwise carved from training (`val_fraction`). Videos listed in the
annotations whose files are missing raise an error naming the file (the reference silently
skips them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..models import InputSpec
from .base import DataError, DatasetInfo, FileDataset, Splits, require_file, split_train_val
from .io import FrameFolder, decode_image, fit_spectrogram, load_array, pick_frames, rgb_clip


def read_annotations(path: Path) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Class names and the (video_id, label) rows of each subset of an annotations.json."""
    try:
        data = json.loads(require_file(path, "annotation file").read_text())
        labels = list(data["labels"])
        database = data["database"]
        subsets: dict[str, list[tuple[str, int]]] = {}
        for vid, entry in database.items():
            subsets.setdefault(entry["subset"], []).append((vid, labels.index(entry["label"])))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"malformed annotation file {path}: {exc!r}") from exc
    return labels, subsets


class HDF5Frames:
    """Reads `frames` evenly spaced encoded frames from hdf5/<id>.hdf5 (dataset "video")."""

    def __init__(self, folder: Path, frames: int, size: int,
                 crop_scale: tuple[float, float] = (0.25, 1.0)):
        self.folder, self.frames, self.size, self.crop_scale = folder, frames, size, crop_scale

    def __call__(self, video_id: str, train: bool) -> torch.Tensor:
        import h5py

        path = require_file(self.folder / f"{video_id}.hdf5", "HDF5 video")
        try:
            with h5py.File(path, "r") as fh:
                data = fh["video"]
                picked = [bytes(np.asarray(data[i], dtype=np.uint8))
                          for i in pick_frames(len(data), self.frames)]
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"unreadable HDF5 video {path}: {exc}") from exc
        images = [decode_image(b, f"{path}[video][{i}]") for i, b in enumerate(picked)]
        return rgb_clip(images, self.size, train=train, crop_scale=self.crop_scale)


class PickledSpectrogram:
    """Reads audio/<id>.pkl (or .npy) and fits it to `shape` [F, T]."""

    def __init__(self, folder: Path, shape: tuple[int, int] | None = None):
        self.folder, self.shape = folder, shape

    def __call__(self, video_id: str, train: bool) -> torch.Tensor:
        path = self.folder / f"{video_id}.pkl"
        if not path.is_file() and (self.folder / f"{video_id}.npy").is_file():
            path = self.folder / f"{video_id}.npy"
        array = load_array(path, "spectrogram")
        try:
            return fit_spectrogram(array, self.shape or tuple(array.shape[-2:]))
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None


def kinetics_loader(name: str, frame_source: str):
    """The loader of a Kinetics dataset reading frames from "hdf5" files or "frames" folders."""
    def load(root: Path, seed: int, options: dict) -> Splits:
        frames = int(options.pop("frames", 3))
        size = int(options.pop("image_size", 112))
        val_fraction = float(options.pop("val_fraction", 0.1))
        if options:
            raise ValueError(f"unknown {name} options: {sorted(options)}")
        classes, subsets = read_annotations(root / "annotations.json")
        if "training" not in subsets:
            raise DataError(f"{root / 'annotations.json'} has no 'training' subset")
        audio = PickledSpectrogram(root / "audio")
        first = audio(subsets["training"][0][0], False)
        audio.shape = tuple(first.shape[1:])
        if frame_source == "hdf5":
            visual = HDF5Frames(root / "hdf5", frames, size)
        else:
            visual = FrameFolder(root / "frames", frames, size, crop_scale=(0.25, 1.0))
        readers = {"audio": audio, "visual": visual}
        if "testing" in subsets and "validation" in subsets:
            test_rows = subsets["testing"]
            train = FileDataset(subsets["training"], readers, train=True)
            val = FileDataset(subsets["validation"], readers, train=False)
        elif "testing" in subsets or "validation" in subsets:
            test_rows = subsets.get("testing") or subsets["validation"]
            train, val = split_train_val(subsets["training"], readers, val_fraction, seed)
        else:
            raise DataError(f"{root / 'annotations.json'} has neither a 'testing' nor a "
                            "'validation' subset")
        info = DatasetInfo(name, {"audio": InputSpec("spectrogram", tuple(first.shape)),
                                  "visual": InputSpec("frames", (3, frames, size, size))},
                           len(classes), tuple(classes))
        return Splits(info, train, val, FileDataset(test_rows, readers, train=False))
    return load
