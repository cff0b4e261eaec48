"""Every dataset layout, on tiny fixture files written here in that exact layout."""

import io
import json
import pickle
import wave

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.bench_data import authors_clip
from fastbml.data import (
    DataError,
    SyntheticConfig,
    load_dataset,
    make_synthetic,
    normalize_uint8,
    prepare_batch,
)
from fastbml.data.base import carve_split
from fastbml.data.batch import _fused_affine
from fastbml.data.cremad import EMOTIONS
from fastbml.data.io import IMAGENET_STD, crop_box, decode_crop, pick_frames
from fastbml.train import Trainer, make_config

RNG = np.random.default_rng(0)


def _jpeg(path=None, size=(40, 30), mode="RGB"):
    channels = 3 if mode == "RGB" else 1
    pixels = RNG.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8).squeeze()
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, format="JPEG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _wav(path, seconds=0.25, rate=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = (RNG.standard_normal(int(seconds * rate)) * 3000).astype(np.int16)
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(rate)
        fh.writeframes(samples.tobytes())


def _cremad(root, *, npy=False, n_train=3, n_test=1, val=False):
    def clips(split, n):
        rows = []
        for e in EMOTIONS:
            for k in range(n):
                clip = f"10{len(rows):02d}_{split}_{e}_X{k}"
                rows.append(f"{clip},{e}")
                if npy:
                    (root / "audio_spec").mkdir(parents=True, exist_ok=True)
                    np.save(root / "audio_spec" / f"{clip}.npy",
                            RNG.standard_normal((16, 20 + k)).astype(np.float32))
                else:
                    _wav(root / "AudioWAV" / f"{clip}.wav")
                for f in range(3):
                    _jpeg(root / "Image-01-FPS" / clip / f"{f:05d}.jpg")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
        return rows
    clips("train", n_train)
    clips("test", n_test)
    if val:
        clips("val", 1)
    return root


def test_cremad_wav_layout(tmp_path):
    splits = load_dataset("cremad", _cremad(tmp_path), options={"frames": 2, "image_size": 32})
    assert splits.info.num_classes == 6 and splits.info.modalities == ("audio", "visual")
    assert len(splits.train) + len(splits.val) == 18 and len(splits.test) == 6
    assert len(splits.val) == 6            # 1 of 3 per class (fraction 0.111 rounds to >= 1)
    inputs, label = splits.val[0]
    assert inputs["audio"].shape == (1, 257, 188)   # OGM-GE's 3 s log-STFT
    assert inputs["visual"].shape == (3, 2, 32, 32)
    assert 0 <= label < 6
    assert splits.info.inputs["audio"].shape == (1, 257, 188)
    x1, _ = splits.test[0]
    x2, _ = splits.test[0]
    assert torch.equal(x1["visual"], x2["visual"])  # eval reads are deterministic


def test_cremad_npy_spectrograms_and_val_csv(tmp_path):
    splits = load_dataset("cremad", _cremad(tmp_path, npy=True, val=True),
                          options={"image_size": 24})
    assert len(splits.train) == 18 and len(splits.val) == 6
    shapes = {tuple(splits.train[i][0]["audio"].shape) for i in range(len(splits.train))}
    assert shapes == {(1, 16, 20)}          # time axis fitted to the first sample's length
    assert splits.train[0][0]["visual"].shape == (3, 1, 24, 24)


