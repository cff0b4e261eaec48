"""Every benchmark case under pytest-benchmark (CPU or CUDA):

    python -m pytest benchmarks --benchmark-enable
"""

import importlib

import pytest
import torch

from .report import discover

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cases():
    for name in discover(None):
        for case in importlib.import_module(f"benchmarks.{name}").cases(DEVICE):
            yield pytest.param(case, id=f"{case.op}[{case.shape}]-{case.impl}")


@pytest.mark.parametrize("case", list(_cases()))
def test_benchmark(benchmark, case):
    benchmark.group = f"{case.op} | {case.shape}"
    benchmark.pedantic(case.fn, setup=case.setup, rounds=5, warmup_rounds=1)
