"""Per-epoch logs of a run: CSV + JSON history, TensorBoard scalars, matplotlib plots."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path


def _summary_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a declared dependency; a broken install only loses TB logs
        warnings.warn("tensorboard is not importable: no TensorBoard logs for this run",
                      stacklevel=3)
        return None
    return SummaryWriter(str(path))


class RunLogger:
    """Appends one record per epoch to metrics.csv / metrics.json (and TensorBoard under tb/).

    With `write=False` (DDP ranks other than 0) it only keeps the history in memory.
    """

    def __init__(self, run_dir: Path, history: list[dict] | None = None, *,
                 tensorboard: bool = True, write: bool = True):
        self.run_dir = run_dir
        self.history: list[dict] = list(history or [])
        self.write = write
        self.writer = _summary_writer(run_dir / "tb") if tensorboard and write else None

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, record["epoch"])
            self.writer.flush()
        if self.write:
            self._write()

    def _write(self) -> None:
        (self.run_dir / "metrics.json").write_text(json.dumps(self.history, indent=1))
        keys: list[str] = []
        for record in self.history:
            keys += [k for k in record if k not in keys]
        with open(self.run_dir / "metrics.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.history)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: list[dict], modalities: list[str], path: Path) -> Path:
    """Accuracy (fused and per modality) over epochs, plus each method quantity that was logged
    (OGM coefficients, OPM drop probabilities, D&R purity gaps), one panel each."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    groups = [("accuracy (val)", ["val_acc"] + [f"val_acc_{m}" for m in modalities])]
    for prefix, title in (("coeff", "OGM coefficient"), ("drop_prob", "OPM drop probability"),
                          ("purity_gap", "D&R purity gap"), ("relearn", "D&R re-init strength")):
        keys = [f"{prefix}_{m}" for m in modalities if any(f"{prefix}_{m}" in r for r in history)]
        if keys:
            groups.append((title, keys))
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], groups):
        for key in keys:
            xs = [e for e, r in zip(epochs, history) if key in r]
            ax.plot(xs, [r[key] for r in history if key in r], marker=".", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_comparison(results: dict, modalities: list[str], path: Path,
                    alone: dict[str, float] | None = None) -> Path:
    """Grouped bars: fused and per-modality test accuracy per method (dashed: each modality alone)."""
    plt = _pyplot()
    methods = list(results)
    keys = ["fused", *modalities]
    width = 0.8 / len(keys)
    fig, ax = plt.subplots(figsize=(3.6 + 1.6 * len(methods), 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, key in enumerate(keys):
        values = [results[m]["acc"] if key == "fused" else results[m]["acc_per_modality"][key]
                  for m in methods]
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(methods))]
        ax.bar(xs, values, width, label=key, color=colors[j % len(colors)])
        if alone and key in alone:
            ax.axhline(alone[key], color=colors[j % len(colors)], linestyle="--", linewidth=1,
                       label=f"{key} trained alone")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
