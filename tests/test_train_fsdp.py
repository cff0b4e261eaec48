"""`fastbml train --fsdp` (FSDP2 on gloo, 2 CPU processes): the same run as DDP up to float
rounding, sharded parameters, DCP checkpoints that resume on another world size, refusals."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_utils import run_ranks, values
from torch.distributed.tensor import DTensor

from fastbml.data import SyntheticConfig, make_synthetic
from fastbml.models import build_model
from fastbml.train import MethodStack, Trainer, make_config
from fastbml.train import checkpoint as ckpt

TINY = SyntheticConfig(n_train=192, n_val=95, n_test=93)  # uneven eval shards
TINY_OPTIONS = (("n_train", 192), ("n_val", 95), ("n_test", 93))
BATCH = 32
# each method's settings for a 2-epoch run, and what it logs
METHODS = {"joint": {}, "opm": {}, "ogm-ge": {}, "dr": {"dr_every": 1, "dr_times": 1},
           "agm": {}, "pmr": {}}
LOGGED = {"opm": "drop_prob_audio", "ogm-ge": "coeff_audio", "dr": "relearn_audio",
          "agm": "agm_score_audio"}
# the runs resumed on another world size: D&R's sharded snapshot, OGM-GE's counters
CUT = dict(method="dr+ogm-ge", epochs=3, dr_every=1, dr_times=2)
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _cfg(out, **kw):
    values = dict(epochs=2, batch_size=BATCH, hidden=32, feature_dim=32, progress=False,
                  out=str(out), threads=1, tensorboard=False, plots=False)
    values.update(kw)
    return make_config("demo", **values)


def _out(base, name, rank):
    """Rank 0's --out is base/name; the others are given their own, which FSDP replaces by
    rank 0's (it must stay absent)."""
    return Path(base) / (name if rank == 0 else f"{name}-rank{rank}")


def _timeless(value):
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return {k: v for k, v in value.items() if k not in ("seconds", "train_seconds", "versions")}


def _whole(trainer):
    """A copy of the model's whole state (full_state_dict may alias the parameters)."""
    return {k: v.clone() for k, v in trainer.full_state_dict().items()}


class Recording(Trainer):
    """Keeps the whole trained weights (before _finish loads the best epoch's model)."""

    def _finish(self):
        self.trained = _whole(self)
        return super()._finish()