def test_cremad_errors_name_the_file(tmp_path):
    root = _cremad(tmp_path, n_train=2)
    clip = (root / "train.csv").read_text().split("\n")[1].split(",")[0]
    splits = load_dataset("cremad", root, options={"image_size": 16})
    (root / "AudioWAV" / f"{clip}.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(DataError, match=f"{clip}.wav"):
        splits.train.readers["audio"](clip, True)
    for f in (root / "Image-01-FPS" / clip).iterdir():
        f.write_bytes(b"\x00garbage")
    with pytest.raises(DataError, match="unreadable image .*" + clip):
        splits.train.readers["visual"](clip, False)
    (root / "test.csv").unlink()
    with pytest.raises(DataError, match=r"test\.csv"):
        load_dataset("cremad", root)
    (root / "test.csv").write_text("clip_a,JOY\n")
    with pytest.raises(DataError, match=r"test\.csv line 1"):
        load_dataset("cremad", root)
    with pytest.raises(ValueError, match="unknown CREMA-D options"):
        load_dataset("cremad", root, options={"fps": 2})


def _annotations(root, subsets):
    classes = ["bowling", "singing", "tickling"]
    database = {}
    for subset, n in subsets.items():
        for i in range(n):
            database[f"vid_{subset}_{i}"] = {"subset": subset, "label": classes[i % 3]}
    (root / "annotations.json").write_text(json.dumps({"labels": classes, "database": database}))
    return database


def _kinetics(root, frames_layout, subsets):
    database = _annotations(root, subsets)
    (root / "audio").mkdir(parents=True)
    (root / "hdf5").mkdir()
    for k, vid in enumerate(database):
        with open(root / "audio" / f"{vid}.pkl", "wb") as fh:
            pickle.dump(RNG.standard_normal((12, 18 + k % 3)).astype(np.float32), fh)
        if frames_layout == "hdf5":
            with h5py.File(root / "hdf5" / f"{vid}.hdf5", "w") as fh:
                ds = fh.create_dataset("video", (5,), dtype=h5py.vlen_dtype(np.uint8))
                for i in range(5):
                    ds[i] = np.frombuffer(_jpeg(), dtype=np.uint8)
        else:
            for i in range(5):
                _jpeg(root / "frames" / vid / f"img_{i:05d}.jpg")
    return database


@pytest.mark.parametrize("variant", ["hdf5", "frames"])
def test_kinetics_layouts(tmp_path, variant):
    _kinetics(tmp_path, variant, {"training": 9, "validation": 3})
    name = "kinetics-sounds" if variant == "hdf5" else "kinetics-sounds-frames"
    splits = load_dataset(name, tmp_path, options={"image_size": 16})
    assert splits.info.num_classes == 3
    assert len(splits.test) == 3                        # "validation" is the test split
    assert len(splits.train) + len(splits.val) == 9
    inputs, _ = splits.train[0]
    assert inputs["visual"].shape == (3, 3, 16, 16)     # first, middle, last frame
    assert inputs["audio"].shape == (1, 12, 18)


def test_kinetics400_with_testing_subset_and_errors(tmp_path):
    database = _kinetics(tmp_path, "hdf5", {"training": 6, "validation": 3, "testing": 3})
    splits = load_dataset("kinetics400", tmp_path, options={"image_size": 16, "frames": 2})
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 3)
    vid = next(iter(database))
    (tmp_path / "hdf5" / f"{vid}.hdf5").unlink()
    with pytest.raises(DataError, match=f"missing HDF5 video: .*{vid}.hdf5"):
        splits.train.readers["visual"](vid, False)
    (tmp_path / "audio" / f"{vid}.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match=f"unreadable spectrogram .*{vid}.pkl"):
        splits.train.readers["audio"](vid, False)
    (tmp_path / "annotations.json").write_text("{not json")
    with pytest.raises(DataError, match="malformed annotation file"):
        load_dataset("kinetics400", tmp_path)


def _ucf(root):
    classes = ["ApplyEyeMakeup", "Archery"]
    (root / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
    train, test = [], []
    for c, name in enumerate(classes):
        for g in range(4):
            video = f"v_{name}_g{g:02d}_c01"
            (train if g < 3 else test).append(f"{name}/{video}.avi" + (f" {c + 1}" if g < 3 else ""))
            for i in range(1, 5):
                _jpeg(root / "rgb" / video / f"img_{i:05d}.jpg")
                _jpeg(root / "flow" / video / f"flow_x_{i:05d}.jpg", mode="L")
                _jpeg(root / "flow" / video / f"flow_y_{i:05d}.jpg", mode="L")
    (root / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (root / "testlist01.txt").write_text("\n".join(test) + "\n")


def test_ucf101_layout_and_errors(tmp_path):
    _ucf(tmp_path)
    splits = load_dataset("ucf101", tmp_path, options={"image_size": 16})
    assert splits.info.modalities == ("rgb", "flow")
    assert len(splits.train) + len(splits.val) == 6 and len(splits.test) == 2
    inputs, label = splits.test[1]
    assert label == 1
    assert inputs["rgb"].shape == (3, 3, 16, 16) and inputs["flow"].shape == (2, 3, 16, 16)
    assert inputs["rgb"].dtype == inputs["flow"].dtype == torch.uint8
    flow = prepare_batch({"flow": inputs["flow"][None]}, splits.info, "cpu")["flow"]
    assert flow.dtype == torch.float32 and flow.min() >= -1 and flow.max() <= 1
    torch.testing.assert_close(flow[0], inputs["flow"].float() / 255 * 2 - 1)
    (tmp_path / "flow" / "v_Archery_g03_c01" / "flow_y_00004.jpg").unlink()
    with pytest.raises(DataError, match=r"flow_y_00004\.jpg"):
        splits.test[1]
    with pytest.raises(ValueError, match="split must be"):
        load_dataset("ucf101", tmp_path, options={"split": 4})


def _mosi(path, n=(8, 4, 4), length=5, dims=(300, 74, 35)):
    data = {}
    for split, count in zip(("train", "valid", "test"), n):
        data[split] = {m: RNG.standard_normal((count, length, d)).astype(np.float32)
                       for m, d in zip(("text", "audio", "vision"), dims)}
        data[split]["labels"] = RNG.uniform(-3, 3, (count, 1, 1)).astype(np.float32)
    data["train"]["audio"][0, 0, 0] = -np.inf       # as in MOSEI's COVAREP features
    with open(path, "wb") as fh:
        pickle.dump(data, fh)
    return data


def test_mosi_mosei_layouts(tmp_path):
    data = _mosi(tmp_path / "mosi_data.pkl")
    splits = load_dataset("mosi", tmp_path)
    assert splits.info.modalities == ("text", "audio", "vision")
    assert splits.info.inputs["vision"].shape == (5, 35)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 4, 4)
    inputs, label = splits.train[0]
    assert torch.isfinite(inputs["audio"]).all()
    assert label == int(data["train"]["labels"][0, 0, 0] >= 0)
    seven = load_dataset("mosi", tmp_path, options={"labels": "7class"})
    assert seven.info.num_classes == 7
    assert seven.test[0][1] == int(np.round(data["test"]["labels"][0, 0, 0])) + 3
    _mosi(tmp_path / "mosei_senti_data.pkl")
    assert len(load_dataset("mosei", tmp_path).test) == 4
    (tmp_path / "mosi_data.pkl").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"mosi_data\.pkl"):
        load_dataset("mosi", tmp_path)


def test_training_on_fixture_datasets(tmp_path):
    """The real-layout datasets feed the ResNet-18 / transformer models through the Trainer."""
    _mosi(tmp_path / "mosi_data.pkl")
    cfg = make_config(dataset="mosi", data_root=str(tmp_path), method="ogm-ge", epochs=1,
                      batch_size=4, feature_dim=16, progress=False, tensorboard=False,
                      plots=False, out=str(tmp_path / "run_mosi"), threads=1)
    summary = Trainer(cfg).fit()
    assert set(summary["test"]) >= {"acc_text", "acc_audio", "acc_vision"}
    root = tmp_path / "cremad"
    _cremad(root, npy=True, n_train=2)
    cfg = make_config(dataset="cremad", data_root=str(root), method="opm+ogm-ge", epochs=1,
                      batch_size=6, dataset_options={"image_size": 32}, progress=False,
                      tensorboard=False, plots=False, out=str(tmp_path / "run_cremad"),
                      threads=1, workers=1)
    assert 0 <= Trainer(cfg).fit()["test"]["acc"] <= 1


def test_synthetic_is_seeded_and_shaped():
    cfg = SyntheticConfig(n_train=50, n_val=20, n_test=30)
    a, b = make_synthetic(3, cfg), make_synthetic(3, cfg)
    assert torch.equal(a.train.inputs["visual"], b.train.inputs["visual"])
    assert not torch.equal(a.train.inputs["audio"], make_synthetic(4, cfg).train.inputs["audio"])
    av = make_synthetic(3, SyntheticConfig(n_train=50, n_val=20, n_test=30, layout="av"))
    inputs, _ = av.train[0]
    assert inputs["audio"].shape == (1, 32, 32) and inputs["visual"].shape == (3, 2, 16, 16)
    assert av.info.inputs["visual"].kind == "frames"
    torch.testing.assert_close(av.train.labels, a.train.labels)
    with pytest.raises(ValueError, match="layout"):
        SyntheticConfig(layout="image")
    with pytest.raises(ValueError, match="n_train"):
        SyntheticConfig(n_train=0)


def test_carve_split_is_stratified_and_disjoint():
    labels = [0] * 10 + [1] * 20 + [2]
    kept, held = carve_split(labels, 0.2, seed=1)
    assert sorted(kept + held) == list(range(31)) and not set(kept) & set(held)
    assert sum(labels[i] == 0 for i in held) == 2 and sum(labels[i] == 1 for i in held) == 4
    assert 30 in kept                                   # a singleton class stays in train
    assert carve_split(labels, 0.2, seed=1) == (kept, held)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="needs a data root"):
        load_dataset("cremad")
    with pytest.raises(DataError, match="not a directory"):
        load_dataset("ucf101", tmp_path / "nowhere")


