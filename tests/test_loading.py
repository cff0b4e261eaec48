"""The trainer's input path on file datasets: worker defaults, augmentation independent of the
workers and exact across a resume, uint8 frames normalised on the device, and errors that name
the file and the dataset from inside worker processes."""

import h5py
import numpy as np
import pytest
import torch
from test_datasets import _cremad, _kinetics
from torch.utils.data import DataLoader

from fastbml import cli
from fastbml.data import DataError, default_workers, load_dataset
from fastbml.data import batch as data_batch
from fastbml.train import Trainer, make_config


def _cfg(root, out, **kw):
    values = dict(dataset="kinetics-sounds", data_root=str(root), method="ogm-ge", epochs=2,
                  batch_size=3, feature_dim=16, progress=False, tensorboard=False, plots=False,
                  out=str(out), threads=1, dataset_options={"image_size": 16})
    values.update(kw)
    return make_config(**values)


def test_default_workers(monkeypatch):
    monkeypatch.setattr(data_batch, "available_cores", lambda: 64)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 16                      # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers() == 8                       # 64 cores shared by 8 local ranks
    monkeypatch.setattr(data_batch, "available_cores", lambda: 12)
    assert default_workers() == 0                       # 1 core per rank: load in the rank
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert default_workers() == 12


def test_file_dataset_training_is_worker_independent_and_resumes_exactly(tmp_path):
    root = tmp_path / "ks"
    root.mkdir()
    _kinetics(root, "hdf5", {"training": 12, "validation": 3})
    runs = {}
    for name, workers in (("w0", 0), ("w2", 2)):
        trainer = Trainer(_cfg(root, tmp_path / name, workers=workers))
        runs[name] = (trainer, trainer.fit())
    w2 = runs["w2"][0]
    assert w2.train_loader.persistent_workers and w2.train_loader.num_workers == 2
    assert len(w2.eval_loaders) == 2                    # val and test, each built once
    cut = tmp_path / "cut"
    assert Trainer(_cfg(root, cut, workers=2)).fit(until_epoch=1) == {}
    resumed = Trainer(_cfg(root, cut, workers=2), resume=True)
    resumed_summary = resumed.fit()
    for (name, a), (_, b), (_, c) in zip(runs["w0"][0].model.state_dict().items(),
                                         w2.model.state_dict().items(),
                                         resumed.model.state_dict().items()):
        assert torch.equal(a, b) and torch.equal(b, c), name
    assert runs["w0"][1]["test"] == runs["w2"][1]["test"] == resumed_summary["test"]


def test_uint8_frames_under_bf16_autocast(tmp_path):
    root = tmp_path / "cremad"
    _cremad(root, npy=True, n_train=2)
    cfg = _cfg(root, tmp_path / "run", dataset="cremad", amp="bf16", epochs=1, workers=0,
               batch_size=6, dataset_options={"image_size": 32})
    trainer = Trainer(cfg)
    batch, _ = next(iter(trainer.train_loader))
    assert batch["visual"].dtype == torch.uint8 and batch["audio"].dtype == torch.float32
    inputs = trainer._inputs(batch)
    assert inputs["visual"].dtype == torch.bfloat16 and inputs["audio"].dtype == torch.float32
    assert 0 <= trainer.fit()["test"]["acc"] <= 1


def _corrupt_frame(path, index=2):
    with h5py.File(path, "r+") as fh:
        fh["video"][index] = np.frombuffer(b"\xff\xd8\xff\xe0 not a jpeg at all", np.uint8)


def test_errors_in_workers_name_the_file_and_the_dataset(tmp_path):
    database = _kinetics(tmp_path, "hdf5", {"training": 6, "validation": 3})
    test_ids = [v for v in database if "validation" in v]
    splits = load_dataset("kinetics-sounds", tmp_path, options={"image_size": 16})
    _corrupt_frame(tmp_path / "hdf5" / f"{test_ids[1]}.hdf5")
    loader = DataLoader(splits.test, batch_size=3, num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    message = str(info.value)
    assert message.startswith(f"kinetics-sounds (eval) sample '{test_ids[1]}': unreadable image ")
    assert f"{test_ids[1]}.hdf5[video][2]" in message and "DataLoader worker process 0" in message
    assert "Traceback" not in message and "Traceback" in info.value.worker_traceback
    path = tmp_path / "hdf5" / f"{test_ids[2]}.hdf5"
    path.write_bytes(path.read_bytes()[:300])           # a truncated HDF5 file
    with pytest.raises(DataError, match=rf"unreadable HDF5 video .*{test_ids[2]}\.hdf5"):
        splits.test[2]


def test_cli_reports_a_corrupt_frame_found_by_a_worker(tmp_path, capsys):
    database = _kinetics(tmp_path, "hdf5", {"training": 6, "validation": 3})
    for vid in database:
        _corrupt_frame(tmp_path / "hdf5" / f"{vid}.hdf5", index=0)
    code = cli.main(["train", "--dataset", "kinetics-sounds", "--data-root", str(tmp_path),
                     "--epochs", "1", "--batch-size", "2", "--workers", "1", "--threads", "1",
                     "--out", str(tmp_path / "run"), "--no-progress", "--no-tensorboard",
                     "--no-plots", "--dataset-option", "image_size=16"])
    err = capsys.readouterr().err
    assert code == 2
    assert "fastbml train: error: kinetics-sounds (train) sample 'vid_training_" in err
    assert ".hdf5[video][0]" in err and "Traceback" not in err