def _optimizer_state(trainer):
    """The optimiser's momentum buffers as whole tensors, by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(trainer.model, trainer.optimizer,
                                    options=StateDictOptions(full_state_dict=True))
    return {k: v["momentum_buffer"].clone() for k, v in full["state"].items()}


def _plain(value):
    """`value` with every DTensor replaced by its whole tensor (picklable, comparable)."""
    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _cut_state(trainer):
    """What a resume must restore: weights, momentum, method state (whole tensors)."""
    return {"weights": _whole(trainer), "momentum": _optimizer_state(trainer),
            "methods": _plain(trainer.methods.state_dict())}


def _assert_same(a, b, where=""):
    """Nested containers of tensors and values, equal exactly."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def fsdp_job(rank, world, base):
    splits = make_synthetic(0, TINY)
    out = {}
    for method, options in METHODS.items():
        for fsdp in (False, True):
            name = f"{method}-{'fsdp' if fsdp else 'ddp'}"
            trainer = Recording(_cfg(_out(base, name, rank), method=method, fsdp=fsdp,
                                     **options), splits)
            weight = trainer.model.head.fc.weight
            summary = trainer.fit()
            out[name] = {"summary": summary, "history": trainer.logger.history,
                         "trained": trainer.trained, "best": _whole(trainer),
                         "val": trainer.evaluate(splits.val), "ddp": trainer.ddp is not None,
                         "sharded": isinstance(weight, DTensor) and
                         weight.to_local().shape[0] < weight.shape[0]}
    # HSDP: 2 replicas of 1 shard (a 2-D mesh); a shard size that does not divide the world
    hsdp = Recording(_cfg(_out(base, "opm-hsdp", rank), method="opm", fsdp=True,
                          fsdp_shard_size=1), splits)
    placements = hsdp.model.head.fc.weight.placements
    out["opm-hsdp"] = {"summary": hsdp.fit(), "trained": hsdp.trained,
                       "placements": [str(p) for p in placements]}
    try:
        Trainer(_cfg(_out(base, "hsdp3", rank), fsdp=True, fsdp_shard_size=3), splits)
    except ValueError as exc:
        out["hsdp3"] = str(exc)
    # rank 1 does not see rank 0's --out (as on a node-local disk): refused on every rank
    from fastbml.train import engine

    lock = engine.LOCK
    if rank == 1:
        engine.LOCK = ".not-shared"  # rank 1 looks for a lock file rank 0 never writes
    try:
        Trainer(_cfg(_out(base, "unshared", rank), fsdp=True), splits)
    except ValueError as exc:
        out["unshared"] = str(exc)
    engine.LOCK = lock
    # bf16 mixed precision: computed in bf16, shards and gradients stay fp32
    mp = Trainer(_cfg(_out(base, "bf16", rank), method="opm", fsdp=True, epochs=1,
                      fsdp_mixed_precision="bf16"), splits)
    seen = []
    mp.model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    mp.fit()
    out["bf16"] = {"logits": set(seen), "shards": {p.dtype for p in mp.model.parameters()},
                   "grads": {p.grad.dtype for p in mp.model.parameters() if p.grad is not None}}
    # the same world size: a resumed run is the uninterrupted one (AdamW, an LR schedule)
    exact = dict(method="opm", epochs=3, optimizer="adamw", lr=1e-3, scheduler="step",
                 step_size=1, fsdp=True)
    whole = Recording(_cfg(_out(base, "whole", rank), **exact), splits)
    whole.fit()
    assert Trainer(_cfg(_out(base, "part", rank), **exact), splits).fit(until_epoch=2) == {}
    part = Recording(_cfg(_out(base, "part", rank), **exact), splits, resume=True)
    part.fit()
    out["exact"] = [(r.trained, _timeless(r.logger.history)) for r in (whole, part)]
    # killed after one epoch of three on 2 ranks; resumed on 1 process below
    cut = Trainer(_cfg(_out(base, "w2cut", rank), fsdp=True, **CUT), splits)
    out["w2cut"] = {"fit": cut.fit(until_epoch=1), **_cut_state(cut)}
    # the parent's 1-process checkpoint, resumed on 2 ranks
    resumed = Recording(_cfg(_out(base, "w1cut", rank), fsdp=True, **CUT,
                             dataset_options=dict(TINY_OPTIONS)), splits, resume=True)
    out["w1cut"] = {"start": resumed.start_epoch, **_cut_state(resumed),
                    "summary": resumed.fit(), "trained": resumed.trained,
                    "history": resumed.logger.history}
    return out


def resume_job(rank, world, base):
    """The 2-rank cut, continued on `world` (1) process."""
    resumed = Recording(_cfg(Path(base) / "w2cut", fsdp=True, **CUT), make_synthetic(0, TINY),
                        resume=True)
    state = {"start": resumed.start_epoch, "world": resumed.world, **_cut_state(resumed)}
    return {**state, "summary": resumed.fit(), "history": resumed.logger.history}


def _cli(args, **kw):
    """`python -m fastbml train ...` as a fresh process without a distributed launch."""
    for key, value in TINY_OPTIONS:
        args += ["--dataset-option", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    return subprocess.run(args, capture_output=True, text=True, timeout=180, env=env,
                          cwd=Path(__file__).parents[1], **kw)


_TRAIN = ["train", "--preset", "demo", "--batch-size", str(BATCH), "--hidden", "32",
          "--feature-dim", "32", "--no-progress", "--no-tensorboard", "--no-plots", "--threads",
          "1", "--fsdp"]
_CUT_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in CUT.items() if k != "epochs"]


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    # one process, no torchrun: FSDP2 on a group of one; killed after epoch 0 of 3
    done = _cli([sys.executable, "-m", "fastbml", *_TRAIN, *_CUT_FLAGS, "--epochs", "1",
                 "--out", str(base / "w1cut")])
    assert done.returncode == 0, done.stderr[-3000:]
    state = base / "w1cut" / "checkpoint_last.dcp" / ckpt.STATE
    saved = torch.load(state, weights_only=True)
    saved["config"]["epochs"] = CUT["epochs"]  # as if it had been run so and stopped
    ckpt.save(saved, state)
    shutil.copytree(state.parent, base / "w1cut-saved.dcp")  # the 2-rank resume replaces it
    ranks = values(run_ranks(fsdp_job, str(base)))
    return base, ranks, done


