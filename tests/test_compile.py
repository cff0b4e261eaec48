"""fastbml under torch.compile: no graph breaks, one graph across the steps of an epoch, compiled
equals eager (noise bit-identical), opcheck for every op, tensor subclasses refused.

Compiles use `aot_eager` (dynamo + AOTAutograd + functionalisation, no code generation) or a
counting backend over it, which is where graph breaks and recompilations show; one test runs
Inductor's code generation for the OGM step.
"""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from utils import DEVICE, randn

import fastbml
from fastbml import rng

BACKENDS = ["torch", "auto"]  # the reference path and the op path (cpp on CPU, triton on CUDA)


def graph_breaks(fn, *args, **kwargs) -> int:
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args, **kwargs).graph_break_count


def compiled(fn, backend="aot_eager"):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, fullgraph=True, backend=counter), counter


class AudioVisual(nn.Module):
    """Late fusion with OPM on the pooled features, in the model's forward."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 12))
        self.visual = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12))
        self.head = nn.Linear(24, 5)
        self.opm = fastbml.OPM(["audio", "visual"], q_base=0.6, p_exe=1.0, seed=3,
                               backend=backend)

    def forward(self, a, v, y, epoch: int):
        fa, fv = self.audio(a), self.visual(v)
        u_a, u_v = fastbml.concat_unimodal_logits([fa, fv], self.head.weight.detach(),
                                                  self.head.bias.detach())
        feats, w = self.opm({"audio": fa, "visual": fv}, {"audio": u_a, "visual": u_v}, y, epoch)
        z = self.head(torch.cat([feats["audio"], feats["visual"]], dim=1))
        return (F.cross_entropy(z, y, reduction="none") * w).sum(), u_a.detach(), u_v.detach()


def batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    a, v = torch.randn(16, 10, generator=g) * 2, torch.randn(16, 6, generator=g)
    return a.to(DEVICE), v.to(DEVICE), torch.randint(0, 5, (16,), generator=g).to(DEVICE)


def train(steps: int, compile_backend: str | None, backend: str = "auto"):
    """`steps` SGD steps of AudioVisual with OPM in the forward and OGM-GE after backward."""
    torch.manual_seed(0)
    model = AudioVisual(backend).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ogm = fastbml.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, seed=7,
                      backend=backend)
    forward, ogm_step = model, ogm.step
    counters = []
    if compile_backend is not None:
        forward, c1 = compiled(model, compile_backend)
        ogm_step, c2 = compiled(ogm.step, compile_backend)
        counters = [c1, c2]
    grads = []
    for step in range(steps):
        a, v, y = batch(step)
        opt.zero_grad()
        loss, u_a, u_v = forward(a, v, y, 0)
        loss.backward()
        ogm_step({"audio": u_a, "visual": u_v}, y, 0)
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return model, ogm, grads, counters


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_compiles_to_one_graph_each_and_equals_eager(backend):
    _, _, eager_grads, _ = train(6, None, backend)
    model, ogm, grads, counters = train(6, "aot_eager", backend)
    assert [c.frame_count for c in counters] == [1, 1]
    assert ogm.steps == 6 and model.opm.steps == 6
    for step, (got, want) in enumerate(zip(grads, eager_grads)):
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7, msg=f"step {step}")


def test_ogm_step_builds_one_graph_over_an_epoch_of_100_steps():
    torch.manual_seed(0)
    enc = {m: nn.Linear(8, 5).to(DEVICE) for m in ("audio", "visual")}
    ogm = fastbml.OGM(enc, alpha=0.5, seed=1)
    step, counter = compiled(ogm.step, CompileCounterWithBackend("aot_eager"))
    y = torch.randint(0, 5, (4,), device=DEVICE)
    for _ in range(100):
        for e in enc.values():
            e.weight.grad = randn(5, 8)
        step({m: randn(4, 5) for m in enc}, y, 3)
    assert counter.frame_count == 1 and ogm.steps == 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_graph_break_in_the_ogm_step_or_a_forward_with_opm(backend):
    model = AudioVisual(backend).to(DEVICE)
    a, v, y = batch(0)
    assert graph_breaks(model, a, v, y, 0) == 0
    ogm = fastbml.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, seed=1,
                      backend=backend)
    loss, u_a, u_v = model(a, v, y, 0)
    loss.backward()
    assert graph_breaks(ogm.step, {"audio": u_a, "visual": u_v}, y, 0) == 0


def _ogm_modulate(backend):
    params = [[nn.Parameter(randn(6, 5)), nn.Parameter(randn(3, 3, 3))],
              [nn.Parameter(randn(7, 2))]]
    for p in (p for group in params for p in group):
        p.grad = randn(*p.shape)
    coeffs = torch.tensor([0.3, 1.0], device=DEVICE)
    seed = torch.tensor(1234, device=DEVICE)

    def run():
        fastbml.ogm_modulate_(params, coeffs, seed=seed, backend=backend)
        return [p.grad for group in params for p in group]
    return run, [p.grad for group in params for p in group]


def _soft_reinit(backend):
    params = [[randn(9, 4), randn(17)], [randn(3, 5)]]
    init = [[randn(*p.shape) for p in group] for group in params]
    strength = torch.tensor([0.25, 0.75], device=DEVICE)

    def run():
        fastbml.soft_reinit_(params, init, strength, backend=backend)
        return [p for group in params for p in group]
    return run, [p for group in params for p in group]


def _modality_scores(backend):
    logits, labels = [randn(13, 7), randn(13, 7)], torch.randint(0, 7, (13,), device=DEVICE)
    return (lambda: [fastbml.modality_scores(logits, labels, backend=backend)]), []


def _opm_drop(backend):
    feats = [randn(11, 6), randn(11, 2, 3)]
    q, seed = torch.tensor([0.5, 0.2], device=DEVICE), torch.tensor(99, device=DEVICE)

    def run():
        outs, w = fastbml.opm_drop(feats, q, seed=seed, backend=backend)
        return [*outs, w]
    return run, []


FUNCTIONAL = {"ogm_modulate_": _ogm_modulate, "soft_reinit_": _soft_reinit,
              "modality_scores": _modality_scores, "opm_drop": _opm_drop}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(FUNCTIONAL))
def test_functional_op_compiles_fullgraph_and_equals_eager(name, backend):
    torch.manual_seed(5)
    run, mutated = FUNCTIONAL[name](backend)
    start = [t.clone() for t in mutated]

    def restore():
        for t, s in zip(mutated, start):
            t.copy_(s)
    expected = [t.clone() for t in run()]
    restore()
    assert graph_breaks(run) == 0
    restore()
    fn, counter = compiled(run)
    got = fn()
    assert counter.frame_count == 1
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


def test_inductor_compiled_ogm_step_equals_eager():
    """Inductor's code generation around the op (the coefficients become generated code)."""
    def setup():
        torch.manual_seed(0)
        enc = {m: nn.Linear(8, 5).to(DEVICE) for m in ("audio", "visual")}
        for e in enc.values():
            e.weight.grad = torch.randn(5, 8, device=DEVICE)
        return enc, fastbml.OGM(enc, alpha=0.5, seed=2)
    logits = {"audio": randn(4, 5, scale=3.0), "visual": randn(4, 5)}
    y = torch.randint(0, 5, (4,), device=DEVICE)
    enc, ogm = setup()
    ogm.step(logits, y, 0)
    expected = [e.weight.grad.clone() for e in enc.values()]
    enc, ogm = setup()
    torch._dynamo.reset()
    torch.compile(ogm.step, fullgraph=True)(logits, y, 0)
    for e, want in zip(enc.values(), expected):  # 1e-6 of the gradient's scale
        torch.testing.assert_close(e.weight.grad, want, rtol=1e-6,
                                   atol=1e-6 * want.abs().max().item())


