"""Decoding on the training device (`gpu_decode`): the loader ships JPEG bytes and crop boxes,
`prepare_batch` decodes, crops, normalises and resizes on the device. On CPU-only machines the
device decoder is substituted by a CPU one, which tests everything but nvjpeg itself; the `gpu`
test runs torchvision's decoder on CUDA."""

import pytest
import simplejpeg
import torch
from test_datasets import _smooth_jpeg, hdf5_videos

from fastbml.data import DataError, load_dataset, prepare_batch
from fastbml.data import encoded as enc
from fastbml.data.encoded import EncodedBatch, EncodedClip, collate, decode_batch
from fastbml.data.io import IMAGENET_NORM, IMAGENET_STD
from fastbml.data.kinetics import HDF5Frames
from fastbml.train import Trainer, make_config


def _cpu_decode(frames, gray, device):
    return [torch.from_numpy(simplejpeg.decode_jpeg(f.numpy().tobytes(),
                                                    colorspace="GRAY" if gray else "RGB"))
            .permute(2, 0, 1).to(device) for f in frames]




@pytest.mark.parametrize("train", [True, False])
def test_device_decoding_matches_loader_decoding(tmp_path, train):
    hdf5_videos(tmp_path)
    splits = load_dataset("kinetics-sounds", tmp_path,
                          options={"image_size": 112, "dct_scaling": False})
    on_cpu = splits.train.readers["visual"]
    on_device = HDF5Frames(tmp_path / "hdf5", 3, 112, gpu_decode=True)
    items, expected = [], []
    for k in range(3):
        torch.manual_seed(k)
        items.append(({"visual": on_device("vid_training_0", train)}, 0))
        torch.manual_seed(k)
        expected.append(on_cpu("vid_training_0", train))
    assert isinstance(items[0][0]["visual"], EncodedClip)
    batch, labels = collate(items)
    assert isinstance(batch["visual"], EncodedBatch) and labels.tolist() == [0, 0, 0]
    got = decode_batch(batch["visual"], *IMAGENET_NORM, "cpu", decode=_cpu_decode)
    want = prepare_batch({"visual": torch.stack(expected)}, splits.info, "cpu")["visual"]
    assert got.shape == want.shape == (3, 3, 3, 112, 112) and got.dtype == torch.float32
    level = 1 / 255 / IMAGENET_STD.min().item()
    diff = (got - want).abs()
    assert diff.max() <= 1.5 * level and diff.mean() < 0.3 * level   # the loader rounds to uint8
    bf16 = decode_batch(batch["visual"], *IMAGENET_NORM, "cpu", torch.bfloat16, _cpu_decode)
    assert bf16.dtype == torch.bfloat16


def test_device_decoding_names_a_corrupt_frame(tmp_path):
    good = _smooth_jpeg()
    clip = EncodedClip([good, good[:len(good) // 3]], ["v.hdf5[video][0]", "v.hdf5[video][4]"],
                       [(0, 0, 340, 256, False)] * 2, 32)
    with pytest.raises(DataError, match=r"unreadable image v\.hdf5\[video\]\[4\]"):
        decode_batch(EncodedBatch([clip]), *IMAGENET_NORM, "cpu", decode=_cpu_decode)
    with pytest.raises(DataError, match="is not a JPEG"):
        enc.encoded_clip([b"\x89PNG...."], ["a.png"], [(0, 0, 1, 1, False)], 8)


def test_gpu_decode_option_is_refused_without_cuda_decoder(tmp_path, monkeypatch):
    hdf5_videos(tmp_path)
    monkeypatch.setattr(enc, "gpu_decode_available", lambda: "CUDA is not available")
    with pytest.raises(ValueError, match="gpu_decode=true needs torchvision's CUDA JPEG"):
        load_dataset("kinetics-sounds", tmp_path, options={"gpu_decode": True})


def test_trainer_runs_the_device_decoding_path(tmp_path, monkeypatch):
    root = tmp_path / "ks"
    root.mkdir()
    hdf5_videos(root, n_train=12)
    monkeypatch.setattr(enc, "gpu_decode_available", lambda: None)
    monkeypatch.setattr(enc, "_torchvision_decode", _cpu_decode)
    cfg = make_config(dataset="kinetics-sounds", data_root=str(root), epochs=1, batch_size=3,
                      feature_dim=16, progress=False, tensorboard=False, plots=False,
                      out=str(tmp_path / "run"), threads=1, workers=1,
                      dataset_options={"image_size": 32, "gpu_decode": True})
    trainer = Trainer(cfg)
    batch, _ = next(iter(trainer.train_loader))
    assert isinstance(batch["visual"], EncodedBatch)
    assert trainer._inputs(batch)["visual"].shape == (3, 3, 3, 32, 32)
    assert 0 <= trainer.fit()["test"]["acc"] <= 1


@pytest.mark.gpu
def test_nvjpeg_decoding_on_cuda_matches_the_cpu(tmp_path):
    # the option needs a torchvision matching torch; a machine without one does not offer it
    pytest.importorskip("torchvision", reason="gpu_decode needs torchvision (not installed)")
    assert enc.gpu_decode_available() is None, enc.gpu_decode_available()
    hdf5_videos(tmp_path)
    reader = HDF5Frames(tmp_path / "hdf5", 3, 112, gpu_decode=True)
    torch.manual_seed(0)
    batch = EncodedBatch([reader("vid_training_0", True), reader("vid_validation_0", False)])
    got = decode_batch(batch, *IMAGENET_NORM, "cuda", torch.float32)
    want = decode_batch(batch, *IMAGENET_NORM, "cpu", torch.float32, _cpu_decode)
    assert got.is_cuda
    level = 1 / 255 / IMAGENET_STD.min().item()
    # nvjpeg's IDCT and chroma upsampling may differ from libjpeg-turbo's by a few levels
    assert (got.cpu() - want).abs().mean() < 2 * level
