"""AGM (docs/methods.md#agm): Shapley weights, the combined_nll op on every backend, the
coefficients' sign, the cached-output path against the authors' 2^M - 1 full forwards, the
helper's state, opcheck and torch.compile."""

import math
from itertools import combinations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from utils import ALL_BACKENDS, DEVICE, FAST_BACKENDS, FLOAT_DTYPES, assert_close, randn

import fastbml
from fastbml.agm import MAX_NLL
from fastbml.models import MultimodalClassifier
from fastbml.models.fusion import ConcatFusion, SumFusion
from fastbml.ops.combined_nll import combined_nll

# ---------------------------------------------------------------------------- Shapley weights


def shapley_definition(values: dict[frozenset, torch.Tensor], players: list[int]) -> list:
    """phi_m = sum over S not containing m of |S|!(M-|S|-1)!/M! (f(S+m) - f(S)), f(empty) = 0."""
    n = len(players)
    out = []
    for m in players:
        others = [p for p in players if p != m]
        phi = 0
        for size in range(n):
            w = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for s in combinations(others, size):
                s = frozenset(s)
                phi = phi + w * (values[s | {m}] - (values[s] if s else 0))
        out.append(phi)
    return out


def test_two_modality_weights_are_the_authors_responses():
    """m_a = (T - P_a + P_v) / 2 with P_a = f(0, v), P_v = f(a, 0): rows over {a}, {v}, {a, v}."""
    w = fastbml.shapley_weights(2)
    assert w.tolist() == [[0.5, -0.5, 0.5], [-0.5, 0.5, 0.5]]


def test_single_modality_term_is_present():
    """S = empty contributes f({m}) / M to phi_m (BalanceBenchmark drops it)."""
    for n in (2, 3, 4):
        w = fastbml.shapley_weights(n)
        for m in range(n):
            assert w[m, (1 << m) - 1].item() == pytest.approx(1 / n)


def test_three_modality_weights_are_the_authors_urfunny_form():
    """m_a = (f(avt) - f(vt))/3 + (f(av) - f(v))/6 + (f(at) - f(t))/6 + f(a)/3 (masks a=1, v=2, t=4)."""
    a = fastbml.shapley_weights(3)[0].tolist()
    expected = [1 / 3, -1 / 6, 1 / 6, -1 / 6, 1 / 6, -1 / 3, 1 / 3]
    assert a == pytest.approx(expected)


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_weights_match_the_definition_and_sum_to_the_full_output(n):
    values = {frozenset(s): torch.randn(()).double() for k in range(1, n + 1)
              for s in combinations(range(n), k)}
    masks = fastbml.subset_masks(n)
    f = torch.stack([values[frozenset(torch.nonzero(row).flatten().tolist())] for row in masks])
    phi = fastbml.shapley_weights(n).double() @ f
    torch.testing.assert_close(phi, torch.stack(shapley_definition(values, list(range(n)))))
    torch.testing.assert_close(phi.sum(), values[frozenset(range(n))])
    assert masks[-1].all() and masks.shape == (2 ** n - 1, n)


# ---------------------------------------------------------------------------- combined_nll op


def nll_definition(logits, weights, labels):
    """float64: sum_i min(-log softmax(sum_s w[m, s] x[s, i])[y_i], -log 1e-8)."""
    combined = torch.einsum("ms,sbc->mbc", weights.double(), logits.double())
    nll = -torch.log_softmax(combined, -1)[:, torch.arange(labels.numel()), labels]
    return nll.clamp(max=MAX_NLL).sum(1)


