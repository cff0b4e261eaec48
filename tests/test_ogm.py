"""OGM / OGM-GE: coefficients (docs/methods.md#ogm-coefficients), ogm_modulate_ on every backend, the helper."""

import math

import pytest
import torch
from torch import nn
from utils import (
    ALL_BACKENDS,
    DEVICE,
    FAST_BACKENDS,
    FLOAT_DTYPES,
    CountingKernel,
    assert_close,
    randn,
)

import fastbml
from fastbml import rng

# ---------------------------------------------------------------------------- coefficients


@pytest.mark.parametrize(
    ("form", "expected_v"), [("paper", 1 - math.tanh(1.6)), ("shifted", 1 - math.tanh(0.8))]
)
def test_coefficients_of_the_spec_example(form, expected_v):
    k = fastbml.ogm_coefficients(torch.tensor([1.0, 2.0], device=DEVICE), 0.8, form)
    torch.testing.assert_close(k.cpu(), torch.tensor([1.0, expected_v]))


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.5, 0.8, 1.0, 2.6])
def test_paper_form_jumps_at_rho_one(alpha):
    k = fastbml.ogm_coefficients(torch.tensor([1.0 + 1e-6, 1.0]), alpha)
    assert k[0].item() == pytest.approx(1 - math.tanh(alpha), abs=1e-5) and k[1].item() == 1.0


def test_tie_modulates_neither_and_zero_scores_give_no_nan():
    assert torch.equal(fastbml.ogm_coefficients(torch.tensor([3.0, 3.0]), 0.8), torch.ones(2))
    assert torch.equal(fastbml.ogm_coefficients(torch.tensor([0.0, 0.0]), 0.8), torch.ones(2))
    k = fastbml.ogm_coefficients(torch.tensor([2.0, 0.0]), 0.8)
    assert k.tolist() == [0.0, 1.0]


def test_n_modality_rule_compares_with_the_strongest_other():
    s = torch.tensor([4.0, 2.0, 1.0])
    k = fastbml.ogm_coefficients(s, 0.5)
    torch.testing.assert_close(k, torch.tensor([1 - math.tanh(0.5 * 2.0), 1.0, 1.0]))


def test_alpha_zero_gives_ones():
    assert torch.equal(fastbml.ogm_coefficients(torch.rand(4) + 0.1, 0.0), torch.ones(4))


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.tensor([1.0]), 0.8), ValueError, "scores"),
        ((torch.ones(2, 2), 0.8), ValueError, "scores"),
        (([1.0, 2.0], 0.8), TypeError, "scores"),
        ((torch.tensor([1, 2]), 0.8), TypeError, "scores"),
        ((torch.ones(2), -0.1), ValueError, "alpha"),
        ((torch.ones(2), 0.8, "linear"), ValueError, "form"),
    ],
)
def test_coefficients_reject_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        fastbml.ogm_coefficients(*args)


# ---------------------------------------------------------------------------- ogm_modulate_

SHAPES = [(16, 3, 7, 7), (33, 17), (1,), (0, 5), (4099,), (3, 1, 5, 5)]


def make_params(shapes, dtype=torch.float32, noncontiguous=False):
    params = []
    for shape in shapes:
        p = nn.Parameter(torch.empty(shape, device=DEVICE, dtype=dtype))
        p.grad = randn(*shape, dtype=dtype, noncontiguous=noncontiguous, scale=0.5, shift=0.1)
        params.append(p)
    return params


def clone_grads(groups):
    """Independent copies of the parameters and their grads (contiguous), for the reference."""
    out = []
    for group in groups:
        copies = []
        for p in group:
            q = nn.Parameter(p.detach().clone())
            q.grad = p.grad.clone()
            copies.append(q)
        out.append(copies)
    return out


def grads_of(groups):
    return [p.grad for group in groups for p in group]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("noise", [True, False])
