"""UCF-101 (101 actions; RGB + optical flow), in the TSN / denseflow frame layout.

    <root>/
      classInd.txt                  "1 ApplyEyeMakeup" per line (1-based indices)
      trainlist0{1,2,3}.txt         "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1" per line
      testlist0{1,2,3}.txt          "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi" per line
      rgb/<video>/img_00001.jpg ...              RGB frames (video = v_ApplyEyeMakeup_g08_c01)
      flow/<video>/flow_x_00001.jpg, flow_y_00001.jpg ...   grayscale flow components

Modalities "rgb" -> [3, frames, size, size] and "flow" -> [2, frames, size, size], both uint8
from the loader and normalised on the training device (rgb: ImageNet; flow: x and y to [-1, 1]);
`frames` evenly spaced (default 3), the same indices for both, random resized crop + flip when
training (one crop for x and y), a plain resize otherwise. `split` picks the official split
(1-3); val is carved from its train list (`val_fraction`). Decoding as for Kinetics
(simplejpeg, DCT scaling; `dct_scaling`, `decoder` options). No authors' UCF-101 loader is
reproduced here: the layout and transforms are the TSN convention, not checked against one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models import InputSpec
from .base import DataError, DatasetInfo, FileDataset, Splits, read_lines, split_train_val
from .encoded import decode_options
from .io import DECODERS, FLOW_NORM, IMAGENET_NORM, FrameFolder, flow_clip_uint8, pick_frames


def read_class_index(path: Path) -> list[str]:
    names = {}
    for n, line in enumerate(read_lines(path, "UCF-101 class index"), 1):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{path} line {n}: expected '<index> <ClassName>', got {line!r}")
        names[int(parts[0])] = parts[1]
    if not names:
        raise DataError(f"{path} lists no classes")
    if sorted(names) != list(range(1, len(names) + 1)):
        raise DataError(f"{path}: class indices must run 1..{len(names)}")
    return [names[i] for i in range(1, len(names) + 1)]


def read_split_list(path: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(video, label) rows of a train/test list; the label comes from the class folder name."""
    rows = []
    for n, line in enumerate(read_lines(path, "UCF-101 split list"), 1):
        entry = line.split()[0]
        class_name, _, filename = entry.partition("/")
        if class_name not in classes or not filename:
            raise DataError(f"{path} line {n}: expected 'ClassName/v_....avi', got {line!r}")
        rows.append((Path(filename).stem, classes.index(class_name)))
    return rows


class FlowFrames:
    """Reads `frames` evenly spaced (flow_x, flow_y) image pairs of flow/<video>/ as a
    [2, T, size, size] uint8 clip."""

    def __init__(self, folder: Path, frames: int, size: int, *, dct_scaling: bool = True,
                 decoder: str = "auto"):
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        self.folder, self.frames, self.size = folder, frames, size
        self.dct_scaling, self.decoder = dct_scaling, decoder

    def __call__(self, video: str, train: bool) -> torch.Tensor:
        folder = self.folder / video
        if not folder.is_dir():
            raise DataError(f"missing flow folder: {folder}")
        xs = sorted(folder.glob("flow_x_*.jpg"))
        if not xs:
            raise DataError(f"no flow_x_*.jpg frames in {folder}")
        pairs = []
        for i in pick_frames(len(xs), self.frames):
            fy = folder / xs[i].name.replace("flow_x_", "flow_y_")
            if not fy.is_file():
                raise DataError(f"missing flow y frame: {fy}")
            pairs.append((xs[i], fy))
        return flow_clip_uint8(pairs, self.size, train=train, dct_scaling=self.dct_scaling,
                               decoder=self.decoder)


def load_ucf101(root: Path, seed: int, options: dict) -> Splits:
    """UCF-101 splits; options: split (1), frames (3), image_size (112), val_fraction (0.1)."""
    split = int(options.pop("split", 1))
    frames = int(options.pop("frames", 3))
    size = int(options.pop("image_size", 112))
    val_fraction = float(options.pop("val_fraction", 0.1))
    decode = decode_options(options)
    gpu = decode.pop("gpu_decode")  # rgb only: flow frames are decoded in the loader
    if options:
        raise ValueError(f"unknown UCF-101 options: {sorted(options)}")
    if split not in (1, 2, 3):
        raise ValueError(f"UCF-101 split must be 1, 2 or 3, got {split}")
    classes = read_class_index(root / "classInd.txt")
    train_rows = read_split_list(root / f"trainlist0{split}.txt", classes)
    test_rows = read_split_list(root / f"testlist0{split}.txt", classes)
    readers = {"rgb": FrameFolder(root / "rgb", frames, size, gpu_decode=gpu, **decode),
               "flow": FlowFrames(root / "flow", frames, size, **decode)}
    train, val = split_train_val(train_rows, readers, val_fraction, seed, "ucf101")
    info = DatasetInfo("ucf101", {"rgb": InputSpec("frames", (3, frames, size, size)),
                                  "flow": InputSpec("flow", (2, frames, size, size))},
                       len(classes), tuple(classes),
                       uint8_norm={"rgb": IMAGENET_NORM, "flow": FLOW_NORM})
    return Splits(info, train, val, FileDataset(test_rows, readers, train=False, name="ucf101"))
