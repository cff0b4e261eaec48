"""The input path: clips per second of one loader process (1 thread, no workers), fastbml
against an authors-equivalent loader, and the device-side cost of the normalisation.

Kinetics: generated 340x256 JPEG frames (10 per video) in both layouts (HDF5, frame folders),
3 frames at 112 (T-PAMI) and 224, training augmentation (random resized crop, scale 0.25-1,
flip), one batch of 64 clips per timed call, collate included:

* `original` (authors-equivalent): Pillow decode, Pillow crop / flip / bilinear resize, float
  conversion and ImageNet normalisation per clip, float32 collate;
* `fastbml`: the dataset's visual reader (simplejpeg decode with DCT scaling, uint8 crop / resize /
  flip), uint8 collate; the normalisation runs later on the training device (`normalize`);
* `fastbml gpu_decode`: the loader side of `gpu_decode=true` (file reads, crop boxes, JPEG bytes
  collated); the decode runs on the GPU.

CREMA-D: 16 kHz 16-bit WAVs of 2.5 s to the [1, 257, 188] log-spectrogram, fastbml's path before
issue 12 (linear-interpolation resampling, torch.stft) against today's (soxr, scipy.fft); the
correlation of each with a band-limited scipy reference is printed next to it.

    python -m benchmarks.bench_data   # table in benchmarks/results/<device>-data.md
"""

from __future__ import annotations

import copy
import io
import tempfile
import time
import wave
from math import gcd
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import default_collate

from fastbml.data import load_dataset, normalize_uint8
from fastbml.data.encoded import collate
from fastbml.data.io import IMAGENET_MEAN, IMAGENET_NORM, IMAGENET_STD, crop_box, pick_frames

from .harness import ORIGINAL, Case, median, time_case
from .report import device_name, write_table

BATCH = 64
FRAMES = 3
VIDEOS = 64
AUDIO_CLIPS = 32
H100_CLIPS_PER_S = 3500  # AV ResNet-18 step on one H100 at 224, bf16 (issue 12's estimate)
H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3


