"""One timing of bench_step_host, run in its own process: `python step_host_timing.py TREE
BACKEND` imports fastbml from the checkout TREE and prints the eager OGM.step time in us.

Self-contained (no import from the benchmarks package), so that it runs the same against any
checkout of fastbml."""

import sys
import time

sys.path.insert(0, sys.argv[1])

import torch
from torch import nn

import fastbml

LAYERS, BATCH, CLASSES = 20, 8, 5


def best_microseconds(backend: str, calls: int = 300, repeats: int = 7) -> float:
    """The fastest of `repeats` means over `calls` steps, after 100 warm-up steps."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    encoders = {m: nn.ModuleList([nn.Linear(8, 8) for _ in range(LAYERS)])
                for m in ("audio", "visual")}
    ogm = fastbml.OGM(encoders, alpha=0.8, seed=1, backend=backend)
    for p in (p for e in encoders.values() for p in e.parameters()):
        p.grad = torch.randn_like(p)
    logits = {m: torch.randn(BATCH, CLASSES) for m in encoders}
    labels = torch.randint(0, CLASSES, (BATCH,))
    for _ in range(100):
        ogm.step(logits, labels, epoch=0)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            ogm.step(logits, labels, epoch=0)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


if __name__ == "__main__":
    assert fastbml.__file__.startswith(sys.argv[1]), fastbml.__file__
    print(best_microseconds(sys.argv[2]))
