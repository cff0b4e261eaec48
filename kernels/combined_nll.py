"""Per-group sums of the clamped cross-entropy of linear combinations of logit sets: one launch,
one program per group, rows in a fixed order (so the sum is deterministic)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logsumexp import online_logsumexp, row_tile


@triton.jit
def _combined_nll_kernel(logits, weights, labels, out, n_sets, batch, n_classes, max_nll,
                         stride_s, stride_b, stride_c, ROWS: tl.constexpr, COLS: tl.constexpr):
    m = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    total = tl.zeros((ROWS,), tl.float32)
    for r0 in range(0, batch, ROWS):
        r = r0 + rows
        row_ok = r < batch
        base = logits + r.to(tl.int64) * stride_b
        peak = tl.full((ROWS,), float("-inf"), tl.float32)
        denom = tl.zeros((ROWS,), tl.float32)
        for c0 in range(0, n_classes, COLS):  # online log-sum-exp over column tiles
            c = c0 + cols
            ok = row_ok[:, None] & (c < n_classes)[None, :]
            phi = tl.zeros((ROWS, COLS), tl.float32)
            for s in range(0, n_sets):
                w = tl.load(weights + m * n_sets + s)
                x = tl.load(base[:, None] + s * stride_s + c[None, :] * stride_c, mask=ok,
                            other=0.0).to(tl.float32)
                phi += w * x
            phi = tl.where(ok, phi, float("-inf"))
            peak, denom = online_logsumexp(peak, denom, phi)
        label = tl.load(labels + r, mask=row_ok, other=0)
        phi_label = tl.zeros((ROWS,), tl.float32)
        for s in range(0, n_sets):
            w = tl.load(weights + m * n_sets + s)
            x = tl.load(base + s * stride_s + label * stride_c, mask=row_ok,
                        other=0.0).to(tl.float32)
            phi_label += w * x
        nll = peak + tl.log(tl.where(row_ok, denom, 1.0)) - phi_label
        nll = tl.where(nll > max_nll, max_nll, nll)  # NaN stays NaN
        total += tl.where(row_ok, nll, 0.0)
    tl.store(out + m, tl.sum(total))


def combined_nll_sums(logits: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor,
                      max_nll: float) -> torch.Tensor:
    """logits [S, B, C] (any strides), weights [M, S] float32 contiguous, labels [B] int64
    -> float32 [M]."""
    n_sets, batch, n_classes = logits.shape
    groups = weights.shape[0]
    out = torch.empty(groups, dtype=torch.float32, device=logits.device)
    rows, cols = row_tile(batch, n_classes)
    _combined_nll_kernel[(groups,)](logits, weights, labels, out, n_sets, batch, n_classes,
                                    float(max_nll), *logits.stride(), ROWS=rows, COLS=cols,
                                    num_warps=4)
    return out
