"""fastbml.OPM, the drop-in helper: window, eval identity, seeds, state, logging, OGM composition."""

import pytest
import torch
import torch.nn.functional as F
from utils import DEVICE, randn

import fastbml
from fastbml import rng

B, C = 24, 5


def batch(dominant_shift=4.0):
    """Features, uni-modal logits (the first modality confident about the labels) and labels."""
    labels = torch.randint(0, C, (B,), device=DEVICE)
    strong = randn(B, C) + dominant_shift * F.one_hot(labels, C).float()
    feats = {"audio": randn(B, 6), "visual": randn(B, 4)}
    return feats, {"audio": strong, "visual": randn(B, C)}, labels


def test_training_call_matches_the_ops_with_the_step_seed():
    feats, logits, labels = batch()
    opm = fastbml.OPM(["audio", "visual"], q_base=0.5, lam=0.5, p_exe=1.0, seed=42)
    for step in range(3):
        out, weights = opm(feats, logits, labels, epoch=0)
        scores = fastbml.modality_scores([logits["audio"], logits["visual"]], labels)
        q = fastbml.opm_drop_probs(scores, 0.5, 0.5)
        expected, expected_w = fastbml.opm_drop([feats["audio"], feats["visual"]], q, p_exe=1.0,
                                                seed=rng.step_seed(42, step))
        assert isinstance(out, dict) and list(out) == ["audio", "visual"]
        torch.testing.assert_close(out["audio"], expected[0])
        torch.testing.assert_close(out["visual"], expected[1])
        torch.testing.assert_close(weights, expected_w)
        torch.testing.assert_close(opm.last_scores, scores)
        torch.testing.assert_close(opm.last_q, q)
        assert float(q[0]) > 0 and float(q[1]) == 0  # audio dominates
        torch.testing.assert_close(opm.last_theta, q[0] * 6 / 10)
        assert bool(opm.last_executed)
    assert opm.steps == 3


def test_eval_mode_and_outside_the_window_are_the_identity():
    feats, logits, labels = batch()
    opm = fastbml.OPM(["audio", "visual"], p_exe=1.0, start=2, end=4, warmup_epochs=3, seed=0)
    for epoch in (0, 2, 5):  # before start, inside start but in warm-up, after end
        out, weights = opm(feats, logits, labels, epoch=epoch)
        assert out is feats
        torch.testing.assert_close(weights, torch.full((B,), 1.0 / B, device=DEVICE))
        assert torch.equal(opm.last_q, torch.zeros(2, device=DEVICE))
        assert not bool(opm.last_executed)
    out, _ = opm(feats, logits, labels, epoch=3)
    assert not torch.equal(out["audio"], feats["audio"])  # active: rescaled at least
    opm.eval()
    steps = opm.steps
    out, weights = opm(feats, logits, labels, epoch=3)
    assert out is feats and opm.steps == steps
    torch.testing.assert_close(weights, torch.full((B,), 1.0 / B, device=DEVICE))
    assert opm.active(3) is False and opm.train().active(3) is True


def test_submodule_follows_model_eval_and_checkpoints_its_stream():
    model = torch.nn.Module()
    model.opm = fastbml.OPM(["audio", "visual"], p_exe=1.0, seed=9)
    feats, logits, labels = batch()
    model.opm(feats, logits, labels, epoch=0)
    state = model.state_dict()
    resumed = torch.nn.Module()
    resumed.opm = fastbml.OPM(["audio", "visual"], p_exe=1.0, seed=1)
    resumed.load_state_dict(state)
    a, wa = model.opm(feats, logits, labels, epoch=0)
    b, wb = resumed.opm(feats, logits, labels, epoch=0)
    assert torch.equal(a["audio"], b["audio"]) and torch.equal(wa, wb)
    model.eval()
    assert model.opm(feats, logits, labels, epoch=0)[0] is feats


