"""Per-group sums of the softmax probability that each row gives its label: one launch, one
program per group, rows in a fixed order (so the sum is deterministic)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logsumexp import online_logsumexp, row_tile


@triton.jit
def _true_class_prob_kernel(logits, labels, out, batch, n_classes, stride_g, stride_b, stride_c,
                            ROWS: tl.constexpr, COLS: tl.constexpr):
    g = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    total = tl.zeros((ROWS,), tl.float32)
    for r0 in range(0, batch, ROWS):
        r = r0 + rows
        row_ok = r < batch
        base = logits + g * stride_g + r.to(tl.int64) * stride_b
        peak = tl.full((ROWS,), float("-inf"), tl.float32)
        denom = tl.zeros((ROWS,), tl.float32)
        for c0 in range(0, n_classes, COLS):  # online log-sum-exp over column tiles
            c = c0 + cols
            ok = row_ok[:, None] & (c < n_classes)[None, :]
            x = tl.load(base[:, None] + c[None, :] * stride_c, mask=ok,
                        other=float("-inf")).to(tl.float32)
            peak, denom = online_logsumexp(peak, denom, x)
        label = tl.load(labels + r, mask=row_ok, other=0)
        x_label = tl.load(base + label * stride_c, mask=row_ok, other=0.0).to(tl.float32)
        total += tl.where(row_ok, tl.exp(x_label - peak) / denom, 0.0)
    tl.store(out + g, tl.sum(total))


def true_class_prob_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [G, B, C] (any strides), labels [B] int64 -> float32 [G]."""
    groups, batch, n_classes = logits.shape
    out = torch.empty(groups, dtype=torch.float32, device=logits.device)
    rows, cols = row_tile(batch, n_classes)
    _true_class_prob_kernel[(groups,)](logits, labels, out, batch, n_classes, *logits.stride(),
                                       ROWS=rows, COLS=cols, num_warps=4)
    return out
