"""Runs that would corrupt silently are refused: divergence, resumed configurations, damaged or
crafted checkpoints, dataset pickles that execute code, two runs on one --out."""

import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch

from fastbml import cli
from fastbml.data import SyntheticConfig, make_synthetic
from fastbml.train import Trainer, engine, make_config
from fastbml.train import checkpoint as ckpt
from fastbml.train.engine import BEST, CHECKPOINT, PREVIOUS, NonFiniteLossError

TINY = SyntheticConfig(n_train=192, n_val=96, n_test=96)


def _cfg(tmp_path, **kw):
    values = dict(epochs=2, batch_size=32, hidden=32, feature_dim=32, progress=False,
                  out=str(tmp_path / "run"), threads=1, tensorboard=False, plots=False)
    values.update(kw)
    return make_config("demo", **values)


@pytest.fixture(scope="module")
def splits():
    return make_synthetic(0, TINY)


# ------------------------------------------------------------------ non-finite loss
def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, splits):
    trainer = Trainer(_cfg(tmp_path, epochs=4, lr=3.0), splits)
    with pytest.raises(NonFiniteLossError, match=r"non-finite in epoch 2.*last good epoch \(1\)"):
        trainer.fit()
    state = ckpt.load(tmp_path / "run" / CHECKPOINT)
    assert state["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "run" / "summary.json").exists()


def test_divergence_stops_within_the_check_interval_not_at_the_epoch_end(tmp_path, splits,
                                                                       monkeypatch):
    monkeypatch.setattr(engine, "NONFINITE_CHECK_STEPS", 1)  # every step
    trainer = Trainer(_cfg(tmp_path, epochs=2, lr=10.0), splits)  # diverges in epoch 0
    calls = []
    step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a: calls.append(1) or step(*a))
    with pytest.raises(NonFiniteLossError, match="epoch 0"):
        trainer.fit()
    assert len(calls) < len(trainer.train_loader)  # stopped inside the first epoch


def test_skip_counts_the_skipped_steps(tmp_path, splits):
    summary = Trainer(_cfg(tmp_path, epochs=3, lr=10.0, on_nonfinite="skip"), splits).fit()
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["skipped_steps"] for r in history] == [2, 6, 6]
    assert summary["skipped_steps"] == 14


def test_cli_exits_non_zero_on_divergence(tmp_path, capsys):
    args = ["train", "--preset", "demo", "--epochs", "3", "--lr", "30", "--no-progress",
            "--no-tensorboard", "--no-plots", "--threads", "1", "--out", str(tmp_path / "r")]
    for key, value in {"n_train": 192, "n_val": 96, "n_test": 96}.items():
        args += ["--dataset-option", f"{key}={value}"]
    assert cli.main(args) == 3
    assert "non-finite" in capsys.readouterr().err


# ------------------------------------------------------------------ resume configuration
@pytest.fixture()
def cut_run(tmp_path, splits):
    """A run of opm+ogm-ge killed after epoch 0."""
    kw = dict(method="opm+ogm-ge", epochs=2)
    assert Trainer(_cfg(tmp_path, **kw), splits).fit(until_epoch=1) == {}
    return kw


@pytest.mark.parametrize("change", [{"alpha": 0.5}, {"q_base": 0.3}, {"batch_size": 16},
                                    {"amp": "bf16"}, {"lr": 0.01}, {"weight_decay": 1e-4},
                                    {"optimizer": "adam"}, {"hidden": 64},
                                    {"scheduler": "step"}, {"dataset_options": {"n_train": 96}},
                                    {"on_nonfinite": "skip"}])
def test_resume_refuses_a_changed_setting(tmp_path, splits, cut_run, change):
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"{key}: .* in the checkpoint, .* now"):
        Trainer(_cfg(tmp_path, **{**cut_run, **change}), splits, resume=True)


