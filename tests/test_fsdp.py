"""The methods under FSDP2 (`fully_shard`; gloo, 2 CPU processes, and HSDP on a 2 x 2 mesh of
4): sharded OGM-GE equals one process modulating the whole gradients (noise included, uneven
and empty shards), soft re-initialisation equals the unsharded one, D&R's sharded snapshot
round-trips through its state_dict and torch.distributed.checkpoint, OPM runs per rank, and
unsupported layouts are refused (docs/design.md#fsdp2)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_utils import run_ranks, values
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fastbml
from fastbml import rng

GLOBAL_BATCH, SEED = 16, 21
BACKENDS = ("torch", "cpp", "triton")


class Net(nn.Module):
    """Encoders whose weights shard unevenly over 2 and 4 ranks: dim 0 of 7, 5, 9 and 1 (the
    last leaves the second rank an empty shard)."""

    def __init__(self):
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 5))
        self.visual = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 1))
        self.head = nn.Linear(6, 4)

    def forward(self, a, v):
        fa, fv = self.audio(a), self.visual(v)
        u_a, u_v = fastbml.concat_unimodal_logits([fa, fv], self.head.weight, self.head.bias)
        return self.head(torch.cat([fa, fv], dim=1)), u_a, u_v


def global_batch(step=0):
    g = torch.Generator().manual_seed(300 + step)
    return (torch.randn(GLOBAL_BATCH, 10, generator=g) * 2,
            torch.randn(GLOBAL_BATCH, 6, generator=g),
            torch.randint(0, 4, (GLOBAL_BATCH,), generator=g))


def sharded_net(hsdp: bool = False) -> Net:
    torch.manual_seed(0)
    model = Net()
    mesh = (init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")) if hsdp
            else None)
    for module in (model.audio, model.visual, model):
        fully_shard(module, mesh=mesh)
    return model


class Allocations(TorchDispatchMode):
    """Records every op's name and the sizes of the tensors it returns (views excepted), and
    the size of the process group of each of fastbml's all_reduces."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[int]]] = []
        self.group_sizes: list[int] = []
        self._all_reduce = fastbml.distributed.all_reduce_sum_

    def __enter__(self):
        def all_reduce(tensor, group):
            self.group_sizes.append(dist.get_world_size(group))
            return self._all_reduce(tensor, group)
        fastbml.distributed.all_reduce_sum_ = all_reduce
        return super().__enter__()

    def __exit__(self, *exc):
        fastbml.distributed.all_reduce_sum_ = self._all_reduce
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # aliases its input: allocates nothing
            return out
        self.ops.append((str(func), [t.numel() for t in tree_leaves(out)
                                     if isinstance(t, torch.Tensor)]))
        return out


def ogm_groups(model):
    """The audio weights with a plain (unsharded) parameter between them, whose gradient every
    rank holds whole, and the visual encoder."""
    extra = nn.Parameter(torch.empty(3, 4))
    extra.grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    return {"audio": [model.audio[0].weight, extra, model.audio[2].weight],
            "visual": model.visual}


def whole(t):
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t.clone()


def ogm_ranks(rank, world, hsdp):
    """Per backend: the whole gradients before OGM-GE (gathered here, for the test only), the
    coefficients, the whole gradients after, and what the step allocated and communicated."""
    out = {}
    for backend in BACKENDS:
        model = sharded_net(hsdp)
        ogm = fastbml.OGM(ogm_groups(model), alpha=0.8, seed=SEED, backend=backend)
        a, v, y = (t.chunk(world)[rank] for t in global_batch())
        z, u_a, u_v = model(a, v)
        F.cross_entropy(z, y).backward()
        grads = [p.grad for group in ogm.params for p in group]
        assert [isinstance(g, torch.distributed.tensor.DTensor) for g in grads] == [
            True, False, True, True, True]
        before = [whole(g) for g in grads]
        with Allocations() as record:
            ogm.step({"audio": u_a, "visual": u_v}, y, epoch=0)
        out[backend] = {"before": before, "after": [whole(g) for g in grads],
                        "coeffs": ogm.last_coeffs.clone(), "ops": record.ops,
                        "group_sizes": record.group_sizes,
                        "local": [g.to_local().numel() if isinstance(
                            g, torch.distributed.tensor.DTensor) else g.numel() for g in grads],
                        "placements": [str(getattr(g, "placements", None)) for g in grads]}
    return out