def test_sequences_in_sequences_out_and_a_tie_is_the_identity():
    labels = torch.randint(0, C, (B,), device=DEVICE)
    same = randn(B, C)
    feats = [randn(B, 3), randn(B, 3)]
    opm = fastbml.OPM(["a", "v"], p_exe=1.0, seed=3)
    out, weights = opm(feats, [same, same.clone()], labels, epoch=0)
    assert isinstance(out, list)
    assert torch.equal(opm.last_q, torch.zeros(2, device=DEVICE))
    assert all(torch.equal(o, f) for o, f in zip(out, feats))
    torch.testing.assert_close(weights, torch.full((B,), 1.0 / B, device=DEVICE))


def test_composes_with_ogm_in_the_same_step():
    """OPM in the forward pass, OGM after backward: OGM scales the OPM gradients by k_m."""
    torch.manual_seed(0)
    enc = torch.nn.ModuleDict({"audio": torch.nn.Linear(8, 6), "visual": torch.nn.Linear(8, 4)})
    head = torch.nn.Linear(10, C)
    enc, head = enc.to(DEVICE), head.to(DEVICE)
    x = {"audio": randn(B, 8), "visual": randn(B, 8)}
    labels = torch.randint(0, C, (B,), device=DEVICE)

    def step(with_ogm):
        for p in [*enc.parameters(), *head.parameters()]:
            p.grad = None
        feats = {m: enc[m](x[m]) for m in ("audio", "visual")}
        u = fastbml.concat_unimodal_logits([feats["audio"], feats["visual"]],
                                           head.weight.detach(), head.bias.detach())
        u = {"audio": u[0] + 3 * F.one_hot(labels, C), "visual": u[1]}  # audio dominates
        opm = fastbml.OPM(["audio", "visual"], p_exe=1.0, seed=5)
        out, w = opm(feats, u, labels, epoch=0)
        logits = head(torch.cat([out["audio"], out["visual"]], dim=1))
        (F.cross_entropy(logits, labels, reduction="none") * w).sum().backward()
        if with_ogm:
            ogm = fastbml.OGM(dict(enc), alpha=0.8, noise=False, seed=5)
            return ogm.step(u, labels, epoch=0)
        return None

    step(False)
    plain = {m: enc[m].weight.grad.clone() for m in ("audio", "visual")}
    coeffs = step(True)
    assert float(coeffs[0]) < 1.0 and float(coeffs[1]) == 1.0
    for k, m in zip(coeffs, ("audio", "visual")):
        torch.testing.assert_close(enc[m].weight.grad, k * plain[m])


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"modalities": ["a"]}, ValueError, "modalities"),
    ({"modalities": ["a", "a"]}, ValueError, "modalities"),
    ({"modalities": "av"}, TypeError, "modalities"),
    ({"modalities": ["a", "v"], "q_base": 1.5}, ValueError, "q_base"),
    ({"modalities": ["a", "v"], "lam": -1}, ValueError, "lam"),
    ({"modalities": ["a", "v"], "p_exe": 2.0}, ValueError, "p_exe"),
    ({"modalities": ["a", "v"], "start": -1}, ValueError, "start"),
    ({"modalities": ["a", "v"], "start": 3, "end": 2}, ValueError, "end"),
    ({"modalities": ["a", "v"], "warmup_epochs": 1.5}, ValueError, "warmup_epochs"),
    ({"modalities": ["a", "v"], "seed": -3}, ValueError, "seed"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    modalities = kwargs.pop("modalities")
    with pytest.raises(error, match=match):
        fastbml.OPM(modalities, **kwargs)


def test_bad_call_arguments():
    feats, logits, labels = batch()
    opm = fastbml.OPM(["audio", "visual"], seed=0)
    with pytest.raises(ValueError, match="features keys"):
        opm({"audio": feats["audio"]}, logits, labels, epoch=0)
    with pytest.raises(ValueError, match="logits"):
        opm(feats, [logits["audio"]], labels, epoch=0)
    with pytest.raises(ValueError, match="labels"):
        opm(feats, logits, labels[:-1], epoch=0)
