"""The pieces the row-softmax kernels share: an online log-sum-exp over column tiles, and the
[rows, columns] tile of a per-group reduction over a [B, C] matrix."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_logsumexp(peak, denom, x):
    """(peak, denom) after one more [ROWS, COLS] tile `x` of each row's values: peak is the
    running maximum, denom the sum of exp(x - peak) so far; a row whose values are all -inf
    so far keeps peak -inf and denom 0."""
    new_peak = tl.maximum(peak, tl.max(x, axis=1))
    safe = tl.where(new_peak == float("-inf"), 0.0, new_peak)
    denom = denom * tl.exp(peak - safe) + tl.sum(tl.exp(x - safe[:, None]), axis=1)
    return new_peak, denom


def row_tile(batch: int, n_classes: int) -> tuple[int, int]:
    """(rows, columns) of one program's tile: up to 1024 columns, about 4096 elements."""
    cols = min(triton.next_power_of_2(n_classes), 1024)
    return max(1, min(triton.next_power_of_2(batch), 4096 // cols)), cols
