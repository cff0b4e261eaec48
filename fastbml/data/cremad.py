"""CREMA-D (6 emotions; audio + face frames), in the layout of the OGM-GE preprocessing.

    <root>/
      train.csv  test.csv  [val.csv]   rows "clip_id,EMOTION" (NEU HAP SAD FEA DIS ANG), no header
      AudioWAV/<clip_id>.wav           16-bit PCM WAV (the CREMA-D release files), or
      audio_spec/<clip_id>.npy         a precomputed [F, T] spectrogram (used when present)
      Image-01-FPS/<clip_id>/*.jpg     frames extracted at 1 fps, in name order

Audio from WAV follows OGM-GE (`librosa.load(sr=22050)`, tile to 3 s, clip to [-1, 1],
`librosa.stft(n_fft=512, hop_length=353)`, log(|S| + 1e-7)) -> [1, 257, 188], resampled with
soxr at HQ quality, librosa's default resampler (tested against a band-limited reference: the
log-spectrogram's correlation >= 0.99 and no energy imaged above the source's Nyquist
frequency). Visual: `frames` evenly spaced frames in name order (1 in OGM-GE, 2 in D&R) as a
[3, frames, size, size] uint8 clip, random resized crop (scale 0.08-1) + flip when training, a
plain resize to size x size otherwise (OGM-GE's `Resize((224, 224))`), normalised (ImageNet) on
the training device. Without val.csv, val (model selection and D&R's held-out split) is carved
from train, stratified, `val_fraction` of it (D&R: 744 of 6,698, about 0.111).

Against the OGM-GE code: the STFT centre-pads by reflection (librosa 0.8's default; current
librosa pads with zeros, which changes the first and last frame only); clips shorter than 1 s
are tiled to the full 3 s (`np.tile(x, 3)` leaves them shorter; CREMA-D has none); the
visual frame is the first in name order (OGM-GE takes the first in `os.listdir` order, which
depends on the file system); the random crop draws once and clamps (torchvision retries).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..models import InputSpec
from .base import DataError, DatasetInfo, FileDataset, Splits, read_lines, split_train_val
from .encoded import decode_options
from .io import IMAGENET_NORM, FrameFolder, fit_spectrogram, load_array, wav_spectrogram

EMOTIONS = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
FRAME_DIR = "Image-01-FPS"


def read_split_csv(path: Path, classes: tuple[str, ...]) -> list[tuple[str, int]]:
    """(clip_id, label index) rows of a CREMA-D split CSV."""
    rows = []
    for n, line in enumerate(read_lines(path, "CREMA-D split CSV"), 1):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or parts[1] not in classes:
            raise DataError(f"{path} line {n}: expected 'clip_id,EMOTION' with EMOTION in "
                            f"{classes}, got {line!r}")
        rows.append((parts[0], classes.index(parts[1])))
    if not rows:
        raise DataError(f"{path} lists no clips")
    return rows


class CremadAudio:
    """Reads a clip's audio: audio_spec/<id>.npy if present, else AudioWAV/<id>.wav."""

    def __init__(self, root: Path, shape: tuple[int, int] | None = None):
        self.root, self.shape = root, shape

    def __call__(self, clip_id: str, train: bool) -> torch.Tensor:
        spec_path = self.root / "audio_spec" / f"{clip_id}.npy"
        if spec_path.is_file():
            array = load_array(spec_path, "CREMA-D spectrogram")
            return fit_spectrogram(array, self.shape or array.shape[-2:])
        return wav_spectrogram(self.root / "AudioWAV" / f"{clip_id}.wav")


def load_cremad(root: Path, seed: int, options: dict) -> Splits:
    """CREMA-D splits; options: frames (1), image_size (224), val_fraction (0.111)."""
    frames = int(options.pop("frames", 1))
    size = int(options.pop("image_size", 224))
    val_fraction = float(options.pop("val_fraction", 744 / 6698))
    decode = decode_options(options)
    if options:
        raise ValueError(f"unknown CREMA-D options: {sorted(options)}")
    train_rows = read_split_csv(root / "train.csv", EMOTIONS)
    test_rows = read_split_csv(root / "test.csv", EMOTIONS)
    audio = CremadAudio(root)
    first_audio = audio(train_rows[0][0], False)
    audio.shape = tuple(first_audio.shape[1:])
    readers = {"audio": audio, "visual": FrameFolder(root / FRAME_DIR, frames, size, **decode)}
    if (root / "val.csv").is_file():
        train = FileDataset(train_rows, readers, train=True, name="cremad")
        val = FileDataset(read_split_csv(root / "val.csv", EMOTIONS), readers, train=False,
                          name="cremad")
    else:
        train, val = split_train_val(train_rows, readers, val_fraction, seed, "cremad")
    info = DatasetInfo("cremad", {"audio": InputSpec("spectrogram", tuple(first_audio.shape)),
                                  "visual": InputSpec("frames", (3, frames, size, size))},
                       len(EMOTIONS), EMOTIONS, uint8_norm={"visual": IMAGENET_NORM})
    return Splits(info, train, val, FileDataset(test_rows, readers, train=False, name="cremad"))
