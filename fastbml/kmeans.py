"""k-means on the device in PyTorch (Lloyd), with k-means++ restarts, over one or many ranks.

One k-means++ start gives partitions that differ from seed to seed (two blobs merged, another
split), so a diagnosis built on one run swings by 0.1-0.2 in purity. `kmeans` therefore runs
`n_init` k-means++ starts, each followed by Lloyd iterations, all batched into one matrix
product per iteration on a random sample of the points, keeps the lowest-inertia solution, and
refines it with Lloyd on every point until it converges (scikit-learn's rule: no label changes,
or a centroid shift below `tol` times the mean feature variance).

Under torch.distributed each rank passes its own shard of the points: the restarts run on a
sample gathered from every rank (identical on all ranks, so they agree on the start without
further communication), and each refinement step all-reduces the centroid sums and counts:
no rank holds more than its shard and the sample.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .distributed import all_reduce_sum_

# Upper bound on the elements of one block of the point-centroid distance matrix.
_BLOCK_ELEMENTS = 1 << 25

# The restarts run on a sample of max(SAMPLE_MIN, SAMPLE_PER_CLUSTER * k) points, projected on
# its top max(PROJECTED_MIN, 2k) principal directions (k-means costs are nearly preserved there,
# and the restarts get several times cheaper), for at most START_ITERS Lloyd iterations. Only
# the winner goes on, in the full space, to every point, where the iterations cost the most.
SAMPLE_MIN, SAMPLE_PER_CLUSTER, PROJECTED_MIN, START_ITERS = 4096, 64, 32, 50


@dataclass
class KMeansResult:
    labels: torch.Tensor      # [N] int64: each (local) point's cluster
    centroids: torch.Tensor   # [k, D] float32
    inertia: torch.Tensor     # 0-dim float32: sum of squared distances to the centroids (global)
    n_iter: int               # Lloyd iterations of the refinement on all points


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """||x_i||^2 per row."""
    return torch.linalg.vector_norm(x, dim=1).square_()


def mean_variance(x: torch.Tensor, x_sq: torch.Tensor, group: object | None) -> torch.Tensor:
    """Mean over features of each feature's variance, over all ranks' points:
    (E||x||^2 - ||E x||^2) / D."""
    stats = torch.cat([x.sum(0, dtype=torch.float64), x_sq.sum(dtype=torch.float64)[None],
                       torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)])
    all_reduce_sum_(stats, group)
    count = stats[-1].clamp(min=1.0)
    mean = stats[:-2] / count
    return ((stats[-2] / count - (mean * mean).sum()) / x.shape[1]).clamp(min=0.0)


def _nearest(x: torch.Tensor, x_sq: torch.Tensor, centroids: torch.Tensor,
             groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance to, and index of, the nearest centroid within each of `groups` equal
    column groups of `centroids` ([groups * k, D]): ([N, groups], [N, groups])."""
    n = x.shape[0]
    k = centroids.shape[0] // groups
    c_sq = (centroids * centroids).sum(1)
    rows = max(1, _BLOCK_ELEMENTS // max(centroids.shape[0], 1))
    dist_out = torch.empty(n, groups, dtype=x.dtype, device=x.device)
    index_out = torch.empty(n, groups, dtype=torch.long, device=x.device)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        d = torch.addmm(c_sq, x[lo:hi], centroids.T, alpha=-2.0).add_(x_sq[lo:hi, None])
        torch.min(d.view(hi - lo, groups, k), dim=2, out=(dist_out[lo:hi], index_out[lo:hi]))
    return dist_out.clamp_(min=0.0), index_out


def _kmeans_plus_plus(x: torch.Tensor, x_sq: torch.Tensor, k: int, starts: int,
                      generator: torch.Generator) -> torch.Tensor:
    """`starts` independent greedy k-means++ seedings of x: [starts, k, D].

    Each new centroid is the best (lowest resulting inertia) of 2 + ln(k) candidates drawn by
    D^2 sampling, as scikit-learn does: markedly better starts than plain k-means++."""
    trials = 2 + int(math.log(k))
    rows = torch.arange(starts, device=x.device)
    first = torch.randint(0, x.shape[0], (starts,), generator=generator, device=x.device)
    centroids = x.new_empty(starts, k, x.shape[1])
    centroids[:, 0] = x[first]
    closest = _nearest(x, x_sq, centroids[:, 0], groups=starts)[0].T.contiguous()  # [starts, n]
    for j in range(1, k):
        # D^2 sampling; `tiny` keeps a row valid when every point coincides with a centroid.
        picks = torch.multinomial(closest + torch.finfo(torch.float32).tiny, trials,
                                  replacement=True, generator=generator)          # [starts, T]
        d = _nearest(x, x_sq, x[picks.flatten()], groups=starts * trials)[0]      # [n, starts*T]
        candidates = torch.minimum(closest[:, None, :], d.T.view(starts, trials, -1))
        best = candidates.sum(2).argmin(1)
        closest = candidates[rows, best]
        centroids[:, j] = x[picks[rows, best]]
    return centroids


def _lloyd_step(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
                group: object | None) -> torch.Tensor:
    """New centroids [k', D] from the points' labels (in [0, k')); an empty cluster keeps its
    centroid. Sums and counts are all-reduced over `group` (one collective)."""
    k = centroids.shape[0]
    sums = torch.zeros_like(centroids).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    if group is not None:
        packed = all_reduce_sum_(torch.cat([sums, counts[:, None]], dim=1), group)
        sums, counts = packed[:, :-1], packed[:, -1]
    counts = counts[:, None]
    return torch.where(counts > 0, sums / counts.clamp(min=1.0), centroids)


def _sample(x: torch.Tensor, size: int, generator: torch.Generator,
            group: object | None) -> torch.Tensor:
    """Up to `size` random points; under a group, up to an equal share from every rank (a rank
    with fewer points gives what it has), the same sample on every rank."""
    if group is None:
        if size >= x.shape[0]:
            return x
        return x[torch.randperm(x.shape[0], generator=generator, device=x.device)[:size]]
    world = dist.get_world_size(group)
    mine = min(x.shape[0], math.ceil(size / world))
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([mine], device=x.device), group=group)
    counts = [int(c) for c in counts]
    padded = x.new_zeros(max(counts), x.shape[1])
    padded[:mine] = x[torch.randperm(x.shape[0], generator=generator, device=x.device)[:mine]]
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def _best_start(sample: torch.Tensor, k: int, n_init: int, max_iter: int, tol: float,
                generator: torch.Generator) -> torch.Tensor:
    """The lowest-inertia of `n_init` k-means++ + Lloyd runs on `sample`: [k, D]. The runs
    iterate together (one matrix product per step); a run leaves the batch once converged."""
    s_sq = squared_norms(sample)
    runs = _kmeans_plus_plus(sample, s_sq, k, n_init, generator)              # [n_init, k, D]
    threshold = tol * float(mean_variance(sample, s_sq, None))
    active = torch.arange(n_init, device=sample.device)
    offsets = active * k
    points = sample.repeat(n_init, 1)
    for _ in range(max_iter):
        count = active.numel()
        current = runs[active]
        labels = _nearest(sample, s_sq, current.view(count * k, -1), groups=count)[1]
        updated = _lloyd_step(points[:count * sample.shape[0]],
                              (labels + offsets[:count]).T.reshape(-1),
                              current.view(count * k, -1), None).view(count, k, -1)
        runs[active] = updated
        active = active[((updated - current) ** 2).sum((1, 2)) > threshold]
        if active.numel() == 0:
            break
    inertia = _nearest(sample, s_sq, runs.view(n_init * k, -1), groups=n_init)[0].sum(0)
    return runs[int(inertia.argmin())]


