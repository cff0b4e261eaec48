"""The training harness: configuration and presets, the Trainer, metrics, logs and the demo."""

from .config import PRESETS, TrainConfig, make_config
from .demo import format_table, run_demo
from .engine import Trainer, train
from .methods import METHODS, MethodStack, parse_method
from .metrics import classification_metrics
from .parallel import setup_distributed

__all__ = [
    "METHODS",
    "PRESETS",
    "MethodStack",
    "TrainConfig",
    "Trainer",
    "classification_metrics",
    "format_table",
    "make_config",
    "parse_method",
    "run_demo",
    "setup_distributed",
    "train",
]
