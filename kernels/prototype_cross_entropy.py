"""Prototype cross-entropy: a softmax over negative Euclidean distances to class prototypes.

The forward is one launch, one program per block of rows: distances by direct differences over
tiles of classes and feature columns, an online log-sum-exp over the class tiles, the label's
term gathered on the way. The backward kernel recomputes the distances and writes the per-class
coefficients a[i, c] of the gradient (the caller finishes it with one matrix product).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .logsumexp import online_logsumexp

CLASSES, COLUMNS = 16, 32  # the [rows, classes, columns] tile of the distance loop


def row_block(batch: int, device: torch.device) -> int:
    """Rows per program: 16 on CPU (the interpreter pays per program); on GPU up to 16, fewer
    for small batches so that a batch of 64 still spreads over dozens of programs."""
    if device.type == "cpu":
        return 16
    return min(16, max(2, triton.next_power_of_2(triton.cdiv(batch, 128))))


@triton.jit
def _distances(features, prototypes, r, row_ok, c, class_ok, dim, stride_fb, stride_fd,
               stride_pc, CLASSES: tl.constexpr, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
    """||f_r - P_c|| for a [ROWS] block of rows and a [CLASSES] block of classes (float32)."""
    cols = tl.arange(0, COLUMNS)
    acc = tl.zeros((ROWS, CLASSES), tl.float32)
    for k0 in range(0, dim, COLUMNS):
        k = k0 + cols
        k_ok = k < dim
        f = tl.load(features + r.to(tl.int64)[:, None] * stride_fb + k[None, :] * stride_fd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        p = tl.load(prototypes + c.to(tl.int64)[:, None] * stride_pc + k[None, :],
                    mask=class_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        diff = f[:, None, :] - p[None, :, :]
        acc += tl.sum(diff * diff, axis=2)
    return tl.sqrt(acc)


@triton.jit
def _forward_kernel(features, prototypes, mask, labels, loss, lse, batch, n_classes, dim,
                    stride_fb, stride_fd, stride_pc, ROWS: tl.constexpr, CLASSES: tl.constexpr,
                    COLUMNS: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = r < batch
    label = tl.load(labels + r, mask=row_ok, other=0)
    peak = tl.full((ROWS,), float("-inf"), tl.float32)
    denom = tl.zeros((ROWS,), tl.float32)
    d_label = tl.zeros((ROWS,), tl.float32)
    bad = tl.zeros((ROWS,), tl.int32)
    for c0 in range(0, n_classes, CLASSES):
        c = c0 + tl.arange(0, CLASSES)
        class_ok = c < n_classes
        valid = (tl.load(mask + c, mask=class_ok, other=0) != 0) & class_ok
        d = _distances(features, prototypes, r, row_ok, c, class_ok, dim, stride_fb, stride_fd,
                       stride_pc, CLASSES, ROWS, COLUMNS)
        finite = d < float("inf")  # False for inf and NaN
        bad += tl.sum((valid[None, :] & ~finite).to(tl.int32), axis=1)
        s = tl.where(valid[None, :] & finite, -d, float("-inf"))
        peak, denom = online_logsumexp(peak, denom, s)
        d_label += tl.sum(tl.where(c[None, :] == label[:, None], d, 0.0), axis=1)
    log_norm = tl.where(denom > 0.0, peak + tl.log(tl.where(denom > 0.0, denom, 1.0)),
                        float("-inf"))  # -inf for an empty mask
    log_norm = tl.where(bad > 0, float("nan"), log_norm)
    kept = tl.load(mask + label, mask=row_ok, other=0) != 0
    tl.store(lse + r, log_norm, mask=row_ok)
    tl.store(loss + r, tl.where(kept, log_norm + d_label, 0.0), mask=row_ok)


@triton.jit
def _coefficients_kernel(grad, features, prototypes, mask, labels, lse, coeffs, batch, n_classes,
                         dim, stride_fb, stride_fd, stride_pc, ROWS: tl.constexpr,
                         CLASSES: tl.constexpr, COLUMNS: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = r < batch
    label = tl.load(labels + r, mask=row_ok, other=0)
    kept = (tl.load(mask + label, mask=row_ok, other=0) != 0) & row_ok
    g = tl.where(kept, tl.load(grad + r, mask=row_ok, other=0.0), 0.0)
    log_norm = tl.load(lse + r, mask=kept, other=0.0)
    for c0 in range(0, n_classes, CLASSES):
        c = c0 + tl.arange(0, CLASSES)
        class_ok = c < n_classes
        valid = (tl.load(mask + c, mask=class_ok, other=0) != 0) & class_ok
        d = _distances(features, prototypes, r, row_ok, c, class_ok, dim, stride_fb, stride_fd,
                       stride_pc, CLASSES, ROWS, COLUMNS)
        p = tl.where(valid[None, :], tl.exp(-d - log_norm[:, None]), 0.0)
        target = (c[None, :] == label[:, None]).to(tl.float32)
        # the norm's subgradient 0 at d = 0 (a NaN distance stays NaN); ignored rows get 0
        a = tl.where(d != 0.0, g[:, None] * (p - target) / tl.where(d != 0.0, d, 1.0), 0.0)
        a = tl.where(kept[:, None], a, 0.0)
        tl.store(coeffs + r.to(tl.int64)[:, None] * n_classes + c[None, :], a,
                 mask=row_ok[:, None] & class_ok[None, :])


def prototype_ce_forward(features: torch.Tensor, prototypes: torch.Tensor, mask: torch.Tensor,
                         labels: torch.Tensor, rows: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B, D] (any strides), prototypes float32 [C, D] (unit column stride), mask
    uint8 [C], labels int64 [B] -> (loss, lse), float32 [B] each; `rows` per program (a power
    of two; default `row_block`)."""
    batch, dim = features.shape
    n_classes = prototypes.shape[0]
    loss = torch.empty(batch, dtype=torch.float32, device=features.device)
    lse = torch.empty(batch, dtype=torch.float32, device=features.device)
    rows = rows or row_block(batch, features.device)
    if batch:
        _forward_kernel[(triton.cdiv(batch, rows),)](
            features, prototypes, mask, labels, loss, lse, batch, n_classes, dim,
            *features.stride(), prototypes.stride(0), ROWS=rows, CLASSES=CLASSES,
            COLUMNS=COLUMNS, num_warps=4)
    return loss, lse


def prototype_ce_coefficients(grad: torch.Tensor, features: torch.Tensor,
                              prototypes: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                              lse: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """a [B, C] float32: the gradient with respect to row i is sum_c a[i, c] (P_c - f_i)."""
    batch, dim = features.shape
    n_classes = prototypes.shape[0]
    coeffs = torch.empty(batch, n_classes, dtype=torch.float32, device=features.device)
    rows = rows or row_block(batch, features.device)
    if batch:
        _coefficients_kernel[(triton.cdiv(batch, rows),)](
            grad, features, prototypes, mask, labels, lse, coeffs, batch, n_classes, dim,
            *features.stride(), prototypes.stride(0), ROWS=rows, CLASSES=CLASSES,
            COLUMNS=COLUMNS, num_warps=4)
    return coeffs