@pytest.mark.parametrize("method", METHODS)
def test_fsdp_equals_ddp(fsdp, method):
    """Same seed, same data order: FSDP2's reduce-scatter gives DDP's averaged gradients, so
    metrics and weights agree up to float rounding, and both ranks hold the same model."""
    _, (r0, r1), _ = fsdp
    ddp, sharded = r0[f"{method}-ddp"], r0[f"{method}-fsdp"]
    assert ddp["ddp"] and not sharded["ddp"] and sharded["sharded"]
    for name, tensor in ddp["trained"].items():
        torch.testing.assert_close(sharded["trained"][name], tensor, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sharded["best"][name], ddp["best"][name], rtol=1e-5,
                                   atol=1e-6)
        assert torch.equal(sharded["trained"][name], r1[f"{method}-fsdp"]["trained"][name])
    assert sharded["summary"]["best_epoch"] == ddp["summary"]["best_epoch"]
    for got, want in zip(_timeless(sharded["history"]), _timeless(ddp["history"])):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert _timeless(sharded["summary"])["test"] == pytest.approx(ddp["summary"]["test"],
                                                                  abs=1e-6)
    assert sharded["val"] == pytest.approx(ddp["val"], abs=1e-6)
    if method in LOGGED:  # the method did act
        assert any(LOGGED[method] in record for record in sharded["history"])
    assert _timeless(sharded["summary"]) == _timeless(r1[f"{method}-fsdp"]["summary"])


def test_hsdp_equals_ddp(fsdp):
    """--fsdp-shard-size 1 on 2 ranks: a (replicate 2, shard 1) mesh, DDP's replication by
    HSDP; weights and metrics are DDP's up to float rounding."""
    _, (r0, r1), _ = fsdp
    hsdp, ddp = r0["opm-hsdp"], r0["opm-ddp"]
    assert hsdp["placements"] == ["R", "S(0)"]  # (replicate, shard)
    for name, tensor in ddp["trained"].items():
        torch.testing.assert_close(hsdp["trained"][name], tensor, rtol=1e-5, atol=1e-6)
        assert torch.equal(hsdp["trained"][name], r1["opm-hsdp"]["trained"][name])
    assert hsdp["summary"]["test"] == pytest.approx(ddp["summary"]["test"], abs=1e-6)
    assert r0["hsdp3"] == "fsdp_shard_size 3 must divide the world size 2"


def test_fsdp_resume_is_the_uninterrupted_run(fsdp):
    _, ranks, _ = fsdp
    for rank in ranks:
        (whole, whole_history), (resumed, resumed_history) = rank["exact"]
        assert resumed_history == whole_history
        for name, tensor in whole.items():
            assert torch.equal(resumed[name], tensor), name


def test_fsdp_writes_sharded_checkpoints_into_rank0_out(fsdp):
    base, _, _ = fsdp
    run = base / "opm-fsdp"
    assert not (base / "opm-fsdp-rank1").exists()
    assert not (run / "checkpoint_last.pt").exists()
    for name in ("checkpoint_last.dcp", "checkpoint_prev.dcp", "checkpoint_best.dcp"):
        files = sorted(p.name for p in (run / name).iterdir())
        assert files == [".metadata", ckpt.MANIFEST, "__0_0.distcp", "__1_0.distcp",
                         ckpt.STATE, ckpt.STATE + ".sha256"], name
    state = ckpt.load_sharded_state(run / "checkpoint_last.dcp")
    assert state["world_size"] == 2 and state["epoch"] == 2 and state["config"]["fsdp"]
    assert json.loads((run / "summary.json").read_text())["method"] == "opm"


