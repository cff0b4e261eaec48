"""Uni-modal logits from concat and sum heads (docs/methods.md#uni-modal-logits); FiLM/gated need the user's logits."""

import pytest
import torch
from utils import DEVICE, randn

import fastbml


@pytest.mark.parametrize("dims", [[7, 5], [3, 8, 2]])
@pytest.mark.parametrize("with_bias", [True, False])
def test_concat_split_sums_to_the_fused_logits(dims, with_bias):
    feats = [randn(13, d) for d in dims]
    head = torch.nn.Linear(sum(dims), 6, bias=with_bias).to(DEVICE)
    u = fastbml.concat_unimodal_logits(feats, head.weight, head.bias)
    assert [t.shape for t in u] == [(13, 6)] * len(dims)
    torch.testing.assert_close(sum(u), head(torch.cat(feats, 1)), rtol=1e-5, atol=1e-5)
    off = dims[0]
    expected = feats[1] @ head.weight[:, off:off + dims[1]].T
    if with_bias:
        expected = expected + head.bias / len(dims)
    torch.testing.assert_close(u[1], expected)


def test_sum_head_keeps_each_modality_its_own_bias():
    feats = [randn(9, 4), randn(9, 3)]
    linears = [torch.nn.Linear(4, 5).to(DEVICE), torch.nn.Linear(3, 5).to(DEVICE)]
    u = fastbml.sum_unimodal_logits(feats, linears)
    torch.testing.assert_close(u[0], linears[0](feats[0]))
    torch.testing.assert_close(sum(u), linears[0](feats[0]) + linears[1](feats[1]))


def test_dispatch_by_fusion_and_film_gated_need_logits():
    feats = [randn(4, 3), randn(4, 2)]
    head = torch.nn.Linear(5, 3).to(DEVICE)
    by_name = fastbml.unimodal_logits("concat", feats, weight=head.weight, bias=head.bias)
    direct = fastbml.concat_unimodal_logits(feats, head.weight, head.bias)
    assert all(torch.equal(a, b) for a, b in zip(by_name, direct))
    for fusion in ("film", "gated"):
        with pytest.raises(ValueError, match="logits="):
            fastbml.unimodal_logits(fusion, feats)
        own = [randn(4, 3), randn(4, 3)]
        assert fastbml.unimodal_logits(fusion, feats, logits=own) == own


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda f, h: fastbml.concat_unimodal_logits(f, h.weight[:, :4], h.bias), ValueError,
     "weight"),
    (lambda f, h: fastbml.concat_unimodal_logits(f, h.weight, h.bias[:2]), ValueError, "bias"),
    (lambda f, h: fastbml.concat_unimodal_logits([f[0], f[1][:3]], h.weight), ValueError,
     r"features\[1\]"),
    (lambda f, h: fastbml.concat_unimodal_logits(f[0], h.weight), TypeError, "features"),
    (lambda f, h: fastbml.sum_unimodal_logits(f, [h]), ValueError, "linears"),
    (lambda f, h: fastbml.sum_unimodal_logits(f, [h, "x"]), TypeError, r"linears\[1\]"),
    (lambda f, h: fastbml.unimodal_logits("mlp", f), ValueError, "fusion"),
    (lambda f, h: fastbml.unimodal_logits("concat", f), ValueError, "weight"),
    (lambda f, h: fastbml.unimodal_logits("sum", f), ValueError, "linears"),
    (lambda f, h: fastbml.unimodal_logits("film", f, logits=[f[0]]), ValueError, "logits"),
])
def test_bad_input_names_the_argument(call, error, match):
    feats = [randn(4, 3), randn(4, 2)]
    head = torch.nn.Linear(5, 3).to(DEVICE)
    with pytest.raises(error, match=match):
        call(feats, head)
