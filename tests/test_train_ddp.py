"""`fastbml train` under DDP (gloo, 2 CPU processes): replicas stay bit-identical, rank 0 alone
writes, metrics are those of the whole split, and checkpoints resume on another world size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_utils import run_ranks, values

from fastbml import rng
from fastbml.data import SyntheticConfig, make_synthetic
from fastbml.train import Trainer, make_config
from fastbml.train.parallel import ShardSampler, setup_distributed

# Uneven val / test sizes: the ranks' evaluation shards differ in length.
TINY = SyntheticConfig(n_train=192, n_val=95, n_test=93)
BATCH = 32  # per rank


def _cfg(out, **kw):
    values = dict(epochs=2, batch_size=BATCH, hidden=32, feature_dim=32, progress=False,
                  out=str(out), threads=1)
    values.update(kw)
    return make_config("demo", **values)


def _out(base, name, rank):
    """Rank 0 writes into base/name; every other rank is pointed at its own directory, which
    must stay absent (nothing but rank 0 writes)."""
    return Path(base) / (name if rank == 0 else f"{name}-rank{rank}")


class Recording(Trainer):
    """Keeps the parameters as trained (before _finish loads the best epoch's model)."""

    def _finish(self):
        self.trained = {k: v.clone() for k, v in self.model.state_dict().items()}
        return super()._finish()


def _timeless(value):
    """A summary or history without the per-rank wall-clock times."""
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return {k: v for k, v in value.items() if k not in ("seconds", "train_seconds")}


def _state(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def ddp_job(rank, world, base):
    splits = make_synthetic(0, TINY)
    out = {}
    for method in ("ogm-ge", "opm", "mmpareto"):
        trainer = Recording(_cfg(_out(base, method, rank), method=method), splits)
        summary = trainer.fit()
        out[method] = {"trained": trainer.trained, "summary": summary,
                       "history": trainer.logger.history, "ddp": trainer.ddp is not None,
                       "best": _state(trainer),
                       # the best model's metrics on a split, evaluated by both ranks together
                       "val": trainer.evaluate(splits.val)}
    # killed after one epoch of three on 2 ranks; the parent resumes it on 1
    cut = Trainer(_cfg(_out(base, "w2cut", rank), method="opm+ogm-ge", epochs=3), splits)
    out["w2cut"] = cut.fit(until_epoch=1)
    # the parent's 1-process checkpoint, continued on 2 ranks (rank 1 never sees the file)
    resumed = Recording(_cfg(_out(base, "w1cut", rank), method="opm+ogm-ge", epochs=3), splits,
                        resume=True)
    out["w1cut"] = {"start": resumed.start_epoch, "summary": resumed.fit(),
                    "trained": resumed.trained, "history": resumed.logger.history}
    return out


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    splits = make_synthetic(0, TINY)
    first = Trainer(_cfg(base / "w1cut", method="opm+ogm-ge", epochs=3), splits)
    assert first.fit(until_epoch=1) == {}
    ranks = values(run_ranks(ddp_job, str(base)))
    return base, splits, ranks


@pytest.mark.parametrize("method", ["ogm-ge", "opm", "mmpareto"])
def test_two_ranks_train_identical_replicas_and_only_rank0_writes(ddp, method):
    base, _, (r0, r1) = ddp
    a, b = r0[method], r1[method]
    assert a["ddp"] and b["ddp"]
    for name, tensor in a["trained"].items():
        assert torch.equal(tensor, b["trained"][name]), name
    for name, tensor in a["best"].items():
        assert torch.equal(tensor, b["best"][name]), name
    assert _timeless(a["summary"]) == _timeless(b["summary"])
    assert _timeless(a["history"]) == _timeless(b["history"])
    assert a["summary"]["best_epoch"] in (0, 1)
    run = base / method
    for name in ("config.json", "metrics.json", "metrics.csv", "curves.png", "summary.json",
                 "checkpoint_last.pt", "checkpoint_best.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    assert not (base / f"{method}-rank1").exists()
    history = json.loads((run / "metrics.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1]
    key = {"ogm-ge": "coeff_audio", "opm": "drop_prob_audio", "mmpareto": "cos_audio"}[method]
    assert key in history[0]
    checkpoint = torch.load(run / "checkpoint_last.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and checkpoint["epoch"] == 2
    for name, tensor in checkpoint["model"].items():  # no DDP "module." prefix
        assert torch.equal(tensor, a["trained"][name]), name


@pytest.mark.parametrize("method", ["ogm-ge", "mmpareto"])
def test_two_ranks_equal_one_process_with_the_global_batch(ddp, tmp_path, method):
    """Rank r takes rows r, r + 2, ... of each global batch of the single-process order, DDP
    averages the gradients, OGM-GE scores the global batch and MMPareto averages its uni-modal
    gradients: 2 ranks x 32 is 1 process x 64 up to float rounding."""
    _, splits, (r0, _) = ddp
    single = Recording(_cfg(tmp_path, method=method, batch_size=2 * BATCH), splits)
    single.fit()
    for name, tensor in single.trained.items():
        torch.testing.assert_close(r0[method]["trained"][name], tensor, rtol=1e-4, atol=1e-5)


def test_sharded_eval_equals_single_process_metrics(ddp, tmp_path):
    _, splits, (r0, r1) = ddp
    single = Trainer(_cfg(tmp_path, method="ogm-ge", tensorboard=False), splits)
    single.model.load_state_dict(r0["ogm-ge"]["best"])
    expected = single.evaluate(splits.val)
    assert r0["ogm-ge"]["val"] == r1["ogm-ge"]["val"]
    assert r0["ogm-ge"]["val"] == pytest.approx(expected, abs=1e-6)


def test_resume_two_ranks_on_one_process(ddp):
    base, splits, (r0, r1) = ddp
    assert r0["w2cut"] == {} and r1["w2cut"] == {}
    assert not (base / "w2cut-rank1").exists()
    checkpoint = torch.load(base / "w2cut" / "checkpoint_last.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and checkpoint["epoch"] == 1
    resumed = Trainer(_cfg(base / "w2cut", method="opm+ogm-ge", epochs=3), splits, resume=True)
    assert resumed.start_epoch == 1 and resumed.ddp is None
    summary = resumed.fit()
    assert [r["epoch"] for r in resumed.logger.history] == [0, 1, 2]
    assert resumed.logger.history[0] == checkpoint["history"][0]
    assert summary["best_epoch"] in (0, 1, 2)
    assert (base / "w2cut" / "summary.json").is_file()


def test_resume_one_process_on_two_ranks(ddp):
    base, _, (r0, r1) = ddp
    a, b = r0["w1cut"], r1["w1cut"]
    assert a["start"] == b["start"] == 1
    assert [r["epoch"] for r in a["history"]] == [0, 1, 2]
    assert _timeless(a["history"]) == _timeless(b["history"])
    assert _timeless(a["summary"]) == _timeless(b["summary"])
    for name, tensor in a["trained"].items():
        assert torch.equal(tensor, b["trained"][name]), name
    saved = json.loads((base / "w1cut" / "metrics.json").read_text())
    assert [r["epoch"] for r in saved] == [0, 1, 2]
    assert not (base / "w1cut-rank1").exists()


def dr_job(rank, world, base):
    trainer = Recording(_cfg(_out(base, "dr", rank), method="dr", epochs=2, dr_every=1,
                             dr_times=1), make_synthetic(0, TINY))
    trainer.fit()
    return trainer.trained, trainer.logger.history


def test_dr_two_ranks_identical_replicas(tmp_path):
    (p0, h0), (p1, h1) = values(run_ranks(dr_job, str(tmp_path)))
    for name, tensor in p0.items():
        assert torch.equal(tensor, p1[name]), name
    assert _timeless(h0) == _timeless(h1)


def pmr_job(rank, world, base):
    trainer = Recording(_cfg(_out(base, "pmr", rank), method="pmr"), make_synthetic(0, TINY))
    trainer.fit()
    return trainer.trained, trainer.logger.history, trainer.methods.pmr.state_dict()


def test_pmr_two_ranks_identical_replicas_equal_one_process_with_the_global_batch(tmp_path):
    """The prototype subset is the global one (sums all-reduced), the scores are the global
    batch's: 2 ranks x 32 is 1 process x 64 up to float rounding."""
    (p0, h0, s0), (p1, h1, s1) = values(run_ranks(pmr_job, str(tmp_path)))
    for name, tensor in p0.items():
        assert torch.equal(tensor, p1[name]), name
    assert _timeless(h0) == _timeless(h1)
    for m, proto in s0["prototypes"].items():
        assert torch.equal(proto, s1["prototypes"][m])
    single = Recording(_cfg(tmp_path / "one", method="pmr", batch_size=2 * BATCH),
                       make_synthetic(0, TINY))
    single.fit()
    for m, proto in single.methods.pmr.state_dict()["prototypes"].items():
        torch.testing.assert_close(s0["prototypes"][m], proto, rtol=1e-4, atol=1e-5)
    for name, tensor in single.trained.items():
        torch.testing.assert_close(p0[name], tensor, rtol=1e-4, atol=1e-5)


def test_shard_sampler_splits_the_single_process_order():
    n, world, batch = 10, 3, 2
    shards = [list(ShardSampler(range(n), num_replicas=world, rank=r, seed=5)) for r in
              range(world)]
    assert [len(s) for s in shards] == [4, 4, 4]       # padded by wrapping around
    g = torch.Generator().manual_seed(rng.step_seed(5, 0))
    order = torch.randperm(n, generator=g).tolist()    # the single-process loader's epoch 0
    first_global = sorted(i for s in shards for i in s[:batch])
    assert first_global == sorted(order[:world * batch])
    assert sorted({i for s in shards for i in s}) == list(range(n))
    again = ShardSampler(range(n), num_replicas=world, rank=1, seed=5)
    again.set_epoch(1)
    assert list(again) != shards[1]


def test_setup_distributed_errors(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert setup_distributed() is False                 # a plain single-process run
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"):
        setup_distributed()
    for key, value in (("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="nccl backend needs CUDA"):
        setup_distributed("cpu", "nccl")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            setup_distributed("cuda", "auto")


def test_torchrun_cli_two_ranks(tmp_path):
    """`torchrun --nproc_per_node=2 -m fastbml train`: one summary printed, files from rank 0."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "fastbml", "train", "--preset", "demo", "--method", "ogm-ge", "--epochs", "1",
            "--batch-size", "32", "--hidden", "16", "--feature-dim", "16", "--no-progress",
            "--no-tensorboard", "--no-plots", "--threads", "1", "--out", str(out)]
    for key, value in (("n_train", 128), ("n_val", 33), ("n_test", 31)):
        args += ["--dataset-option", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)                  # rank 0 alone printed it
    assert summary["method"] == "ogm-ge" and summary["best_epoch"] == 0
    assert json.loads((out / "summary.json").read_text()) == summary
    assert torch.load(out / "checkpoint_last.pt", weights_only=False)["world_size"] == 2
