"""`fastbml train` / `fastbml demo`: every method runs, resume is exact, logs and errors."""

import json

import pytest
import torch

from fastbml import cli
from fastbml.data import SyntheticConfig, make_synthetic
from fastbml.train import Trainer, checkpoint, format_table, make_config, parse_method, run_demo

TINY = SyntheticConfig(n_train=192, n_val=96, n_test=96)
TINY_OPTIONS = {"n_train": 192, "n_val": 96, "n_test": 96}


def _cfg(tmp_path, **kw):
    values = dict(epochs=2, batch_size=32, hidden=32, feature_dim=32, progress=False,
                  out=str(tmp_path / "run"), threads=1)
    values.update(kw)
    return make_config("demo", **values)


METHODS = ("joint", "ogm", "ogm-ge", "opm", "opm+ogm-ge", "dr", "dr+ogm-ge", "agm", "agm+dr")


def test_parse_method():
    assert parse_method("ogm-ge+opm") == ("ogm-ge", "opm")
    assert parse_method("dr+agm") == ("agm", "dr")
    for bad, match in (("ogm+ogm-ge", "one of"), ("joint+opm", "cannot be combined"),
                       ("agm+ogm-ge", "both rescale"), ("agm+ogm", "both rescale"),
                       ("agm+opm", "cannot be combined"),
                       ("ogm_ge", "unknown parts"), ("", "method must be")):
        with pytest.raises(ValueError, match=match):
            parse_method(bad)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_two_epochs(tmp_path, method):
    splits = make_synthetic(0, TINY)
    summary = Trainer(_cfg(tmp_path, method=method), splits).fit()
    run = tmp_path / "run"
    history = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1]
    for key in ("val_acc", "val_macro_f1", "val_map", "val_acc_audio", "val_acc_visual"):
        assert 0.0 <= history[-1][key] <= 1.0
    assert summary["best_epoch"] == max(range(2), key=lambda e: (history[e]["val_acc"], -e))
    assert set(summary["test"]) == {"acc", "macro_f1", "map", "acc_audio", "acc_visual"}
    for name in ("metrics.csv", "curves.png", "summary.json", "checkpoint_last.pt", "config.json"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    if "ogm" in method:
        assert {"coeff_audio", "coeff_visual"} <= set(history[0])
    if "opm" in method:
        assert {"drop_prob_audio", "drop_prob_visual"} <= set(history[0])
    if "agm" in method:
        assert {"coeff_audio", "coeff_visual", "agm_score_audio"} <= set(history[0])


@pytest.mark.parametrize("fusion", ["sum", "film", "gated"])
def test_ogm_ge_with_other_fusion_heads(tmp_path, fusion):
    summary = Trainer(_cfg(tmp_path, method="ogm-ge", fusion=fusion, epochs=1),
                      make_synthetic(0, TINY)).fit()
    assert 0.0 <= summary["test"]["acc_audio"] <= 1.0


def test_modulation_changes_training(tmp_path):
    """OGM-GE must actually act: same seed, different weights from joint after one epoch."""
    splits = make_synthetic(0, TINY)
    joint = Trainer(_cfg(tmp_path / "j", method="joint", epochs=1), splits)
    joint.fit()
    ogm = Trainer(_cfg(tmp_path / "o", method="ogm-ge", epochs=1), splits)
    ogm.fit()
    w_joint = joint.model.encoders["visual"].net[0].weight
    w_ogm = ogm.model.encoders["visual"].net[0].weight
    assert not torch.equal(w_joint, w_ogm)
    torch.testing.assert_close(joint.model.head.fc.weight.shape, ogm.model.head.fc.weight.shape)


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_agm_modulates_and_checkpoints_its_running_scores(tmp_path, amp):
    splits = make_synthetic(0, TINY)
    joint = Trainer(_cfg(tmp_path / "j", method="joint", epochs=1, amp=amp), splits)
    joint.fit()
    agm = Trainer(_cfg(tmp_path / "a", method="agm", epochs=1, amp=amp, agm_alpha=2.0), splits)
    agm.fit()
    state = agm.methods.state_dict()["agm"]
    assert state["steps"] == 192 // 32 and state["running_scores"].abs().min() > 0
    saved = torch.load(tmp_path / "a" / "run" / "checkpoint_last.pt", weights_only=False)
    assert torch.equal(saved["methods"]["agm"]["running_scores"], state["running_scores"])
    assert not torch.equal(joint.model.encoders["visual"].net[0].weight,
                           agm.model.encoders["visual"].net[0].weight)


@pytest.mark.parametrize("method", ["opm+ogm-ge", "dr", "agm", "pmr", "mmpareto+opm"])
def test_resume_is_bit_identical(tmp_path, method):
    splits = make_synthetic(0, TINY)
    kw = dict(method=method, epochs=3, dr_every=1, dr_times=2, scheduler="step", step_size=1,
              gamma=0.5)
    full = Trainer(_cfg(tmp_path / "full", **kw), splits)
    full_summary = full.fit()
    first = Trainer(_cfg(tmp_path / "cut", **kw), splits)
    assert first.fit(until_epoch=1) == {}          # killed after epoch 0
    resumed = Trainer(_cfg(tmp_path / "cut", **kw), splits, resume=True)
    assert resumed.start_epoch == 1
    resumed_summary = resumed.fit()
    for (name, a), (_, b) in zip(full.model.state_dict().items(),
                                 resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert full_summary["test"] == resumed_summary["test"]
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(full.logger.history) == strip(resumed.logger.history)


def test_pmr_adds_its_loss_logs_it_and_keeps_prototypes_as_state(tmp_path):
    """--method pmr+ogm-ge: the prototype loss acts on some steps (pmr_weight_<m>, the fraction
    of steps it acted on m), the prototypes of every class are in the checkpoint."""
    trainer = Trainer(_cfg(tmp_path, method="pmr+ogm-ge", epochs=2), make_synthetic(0, TINY))
    trainer.fit()
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for record in history:
        weights = [record["pmr_weight_audio"], record["pmr_weight_visual"]]
        assert all(0.0 <= w <= 1.0 for w in weights) and 0.0 < sum(weights) <= 1.0
        assert {"coeff_audio", "coeff_visual"} <= set(record)
    state = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=True)["methods"]
    assert set(state) == {"ogm", "pmr"} and bool(state["pmr"]["valid"].all())
    for m, p in state["pmr"]["prototypes"].items():
        assert p.shape == (trainer.splits.info.num_classes, 32) and bool(p.isfinite().all()), m
    with pytest.raises(ValueError, match="'pmr' cannot be combined with 'dr'"):
        parse_method("dr+pmr")


def test_resume_errors(tmp_path):
    splits = make_synthetic(0, TINY)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(_cfg(tmp_path), splits, resume=True)
    Trainer(_cfg(tmp_path, epochs=1), splits).fit()
    with pytest.raises(ValueError, match=r"method: .joint. in the checkpoint, .ogm-ge. now"):
        Trainer(_cfg(tmp_path, method="ogm-ge", epochs=2), splits, resume=True)


def test_bf16_autocast_and_adamw_step_schedule(tmp_path):
    cfg = _cfg(tmp_path, method="ogm-ge", amp="bf16", optimizer="adamw", lr=1e-3,
               scheduler="step", step_size=1, gamma=0.1)
    trainer = Trainer(cfg, make_synthetic(0, TINY))
    trainer.fit()
    assert trainer.logger.history[1]["lr"] == pytest.approx(1e-5)


def test_single_modality_baseline(tmp_path):
    summary = Trainer(_cfg(tmp_path, modalities=["visual"]), make_synthetic(0, TINY)).fit()
    assert set(summary["test"]) == {"acc", "macro_f1", "map", "acc_visual"}
    with pytest.raises(ValueError, match="needs at least two modalities"):
        Trainer(_cfg(tmp_path, modalities=["visual"], method="ogm-ge"), make_synthetic(0, TINY))
    with pytest.raises(ValueError, match="subset of"):
        Trainer(_cfg(tmp_path, modalities=["text"]), make_synthetic(0, TINY))


def test_config_errors():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_config(optimizer="lion")
    with pytest.raises(ValueError, match="preset must be one of"):
        make_config("cvpr")
    with pytest.raises(ValueError, match="unknown training options"):
        make_config(learning_rate=1.0)
    with pytest.raises(ValueError, match="epochs"):
        make_config(epochs=0)
    assert make_config("dr-cremad", lr=0.1).lr == 0.1       # flags override presets
    assert make_config("dr-cremad").scheduler == "none"


def test_cli_train_and_errors(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--preset", "demo", "--method", "ogm-ge", "--epochs", "1",
            "--batch-size", "64", "--out", str(out), "--no-progress", "--no-tensorboard",
            "--threads", "1"]
    for key, value in TINY_OPTIONS.items():
        args += ["--dataset-option", f"{key}={value}"]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "ogm-ge"
    assert (out / "summary.json").is_file()
    assert cli.main(["train", "--method", "gradblend", "--out", str(tmp_path / "x")]) == 2
    assert "unknown parts" in capsys.readouterr().err
    assert cli.main(["train", "--dataset", "cremad", "--out", str(tmp_path / "y")]) == 2
    assert "--data-root" in capsys.readouterr().err


def test_demo_quick_shows_the_imbalance(tmp_path):
    """The demo's claim, on its fixed seed: joint under-trains visual; OGM-GE raises it."""
    results = run_demo(tmp_path / "demo", quick=True)
    assert (tmp_path / "demo" / "comparison.png").is_file()
    on_disk = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert on_disk == results
    assert list(results["methods"]) == ["joint", "ogm-ge", "opm", "dr", "mmpareto", "agm", "pmr"]
    for r in results["methods"].values():
        assert set(r) == {"acc", "acc_per_modality", "seconds"}
        assert set(r["acc_per_modality"]) == {"audio", "visual"}
    joint = results["methods"]["joint"]["acc_per_modality"]["visual"]
    assert joint < results["alone"]["visual"] - 0.05
    assert results["methods"]["ogm-ge"]["acc_per_modality"]["visual"] > joint
    assert "joint" in format_table(results)


@pytest.mark.parametrize("method", ["joint", "opm+ogm-ge", "agm", "pmr+ogm-ge", "mmpareto"])
def test_compile_trains_as_eager_does(tmp_path, method):
    """--compile (here without code generation) gives the eager run's losses and weights."""
    runs = []
    for compile_ in (False, True):
        trainer = Trainer(_cfg(tmp_path / str(compile_), method=method, compile=compile_,
                               compile_backend="aot_eager", epochs=2), make_synthetic(0, TINY))
        trainer.fit()
        history = json.loads((tmp_path / str(compile_) / "run" / "metrics.json").read_text())
        runs.append(([r["train_loss"] for r in history],
                     [p.detach().clone() for p in trainer.model.parameters()]))
    (eager_loss, eager_params), (loss, params) = runs
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    for p, e in zip(params, eager_params):
        torch.testing.assert_close(p, e, rtol=1e-4, atol=1e-5)


def test_compile_flags_on_the_command_line(tmp_path):
    out = tmp_path / "run"
    code = cli.main(["train", "--preset", "demo", "--method", "opm+ogm-ge", "--epochs", "1",
                     "--hidden", "16", "--feature-dim", "16", "--out", str(out), "--no-progress",
                     "--compile", "--compile-backend", "aot_eager",
                     "--dataset-option", "n_train=96", "--dataset-option", "n_val=48",
                     "--dataset-option", "n_test=48"])
    assert code in (0, None)
    assert json.loads((out / "config.json").read_text())["compile"] is True
    with pytest.raises(ValueError, match="compile_mode"):
        make_config("demo", compile_mode="fast")


@pytest.mark.parametrize("method", ["mmpareto", "mmpareto+opm", "mmpareto+dr"])
def test_mmpareto_trains_its_unimodal_heads_and_logs_the_conflicts(tmp_path, method):
    splits = make_synthetic(0, TINY)
    trainer = Trainer(_cfg(tmp_path, method=method, epochs=1, dr_every=1), splits)
    heads = trainer.model.unimodal_heads
    before = {m: h.weight.detach().clone() for m, h in heads.items()}
    summary = trainer.fit()
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for m in ("audio", "visual"):
        assert -1.0 <= history[0][f"cos_{m}"] <= 1.0
        assert 0.0 <= history[0][f"conflict_{m}"] <= 1.0
        assert not torch.equal(before[m], heads[m].weight)  # the uni-modal losses train them
    assert 0.0 <= summary["test"]["acc_visual"] <= 1.0
    state = checkpoint.load(tmp_path / "run" / "checkpoint_last.pt")
    assert state["methods"]["mmpareto"]["steps"] == 6  # 192 samples / batch 32
    assert any(k.startswith("unimodal_heads.") for k in state["model"])


def test_mmpareto_refuses_ogm_agm_pmr_and_plain_runs_build_no_unimodal_heads(tmp_path):
    for method in ("mmpareto+ogm", "ogm-ge+mmpareto", "agm+mmpareto"):
        with pytest.raises(ValueError, match="both rewrite the encoders' gradients"):
            parse_method(method)
    with pytest.raises(ValueError, match="'mmpareto' and 'pmr' cannot be combined"):
        parse_method("pmr+mmpareto")
    trainer = Trainer(_cfg(tmp_path, method="ogm-ge", epochs=1), make_synthetic(0, TINY))
    assert trainer.model.unimodal_heads is None
    trainer.close()
