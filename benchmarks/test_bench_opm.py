"""pytest-benchmark runs of the OPM cases on the CPU (`pytest benchmarks/test_bench_opm.py
--benchmark-enable`); with benchmarks disabled (the default addopts) each case runs once, which
still checks that every implementation executes."""

import pytest
import torch

from benchmarks.bench_opm import cases

CPU_CASES = cases(torch.device("cpu"))


@pytest.mark.parametrize("case", CPU_CASES, ids=[f"{c.shape}-{c.impl}" for c in CPU_CASES])
def test_opm_drop_fwd_bwd(benchmark, case):
    def setup():
        if case.setup is not None:
            case.setup()

    benchmark.pedantic(case.fn, setup=setup, rounds=10, warmup_rounds=1)
