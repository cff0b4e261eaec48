"""D&R under DDP (gloo, 2 CPU processes): distributed k-means and purity over feature shards,
identical re-initialisation on every rank, disagreement detected."""

import torch
from distributed_utils import run_ranks, values
from sklearn.datasets import make_blobs
from torch import nn

import fastbml
from fastbml.kmeans import kmeans
from fastbml.purity import minmax_scale


def data(n=600, k=5, std=3.0, seed=0):
    x, y = make_blobs(n_samples=n, centers=k, n_features=10, cluster_std=std, random_state=seed)
    return torch.from_numpy(x).float(), torch.from_numpy(y)


def shard(t, rank, world):
    return t.tensor_split(world)[rank]


def kmeans_ranks(rank, world, init):
    x, y = data()
    local = shard(minmax_scale(x), rank, world)
    scaled_globally = minmax_scale(shard(x, rank, world), torch.distributed.group.WORLD)
    result = kmeans(scaled_globally, 5, init=init, group=torch.distributed.group.WORLD)
    purity = fastbml.cluster_purity(shard(x, rank, world), shard(y, rank, world), 5, seed=0)
    return torch.equal(local, scaled_globally), result.labels, float(result.inertia), purity


def test_distributed_kmeans_equals_single_process_from_the_same_start():
    x, y = data()
    init = minmax_scale(x)[:5].clone()
    ranks = values(run_ranks(kmeans_ranks, init))
    single = kmeans(minmax_scale(x), 5, init=init)
    assert all(same_scaling for same_scaling, *_ in ranks)
    assert torch.equal(torch.cat([labels for _, labels, _, _ in ranks]), single.labels)
    assert abs(ranks[0][2] - float(single.inertia)) <= 1e-4 * float(single.inertia)
    purities = [p for *_, p in ranks]
    assert purities[0] == purities[1]
    assert abs(purities[0] - fastbml.cluster_purity(x, y, 5, seed=0)) <= 0.01


def relearn_ranks(rank, world, every):
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(10, 6), "b": nn.Linear(10, 6)})
    dr = fastbml.DiagnoseRelearn(dict(model), every=every, times=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    x, y = data(seed=1)
    xv, yv = data(n=300, std=6.0, seed=2)
    train = ({"a": shard(x, rank, world), "b": shard(x * 2, rank, world)}, shard(y, rank, world))
    held = ({"a": shard(xv, rank, world), "b": shard(xv, rank, world)}, shard(yv, rank, world))
    try:
        reports = [dr.step(epoch, train, held) for epoch in range(3)]
    except ValueError as err:
        return str(err)
    return reports[1], [p.detach().clone() for p in model.parameters()]


def test_replicas_relearn_identically():
    (report0, params0), (report1, params1) = values(run_ranks(relearn_ranks, 1))
    assert report0 == report1 and report0["relearn_a"] > 0.0
    assert all(torch.equal(p, q) for p, q in zip(params0, params1))


def disagree_ranks(rank, world):
    return relearn_ranks(rank, world, 1 + rank)


def test_ranks_that_disagree_fail_at_the_first_step():
    for message in values(run_ranks(disagree_ranks)):
        assert "ranks disagree on every" in message


def uneven_ranks(rank, world):
    x, y = data(n=40, k=3, seed=4)
    mine = slice(0, 0) if rank == 1 else slice(0, 40)  # rank 1 holds no rows at all
    return fastbml.cluster_purity(x[mine], y[mine], 3, seed=0)


def test_a_rank_without_rows_still_takes_part():
    x, y = data(n=40, k=3, seed=4)
    purities = values(run_ranks(uneven_ranks))
    assert purities[0] == purities[1]
    assert abs(purities[0] - fastbml.cluster_purity(x, y, 3, seed=0)) <= 0.01