def test_fsdp_refuses_an_out_the_ranks_do_not_share(fsdp):
    base, (r0, r1), _ = fsdp
    for rank in (r0, r1):
        assert rank["unshared"].startswith("--fsdp: 1 rank(s) cannot see rank 0's --out "
                                           f"{(base / 'unshared').resolve()}")
        assert "a file system all ranks share" in rank["unshared"]


def test_fsdp_bf16_mixed_precision(fsdp):
    _, (r0, r1), _ = fsdp
    for rank in (r0, r1):
        assert rank["bf16"] == {"logits": {torch.bfloat16}, "shards": {torch.float32},
                                "grads": {torch.float32}}


def test_fsdp_without_torchrun_runs_on_one_process(fsdp):
    base, _, done = fsdp
    summary = json.loads(done.stdout)
    assert summary["method"] == CUT["method"]
    assert ckpt.load_sharded_state(base / "w1cut-saved.dcp")["world_size"] == 1
    assert [p.name for p in (base / "w1cut-saved.dcp").glob("*.distcp")] == ["__0_0.distcp"]


def test_resume_two_ranks_on_one_process(fsdp):
    base, (r0, r1), _ = fsdp
    assert r0["w2cut"]["fit"] == {} == r1["w2cut"]["fit"]
    (one,) = values(run_ranks(resume_job, str(base), world=1))
    assert one["world"] == 1 and one["start"] == 1
    saved = r0["w2cut"]
    for key in ("weights", "momentum"):
        for name, tensor in saved[key].items():
            assert torch.equal(one[key][name], tensor), (key, name)
    _assert_same(one["methods"], saved["methods"])
    assert [r["epoch"] for r in one["history"]] == [0, 1, 2]
    assert one["summary"]["best_epoch"] in (0, 1, 2)
    assert ckpt.load_sharded_state(base / "w2cut" / "checkpoint_last.dcp")["world_size"] == 1


