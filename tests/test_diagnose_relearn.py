"""fastbml.DiagnoseRelearn: schedule, diagnosis report, re-initialisation, state, bad input."""

import math

import pytest
import torch
from sklearn.datasets import make_blobs
from torch import nn
from utils import DEVICE

import fastbml


class ThreeEncoders(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.encoders = nn.ModuleDict({
            m: nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU()) for m in "abc"})
        self.head = nn.Linear(48, 4)
        self.to(DEVICE, dtype)


def blob_features(n, k, std, seed):
    x, y = make_blobs(n_samples=n, centers=k, n_features=12, cluster_std=std, random_state=seed)
    return torch.from_numpy(x).float().to(DEVICE), torch.from_numpy(y).to(DEVICE)


def splits():
    """Modality a: clean blobs on train, noisy on held-out (a large gap); b: clean on both (no
    gap); c: noisy on both. One random_state gives the same labels whatever the spread."""
    xa, y = blob_features(400, 4, 0.5, 1)
    xc, _ = blob_features(400, 4, 14.0, 1)
    xa_val, y_val = blob_features(200, 4, 14.0, 2)
    xb_val, _ = blob_features(200, 4, 0.5, 2)
    xc_val, _ = blob_features(200, 4, 14.0, 2)
    return ({"a": xa, "b": xa, "c": xc}, y), ({"a": xa_val, "b": xb_val, "c": xc_val}, y_val)


def trained(model):
    """Move every parameter away from its init (as training would)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)


def test_diagnosis_and_reinit_follow_the_spec():
    model = ThreeEncoders()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    dr = fastbml.DiagnoseRelearn(dict(model.encoders), every=2, times=1, lam=3.0)
    trained(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, held_out = splits()
    assert dr.step(1, train, held_out) is None  # not due
    report = dr.step(2, train, held_out)
    assert report["purity_train_a"] == 1.0
    assert report["purity_gap_a"] > 0.1 and report["relearn_a"] == pytest.approx(
        math.tanh(3.0 * report["purity_gap_a"]))
    assert report["purity_gap_b"] == 0.0 and report["relearn_b"] == 0.0
    after = model.state_dict()
    for name, value in after.items():
        if name.startswith("encoders.a.") and "running" not in name and "num_batches" not in name:
            a = report["relearn_a"]
            expected = (1 - a) * before[name].double() + a * init[name].double()
            torch.testing.assert_close(value.double(), expected, atol=1e-6, rtol=1e-6)
        elif name.startswith(("encoders.b.", "head.")) or "running" in name:
            assert torch.equal(value, before[name]), name  # strength 0, buffers, head
    assert dr.step(4, train, held_out) is None  # times=1: done


def test_schedule_every_and_times():
    dr = fastbml.DiagnoseRelearn({"a": nn.Linear(2, 2)}, every=3, times=2)
    calls = []

    def source():
        calls.append(1)
        return {"a": torch.randn(30, 2, device=DEVICE)}, torch.randint(0, 3, (30,),
                                                                       device=DEVICE)

    ran = [e for e in range(12) if dr.step(e, source, source) is not None]
    assert ran == [3, 6] and len(calls) == 4  # callables only called when due


def test_bf16_encoders_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = ThreeEncoders(torch.bfloat16)
    snapshot = [p.clone() for p in model.encoders.parameters()]
    dr = fastbml.DiagnoseRelearn(dict(model.encoders), every=1, times=5)
    trained(model)
    state = dr.state_dict()
    resumed = fastbml.DiagnoseRelearn(dict(ThreeEncoders(torch.bfloat16).encoders), every=1,
                                      times=5)
    resumed.load_state_dict(state)
    for p, q in zip((p for g in resumed.init_params for p in g), snapshot):
        assert torch.equal(p, q)
    resumed.relearn({"a": 1.0, "b": 1.0, "c": 1.0})
    for p, q in zip((p for g in resumed.params for p in g), snapshot):
        assert torch.equal(p, q)  # strength 1: exactly the snapshot


def test_refuses_the_test_split_and_bad_input():
    model = ThreeEncoders()
    dr = fastbml.DiagnoseRelearn(dict(model.encoders), every=1)
    train, held_out = splits()
    with pytest.raises(ValueError, match="test split"):
        dr.step(1, train, held_out, held_out_split="test")

    def test_source():
        return held_out
    test_source.split = "test"
    with pytest.raises(ValueError, match="test split"):
        dr.step(1, train, test_source)
    with pytest.raises(ValueError, match="held_out must give features"):
        dr.step(1, train, ({"a": held_out[0]["a"]}, held_out[1]))
    with pytest.raises(ValueError, match="every must be"):
        fastbml.DiagnoseRelearn(dict(model.encoders), every=0)
    with pytest.raises(ValueError, match="lam must be"):
        fastbml.DiagnoseRelearn(dict(model.encoders), lam=-1.0)
    with pytest.raises(TypeError, match="groups\\['a'\\]"):
        fastbml.DiagnoseRelearn({"a": 3})
    other = fastbml.DiagnoseRelearn({"a": nn.Linear(3, 3), "b": nn.Linear(3, 3),
                                     "c": nn.Linear(3, 3)})
    with pytest.raises(ValueError, match="parameter shapes that differ"):
        dr.load_state_dict(other.state_dict())


def test_kmeans_backend_is_the_deprecated_name_of_kmeans():
    enc = nn.Linear(3, 2)
    with pytest.warns(DeprecationWarning, match="use kmeans="):
        dr = fastbml.DiagnoseRelearn({"a": enc, "b": nn.Linear(3, 2)}, kmeans_backend="sklearn")
    assert dr.kmeans == "sklearn"
    with pytest.raises(ValueError, match="kmeans must be one of"):
        fastbml.DiagnoseRelearn({"a": enc, "b": nn.Linear(3, 2)}, kmeans="cuml")


def test_feature_loader_extracts_in_eval_mode_and_names_its_split():
    model = ThreeEncoders()
    model.train()
    x, y = blob_features(90, 3, 1.0, 7)
    batches = [({"a": x[i:i + 32, :8], "b": x[i:i + 32, 4:], "c": x[i:i + 32, 2:10]},
                y[i:i + 32]) for i in range(0, 90, 32)]
    modes = []

    def encode(inputs):
        modes.append(model.training)
        return {m: model.encoders[m](inputs[m]) for m in "abc"}

    source = fastbml.FeatureLoader(encode, batches, split="val", model=model)
    features, labels = source()
    assert modes == [False] * 3 and model.training  # eval for the pass, restored after
    assert torch.equal(labels, y) and features["a"].shape == (90, 16)
    model.eval()
    torch.testing.assert_close(features["b"], model.encoders["b"](x[:, 4:]))
    dr = fastbml.DiagnoseRelearn(dict(model.encoders), every=1)
    test_source = fastbml.FeatureLoader(encode, batches, split="test")
    with pytest.raises(ValueError, match="test split"):
        dr.step(1, source, test_source)
    with pytest.raises(ValueError, match="gave no batches"):
        fastbml.FeatureLoader(encode, [], split="train")()
