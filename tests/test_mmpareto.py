"""MMPareto (docs/methods.md#mmpareto): the split_gram and axpby_ ops on every backend, the
weights' branches, mmpareto_combine_ against a per-tensor reimplementation, the helper against
the authors' training step, two backward passes, no host sync, DDP, compile and opcheck."""

import pytest
import torch
import torch.nn.functional as F
from distributed_utils import run_ranks, values
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from utils import ALL_BACKENDS, DEVICE, FAST_BACKENDS, FLOAT_DTYPES, assert_close, randn

import fastbml
from benchmarks.bench_mmpareto import AudioVisual, authors_step, recorded_parameters
from fastbml.ops.axpby import multi_tensor_axpby_
from fastbml.ops.split_gram import multi_tensor_split_gram

SHAPES = [(16, 3, 5, 5), (33, 17), (1,), (0, 5), (40000,), (3, 1, 7)]

# ---------------------------------------------------------------------------- ops


def _strided(t):
    """A non-contiguous tensor equal to t (every other element of a wider buffer)."""
    base = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])
    base[..., ::2] = t
    return base[..., ::2]


def _pairs(dtype, noncontiguous=False, shapes=SHAPES):
    sums = [randn(*s, dtype=dtype, noncontiguous=noncontiguous, shift=0.1) for s in shapes]
    parts = [randn(*s, dtype=dtype, noncontiguous=noncontiguous, scale=0.7) for s in shapes]
    return sums, parts