def test_step_seed_on_the_device_equals_the_host_definition():
    g = torch.Generator().manual_seed(0)
    bases = [*torch.randint(0, 2**62, (50,), generator=g).tolist(), 0, 2**63 - 1]
    steps = torch.randint(0, 2**40, (52,), generator=g).tolist()
    derive, _ = compiled(rng.step_seed_tensor)
    for base, step in zip(bases, steps):
        want = rng.step_seed(base, step)
        assert int(rng.step_seed_tensor(base, torch.tensor(step, device=DEVICE))) == want
        assert int(derive(torch.tensor(base, device=DEVICE),
                          torch.tensor(step, device=DEVICE))) == want


def test_an_int_seed_and_the_same_seed_as_a_tensor_give_the_same_noise():
    grads = [randn(40, 3), randn(5)]
    a, b = [g.clone() for g in grads], [g.clone() for g in grads]
    fastbml.ops.scale_noise.multi_tensor_scale_noise_(a, [0, 0], torch.ones(1, device=DEVICE),
                                                      noise=True, seed=77)
    fastbml.ops.scale_noise.multi_tensor_scale_noise_(b, [0, 0], torch.ones(1, device=DEVICE),
                                                      noise=True,
                                                      seed=torch.tensor(77, device=DEVICE))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_checkpoint_of_step_counts_resumes_the_same_stream():
    """state_dict keeps {"seed", "steps"} as plain ints, as before the device counter."""
    enc = {m: nn.Linear(4, 3).to(DEVICE) for m in ("audio", "visual")}
    logits, y = {m: randn(6, 3) for m in enc}, torch.randint(0, 3, (6,), device=DEVICE)
    grads = [randn(3, 4) for _ in enc]
    results = []
    for steps_before in (5, None):
        ogm = fastbml.OGM(enc, alpha=0.5, seed=11)
        if steps_before is None:
            ogm.load_state_dict({"seed": 11, "steps": 5})
        else:
            for _ in range(steps_before):
                ogm.step(logits, y, 0)
        assert ogm.state_dict() == {"seed": 11, "steps": 5}
        for e, g in zip(enc.values(), grads):
            e.weight.grad = g.clone()
        ogm.step(logits, y, 0)
        results.append([e.weight.grad.clone() for e in enc.values()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ---------------------------------------------------------------------------- opcheck


def _opcheck_cases(device):
    def r(*shape, dtype=torch.float32):
        return (torch.randn(*shape, device=device) + 0.1).to(dtype)
    seed = torch.tensor(5, device=device)
    ops = torch.ops.fastbml
    yield "scale_noise_", ops.scale_noise_.default, (
        [r(7, 3), r(40), r(2, 2, dtype=torch.bfloat16)], [0, 1, 0],
        torch.tensor([0.5, 0.9], device=device), seed, 0, 1e-8, True, [0, 24, 64], None)
    yield "scale_noise_", ops.scale_noise_.default, (  # a shard: offsets inside a block, std given
        [r(7, 3), r(5)], [0, 1], torch.tensor([0.5, 0.9], device=device), seed, 0, 1e-8, True,
        [9, 130], torch.tensor([0.7, 1.1], dtype=torch.float64, device=device))
    yield "moments", ops.moments.default, ([r(7, 3), r(40), r(2, 2, dtype=torch.bfloat16)],)
    yield "lerp_", ops.lerp_.default, (
        [r(5, 4), r(9)], [r(5, 4), r(9)], [0, 1], torch.tensor([0.3, 0.6], device=device))
    yield "true_class_prob", ops.true_class_prob.default, (
        [r(8, 5), r(8, 5)], torch.randint(0, 5, (8,), device=device))
    yield "split_gram", ops.split_gram.default, (
        [r(7, 3), r(40), r(2, 2, dtype=torch.bfloat16)],
        [r(7, 3), r(40), r(2, 2, dtype=torch.bfloat16)])
    yield "axpby_", ops.axpby_.default, (
        [r(5, 4), r(9)], [r(5, 4), r(9)], torch.randn(2, 2, device=device))
    set_labels = torch.randint(0, 5, (9,), device=device)
    yield "combined_nll", ops.combined_nll.default, (
        r(7, 9, 5), torch.randn(3, 7, device=device), set_labels, 18.42)
    yield "combined_nll", ops.combined_nll.default, (
        r(3, 6, 4, dtype=torch.bfloat16), torch.randn(2, 3, device=device), set_labels[:6] % 4, 3.0)
    yield "row_drop", ops.row_drop.default, (
        [r(9, 4).requires_grad_(), r(9, 2, 3).requires_grad_()],
        torch.tensor([0.5, 0.1], device=device), 0.0, seed, torch.tensor(6, device=device), 1, 2)
    features, prototypes = r(9, 6).requires_grad_(), r(5, 6)
    mask = torch.tensor([True, True, False, True, True], device=device)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 3, 4], device=device)
    yield "prototype_cross_entropy", ops.prototype_cross_entropy.default, (
        features, prototypes, mask, labels)
    yield "prototype_cross_entropy_backward", ops.prototype_cross_entropy_backward.default, (
        r(9), features.detach()[:, ::2].to(torch.bfloat16), prototypes[:, ::2].contiguous(), mask,
        labels, ops.prototype_cross_entropy(features.detach(), prototypes, mask, labels)[1])