def test_resume_one_process_on_two_ranks(fsdp):
    base, (r0, r1), _ = fsdp
    a, b = r0["w1cut"], r1["w1cut"]
    assert a["start"] == b["start"] == 1
    # the 1-process checkpoint read back without any process group, into plain tensors
    plain = Trainer(_cfg(base / "plain"), make_synthetic(0, TINY))
    tensors = {"model": plain.model.state_dict()}
    ckpt.load_sharded(tensors, base / "w1cut-saved.dcp")
    plain.close()
    for name, tensor in tensors["model"].items():
        assert torch.equal(a["weights"][name], tensor), name
    for key in ("weights", "momentum", "trained"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    _assert_same(a["methods"], b["methods"])
    assert [r["epoch"] for r in a["history"]] == [0, 1, 2]
    assert _timeless(a["summary"]) == _timeless(b["summary"])


def test_fsdp_refusals(tmp_path, fsdp):
    base, _, _ = fsdp
    with pytest.raises(ValueError, match=r"amp .bf16. does not combine with fsdp.*"
                                         "--fsdp-mixed-precision bf16"):
        _cfg(tmp_path, fsdp=True, amp="bf16")
    with pytest.raises(ValueError, match="fsdp_mixed_precision 'bf16' needs fsdp"):
        _cfg(tmp_path, fsdp_mixed_precision="bf16")
    with pytest.raises(ValueError, match="fsdp_shard_size 2 needs fsdp"):
        _cfg(tmp_path, fsdp_shard_size=2)
    with pytest.raises(ValueError, match="fsdp_mixed_precision must be one of"):
        _cfg(tmp_path, fsdp=True, fsdp_mixed_precision="fp16")
    info = make_synthetic(0, TINY).info
    model = build_model(info.inputs, info.num_classes, hidden=8, feature_dim=8,
                        unimodal_heads=True)
    with pytest.raises(ValueError, match="method 'mmpareto' does not run under --fsdp"):
        MethodStack(_cfg(tmp_path, method="mmpareto", fsdp=True), model, info.num_classes,
                    torch.device("cpu"))
    # a sharded run's directory resumed without --fsdp (and a DDP one with it)
    with pytest.raises(ValueError, match=r"checkpoint_last.dcp is the checkpoint of a run with "
                                         "--fsdp; resume it with --fsdp"):
        Trainer(_cfg(base / "opm-fsdp", method="opm"), make_synthetic(0, TINY), resume=True)
    done = _cli([sys.executable, "-m", "fastbml", *_TRAIN, "--resume",
                 "--out", str(base / "opm-ddp")])
    assert done.returncode == 2
    assert "checkpoint_last.pt is the checkpoint of a run without --fsdp" in done.stderr


def test_damaged_or_crafted_sharded_checkpoints_are_refused(tmp_path, fsdp):
    base, _, _ = fsdp
    copy = tmp_path / "copy.dcp"
    shutil.copytree(base / "opm-fsdp" / "checkpoint_last.dcp", copy)
    shard = copy / "__1_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF])
                      + data[len(data) // 2 + 1:])
    with pytest.raises(ckpt.CheckpointError, match=r"__1_0\.distcp is missing or does not match"):
        ckpt.load_sharded_state(copy)
    (copy / ckpt.MANIFEST).unlink()
    with pytest.raises(ckpt.CheckpointError, match="has no SHA256SUMS"):
        ckpt.load_sharded_state(copy)
    # a .metadata that would run code when unpickled: refused before anything runs
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (copy / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ckpt.CheckpointError, match="refused to load"):
        ckpt.load_sharded({"model": {}}, copy)
    assert not marker.exists()


def test_torchrun_cli_fsdp_two_ranks(tmp_path):
    """`torchrun --nproc_per_node=2 -m fastbml train --fsdp --fsdp-mixed-precision bf16`: one
    summary printed, a 2-rank sharded checkpoint in rank 0's --out."""
    out = tmp_path / "run"
    done = _cli([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node=2", "-m", "fastbml", *_TRAIN, "--method", "opm", "--fsdp-mixed-precision",
                 "bf16", "--epochs", "1", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)                  # rank 0 alone printed it
    assert summary["method"] == "opm" and summary["best_epoch"] == 0
    assert json.loads((out / "summary.json").read_text()) == summary
    state = ckpt.load_sharded_state(out / "checkpoint_last.dcp")
    assert state["world_size"] == 2 and state["config"]["fsdp_mixed_precision"] == "bf16"


COMPILED_METHODS = ("opm+ogm-ge", "agm")


def compile_job(rank, world, base):
    splits = make_synthetic(0, TINY)
    out = {}
    for method in COMPILED_METHODS:
        for compiled in (False, True):
            trainer = Recording(_cfg(_out(base, f"{method}-{compiled}", rank), method=method,
                                     fsdp=True, epochs=1, compile=compiled,
                                     compile_backend="aot_eager"), splits)
            trainer.fit()
            out[method, compiled] = trainer.trained
    return out


def test_fsdp_compiled_forward_equals_eager(tmp_path):
    """--compile under --fsdp: the forward (OPM included) compiled with graph breaks at FSDP2's
    hooks, the sharded OGM-GE and AGM steps eager, trains the same model as eager."""
    runs = values(run_ranks(compile_job, str(tmp_path)))[0]
    for method in COMPILED_METHODS:
        for name, tensor in runs[method, False].items():
            torch.testing.assert_close(runs[method, True][name], tensor, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, method=method, name=name:
                                       f"{method} {name}: {m}")


def damaged_resume_job(rank, world, out):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(_cfg(out, method="opm", fsdp=True), make_synthetic(0, TINY),
                          resume=True)
    trainer.close()
    return trainer.start_epoch, [str(w.message) for w in caught if "--resume" in str(w.message)]


def test_a_damaged_shard_resumes_from_the_previous_checkpoint(fsdp, tmp_path):
    """The ranks hash the files in parallel, rank 0 finds the damaged shard and falls back."""
    base, _, _ = fsdp
    run = tmp_path / "run"
    shutil.copytree(base / "opm-fsdp", run)
    shard = run / "checkpoint_last.dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1])  # truncated by one byte
    (start0, warned0), (start1, warned1) = values(run_ranks(damaged_resume_job, str(run)))
    assert start0 == start1 == 1  # the previous checkpoint's epoch
    assert len(warned0) == 1 and not warned1
    assert "__1_0.distcp is missing or does not match" in warned0[0]
    assert "resuming from the previous checkpoint" in warned0[0]