def _gram64(sums, parts):
    rows = []
    for s, b in zip(sums, parts):
        s, b = s.double().reshape(-1), b.double().reshape(-1)
        d = s - b
        rows.append(torch.stack([d @ d, d @ b, b @ b, s @ s]))
    return torch.stack(rows)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_split_gram_matches_a_float64_reference(backend, dtype, noncontiguous):
    sums, parts = _pairs(dtype, noncontiguous)
    got = multi_tensor_split_gram(sums, parts, backend=backend)
    want = _gram64(sums, parts)
    assert got.dtype == torch.float64 and got.shape == (len(SHAPES), 4)
    assert torch.equal(got[3], torch.zeros(4, dtype=torch.float64, device=DEVICE))  # empty
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_split_gram_of_mixed_dtypes_and_one_tensor(backend):
    sums = [randn(9, 4), randn(300, dtype=torch.bfloat16), randn(5, dtype=torch.float16)]
    parts = [randn(*s.shape, dtype=s.dtype) for s in sums]
    got = multi_tensor_split_gram(sums, parts, backend=backend)
    torch.testing.assert_close(got, _gram64(sums, parts), rtol=1e-10, atol=1e-10)
    one = multi_tensor_split_gram(sums[:1], parts[:1], backend=backend)
    torch.testing.assert_close(one, _gram64(sums[:1], parts[:1]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_axpby_fast_paths_match_torch(backend, dtype, noncontiguous):
    xs, ys = _pairs(dtype, noncontiguous)
    coeffs = torch.randn(len(xs), 2, device=DEVICE)
    expected = [x.clone() for x in xs]
    multi_tensor_axpby_(expected, ys, coeffs, backend="torch")
    multi_tensor_axpby_(xs, ys, coeffs, backend=backend)
    for x, e in zip(xs, expected):
        assert x.dtype == dtype and x.shape == e.shape
        assert_close(x, e, scale=2.0)
    if noncontiguous:
        assert not xs[0].is_contiguous()


def test_axpby_torch_reference_is_the_formula():
    xs, ys = _pairs(torch.float32)
    coeffs = torch.randn(len(xs), 2, device=DEVICE)
    want = [a * x + b * y for x, y, (a, b) in zip(xs, ys, coeffs)]
    multi_tensor_axpby_(xs, ys, coeffs, backend="torch")
    for x, w in zip(xs, want):
        torch.testing.assert_close(x, w)


# ---------------------------------------------------------------------------- weights


def _w(a, p, c):
    return fastbml.mmpareto_weights(torch.tensor([[a, p, c]], dtype=torch.float64))[0].tolist()


def test_agreeing_gradients_get_equal_weights():
    assert _w(2.0, 0.5, 1.0) == [0.5, 0.5]
    assert _w(1.0, 5.0, 1.0) == [0.5, 0.5]  # p > 0 wins over the solver's clamps


def test_conflicting_gradients_get_the_two_task_min_norm_weights():
    a, p, c = 4.0, -1.0, 2.0
    w_mm = (c - p) / (a + c - 2 * p)
    assert _w(a, p, c) == pytest.approx([w_mm, 1 - w_mm])
    # the combination is the min-norm point of the segment: its derivative vanishes there
    norm_sq = lambda w: w * w * a + 2 * w * (1 - w) * p + (1 - w) ** 2 * c  # noqa: E731
    assert norm_sq(w_mm) < min(norm_sq(w_mm - 1e-3), norm_sq(w_mm + 1e-3))


def test_orthogonal_gradients_count_as_conflicting_and_clamps_follow_the_solver():
    assert _w(1.0, 0.0, 3.0) == pytest.approx([0.75, 0.25])  # cos = 0 is not > 0
    assert _w(0.0, 0.0, 3.0) == [0.999, pytest.approx(0.001)]   # p >= a
    assert _w(3.0, 0.0, 0.0) == [0.001, 0.999]                  # p >= c
    assert _w(0.0, 0.0, 0.0) == [0.999, pytest.approx(0.001)]


def test_weights_reject_bad_gram():
    with pytest.raises(ValueError, match="gram"):
        fastbml.mmpareto_weights(torch.ones(2, 2))
    with pytest.raises(TypeError, match="gram"):
        fastbml.mmpareto_weights(torch.ones(2, 3, dtype=torch.int64))


# ---------------------------------------------------------------------------- combine


def _straightforward(g_mm, g_uni, gamma=1.5):
    """The per-tensor rule written out in float64 (the docs' formula), one modality at a time."""
    out, weights = [], []
    for mm, uni in zip(g_mm, g_uni):
        flat_mm = torch.cat([g.double().reshape(-1) for g in mm])
        flat_uni = torch.cat([g.double().reshape(-1) for g in uni])
        a, p, c = flat_mm @ flat_mm, flat_mm @ flat_uni, flat_uni @ flat_uni
        if p > 0:
            w = 0.5
        elif p >= a:
            w = 0.999
        elif p >= c:
            w = 0.001
        else:
            w = float((c - p) / (a + c - 2 * p))
        weights.append([w, 1 - w])
        group = []
        for x, y in zip(mm, uni):
            new = 2 * (w * x.double() + (1 - w) * y.double())
            ratio = (x.double() + y.double()).norm() / new.norm()
            group.append(gamma * new * (ratio if ratio > 1 else 1.0) if new.norm() > 0
                         else torch.zeros_like(new))
        out.append(group)
    return out, torch.tensor(weights)


def _conflicting_groups(dtype=torch.float32):
    """Modality 0: g_uni mostly opposite to g_mm (cos < 0); modality 1: aligned (cos > 0)."""
    torch.manual_seed(3)
    mm0 = [randn(*s, dtype=dtype) for s in SHAPES[:3]]
    uni0 = [(-0.6 * m.float() + 0.4 * randn(*m.shape)).to(dtype) for m in mm0]
    mm1 = [randn(*s, dtype=dtype) for s in SHAPES[3:]]
    uni1 = [(0.5 * m.float() + 0.3 * randn(*m.shape)).to(dtype) for m in mm1]
    return [mm0, mm1], [uni0, uni1]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_combine_matches_the_straightforward_rule(backend, dtype, noncontiguous):
    g_mm, g_uni = _conflicting_groups(dtype)
    totals = [[(m.float() + u.float()).to(dtype) for m, u in zip(gm, gu)]
              for gm, gu in zip(g_mm, g_uni)]
    if noncontiguous:
        totals = [[_strided(t) for t in group] for group in totals]
        g_uni = [[_strided(u) for u in group] for group in g_uni]
        assert not totals[0][0].is_contiguous()
    # the reference sees the derived g_mm = total - uni, as the combination does
    derived = [[t.float() - u.float() for t, u in zip(gt, gu)] for gt, gu in zip(totals, g_uni)]
    want, want_w = _straightforward(derived, g_uni)
    cos, weights = fastbml.mmpareto_combine_(totals, g_uni, backend=backend)
    assert cos[0] < 0 < cos[1]
    torch.testing.assert_close(weights.cpu(), want_w.float(), rtol=1e-5, atol=1e-6)
    assert weights[1].tolist() == [0.5, 0.5] and weights[0, 0] != 0.5
    for gt, gw in zip(totals, want):
        for t, w in zip(gt, gw):
            assert t.dtype == dtype
            assert_close(t, w.to(t.device), dtype=dtype, scale=4.0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_agreeing_modality_gets_gamma_times_the_plain_sum(backend):
    g_mm, g_uni = _conflicting_groups()
    totals = [[m + u for m, u in zip(gm, gu)] for gm, gu in zip(g_mm, g_uni)]
    plain = [t.clone() for t in totals[1]]
    conflicting = [t.clone() for t in totals[0]]
    fastbml.mmpareto_combine_(totals, g_uni, gamma=1.5, backend=backend)
    for t, p in zip(totals[1], plain):
        torch.testing.assert_close(t, 1.5 * p, rtol=1e-6, atol=0)
    # conflicting: a different direction, never shorter than gamma times the plain sum
    for t, p in zip(totals[0], conflicting):
        if p.numel() > 1:
            assert not torch.allclose(t, 1.5 * p, rtol=1e-3)
            assert t.norm() >= 1.5 * p.norm() * (1 - 1e-5)


def test_combine_with_a_flat_list_and_modality_index():
    g_mm, g_uni = _conflicting_groups()
    grouped = [[m + u for m, u in zip(gm, gu)] for gm, gu in zip(g_mm, g_uni)]
    flat = [t.clone() for group in grouped for t in group]
    index = [m for m, group in enumerate(grouped) for _ in group]
    fastbml.mmpareto_combine_(grouped, g_uni, backend="torch")
    fastbml.mmpareto_combine_(flat, [u for group in g_uni for u in group],
                              modality_index=index, backend="torch")
    for a, b in zip(flat, (t for group in grouped for t in group)):
        torch.testing.assert_close(a, b)


def test_zero_gradients_give_zero_not_nan():
    totals = [[torch.zeros(4, device=DEVICE), randn(3)], [randn(5)]]
    parts = [[torch.zeros(4, device=DEVICE), randn(3)], [randn(5)]]
    fastbml.mmpareto_combine_(totals, parts, backend="torch")
    assert torch.equal(totals[0][0], torch.zeros(4, device=DEVICE))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_finite_gradients_stay_non_finite(backend):
    totals = [[randn(6), randn(4)], [randn(5)]]
    totals[0][0][2] = float("inf")
    parts = [[randn(6), randn(4)], [randn(5)]]
    fastbml.mmpareto_combine_(totals, parts, backend=backend)
    assert not torch.isfinite(totals[0][0]).all()  # what GradScaler looks for
    assert torch.isfinite(totals[1][0]).all()  # another modality is unaffected


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: ([[randn(3)], [randn(2)]], [[randn(4)], [randn(2)]]), ValueError,
         r"unimodal_grads\[0\]\[0\]"),
        (lambda: ([[randn(3)], [randn(2)]], [[randn(3)]]), ValueError, "unimodal_grads has 1"),
        (lambda: ([[randn(3).long()], [randn(2)]], [[randn(3)], [randn(2)]]), TypeError,
         r"grads\[0\]\[0\] must be float32"),
        (lambda: ([[randn(3)], ["x"]], [[randn(3)], [randn(2)]]), TypeError, r"grads\[1\]\[0\]"),
        (lambda: ([[randn(3)], [randn(2)]], randn(3)), TypeError, "unimodal_grads must be a list"),
        (lambda: ([[randn(3)], [randn(2)]], [randn(3), [randn(2)]]), TypeError,
         r"unimodal_grads\[0\] must be a list"),
    ],
)
def test_combine_rejects_bad_input(make, error, match):
    grads, parts = make()
    with pytest.raises(error, match=match):
        fastbml.mmpareto_combine_(grads, parts)