def single_process_ogm(backend):
    """OGM-GE on one process, the whole model and the global batch."""
    torch.manual_seed(0)
    model = Net()
    ogm = fastbml.OGM(ogm_groups(model), alpha=0.8, seed=SEED, backend=backend)
    a, v, y = global_batch()
    z, u_a, u_v = model(a, v)
    F.cross_entropy(z, y).backward()
    ogm.step({"audio": u_a, "visual": u_v}, y, epoch=0)
    return ogm.last_coeffs, [p.grad for group in ogm.params for p in group]


def check_ogm(results, n_sharded, group_sizes):
    """`n_sharded`: the DTensor gradients (3 moments each are reduced); `group_sizes`: those of
    the scores' and of the moments' all_reduce."""
    for backend in BACKENDS:
        ranks = [r[backend] for r in results]
        for r in ranks[1:]:  # every rank holds the same whole gradients
            assert all(torch.equal(a, b) for a, b in zip(r["after"], ranks[0]["after"]))
        first = ranks[0]
        # the same whole gradients modulated by one process, with the same seed: equal noise
        grads = [g.clone() for g in first["before"]]
        params = [nn.Parameter(torch.empty_like(g)) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g
        fastbml.ogm_modulate_([params[:3], params[3:]], first["coeffs"],
                              seed=rng.step_seed(SEED, 0), backend=backend)
        for p, after, before in zip(params, first["after"], first["before"]):
            torch.testing.assert_close(after, p.grad, rtol=1e-6, atol=1e-7)
            assert not torch.allclose(after, before * 1.0, atol=1e-4)  # noise was added
        # and one process on the global batch: the same coefficients and gradients
        coeffs, single = single_process_ogm(backend)
        torch.testing.assert_close(first["coeffs"], coeffs, rtol=1e-5, atol=1e-6)
        for after, g in zip(first["after"], single):
            torch.testing.assert_close(after, g, rtol=1e-4, atol=1e-5)
        # communicated: the M scores and one [T, 3] float64 moments tensor (the T DTensor
        # gradients' rows, the plain one's not), nothing else
        collectives = [(op, sizes) for op, sizes in first["ops"] if op.startswith("c10d")]
        assert sorted(sizes[0] for _, sizes in collectives) == [2, 3 * n_sharded], collectives
        assert all("allreduce" in op for op, _ in collectives)
        assert first["group_sizes"] == group_sizes
        # allocated by the modulation (after the scores' all_reduce): nothing as large as a
        # whole gradient that this rank holds only part of
        wholes = [g.numel() for g, n in zip(first["before"], first["local"]) if n < g.numel()]
        if backend == "cpp":
            start = next(i for i, (op, _) in enumerate(first["ops"]) if op.startswith("c10d"))
            biggest = max(max(sizes, default=0) for _, sizes in first["ops"][start + 1:])
            assert biggest < min(wholes), first["ops"][start:]


def test_ogm_ge_under_fsdp2_equals_one_process_on_the_whole_gradients():
    results = values(run_ranks(ogm_ranks, False))
    assert results[0]["cpp"]["placements"][0] == "(Shard(dim=0),)"
    assert results[1]["cpp"]["local"] == [3 * 10, 12, 2 * 7, 4 * 6, 0]  # uneven, one empty
    check_ogm(results, 4, [2, 2])


def hsdp_ranks(rank, world):
    """Everything tested on the 2 x 2 HSDP mesh, in one spawn of 4 processes."""
    return {"ogm": ogm_ranks(rank, world, True), "relearn": hsdp_relearn_ranks(rank, world)}


@pytest.fixture(scope="module")
def hsdp_results():
    return values(run_ranks(hsdp_ranks, world=4))


def test_ogm_ge_under_hsdp_reduces_moments_over_the_shard_dimension(hsdp_results):
    results = [r["ogm"] for r in hsdp_results]
    assert results[0]["cpp"]["placements"][0] == "(Replicate(), Shard(dim=0))"
    check_ogm(results, 4, [4, 2])  # scores over the 4 ranks, moments over a shard group of 2


# ---------------------------------------------------------------------------- D&R


def relearn_ranks(rank, world, path):
    model = sharded_net()
    dr = fastbml.DiagnoseRelearn({"audio": model.audio, "visual": model.visual}, every=1,
                                 times=1)
    snapshot = dr.state_dict()["init_params"]
    assert all(isinstance(p, torch.distributed.tensor.DTensor) and p.placements == (Shard(0),)
               for group in snapshot for p in group)
    with torch.no_grad():  # training moved the weights
        for p in model.parameters():
            p.add_(torch.full_like(p, 0.5))
    moved = [p.detach().full_tensor() for p in model.parameters()]
    dr.relearn({"audio": 0.25, "visual": 0.75})  # first call: the ranks' agreement check
    with Allocations() as record:  # then local: no communication
        dr.relearn({"audio": 0.0, "visual": 0.0})
    assert record.ops and not [op for op, _ in record.ops if op.startswith("c10d")]
    relearned = [p.detach().full_tensor() for p in model.parameters()]
    # state_dict round trip through torch.distributed.checkpoint, into a fresh helper
    import torch.distributed.checkpoint as dcp

    dcp.save({"dr": dr.state_dict()}, checkpoint_id=path)
    other = sharded_net()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(3.0)  # a different "initialisation"
    fresh = fastbml.DiagnoseRelearn({"audio": other.audio, "visual": other.visual}, every=1)
    state = {"dr": fresh.state_dict()}
    dcp.load(state, checkpoint_id=path)
    fresh.load_state_dict(state["dr"])
    restored = [[p.full_tensor() for p in group] for group in fresh.init_params]
    # a whole (unsharded) snapshot loads into the sharded helper too
    whole = {"count": 1, "init_params": restored, "config": None}
    again = fastbml.DiagnoseRelearn({"audio": other.audio, "visual": other.visual}, every=1)
    again.load_state_dict(whole)
    assert all(torch.equal(p.full_tensor(), q) for g, h in zip(again.init_params, restored)
               for p, q in zip(g, h))
    return moved, relearned, restored, fresh.count


def test_soft_reinit_of_sharded_encoders_equals_the_unsharded_one(tmp_path):
    results = values(run_ranks(relearn_ranks, str(tmp_path / "checkpoint")))
    moved, relearned, restored, count = results[0]
    # the encoders' 8 tensors re-learned, the head's 2 left alone
    assert [torch.equal(a, b) for a, b in zip(moved, relearned)] == [False] * 8 + [True] * 2
    torch.manual_seed(0)
    model = Net()
    init = [[p.detach().clone() for p in m.parameters()] for m in (model.audio, model.visual)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    groups = [list(model.audio.parameters()), list(model.visual.parameters())]
    fastbml.soft_reinit_(groups, init, [0.25, 0.75])
    for p, q in zip(model.parameters(), relearned):
        torch.testing.assert_close(q, p.detach(), rtol=0, atol=0)
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r[1], relearned))
    for g, h in zip(restored, init):  # the snapshot saved and loaded is the initialisation
        for p, q in zip(g, h):
            assert torch.equal(p, q)
    assert count == 0


