"""Input validation for the public entry points (docs/design.md#input-checking).

Public helpers and functions check what they are given, through these functions, and raise a
TypeError / ValueError that names the argument; the ops and kernels below them trust their
inputs. Checks that would need a value held on the device (a range, a label) run there, without a
host sync (`check_on_device`).
"""

from __future__ import annotations

import bisect
import itertools
import math
import numbers
import warnings
from collections.abc import Callable, Sequence

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


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes [first, last + 1) of memory that `t`'s elements can occupy."""
    if t.is_contiguous():  # the common case, in three attribute reads
        lo = t.data_ptr()
        return (lo, lo + t.nbytes) if lo else (0, 0)  # meta and empty tensors have no memory
    if t.numel() == 0 or t.device.type == "meta":  # no memory
        return 0, 0
    lo = hi = t.data_ptr()
    size = t.element_size()
    for n, s in zip(t.shape, t.stride()):
        hi += (n - 1) * s * size
    return lo, hi + size


def check_disjoint(written: Sequence[torch.Tensor], written_name: Callable[[int], str],
                   read: Sequence[torch.Tensor] = (),
                   read_name: Callable[[int], str] | None = None) -> None:
    """ValueError naming the two arguments when a tensor an in-place op writes shares memory
    with another one it writes or reads (the same tensor twice included); tensors only read
    may overlap each other. `*_name(i)` names the i-th tensor (built only for the error).
    Host only: the memory spans of the tensors are compared (views that interleave within one
    span count as overlapping). Skipped while tracing (fake tensors have no memory)."""
    if torch.compiler.is_compiling():
        return
    spans = sorted(span for span in ((*_span(t), i) for i, t in enumerate(written))
                   if span[1] > span[0])
    # sorted by start: the first overlap is always between neighbours
    for (_, hi, i), (lo, _, j) in itertools.pairwise(spans):
        if lo < hi:
            raise ValueError(f"{written_name(i)} and {written_name(j)} share memory: an in-place "
                             "op on overlapping tensors gives undefined results; pass tensors "
                             "that do not alias")
    if not read or not spans:
        return
    starts = [s[0] for s in spans]
    for j, t in enumerate(read):
        lo, hi = _span(t)
        if hi == lo:
            continue
        k = bisect.bisect_left(starts, hi) - 1
        if k >= 0 and spans[k][1] > lo:
            raise ValueError(f"{written_name(spans[k][2])} and {read_name(j)} share memory: an "
                             "in-place op that reads what it writes gives undefined results; "
                             "pass tensors that do not alias")


def check_labels(labels: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """`labels` as contiguous int64 if it is a plain integer tensor of shape [batch] on `device`;
    else a TypeError / ValueError naming it."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
    check_plain(labels, "labels")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape [{batch}] (the batch of the logits), "
                         f"got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but logits on {device}")
    return labels.to(torch.int64).contiguous()


def check_scores(scores: object) -> None:
    """TypeError / ValueError unless `scores` is a floating-point vector of M >= 2 modality
    scores."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a tensor, got {type(scores).__name__}")
    if scores.dim() != 1 or scores.numel() < 2:
        raise ValueError(f"scores must be a vector of M >= 2 modality scores, got shape "
                         f"{tuple(scores.shape)}")
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
