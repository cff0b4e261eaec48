"""In-place multi-tensor ops refuse tensors whose memory overlaps; soft_reinit_ with strength 0
leaves parameters bit for bit unchanged on every backend."""

import pytest
import torch
from torch import nn

import fastbml

BACKENDS = ["torch", "cpp", "triton"]


def _params(n=2, size=8):
    return [nn.Parameter(torch.randn(size)) for _ in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ogm_modulate_refuses_a_shared_gradient(backend):
    a, b = _params()
    shared = torch.randn(8)
    a.grad = b.grad = shared
    with pytest.raises(ValueError, match=r"params\[0\]\[0\]\.grad and params\[1\]\[0\]\.grad"):
        fastbml.ogm_modulate_([[a], [b]], torch.tensor([0.5, 1.0]), seed=0, backend=backend)


def test_ogm_modulate_refuses_gradients_sharing_a_storage():
    a, b, c = _params(3)
    buffer = torch.randn(20)
    a.grad, b.grad, c.grad = buffer[:8], torch.randn(8), buffer[4:12]
    with pytest.raises(ValueError, match=r"params\[0\]\[0\]\.grad and params\[1\]\[1\]\.grad"):
        fastbml.ogm_modulate_([[a], [b, c]], torch.tensor([0.5, 1.0]), seed=0)


def test_disjoint_views_of_one_storage_are_accepted():
    a, b = _params()
    buffer = torch.randn(16)
    a.grad, b.grad = buffer[:8], buffer[8:]
    expected = buffer.clone()
    expected[:8] *= 0.5
    fastbml.ogm_modulate_([[a], [b]], torch.tensor([0.5, 1.0]), noise=False, backend="cpp")
    assert torch.equal(buffer, expected)


def test_ogm_step_refuses_a_shared_gradient():
    a, b = _params()
    ogm = fastbml.OGM({"audio": [a], "visual": [b]}, alpha=0.5, seed=0)
    a.grad = b.grad = torch.randn(8)
    logits = {"audio": torch.tensor([[3.0, 0.0]]), "visual": torch.tensor([[0.0, 0.0]])}
    with pytest.raises(ValueError, match=r"params\[0\]\[0\]\.grad and params\[1\]\[0\]\.grad"):
        ogm.step(logits, torch.tensor([0]), epoch=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_reinit_refuses_overlapping_parameters(backend):
    buffer = torch.randn(12)
    params = [buffer[:8], buffer[6:]]
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        fastbml.soft_reinit_(params, [torch.zeros(8), torch.zeros(6)], 0.5, backend=backend)
    p = torch.randn(8)
    with pytest.raises(ValueError, match=r"params\[0\]\[0\] and init_params\[1\]\[0\]"):
        fastbml.soft_reinit_([[p], [torch.randn(8)]], [[torch.zeros(8)], [p[:]]], [0.5, 0.5],
                             backend=backend)


def test_soft_reinit_accepts_one_shared_snapshot():
    """Targets are only read: they may alias each other."""
    init = torch.zeros(4)
    params = [torch.ones(4), torch.ones(4)]
    fastbml.soft_reinit_(params, [init, init], 1.0, backend="cpp")
    assert all(torch.equal(p, init) for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strength_zero_keeps_parameters_where_the_snapshot_holds_nan(backend, dtype):
    p = torch.tensor([1.0, -0.0, 3.0, float("inf")], dtype=dtype)
    before = p.clone()
    init = torch.full((4,), float("nan"), dtype=dtype)
    fastbml.soft_reinit_([p], [init], 0.0, backend=backend)
    assert torch.equal(p.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       before.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    q = [torch.ones(3, dtype=dtype), torch.ones(3, dtype=dtype)]
    fastbml.soft_reinit_([[q[0]], [q[1]]], [[init[:3].clone()], [torch.zeros(3, dtype=dtype)]],
                         torch.tensor([0.0, 1.0]), backend=backend)
    assert torch.equal(q[0], torch.ones(3, dtype=dtype))
    assert torch.equal(q[1], torch.zeros(3, dtype=dtype))
