"""PMR (docs/methods.md#pmr): the prototype_cross_entropy op on every backend against the torch
reference and the definition, and the fastbml.PMR helper against the authors' loop."""

import pytest
import torch
import torch.nn.functional as F
from distributed_utils import run_ranks, values
from torch._dynamo.testing import CompileCounterWithBackend
from utils import ALL_BACKENDS, DEVICE, FAST_BACKENDS, FLOAT_DTYPES, assert_close, randn

import fastbml
from fastbml.ops.prototype_cross_entropy import prototype_cross_entropy

# (batch, classes, feature width): odd sizes, single rows / classes / columns, the benchmark's.
SHAPES = [(37, 19, 45), (1, 1, 1), (1, 7, 3), (5, 1, 9), (64, 31, 512), (17, 40, 33)]


def problem(batch, n_classes, dim, dtype=torch.float32, noncontiguous=False, masked=True,
            seed=0):
    """Random features, prototypes near them, a class mask (all True unless `masked`; then some
    classes, the last among them, are left out), labels."""
    torch.manual_seed(seed)
    # a strided view in the dtype under test (utils.randn's copy to a dtype is contiguous)
    f = randn(batch, 2 * dim + 1, dtype=dtype)[:, 1::2] if noncontiguous else randn(
        batch, dim, dtype=dtype)
    protos = randn(n_classes, dim, scale=0.7)
    mask = torch.rand(n_classes, device=DEVICE) > 0.25
    mask[0] = True
    if masked and n_classes > 1:
        mask[-1] = False
    else:
        mask[:] = True
    labels = torch.randint(0, n_classes, (batch,), device=DEVICE)
    return f, protos, mask, labels


def definition(f, protos, mask, labels):
    """The loss written out in float64 from the pairwise differences."""
    d = (f.double()[:, None, :] - protos.double()[None, :, :]).pow(2).sum(-1).sqrt()
    log_p = torch.log_softmax((-d).masked_fill(~mask, float("-inf")), dim=1)
    kept = mask[labels]
    picked = log_p.gather(1, labels[:, None]).squeeze(1)
    return torch.where(kept, -picked, torch.zeros_like(picked))


