"""Encoders, fusion heads and their uni-modal logits, the classifier, the reference init."""

import pytest
import torch
from torch import nn

from fastbml.models import (
    ConcatFusion,
    FiLMFusion,
    FrameResNet18,
    GatedFusion,
    InputSpec,
    MLPEncoder,
    SpectrogramResNet18,
    SumFusion,
    TransformerEncoder,
    build_fusion,
    build_model,
    reference_init_,
)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_resnet18_sizes_and_stems():
    # torchvision's resnet18 without its fc layer has 11,176,512 parameters (3-channel stem)
    assert _n_params(FrameResNet18(3)) == 11_176_512
    assert _n_params(SpectrogramResNet18(1)) == 11_176_512 - 2 * 64 * 7 * 7
    assert _n_params(FrameResNet18(2)) == 11_176_512 - 64 * 7 * 7
    audio = SpectrogramResNet18().eval()
    assert audio(torch.randn(2, 1, 40, 33)).shape == (2, 512)
    assert audio(torch.randn(2, 40, 33)).shape == (2, 512)  # channel added
    flow = FrameResNet18(2).eval()
    assert flow(torch.randn(2, 2, 3, 32, 32)).shape == (2, 512)


def test_frame_encoder_pools_frames_independently():
    enc = FrameResNet18(3).eval()
    x = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        pooled = enc(x)
        per_frame = torch.stack([enc(x[:, :, t]) for t in range(3)]).mean(0)
    torch.testing.assert_close(pooled, per_frame, rtol=1e-4, atol=1e-5)