SHAPES = [(3, 64, 31), (7, 5, 3), (1, 1, 1), (3, 33, 400), (15, 9, 2), (3, 2, 1500)]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_combined_nll_matches_the_definition(backend, shape):
    s, b, c = shape
    logits = randn(*shape, scale=3.0)
    weights = torch.randn(4, s, device=DEVICE)
    labels = torch.randint(0, c, (b,), device=DEVICE)
    out = combined_nll(logits, weights, labels, MAX_NLL, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (4,)
    torch.testing.assert_close(out.double(), nll_definition(logits, weights, labels),
                               rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_combined_nll_fast_paths_match_torch_per_dtype_and_layout(backend, dtype):
    logits = randn(7, 37, 11, dtype=dtype, noncontiguous=True, scale=2.0)
    weights = fastbml.shapley_weights(3, DEVICE)
    labels = torch.randint(0, 11, (37,), device=DEVICE)
    expected = combined_nll(logits, weights, labels, MAX_NLL, backend="torch")
    out = combined_nll(logits, weights, labels, MAX_NLL, backend=backend)
    assert_close(out / 37, expected / 37, dtype=torch.float32, scale=4.0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_combined_nll_clamps_at_the_floor_propagates_nan_and_handles_empty_batches(backend):
    logits = randn(3, 4, 5)
    labels = torch.tensor([0, 1, 2, 3], device=DEVICE)
    logits[:, 0, 0] = -100.0  # p(label) ~ e^-150 < 1e-8: clamped
    logits[:, 2, 1] = float("nan")
    weights = fastbml.shapley_weights(2, DEVICE)
    out = combined_nll(logits, weights, labels, MAX_NLL, backend=backend)
    assert torch.isnan(out).all()
    logits[:, 2, 1] = 0.0
    rows = combined_nll(logits[:, :1], weights, labels[:1], MAX_NLL, backend=backend)
    torch.testing.assert_close(rows, torch.full((2,), MAX_NLL, device=DEVICE))
    empty = combined_nll(logits[:, :0], weights, labels[:0], MAX_NLL, backend=backend)
    assert torch.equal(empty, torch.zeros(2, device=DEVICE))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_labels_out_of_range_are_refused(backend):
    with pytest.raises((ValueError, RuntimeError), match="labels"):
        fastbml.agm_score_sums(randn(3, 4, 5), torch.tensor([0, 1, 5, 2], device=DEVICE), 2,
                               backend=backend)


# ---------------------------------------------------------------------------- coefficients


def test_the_stronger_modality_is_slowed_and_the_weaker_sped_up():
    """The authors' sign: a lower loss than the mean means r > r^ and k < 1."""
    scores = torch.tensor([0.5, 2.0])  # audio is stronger (lower cross-entropy)
    k = fastbml.agm_coefficients(scores, torch.zeros(2), alpha=1.0, cap=10.0)
    assert k[0] < 1 < k[1]
    expected = [math.exp(1 - math.exp(1.5)), math.exp(1 - math.exp(-1.5))]
    torch.testing.assert_close(k, torch.tensor(expected))
    k3 = fastbml.agm_coefficients(torch.tensor([0.5, 2.0, 1.0]), torch.zeros(3), 1.0, 7.0)
    assert k3[0] < 1 and k3[1] > 1


def test_helper_slows_the_modality_that_predicts_the_labels():
    """End to end: audio carries the labels, visual is noise; audio gets k < 1, visual k > 1."""
    classes, batch = 5, 40
    labels = torch.arange(batch, device=DEVICE) % classes
    inputs = {"audio": 4.0 * nn.functional.one_hot(labels, classes).float(),
              "visual": torch.randn(batch, classes, device=DEVICE)}
    head = ConcatFusion({"audio": classes, "visual": classes}, classes).to(DEVICE)
    with torch.no_grad():
        head.fc.weight.copy_(torch.cat([torch.eye(classes), 0.3 * torch.eye(classes)], 1))
        head.fc.bias.zero_()
    agm = fastbml.AGM({"audio": nn.Identity(), "visual": nn.Identity()}, head)
    k = agm.step(inputs, head(inputs), labels, epoch=0)
    scores = agm.last_scores
    assert scores[0] < scores[1] and k[0] < 1 < k[1]


def test_cap_bounds_the_boost_and_alpha_zero_gives_ones():
    k = fastbml.agm_coefficients(torch.tensor([5.0, 0.0]), torch.zeros(2), alpha=1.0, cap=0.5)
    assert k[0].item() == pytest.approx(math.exp(0.5))
    assert torch.equal(fastbml.agm_coefficients(torch.rand(3), torch.rand(3), 0.0, 7.0),
                       torch.ones(3))


def test_running_level_equal_to_the_current_gives_ones():
    s = torch.tensor([0.3, 1.2, 0.7])
    torch.testing.assert_close(fastbml.agm_coefficients(s, s.clone(), 2.0, 7.0), torch.ones(3))


# ---------------------------------------------------------------------------- the helper


class Encoder(nn.Module):
    """Late-fusion encoder whose train and eval modes differ (BatchNorm and dropout)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, 12), nn.BatchNorm1d(12), nn.ReLU(),
                                 nn.Dropout(0.2), nn.Linear(12, d_out))
        self.out_dim = d_out

    def forward(self, x):
        return self.net(x)


NAMES = ["audio", "visual", "text", "depth"]


def make_model(n: int, head=ConcatFusion, classes: int = 5) -> MultimodalClassifier:
    dims = {NAMES[m]: 4 + m for m in range(n)}
    encoders = {m: Encoder(3 + i, d) for i, (m, d) in enumerate(dims.items())}
    return MultimodalClassifier(encoders, head(dims, classes)).to(DEVICE)


def make_batch(n: int, batch: int = 10, classes: int = 5, gen=None):
    inputs = {NAMES[m]: torch.randn(batch, 3 + m, generator=gen).to(DEVICE) for m in range(n)}
    return inputs, torch.randint(0, classes, (batch,), generator=gen).to(DEVICE)


def authors_scores(model, inputs, labels, full_logits):
    """The authors' computation: the model re-run in eval mode once per proper subset with the
    absent inputs zero-filled, Shapley responses with f(empty) := 0, and a per-sample loop."""
    names = list(model.modalities)
    values = {frozenset(range(len(names))): full_logits.detach().double()}
    model.eval()
    with torch.no_grad():
        for size in range(1, len(names)):
            for s in combinations(range(len(names)), size):
                padded = {m: x if i in s else torch.zeros_like(x)
                          for i, (m, x) in enumerate(inputs.items())}
                values[frozenset(s)] = model(padded).logits.double()
    model.train()
    responses = shapley_definition(values, list(range(len(names))))
    scores = []
    for r in responses:
        total = 0.0
        for i in range(labels.numel()):
            p = torch.softmax(r[i], 0)[labels[i]]
            total += -math.log(1e-8) if p < 1e-8 else -math.log(p)
        scores.append(total / labels.numel())
    return torch.tensor(scores, dtype=torch.float64)


def train_step(model, agm, inputs, labels, epoch=0):
    out = model(inputs)
    model.zero_grad()
    nn.functional.cross_entropy(out.logits, labels).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    k = agm.step(inputs, out.logits, labels, epoch=epoch)
    return out.logits, plain, k


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("head", [ConcatFusion, SumFusion])
def test_cached_path_equals_the_full_forward_computation(n, head):
    torch.manual_seed(n)
    model = make_model(n, head)
    agm = fastbml.AGM({m: model.encoders[m] for m in model.modalities}, model.head, alpha=0.7)
    running = torch.zeros(n, dtype=torch.float64)
    for step in range(3):
        inputs, labels = make_batch(n)
        logits, plain, k = train_step(model, agm, inputs, labels)
        scores = authors_scores(model, inputs, labels, logits)
        torch.testing.assert_close(agm.last_scores.cpu().double(), scores, rtol=1e-5, atol=1e-5)
        factor = n / (n - 1)
        r = torch.exp(factor * (scores.mean() - scores))
        r_hat = torch.exp(factor * (running.mean() - running))
        expected_k = torch.exp(0.7 * (r_hat - r).clamp(max=10.0 if n == 2 else 7.0))
        torch.testing.assert_close(k.cpu().double(), expected_k, rtol=1e-5, atol=1e-6)
        running = running * step / (step + 1) + scores / (step + 1)
        torch.testing.assert_close(agm.running.cpu().double(), running, rtol=1e-5, atol=1e-6)
        for name, p in model.named_parameters():
            if name.startswith("encoders."):
                m = model.modalities.index(name.split(".")[1])
                torch.testing.assert_close(p.grad, k[m] * plain[name])
            else:  # the fusion head is never modulated
                assert torch.equal(p.grad, plain[name])
    assert agm.steps == 3


def test_modes_are_restored_and_the_window_is_respected():
    model = make_model(2)
    model.encoders["visual"].net[3].eval()  # a submodule the caller had in eval mode
    agm = fastbml.AGM({m: model.encoders[m] for m in model.modalities}, model.head, start=1,
                      end=2)
    inputs, labels = make_batch(2)
    _, plain, k = train_step(model, agm, inputs, labels, epoch=0)
    assert torch.equal(k, torch.ones(2)) and agm.steps == 0
    assert all(torch.equal(p.grad, plain[n]) for n, p in model.named_parameters())
    train_step(model, agm, inputs, labels, epoch=1)
    assert agm.steps == 1
    flags = {n: m.training for n, m in model.named_modules()}
    assert not flags["encoders.visual.net.3"]
    assert all(v for n, v in flags.items() if n != "encoders.visual.net.3")


def test_subsets_of_an_empty_batch_are_empty():
    model = make_model(3)
    agm = fastbml.AGM({m: model.encoders[m] for m in model.modalities}, model.head)
    inputs, _ = make_batch(3, batch=0)
    assert agm.subset_logits(inputs, randn(0, 5)).shape == (7, 0, 5)


def test_weights_only_leaves_biases_and_norms_alone():
    model = make_model(2)
    agm = fastbml.AGM({m: model.encoders[m] for m in model.modalities}, model.head,
                      weights_only=True)
    inputs, labels = make_batch(2)
    _, plain, k = train_step(model, agm, inputs, labels)
    for name, p in model.named_parameters():
        if name.startswith("encoders.") and p.dim() >= 2:
            m = model.modalities.index(name.split(".")[1])
            torch.testing.assert_close(p.grad, k[m] * plain[name])
        else:
            assert torch.equal(p.grad, plain[name])


def test_state_dict_round_trip_continues_the_running_scores():
    gen = torch.Generator().manual_seed(4)
    batches = [make_batch(3, gen=gen) for _ in range(5)]
    results = []
    for interrupted in (False, True):
        torch.manual_seed(0)
        model = make_model(3)
        agm = fastbml.AGM({m: model.encoders[m] for m in model.modalities}, model.head)
        for inputs, labels in batches[:3]:
            train_step(model, agm, inputs, labels)
        if interrupted:
            state = agm.state_dict()
            assert state["steps"] == 3 and state["running_scores"].shape == (3,)
            agm = fastbml.AGM({m: model.encoders[m] for m in model.modalities}, model.head)
            agm.load_state_dict(state)
        ks = [train_step(model, agm, *b)[2] for b in batches[3:]]
        results.append((ks, agm.running.clone(), agm.steps))
    (k1, r1, n1), (k2, r2, n2) = results
    assert n1 == n2 == 5 and torch.equal(r1, r2)
    assert all(torch.equal(a, b) for a, b in zip(k1, k2))


def test_update_compiles_fullgraph_to_one_graph_and_equals_eager():
    torch.manual_seed(1)
    model = make_model(2)
    eager = fastbml.AGM({m: model.encoders[m] for m in model.modalities}, model.head)
    traced = fastbml.AGM({m: model.encoders[m] for m in model.modalities}, model.head)
    counter = CompileCounterWithBackend("aot_eager")
    update = torch.compile(traced.update, fullgraph=True, backend=counter)
    for _ in range(3):
        inputs, labels = make_batch(2)
        out = model(inputs)
        model.zero_grad()
        nn.functional.cross_entropy(out.logits, labels).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        subset = eager.subset_logits(inputs, out.logits)
        k_eager = eager.update(subset, labels)
        eager_grads = [p.grad.clone() for p in model.parameters()]
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        k_traced = update(subset, labels)
        torch.testing.assert_close(k_traced, k_eager)
        for p, g in zip(model.parameters(), eager_grads):
            torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(traced.running, eager.running)
    assert counter.frame_count == 1


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_cuda_step_makes_no_host_sync(backend):
    model = make_model(3)
    agm = fastbml.AGM({m: model.encoders[m] for m in model.modalities}, model.head,
                      backend=backend)
    for step in range(2):  # the first one warms up (kernels compiled, tables built)
        inputs, labels = make_batch(3)
        out = model(inputs)
        model.zero_grad()
        nn.functional.cross_entropy(out.logits, labels).backward()
        torch.cuda.synchronize()
        if step:
            torch.cuda.set_sync_debug_mode("error")
        try:
            agm.step(inputs, out.logits, labels, epoch=0)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_update_on_meta_tensors_makes_no_host_sync():
    """Any .item()/.cpu() on a meta tensor raises: the update must stay shape-only."""
    meta = torch.device("meta")
    encoders = {m: nn.Linear(3, 4, device=meta) for m in NAMES[:3]}
    for e in encoders.values():
        e.weight.grad = torch.empty_like(e.weight)
    agm = fastbml.AGM(encoders, lambda f: f["audio"])
    k = agm.update(torch.empty(7, 8, 5, device=meta), torch.empty(8, dtype=torch.long,
                                                                   device=meta))
    assert k.device.type == "meta" and k.shape == (3,)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(encoders={"a": nn.Linear(2, 2)}), ValueError, "encoders"),
        (dict(encoders={str(i): nn.Linear(2, 2) for i in range(9)}), ValueError, "modalities"),
        (dict(encoders={"a": nn.Linear(2, 2), "b": [1]}), TypeError, r"encoders\['b'\]"),
        (dict(head=3), TypeError, "head"),
        (dict(alpha=-1.0), ValueError, "alpha"),
        (dict(cap=float("nan")), ValueError, "cap"),
        (dict(start=2, end=1), ValueError, "end"),
    ],
)
def test_helper_rejects_bad_configuration(kwargs, error, match):
    args = dict(encoders={"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}, head=lambda f: f["a"])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fastbml.AGM(args.pop("encoders"), args.pop("head"), **args)


def test_helper_rejects_mismatched_inputs():
    model = make_model(2)
    agm = fastbml.AGM({m: model.encoders[m] for m in model.modalities}, model.head)
    inputs, labels = make_batch(2)
    logits = model(inputs).logits
    with pytest.raises(ValueError, match="inputs"):
        agm.step({"audio": inputs["audio"]}, logits, labels, epoch=0)
    with pytest.raises(ValueError, match=r"inputs\['visual'\]"):
        agm.step({**inputs, "visual": inputs["visual"][:3]}, logits, labels, epoch=0)
    with pytest.raises(ValueError, match="subset_logits"):
        agm.update(randn(7, 10, 5), labels)
    with pytest.raises(ValueError, match="labels"):
        agm.update(randn(3, 10, 5), labels[:4])
