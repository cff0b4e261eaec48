"""Input validation for the public entry points (docs/design.md#input-checking).

Public helpers and functions check what they are given, through these functions, and raise a
TypeError / ValueError that names the argument; the ops and kernels below them trust their
inputs. Checks that would need a value held on the device (a range, a label) run there, without a
host sync (`check_on_device`).
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from torch import nn

# The floating-point dtypes every kernel reads and writes.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The tensor types a kernel may be given: a subclass (DTensor, ...) would hand it the wrong memory.
PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def finite_number(value: object, name: str, *, low: float | None = None,
                  high: float | None = None) -> float:
    """`value` as a float if it is a finite real number (Python or numpy scalar, not bool)
    within [low, high]; else a TypeError / ValueError naming `name`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {number}")
    if low is not None and high is not None and not low <= number <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {number}")
    if low is not None and number < low:
        raise ValueError(f"{name} must be >= {low}, got {number}")
    if high is not None and number > high:
        raise ValueError(f"{name} must be <= {high}, got {number}")
    return number


def probability(value: object, name: str) -> float:
    """`finite_number` in [0, 1]."""
    return finite_number(value, name, low=0.0, high=1.0)


def integer(value: object, name: str, *, low: int = 0) -> int:
    """`value` as an int if it is an integer (Python or numpy, not bool) >= low; else a
    ValueError naming `name`."""
    if (isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral)
            or value < low):
        what = "a positive int" if low == 1 else f"an int >= {low}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def renamed_keyword(old: str, old_value: object, new: str, new_value: object,
                    default: object) -> object:
    """The value of keyword `new` when callers may still pass it under its old name `old`
    (None: not passed): the old name works, with a DeprecationWarning, for one release."""
    if old_value is None:
        return new_value
    if new_value != default:
        raise TypeError(f"pass {new}= only ({old}= is its deprecated name)")
    warnings.warn(f"{old}= is deprecated: use {new}=", DeprecationWarning, stacklevel=3)
    return old_value


def check_plain(tensor: torch.Tensor, name: str) -> None:
    """Refuses tensor subclasses (DTensor, ...): a kernel given a subclass's local storage would
    read or write the wrong memory."""
    if type(tensor) not in PLAIN_TENSORS:
        raise TypeError(f"{name} is a {type(tensor).__name__}: fastbml's kernels take plain "
                        "tensors only (DTensors are taken as OGM's gradients and D&R's "
                        "parameters: docs/design.md#input-checking)")


def check_float_tensor(tensor: object, name: str) -> torch.Tensor:
    """`tensor` if it is a plain tensor of a kernel dtype (FLOAT_DTYPES), else an error naming it."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    check_plain(tensor, name)
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    return tensor


def check_on_device(ok: torch.Tensor, message: str) -> None:
    """Enforces a condition held in a bool device tensor without a host sync where one would
    cost: a ValueError(message) for eager CPU tensors; on CUDA, and inside a compiled graph
    (where reading the value would break it), a device-side assert."""
    if ok.device.type == "cuda" or torch.compiler.is_compiling():
        torch._assert_async(ok, f"fastbml: {message}")
    elif ok.device.type == "cpu" and not ok:
        raise ValueError(message)


def check_unit_range(values: torch.Tensor, name: str) -> None:
    """`check_on_device` of 0 <= values <= 1 (NaN fails)."""
    lo, hi = torch.aminmax(values)  # NaN propagates into both and fails either bound
    check_on_device((lo >= 0) & (hi <= 1), f"{name} must lie in [0, 1], got values outside it")
