"""Decoding frames on the training device (nvjpeg through torchvision) instead of in the loader.

With the dataset option `gpu_decode=true` a frame reader returns an `EncodedClip`: the clip's
JPEG bytes and its crop boxes (drawn in the loader exactly as for CPU decoding), and no pixels.
`collate` keeps a batch of them as an `EncodedBatch`; `prepare_batch` decodes it on the device
(`decode_batch`), crops, normalises, resizes (antialiased bilinear, in float) and flips there.
The loader then only reads files: its cost per clip is the HDF5 / file read.

Needs a torchvision build matching the installed torch, with CUDA (`gpu_decode_available`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.utils.data import default_collate

from .base import DataError

Box = tuple[int, int, int, int, bool]  # x0, y0, width, height, flip


@dataclass
class EncodedClip:
    """T encoded frames (`names` identify them in errors), the crop box of each and the output
    size; decoded later by `decode_batch`."""

    frames: list[bytes]
    names: list[str]
    boxes: list[Box]
    size: int
    gray: bool = False


class EncodedBatch(list):
    """The EncodedClips of one batch (what `collate` makes of them)."""


def collate(batch: Sequence[tuple[dict, int]]) -> tuple[dict, torch.Tensor]:
    """default_collate for (inputs dict, label) items, except that EncodedClip values are kept
    as an EncodedBatch (their frames have different byte lengths)."""
    inputs = [item[0] for item in batch]
    out = {}
    for m in inputs[0]:
        values = [x[m] for x in inputs]
        out[m] = (EncodedBatch(values) if isinstance(values[0], EncodedClip)
                  else default_collate(values))
    return out, default_collate([item[1] for item in batch])


def gpu_decode_available() -> str | None:
    """None when torchvision can decode JPEGs on CUDA here, else the reason it cannot."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        import torchvision
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        return f"torchvision with decode_jpeg cannot be imported ({type(exc).__name__}: {exc})"
    version = tuple(int(p) for p in torchvision.__version__.split("+")[0].split(".")[:2])
    if version < (0, 19):
        return f"torchvision {torchvision.__version__} has no batched GPU decode (0.19+)"
    return None


def _torchvision_decode(frames: list[torch.Tensor], gray: bool,
                        device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if gray else ImageReadMode.RGB
    return list(decode_jpeg(frames, mode=mode, device=device))


Decoder = Callable[[list[torch.Tensor], bool, torch.device], list[torch.Tensor]]


def decode_batch(batch: EncodedBatch, mean: Sequence[float], std: Sequence[float],
                 device: torch.device | str, dtype: torch.dtype = torch.float32,
                 decode: Decoder | None = None) -> torch.Tensor:
    """[B, C, T, size, size] normalised `dtype` clips of an EncodedBatch, decoded on `device`
    (torchvision's nvjpeg by default; `decode(frames, gray, device) -> [C, H, W] uint8 list` to
    substitute). Crop, then (x / 255 - mean) / std in float32, then antialiased bilinear
    resize, then flip: the same linear steps as the uint8 path without its rounding."""
    device = torch.device(device)
    decode = decode or _torchvision_decode
    clips = list(batch)
    if not clips:
        raise ValueError("decode_batch: an empty batch")
    gray = clips[0].gray
    flat = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for c in clips for f in c.frames]
    try:
        images = decode(flat, gray, device)
    except Exception:  # find the frame that fails, to name it
        names = [n for c in clips for n in c.names]
        for data, name in zip(flat, names):
            try:
                decode([data], gray, device)
            except Exception as exc:
                raise DataError(f"unreadable image {name}: {exc}") from exc
        raise
    channels = images[0].shape[0]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"decode_batch: {channels}-channel frames but {len(mean)} means and "
                         f"{len(std)} stds")
    std_t = torch.tensor(std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std_t)).view(-1, 1, 1).to(device)
    shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(-1, 1, 1).to(device)
    out, k = [], 0
    for clip in clips:
        frames = []
        for x0, y0, cw, ch, flip in clip.boxes:
            crop = images[k][:, y0:y0 + ch, x0:x0 + cw].to(torch.float32) * scale + shift
            k += 1
            frame = F.interpolate(crop[None], size=(clip.size, clip.size), mode="bilinear",
                                  antialias=True, align_corners=False)[0]
            frames.append(frame.flip(-1) if flip else frame)
        out.append(torch.stack(frames, dim=1))
    return torch.stack(out).to(dtype)


def encoded_clip(sources: Sequence[bytes], names: Sequence[str], boxes: Sequence[Box],
                 size: int, gray: bool = False) -> EncodedClip:
    """An EncodedClip, checking that every frame is a JPEG (nvjpeg decodes nothing else)."""
    for data, name in zip(sources, names):
        if bytes(data[:2]) != b"\xff\xd8":
            raise DataError(f"gpu_decode: {name} is not a JPEG (nvjpeg decodes JPEG only); use "
                            "CPU decoding for this dataset")
    return EncodedClip([bytes(s) for s in sources], list(names), list(boxes), size, gray)


def decode_options(options: dict) -> dict:
    """Pops the frame-decoding dataset options (`dct_scaling`, `decoder`, `gpu_decode`) from
    `options`; gpu_decode is refused where torchvision cannot decode on CUDA."""
    decode = {"dct_scaling": bool(options.pop("dct_scaling", True)),
              "decoder": str(options.pop("decoder", "auto")),
              "gpu_decode": bool(options.pop("gpu_decode", False))}
    if decode["gpu_decode"]:
        reason = gpu_decode_available()
        if reason is not None:
            raise ValueError(f"dataset option gpu_decode=true needs torchvision's CUDA JPEG "
                             f"decoder: {reason}")
    return decode