def test_combine_rejects_aliased_gradients():
    g = randn(6)
    with pytest.raises(ValueError, match=r"grads\[0\]\[0\] and unimodal_grads\[0\]\[0\]"):
        fastbml.mmpareto_combine_([[g], [randn(2)]], [[g], [randn(2)]])


def test_combine_rejects_a_negative_gamma():
    with pytest.raises(ValueError, match="gamma"):
        fastbml.mmpareto_combine_([[randn(2)], [randn(2)]], [[randn(2)], [randn(2)]], gamma=-1)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_combine_compiles_fullgraph_and_equals_eager(backend):
    g_mm, g_uni = _conflicting_groups()
    start = [[m + u for m, u in zip(gm, gu)] for gm, gu in zip(g_mm, g_uni)]
    eager = [[t.clone() for t in group] for group in start]
    cos_e, w_e = fastbml.mmpareto_combine_(eager, g_uni, backend=backend)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    combine = torch.compile(fastbml.mmpareto_combine_, fullgraph=True, backend=counter)
    got = [[t.clone() for t in group] for group in start]
    cos, w = combine(got, g_uni, backend=backend)
    assert counter.frame_count == 1
    torch.testing.assert_close(cos, cos_e)
    torch.testing.assert_close(w, w_e)
    for a, b in zip((t for g in got for t in g), (t for g in eager for t in g)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- helper


def _small_model(seed=0):
    torch.manual_seed(seed)
    return AudioVisual(width=4).to(DEVICE)


def _batch(seed=0, batch=6):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 1, 24, 24, generator=g).to(DEVICE),
            torch.randn(batch, 3, 2, 16, 16, generator=g).to(DEVICE),
            torch.randint(0, 6, (batch,), generator=g).to(DEVICE))