def _opcheck(device):
    for name, op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)
        assert name in dir(torch.ops.fastbml)


@pytest.mark.skipif(DEVICE.type != "cpu" or fastbml.backend.cpp_module() is None,
                    reason="the CPU implementation is the cpp kernel")
def test_opcheck_every_op_on_cpu():
    _opcheck(torch.device("cpu"))


@pytest.mark.gpu
def test_opcheck_every_op_on_cuda():
    _opcheck(torch.device("cuda"))


# ---------------------------------------------------------------------------- tensor subclasses


class _Wrapped(torch.Tensor):
    """A trivial tensor subclass, standing in for any subclass that is not a plain tensor."""


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_tensor_subclasses_are_refused_with_the_argument_named(backend):
    p = nn.Parameter(randn(4, 3))
    p.grad = randn(4, 3).as_subclass(_Wrapped)
    q = nn.Parameter(randn(2, 2))
    q.grad = randn(2, 2)
    with pytest.raises(TypeError, match=r"params\[0\]\[0\]\.grad is a _Wrapped"):
        fastbml.ogm_modulate_([[p], [q]], torch.ones(2, device=DEVICE), backend=backend)
    with pytest.raises(TypeError, match=r"params\[1\] is a _Wrapped"):
        fastbml.soft_reinit_([randn(3), randn(2).as_subclass(_Wrapped)],
                             [randn(3), randn(2)], 0.5, backend=backend)
    labels = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(TypeError, match=r"logits\[1\] is a _Wrapped"):
        fastbml.modality_scores([randn(4, 3), randn(4, 3).as_subclass(_Wrapped)], labels,
                                backend=backend)
    with pytest.raises(TypeError, match=r"features\[0\] is a _Wrapped"):
        fastbml.opm_drop([randn(4, 3).as_subclass(_Wrapped), randn(4, 3)], [0.5, 0.0],
                         seed=1, backend=backend)


# ---------------------------------------------------------------------------- CUDA graphs


@pytest.mark.gpu
def test_reduce_overhead_replays_the_training_step_with_fresh_noise():
    """torch.compile(mode="reduce-overhead") captures CUDA graphs of the forward with OPM and of
    the OGM step; 10 replayed steps equal 10 eager steps (fresh noise every step)."""
    from torch._dynamo.utils import counters

    _, _, eager_grads, _ = train(10, None)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = AudioVisual().to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ogm = fastbml.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, seed=7)
    forward = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    ogm_step = torch.compile(ogm.step, mode="reduce-overhead", fullgraph=True)
    for step in range(10):
        a, v, y = batch(step)
        opt.zero_grad()
        loss, u_a, u_v = forward(a, v, y, 0)
        loss.backward()
        ogm_step({"audio": u_a, "visual": u_v}, y, 0)
        for p, e in zip(model.parameters(), eager_grads[step]):
            torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)
        opt.step()
    assert counters["inductor"]["cudagraph_skips"] == 0  # every graph was captured
