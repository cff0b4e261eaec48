"""CREMA-D's audio input against a band-limited reference of the authors' pipeline
(`librosa.load(sr=22050)`, tile to 3 s, clip, `librosa.stft(n_fft=512, hop_length=353)`,
log(|S| + 1e-7)), computed here with scipy's polyphase resampler and a numpy STFT."""

import wave
from math import gcd

import numpy as np
import pytest
import torch
from scipy.signal import firwin, kaiserord, resample_poly
from torch.nn import functional as F

from fastbml.data import DataError
from fastbml.data.io import read_wav, wav_spectrogram

RATE, N_FFT, HOP, LENGTH = 22050, 512, 353, 3 * 22050


def _write_wav(path, rate, seconds=1.2, seed=0, width=2):
    """Tones across the source's band, white noise and a syllable-like envelope."""
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    freqs = g.uniform(80, 0.9 * min(rate / 2, RATE / 2), 12)
    x = sum(np.sin(2 * np.pi * f * t + g.uniform(0, 6.3)) * g.uniform(0.02, 0.1) for f in freqs)
    x = (x + g.standard_normal(t.size) * 0.01) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    full = 2 ** (8 * width - 1) - 1
    pcm = np.clip(np.round(x * full), -full - 1, full).astype(np.int32)
    raw = (pcm.astype(np.int16).tobytes() if width == 2 else
           np.stack([(pcm >> s) & 0xFF for s in (0, 8, 16)], 1).astype(np.uint8).tobytes())
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(width)
        fh.setframerate(rate)
        fh.writeframes(raw)
    return x


def _band_limited(x, rate, passband=0.913, attenuation=120.0):
    """scipy's polyphase resampler with a Kaiser FIR: flat to `passband` of the lower Nyquist
    frequency, `attenuation` dB down from that Nyquist frequency on."""
    g = gcd(RATE, rate)
    up, down = RATE // g, rate // g
    nyquist = 1.0 / max(up, down)            # the lower Nyquist, relative to the upsampled one
    taps, beta = kaiserord(attenuation, nyquist * (1 - passband))
    h = firwin(taps | 1, nyquist * (1 + passband) / 2, window=("kaiser", beta))
    return resample_poly(x, up, down, window=h)


def _log_stft(x):
    x = np.tile(x, -(-LENGTH // x.size))[:LENGTH].clip(-1, 1)
    padded = np.pad(x, N_FFT // 2, mode="reflect")
    frames = np.stack([padded[i * HOP:i * HOP + N_FFT]
                       for i in range(1 + (padded.size - N_FFT) // HOP)])
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)   # periodic Hann
    return np.log(np.abs(np.fft.rfft(frames * window, axis=1)).T + 1e-7)


def _reference(path):
    wav, rate = read_wav(path)
    x = wav.numpy().astype(np.float64)
    return _log_stft(x if rate == RATE else _band_limited(x, rate)), rate


def _linear(path):
    """The previous implementation: linear-interpolation resampling."""
    wav, rate = read_wav(path)
    n = round(wav.numel() * RATE / rate)
    wav = F.interpolate(wav.view(1, 1, -1), size=n, mode="linear", align_corners=False).view(-1)
    return _log_stft(wav.double().numpy())


def _above_nyquist(spec, rate):
    """Fraction of the spectrogram's energy above the source's Nyquist frequency."""
    power = np.exp(spec) ** 2
    return power[np.arange(power.shape[0]) * RATE / N_FFT > rate / 2].sum() / power.sum()


@pytest.mark.parametrize("rate", [16000, 44100, 22050])
def test_cremad_audio_matches_a_band_limited_reference(tmp_path, rate):
    path = tmp_path / f"clip_{rate}.wav"
    _write_wav(path, rate)
    ours = wav_spectrogram(path)
    assert ours.shape == (1, 257, 188) and ours.dtype == torch.float32
    ours = ours[0].double().numpy()
    reference, _ = _reference(path)
    assert np.corrcoef(ours.ravel(), reference.ravel())[0, 1] >= 0.99
    if rate < RATE:  # nothing imaged above the source's Nyquist frequency
        assert _above_nyquist(ours, rate) <= _above_nyquist(reference, rate) + 1e-5


def test_linear_interpolation_fails_the_reference_check(tmp_path):
    """The check above tells the old input from the authors': linear interpolation images
    energy above 8 kHz from a 16 kHz source."""
    path = tmp_path / "clip.wav"
    _write_wav(path, 16000)
    reference, _ = _reference(path)
    linear = _linear(path)
    assert np.corrcoef(linear.ravel(), reference.ravel())[0, 1] < 0.99
    assert _above_nyquist(linear, 16000) > 100 * _above_nyquist(reference, 16000)


def test_read_wav_widths_and_errors(tmp_path):
    x = _write_wav(tmp_path / "24.wav", 16000, width=3)
    wav, rate = read_wav(tmp_path / "24.wav")
    assert rate == 16000 and wav.dtype == torch.float32
    np.testing.assert_allclose(wav.numpy(), x, atol=2e-7)   # 24-bit: within a quantisation step
    raw = (tmp_path / "24.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(raw[:-1])                # a partial last frame
    with pytest.raises(DataError, match=r"cut\.wav"):
        read_wav(tmp_path / "cut.wav")
    with wave.open(str(tmp_path / "w5.wav"), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(4)
        fh.setframerate(8000)
        fh.writeframes(b"\0" * 40)
    data = bytearray((tmp_path / "w5.wav").read_bytes())
    data[34:36] = (40).to_bytes(2, "little")                   # bits per sample: 40
    data[32:34] = (5).to_bytes(2, "little")                    # block align: 5 bytes
    (tmp_path / "w5.wav").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"sample width .*w5\.wav"):
        read_wav(tmp_path / "w5.wav")
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00")
    with pytest.raises(DataError, match=r"unreadable WAV file .*junk\.wav"):
        read_wav(tmp_path / "junk.wav")
