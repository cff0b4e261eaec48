"""D&R's diagnosis: how well k-means clusters of a modality's features match the labels
(docs/methods.md#diagnosis).

purity = fraction of samples whose label is the majority label of their cluster, after scaling
every feature column to [-1, 1] with the split's own min and max. k-means (`kmeans=`) runs on one of:
  - "faiss":   FAISS (GPU with faiss-gpu, CPU otherwise) on every point, from fastbml's
               k-means++ restarts;
  - "torch":   fastbml's device k-means (fastbml.kmeans); the only one that runs distributed;
  - "sklearn": scikit-learn's KMeans (k-means++, n_init restarts): the authors' reference path.
"auto" takes faiss on a GPU with faiss-gpu, torch otherwise (also the faster one on CPU).
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch
import torch.distributed as dist

from . import distributed
from ._checks import integer, renamed_keyword
from .kmeans import initial_centroids, mean_variance, squared_norms
from .kmeans import kmeans as device_kmeans

KMEANS_IMPLEMENTATIONS = ("faiss", "torch", "sklearn")


@functools.cache
def _faiss_gpus() -> int:
    if importlib.util.find_spec("faiss") is None:
        return -1
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def check_kmeans(kmeans: object) -> str:
    """`kmeans` if it names a k-means implementation or "auto", else a ValueError."""
    if kmeans not in (*KMEANS_IMPLEMENTATIONS, "auto"):
        raise ValueError(f"kmeans must be one of {(*KMEANS_IMPLEMENTATIONS, 'auto')}, got "
                         f"{kmeans!r}")
    return kmeans


def resolve_kmeans(kmeans: str, device: torch.device, distributed_run: bool) -> str:
    """The k-means implementation for features on `device` ("auto" resolved, availability
    checked)."""
    if check_kmeans(kmeans) == "auto":
        return "faiss" if device.type == "cuda" and _faiss_gpus() > 0 and not distributed_run \
            else "torch"
    if distributed_run and kmeans != "torch":
        raise ValueError(f"kmeans {kmeans!r} cannot cluster features sharded over ranks; use "
                         "'torch' (or 'auto') for the distributed k-means")
    if kmeans == "faiss" and _faiss_gpus() < 0:
        raise RuntimeError("kmeans 'faiss' needs the faiss package: pip install faiss-cpu "
                           "(or faiss-gpu)")
    if kmeans == "sklearn" and importlib.util.find_spec("sklearn") is None:
        raise RuntimeError("kmeans 'sklearn' needs scikit-learn: pip install scikit-learn")
    return kmeans


def minmax_scale(x: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """Every column mapped to [-1, 1] by its min and max (over all ranks of `group`); a constant
    column maps to -1, as scikit-learn's MinMaxScaler does. float32 result."""
    x = x.to(torch.float32)
    return _scale(x, *_column_range(x), group)


def _column_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's column minima and maxima (+inf / -inf for no rows)."""
    if x.shape[0]:
        return x.amin(dim=0), x.amax(dim=0)
    low = torch.full(x.shape[1:], torch.inf, device=x.device)
    return low, -low


def _scale(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
           group: object | None) -> torch.Tensor:
    if group is not None:
        low, high = low.clone(), high.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    span = high - low
    scale = torch.where(span > 0, 2.0 / torch.where(span > 0, span, 1.0), 0.0)
    return torch.addcmul(-1.0 - low * scale, x, scale)  # one pass: (x - low) * scale - 1


def purity_from_clusters(clusters: torch.Tensor, labels: torch.Tensor, n_clusters: int,
                         num_classes: int, group: object | None = None) -> torch.Tensor:
    """Σ_clusters max_c |{i in cluster : y_i = c}| / n as a 0-dim float32 tensor: one bincount
    over cluster * C + label (counts summed over the ranks of `group`)."""
    counts = torch.bincount(clusters * num_classes + labels, minlength=n_clusters * num_classes)
    counts = distributed.all_reduce_sum_(counts, group).view(n_clusters, num_classes)
    return counts.max(dim=1).values.sum().to(torch.float32) / counts.sum().clamp(min=1)


def _faiss_clusters(x: torch.Tensor, k: int, n_init: int, max_iter: int, tol: float,
                    seed: int) -> torch.Tensor:
    """FAISS Lloyd on every point from the best k-means++ restart, checked for convergence
    every few iterations (FAISS itself runs a fixed number)."""
    import faiss

    start = initial_centroids(x, k, n_init=n_init, max_iter=max_iter, tol=tol, seed=seed)
    points = np.ascontiguousarray(x.cpu().numpy())
    centroids = start.cpu().numpy()
    threshold = tol * float(mean_variance(x, squared_norms(x), None))
    per_call = 10
    for _ in range(0, max_iter, per_call):
        km = faiss.Kmeans(points.shape[1], k, niter=per_call, seed=seed, verbose=False,
                          max_points_per_centroid=points.shape[0], min_points_per_centroid=1,
                          gpu=x.device.type == "cuda" and _faiss_gpus() > 0)
        km.train(points, init_centroids=centroids)
        shift = float(((km.centroids - centroids) ** 2).sum())
        centroids = km.centroids
        if shift <= threshold * per_call:
            break
    _, assigned = km.index.search(points, 1)
    return torch.from_numpy(assigned[:, 0].astype(np.int64)).to(x.device)