def _smooth_jpeg(size=(340, 256), seed=0):
    """A JPEG of a smooth picture with texture (so DCT-scaled decoding is meaningful)."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    pixels = np.stack([(np.sin(x / (11 + 5 * c)) + np.cos(y / (17 - 3 * c))) * 60 + 128
                       for c in range(3)], -1) + g.normal(0, 8, (size[1], size[0], 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG",
                                                                      quality=92)
    return buf.getvalue()




def hdf5_videos(root, n_train=6):
    """A Kinetics-Sounds HDF5 layout of smooth 5-frame JPEG clips; returns the database."""
    database = _annotations(root, {"training": n_train, "validation": 3})
    (root / "audio").mkdir()
    (root / "hdf5").mkdir()
    frames = [_smooth_jpeg(seed=i) for i in range(5)]
    for vid in database:
        np.save(root / "audio" / f"{vid}.npy", np.zeros((8, 10), np.float32))
        with h5py.File(root / "hdf5" / f"{vid}.hdf5", "w") as fh:
            ds = fh.create_dataset("video", (5,), dtype=h5py.vlen_dtype(np.uint8))
            for i, f in enumerate(frames):
                ds[i] = np.frombuffer(f, dtype=np.uint8)
    return database


@pytest.mark.parametrize("decoder", ["simplejpeg", "pillow"])
@pytest.mark.parametrize("train", [True, False])
def test_uint8_clip_matches_the_float_path(tmp_path, decoder, train):
    """Same crop parameters as the float path; the values differ by at most one uint8 level
    (torch's and Pillow's bilinear kernels round differently), on average far less."""
    hdf5_videos(tmp_path)
    frames = [_smooth_jpeg(seed=i) for i in range(5)]  # what hdf5_videos wrote
    splits = load_dataset("kinetics-sounds", tmp_path,
                          options={"image_size": 112, "dct_scaling": False, "decoder": decoder})
    read = splits.train.readers["visual"]
    level = 1 / 255 / IMAGENET_STD.min().item()
    for k in range(4):
        torch.manual_seed(k)
        clip = read("vid_training_0", train)
        assert clip.dtype == torch.uint8 and clip.shape == (3, 3, 112, 112)
        torch.manual_seed(k)
        box = (42, 0, 256, 256, False)                  # T-PAMI's eval: short side, centre
        if train:
            seed = int(torch.randint(0, 2 ** 62, ()))
            box = crop_box(340, 256, (0.25, 1.0), torch.Generator().manual_seed(seed))
        expected = authors_clip([frames[0], frames[2], frames[4]], 112, box)
        got = prepare_batch({"visual": clip[None]}, splits.info, "cpu")["visual"][0]
        diff = (got - expected).abs()
        assert diff.max() <= level + 1e-5 and diff.mean() < 0.2 * level
    # DCT-scaled decoding (the default) changes the pixels only slightly
    scaled = load_dataset("kinetics-sounds", tmp_path, options={"image_size": 112})
    clip = scaled.test.readers["visual"]("vid_validation_0", False)
    expected = authors_clip([frames[0], frames[2], frames[4]], 112, (42, 0, 256, 256, False))
    got = prepare_batch({"visual": clip[None]}, scaled.info, "cpu")["visual"][0]
    assert (got - expected).abs().mean() < 4 * level


@pytest.mark.parametrize("decoder", ["simplejpeg", "pillow"])
def test_dct_scaled_decode_never_goes_below_the_crop_resolution(decoder):
    data = _smooth_jpeg((680, 512))
    full = decode_crop(data, "x.jpg", None, 112, dct_scaling=False, decoder=decoder)
    assert full.shape == (512, 680, 3)
    small = decode_crop(data, "x.jpg", None, 112, decoder=decoder)
    assert small.shape == (128, 170, 3)                 # 1/4: the largest keeping >= 112
    region = decode_crop(data, "x.jpg", (100, 50, 300, 240), 112, decoder=decoder)
    assert min(region.shape[:2]) >= 112 and region.shape[1] < 300   # 1/2 of 300 x 240
    assert decode_crop(data, "x.jpg", (100, 50, 300, 240), 224, decoder=decoder).shape == (
        240, 300, 3)                                    # no reduction keeps 224
    with pytest.raises(DataError, match=r"unreadable image broken\.jpg"):
        decode_crop(data[:200], "broken.jpg", None, 112, decoder=decoder)
    with pytest.raises(ValueError, match="decoder must be one of"):
        decode_crop(data, "x.jpg", None, 112, decoder="nvjpeg")


def test_normalize_uint8_is_the_float_normalisation():
    x = torch.randint(0, 256, (4, 3, 2, 8, 8), dtype=torch.uint8)
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1, 1)) / torch.tensor(
        std).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(normalize_uint8(x, mean, std), expected)
    bf16 = normalize_uint8(x, mean, std, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), expected, atol=0.02, rtol=0.01)
    scale = (1 / (255 * torch.tensor(std))).view(1, 3, 1, 1, 1)
    shift = (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1, 1)
    for dtype in (torch.float32, torch.bfloat16):   # the one-kernel form CUDA runs
        torch.testing.assert_close(_fused_affine(x, scale, shift, dtype),
                                   normalize_uint8(x, mean, std, dtype))
    with pytest.raises(ValueError, match="uint8"):
        normalize_uint8(x.float(), mean, std)
    with pytest.raises(ValueError, match="3 channels"):
        normalize_uint8(x[:, :2], mean, std)


def test_prepare_batch_moves_floats_unchanged_and_needs_a_norm():
    av = make_synthetic(0, SyntheticConfig(n_train=8, n_val=4, n_test=4, layout="av"))
    batch, _ = av.train[[0, 1, 2]]
    out = prepare_batch(batch, av.info, "cpu")
    assert all(torch.equal(out[m], batch[m]) for m in batch)
    with pytest.raises(ValueError, match=r"'visual' of dataset .* is uint8"):
        prepare_batch({"visual": torch.zeros(2, 3, 1, 4, 4, dtype=torch.uint8)}, av.info, "cpu")


def test_seeded_reads_are_reproducible(tmp_path):
    _kinetics(tmp_path, "hdf5", {"training": 6, "validation": 3})
    train = load_dataset("kinetics-sounds", tmp_path, options={"image_size": 16}).train
    state = torch.get_rng_state()
    a, _ = train[(0, 123)]
    assert torch.equal(torch.get_rng_state(), state)    # a seeded read leaves torch's RNG alone
    b, _ = train[(0, 123)]
    c, _ = train[(0, 124)]
    assert torch.equal(a["visual"], b["visual"]) and not torch.equal(a["visual"], c["visual"])


@pytest.mark.gpu
def test_normalize_uint8_on_cuda_matches_the_cpu():
    x = torch.randint(0, 256, (8, 3, 3, 32, 32), dtype=torch.uint8)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        on_gpu = normalize_uint8(x.cuda(), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), dtype)
        assert on_gpu.dtype == dtype and on_gpu.is_cuda
        torch.testing.assert_close(on_gpu.cpu(), normalize_uint8(
            x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), dtype))


def test_pick_frames_rounds_down_like_tpami():
    assert pick_frames(10, 3) == [0, 4, 9] and pick_frames(12, 3) == [0, 5, 11]   # int((n-1)/2)
    assert pick_frames(2, 3) == [0, 0, 1] and pick_frames(7, 1) == [0]
    with pytest.raises(ValueError, match="no frames"):
        pick_frames(0, 3)