def sample_size_for(n_clusters: int) -> int:
    """Points the restarts run on."""
    return max(SAMPLE_MIN, SAMPLE_PER_CLUSTER * n_clusters)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """On the CPU, torch's intra-op threads pinned to 1 for the block: the covariance product
    over the sample's rows and the eigensolver split their sums by the thread count, and a last
    bit's difference can change the projection, the winning restart and the purity."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _principal_projection(sample: torch.Tensor, dims: int) -> torch.Tensor:
    """The centred sample in the basis of its top `dims` principal directions (the same bits
    whatever the CPU thread count: a small [D, D] problem, computed on one thread)."""
    with _one_cpu_thread(sample.device):
        centred = sample - sample.mean(dim=0)
        basis = torch.linalg.eigh(centred.T @ centred)[1][:, -dims:]
        return (centred @ basis).contiguous()


def initial_centroids(x: torch.Tensor, n_clusters: int, *, n_init: int, max_iter: int,
                      tol: float, seed: int, sample_size: int | None = None,
                      group: object | None = None) -> torch.Tensor:
    """The best (lowest-inertia) of `n_init` k-means++ + Lloyd runs on a random sample: [k, D],
    the same on every rank of `group`."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    sample = _sample(x, sample_size or sample_size_for(n_clusters), generator, group)
    dims = max(PROJECTED_MIN, 2 * n_clusters)
    space = _principal_projection(sample, dims) if dims < x.shape[1] else sample
    start = _best_start(space, n_clusters, n_init, min(max_iter, START_ITERS), tol, generator)
    labels = _nearest(space, squared_norms(space), start)[1][:, 0]
    # back in the full space: each cluster's mean (a cluster left empty keeps a random point)
    fallback = sample[torch.randint(0, sample.shape[0], (n_clusters,), generator=generator,
                                    device=x.device)]
    return _lloyd_step(sample, labels, fallback, None)


def kmeans(x: torch.Tensor, n_clusters: int, *, n_init: int = 10, max_iter: int = 300,
           tol: float = 1e-4, seed: int = 0, init: torch.Tensor | None = None,
           sample_size: int | None = None, group: object | None = None) -> KMeansResult:
    """k-means of the float32 points x [N, D] (this rank's shard under `group`).

    `init` ([k, D]) replaces the restarts with given starting centroids. Arguments are trusted
    (`fastbml.cluster_purity` validates them); with a group every rank must pass the same
    settings and seed.
    """
    if init is None:
        centroids = initial_centroids(x, n_clusters, n_init=n_init, max_iter=max_iter, tol=tol,
                                      seed=seed, sample_size=sample_size, group=group)
    else:
        centroids = init.to(x, copy=True)
    if group is not None:  # identical starts, even if a rank's linear algebra rounded otherwise
        dist.broadcast(centroids, src=dist.get_global_rank(group, 0), group=group)
    x_sq = squared_norms(x)
    threshold = float(tol * mean_variance(x, x_sq, group))
    n_iter = 0
    while n_iter < max_iter:  # unchanged labels give unchanged centroids: shift 0, converged
        n_iter += 1
        labels = _nearest(x, x_sq, centroids)[1][:, 0]
        updated = _lloyd_step(x, labels, centroids, group)
        shift = float(((updated - centroids) ** 2).sum())
        centroids = updated
        if shift <= threshold:
            break
    distances, labels = _nearest(x, x_sq, centroids)
    inertia = all_reduce_sum_(distances.sum().to(torch.float32), group)
    return KMeansResult(labels[:, 0], centroids, inertia, n_iter)
