"""D&R re-learning: relearn_strength and soft_reinit_ on every backend
(docs/methods.md#soft-re-initialisation)."""

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

# ---------------------------------------------------------------------------- relearn_strength


@pytest.mark.parametrize(("gap", "expected"),
                         [(0.02, 0.06), (0.05, 0.149), (0.1, 0.291), (0.2, 0.537), (0.3, 0.716)])
def test_strength_examples_of_the_spec(gap, expected):
    assert fastbml.relearn_strength(0.9, 0.9 - gap) == pytest.approx(expected, abs=1e-3)
    assert fastbml.relearn_strength(0.5 - gap, 0.5, lam=3.0) == pytest.approx(expected, abs=1e-3)


def test_strength_zero_gap_or_lambda_gives_zero():
    assert fastbml.relearn_strength(0.7, 0.7) == 0.0
    assert fastbml.relearn_strength(1.0, 0.2, lam=0.0) == 0.0
    assert fastbml.relearn_strength(1, 0) == pytest.approx(math.tanh(3.0))


def test_strength_of_tensors_stays_a_tensor_on_their_device():
    p_train = torch.tensor([0.9, 0.6], device=DEVICE)
    a = fastbml.relearn_strength(p_train, torch.tensor([0.8, 0.6], device=DEVICE), lam=3.0)
    assert isinstance(a, torch.Tensor) and a.device == p_train.device
    torch.testing.assert_close(a.cpu(), torch.tensor([math.tanh(0.3), 0.0]))
    mixed = fastbml.relearn_strength(torch.tensor(0.5, device=DEVICE), 0.7)
    assert mixed.shape == () and mixed.item() == pytest.approx(math.tanh(0.6))


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0.5, 0.5, -1.0), ValueError, "lam"),
        ((0.5, 0.5, math.inf), ValueError, "lam"),
        ((0.5, 0.5, math.nan), ValueError, "lam"),
        ((1.2, 0.5), ValueError, "purity_train"),
        ((0.5, -0.1), ValueError, "purity_val"),
        ((math.nan, 0.5), ValueError, "purity_train"),
        (("0.5", 0.5), TypeError, "purity_train"),
        ((0.5, torch.tensor(1)), TypeError, "purity_val"),
    ],
)
def test_strength_rejects_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        fastbml.relearn_strength(*args)


# ---------------------------------------------------------------------------- soft_reinit_

# Odd sizes, 1-element and empty tensors; 20001 spans a full and a partial Triton chunk.
SHAPES = [(16, 3, 7, 7), (33, 17), (1,), (0, 5), (20001,), (3, 1, 5, 5), (64,)]


def make_pair(shapes, dtype=torch.float32, noncontiguous=False):
    """(current params, initial params): fresh random values of each shape."""
    current = [randn(*s, dtype=dtype, noncontiguous=noncontiguous, shift=0.5) for s in shapes]
    init = [randn(*s, dtype=dtype, noncontiguous=noncontiguous, scale=0.1) for s in shapes]
    return current, init


def clones(tensors):
    return [t.clone() for t in tensors]


