"""OGM-GE's noise std over float32's whole range: triton (interpreted here) matches cpp/torch."""

import pytest
import torch

import fastbml


@pytest.mark.parametrize("magnitude", [1e20, 1e30, 1e37])
def test_huge_gradients_give_the_same_finite_result_on_every_backend(magnitude):
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(3000, generator=g), torch.randn(64, 5, generator=g)]
    signs = [torch.where(b > 0, magnitude, -magnitude) for b in base]
    out = {}
    for backend in ("torch", "cpp", "triton"):
        params = [torch.nn.Parameter(torch.zeros_like(s)) for s in signs]
        for p, s, b in zip(params, signs, base):
            p.grad = s * (1 + 0.1 * b.abs()) / 2
        fastbml.ogm_modulate_([[params[0]], [params[1]]], torch.tensor([0.5, 1.0]), seed=3,
                              backend=backend)
        out[backend] = [p.grad for p in params]
        assert all(torch.isfinite(t).all() for t in out[backend]), backend
    for backend in ("cpp", "triton"):
        for a, b in zip(out["torch"], out[backend]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * magnitude)
