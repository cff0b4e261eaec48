"""Backend selection: which implementation (torch, cpp, triton) runs an op for a given device.

`backend="auto"` picks `triton` for CUDA tensors and `cpp` for CPU tensors; the environment
variable FASTBML_BACKEND replaces "auto" globally. An unavailable backend named explicitly is an
error that says how to get it; "auto" falls back to `torch` with one warning.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from types import ModuleType

import torch

BACKENDS = ("torch", "cpp", "triton")


@functools.cache
def cpp_module() -> ModuleType | None:
    """The compiled CPU kernels, or None when fastbml was installed without a C++ compiler."""
    try:
        from fastbml import _C
    except ImportError:
        return None
    return _C


def require_cpp() -> ModuleType:
    """fastbml._C, or a RuntimeError that says how to build it."""
    module = cpp_module()
    if module is None:
        raise RuntimeError(f"fastbml: {_why_unavailable('cpp', torch.device('cpu'))}")
    return module


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (how CI tests them)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _why_unavailable(name: str, device: torch.device) -> str | None:
    if name == "cpp":
        if device.type != "cpu":
            return f"backend 'cpp' runs CPU tensors only, got a tensor on {device}"
        if cpp_module() is None:
            return (
                "backend 'cpp' needs fastbml._C, which was not built: install g++ with OpenMP "
                "and reinstall fastbml (`pip install -e .`)"
            )
    elif name == "triton":
        if not triton_available():
            return "backend 'triton' needs the triton package (`pip install triton`)"
        if device.type == "cpu" and not triton_interpreted():
            return "backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"backend 'triton' cannot run tensors on {device}"
    return None


@functools.cache
def _warn_fallback(preferred: str, reason: str) -> None:
    warnings.warn(f"fastbml: {reason}; using the 'torch' backend instead of '{preferred}'",
                  RuntimeWarning, stacklevel=3)


@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run an op on `device`: validates an explicit name, resolves "auto".

    A host-side decision: under torch.compile it is made once, while tracing."""
    if not isinstance(backend, str) or backend not in (*BACKENDS, "auto"):
        raise ValueError(f"backend must be one of {(*BACKENDS, 'auto')}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("FASTBML_BACKEND", "auto") or "auto"
        if backend not in (*BACKENDS, "auto"):
            raise ValueError(f"FASTBML_BACKEND must be one of {(*BACKENDS, 'auto')}, got {backend!r}")
    if backend == "auto":
        preferred = {"cuda": "triton", "cpu": "cpp"}.get(device.type)
        if preferred is None:
            return "torch"
        reason = _why_unavailable(preferred, device)
        if reason is None:
            return preferred
        _warn_fallback(preferred, reason)
        return "torch"
    reason = _why_unavailable(backend, device)
    if reason is not None:
        raise RuntimeError(f"fastbml: {reason}")
    return backend
