"""File readers and transforms shared by the real datasets; every failure names the file.

Written without torchvision / librosa: WAV through the standard library, JPEG/PNG through
Pillow, spectrograms with torch.stft.
"""

from __future__ import annotations

import io
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from . import safe_pickle
from .base import DataError, require_file

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def read_wav(path: Path) -> tuple[torch.Tensor, int]:
    """Mono float waveform in [-1, 1] and its sample rate, from an integer-PCM WAV file."""
    try:
        with wave.open(str(require_file(path, "audio file")), "rb") as fh:
            rate, width, channels = fh.getframerate(), fh.getsampwidth(), fh.getnchannels()
            raw = fh.readframes(fh.getnframes())
    except (wave.Error, EOFError) as exc:
        raise DataError(f"unreadable WAV file {path}: {exc}") from exc
    dtypes = {1: np.uint8, 2: np.int16, 4: np.int32}
    if width not in dtypes:
        raise DataError(f"unsupported WAV sample width {width} bytes in {path}")
    samples = np.frombuffer(raw, dtype=dtypes[width]).astype(np.float32)
    if width == 1:
        samples = samples - 128.0
    samples /= float(2 ** (8 * width - 1))
    if samples.size == 0:
        raise DataError(f"empty WAV file {path}")
    wav = torch.from_numpy(samples.reshape(-1, channels).mean(axis=1))
    return wav, rate


def resample(wav: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """Linear-interpolation resampling (adequate for log-spectrogram inputs)."""
    if rate == target:
        return wav
    n = max(1, round(wav.numel() * target / rate))
    return F.interpolate(wav.view(1, 1, -1), size=n, mode="linear", align_corners=False).view(-1)


def wav_spectrogram(path: Path, *, sample_rate: int = 22050, seconds: float = 3.0,
                    n_fft: int = 512, hop: int = 353) -> torch.Tensor:
    """The OGM-GE CREMA-D audio input: resample, tile to `seconds`, clip to [-1, 1],
    log(|STFT| + 1e-7) with a Hann window -> [1, n_fft/2 + 1, frames] (257 x 188 by default)."""
    wav, rate = read_wav(path)
    wav = resample(wav, rate, sample_rate)
    length = int(sample_rate * seconds)
    wav = wav.repeat(-(-length // wav.numel()))[:length].clamp(-1.0, 1.0)
    spec = torch.stft(wav, n_fft, hop_length=hop, window=torch.hann_window(n_fft),
                      center=True, return_complex=True)
    return torch.log(spec.abs() + 1e-7).unsqueeze(0)


def load_array(path: Path, what: str) -> np.ndarray:
    """A numeric array from .npy or a pickle of one array (the journal code's spectrograms)."""
    require_file(path, what)
    try:
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            with open(path, "rb") as fh:
                array = np.asarray(safe_pickle.load(fh))
    except Exception as exc:  # any unpickling / format error: report the file
        raise DataError(f"unreadable {what} {path}: {exc}") from exc
    if array.dtype.kind not in "fiu" or array.ndim < 2:
        raise DataError(f"{what} {path} must hold a 2-D numeric array, got dtype {array.dtype} "
                        f"shape {array.shape}")
    return array


def fit_spectrogram(array: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """[F, T] array -> [1, F, T'] float tensor, time axis cropped or zero-padded to shape[1]."""
    spec = torch.as_tensor(np.asarray(array, dtype=np.float32)).reshape(-1, array.shape[-1])
    freq, frames = shape
    if spec.shape[0] != freq:
        raise DataError(f"spectrogram has {spec.shape[0]} frequency bins, expected {freq}")
    return F.pad(spec[:, :frames], (0, max(0, frames - spec.shape[1]))).unsqueeze(0)


def decode_image(data: bytes | Path, name: str, mode: str = "RGB"):
    """A PIL image from a path or encoded bytes (`name` identifies it in errors)."""
    from PIL import Image, UnidentifiedImageError

    try:
        source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else Path(data)
        with Image.open(source) as img:
            return img.convert(mode)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"unreadable image {name}: {exc}") from exc


def pick_frames(n: int, count: int) -> list[int]:
    """`count` evenly spaced indices over n frames (first, ..., last); repeats when n < count."""
    if n < 1:
        raise ValueError("no frames to pick from")
    if count == 1:
        return [0]
    return [round(i * (n - 1) / (count - 1)) for i in range(count)]


def image_tensor(img, size: int, *, train: bool, crop_scale: tuple[float, float] = (0.08, 1.0),
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """[C, size, size] float tensor in [0, 1]: a random resized crop + horizontal flip when
    training, a plain resize otherwise."""
    from PIL import Image

    if train:
        w, h = img.size
        area = w * h * float(torch.empty(()).uniform_(*crop_scale, generator=generator))
        ratio = float(torch.exp(torch.empty(()).uniform_(np.log(3 / 4), np.log(4 / 3),
                                                          generator=generator)))
        cw = int(min(w, max(1, round((area * ratio) ** 0.5))))
        ch = int(min(h, max(1, round((area / ratio) ** 0.5))))
        x0 = int(torch.randint(0, w - cw + 1, (), generator=generator))
        y0 = int(torch.randint(0, h - ch + 1, (), generator=generator))
        img = img.crop((x0, y0, x0 + cw, y0 + ch))
        if bool(torch.rand((), generator=generator) < 0.5):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(img, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def rgb_clip(images: Sequence, size: int, *, train: bool,
             crop_scale: tuple[float, float] = (0.08, 1.0)) -> torch.Tensor:
    """[3, T, size, size] ImageNet-normalised clip; one crop/flip shared by all T frames."""
    seed = int(torch.randint(0, 2 ** 62, ())) if train else 0
    frames = [image_tensor(img, size, train=train, crop_scale=crop_scale,
                           generator=torch.Generator().manual_seed(seed)) for img in images]
    return torch.stack([(f - IMAGENET_MEAN) / IMAGENET_STD for f in frames], dim=1)


def flow_clip(pairs: Sequence, size: int, *, train: bool) -> torch.Tensor:
    """[2, T, size, size] optical-flow clip from (x, y) grayscale image pairs, centred at 0."""
    seed = int(torch.randint(0, 2 ** 62, ())) if train else 0
    frames = []
    for fx, fy in pairs:
        gen_x = torch.Generator().manual_seed(seed)
        gen_y = torch.Generator().manual_seed(seed)
        x = image_tensor(fx, size, train=train, generator=gen_x)
        y = image_tensor(fy, size, train=train, generator=gen_y)
        frames.append(torch.cat([x, y]) * 2.0 - 1.0)
    return torch.stack(frames, dim=1)


class FrameFolder:
    """Reads `frames` evenly spaced images of <root>/<sub>/<id>/ as an RGB clip."""

    def __init__(self, root: Path, frames: int, size: int,
                 crop_scale: tuple[float, float] = (0.08, 1.0)):
        self.root, self.frames, self.size, self.crop_scale = root, frames, size, crop_scale

    def __call__(self, clip_id: str, train: bool) -> torch.Tensor:
        folder = self.root / clip_id
        if not folder.is_dir():
            raise DataError(f"missing frame folder: {folder}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise DataError(f"no frames ({'/'.join(IMAGE_EXTS)}) in {folder}")
        picked = [files[i] for i in pick_frames(len(files), self.frames)]
        return rgb_clip([decode_image(p, str(p)) for p in picked], self.size, train=train,
                        crop_scale=self.crop_scale)
