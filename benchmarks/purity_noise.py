"""Purity's spread across k-means seeds, fast backends vs scikit-learn n_init=10.

Two feature sets of N points, D dims, K classes: well separated Gaussian blobs, and weakly
clustered ones (blobs buried in noise, through a ReLU: non-negative and overlapping, like the
pooled features of a small trained model). For each backend, purity over `--seeds` seeds gives
the mean, the spread (max - min) and the std; the D&R strength tanh(3 |P_train - P_val|) of two
halves of the same distribution (its ideal value: 0) is reported the same way.

    python -m benchmarks.purity_noise [--n 6000] [--seeds 10] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import statistics
import time

import torch

from benchmarks.report import device_name
from fastbml import cluster_purity


def features(kind: str, n: int, dim: int, k: int, sample_seed: int):
    """n points around class centres fixed by seed 0 (both splits share them)."""
    centers = torch.randn(k, dim, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1 + sample_seed)
    labels = torch.randint(0, k, (n,), generator=g)
    noise = 0.5 if kind == "separated" else 4.0
    x = centers[labels] + noise * torch.randn(n, dim, generator=g)
    return (x if kind == "separated" else torch.relu(x)), labels


def spread(values: list[float]) -> str:
    return (f"{statistics.fmean(values):.4f}  {max(values) - min(values):.4f}  "
            f"{statistics.pstdev(values):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=6000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=31)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--out")
    args = parser.parse_args()
    backends = ["torch", "sklearn"] + (["faiss"] if importlib.util.find_spec("faiss") else [])
    lines = [f"N = {args.n} per split, D = {args.dim}, K = {args.k} classes and clusters; "
             f"{args.seeds} seeds (k-means seed / random_state 0..{args.seeds - 1}), n_init=10; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads",
             "columns: mean, spread (max - min), std over the seeds",
             "",
             f"{'features':<10} {'backend':<8} {'purity: mean  spread  std':<27} "
             f"{'D&R strength: mean  spread  std':<33} s/purity"]
    for kind in ("separated", "weak"):
        train = features(kind, args.n, args.dim, args.k, sample_seed=0)
        val = features(kind, args.n, args.dim, args.k, sample_seed=1)
        for backend in backends:
            purities, strengths, seconds = [], [], 0.0
            for seed in range(args.seeds):
                started = time.perf_counter()
                p_train = cluster_purity(*train, args.k, kmeans=backend, seed=seed)
                seconds += time.perf_counter() - started
                p_val = cluster_purity(*val, args.k, kmeans=backend, seed=seed)
                purities.append(p_train)
                strengths.append(math.tanh(3.0 * abs(p_train - p_val)))
            lines.append(f"{kind:<10} {backend:<8} {spread(purities):<27} "
                         f"{spread(strengths):<33} {seconds / args.seeds:.2f}")
            print(lines[-1], flush=True)
    device = device_name(torch.device("cpu"))
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"# Purity noise on {device}, {stamp}\n\n```\n" + "\n".join(lines) + "\n```\n\n"
            "Command: `python -m benchmarks.purity_noise" +
            (f" --n {args.n} --seeds {args.seeds}" if (args.n, args.seeds) != (6000, 10) else "")
            + "`\n")
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