def loss_and_grad(backend, f, protos, mask, labels, upstream):
    leaf = f.detach().clone().requires_grad_()
    loss = prototype_cross_entropy(leaf, protos, mask, labels, backend=backend)
    (loss * upstream).sum().backward()
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(("batch", "n_classes", "dim"), SHAPES)
def test_loss_matches_the_definition(backend, batch, n_classes, dim):
    f, protos, mask, labels = problem(batch, n_classes, dim)
    loss = prototype_cross_entropy(f, protos, mask, labels, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == (batch,)
    torch.testing.assert_close(loss.double(), definition(f, protos, mask, labels), rtol=2e-5,
                               atol=2e-5)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("noncontiguous", [False, True])
@pytest.mark.parametrize(("batch", "n_classes", "dim"), SHAPES)
def test_fast_paths_match_torch_forward_and_backward(backend, dtype, noncontiguous, batch,
                                                     n_classes, dim):
    f, protos, mask, labels = problem(batch, n_classes, dim, dtype, noncontiguous)
    assert f.is_contiguous() != (noncontiguous and dim > 1)
    upstream = randn(batch)
    loss, grad = loss_and_grad(backend, f, protos, mask, labels, upstream)
    ref_loss, ref_grad = loss_and_grad("torch", f, protos, mask, labels, upstream)
    # both compute in float32 from the same stored values: float32 agreement, up to the
    # summation order of D squares
    assert_close(loss, ref_loss, torch.float32, scale=4)
    assert grad.dtype == dtype and grad.shape == f.shape
    assert_close(grad, ref_grad, dtype, scale=4 if dtype == torch.float32 else 1)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batch(backend):
    f, protos, mask, labels = problem(0, 6, 5)
    leaf = f.requires_grad_()
    loss = prototype_cross_entropy(leaf, protos, mask, labels, backend=backend)
    assert loss.shape == (0,)
    loss.sum().backward()
    assert leaf.grad.shape == (0, 5)


def test_gradcheck_of_the_torch_path_in_float64():
    f, protos, mask, labels = problem(7, 5, 6)
    f64 = f.double().requires_grad_()

    def fn(x):
        return prototype_cross_entropy(x, protos, mask, labels, backend="torch")
    assert torch.autograd.gradcheck(fn, (f64,))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradient_is_the_autograd_gradient_of_the_definition(backend):
    f, protos, mask, labels = problem(23, 9, 14)
    upstream = randn(23)
    leaf = f.double().requires_grad_()
    (definition(leaf, protos, mask, labels) * upstream.double()).sum().backward()
    _, grad = loss_and_grad(backend, f, protos, mask, labels, upstream)
    torch.testing.assert_close(grad.double(), leaf.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_a_feature_on_a_prototype_gets_a_finite_gradient(backend):
    """d = 0 takes the norm's subgradient 0: the other classes' terms remain."""
    f, protos, mask, labels = problem(6, 5, 7, masked=False)
    f[0] = protos[labels[0]]  # on its own class's prototype
    f[1] = protos[(labels[1] + 1) % 5]  # on another class's prototype
    f[2] = protos[labels[2]]
    upstream = randn(6)
    loss, grad = loss_and_grad(backend, f, protos, mask, labels, upstream)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # the definition's gradient with the zero-distance pair's term removed
    d = (f.double()[:, None] - protos.double()[None]).pow(2).sum(-1).sqrt()
    p = torch.softmax(-d, dim=1)
    a = (p - F.one_hot(labels, 5).double()) / torch.where(d > 0, d, 1.0)
    a = torch.where(d > 0, a, 0.0) * upstream.double()[:, None]
    expected = a @ protos.double() - f.double() * a.sum(1, keepdim=True)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rows_of_absent_classes_are_ignored_and_nothing_is_nan(backend):
    f, protos, mask, labels = problem(30, 6, 8)
    nothing = torch.zeros(6, dtype=torch.bool, device=DEVICE)
    upstream = randn(30)
    loss, grad = loss_and_grad(backend, f, protos, nothing, labels, upstream)
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))
    loss, grad = loss_and_grad(backend, f, protos, mask, labels, upstream)
    absent = ~mask[labels]
    assert absent.any() and (~absent).any()
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.equal(loss[absent], torch.zeros_like(loss[absent]))
    assert torch.equal(grad[absent], torch.zeros_like(grad[absent]))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_finite_features_propagate(backend):
    f, protos, mask, labels = problem(4, 3, 5, masked=False)
    f[1, 2] = float("nan")
    loss, grad = loss_and_grad(backend, f, protos, mask, labels, torch.ones(4, device=DEVICE))
    assert torch.isnan(loss[1]) and torch.isnan(grad[1]).any()
    assert torch.isfinite(loss[[0, 2, 3]]).all() and torch.isfinite(grad[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_labels_out_of_range_raise(backend):
    if DEVICE.type == "cuda":
        pytest.skip("a device-side assert on CUDA")
    f, protos, mask, _ = problem(4, 3, 5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        prototype_cross_entropy(f, protos, mask, torch.tensor([0, 1, 3, 0]), backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_double_backward_is_refused(backend):
    f, protos, mask, labels = problem(5, 4, 3)
    leaf = f.requires_grad_()
    (grad,) = torch.autograd.grad(
        prototype_cross_entropy(leaf, protos, mask, labels, backend=backend).pow(2).sum(), leaf,
        create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|double backward|not support"):
        grad.sum().backward()


# ---------------------------------------------------------------------------- the helper


def authors_step(fa, fv, pa, pv, labels, alpha):
    """The authors' per-step PMR loss (their B x C distance loop and score sums), M = 2."""
    def eu_dist(x, protos):
        d = torch.zeros(x.shape[0], protos.shape[0], dtype=x.dtype)
        for i in range(x.shape[0]):
            for j in range(protos.shape[0]):
                d[i, j] = torch.sqrt(torch.dot(x[i] - protos[j], x[i] - protos[j]))
        return d
    audio_sim, visual_sim = -eu_dist(fa, pa), -eu_dist(fv, pv)
    score_a = sum(torch.softmax(audio_sim, 1)[i][labels[i]] for i in range(len(labels)))
    score_v = sum(torch.softmax(visual_sim, 1)[i][labels[i]] for i in range(len(labels)))
    ratio = score_a / score_v
    beta, lam = (0, alpha) if ratio > 1 else (alpha, 0) if ratio < 1 else (0, 0)
    return beta * F.cross_entropy(audio_sim, labels) + lam * F.cross_entropy(visual_sim, labels)


def authors_prototypes(batches, n_classes, dims, epoch, old=None, momentum=0.2):
    """The authors' calculate_prototype: per-sample sums, then the EMA for epoch > 0."""
    protos = [torch.zeros(n_classes, d) for d in dims]
    count = [0] * n_classes
    for feats, labels in batches:
        for c, y in enumerate(labels):
            count[y] += 1
            for p, f in zip(protos, feats):
                p[y] += f[c]
    for c in range(n_classes):
        for p in protos:
            p[c] /= count[c]
    if epoch > 0:
        protos = [(1 - momentum) * p + momentum * q for p, q in zip(protos, old)]
    return protos


def batches(n, batch, n_classes, dims, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, n_classes, (batch,), generator=g)
        centres = [torch.randn(n_classes, d, generator=g) * 2 for d in dims]
        feats = [c[labels] + torch.randn(batch, d, generator=g) + shift for c, d in zip(centres, dims)]
        out.append((feats, labels))
    return out


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_pmr_equals_the_authors_loop_over_three_epochs(backend):
    n_classes, dims, alpha, momentum = 4, [6, 5], 1.0, 0.2
    pmr = fastbml.PMR(["audio", "visual"], n_classes, alpha=alpha, momentum=momentum,
                      backend=backend)
    subsets = [batches(3, 16, n_classes, dims, seed=e) for e in range(4)]
    pmr.update_prototypes(0, [({"audio": f[0], "visual": f[1]}, y) for f, y in subsets[0]])
    theirs = authors_prototypes(subsets[0], n_classes, dims, 0)
    chosen = set()
    for epoch in range(3):
        for p, q in zip(pmr.prototypes, theirs):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for feats, labels in batches(2, 10, n_classes, dims, seed=50 + epoch, shift=0.3 * epoch):
            mine = [f.clone().requires_grad_() for f in feats]
            ref = [f.clone().requires_grad_() for f in feats]
            loss = pmr.loss(mine, labels, epoch)
            chosen.add(tuple(pmr.last_weights.tolist()))
            expected = authors_step(*ref, *theirs, labels, alpha)
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
            loss.backward()
            expected.backward()
            for a, b in zip(mine, ref):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
        for feats, labels in subsets[epoch + 1]:
            pmr.collect(feats, labels)
        pmr.update_prototypes(epoch)
        theirs = authors_prototypes(subsets[epoch + 1], n_classes, dims, epoch, theirs, momentum)
    assert chosen == {(1.0, 0.0), (0.0, 1.0)}  # both modalities were the weaker one


def test_the_weaker_modality_gets_the_loss_and_m3_takes_every_trailing_one():
    w = fastbml.pmr_loss_weights
    assert w(torch.tensor([3.0, 5.0])).tolist() == [1.0, 0.0]
    assert w(torch.tensor([5.0, 3.0])).tolist() == [0.0, 1.0]
    assert w(torch.tensor([4.0, 4.0])).tolist() == [0.0, 0.0]  # a tie: neither, as the authors
    assert w(torch.tensor([1.0, 7.0, 3.0])).tolist() == [1.0, 0.0, 1.0]
    assert w(torch.tensor([7.0, 7.0, 3.0])).tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="scores"):
        w(torch.ones(1))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_three_modalities_sum_the_loss_of_every_modality_behind(backend):
    dims = [4, 6, 5]
    pmr = fastbml.PMR(["a", "b", "c"], 5, alpha=0.7, backend=backend)
    for feats, labels in batches(4, 12, 5, dims, seed=3):
        pmr.collect(feats, labels)
    pmr.update_prototypes(0)
    (feats, labels), = batches(1, 9, 5, dims, seed=9)
    loss = pmr.loss(feats, labels, 0)
    per = [prototype_cross_entropy(f, p, pmr.valid, labels, backend="torch").mean()
           for f, p in zip(feats, pmr.prototypes)]
    scores = torch.stack([torch.exp(-prototype_cross_entropy(f, p, pmr.valid, labels,
                                                              backend="torch")).sum()
                          for f, p in zip(feats, pmr.prototypes)])
    weights = (scores < scores.max()).float()
    assert 1 <= int(weights.sum()) <= 2
    torch.testing.assert_close(pmr.last_scores, scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, 0.7 * sum(wm * pm for wm, pm in zip(weights, per)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_absent_classes_keep_their_prototype_and_unseen_ones_stay_out(backend):
    n_classes, dims = 5, [3, 4]
    pmr = fastbml.PMR(["a", "v"], n_classes, momentum=0.5, backend=backend)
    (feats, labels), = batches(1, 20, n_classes, dims, seed=1)
    # before any prototype: zero loss, zero gradient, no NaN
    leaves = [f.clone().requires_grad_() for f in feats]
    loss = pmr.loss(leaves, labels, 0)
    loss.backward()
    assert float(loss.detach()) == 0.0 and all(torch.equal(x.grad, torch.zeros_like(x)) for x in leaves)
    first = labels < 3  # classes 3 and 4 absent from the first subset
    pmr.collect([f[first] for f in feats], labels[first])
    pmr.update_prototypes(0)
    assert pmr.valid.tolist() == [True, True, True, False, False]
    before = [p.clone() for p in pmr.prototypes]
    loss = pmr.loss(feats, labels, 0)  # samples of classes 3 and 4 are ignored
    assert torch.isfinite(loss)
    second = labels != 1  # class 1 absent now: it keeps its prototype
    pmr.collect([f[second] for f in feats], labels[second])
    pmr.update_prototypes(1)
    assert pmr.valid.all()
    for p, b, f in zip(pmr.prototypes, before, feats):
        assert torch.equal(p[1], b[1])
        for c in (3, 4):  # new classes take their mean (no EMA with a prototype they never had)
            torch.testing.assert_close(p[c], f[labels == c].mean(0))
        for c in (0, 2):  # EMA with momentum 0.5
            torch.testing.assert_close(p[c], 0.5 * f[labels == c].mean(0) + 0.5 * b[c])


def test_window_state_dict_and_errors():
    pmr = fastbml.PMR(["a", "v"], 4, start=1, end=2, backend="torch")
    (feats, labels), = batches(1, 12, 4, [3, 2], seed=4)
    assert pmr.state_dict() == {"prototypes": None, "valid": None, "steps": 0}
    pmr.collect(feats, labels)
    pmr.update_prototypes(0)
    assert float(pmr.loss(feats, labels, 0)) == 0.0 and pmr.last_weights is None
    assert float(pmr.loss(feats, labels, 3)) == 0.0
    loss = pmr.loss(feats, labels, 1)
    assert float(loss) > 0.0 and pmr.steps == 3
    state = pmr.state_dict()
    other = fastbml.PMR(["a", "v"], 4, start=1, end=2, backend="torch")
    other.load_state_dict(state)
    assert other.steps == 3 and torch.equal(other.valid, pmr.valid)
    torch.testing.assert_close(other.loss(feats, labels, 1), loss)
    with pytest.raises(ValueError, match="widths"):
        other.loss([torch.randn(12, 5), feats[1]], labels, 1)
    with pytest.raises(ValueError, match=r"features\['v'\]"):
        other.loss([feats[0], feats[1][:5]], labels, 1)
    with pytest.raises(TypeError, match=r"features\['a'\]"):
        other.loss([feats[0].long(), feats[1]], labels, 1)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        other.collect(feats, labels + 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):  # guarded by the op
        other.loss(feats, labels + 4, 1)
    with pytest.raises(ValueError, match="momentum"):
        fastbml.PMR(["a", "v"], 4, momentum=1.5)
    with pytest.raises(ValueError, match="n_classes"):
        fastbml.PMR(["a", "v"], 0)
    with pytest.raises(ValueError, match="no features were collected"):
        fastbml.PMR(["a", "v"], 4).update_prototypes(0)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_loss_compiles_to_one_graph_and_equals_eager(backend):
    dims = [6, 4]
    sets = batches(4, 10, 5, dims, seed=8)

    def run(compile_):
        pmr = fastbml.PMR(["a", "v"], 5, backend=backend)
        for feats, labels in sets[:2]:
            pmr.collect(feats, labels)
        pmr.update_prototypes(0)
        fn, counter = pmr.loss, None
        if compile_:
            torch._dynamo.reset()
            counter = CompileCounterWithBackend("aot_eager")
            fn = torch.compile(pmr.loss, fullgraph=True, backend=counter)
        out = []
        for feats, labels in sets:
            leaves = [f.clone().requires_grad_() for f in feats]
            loss = fn(leaves, labels, 0)
            loss.backward()
            out.append((loss.detach(), [x.grad for x in leaves], pmr.last_weights.clone()))
        return out, counter

    eager, _ = run(False)
    compiled, counter = run(True)
    assert counter.frame_count == 1
    for (loss, grads, w), (e_loss, e_grads, e_w) in zip(compiled, eager):
        torch.testing.assert_close(loss, e_loss, rtol=1e-6, atol=1e-7)
        assert torch.equal(w, e_w)
        for g, e in zip(grads, e_grads):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


def _pmr_ranks(rank, world, sets, dims):
    pmr = fastbml.PMR(["a", "v"], 5)
    for feats, labels in sets[:2]:
        pmr.collect([f.chunk(world)[rank] for f in feats], labels.chunk(world)[rank])
    pmr.update_prototypes(0)
    feats, labels = sets[2]
    pmr.loss([f.chunk(world)[rank] for f in feats], labels.chunk(world)[rank], 0)
    return [p.clone() for p in pmr.prototypes], pmr.last_scores.clone()


def test_ddp_ranks_share_the_prototypes_and_scores_of_the_global_batch():
    dims = [6, 4]
    sets = batches(3, 16, 5, dims, seed=12)
    (protos0, scores0), (protos1, scores1) = values(run_ranks(_pmr_ranks, sets, dims))
    single = fastbml.PMR(["a", "v"], 5, backend="torch")
    for feats, labels in sets[:2]:
        single.collect(feats, labels)
    single.update_prototypes(0)
    single.loss(*sets[2], 0)
    for p0, p1, p in zip(protos0, protos1, single.prototypes):
        assert torch.equal(p0, p1)
        torch.testing.assert_close(p0, p, rtol=1e-6, atol=1e-6)
    assert torch.equal(scores0, scores1)
    torch.testing.assert_close(scores0, single.last_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_pmr_step_makes_no_host_sync_on_cuda():
    feats = {m: torch.randn(64, 512, device="cuda", requires_grad=True) for m in ("a", "v")}
    labels = torch.randint(0, 31, (64,), device="cuda")
    pmr = fastbml.PMR(["a", "v"], 31)
    pmr.collect(feats, labels)
    pmr.update_prototypes(0)

    def step():
        pmr.loss(feats, labels, epoch=0).backward()
        pmr.collect(feats, labels)
        pmr.update_prototypes(1)

    step()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("rows", [2, 16])
def test_triton_result_does_not_depend_on_the_row_block(rows):
    pytest.importorskip("triton")
    from fastbml.kernels.prototype_cross_entropy import (
        prototype_ce_coefficients,
        prototype_ce_forward,
    )

    f, protos, mask, labels = problem(37, 19, 45)
    grad = randn(37)
    m8 = mask.view(torch.uint8)
    loss, lse = prototype_ce_forward(f, protos, m8, labels, rows=rows)
    ref_loss, ref_lse = prototype_ce_forward(f, protos, m8, labels, rows=4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss.double(), definition(f, protos, mask, labels), rtol=2e-5,
                               atol=2e-5)
    a = prototype_ce_coefficients(grad, f, protos, m8, labels, lse, rows=rows)
    torch.testing.assert_close(
        a, prototype_ce_coefficients(grad, f, protos, m8, labels, lse, rows=4), rtol=1e-6,
        atol=1e-6)
