"""File readers and transforms shared by the real datasets; every failure names the file.

Written without torchvision / librosa: WAV through the standard library, JPEG through
simplejpeg (libjpeg-turbo; Pillow when it is missing or for PNG), resizing with torch's uint8
antialiased bilinear kernel, spectrograms with torch.stft. Frame clips stay uint8 up to the
training device (`batch.normalize_uint8`).
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
from .encoded import EncodedClip, encoded_clip

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # (mean, std) of uint8 RGB clips
FLOW_NORM = ((0.5, 0.5), (0.5, 0.5))                            # flow x, y -> [-1, 1]


def read_wav(path: Path) -> tuple[torch.Tensor, int]:
    """Mono float waveform in [-1, 1] and its sample rate, from an integer-PCM WAV file."""
    try:
        with wave.open(str(require_file(path, "audio file")), "rb") as fh:
            rate, width, channels = fh.getframerate(), fh.getsampwidth(), fh.getnchannels()
            raw = fh.readframes(fh.getnframes())
    except (wave.Error, EOFError) as exc:
        raise DataError(f"unreadable WAV file {path}: {exc}") from exc
    dtypes = {1: np.uint8, 2: np.int16, 3: np.int32, 4: np.int32}
    if width not in dtypes:
        raise DataError(f"unsupported WAV sample width {width} bytes in {path} (8, 16, 24 or "
                        "32-bit integer PCM)")
    if len(raw) % (width * channels):
        raise DataError(f"truncated WAV file {path}: {len(raw)} bytes of sample data is not a "
                        f"whole number of {width * channels}-byte frames")
    if width == 3:  # little-endian 24-bit: widen to int32 (sign from the top byte)
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        samples = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8).astype(np.float32)
    else:
        samples = np.frombuffer(raw, dtype=dtypes[width]).astype(np.float32)
    if width == 1:
        samples -= 128.0
    samples *= np.float32(1.0 / 2 ** (8 * width - 1))
    if samples.size == 0:
        raise DataError(f"empty WAV file {path}")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return torch.from_numpy(samples), rate


def resample(wav: torch.Tensor, rate: int, target: int) -> torch.Tensor:
    """Band-limited resampling with soxr at its "HQ" quality (what `librosa.load(sr=...)` does by
    default): nothing above the lower rate's Nyquist frequency is imaged into the output."""
    if rate == target:
        return wav
    import soxr

    out = soxr.resample(wav.numpy().astype(np.float32, copy=False), rate, target, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


def wav_spectrogram(path: Path, *, sample_rate: int = 22050, seconds: float = 3.0,
                    n_fft: int = 512, hop: int = 353) -> torch.Tensor:
    """The OGM-GE CREMA-D audio input (`librosa.load(sr=22050)`, `np.tile` to `seconds`, clip to
    [-1, 1], `librosa.stft(n_fft=512, hop_length=353)`, log(|S| + 1e-7)): band-limited
    resampling, Hann window, centred frames -> [1, n_fft/2 + 1, frames] (257 x 188 by default)."""
    import scipy.fft
    from numpy.lib.stride_tricks import sliding_window_view

    wav, rate = read_wav(path)
    wav = resample(wav, rate, sample_rate).numpy()
    length = int(sample_rate * seconds)
    wav = np.tile(wav, -(-length // wav.size))[:length]
    np.clip(wav, -1.0, 1.0, out=wav)
    padded = np.pad(wav, n_fft // 2, mode="reflect")            # centred frames
    frames = sliding_window_view(padded, n_fft)[::hop] * _hann(n_fft)
    spec = np.abs(scipy.fft.rfft(frames, axis=1)).T            # float32 throughout
    return torch.from_numpy(np.log(spec + np.float32(1e-7))).unsqueeze(0)


def _hann(n: int) -> np.ndarray:
    """The periodic Hann window (librosa's and torch.hann_window's), float32."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


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


def pick_frames(n: int, count: int) -> list[int]:
    """`count` evenly spaced indices over n frames (first, ..., last), rounded down (T-PAMI's
    first / int((n - 1) / 2) / last for 3); repeats when n < count."""
    if n < 1:
        raise ValueError("no frames to pick from")
    if count == 1:
        return [0]
    return [i * (n - 1) // (count - 1) for i in range(count)]


def crop_box(width: int, height: int, crop_scale: tuple[float, float] = (0.08, 1.0),
             generator: torch.Generator | None = None) -> tuple[int, int, int, int, bool]:
    """A random resized crop (x0, y0, crop width, crop height) of a width x height image and
    whether to flip it: area uniform in `crop_scale`, log aspect ratio uniform in [3/4, 4/3]."""
    area = width * height * float(torch.empty(()).uniform_(*crop_scale, generator=generator))
    ratio = float(torch.exp(torch.empty(()).uniform_(np.log(3 / 4), np.log(4 / 3),
                                                      generator=generator)))
    cw = int(min(width, max(1, round((area * ratio) ** 0.5))))
    ch = int(min(height, max(1, round((area / ratio) ** 0.5))))
    x0 = int(torch.randint(0, width - cw + 1, (), generator=generator))
    y0 = int(torch.randint(0, height - ch + 1, (), generator=generator))
    return x0, y0, cw, ch, bool(torch.rand((), generator=generator) < 0.5)


DECODERS = ("auto", "simplejpeg", "pillow")
EVAL_CROPS = ("resize", "center")


def center_box(width: int, height: int) -> tuple[int, int, int, int, bool]:
    """The centred square of side min(width, height), not flipped."""
    side = min(width, height)
    return round((width - side) / 2), round((height - side) / 2), side, side, False


def _simplejpeg():
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def _encoded(source: bytes | Path, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise DataError(f"unreadable image {name}: {exc}") from exc


def decode_crop(data: bytes, name: str, box: tuple[int, int, int, int] | None, size: int, *,
                gray: bool = False, dct_scaling: bool = True,
                decoder: str = "auto") -> np.ndarray:
    """The region `box` (x0, y0, w, h; None: the whole image) of an encoded image as an
    [H, W, C] uint8 array, decoded at reduced size by libjpeg's DCT scaling (1/2, 1/4, 1/8)
    where the region stays at least `size` x `size` pixels."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    sj = _simplejpeg() if decoder != "pillow" else None
    if decoder == "simplejpeg" and sj is None:
        raise ValueError("decoder 'simplejpeg' requested but simplejpeg is not installed")
    jpeg = data[:2] == b"\xff\xd8"
    try:
        if sj is not None and jpeg:
            height, width = sj.decode_jpeg_header(data)[:2]
        else:
            from PIL import Image

            img = Image.open(io.BytesIO(data))
            width, height = img.size
        x0, y0, cw, ch = box if box is not None else (0, 0, width, height)
        # the largest reduction that keeps the region >= size x size
        need_w, need_h = -(-width * size // cw), -(-height * size // ch)
        scale = dct_scaling and jpeg and min(width / need_w, height / need_h) >= 2
        if sj is not None and jpeg:
            kwargs = {"min_width": need_w, "min_height": need_h, "min_factor": 2} if scale else {}
            array = sj.decode_jpeg(data, colorspace="GRAY" if gray else "RGB", **kwargs)
        else:
            if scale:
                img.draft("L" if gray else "RGB", (need_w, need_h))
            array = np.asarray(img.convert("L" if gray else "RGB"))
    except DataError:
        raise
    except Exception as exc:  # decoders raise ValueError, OSError, SyntaxError, ...: name the file
        raise DataError(f"unreadable image {name}: {exc}") from exc
    if array.ndim == 2:
        array = array[:, :, None]
    sx, sy = array.shape[1] / width, array.shape[0] / height
    if sx != 1 or sy != 1:
        x1, y1 = round((x0 + cw) * sx), round((y0 + ch) * sy)
        x0, y0 = min(round(x0 * sx), x1 - 1), min(round(y0 * sy), y1 - 1)
        cw, ch = x1 - x0, y1 - y0
    return array[y0:y0 + ch, x0:x0 + cw]


def _image_size(data: bytes, name: str) -> tuple[int, int]:
    sj = _simplejpeg()
    try:
        if sj is not None and data[:2] == b"\xff\xd8":
            height, width = sj.decode_jpeg_header(data)[:2]
            return width, height
        from PIL import Image

        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception as exc:  # a header no decoder understands: name the file
        raise DataError(f"unreadable image {name}: {exc}") from exc


def _resize(crops: list[np.ndarray], size: int) -> list[torch.Tensor]:
    """Bilinear (antialiased, as Pillow's) resize of [H, W, C] uint8 crops to [C, size, size];
    crops of one shape are resized together."""
    out: list[torch.Tensor] = [None] * len(crops)  # type: ignore[list-item]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, c in enumerate(crops):
        groups.setdefault(c.shape, []).append(i)
    for shape, idx in groups.items():
        batch = torch.from_numpy(np.stack([crops[i] for i in idx])).permute(0, 3, 1, 2)
        if shape[:2] != (size, size):
            batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True,
                                  align_corners=False)
        for k, i in enumerate(idx):
            out[i] = batch[k]
    return out


def frame_clip(sources: Sequence[bytes | Path], names: Sequence[str], size: int, *,
               train: bool, seed: int = 0, crop_scale: tuple[float, float] = (0.08, 1.0),
               gray: bool = False, dct_scaling: bool = True, decoder: str = "auto",
               eval_crop: str = "resize", encoded: bool = False) -> torch.Tensor | EncodedClip:
    """[C, T, size, size] uint8 clip of T encoded frames: when training one random resized crop
    + horizontal flip, drawn from `seed`, shared by all frames of one size; otherwise the whole
    frame resized (`eval_crop="resize"`) or its centred square (`"center"`: a short-side resize
    and centre crop). Normalisation happens later, on the training device (`normalize_uint8`).
    With `encoded`, nothing is decoded: an EncodedClip (bytes and boxes) for `decode_batch`."""
    if eval_crop not in EVAL_CROPS:
        raise ValueError(f"eval_crop must be one of {EVAL_CROPS}, got {eval_crop!r}")
    if encoded:
        datas = [_encoded(s, n) for s, n in zip(sources, names)]
        sizes = [_image_size(d, n) for d, n in zip(datas, names)]
        draw = {wh: (crop_box(*wh, crop_scale, torch.Generator().manual_seed(seed)) if train
                     else center_box(*wh) if eval_crop == "center" else (0, 0, *wh, False))
                for wh in dict.fromkeys(sizes)}
        return encoded_clip(datas, list(names), [draw[wh] for wh in sizes], size, gray)
    crops, flips = [], []
    boxes: dict[tuple[int, int], tuple[int, int, int, int, bool]] = {}
    for source, name in zip(sources, names):
        data = _encoded(source, name)
        box = None
        if train or eval_crop == "center":
            wh = _image_size(data, name)
            if wh not in boxes:
                boxes[wh] = (crop_box(*wh, crop_scale, torch.Generator().manual_seed(seed))
                             if train else center_box(*wh))
            box = boxes[wh]
        crops.append(decode_crop(data, name, None if box is None else box[:4], size, gray=gray,
                                 dct_scaling=dct_scaling, decoder=decoder))
        flips.append(box is not None and box[4])
    frames = [f.flip(-1) if flip else f for f, flip in zip(_resize(crops, size), flips)]
    return torch.stack(frames, dim=1)


def rgb_clip_uint8(sources: Sequence[bytes | Path], names: Sequence[str], size: int, *,
                   train: bool, crop_scale: tuple[float, float] = (0.08, 1.0),
                   dct_scaling: bool = True, decoder: str = "auto",
                   eval_crop: str = "resize", encoded: bool = False) -> torch.Tensor | EncodedClip:
    """[3, T, size, size] uint8 RGB clip (normalise with IMAGENET_MEAN / IMAGENET_STD), or its
    EncodedClip with `encoded`."""
    seed = int(torch.randint(0, 2 ** 62, ())) if train else 0
    return frame_clip(sources, names, size, train=train, seed=seed, crop_scale=crop_scale,
                      dct_scaling=dct_scaling, decoder=decoder, eval_crop=eval_crop,
                      encoded=encoded)


def flow_clip_uint8(pairs: Sequence[tuple[Path, Path]], size: int, *, train: bool,
                    dct_scaling: bool = True, decoder: str = "auto") -> torch.Tensor:
    """[2, T, size, size] uint8 optical-flow clip from (x, y) grayscale frames, one crop for
    both components (normalise with mean 0.5, std 0.5: values in [-1, 1])."""
    seed = int(torch.randint(0, 2 ** 62, ())) if train else 0
    parts = [frame_clip([p[k] for p in pairs], [str(p[k]) for p in pairs], size, train=train,
                        seed=seed, gray=True, dct_scaling=dct_scaling, decoder=decoder)
             for k in (0, 1)]
    return torch.cat(parts, dim=0)


def check_frame_options(decoder: str, eval_crop: str) -> None:
    """The frame readers' `decoder` and `eval_crop` options, checked by name."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if eval_crop not in EVAL_CROPS:
        raise ValueError(f"eval_crop must be one of {EVAL_CROPS}, got {eval_crop!r}")


class FrameFolder:
    """Reads `frames` evenly spaced images of <root>/<id>/ as a [3, T, size, size] uint8 clip."""

    def __init__(self, root: Path, frames: int, size: int,
                 crop_scale: tuple[float, float] = (0.08, 1.0), *, dct_scaling: bool = True,
                 decoder: str = "auto", eval_crop: str = "resize", gpu_decode: bool = False):
        check_frame_options(decoder, eval_crop)
        self.root, self.frames, self.size, self.crop_scale = root, frames, size, crop_scale
        self.dct_scaling, self.decoder, self.eval_crop = dct_scaling, decoder, eval_crop
        self.gpu_decode = gpu_decode

    def __call__(self, clip_id: str, train: bool) -> torch.Tensor:
        folder = self.root / clip_id
        if not folder.is_dir():
            raise DataError(f"missing frame folder: {folder}")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise DataError(f"no frames ({'/'.join(IMAGE_EXTS)}) in {folder}")
        picked = [files[i] for i in pick_frames(len(files), self.frames)]
        return rgb_clip_uint8(picked, [str(p) for p in picked], self.size, train=train,
                              crop_scale=self.crop_scale, dct_scaling=self.dct_scaling,
                              decoder=self.decoder, eval_crop=self.eval_crop,
                              encoded=self.gpu_decode)
