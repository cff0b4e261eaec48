"""The training step eager and under torch.compile: the audio-visual ResNet-18 model of
bench_train_step (batch 64), methods joint, ogm-ge, opm and opm+ogm-ge, through fastbml's Trainer
with and without `--compile` (Inductor; on CUDA mode="reduce-overhead", CUDA graphs).

The target: the compiled opm+ogm-ge step no more than 3% slower than the compiled joint step.

    python -m benchmarks.bench_compile      # interleaved; also written to
                                            # benchmarks/results/<device>-compile.md
"""

from __future__ import annotations

import tempfile
import time

import torch

from .bench_train_step import make_trainer
from .harness import Case, median, time_case
from .report import device_name, write_table

METHODS = ("joint", "ogm-ge", "opm", "opm+ogm-ge")


def _mode(device: torch.device) -> str:
    return "reduce-overhead" if device.type == "cuda" else "default"


def cases(device: torch.device) -> list[Case]:
    out = tempfile.mkdtemp(prefix="fastbml-bench-compile-")
    result = []
    for method in METHODS:
        for compiled in (False, True):
            label = f"{method} {'compiled' if compiled else 'eager'}"
            trainer, inputs, labels = make_trainer(device, method, f"{out}/{label}",
                                                   compile=compiled,
                                                   compile_mode=_mode(device))
            shape = "AV ResNet-18 training step, batch 64, fp32"
            result.append(Case("train_step_compile", shape, label,
                               lambda t=trainer, x=inputs, y=labels: t.train_step(x, y, epoch=0)))
    return result


def main(rounds: int = 15) -> None:
    """Medians with every variant interleaved step by step; three warm-up rounds (the first
    compiles, the next ones settle the CUDA graphs)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    all_cases = cases(device)
    samples: dict[str, list[float]] = {case.impl: [] for case in all_cases}
    compile_seconds: dict[str, float] = {}
    for r in range(rounds + 3):
        for case in all_cases:
            seconds = time_case(case, device, repeats=1, warmup=0)
            if r == 0 and case.impl.endswith("compiled"):
                compile_seconds[case.impl] = seconds[0]
            if r >= 3:
                samples[case.impl] += seconds
    times = {impl: median(s) for impl, s in samples.items()}
    name = device_name(device)
    joint = times["joint compiled"]
    lines = [f"# Training step, eager and compiled, on {name}", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {all_cases[0].shape}; "
             f"torch.compile mode={_mode(device)!r} (Inductor) of the training forward (OPM "
             f"included) and of the OGM step; median of {rounds} steps per variant, the variants "
             "interleaved step by step. The first compiled step includes compilation (less "
             "when Inductor's on-disk cache already holds the graphs).", "",
             "| method | eager ms | compiled ms | compiled vs eager | compiled vs compiled joint "
             "| first compiled step s |",
             "|---|---:|---:|---:|---:|---:|"]
    for method in METHODS:
        eager, comp = times[f"{method} eager"], times[f"{method} compiled"]
        lines.append(f"| {method} | {eager * 1e3:.1f} | {comp * 1e3:.1f} | {eager / comp:.2f}x | "
                     f"{100 * (comp / joint - 1):+.1f}% | "
                     f"{compile_seconds[f'{method} compiled']:.0f} |")
    table = "\n".join(lines) + "\n"
    write_table(f"{name}-compile.md", table)


if __name__ == "__main__":
    main()
