"""Kinetics-Sounds (31 classes) and Kinetics-400, in the layout of the T-PAMI 2024 preprocessing,
plus a plain frame-folder variant.

    <root>/
      annotations.json   {"labels": [class, ...],
                          "database": {video_id: {"subset": "training" | "validation" | "testing",
                                                  "label": class}, ...}}
      hdf5/<video_id>.hdf5      (HDF5 variant) dataset "video": one encoded JPEG per frame
      frames/<video_id>/*.jpg   (frame-folder variant) frames in name order
      audio/<video_id>.pkl      pickled 2-D numpy spectrogram [F, T] (or audio/<video_id>.npy)

Visual: first, middle and last frame (`frames` evenly spaced, rounded down; 3 in T-PAMI), as a
[3, frames, size, size] uint8 clip (size 112; `image_size=224` for the larger setting): decoded
with simplejpeg (libjpeg-turbo), at 1/2, 1/4 or 1/8 size by libjpeg's DCT scaling where the
region still covers size x size pixels (`dct_scaling=False` turns it off; `decoder="pillow"`
uses Pillow), one random resized crop (scale 0.25-1, ratio 3/4-4/3) + flip for all frames when
training, a short-side resize + centre crop otherwise, resized with torch's antialiased uint8
bilinear kernel. The trainer (or `fastbml.data.prepare_batch`) converts it to float and
normalises it (ImageNet) on the training device. Audio: the spectrogram, time axis cropped or
zero-padded to the first training sample's length -> [1, F, T]. Test is the "testing" subset,
or "validation" when there is no "testing" (as the T-PAMI code evaluates); val is "validation"
when "testing" exists, otherwise carved from training (`val_fraction`). Videos listed in the
annotations whose files are missing raise an error naming the file (the reference silently
skips them).

Against the T-PAMI code (torchvision on PIL images): its RandomResizedCrop retries up to 10
times and falls back to a centre crop, ours draws once and clamps the crop into the frame; the
resize matches Pillow's bilinear to within one uint8 level (tests), and DCT-scaled decoding is
a different (DCT-domain) downscale of large crops. The audio pickles are the authors' own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..models import InputSpec
from .base import DataError, DatasetInfo, FileDataset, Splits, require_file, split_train_val
from .encoded import decode_options
from .io import (
    IMAGENET_NORM,
    FrameFolder,
    check_frame_options,
    fit_spectrogram,
    load_array,
    pick_frames,
    rgb_clip_uint8,
)


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


_VLEN_UINT8 = None


def _read_hdf5_frames(path: Path, count: int) -> tuple[list[int], list[bytes]]:
    """The picked frame indices of hdf5 dataset "video" and their encoded bytes, in one
    element-selection read (h5py's low-level API: about half the cost of its indexing)."""
    import h5py
    from h5py import h5d, h5f, h5s, h5t

    global _VLEN_UINT8
    if _VLEN_UINT8 is None:
        _VLEN_UINT8 = h5py.vlen_dtype(np.uint8)
    fid = h5f.open(str(path).encode(), h5f.ACC_RDONLY)
    try:
        dset = h5d.open(fid, b"video")
        space = dset.get_space()
        if space.get_simple_extent_ndims() != 1 or h5py.check_vlen_dtype(dset.dtype) != np.uint8:
            raise DataError(f"HDF5 video {path}: dataset 'video' must be a 1-D array of "
                            f"variable-length uint8 (encoded frames), got {dset.dtype} of shape "
                            f"{space.shape}")
        picked = pick_frames(space.shape[0], count)
        unique = sorted(set(picked))
        space.select_elements(np.asarray(unique, dtype=np.uint64).reshape(-1, 1))
        rows = np.empty(len(unique), dtype=_VLEN_UINT8)
        dset.read(h5s.create_simple((len(unique),)), space, rows, h5t.py_create(_VLEN_UINT8))
    finally:
        fid.close()
    position = {i: k for k, i in enumerate(unique)}
    return picked, [rows[position[i]].tobytes() for i in picked]


class HDF5Frames:
    """Reads `frames` evenly spaced encoded frames from hdf5/<id>.hdf5 (dataset "video") as a
    [3, T, size, size] uint8 clip."""

    def __init__(self, folder: Path, frames: int, size: int,
                 crop_scale: tuple[float, float] = (0.25, 1.0), *, dct_scaling: bool = True,
                 decoder: str = "auto", eval_crop: str = "center", gpu_decode: bool = False):
        check_frame_options(decoder, eval_crop)
        self.folder, self.frames, self.size, self.crop_scale = folder, frames, size, crop_scale
        self.dct_scaling, self.decoder, self.eval_crop = dct_scaling, decoder, eval_crop
        self.gpu_decode = gpu_decode

    def __call__(self, video_id: str, train: bool) -> torch.Tensor:
        path = require_file(self.folder / f"{video_id}.hdf5", "HDF5 video")
        try:
            picked, encoded = _read_hdf5_frames(path, self.frames)
        except DataError:
            raise
        except Exception as exc:  # h5py raises OSError, KeyError, ValueError, ...: name the file
            raise DataError(f"unreadable HDF5 video {path}: {exc}") from exc
        names = [f"{path}[video][{i}]" for i in picked]
        return rgb_clip_uint8(encoded, names, self.size, train=train,
                              crop_scale=self.crop_scale, dct_scaling=self.dct_scaling,
                              decoder=self.decoder, eval_crop=self.eval_crop,
                              encoded=self.gpu_decode)


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
        decode = decode_options(options)
        if options:
            raise ValueError(f"unknown {name} options: {sorted(options)}")
        classes, subsets = read_annotations(root / "annotations.json")
        if "training" not in subsets:
            raise DataError(f"{root / 'annotations.json'} has no 'training' subset")
        audio = PickledSpectrogram(root / "audio")
        first = audio(subsets["training"][0][0], False)
        audio.shape = tuple(first.shape[1:])
        if frame_source == "hdf5":
            visual = HDF5Frames(root / "hdf5", frames, size, **decode)
        else:
            visual = FrameFolder(root / "frames", frames, size, crop_scale=(0.25, 1.0),
                                 eval_crop="center", **decode)
        readers = {"audio": audio, "visual": visual}
        if "testing" in subsets and "validation" in subsets:
            test_rows = subsets["testing"]
            train = FileDataset(subsets["training"], readers, train=True, name=name)
            val = FileDataset(subsets["validation"], readers, train=False, name=name)
        elif "testing" in subsets or "validation" in subsets:
            test_rows = subsets.get("testing") or subsets["validation"]
            train, val = split_train_val(subsets["training"], readers, val_fraction, seed,
                                         name)
        else:
            raise DataError(f"{root / 'annotations.json'} has neither a 'testing' nor a "
                            "'validation' subset")
        info = DatasetInfo(name, {"audio": InputSpec("spectrogram", tuple(first.shape)),
                                  "visual": InputSpec("frames", (3, frames, size, size))},
                           len(classes), tuple(classes), uint8_norm={"visual": IMAGENET_NORM})
        return Splits(info, train, val, FileDataset(test_rows, readers, train=False, name=name))
    return load
