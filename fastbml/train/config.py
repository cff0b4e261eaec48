"""Training configuration and the presets that reproduce each reference repository
(docs/methods.md#reference-presets)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .._checks import finite_number

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "step")
AMP_MODES = ("none", "bf16", "fp16")
DIST_BACKENDS = ("auto", "nccl", "gloo")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile(mode=...)
ON_NONFINITE = ("stop", "skip")  # what a non-finite training loss does
FSDP_MIXED_PRECISION = ("none", "bf16")  # --fsdp-mixed-precision: FSDP2's MixedPrecisionPolicy
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the autocast dtype of --amp
# The float settings: each must be a finite number in [low, high] (None: unbounded).
_FLOAT_RANGES = (("lr", 0.0, None), ("momentum", 0.0, None), ("weight_decay", 0.0, None),
                 ("gamma", 0.0, None), ("alpha", 0.0, None), ("q_base", 0.0, 1.0),
                 ("opm_lambda", 0.0, None), ("p_exe", 0.0, 1.0), ("dr_lambda", 0.0, None),
                 ("agm_alpha", 0.0, None), ("pmr_alpha", 0.0, None), ("pmr_momentum", 0.0, 1.0),
                 ("mmpareto_gamma", 0.0, None))


@dataclass
class TrainConfig:
    """Everything one training run depends on; `fastbml train` flags map 1:1 onto the fields."""

    dataset: str = "synthetic"
    data_root: str | None = None
    dataset_options: dict = field(default_factory=dict)
    modalities: list[str] | None = None  # train on these modalities only (None: all)
    method: str = "joint"
    fusion: str = "concat"
    init: str = "ogm"
    hidden: int = 128            # MLP hidden width (feature-input encoders)
    feature_dim: int = 128       # MLP / transformer output size
    epochs: int = 20
    batch_size: int = 64
    drop_last: bool = False
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "none"
    step_size: int = 70
    gamma: float = 0.1
    # OGM / OGM-GE (docs/methods.md#ogm-and-ogm-ge)
    alpha: float = 0.8
    ogm_form: str = "paper"
    ogm_start: int = 0
    ogm_end: int | None = None
    conv_only: bool = False
    # OPM (docs/methods.md#opm)
    q_base: float = 0.5
    opm_lambda: float = 0.5
    p_exe: float = 0.7
    opm_start: int = 0
    opm_end: int | None = None
    warmup_epochs: int = 0       # T-PAMI's hard-coded warm-up, for OGM and OPM
    # D&R (docs/methods.md#diagnosing-and-re-learning)
    dr_every: int = 20
    dr_times: int = 3
    dr_lambda: float = 3.0
    dr_clusters: int | None = None  # None: the number of classes
    # AGM (docs/methods.md#agm)
    agm_alpha: float = 1.0
    agm_start: int = 0
    agm_end: int | None = None
    # PMR (docs/methods.md#pmr); the authors' defaults
    pmr_alpha: float = 1.0
    pmr_momentum: float = 0.2
    pmr_start: int = 0
    pmr_end: int | None = None
    # MMPareto (docs/methods.md#mmpareto)
    mmpareto_gamma: float = 1.5
    mmpareto_start: int = 0
    mmpareto_end: int | None = None
    # runtime
    amp: str = "none"
    on_nonfinite: str = "stop"   # a non-finite training loss: stop the run, or skip the step
    device: str = "auto"
    seed: int = 0
    workers: int | None = None  # DataLoader workers (None: data.default_workers())
    prefetch: int = 4            # batches each worker loads ahead (DataLoader prefetch_factor)
    threads: int | None = None   # torch intra-op threads on CPU (None: torch's default)
    backend: str = "auto"
    compile: bool = False        # torch.compile the training forward (OPM included) and OGM's step
    compile_mode: str = "default"   # torch.compile mode (Inductor): see COMPILE_MODES
    compile_backend: str = "inductor"  # torch.compile backend; "aot_eager" generates no code
    dist_backend: str = "auto"  # torchrun launches: nccl on CUDA, gloo on CPU
    fsdp: bool = False           # shard encoders and head with FSDP2 (fully_shard) instead of DDP
    fsdp_mixed_precision: str = "none"  # bf16: all-gather and compute in bf16, reduce in fp32
    fsdp_shard_size: int | None = None  # HSDP: shard over groups of this many ranks (None: all)
    out: str = "runs/train"
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True

    def __post_init__(self):
        choices = {"optimizer": OPTIMIZERS, "scheduler": SCHEDULERS, "amp": AMP_MODES,
                   "dist_backend": DIST_BACKENDS, "compile_mode": COMPILE_MODES,
                   "on_nonfinite": ON_NONFINITE, "fsdp_mixed_precision": FSDP_MIXED_PRECISION}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        positive = ("epochs", "batch_size", "step_size", "dr_every", "hidden", "feature_dim",
                    "prefetch")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("seed", "workers", "dr_times", "ogm_start", "opm_start", "agm_start",
                     "pmr_start", "warmup_epochs", "mmpareto_start"):
            value = getattr(self, name)
            if name == "workers" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name, low, high in _FLOAT_RANGES:
            setattr(self, name, finite_number(getattr(self, name), name, low=low, high=high))
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma!r}")
        for name in ("threads", "dr_clusters", "fsdp_shard_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be None or a positive int, got {value!r}")
        for name in ("ogm_end", "opm_end", "agm_end", "pmr_end", "mmpareto_end"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise ValueError(f"{name} must be None or an int >= 0, got {value!r}")
        if self.fsdp_mixed_precision != "none" and not self.fsdp:
            raise ValueError(f"fsdp_mixed_precision {self.fsdp_mixed_precision!r} needs fsdp "
                             "(--fsdp); without it use amp (--amp bf16)")
        if self.fsdp_shard_size is not None and not self.fsdp:
            raise ValueError(f"fsdp_shard_size {self.fsdp_shard_size} needs fsdp (--fsdp)")
        if self.fsdp and self.amp != "none":
            raise ValueError(f"amp {self.amp!r} does not combine with fsdp: under FSDP2 mixed "
                             "precision is the sharding's policy (--fsdp-mixed-precision bf16: "
                             "parameters all-gathered and used in bf16, gradients reduced in "
                             "fp32); fp16 loss scaling is not supported with sharded gradients")


# Settings of each reference repository (docs/methods.md#reference-presets); explicit flags
# override them.
PRESETS: dict[str, dict] = {
    "ogm-ge-cvpr2022": dict(   # OGM-GE main.py, CREMA-D (README alpha 0.8); always SGD
        optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4, scheduler="step",
        step_size=70, gamma=0.1, batch_size=64, epochs=100, alpha=0.8, ogm_form="paper",
        ogm_start=0, ogm_end=50, conv_only=True, init="ogm"),
    "tpami-ks": dict(          # BML_TPAMI2024 Kinetics-Sounds scripts
        optimizer="adamw", lr=5e-5, weight_decay=0.01, scheduler="step", step_size=40,
        gamma=0.1, batch_size=32, epochs=100, alpha=0.8, ogm_start=0, ogm_end=60,
        conv_only=True, warmup_epochs=6, q_base=0.5, opm_lambda=0.5, p_exe=0.7, init="ogm"),
    "tpami-cremad": dict(      # author's CREMA-D settings (BML_TPAMI2024 issue #3)
        optimizer="adamw", lr=1e-3, weight_decay=0.01, scheduler="step", step_size=20,
        gamma=0.1, batch_size=32, epochs=100, alpha=2.6, ogm_start=0, ogm_end=80,
        conv_only=True, warmup_epochs=6, q_base=0.5, opm_lambda=0.5, p_exe=0.7, init="ogm"),
    "dr-cremad": dict(         # Diagnosing_Relearning ours.sh: no LR schedule
        optimizer="sgd", lr=2e-3, momentum=0.9, weight_decay=1e-4, scheduler="none",
        batch_size=64, epochs=90, dr_lambda=3.0, dr_every=20, dr_times=3, init="dr"),
    "balancebench": dict(      # BalanceBenchmark configs (all datasets), seed 42, fp32
        optimizer="adamw", lr=1e-3, weight_decay=0.01, scheduler="step", step_size=10,
        gamma=0.1, batch_size=32, drop_last=True, epochs=30, alpha=0.3, ogm_start=10,
        ogm_end=80, q_base=0.4, opm_lambda=0.5, p_exe=0.7, opm_start=0, opm_end=80,
        dr_lambda=3.0, dr_every=15, dr_times=2, seed=42),
    "demo": dict(              # the synthetic demo (docs/methods.md#reference-presets)
        dataset="synthetic", optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0,
        scheduler="none", batch_size=64, epochs=20, alpha=0.8, q_base=0.5, opm_lambda=0.5,
        p_exe=0.7, dr_lambda=3.0, dr_every=5, dr_times=3, pmr_end=5, threads=1),
}


def make_config(preset: str | None = None, **overrides) -> TrainConfig:
    """TrainConfig from the defaults, then `preset`'s settings, then `overrides` (None = unset)."""
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        values.update(PRESETS[preset])
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown training options: {unknown}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(values: Mapping) -> TrainConfig:
    return TrainConfig(**dict(values))
