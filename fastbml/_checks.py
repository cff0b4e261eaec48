"""Validation shared by the public helpers and the training configuration."""

from __future__ import annotations

import math
import numbers

import numpy as np


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