def _losses(model, spec, frames, label):
    out, out_a, out_v = model(spec, frames)
    return F.cross_entropy(out, label), {"audio": F.cross_entropy(out_a, label),
                                         "visual": F.cross_entropy(out_v, label)}


def _helper(model, **kwargs):
    return fastbml.MMPareto({"audio": model.audio_net, "visual": model.visual_net}, **kwargs)


def _close_per_tensor(model, want, rtol):
    for name, p in model.named_parameters():
        err = ((p.grad - want[name]).norm() / want[name].norm().clamp_min(1e-30)).item()
        assert err < rtol, f"{name}: relative error {err}"


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_helper_equals_the_authors_training_step(backend):
    """Both branches in one step: with this seed audio's gradients agree, visual's conflict."""
    model = _small_model(seed=1)
    spec, frames, label = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    authors_step(model, opt, spec, frames, label, recorded_parameters(model))
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    helper = _helper(model, backend=backend)
    opt.zero_grad()
    mm, uni = _losses(model, spec, frames, label)
    helper.backward(mm, uni)
    assert (helper.last_cos[0] > 0).item() and (helper.last_cos[1] < 0).item()
    assert helper.last_weights[0].tolist() == [0.5, 0.5]
    _close_per_tensor(model, want, 1e-4)


