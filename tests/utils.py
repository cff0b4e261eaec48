"""Shared test helpers: the device and backends under test, random inputs, per-dtype tolerances.

Every fast path is compared with the `torch` backend evaluated on the same inputs; references
that need more precision than the dtype under test are computed in float64.
"""

from __future__ import annotations

import pytest
import torch

from fastbml.backend import cpp_module, triton_available

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Backends that can run on DEVICE here (triton runs on CPU through TRITON_INTERPRET=1).
FAST_BACKENDS = [
    pytest.param("cpp", marks=pytest.mark.skipif(DEVICE.type != "cpu" or cpp_module() is None,
                                                 reason="cpp runs CPU tensors")),
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no triton")),
]
ALL_BACKENDS = [pytest.param("torch"), *FAST_BACKENDS]

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (rtol, atol) for comparing a fast path with the torch path in the same dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float64: (1e-10, 1e-10),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0) -> None:
    """Compare with the tolerance of `dtype` (default: actual's dtype), widened by `scale`."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol * scale,
                               atol=atol * scale, equal_nan=True)


def randn(*shape: int, dtype: torch.dtype = torch.float32, noncontiguous: bool = False,
          scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """Fresh random values (never zeros); `noncontiguous` returns a strided view of a bigger one."""
    if noncontiguous and len(shape) >= 1:
        base = torch.randn(*shape[:-1], 2 * shape[-1] + 1, device=DEVICE) * scale + shift
        view = base.to(dtype)[..., 1::2]  # converted before slicing: .to() would copy it dense
        assert not view.is_contiguous() or view.numel() <= 1
        return view
    return (torch.randn(*shape, device=DEVICE) * scale + shift).to(dtype)


class CountingKernel:
    """Stands in for a @triton.jit kernel and counts its launches (in `counter`)."""

    def __init__(self, kernel, counter: list):
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        self.counter.append(grid)
        return self.kernel[grid]