def test_fast_paths_match_torch(backend, dtype, noise):
    groups = [make_params(SHAPES[:3], dtype), make_params(SHAPES[3:], dtype)]
    coeffs = torch.tensor([0.336, 1.0], device=DEVICE)
    expected = clone_grads(groups)
    fastbml.ogm_modulate_(expected, coeffs, noise=noise, seed=1234, backend="torch")
    fastbml.ogm_modulate_(groups, coeffs, noise=noise, seed=1234, backend=backend)
    for a, e in zip(grads_of(groups), grads_of(expected)):
        assert a.dtype == dtype and a.shape == e.shape
        assert_close(a, e, scale=2.0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_non_contiguous_grads_match_torch(backend):
    groups = [make_params([(12, 9), (30, 4)], noncontiguous=True), make_params([(7, 6)])]
    assert not groups[0][0].grad.is_contiguous()
    expected = clone_grads(groups)
    coeffs = torch.tensor([0.5, 0.9], device=DEVICE)
    fastbml.ogm_modulate_(expected, coeffs, seed=5, backend="torch")
    fastbml.ogm_modulate_(groups, coeffs, seed=5, backend=backend)
    for a, e in zip(grads_of(groups), grads_of(expected)):
        assert_close(a, e)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_the_float64_definition(backend):
    """g <- k g + (std_unbiased(g) + 1e-8) z, with z the Philox normals of the flattened stream."""
    groups = [make_params([(50, 3)]), make_params([(7,), (1,)])]
    original = [g.clone().double() for g in grads_of(groups)]
    coeffs = torch.tensor([0.25, 1.0], device=DEVICE)
    fastbml.ogm_modulate_(groups, coeffs, seed=77, backend=backend)
    z = rng.philox_normal(77, rng.STREAM_NOISE, 160 + 8 + 1, device=DEVICE).double()
    starts, ks = [0, 152, 160], [0.25, 1.0, 1.0]
    for g, g0, start, k in zip(grads_of(groups), original, starts, ks):
        std = g0.std().item() if g0.numel() > 1 else 0.0
        expected = k * g0 + (std + 1e-8) * z[start:start + g0.numel()].view_as(g0)
        torch.testing.assert_close(g.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_noise_std_follows_each_unscaled_gradient(backend):
    small, large = make_params([(20000,)]), make_params([(30000,)])
    small[0].grad.mul_(0.01)
    std_small, std_large = small[0].grad.std().item(), large[0].grad.std().item()
    fastbml.ogm_modulate_([small, large], torch.zeros(2, device=DEVICE), seed=3, backend=backend)
    # With k = 0 only the noise remains; its sample std is within a few % of the target.
    assert small[0].grad.std().item() == pytest.approx(std_small, rel=0.03)
    assert large[0].grad.std().item() == pytest.approx(std_large, rel=0.03)
    assert abs(large[0].grad.mean().item()) < 5 * std_large / math.sqrt(30000)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_unit_coefficients_without_noise_are_the_identity(backend):
    groups = [make_params([(5, 5)], torch.bfloat16), make_params([(17,)])]
    before = [g.clone() for g in grads_of(groups)]
    fastbml.ogm_modulate_(groups, torch.ones(2, device=DEVICE), noise=False, backend=backend)
    for a, b in zip(grads_of(groups), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_seed_determines_the_noise_and_unmodulated_modality_gets_noise(backend):
    a = [make_params([(40, 4)]), make_params([(64,)])]
    b, c = clone_grads(a), clone_grads(a)
    before = a[1][0].grad.clone()
    coeffs = torch.tensor([0.3, 1.0], device=DEVICE)
    fastbml.ogm_modulate_(a, coeffs, seed=9, backend=backend)
    fastbml.ogm_modulate_(b, coeffs, seed=9, backend=backend)
    fastbml.ogm_modulate_(c, coeffs, seed=10, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(grads_of(a), grads_of(b)))
    assert not any(torch.equal(x, y) for x, y in zip(grads_of(a), grads_of(c)))
    assert not torch.equal(a[1][0].grad, before)  # k = 1, but the noise is still added


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_none_grads_are_skipped_and_flat_list_form(backend):
    params = make_params([(6, 6), (4,)])
    frozen = nn.Parameter(torch.ones(3, device=DEVICE))
    before = params[1].grad.clone()
    fastbml.ogm_modulate_([params[0], frozen, params[1]], torch.tensor([0.5, 2.0], device=DEVICE),
                          modality_index=[0, 0, 1], noise=False, backend=backend)
    assert frozen.grad is None
    torch.testing.assert_close(params[1].grad, 2.0 * before)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_finite_gradients_stay_in_their_tensor(backend):
    groups = [make_params([(10, 10)]), make_params([(50,)])]
    groups[0][0].grad[3, 3] = float("nan")
    expected = [[p] for p in make_params([(50,)])]
    expected[0][0].grad.copy_(groups[1][0].grad)
    fastbml.ogm_modulate_(groups, torch.tensor([0.5, 0.7], device=DEVICE), seed=2, backend=backend)
    assert not torch.isfinite(groups[0][0].grad).any()
    # The healthy tensor gets exactly what it would get on its own at the same stream offset.
    z = rng.philox_normal(2, rng.STREAM_NOISE, 150, device=DEVICE)[100:]
    g0 = expected[0][0].grad
    torch.testing.assert_close(groups[1][0].grad, 0.7 * g0 + (g0.std() + 1e-8) * z)


def test_meta_tensors_run_without_host_sync():
    """Any .item()/.cpu() on a meta tensor raises: the whole step must stay shape-only."""
    meta = torch.device("meta")
    params = [[nn.Parameter(torch.empty(64, 3, 7, 7, device=meta))],
              [nn.Parameter(torch.empty(10, 512, device=meta))]]
    for group in params:
        group[0].grad = torch.empty_like(group[0])
    ogm = fastbml.OGM({"audio": params[0], "visual": params[1]}, alpha=0.8, seed=1)
    labels = torch.empty(8, dtype=torch.long, device=meta)
    k = ogm.step([torch.empty(8, 6, device=meta)] * 2, labels, epoch=0)
    assert k.device.type == "meta" and k.shape == (2,)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda g, k: fastbml.ogm_modulate_(g, k[:1]), ValueError, "coeffs"),
        (lambda g, k: fastbml.ogm_modulate_(g, [0.5, 1.0]), TypeError, "coeffs"),
        (lambda g, k: fastbml.ogm_modulate_([g[0], [1.0]], k), TypeError, r"params\[1\]\[0\]"),
        (lambda g, k: fastbml.ogm_modulate_([g[0], g[0]], k), ValueError, "more than one"),
        (lambda g, k: fastbml.ogm_modulate_(g[0], k, modality_index=[0, 1, 2]), ValueError,
         "modality_index"),
        (lambda g, k: fastbml.ogm_modulate_(g, k.double().to("meta")), ValueError, "coeffs"),
        (lambda g, k: fastbml.ogm_modulate_(g, k, backend="cuda"), ValueError, "backend"),
    ],
)
def test_modulate_rejects_bad_input(call, error, match):
    groups = [make_params([(3, 3)]), make_params([(4,)])]
    with pytest.raises(error, match=match):
        call(groups, torch.tensor([0.5, 1.0], device=DEVICE))