def test_encoders_reject_wrong_shapes():
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        FrameResNet18(3)(torch.randn(2, 2, 1, 32, 32))
    with pytest.raises(ValueError, match="spectrogram input"):
        SpectrogramResNet18()(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        MLPEncoder(8)(torch.randn(2, 9))
    with pytest.raises(ValueError, match="sequence input"):
        TransformerEncoder(6, max_len=4)(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="in_dim"):
        MLPEncoder(0)
    with pytest.raises(ValueError, match="divisible"):
        TransformerEncoder(6, max_len=4, d_model=30, heads=4)


def test_transformer_encoder_output():
    enc = TransformerEncoder(6, max_len=5, d_model=16, heads=2, layers=1).eval()
    assert enc(torch.randn(3, 5, 6)).shape == (3, 16)
    assert enc(torch.randn(3, 2, 6)).shape == (3, 16)  # shorter sequences use the first positions


@pytest.mark.parametrize("dims", [{"a": 5, "v": 7}, {"a": 5, "v": 7, "t": 3}])
def test_concat_unimodal_logits_sum_to_fused(dims):
    head = ConcatFusion(dims, 4)
    feats = {m: torch.randn(6, d) for m, d in dims.items()}
    u = head.unimodal_logits(feats)
    torch.testing.assert_close(sum(u.values()), head(feats), rtol=1e-5, atol=1e-5)
    # the bias is split evenly: zero features give b / M
    zero = head.unimodal_logits({m: torch.zeros(2, d) for m, d in dims.items()})
    torch.testing.assert_close(zero["a"][0], head.fc.bias.detach() / len(dims))
    assert not any(t.requires_grad for t in u.values())


def test_sum_unimodal_logits_keep_full_bias():
    head = SumFusion({"a": 5, "v": 7}, 3)
    feats = {"a": torch.randn(4, 5), "v": torch.randn(4, 7)}
    u = head.unimodal_logits(feats)
    torch.testing.assert_close(u["a"], head.fc["a"](feats["a"]).detach())
    torch.testing.assert_close(u["a"] + u["v"], head(feats).detach())


@pytest.mark.parametrize("cls", [FiLMFusion, GatedFusion])
def test_film_gated_use_auxiliary_heads_on_detached_features(cls):
    head = cls({"a": 5, "v": 7}, 3)
    enc = nn.Linear(4, 5)
    f_a = enc(torch.randn(8, 4))
    feats = {"a": f_a, "v": torch.randn(8, 7)}
    assert head(feats).shape == (8, 3)
    u = head.unimodal_logits(feats)
    torch.testing.assert_close(u["a"], head.aux["a"](f_a).detach())
    labels = torch.randint(0, 3, (8,))
    head.auxiliary_loss(u, labels).backward()
    assert enc.weight.grad is None                 # the encoder gets nothing from the aux heads
    assert head.aux["a"].weight.grad is not None   # the aux heads train


def test_film_conditions_second_modality_on_first():
    head = FiLMFusion({"a": 4, "v": 6}, 3)
    assert head.film.in_features == 4 and head.film.out_features == 12
    with pytest.raises(ValueError, match="exactly two"):
        FiLMFusion({"a": 4, "v": 6, "t": 2}, 3)


def test_fusion_bad_inputs():
    with pytest.raises(ValueError, match="fusion must be one of"):
        build_fusion("attention", {"a": 2, "v": 2}, 3)
    with pytest.raises(ValueError, match="num_classes"):
        ConcatFusion({"a": 2, "v": 2}, 1)
    with pytest.raises(ValueError, match=r"dims\['v'\]"):
        ConcatFusion({"a": 2, "v": 0}, 3)
    head = ConcatFusion({"a": 2, "v": 3}, 3)
    with pytest.raises(ValueError, match=r"features\['v'\]"):
        head({"a": torch.randn(2, 2), "v": torch.randn(2, 4)})
    with pytest.raises(ValueError, match="modalities"):
        head({"a": torch.randn(2, 2)})


@pytest.mark.parametrize("fusion", ["concat", "sum", "film", "gated"])
def test_classifier_outputs(fusion):
    inputs = {"audio": InputSpec("vector", (8,)), "visual": InputSpec("sequence", (4, 6))}
    model = build_model(inputs, 5, fusion=fusion, hidden=16, feature_dim=16)
    out = model({"audio": torch.randn(3, 8), "visual": torch.randn(3, 4, 6)})
    assert out.logits.shape == (3, 5)
    assert set(out.features) == set(out.unimodal) == {"audio", "visual"}
    assert all(u.shape == (3, 5) for u in out.unimodal.values())
    with pytest.raises(ValueError, match="lack modalities"):
        model({"audio": torch.randn(3, 8)})


def test_three_modalities_and_single_modality_baseline():
    specs = {m: InputSpec("vector", (4,)) for m in ("text", "audio", "vision")}
    model = build_model(specs, 2, hidden=8, feature_dim=8)
    out = model({m: torch.randn(5, 4) for m in specs})
    torch.testing.assert_close(sum(out.unimodal.values()), out.logits.detach(), rtol=1e-5,
                               atol=1e-5)
    alone = build_model({"audio": specs["audio"]}, 2, hidden=8, feature_dim=8)
    assert alone({"audio": torch.randn(5, 4)}).logits.shape == (5, 2)
    with pytest.raises(ValueError, match="kind must be one of"):
        InputSpec("video", (3,))


def test_reference_init_styles():
    specs = {"audio": InputSpec("spectrogram", (1, 16, 16)), "visual": InputSpec("vector", (4,))}
    torch.manual_seed(0)
    ogm = build_model(specs, 3, init="ogm", hidden=8, feature_dim=8)
    dr = build_model(specs, 3, init="dr", hidden=8, feature_dim=8)
    bn_ogm = ogm.encoders["audio"].trunk.bn1.weight
    bn_dr = dr.encoders["audio"].trunk.bn1.weight
    assert torch.all(bn_ogm == 1)
    assert not torch.all(bn_dr == 1) and abs(float(bn_dr.detach().mean()) - 1) < 0.01
    assert torch.all(ogm.head.fc.bias == 0)
    conv = ogm.encoders["audio"].trunk.layer4[0].conv1.weight  # fan_out = 512 * 9
    assert abs(float(conv.detach().std()) - (2 / (512 * 9)) ** 0.5) < 0.002
    with pytest.raises(ValueError, match="init style"):
        reference_init_(ogm, "xavier")
