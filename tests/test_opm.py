"""opm_drop / opm_drop_probs: every backend against the torch path and the definition
(docs/methods.md#opm)."""

import math

import pytest
import torch
import torch.nn.functional as F
from utils import ALL_BACKENDS, DEVICE, FAST_BACKENDS, FLOAT_DTYPES, assert_close, randn

import fastbml
from fastbml import rng

# (batch, per-modality trailing shapes): odd sizes, 1-element rows, a 3-D feature, M = 2 and 3.
SHAPES = [
    (37, [(5,), (9,)]),
    (33, [(7,), (1,), (3, 2)]),
    (1, [(4,), (6,)]),
    (129, [(64,), (96,), (33,)]),
]


def features_of(batch, trailing, dtype=torch.float32, noncontiguous=False, grad=False):
    feats = [randn(batch, *t, dtype=dtype, noncontiguous=noncontiguous) for t in trailing]
    return [f.requires_grad_() for f in feats] if grad else feats


def definition(features, q, p_exe, seed, mask_seed=None):
    """The op written out from rng's Philox streams, in float64: (outputs, weights)."""
    mask_seed = seed if mask_seed is None else mask_seed
    batch, n_mod = features[0].shape[0], len(features)
    coin = rng.philox_uniform(seed, rng.STREAM_COIN, 1, device=DEVICE)[0]
    u = rng.philox_uniform(mask_seed, rng.STREAM_MASK, n_mod * batch,
                           device=DEVICE).view(n_mod, batch)
    q = torch.as_tensor(q, dtype=torch.float32, device=DEVICE)
    keep = (u >= q[:, None]).double()
    dims = [math.prod(f.shape[1:]) for f in features]
    theta = sum(d * float(qm) for d, qm in zip(dims, q)) / sum(dims)
    if coin >= torch.tensor(1.0 - p_exe, dtype=torch.float32):
        factor = keep / (1.0 - theta) if theta < 1 else keep * 0.0
        kappa = (keep.sum(0) > 0).double()
    else:
        factor = torch.ones_like(keep)
        kappa = torch.ones(batch, dtype=torch.float64, device=DEVICE)
    outs = [f.double() * factor[m].view(-1, *[1] * (f.dim() - 1)) for m, f in enumerate(features)]
    return outs, kappa / kappa.sum().clamp(min=1.0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("batch", [0, 1, 40])
def test_row_drop_reports_the_coin_of_its_own_streams(backend, batch):
    """The op is method-free: it draws from the streams it is given and returns its coin."""
    from fastbml.ops.row_drop import row_drop

    feats = features_of(batch, [(5,), (3,)])
    q = torch.tensor([0.6, 0.2], device=DEVICE)
    for s in range(12):
        seed = rng.seed_tensor(s, DEVICE)
        mask_seed = rng.seed_tensor(s + 100, DEVICE)
        outs, _, executed = row_drop(feats, q, threshold=0.5, seed=seed, mask_seed=mask_seed,
                                     coin_stream=5, mask_stream=9, backend=backend)
        coin = rng.philox_uniform(s, 5, 1, device=DEVICE)[0] >= 0.5
        assert executed.dtype == torch.bool and executed.shape == () and bool(executed) == bool(coin)
        keep = rng.philox_uniform(s + 100, 9, 2 * batch, device=DEVICE).view(2, batch) >= q[:, None]
        factor = torch.where(coin, keep / (1 - (0.6 * 5 + 0.2 * 3) / 8), 1.0)
        for m, (out, f) in enumerate(zip(outs, feats)):
            torch.testing.assert_close(out, f * factor[m][:, None], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(("batch", "trailing"), SHAPES)
def test_forward_matches_the_definition(backend, batch, trailing):
    feats = features_of(batch, trailing)
    q = torch.rand(len(trailing), device=DEVICE)
    seed = 1234 + batch
    outs, weights = fastbml.opm_drop(feats, q, p_exe=1.0, seed=seed, backend=backend)
    expected, expected_w = definition(feats, q, 1.0, seed)
    assert weights.dtype == torch.float32 and weights.shape == (batch,)
    for out, exp, f in zip(outs, expected, feats):
        assert out.shape == f.shape and out.dtype == f.dtype
        torch.testing.assert_close(out.double(), exp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weights.double(), expected_w, rtol=1e-7, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_coin_follows_seed_and_masks_follow_mask_seed(backend):
    feats = features_of(40, [(3,), (5,)])
    q = torch.tensor([0.5, 0.4], device=DEVICE)
    # coins: seed 2 -> 0.831 and 4 -> 0.998 drop, seed 3 -> 0.205 does not (p_exe = 0.5)
    for seed, mask_seed in ((2, 7), (4, 7), (3, 7), (2, 2**62 + 9)):
        outs, weights = fastbml.opm_drop(feats, q, p_exe=0.5, seed=seed, mask_seed=mask_seed,
                                         backend=backend)
        expected, expected_w = definition(feats, q, 0.5, seed, mask_seed)
        for out, exp in zip(outs, expected):
            torch.testing.assert_close(out.double(), exp, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(weights.double(), expected_w)
    with_7, _ = fastbml.opm_drop(feats, q, p_exe=1.0, seed=2, mask_seed=7, backend=backend)
    with_8, _ = fastbml.opm_drop(feats, q, p_exe=1.0, seed=2, mask_seed=8, backend=backend)
    assert not torch.equal(with_7[0] == 0, with_8[0] == 0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_fast_paths_match_torch_forward_and_backward(backend, dtype, noncontiguous):
    batch, trailing = 45, [(24,), (10,), (3, 5)]
    feats = features_of(batch, trailing, dtype, noncontiguous)
    upstream = [randn(batch, *t, dtype=dtype, noncontiguous=noncontiguous) for t in trailing]
    q = torch.rand(3, device=DEVICE) * 0.8
    results = {}
    for impl in ("torch", backend):
        leaves = [f.detach().clone().requires_grad_() for f in feats]
        outs, weights = fastbml.opm_drop(leaves, q, p_exe=1.0, seed=77, backend=impl)
        torch.autograd.backward(outs, upstream)
        results[impl] = (outs, weights, [x.grad for x in leaves])
    (outs, weights, grads), (ref_outs, ref_weights, ref_grads) = results[backend], results["torch"]
    torch.testing.assert_close(weights, ref_weights, rtol=0, atol=0)
    for a, b in zip(outs, ref_outs):
        assert_close(a, b)
    for a, b in zip(grads, ref_grads):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a, b)


def test_cpp_and_triton_draw_identical_masks_and_coins():
    pytest.importorskip("triton")
    if fastbml.backend.cpp_module() is None or DEVICE.type != "cpu":
        pytest.skip("compares cpp with the Triton interpreter on CPU")
    ones = [torch.ones(301, 8), torch.ones(301, 3), torch.ones(301, 5)]
    q = torch.tensor([0.35, 0.6, 0.1])
    for seed in (0, 5, 2**62 + 12345):
        cpp, w_cpp = fastbml.opm_drop(ones, q, p_exe=0.5, seed=seed, backend="cpp")
        tri, w_tri = fastbml.opm_drop(ones, q, p_exe=0.5, seed=seed, backend="triton")
        assert torch.equal(w_cpp, w_tri)
        for a, b in zip(cpp, tri):
            assert torch.equal(a == 0, b == 0)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("block", [64, 1024, 16384])
def test_triton_result_does_not_depend_on_the_block_size(block):
    pytest.importorskip("triton")
    from fastbml.kernels.row_drop import row_drop_scale

    feats = [randn(50, 40), randn(50, 7)]
    q = torch.tensor([0.5, 0.3], device=DEVICE)
    outs = [torch.empty_like(f) for f in feats]
    weights = torch.empty(50, device=DEVICE)
    seed = torch.tensor(99, device=DEVICE)
    executed = torch.empty((), dtype=torch.bool, device=DEVICE)
    row_drop_scale(feats, outs, q, threshold=0.0, seed=seed, mask_seed=seed,
                   coin_stream=rng.STREAM_COIN, mask_stream=rng.STREAM_MASK, weights=weights,
                   executed=executed, block=block)
    assert bool(executed)
    expected, expected_w = definition(feats, q, 1.0, 99)
    for out, exp in zip(outs, expected):
        torch.testing.assert_close(out.double(), exp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(weights.double(), expected_w)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradient_is_the_same_mask_and_scale(backend):
    feats = features_of(23, [(6,), (11,)], grad=True)
    q = torch.tensor([0.5, 0.0], device=DEVICE)
    outs, _ = fastbml.opm_drop(feats, q, p_exe=1.0, seed=3, backend=backend)
    upstream = [randn(*o.shape) for o in outs]
    torch.autograd.backward(outs, upstream)
    expected, _ = definition([torch.ones_like(f) for f in feats], q, 1.0, 3)
    for f, g, factor in zip(feats, upstream, expected):
        torch.testing.assert_close(f.grad.double(), g.double() * factor, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_an_unused_modality_gets_a_zero_gradient_and_double_backward_is_refused(backend):
    feats = features_of(10, [(4,), (3,)], grad=True)
    outs, _ = fastbml.opm_drop(feats, [0.5, 0.0], seed=6, backend=backend)
    (outs[0] ** 2).sum().backward()
    assert torch.equal(feats[1].grad, torch.zeros_like(feats[1]))
    outs, _ = fastbml.opm_drop(feats, [0.5, 0.0], seed=6, backend=backend)
    (grad,) = torch.autograd.grad((outs[0] ** 2).sum(), feats[0], create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|double backward|not support"):
        grad.sum().backward()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_same_seed_same_result_different_seed_different_mask(backend):
    feats = features_of(64, [(8,), (8,)])
    q = torch.tensor([0.5, 0.5], device=DEVICE)
    a, _ = fastbml.opm_drop(feats, q, seed=11, backend=backend)
    b, _ = fastbml.opm_drop(feats, q, seed=11, backend=backend)
    c, _ = fastbml.opm_drop(feats, q, seed=12, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0] == 0, c[0] == 0)


@pytest.mark.parametrize("backend", ["torch", *FAST_BACKENDS[:1]])
def test_drop_rate_and_coin_rate_are_statistically_right(backend):
    batch = 8192
    feats = [torch.ones(batch, 1, device=DEVICE), torch.ones(batch, 1, device=DEVICE)]
    q = torch.tensor([0.3, 0.0], device=DEVICE)
    outs, weights = fastbml.opm_drop(feats, q, p_exe=1.0, seed=2024, backend=backend)
    dropped = (outs[0] == 0).double().mean().item()
    assert abs(dropped - 0.3) < 4 * math.sqrt(0.3 * 0.7 / batch)
    assert (outs[1] != 0).all()  # the non-dominant modality is always kept (M = 2)
    scale = 1.0 / (1.0 - 0.15)  # theta = q_dom / 2 with equal dims
    torch.testing.assert_close(outs[1], torch.full_like(outs[1], scale))
    torch.testing.assert_close(weights, torch.full_like(weights, 1.0 / batch))
    small = [torch.ones(4, 1, device=DEVICE)] * 2
    runs = 600
    executed = sum(
        bool((fastbml.opm_drop(small, q * 0 + 1.0, p_exe=0.7, seed=s, backend=backend)[0][0]
              == 0).all())
        for s in range(runs))
    assert abs(executed / runs - 0.7) < 4 * math.sqrt(0.7 * 0.3 / runs)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_identity_when_p_exe_is_zero_or_no_modality_dominates(backend):
    feats = features_of(19, [(5,), (3,)])
    outs, weights = fastbml.opm_drop(feats, [0.75, 0.0], p_exe=0.0, seed=1, backend=backend)
    assert all(torch.equal(o, f) for o, f in zip(outs, feats))
    torch.testing.assert_close(weights, torch.full((19,), 1 / 19, device=DEVICE))
    tie = fastbml.opm_drop_probs(torch.tensor([3.5, 3.5], device=DEVICE), 0.5, 0.5)
    assert torch.equal(tie, torch.zeros(2, device=DEVICE))
    outs, weights = fastbml.opm_drop(feats, tie, p_exe=1.0, seed=1, backend=backend)
    assert all(torch.equal(o, f) for o, f in zip(outs, feats))
    torch.testing.assert_close(weights, torch.full((19,), 1 / 19, device=DEVICE))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rows_with_every_modality_dropped_weigh_zero(backend):
    batch = 64
    feats = features_of(batch, [(4,), (2,), (3,)])
    outs, weights = fastbml.opm_drop(feats, [0.7, 0.6, 0.8], p_exe=1.0, seed=8, backend=backend)
    all_dropped = torch.stack([(o == 0).all(dim=1) for o in outs]).all(dim=0)
    assert 0 < int(all_dropped.sum()) < batch
    assert torch.equal(weights == 0, all_dropped)
    kept = batch - int(all_dropped.sum())
    torch.testing.assert_close(weights[~all_dropped], torch.full((kept,), 1.0 / kept,
                                                                 device=DEVICE))
    everything, w = fastbml.opm_drop(feats, [1.0, 1.0, 1.0], p_exe=1.0, seed=8, backend=backend)
    assert torch.equal(w, torch.zeros(batch, device=DEVICE))
    assert all(torch.equal(o, torch.zeros_like(o)) for o in everything)  # theta = 1: 0, not NaN


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("q", [[0.8, 0.7, 0.9], [1.0, 1.0, 1.0]])
def test_loss_weights_give_the_gradients_of_row_compaction(backend, q):
    """On a linear concat head, weighted loss == mean CE over the kept rows (the reference)."""
    batch, dims, n_classes = 48, [6, 4, 5], 7
    feats = features_of(batch, [(d,) for d in dims], grad=True)
    labels = torch.randint(0, n_classes, (batch,), device=DEVICE)
    head = torch.nn.Linear(sum(dims), n_classes).to(DEVICE)
    outs, weights = fastbml.opm_drop(feats, q, p_exe=1.0, seed=21, backend=backend)
    loss = (F.cross_entropy(head(torch.cat(outs, 1)), labels, reduction="none") * weights).sum()
    loss.backward()
    ours = [f.grad.clone() for f in feats] + [head.weight.grad.clone(), head.bias.grad.clone()]

    for p in [*feats, *head.parameters()]:
        p.grad = None
    dropped, _ = definition(feats, q, 1.0, 21)
    factor = [(d / f.double()).float() for d, f in zip(dropped, feats)]
    kept = torch.stack([fac.abs().sum(1) > 0 for fac in factor]).any(0)
    fused = torch.cat([f * fac for f, fac in zip(feats, factor)], 1)[kept]
    if kept.any():
        F.cross_entropy(head(fused), labels[kept]).backward()
        reference = [f.grad for f in feats] + [head.weight.grad, head.bias.grad]
    else:  # the reference skips the step: nothing moves
        reference = [torch.zeros_like(g) for g in ours]
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("batch", [0, 1])
def test_tiny_batches(backend, batch):
    feats = features_of(batch, [(3,), (2, 2)], grad=True)
    outs, weights = fastbml.opm_drop(feats, [0.5, 0.0], p_exe=1.0, seed=4, backend=backend)
    assert [o.shape for o in outs] == [f.shape for f in feats] and weights.shape == (batch,)
    sum(o.sum() for o in outs).backward()
    assert all(f.grad.shape == f.shape for f in feats)
    if batch == 1:
        torch.testing.assert_close(weights, torch.ones(1, device=DEVICE))


def test_q_theta_and_scores_are_detached():
    logits = [randn(16, 5).requires_grad_(), randn(16, 5).requires_grad_()]
    labels = torch.randint(0, 5, (16,), device=DEVICE)
    q = fastbml.opm_drop_probs(fastbml.modality_scores(logits, labels), 0.5, 0.5)
    q_grad = (q + 0.0).requires_grad_()  # even a q that requires grad gets none
    feats = features_of(16, [(4,), (4,)], grad=True)
    outs, _ = fastbml.opm_drop(feats, q_grad, seed=0)
    sum(o.sum() for o in outs).backward()
    assert not q.requires_grad and q_grad.grad is None
    assert all(u.grad is None for u in logits)


def test_drop_probs_follow_spec_invariants():
    q = fastbml.opm_drop_probs(torch.tensor([1.0, 1e-30], device=DEVICE), 0.5, 0.5)
    torch.testing.assert_close(q, torch.tensor([0.75, 0.0], device=DEVICE))
    d = 512
    theta = (q * d).sum() / (2 * d)
    torch.testing.assert_close(1.0 / (1.0 - theta), torch.tensor(1.6, device=DEVICE))
    # M = 2, rho = 2: the weak modality gets 0 (no BalanceBenchmark aliasing:
    # docs/methods.md#opm-with-n-modalities).
    q = fastbml.opm_drop_probs(torch.tensor([2.0, 4.0], device=DEVICE), 0.4, 1.0)
    expected = 0.4 * (1 + math.tanh(1.0))
    torch.testing.assert_close(q, torch.tensor([0.0, expected], device=DEVICE))
    # M = 3: dominant only when beating the sum of the others; clipped to 1.
    q = fastbml.opm_drop_probs(torch.tensor([3.0, 1.0, 1.0], device=DEVICE), 0.5, 0.5)
    torch.testing.assert_close(q, torch.tensor([0.5 * (1 + 0.5 * math.tanh(0.5)), 0, 0],
                                               device=DEVICE))
    assert torch.equal(fastbml.opm_drop_probs(torch.tensor([3.0, 2.0, 2.0]), 0.5, 0.5),
                       torch.zeros(3))
    torch.testing.assert_close(fastbml.opm_drop_probs(torch.tensor([9.0, 1.0]), 0.9, 1.0),
                               torch.tensor([1.0, 0.0]))


def test_hot_path_runs_on_meta_tensors_without_host_sync():
    feats = [torch.empty(32, 16, device="meta", requires_grad=True),
             torch.empty(32, 8, device="meta", requires_grad=True)]
    logits = [torch.empty(32, 5, device="meta"), torch.empty(32, 5, device="meta")]
    labels = torch.empty(32, dtype=torch.long, device="meta")
    q = fastbml.opm_drop_probs(fastbml.modality_scores(logits, labels), 0.5, 0.5)
    assert q.device.type == "meta"
    outs, weights = fastbml.opm_drop(feats, q, p_exe=0.7, seed=5, backend="torch")
    assert [o.shape for o in outs] == [(32, 16), (32, 8)] and weights.shape == (32,)
    sum(o.sum() for o in outs).backward()
    assert feats[0].grad.device.type == "meta"
    opm = fastbml.OPM(["a", "v"], seed=1, backend="torch")
    out, w = opm({"a": feats[0], "v": feats[1]}, {"a": logits[0], "v": logits[1]}, labels, 0)
    assert out["a"].device.type == "meta" and w.shape == (32,)
    assert opm.last_theta.device.type == "meta" and opm.last_executed.device.type == "meta"


@pytest.mark.parametrize(
    ("features", "q", "p_exe", "error", "match"),
    [
        (lambda: [randn(4, 3), randn(5, 3)], [0.1, 0.2], 1.0, ValueError, r"features\[1\]"),
        (lambda: [randn(4, 3), randn(4, 3)], [0.1], 1.0, ValueError, "q"),
        (lambda: [randn(4, 3), randn(4, 3)], torch.zeros(3), 1.0, ValueError, "q"),
        (lambda: [randn(4, 3), randn(4, 3)], [0.1, 1.5], 1.0, ValueError, r"q\[1\]"),
        (lambda: [randn(4, 3), randn(4, 3)], torch.tensor([-0.1, 0.2]), 1.0, ValueError, "q"),
        (lambda: [randn(4, 3), randn(4, 3)], torch.tensor([0.5, float("nan")]), 1.0, ValueError,
         "q"),
        (lambda: [randn(4, 3), randn(4, 3)], torch.tensor([0, 1]), 1.0, TypeError, "q"),
        (lambda: [randn(4, 3), randn(4, 3)], "ab", 1.0, TypeError, "q"),
        (lambda: [randn(4, 3), randn(4, 3)], [0.1, 0.2], 1.2, ValueError, "p_exe"),
        (lambda: [randn(4, 3), randn(4, 3)], [0.1, 0.2], -0.1, ValueError, "p_exe"),
        (lambda: [randn(4, 3), randn(4, 3)], [0.1, 0.2], True, TypeError, "p_exe"),
        (lambda: [randn(4, 3), torch.ones(4, 3, dtype=torch.long)], [0.1, 0.2], 1.0, TypeError,
         r"features\[1\]"),
        (lambda: [randn(4, 3), randn(4, 3, dtype=torch.float16)], [0.1, 0.2], 1.0, ValueError,
         r"features\[1\]"),
        (lambda: [randn(4, 3), [1.0, 2.0]], [0.1, 0.2], 1.0, TypeError, r"features\[1\]"),
        (lambda: randn(2, 4, 3), [0.1, 0.2], 1.0, TypeError, "features"),
        (lambda: [], [], 1.0, TypeError, "features"),
    ],
)
def test_bad_input_names_the_argument(features, q, p_exe, error, match):
    if isinstance(q, torch.Tensor):
        if DEVICE.type == "cuda" and q.shape == (2,) and q.dtype.is_floating_point:
            pytest.skip("a device q's range is checked by a device-side assert on CUDA")
        q = q.to(DEVICE)
    with pytest.raises(error, match=match):
        fastbml.opm_drop(features(), q, p_exe=p_exe, seed=0)


@pytest.mark.parametrize(("args", "error", "match"), [
    ((torch.ones(1), 0.5, 0.5), ValueError, "scores"),
    ((torch.ones(2, dtype=torch.long), 0.5, 0.5), TypeError, "scores"),
    (([1.0, 2.0], 0.5, 0.5), TypeError, "scores"),
    ((torch.ones(2), 1.5, 0.5), ValueError, "q_base"),
    ((torch.ones(2), 0.5, -1.0), ValueError, "lam"),
])
def test_drop_probs_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        fastbml.opm_drop_probs(*args)


@pytest.mark.gpu
def test_opm_step_makes_no_host_sync_on_cuda():
    feats = {m: torch.randn(64, 512, device="cuda", requires_grad=True) for m in ("a", "v")}
    logits = {m: torch.randn(64, 10, device="cuda") for m in ("a", "v")}
    labels = torch.randint(0, 10, (64,), device="cuda")
    head = torch.nn.Linear(1024, 10).cuda()
    opm = fastbml.OPM(["a", "v"], p_exe=1.0, seed=0)

    def step():
        out, w = opm(feats, logits, labels, epoch=0)
        z = head(torch.cat([out["a"], out["v"]], dim=1))
        (F.cross_entropy(z, labels, reduction="none") * w).sum().backward()

    step()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