def test_resume_accepts_the_documented_changes(tmp_path, splits, cut_run):
    cfg = _cfg(tmp_path, **{**cut_run, "method": "ogm-ge+opm", "epochs": 3, "threads": 2,
                            "workers": 1, "progress": True, "compile": False})
    resumed = Trainer(cfg, splits, resume=True)
    assert resumed.start_epoch == 1
    assert resumed.cfg.epochs == 3
    assert json.loads((tmp_path / "run" / "config.json").read_text())["epochs"] == 3
    resumed.fit()
    assert [r["epoch"] for r in resumed.logger.history] == [0, 1, 2]


# ------------------------------------------------------------------ damaged checkpoints
def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(np.random.default_rng(0).bytes(len(data)))
    else:  # one flipped byte in the middle (inside a tensor's storage)
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])


@pytest.mark.parametrize("how", ["truncated", "empty", "random", "flipped"])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous(tmp_path, splits, how):
    Trainer(_cfg(tmp_path, epochs=3), splits).fit(until_epoch=2)
    run = tmp_path / "run"
    assert ckpt.load(run / PREVIOUS)["epoch"] == 1
    _damage(run / CHECKPOINT, how)
    with pytest.warns(UserWarning, match=f"{CHECKPOINT}.*previous checkpoint .*{PREVIOUS}"):
        resumed = Trainer(_cfg(tmp_path, epochs=3), splits, resume=True)
    assert resumed.start_epoch == 1
    resumed.close()
    _damage(run / PREVIOUS, how)
    with pytest.raises(ValueError, match=f"{CHECKPOINT}.*{PREVIOUS}"):
        Trainer(_cfg(tmp_path, epochs=3), splits, resume=True)


def test_a_damaged_best_checkpoint_is_found_at_resume(tmp_path, splits):
    Trainer(_cfg(tmp_path), splits).fit(until_epoch=1)
    _damage(tmp_path / "run" / BEST, "truncated")
    with pytest.raises(ValueError, match=f"{BEST} is damaged"):
        Trainer(_cfg(tmp_path), splits, resume=True)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_runs_no_code(tmp_path, splits):
    Trainer(_cfg(tmp_path), splits).fit(until_epoch=1)
    path, marker = tmp_path / "run" / CHECKPOINT, tmp_path / "pwned"
    state = torch.load(path, weights_only=True)
    state["history"] = _Payload(marker)
    torch.save(state, path)  # with a matching checksum: only weights_only stands in the way
    ckpt.sidecar(path).write_text(ckpt._digest(path) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=f"{CHECKPOINT}"):
            Trainer(_cfg(tmp_path), splits, resume=True)
    assert not marker.exists()


# ------------------------------------------------------------------ dataset pickles
def test_dataset_pickles_run_no_code(tmp_path):
    from fastbml.data import load_dataset
    from fastbml.data.io import load_array

    marker = tmp_path / "pwned"
    spec = tmp_path / "spec.pkl"
    spec.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match=f"{spec}.*refused to load posix.system"):
        load_array(spec, "spectrogram")
    (tmp_path / "mosi_data.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match=r"mosi_data.pkl.*refused"):
        load_dataset("mosi", str(tmp_path))
    assert not marker.exists()
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps(np.ones((3, 4), dtype=np.float32), protocol=2))
    assert load_array(good, "spectrogram").shape == (3, 4)


# ------------------------------------------------------------------ --out lock
def test_a_second_run_on_the_same_out_is_refused(tmp_path, splits):
    first = Trainer(_cfg(tmp_path), splits)
    with pytest.raises(ValueError, match="in use by another fastbml run"):
        Trainer(_cfg(tmp_path), splits)
    first.fit()
    Trainer(_cfg(tmp_path), splits, resume=True).close()  # released when the first run ended


def test_an_impossible_out_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["train", "--out", "/dev/null/x", "--no-progress"]) == 2
    assert "--out /dev/null/x: cannot create the run directory" in capsys.readouterr().err