def hsdp_relearn_ranks(rank, world):
    """D&R on a 2 x 2 HSDP mesh: replica 1 starts from a perturbed snapshot, which the
    first-step agreement replaces with replica 0's, shard by shard."""
    model = sharded_net(hsdp=True)
    dr = fastbml.DiagnoseRelearn({"audio": model.audio, "visual": model.visual}, every=1)
    replica = model.audio[0].weight.device_mesh.get_coordinate()[0]
    if replica == 1:
        with torch.no_grad():
            for group in dr.init_params:
                for p in group:
                    p.add_(1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    dr.relearn({"audio": 0.5, "visual": 1.0})
    return [p.detach().full_tensor() for p in model.parameters()]


def test_soft_reinit_under_hsdp_takes_the_first_replicas_snapshot(hsdp_results):
    results = [r["relearn"] for r in hsdp_results]
    torch.manual_seed(0)
    model = Net()
    init = [[p.detach().clone() for p in m.parameters()] for m in (model.audio, model.visual)]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    fastbml.soft_reinit_([list(model.audio.parameters()), list(model.visual.parameters())],
                         init, [0.5, 1.0])
    for r in results:
        for p, q in zip(model.parameters(), r):
            torch.testing.assert_close(q, p.detach(), rtol=0, atol=0)


# ---------------------------------------------------------------------------- OPM


class OPMNet(Net):
    def __init__(self):
        super().__init__()
        self.opm = fastbml.OPM(["audio", "visual"], p_exe=1.0, seed=4)

    def forward(self, a, v, y):
        feats = {"audio": self.audio(a), "visual": self.visual(v)}
        u = fastbml.concat_unimodal_logits([feats["audio"], feats["visual"]],
                                           self.head.weight.detach(), self.head.bias.detach())
        out, w = self.opm(feats, dict(zip(("audio", "visual"), u)), y, epoch=0)
        dropped = torch.stack([(out[m] == 0).all(dim=1) for m in ("audio", "visual")])
        return self.head(torch.cat([out["audio"], out["visual"]], dim=1)), w, dropped


def opm_ranks(rank, world):
    torch.manual_seed(0)
    model = OPMNet()
    for module in (model.audio, model.visual, model):
        fully_shard(module)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    record = []
    for step in range(6):
        a, v, y = (t.chunk(world)[rank] for t in global_batch(step))
        logits, w, dropped = model(a, v, y)
        opt.zero_grad()
        (F.cross_entropy(logits, y, reduction="none") * w).sum().backward()
        opt.step()
        record.append((model.opm.last_q.clone(), dropped))
    return record, [p.detach().full_tensor() for p in model.parameters()]


def test_opm_under_fsdp2_shares_q_and_draws_masks_per_rank():
    (rec0, params0), (rec1, params1) = values(run_ranks(opm_ranks))
    for (q0, drop0), (q1, drop1) in zip(rec0, rec1):
        assert torch.equal(q0, q1)  # q of the global batch on both ranks
        assert not drop0[q0 == 0].any() and not drop1[q1 == 0].any()  # only the dominant one
    assert any(d0.any() for _, d0 in rec0)
    assert any(not torch.equal(d0, d1) for (_, d0), (_, d1) in zip(rec0, rec1))  # own masks
    assert all(torch.equal(a, b) for a, b in zip(params0, params1))


# ---------------------------------------------------------------------------- one rank


@pytest.fixture
def one_rank_mesh(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("placement", [Shard(0), Replicate()])
def test_dtensor_gradients_are_modulated_through_their_local_tensors(one_rank_mesh, backend,
                                                                     placement):
    """On a mesh of one rank a DTensor gradient is its local tensor: the same result as plain
    gradients, alongside plain ones (interleaved: the moments of rows 0, 2, 3 are reduced)."""
    shapes = [(8, 4), (1, 3), (5,), (3, 3), (2, 2)]
    grads = [torch.randn(s) + 0.1 for s in shapes]
    plain = [nn.Parameter(torch.empty(s)) for s in shapes]
    sharded = [nn.Parameter(distribute_tensor(torch.empty(s), one_rank_mesh, [placement])
                            if t in (0, 2, 3) else torch.empty(s))
               for t, s in enumerate(shapes)]
    for p, q, g in zip(plain, sharded, grads):
        p.grad = g.clone()
        q.grad = (distribute_tensor(g.clone(), one_rank_mesh, [placement])
                  if isinstance(q, torch.distributed.tensor.DTensor) else g.clone())
    coeffs = torch.tensor([0.6, 0.9])
    fastbml.ogm_modulate_([plain[:2], plain[2:]], coeffs, seed=3, backend=backend)
    fastbml.ogm_modulate_([sharded[:2], sharded[2:]], coeffs, seed=3, backend=backend)
    for p, q in zip(plain, sharded):
        got = q.grad.full_tensor() if isinstance(q.grad, torch.distributed.tensor.DTensor) \
            else q.grad
        torch.testing.assert_close(got, p.grad, rtol=1e-6, atol=1e-7)


def test_a_non_finite_shard_makes_only_its_tensor_non_finite(one_rank_mesh):
    p = nn.Parameter(distribute_tensor(torch.empty(6, 2), one_rank_mesh, [Shard(0)]))
    q = nn.Parameter(distribute_tensor(torch.empty(4, 3), one_rank_mesh, [Shard(0)]))
    bad = torch.randn(6, 2)
    bad[2, 1] = float("inf")
    p.grad = distribute_tensor(bad, one_rank_mesh, [Shard(0)])
    q.grad = distribute_tensor(torch.randn(4, 3), one_rank_mesh, [Shard(0)])
    fastbml.ogm_modulate_([[p], [q]], torch.tensor([0.5, 1.0]), seed=2, backend="cpp")
    assert not torch.isfinite(p.grad.to_local()).any()
    assert torch.isfinite(q.grad.to_local()).all()


def test_agm_scales_dtensor_gradients_through_their_local_tensors(one_rank_mesh):
    """AGM's scaling of sharded gradients equals that of plain ones (one rank)."""
    grads = [torch.randn(6, 4), torch.randn(5, 3)]
    results = []
    for sharded in (False, True):
        encoders = {"audio": nn.Linear(4, 6), "visual": nn.Linear(3, 5)}
        for enc, g in zip(encoders.values(), grads):
            if sharded:
                enc.weight = nn.Parameter(distribute_tensor(enc.weight.detach(), one_rank_mesh,
                                                            [Shard(0)]))
                enc.weight.grad = distribute_tensor(g.clone(), one_rank_mesh, [Shard(0)])
            else:
                enc.weight.grad = g.clone()
        agm = fastbml.AGM(encoders, nn.Linear(11, 4), weights_only=True, process_group=None)
        subsets = torch.randn(3, 8, 4, generator=torch.Generator().manual_seed(1))
        k = agm.update(subsets, torch.arange(8) % 4)
        results.append([whole(e.weight.grad) for e in encoders.values()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert not torch.allclose(k, torch.ones(2))


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("placement", [Shard(1), Partial()])
def test_unsupported_gradient_placements_are_refused_with_the_parameter_named(
        one_rank_mesh, placement):
    p = nn.Parameter(distribute_tensor(torch.randn(8, 4), one_rank_mesh, [Replicate()]))
    grad = distribute_tensor(torch.randn(8, 4), one_rank_mesh, [Replicate()])
    p.grad = grad.redistribute(one_rank_mesh, [placement]) if placement.is_shard() else \
        torch.distributed.tensor.DTensor.from_local(grad.to_local(), one_rank_mesh, [placement])
    q = nn.Parameter(torch.randn(3, 3))
    q.grad = torch.randn(3, 3)
    with pytest.raises(ValueError, match=rf"params\[0\]\[0\]\.grad is a DTensor with placement "
                                         rf"{type(placement).__name__}"):
        fastbml.ogm_modulate_([[p], [q]], torch.ones(2), backend="cpp")
    enc = nn.Linear(4, 8)
    enc.weight = p
    ogm = fastbml.OGM({"audio": enc, "visual": [q]}, alpha=0.5, seed=1)
    with pytest.raises(ValueError, match=r"params\[0\]\[0\]\.grad \(audio\.weight\) is a "
                                         "DTensor with placement"):
        ogm.step([torch.randn(4, 3), torch.randn(4, 3)], torch.zeros(4, dtype=torch.long), 0)


def test_a_snapshot_not_sharded_like_its_parameter_is_refused(one_rank_mesh):
    p = distribute_tensor(torch.randn(6, 2), one_rank_mesh, [Shard(0)])
    with pytest.raises(ValueError, match=r"params\[0\] is a DTensor .* init_params\[0\] a Tensor"):
        fastbml.soft_reinit_([p], [torch.randn(6, 2)], 0.5)
    other = distribute_tensor(torch.randn(6, 2), one_rank_mesh, [Replicate()])
    with pytest.raises(ValueError, match=r"init_params\[0\] a DTensor with placements "
                                         r"\(Replicate\(\),\)"):
        fastbml.soft_reinit_([p], [other], 0.5)
    partial = torch.distributed.tensor.DTensor.from_local(torch.randn(6, 2), one_rank_mesh,
                                                          [Partial()])
    with pytest.raises(ValueError, match=r"params\[0\] is a DTensor with placement Partial"):
        fastbml.soft_reinit_([partial], [partial.detach().clone()], 0.5)
    snapshot = p.detach().clone()
    expected = p.full_tensor() * 0.5 + snapshot.full_tensor() * 0.5
    fastbml.soft_reinit_([p], [snapshot], 0.0)
    fastbml.soft_reinit_([p], [snapshot], 0.5)
    torch.testing.assert_close(p.full_tensor(), expected)