# ---------------------------------------------------------------------------- the OGM helper


class TwoTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                                   nn.LazyLinear(8))
        self.visual = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(16, 3)

    def forward(self, a, v):
        fa, fv = self.audio(a), self.visual(v)
        w = self.head.weight
        u_a = fa @ w[:, :8].T + self.head.bias / 2
        u_v = fv @ w[:, 8:].T + self.head.bias / 2
        return u_a + u_v, u_a, u_v


def run_steps(model, ogm, epochs, data):
    """Train steps on batches from the generator `data`; returns (grads before, after) OGM."""
    records = []
    for epoch in epochs:
        a, v = torch.randn(8, 1, 5, 5, generator=data), torch.randn(8, 6, generator=data)
        y = torch.randint(0, 3, (8,), generator=data)
        model.zero_grad()
        z, u_a, u_v = model(a.to(DEVICE), v.to(DEVICE))
        nn.functional.cross_entropy(z, y.to(DEVICE)).backward()
        before = {n: p.grad.clone() for n, p in model.named_parameters()}
        ogm.step({"visual": u_v, "audio": u_a}, y.to(DEVICE), epoch=epoch)
        records.append((before, {n: p.grad.clone() for n, p in model.named_parameters()}))
    return records


def data_stream():
    return torch.Generator().manual_seed(0)


def make_model():
    torch.manual_seed(0)
    model = TwoTower().to(DEVICE)
    model(torch.randn(1, 1, 5, 5, device=DEVICE), torch.randn(1, 6, device=DEVICE))
    return model