def _sklearn_clusters(x: torch.Tensor, k: int, n_init: int, max_iter: int, tol: float,
                      seed: int) -> torch.Tensor:
    from sklearn.cluster import KMeans

    fitted = KMeans(n_clusters=k, n_init=n_init, max_iter=max_iter, tol=tol,
                    random_state=seed).fit(x.cpu().numpy())
    return torch.from_numpy(fitted.labels_.astype(np.int64)).to(x.device)


def _check_inputs(features: object, labels: object, n_clusters: object,
                  group: object | None) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate (over all ranks of `group`); returns the number of classes the labels show, the
    features as float32 and this rank's column minima and maxima (which also reveal NaN/Inf)."""
    if not isinstance(features, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("features and labels must be tensors, got "
                        f"{type(features).__name__} and {type(labels).__name__}")
    if features.dim() != 2 or features.shape[1] == 0:
        raise ValueError(f"features must be [N, D] with D >= 1, got shape "
                         f"{tuple(features.shape)}")
    if not (features.dtype.is_floating_point):
        raise TypeError(f"features must be floating point, got {features.dtype}")
    if labels.dim() != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must be [N] with N = features.shape[0] = {features.shape[0]}, "
                         f"got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 1:
        raise ValueError(f"n_clusters must be a positive int, got {n_clusters!r}")
    x = features.detach().to(torch.float32)
    low, high = _column_range(x)
    finite = torch.isfinite(low) & torch.isfinite(high) if features.shape[0] else \
        torch.ones_like(low, dtype=torch.bool)
    stats = torch.stack([
        torch.tensor(features.shape[0], device=features.device, dtype=torch.float64),
        (~finite).sum().to(torch.float64),
        (labels < 0).sum().to(torch.float64),
    ])
    distributed.all_reduce_sum_(stats, group)
    top = labels.max().to(torch.float64) if labels.numel() else \
        torch.tensor(-1.0, dtype=torch.float64, device=labels.device)
    if group is not None:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    n, bad_values, negative = (int(v) for v in stats.tolist())
    if bad_values:
        raise ValueError(f"features hold NaN/Inf values (in {bad_values} columns)")
    if negative:
        raise ValueError(f"labels must be >= 0, got {negative} negative labels")
    if n < n_clusters:
        raise ValueError(f"n_clusters = {n_clusters} exceeds the number of samples ({n})")
    return int(top) + 1, x, low, high


def cluster_purity(features: torch.Tensor, labels: torch.Tensor, n_clusters: int, *,
                   kmeans: str = "auto", seed: int = 0, n_init: int = 10, max_iter: int = 300,
                   tol: float = 1e-4, num_classes: int | None = None,
                   group: object = distributed.GROUP_AUTO, backend: str | None = None) -> float:
    """Purity of k-means clusters of `features` [N, D] against `labels` [N] (docs/methods.md#diagnosis).

    Columns are min-max scaled to [-1, 1] first. Under torch.distributed each rank passes its
    shard and every rank gets the purity of the union (group=None: this process's data only).
    The restarts (`n_init`) make the value stable across seeds; `seed` fixes it exactly.
    `kmeans` picks the k-means implementation (module docstring); `backend=` is its deprecated
    name.
    """
    kmeans = renamed_keyword("backend", backend, "kmeans", kmeans, "auto")
    group = distributed.resolve_group(group)
    found_classes, x, low, high = _check_inputs(features, labels, n_clusters, group)
    if num_classes is None:
        num_classes = found_classes
    elif found_classes > num_classes:
        raise ValueError(f"labels go up to {found_classes - 1}, outside num_classes = "
                         f"{num_classes}")
    for name, value in (("n_init", n_init), ("max_iter", max_iter)):
        integer(value, name, low=1)
    kmeans = resolve_kmeans(kmeans, features.device, group is not None)
    x = _scale(x, low, high, group)
    labels = labels.to(torch.long)
    if kmeans == "torch":
        clusters = device_kmeans(x, n_clusters, n_init=n_init, max_iter=max_iter, tol=tol,
                                 seed=seed, group=group).labels
    else:
        fit = _faiss_clusters if kmeans == "faiss" else _sklearn_clusters
        clusters = fit(x, n_clusters, n_init, max_iter, tol, seed)
    return float(purity_from_clusters(clusters, labels, n_clusters, num_classes, group))
