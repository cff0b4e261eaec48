"""The method helpers under DDP (gloo, 2 CPU processes): replicas stay bit-identical and use the
statistics of the global batch."""

import torch
from distributed_utils import run_ranks, values
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fastbml

GLOBAL_BATCH = 16


class AudioVisual(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 8))
        self.visual = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8))
        self.head = nn.Linear(16, 4)

    def forward(self, a, v):
        fa, fv = self.audio(a), self.visual(v)
        u_a, u_v = fastbml.concat_unimodal_logits([fa, fv], self.head.weight, self.head.bias)
        return self.head(torch.cat([fa, fv], dim=1)), u_a, u_v


def global_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    a = torch.randn(GLOBAL_BATCH, 10, generator=g) * 2
    v = torch.randn(GLOBAL_BATCH, 6, generator=g)
    y = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    return a, v, y


def train_ogm_ranks(rank, world, steps, seed, compile_step=False):
    torch.manual_seed(0)
    model = AudioVisual()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ogm = fastbml.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, seed=seed)
    step_fn, counter = ogm.step, None
    if compile_step:  # scores, their all_reduce, coefficients and modulation in one graph
        counter = CompileCounterWithBackend("aot_eager")
        step_fn = torch.compile(ogm.step, fullgraph=True, backend=counter)
    coeffs = []
    for step in range(steps):
        a, v, y = (t.chunk(world)[rank] for t in global_batch(step))
        z, u_a, u_v = ddp(a, v)
        opt.zero_grad()
        nn.functional.cross_entropy(z, y).backward()
        step_fn({"audio": u_a, "visual": u_v}, y, 0)
        coeffs.append(ogm.last_coeffs.clone())
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    if compile_step:
        return params, coeffs, counter.frame_count
    return params, coeffs, ogm.seed


def test_ogm_ge_replicas_stay_identical_and_use_global_coefficients():
    results = values(run_ranks(train_ogm_ranks, 3, None))
    (params0, coeffs0, seed0), (params1, coeffs1, seed1) = results
    assert seed0 == seed1  # rank 0's fresh seed was shared
    for p0, p1 in zip(params0, params1):
        assert torch.equal(p0, p1)
    # The coefficients equal those of one process scoring the whole global batch.
    torch.manual_seed(0)
    model = AudioVisual()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ogm = fastbml.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, seed=seed0)
    for step in range(3):
        a, v, y = global_batch(step)
        z, u_a, u_v = model(a, v)
        opt.zero_grad()
        nn.functional.cross_entropy(z, y).backward()
        ogm.step({"audio": u_a, "visual": u_v}, y, epoch=0)
        torch.testing.assert_close(ogm.last_coeffs, coeffs0[step], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(coeffs0[step], coeffs1[step], rtol=0, atol=0)
        opt.step()
    for p, p0 in zip(model.parameters(), params0):
        torch.testing.assert_close(p.detach(), p0, rtol=1e-4, atol=1e-5)


def mismatched_seed_ranks(rank, world):
    model = AudioVisual()
    ogm = fastbml.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, seed=rank + 1)
    a, v, y = (t.chunk(world)[rank] for t in global_batch(0))
    z, u_a, u_v = model(a, v)
    nn.functional.cross_entropy(z, y).backward()
    ogm.step({"audio": u_a, "visual": u_v}, y, epoch=0)


def test_compiled_ogm_step_with_its_all_reduce_equals_the_eager_ddp_run():
    eager = values(run_ranks(train_ogm_ranks, 3, 5))
    compiled = values(run_ranks(train_ogm_ranks, 3, 5, True))
    for (params, coeffs, _), (c_params, c_coeffs, graphs) in zip(eager, compiled):
        assert graphs == 1
        for p, q in zip(params, c_params):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        for k, c in zip(coeffs, c_coeffs):
            torch.testing.assert_close(c, k, rtol=1e-6, atol=0)


def test_ranks_that_disagree_on_the_seed_fail_at_construction():
    results = run_ranks(mismatched_seed_ranks)
    for status, message in results:
        assert status == "error" and "ValueError" in message and "seed" in message


def test_single_process_needs_no_process_group():
    model = AudioVisual()
    ogm = fastbml.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8)
    assert ogm.group is None
