"""Host time of one eager `OGM.step` where launch overhead dominates: 40 small gradients
(two encoders of 20 8x8 linear layers), batch 8, 5 classes, one CPU thread.

This is the per-step cost that Python bookkeeping, op dispatch and argument packing add around
the kernels. `--baseline DIR` times the same step in another checkout of fastbml (e.g. a
`git worktree` of an earlier commit, with its fastbml._C built or copied in) in the same run,
alternating the two trees process by process, and writes both to the table.

    python -m benchmarks.bench_step_host [--baseline DIR]   # also written to
                                        # benchmarks/results/<device>-step-host.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from .harness import Case
from .report import RESULTS, device_name, write_table

ROOT = Path(__file__).resolve().parent.parent
TIMING = Path(__file__).resolve().with_name("step_host_timing.py")


def cases(device: torch.device) -> list[Case]:
    """None for the report: this benchmark compares checkouts, process by process (main)."""
    return []


def _in_tree(tree: Path, backend: str) -> float:
    done = subprocess.run([sys.executable, str(TIMING), str(tree), backend],
                          capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another fastbml checkout to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    trees = {"this tree": ROOT}
    if args.baseline is not None:
        commit = subprocess.run(["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()
        trees[f"baseline {commit or args.baseline}"] = args.baseline.resolve()
    results = {(name, b): [] for name in trees for b in ("cpp", "torch")}
    for _ in range(args.rounds):  # alternate the trees, so a busy spell hits both alike
        for name, tree in trees.items():
            for backend in ("cpp", "torch"):
                results[name, backend].append(_in_tree(tree, backend))
    best = {key: min(values) for key, values in results.items()}
    device = device_name(torch.device("cpu"))
    lines = [f"# Eager OGM.step host time on {device}", "",
             f"torch {torch.__version__}, 1 thread, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; 40 gradients "
             "of 8x8, batch 8, 5 classes (benchmarks/step_host_timing.py); the best of "
             f"{args.rounds} processes per tree, each the fastest mean of 7 x 300 steps; the "
             "trees alternated.", "",
             "| tree | backend | us per step |" + (" baseline / this |" if len(trees) > 1 else ""),
             "|---|---|---:|" + ("---:|" if len(trees) > 1 else "")]
    baseline = next((name for name in trees if name.startswith("baseline")), None)
    for (name, backend), us in best.items():
        ratio = (f" {best[baseline, backend] / us:.2f}x |" if baseline and name != baseline
                 else (" |" if baseline else ""))
        lines.append(f"| {name} | {backend} | {us:.1f} |{ratio}")
    table = "\n".join(lines) + "\n"
    write_table(f"{device}-step-host.md", table)
    (RESULTS / f"{device}-step-host.json").write_text(json.dumps(
        {f"{name}|{backend}": us for (name, backend), us in best.items()}, indent=1))


if __name__ == "__main__":
    main()
