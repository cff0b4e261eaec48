"""`synthetic`: a generated two-modality classification task with a fast and a slow modality.

Nothing is downloaded; every split is a pure function of the seed. The two modalities carry
independent, moderately informative evidence about the class (so together they beat either
alone) but differ in how fast an encoder learns them (docs/methods.md#reference-presets):

* "audio" (fast): class mean + Gaussian noise, linearly separable up to the noise;
* "visual" (slow): a class-dependent latent + noise, pushed through a fixed random mixing and a
  periodic nonlinearity, so the class structure must be untangled by depth and time.

Under joint training the fast modality drives the loss down first and the slow encoder stays
under-trained: the phenomenon OGM-GE, OPM and D&R address. `layout="vector"` gives [D] vectors
(MLP encoders); `layout="av"` renders the same samples as a [1, F, T] spectrogram and
[3, T, H, W] frames through fixed random linear maps, for the ResNet-18 pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import InputSpec
from .base import DatasetInfo, Splits, TensorDataset

LAYOUTS = ("vector", "av")


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and difficulty of the generated task; the defaults are what the demo uses."""

    num_classes: int = 10
    dim: int = 64
    latent_dim: int = 8
    n_train: int = 2000
    n_val: int = 1000
    n_test: int = 4000
    fast_noise: float = 3.0      # std of the fast modality's noise around unit-variance class means
    slow_noise: float = 0.45     # std of the slow modality's latent noise
    slow_frequency: float = 4.0  # frequency of the slow modality's periodic nonlinearity
    layout: str = "vector"
    spectrogram_size: int = 32   # av layout: spectrogram is [1, size, size]
    frame_size: int = 16         # av layout: frames are [3, frames, size, size]
    frames: int = 2

    def __post_init__(self):
        for name in ("num_classes", "dim", "latent_dim", "n_train", "n_val", "n_test",
                     "spectrogram_size", "frame_size", "frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        for name in ("fast_noise", "slow_noise", "slow_frequency"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")


class _Task:
    """The fixed parameters of one task (class means, mixing, renderers), drawn from the seed."""

    def __init__(self, cfg: SyntheticConfig, gen: torch.Generator):
        c, d, k = cfg.num_classes, cfg.dim, cfg.latent_dim
        self.cfg = cfg
        self.fast_means = torch.randn(c, d, generator=gen)
        self.slow_means = torch.randn(c, k, generator=gen)
        self.mixing = torch.randn(k, d, generator=gen) / k ** 0.5
        self.phase = torch.rand(d, generator=gen) * 2 * torch.pi
        n_spec = cfg.spectrogram_size ** 2
        n_frames = 3 * cfg.frames * cfg.frame_size ** 2
        self.render_audio = torch.randn(d, n_spec, generator=gen) / d ** 0.5
        self.render_visual = torch.randn(d, n_frames, generator=gen) / d ** 0.5

    def sample(self, n: int, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        cfg = self.cfg
        labels = torch.randint(0, cfg.num_classes, (n,), generator=gen)
        fast = self.fast_means[labels] + cfg.fast_noise * torch.randn(n, cfg.dim, generator=gen)
        latent = self.slow_means[labels] + cfg.slow_noise * torch.randn(n, cfg.latent_dim,
                                                                       generator=gen)
        slow = torch.sin(cfg.slow_frequency * latent @ self.mixing + self.phase)
        slow = (slow - slow.mean(0)) / slow.std(0).clamp_min(1e-6)
        if cfg.layout == "vector":
            return {"audio": fast, "visual": slow}, labels
        s, f = cfg.spectrogram_size, cfg.frame_size
        audio = (fast @ self.render_audio).view(n, 1, s, s)
        visual = (slow @ self.render_visual).view(n, 3, cfg.frames, f, f)
        return {"audio": audio, "visual": visual}, labels


def synthetic_info(cfg: SyntheticConfig) -> DatasetInfo:
    if cfg.layout == "vector":
        inputs = {"audio": InputSpec("vector", (cfg.dim,)), "visual": InputSpec("vector", (cfg.dim,))}
    else:
        s, f = cfg.spectrogram_size, cfg.frame_size
        inputs = {"audio": InputSpec("spectrogram", (1, s, s)),
                  "visual": InputSpec("frames", (3, cfg.frames, f, f))}
    return DatasetInfo("synthetic", inputs, cfg.num_classes)


def make_synthetic(seed: int = 0, config: SyntheticConfig | None = None) -> Splits:
    """Train / val / test splits of the task drawn from `seed` (val doubles as D&R's held-out split)."""
    cfg = config or SyntheticConfig()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    gen = torch.Generator().manual_seed(seed)
    task = _Task(cfg, gen)
    parts = [TensorDataset(*task.sample(n, gen)) for n in (cfg.n_train, cfg.n_val, cfg.n_test)]
    return Splits(synthetic_info(cfg), *parts)