def _frame(seed: int) -> bytes:
    """A 340x256 JPEG of a smooth scene with texture, about the size of a Kinetics frame."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:256, 0:340]
    phase = g.uniform(0, 6.3, 6)
    waves = [np.sin(x / (13 + 4 * c) + phase[c]) + np.cos(y / (19 - 3 * c) + phase[c + 3])
             for c in range(3)]
    pixels = np.stack(waves, -1) * 55 + 128 + g.normal(0, 6, (256, 340, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_kinetics(root: Path, videos: int = VIDEOS, frames: int = 10) -> Path:
    """A Kinetics-Sounds layout with both frame sources (hdf5/ and frames/)."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    classes = ["a", "b", "c", "d"]
    database = {f"v{i:03d}": {"subset": "training" if i >= 8 else "validation",
                              "label": classes[i % 4]} for i in range(videos)}
    (root / "annotations.json").write_text(json.dumps({"labels": classes, "database": database}))
    for sub in ("audio", "hdf5", "frames"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for k, vid in enumerate(database):
        np.save(root / "audio" / f"{vid}.npy", np.zeros((257, 188), np.float32))
        jpegs = [_frame(k * frames + i) for i in range(frames)]
        with h5py.File(root / "hdf5" / f"{vid}.hdf5", "w") as fh:
            ds = fh.create_dataset("video", (frames,), dtype=h5py.vlen_dtype(np.uint8))
            for i, data in enumerate(jpegs):
                ds[i] = np.frombuffer(data, dtype=np.uint8)
        (root / "frames" / vid).mkdir(exist_ok=True)
        for i, data in enumerate(jpegs):
            (root / "frames" / vid / f"img_{i:05d}.jpg").write_bytes(data)
    return root


def authors_clip(encoded: list[bytes], size: int, box=None) -> torch.Tensor:
    """Authors-equivalent clip: Pillow decode, crop, flip, resize, ToTensor, Normalize ->
    [3, T, size, size] float32. `box` is (x0, y0, w, h, flip), a callable drawing it from the
    first frame's (width, height), or None (no crop: the whole frame resized)."""
    out = []
    for data in encoded:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        if callable(box):
            box = box(*img.size)
        if box is not None:
            x0, y0, cw, ch, flip = box
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
            if flip:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = img.resize((size, size), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        out.append((x - IMAGENET_MEAN) / IMAGENET_STD)
    return torch.stack(out, dim=1)


def _authors_read(root: Path, layout: str, vid: str) -> list[bytes]:
    if layout == "hdf5":
        with h5py.File(root / "hdf5" / f"{vid}.hdf5", "r") as fh:
            data = fh["video"]
            return [bytes(np.asarray(data[i], dtype=np.uint8))
                    for i in pick_frames(len(data), FRAMES)]
    files = sorted((root / "frames" / vid).iterdir())
    return [files[i].read_bytes() for i in pick_frames(len(files), FRAMES)]


def kinetics_cases(root: Path) -> list[Case]:
    cases = []
    for size in (112, 224):
        for layout, name in (("hdf5", "kinetics-sounds"), ("frames", "kinetics-sounds-frames")):
            train = load_dataset(name, root, options={"image_size": size, "frames": FRAMES}).train
            ids = [train.samples[i % len(train)][0] for i in range(BATCH)]
            gen = torch.Generator().manual_seed(0)

            def original(ids=ids, layout=layout, size=size, gen=gen):
                clips = [authors_clip(_authors_read(root, layout, v), size,
                                      lambda w, h: crop_box(w, h, (0.25, 1.0), gen))
                         for v in ids]
                return torch.stack(clips)

            def fastbml(read=train.readers["visual"], ids=ids):
                return default_collate([read(v, True) for v in ids])

            encoded = copy.copy(train.readers["visual"])
            encoded.gpu_decode = True

            def loader_side(read=encoded, ids=ids):
                return collate([({"visual": read(v, True)}, 0) for v in ids])

            shape = (f"Kinetics {layout}, {FRAMES} frames 340x256 -> {size}, train, "
                     f"batch {BATCH}")
            cases += [Case("load_batch", shape, ORIGINAL, original),
                      Case("load_batch", shape, "fastbml", fastbml),
                      Case("load_batch", shape, "fastbml gpu_decode", loader_side)]
    return cases


def _write_wav(path: Path, rate: int = 16000, seconds: float = 2.5, seed: int = 0) -> None:
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    x = sum(np.sin(2 * np.pi * f * t) * 0.05 for f in g.uniform(80, 7000, 10))
    x = (x + g.standard_normal(t.size) * 0.01) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(rate)
        fh.writeframes(np.round(x * 32767).astype(np.int16).tobytes())


def _linear_spectrogram(path: Path) -> torch.Tensor:
    """fastbml's CREMA-D audio before issue 12, as it was: WAV read, linear-interpolation
    resampling, tile, clip, torch.stft, log."""
    with wave.open(str(path), "rb") as fh:
        rate, width, channels = fh.getframerate(), fh.getsampwidth(), fh.getnchannels()
        raw = fh.readframes(fh.getnframes())
    samples = np.frombuffer(raw, dtype={1: np.uint8, 2: np.int16, 4: np.int32}[width])
    samples = samples.astype(np.float32)
    samples /= float(2 ** (8 * width - 1))
    wav = torch.from_numpy(samples.reshape(-1, channels).mean(axis=1))
    n = max(1, round(wav.numel() * 22050 / rate))
    wav = F.interpolate(wav.view(1, 1, -1), size=n, mode="linear", align_corners=False).view(-1)
    length = 3 * 22050
    wav = wav.repeat(-(-length // wav.numel()))[:length].clamp(-1.0, 1.0)
    spec = torch.stft(wav, 512, hop_length=353, window=torch.hann_window(512), center=True,
                      return_complex=True)
    return torch.log(spec.abs() + 1e-7).unsqueeze(0)


def _reference_correlation(path: Path, spec: torch.Tensor) -> float:
    """Correlation with a band-limited reference (scipy polyphase, Kaiser FIR to 91.3% of the
    lower Nyquist frequency, 120 dB down from it) through the same tile / clip / STFT."""
    from scipy.signal import firwin, kaiserord, resample_poly

    from fastbml.data.io import read_wav

    wav, rate = read_wav(path)
    g = gcd(22050, rate)
    up, down = 22050 // g, rate // g
    nyquist = 1.0 / max(up, down)
    taps, beta = kaiserord(120.0, nyquist * 0.087)
    h = firwin(taps | 1, nyquist * (1 + 0.913) / 2, window=("kaiser", beta))
    x = torch.from_numpy(resample_poly(wav.double().numpy(), up, down, window=h)).float()
    x = x.repeat(-(-66150 // x.numel()))[:66150].clamp(-1.0, 1.0)
    ref = torch.log(torch.stft(x, 512, hop_length=353, window=torch.hann_window(512),
                               center=True, return_complex=True).abs() + 1e-7)
    return float(np.corrcoef(spec.flatten().numpy(), ref.flatten().numpy())[0, 1])


def audio_cases(root: Path) -> tuple[list[Case], dict[str, float]]:
    from fastbml.data.io import wav_spectrogram

    paths = []
    for i in range(AUDIO_CLIPS):
        paths.append(root / f"clip{i}.wav")
        _write_wav(paths[-1], seed=i)
    shape = f"CREMA-D WAV 16 kHz 2.5 s -> 1x257x188, {AUDIO_CLIPS} clips"
    corr = {"linear (before)": _reference_correlation(paths[0], _linear_spectrogram(paths[0])),
            "soxr (fastbml)": _reference_correlation(paths[0], wav_spectrogram(paths[0]))}
    return [Case("cremad_audio", shape, ORIGINAL,
                 lambda: [_linear_spectrogram(p) for p in paths]),
            Case("cremad_audio", shape, "fastbml",
                 lambda: [wav_spectrogram(p) for p in paths])], corr


def normalize_cases(device: torch.device) -> list[Case]:
    cases = []
    for size in (112, 224):
        x = torch.randint(0, 256, (BATCH, 3, FRAMES, size, size), dtype=torch.uint8, device=device)
        for dtype in (torch.float32, torch.bfloat16):
            shape = f"uint8 [{BATCH}, 3, {FRAMES}, {size}, {size}] -> {str(dtype)[6:]}"
            cases.append(Case("normalize", shape, "fastbml",
                              lambda x=x, d=dtype: normalize_uint8(x, *IMAGENET_NORM, dtype=d)))
    return cases


def cases(device: torch.device) -> list[Case]:
    """On CUDA the device-side normalisation alone (the loaders run on the CPU: `main`)."""
    if device.type == "cuda":
        return normalize_cases(device)
    root = Path(tempfile.mkdtemp(prefix="fastbml-bench-data-"))
    return (kinetics_cases(make_kinetics(root / "ks")) + audio_cases(root)[0]
            + normalize_cases(device))


def main(rounds: int = 11) -> None:
    """Every case timed in interleaved rounds (a slow spell of the shared machine hits all)."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    root = Path(tempfile.mkdtemp(prefix="fastbml-bench-data-"))
    audio, corr = audio_cases(root)
    all_cases = kinetics_cases(make_kinetics(root / "ks")) + audio + normalize_cases(device)
    samples: dict[tuple[str, str, str], list[float]] = {}
    for r in range(rounds + 1):
        for case in all_cases:
            seconds = time_case(case, device, repeats=1, warmup=0)
            if r >= 1:  # one warm-up round
                samples.setdefault((case.op, case.shape, case.impl), []).extend(seconds)
    times = {key: median(s) for key, s in samples.items()}
    name = device_name(device)
    lines = [f"# Input path on {name}", "",
             f"torch {torch.__version__}, 1 thread, no DataLoader workers (one loader process), "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; median of {rounds} "
             "interleaved rounds. `original`: authors-equivalent loader (Pillow decode, Pillow "
             "crop/resize, float normalisation, float collate); `fastbml`: uint8 to the device.",
             "", "## Kinetics clips per second per loader process", "",
             "| input | original clips/s | fastbml clips/s | × | loader cores per H100 (fastbml) "
             "| gpu_decode: loader-side clips/s | loader cores per H100 (gpu_decode) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for (op, shape, impl), seconds in times.items():
        if op != "load_batch" or impl != ORIGINAL:
            continue
        ours = times[(op, shape, "fastbml")]
        gpu = times[(op, shape, "fastbml gpu_decode")]
        lines.append(f"| {shape} | {BATCH / seconds:.0f} | {BATCH / ours:.0f} | "
                     f"{seconds / ours:.2f} | {H100_CLIPS_PER_S * ours / BATCH:.1f} | "
                     f"{BATCH / gpu:.0f} | {H100_CLIPS_PER_S * gpu / BATCH:.1f} |")
    lines += ["", f"Loader cores per H100: {H100_CLIPS_PER_S} clips/s (an AV ResNet-18 step at "
              "224, bf16, by estimate) over one process's clips/s; the `original` loader needs "
              + ", ".join(f"{H100_CLIPS_PER_S * s / BATCH:.0f}" for (op, _, impl), s in
                          times.items() if op == "load_batch" and impl == ORIGINAL)
              + " in the same row order. gpu_decode: the loader only reads the files and draws "
              "the crops; decoding, cropping and resizing run on the GPU (not measured here: "
              "no GPU on this machine).", "",
              "## CREMA-D audio (per clip)", "",
              "| resampler | ms per clip | correlation with the band-limited reference |",
              "|---|---:|---:|"]
    for impl, label in ((ORIGINAL, "linear (before)"), ("fastbml", "soxr (fastbml)")):
        key = next(k for k in times if k[0] == "cremad_audio" and k[2] == impl)
        lines.append(f"| {label} | {times[key] * 1e3 / AUDIO_CLIPS:.2f} | {corr[label]:.4f} |")
    lines += ["", "## Device-side normalisation per batch", "",
              "| batch | measured ms on this CPU (1 thread) "
              "| H100 estimate ms (bytes / 3.35 TB/s) |",
              "|---|---:|---:|"]
    for (op, shape, _), seconds in times.items():
        if op != "normalize":
            continue
        size = int(shape.split(", ")[3].rstrip("]"))
        out_bytes = 4 if shape.endswith("float32") else 2
        moved = BATCH * 3 * FRAMES * size * size * (1 + out_bytes)
        lines.append(f"| {shape} | {seconds * 1e3:.2f} | {moved / H100_BANDWIDTH * 1e3:.3f} |")
    table = "\n".join(lines) + "\n"
    write_table(f"{name}-data.md", table)


if __name__ == "__main__":
    main()