def lerp64(current, init, a):
    """The float64 definition, rounded to the storage dtype."""
    return [((1 - a) * x.double() + a * x0.double()).to(x.dtype) for x, x0 in zip(current, init)]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_fast_paths_match_torch_over_groups(backend, dtype):
    (audio, audio0), (visual, visual0) = make_pair(SHAPES[:4], dtype), make_pair(SHAPES[4:], dtype)
    expected = [clones(audio), clones(visual)]
    strength = [0.291, 0.716]
    fastbml.soft_reinit_(expected, [audio0, visual0], strength, backend="torch")
    fastbml.soft_reinit_([audio, visual], [audio0, visual0], strength, backend=backend)
    for a, e in zip(audio + visual, expected[0] + expected[1]):
        assert a.dtype == dtype and a.shape == e.shape
        assert_close(a, e)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_matches_the_float64_definition(backend, dtype):
    current, init = make_pair(SHAPES, dtype)
    expected = lerp64(current, init, 0.537)
    fastbml.soft_reinit_(current, init, 0.537, backend=backend)
    for a, e in zip(current, expected):
        assert_close(a, e, scale=1.5)  # the reference is rounded too: up to an ulp apart


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_params_and_inits(backend):
    current, init = make_pair([(12, 9), (30, 4), (5,)], noncontiguous=True)
    assert not current[0].is_contiguous() and not init[0].is_contiguous()
    expected = lerp64(current, init, 0.149)
    fastbml.soft_reinit_(current, init, torch.tensor(0.149, device=DEVICE), backend=backend)
    assert not current[0].is_contiguous()  # rewritten in place, not rebound
    for a, e in zip(current, expected):
        assert_close(a, e)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_strength_zero_is_bit_identical_and_one_restores_the_init(backend, dtype):
    (kept, kept0), (reset, reset0) = make_pair(SHAPES[:3], dtype), make_pair(SHAPES[3:], dtype)
    before = clones(kept)
    fastbml.soft_reinit_([kept, reset], [kept0, reset0], torch.tensor([0.0, 1.0], device=DEVICE),
                         backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(kept, before))
    assert all(torch.equal(a, b) for a, b in zip(reset, reset0))


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fast_paths_skip_zero_strength_tensors_entirely(backend):
    """Weight 0 writes nothing: -0.0 stays -0.0 and a NaN in the init does not leak in."""
    current = torch.tensor([-0.0, 1.5, -2.0], device=DEVICE)
    init = torch.tensor([1.0, math.nan, 0.0], device=DEVICE)
    fastbml.soft_reinit_([current], [init], 0.0, backend=backend)
    assert torch.equal(current.view(torch.int32),
                       torch.tensor([-0.0, 1.5, -2.0], device=DEVICE).view(torch.int32))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_params_are_computed_with_a_float32_strength(backend, dtype):
    """A strength of 0.999 rounds to 1.0 in bf16: computing with it would return the init."""
    current = torch.full((9,), 64.0, dtype=dtype, device=DEVICE)
    fastbml.soft_reinit_([current], [torch.zeros_like(current)], 0.999, backend=backend)
    torch.testing.assert_close(current.float(), torch.full((9,), 0.064, device=DEVICE),
                               rtol=4e-3, atol=0.0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_module_parameters_with_grad_keep_their_state_and_buffers(backend):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 9, 3)).to(DEVICE)
    init = [p.detach().clone() for p in encoder.parameters()]
    encoder(torch.randn(8, 1, 5, 5, device=DEVICE)).sum().backward()  # grads and BN statistics
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p))
    grads = [p.grad.clone() for p in encoder.parameters()]
    buffers = {name: b.clone() for name, b in encoder.named_buffers()}
    expected = lerp64(list(encoder.parameters()), init, 0.3)
    fastbml.soft_reinit_(encoder.parameters(), init, 0.3, backend=backend)
    for p, e, g in zip(encoder.parameters(), expected, grads):
        assert isinstance(p, nn.Parameter) and p.requires_grad and p.is_leaf
        assert p.grad_fn is None and torch.equal(p.grad, g)
        assert_close(p.detach(), e)
    for name, b in encoder.named_buffers():
        assert torch.equal(b, buffers[name]), name


def test_strength_from_relearn_strength_feeds_soft_reinit():
    (audio, audio0), (visual, visual0) = make_pair([(40, 3)]), make_pair([(7, 2)])
    expected = lerp64(audio, audio0, math.tanh(0.3)) + lerp64(visual, visual0, math.tanh(0.06))
    a = fastbml.relearn_strength(torch.tensor([0.9, 0.5], device=DEVICE),
                                 torch.tensor([0.8, 0.52], device=DEVICE))
    fastbml.soft_reinit_([audio, visual], [audio0, visual0], a)
    for p, e in zip(audio + visual, expected):
        assert_close(p, e)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_lists_are_a_no_op(backend):
    fastbml.soft_reinit_([], [], 0.5, backend=backend)
    fastbml.soft_reinit_([[], []], [[], []], [0.2, 0.4], backend=backend)
    empty = randn(0, 3)
    fastbml.soft_reinit_([empty], [randn(0, 3)], 1.0, backend=backend)


