"""What every benchmark module provides, and how cases are timed.

A module `benchmarks/bench_<op>.py` defines `cases(device) -> list[Case]`. Cases that share
`op` and `shape` are compared with each other: report.py writes their medians side by side with
the ratio to the `original` (authors' style) and `torch` (best plain PyTorch) implementations.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Implementation labels, in table order.
ORIGINAL = "original"      # as the authors' repositories do it (Python loops, .item(), sklearn)
PLAIN_TORCH = "torch"      # the best plain-PyTorch version (vectorised, _foreach_*, no .item())


def fastbml_impl(backend: str) -> str:
    return f"fastbml[{backend}]"


def fastbml_backends(device: torch.device) -> list[str]:
    """The fast backends to time on `device`: triton on CUDA, cpp on CPU (when built)."""
    from fastbml.backend import cpp_module, triton_available

    if device.type == "cuda":
        return ["triton"] if triton_available() else []
    return ["cpp"] if cpp_module() is not None else []


@dataclass(frozen=True)
class Case:
    op: str                                   # what is measured, e.g. "ogm_ge_step"
    shape: str                                # the input size, e.g. "2x ResNet-18 convs, fp32"
    impl: str                                 # ORIGINAL, PLAIN_TORCH or fastbml_impl(...)
    fn: Callable[[], object]                  # the timed call
    setup: Callable[[], None] | None = None   # untimed, before every call (e.g. restore grads)
    bytes_moved: int | None = None            # minimum DRAM traffic of fn, for the bandwidth floor
    single_shot: bool = False                 # time one call, no warm-up (baselines of minutes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_case(case: Case, device: torch.device, *, repeats: int = 20, warmup: int = 3,
              budget_s: float = 20.0) -> list[float]:
    """Seconds per call, `repeats` times (fewer if the budget runs out), after `warmup` calls;
    one call without warm-up for a single-shot case."""
    if case.single_shot:
        repeats, warmup = 1, 0
    samples: list[float] = []
    started = time.perf_counter()
    for i in range(warmup + repeats):
        if case.setup is not None:
            case.setup()
        _sync(device)
        t0 = time.perf_counter()
        case.fn()
        _sync(device)
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            samples.append(elapsed)
        if samples and time.perf_counter() - started > budget_s:
            break
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def interleaved_medians(cases: list[Case], device: torch.device, rounds: int,
                        warmup_rounds: int = 2) -> dict[tuple[str, str], float]:
    """Median seconds per (shape, impl), every case timed once per round, round after round, so
    that a slow spell of a shared machine hits them all alike; the first `warmup_rounds`
    rounds are not counted."""
    samples: dict[tuple[str, str], list[float]] = {(c.shape, c.impl): [] for c in cases}
    for r in range(rounds + warmup_rounds):
        for case in cases:
            seconds = time_case(case, device, repeats=1, warmup=0)
            if r >= warmup_rounds:
                samples[case.shape, case.impl] += seconds
    return {key: median(s) for key, s in samples.items()}