def test_helper_takes_two_backward_passes_and_the_authors_four():
    """Counted at the audio encoder's output: every backward pass that reaches it runs its hook."""
    model = _small_model()
    passes = []

    def count_backward_passes(_module, _inputs, out):
        out.register_hook(lambda _grad: passes.append(1))
    model.audio_net.register_forward_hook(count_backward_passes)
    spec, frames, label = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    authors_step(model, opt, spec, frames, label, recorded_parameters(model))
    assert len(passes) == 3  # L_mm, L_a, total (L_v does not reach the audio encoder)
    passes.clear()
    mm, uni = _losses(model, spec, frames, label)
    opt.zero_grad()
    _helper(model).backward(mm, uni)
    assert len(passes) == 2


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_the_step_reads_nothing_back_to_the_host(monkeypatch, backend):
    """Neither the two backward passes nor the combination read a tensor value into Python
    (no .item(), no bool(), no Python branch on a device value)."""
    model = _small_model()
    helper = _helper(model, backend=backend)
    mm, uni = _losses(model, *_batch())

    def refuse(*_):
        raise AssertionError("a host read of a tensor value")
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    helper.backward(mm, uni)
    monkeypatch.undo()
    assert helper.last_cos.shape == (2,)


@pytest.mark.gpu
def test_the_combination_has_no_cuda_sync():
    model = _small_model()
    helper = _helper(model)
    mm, uni = _losses(model, *_batch())
    mm.backward(retain_graph=True)  # warm-up: the first backward initialises CUDA state
    model.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        helper.backward(mm, uni)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_outside_the_window_backward_is_plain_multitask():
    model = _small_model()
    spec, frames, label = _batch()
    mm, uni = _losses(model, spec, frames, label)
    (mm + uni["audio"] + uni["visual"]).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    helper = _helper(model, start=2, end=4)
    assert not helper.active(1) and helper.active(2) and helper.active(4) and not helper.active(5)
    mm, uni = _losses(model, spec, frames, label)
    helper.backward(mm, uni, epoch=1)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n])


def test_accumulated_gradients_are_kept_and_added_to():
    model = _small_model()
    helper = _helper(model)
    spec, frames, label = _batch()
    helper.backward(*_losses(model, spec, frames, label))
    once = {n: p.grad.clone() for n, p in model.named_parameters()}
    helper.backward(*_losses(model, spec, frames, label))  # same batch: twice the gradients
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[n], rtol=1e-5, atol=1e-7)


def test_grad_scaler_combines_the_scaled_gradients():
    model = _small_model()
    helper = _helper(model)
    spec, frames, label = _batch()
    helper.backward(*_losses(model, spec, frames, label))
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=1024.0)
    helper.backward(*_losses(model, spec, frames, label), scaler=scaler)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad / 1024.0, want[n], rtol=1e-5, atol=1e-8)


def test_state_dict_round_trip_and_step_count():
    model = _small_model()
    helper = _helper(model)
    for _ in range(3):
        model.zero_grad()
        helper.backward(*_losses(model, *_batch()))
    assert helper.state_dict() == {"steps": 3}
    other = _helper(model)
    other.load_state_dict(helper.state_dict())
    assert other.steps == 3


def test_helper_rejects_bad_input():
    model = _small_model()
    with pytest.raises(ValueError, match="at least two"):
        fastbml.MMPareto({"audio": model.audio_net})
    with pytest.raises(ValueError, match="gamma"):
        _helper(model, gamma=float("nan"))
    with pytest.raises(TypeError, match=r"groups\['visual'\]"):
        fastbml.MMPareto({"audio": model.audio_net, "visual": 3})
    with pytest.raises(ValueError, match="more than one modality"):
        fastbml.MMPareto({"audio": model.audio_net, "visual": model.audio_net})
    frozen = nn.Parameter(torch.ones(2), requires_grad=False)
    with pytest.raises(ValueError, match="does not require grad"):
        fastbml.MMPareto({"audio": model.audio_net, "visual": [frozen]})
    helper = _helper(model)
    mm, uni = _losses(model, *_batch())
    with pytest.raises(ValueError, match="unimodal_losses keys"):
        helper.backward(mm, {"audio": uni["audio"]})
    with pytest.raises(ValueError, match=r"unimodal_losses\['visual'\] does not require grad"):
        helper.backward(mm, {"audio": uni["audio"], "visual": uni["visual"].detach()})
    with pytest.raises(ValueError, match="multimodal_loss must be a scalar"):
        helper.backward(torch.ones(3, requires_grad=True), uni)