def test_helper_modulates_encoder_weights_only_inside_the_window():
    model = make_model()
    ogm = fastbml.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, start=1, end=2,
                      warmup_epochs=2, seed=4)
    records = run_steps(model, ogm, [0, 1, 2, 3], data_stream())
    for epoch, (before, after) in enumerate(records):
        for name in before:
            changed = not torch.equal(before[name], after[name])
            selected = name.startswith(("audio", "visual")) and before[name].dim() >= 2
            assert changed == (selected and epoch == 2), (epoch, name)
    assert ogm.last_coeffs is not None and ogm.last_scores.shape == (2,)


def test_helper_conv_only_selects_4d_kernels():
    model = make_model()
    ogm = fastbml.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, conv_only=True)
    assert [p.dim() for group in ogm.params for p in group] == [4]


def test_helper_coefficients_follow_the_scores():
    model = make_model()
    ogm = fastbml.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, noise=False)
    (before, after), = run_steps(model, ogm, [0], data_stream())
    expected = fastbml.ogm_coefficients(ogm.last_scores, 0.8)
    torch.testing.assert_close(ogm.last_coeffs, expected)
    k_audio = expected[0].item()
    torch.testing.assert_close(after["audio.0.weight"], k_audio * before["audio.0.weight"])


def test_helper_resume_continues_the_same_noise_stream():
    model = make_model()
    ogm = fastbml.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, seed=11)
    full = run_steps(model, ogm, [0, 0, 0], data_stream())

    model = make_model()
    data = data_stream()
    first = fastbml.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, seed=11)
    run_steps(model, first, [0], data)
    assert first.state_dict() == {"seed": 11, "steps": 1}
    resumed = fastbml.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8)
    resumed.load_state_dict(first.state_dict())
    tail = run_steps(model, resumed, [0, 0], data)
    assert resumed.steps == 3
    for (_, after_full), (_, after_tail) in zip(full[1:], tail):
        for name in after_full:
            assert torch.equal(after_full[name], after_tail[name]), name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"groups": {"audio": nn.Linear(2, 2)}}, "groups"),
        ({"alpha": -1.0}, "alpha"),
        ({"form": "linear"}, "form"),
        ({"start": -1}, "start"),
        ({"start": 5, "end": 4}, "end"),
        ({"groups": {"audio": nn.Linear(2, 2), "visual": 3}}, "visual"),
    ],
)
def test_helper_rejects_bad_configuration(kwargs, match):
    args = {"groups": {"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}, "alpha": 0.5}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        fastbml.OGM(args.pop("groups"), **args)


def test_helper_rejects_mismatched_logits():
    model = make_model()
    ogm = fastbml.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.5)
    y = torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="logits"):
        ogm.step({"audio": randn(4, 3), "text": randn(4, 3)}, y, epoch=0)
    with pytest.raises(ValueError, match="modalities"):
        ogm.step([randn(4, 3)], y, epoch=0)
    with pytest.raises(ValueError, match=r"logits\[1\]"):
        ogm.step([randn(4, 3), randn(5, 3)], y, epoch=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_step_makes_no_host_sync(backend):
    model = make_model()
    ogm = fastbml.OGM({"audio": model.audio, "visual": model.visual}, alpha=0.8, seed=3,
                      backend=backend)
    data = data_stream()
    run_steps(model, ogm, [0], data)  # warm up: compile kernels, allocate
    a, v = torch.randn(8, 1, 5, 5, generator=data), torch.randn(8, 6, generator=data)
    y = torch.randint(0, 3, (8,), generator=data).to(DEVICE)
    z, u_a, u_v = model(a.to(DEVICE), v.to(DEVICE))
    nn.functional.cross_entropy(z, y).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ogm.step({"audio": u_a, "visual": u_v}, y, epoch=0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("n_tensors", [2, 9, 40])
def test_triton_launch_count_does_not_grow_with_the_number_of_tensors(monkeypatch, n_tensors):
    from fastbml.kernels import scale_noise as kernels

    launches = []
    for name in ("_moments_kernel", "_sigma_kernel", "_rewrite_kernel"):
        monkeypatch.setattr(kernels, name, CountingKernel(getattr(kernels, name), launches))
    groups = [make_params([(7, 3)] * (n_tensors // 2)), make_params([(5,)] * (n_tensors // 2))]
    fastbml.ogm_modulate_(groups, torch.tensor([0.5, 1.0], device=DEVICE), seed=1,
                          backend="triton")
    assert len(launches) == 3  # moments, sigma, rewrite: one each for a single dtype