def test_meta_tensors_run_without_host_sync():
    """Any .item()/.cpu() on a meta tensor raises: the torch path must stay shape-only."""
    meta = torch.device("meta")
    params = [[nn.Parameter(torch.empty(64, 1, 7, 7, device=meta)),
               nn.Parameter(torch.empty(64, device=meta, dtype=torch.bfloat16))],
              [nn.Parameter(torch.empty(512, 512, 3, 3, device=meta))]]
    init = [[torch.empty_like(p) for p in group] for group in params]
    fastbml.soft_reinit_(params, init, torch.empty(2, device=meta))
    fastbml.soft_reinit_(params[1], init[1], 0.5)


def test_triton_launches_once_per_dtype_however_many_tensors(monkeypatch):
    from fastbml.kernels import lerp as kernels

    launches = []
    monkeypatch.setattr(kernels, "_lerp_kernel", CountingKernel(kernels._lerp_kernel, launches))
    current, init = make_pair([(7, 3)] * 30)
    half, half0 = make_pair([(5,)] * 10, torch.float16)
    fastbml.soft_reinit_([current, half], [init, half0], [0.5, 0.25], backend="triton")
    assert len(launches) == 2


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda a, a0, b, b0: fastbml.soft_reinit_([a, b], [a0], 0.5), ValueError, "init_params"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([[a], [b]], [[a0], []], [0.5, 0.5]),
         ValueError, r"params\[1\] has 1"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([a, b], [a0, randn(5)], 0.5), ValueError,
         r"init_params\[1\] has shape \[5\] but params\[1\] \[4\]"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([[a], [b]], [[a0], [b0.half()]], [0.5, 0.5]),
         ValueError, r"init_params\[1\]\[0\] is torch.float16"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([a], [a0.to("meta")], 0.5), ValueError,
         r"init_params\[0\]"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([a.long()], [a0.long()], 0.5), TypeError,
         r"params\[0\] must be float32"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([a, 1.0], [a0, b0], 0.5), TypeError,
         r"params\[1\] must be a tensor"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([a, a], [a0, a0], 0.5), ValueError,
         "more than once"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_(a, a0, 0.5), TypeError, "params"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([a], [a0], 1.5), ValueError, "strength"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([a], [a0], -0.1), ValueError, "strength"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([a], [a0], math.nan), ValueError, "strength"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([a], [a0], True), TypeError, "strength"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([a], [a0], torch.tensor(1.5, device=DEVICE)),
         ValueError, "strength"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([a], [a0], torch.full((1,), 0.5, device=DEVICE)),
         ValueError, "strength"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([a], [a0], torch.tensor(0.5, device="meta")),
         ValueError, "strength"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([[a], [b]], [[a0], [b0]], 0.5), TypeError,
         "strength"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([[a], [b]], [[a0], [b0]], [0.5]), ValueError,
         "strength"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([[a], [b]], [[a0], [b0]], [0.5, 1.1]),
         ValueError, r"strength\[1\]"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([[a], [b]], [[a0], [b0]],
                                                   torch.ones(2, dtype=torch.int64)),
         TypeError, "strength"),
        (lambda a, a0, b, b0: fastbml.soft_reinit_([a], [a0], 0.5, backend="cuda"), ValueError,
         "backend"),
    ],
)
def test_soft_reinit_rejects_bad_input(call, error, match):
    (a, b), (a0, b0) = make_pair([(3, 3), (4,)])
    before = [a.clone(), b.clone()]
    with pytest.raises(error, match=match):
        call(a, a0, b, b0)
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])  # nothing half-done