# ---------------------------------------------------------------------------- M >= 3 and DDP


class ThreeModal(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, 8))
                                      for d in (5, 7, 3))
        self.head = nn.Linear(24, 4)
        self.unimodal_heads = nn.ModuleList(nn.Linear(8, 4) for _ in range(3))

    def forward(self, xs, y):
        """The multimodal loss and the list of uni-modal losses."""
        feats = [enc(x) for enc, x in zip(self.encoders, xs)]
        mm = F.cross_entropy(self.head(torch.cat(feats, dim=1)), y)
        return mm, [F.cross_entropy(h(f), y) for h, f in zip(self.unimodal_heads, feats)]


def _three_modal_batch(seed, batch=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, d, generator=g) for d in (5, 7, 3)], torch.randint(0, 4, (batch,),
                                                                                generator=g)


def test_three_modalities_equal_the_per_encoder_rule():
    torch.manual_seed(1)
    model = ThreeModal()
    xs, y = _three_modal_batch(0)
    mm, uni = model(xs, y)
    g_mm = [torch.autograd.grad(mm, list(e.parameters()), retain_graph=True)
            for e in model.encoders]
    g_uni = [torch.autograd.grad(u, list(e.parameters()), retain_graph=True)
             for u, e in zip(uni, model.encoders)]
    want, want_w = _straightforward(g_mm, g_uni)
    helper = fastbml.MMPareto({str(i): e for i, e in enumerate(model.encoders)})
    helper.backward(mm, uni)
    torch.testing.assert_close(helper.last_weights, want_w.float(), rtol=1e-5, atol=1e-6)
    for enc, group in zip(model.encoders, want):
        for p, w in zip(enc.parameters(), group):
            torch.testing.assert_close(p.grad, w.float(), rtol=1e-5, atol=1e-7)


def mmpareto_ddp_ranks(rank, world):
    torch.manual_seed(1)
    model = ThreeModal()
    ddp = nn.parallel.DistributedDataParallel(model)
    helper = fastbml.MMPareto({str(i): e for i, e in enumerate(model.encoders)})
    xs, y = _three_modal_batch(0)
    xs, y = [x.chunk(world)[rank] for x in xs], y.chunk(world)[rank]
    helper.backward(*ddp(xs, y))  # through the wrapper: DDP all-reduces the total's backward
    return [p.grad.clone() for p in model.parameters()], helper.last_weights.clone()


def test_ddp_gives_the_global_batch_gradients_on_every_rank():
    (g0, w0), (g1, w1) = values(run_ranks(mmpareto_ddp_ranks))
    torch.manual_seed(1)
    model = ThreeModal()
    helper = fastbml.MMPareto({str(i): e for i, e in enumerate(model.encoders)})
    helper.backward(*model(*_three_modal_batch(0)))
    torch.testing.assert_close(w0, w1)
    torch.testing.assert_close(w0, helper.last_weights, rtol=1e-5, atol=1e-6)
    for a, b, p in zip(g0, g1, model.parameters()):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


def test_gamma_scales_the_result():
    g_mm, g_uni = _conflicting_groups()
    base = [[m + u for m, u in zip(gm, gu)] for gm, gu in zip(g_mm, g_uni)]
    one = [[t.clone() for t in g] for g in base]
    fastbml.mmpareto_combine_(base, g_uni, gamma=1.5, backend="torch")
    fastbml.mmpareto_combine_(one, g_uni, gamma=1.0, backend="torch")
    for a, b in zip((t for g in base for t in g), (t for g in one for t in g)):
        torch.testing.assert_close(a, 1.5 * b)


def test_dtensor_gradients_are_refused_with_the_tensor_named(tmp_path):
    """A one-rank gloo mesh of CPU tensors (on any machine)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)])
        with pytest.raises(TypeError, match=r"grads\[0\]\[0\] is a DTensor"):
            fastbml.mmpareto_combine_([[sharded], [torch.randn(3)]],
                                      [[torch.randn(8, 4)], [torch.randn(3)]])
    finally:
        dist.destroy_process_group()
