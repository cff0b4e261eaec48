"""Evaluation metrics computed on device from logits and labels: accuracy, macro-F1, mAP."""

from __future__ import annotations

import torch


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty split is undefined")
    return float((logits.argmax(dim=1) == labels).float().mean())


def macro_f1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """F1 averaged over the classes that occur in the labels or the predictions (sklearn's rule)."""
    c = logits.shape[1]
    pred = logits.argmax(dim=1)
    tp = torch.bincount(labels[pred == labels], minlength=c).float()
    n_pred = torch.bincount(pred, minlength=c).float()
    n_true = torch.bincount(labels, minlength=c).float()
    present = (n_pred + n_true) > 0
    f1 = 2 * tp / (n_pred + n_true).clamp_min(1)
    return float(f1[present].mean())


def mean_average_precision(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """One-vs-rest average precision of the softmax scores, averaged over classes with positives."""
    c = logits.shape[1]
    probs = torch.softmax(logits.float(), dim=1)
    order = torch.argsort(probs, dim=0, descending=True, stable=True)  # [N, C]
    hits = (labels[order] == torch.arange(c, device=labels.device)).float()
    ranks = torch.arange(1, hits.shape[0] + 1, device=hits.device, dtype=torch.float32)[:, None]
    precision = hits.cumsum(dim=0) / ranks
    positives = hits.sum(dim=0)
    ap = (precision * hits).sum(dim=0) / positives.clamp_min(1)
    return float(ap[positives > 0].mean())


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor,
                           unimodal: dict[str, torch.Tensor]) -> dict[str, float]:
    """acc, macro_f1, map of the fused logits and acc_<modality> of each uni-modal prediction."""
    out = {"acc": accuracy(logits, labels), "macro_f1": macro_f1(logits, labels),
           "map": mean_average_precision(logits, labels)}
    out.update({f"acc_{m}": accuracy(u, labels) for m, u in unimodal.items()})
    return out
