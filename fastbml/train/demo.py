"""`fastbml demo`: the imbalance phenomenon and what each method does about it, on `synthetic`.

Trains each modality alone, then joint, ogm-ge, opm, dr, mmpareto, agm and pmr on the same data
with the same seed and budget (the `demo` preset), and reports test accuracy (fused and per
modality, model chosen on val) in a table, results.json and comparison.png under `out`.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from ..data import load_dataset
from .config import make_config
from .engine import Trainer
from .logger import plot_comparison

DEMO_METHODS = ("joint", "ogm-ge", "opm", "dr", "mmpareto", "agm", "pmr")
QUICK_SEEDS = (0,)
FULL_SEEDS = (0, 1, 2)


def _run(out: Path, seed: int, splits, **overrides) -> tuple[dict, float]:
    cfg = make_config("demo", seed=seed, out=str(out), progress=False, tensorboard=False,
                      **overrides)
    started = time.perf_counter()
    summary = Trainer(cfg, splits).fit()
    return summary, time.perf_counter() - started


def run_demo(out: str | Path = "runs/demo", *, quick: bool = False,
             methods: tuple[str, ...] = DEMO_METHODS) -> dict:
    """Run the demo and return (and write) its results: the results.json dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = QUICK_SEEDS if quick else FULL_SEEDS
    alone: dict[str, list[float]] = {}
    runs: dict[str, dict[str, list]] = {m: {"acc": [], "uni": [], "seconds": []} for m in methods}
    modalities: list[str] = []
    for seed in seeds:
        splits = load_dataset("synthetic", seed=seed)
        modalities = list(splits.info.modalities)
        for m in modalities:
            summary, _ = _run(out / f"seed{seed}" / f"alone-{m}", seed, splits, modalities=[m])
            alone.setdefault(m, []).append(summary["test"][f"acc_{m}"])
        for method in methods:
            summary, seconds = _run(out / f"seed{seed}" / method, seed, splits, method=method)
            runs[method]["acc"].append(summary["test"]["acc"])
            runs[method]["uni"].append({m: summary["test"][f"acc_{m}"] for m in modalities})
            runs[method]["seconds"].append(seconds)
    mean = statistics.fmean
    results = {
        "methods": {
            method: {"acc": mean(r["acc"]),
                     "acc_per_modality": {m: mean(u[m] for u in r["uni"]) for m in modalities},
                     "seconds": mean(r["seconds"])}
            for method, r in runs.items()},
        "alone": {m: mean(v) for m, v in alone.items()},
        "seeds": list(seeds),
        "dataset": "synthetic",
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_comparison(results["methods"], modalities, out / "comparison.png", results["alone"])
    return results


def format_table(results: dict) -> str:
    """The demo's results as a fixed-width text table (test accuracy; seconds per run)."""
    modalities = list(results["alone"])
    header = f"{'method':<16}{'fused':>8}" + "".join(f"{m:>9}" for m in modalities) + f"{'sec':>7}"
    lines = [header, "-" * len(header)]
    lines.append(f"{'(each alone)':<16}{'':>8}"
                 + "".join(f"{results['alone'][m]:>9.3f}" for m in modalities))
    for method, r in results["methods"].items():
        lines.append(f"{method:<16}{r['acc']:>8.3f}"
                     + "".join(f"{r['acc_per_modality'][m]:>9.3f}" for m in modalities)
                     + f"{r['seconds']:>7.1f}")
    return "\n".join(lines)
