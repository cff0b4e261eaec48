"""Bad dataset files and options give a clear error naming the file or the argument."""

import numpy as np
import pytest
import torch
from test_datasets import _cremad, _kinetics, _mosi, _ucf
from torch import nn

import fastbml
from fastbml import cli
from fastbml.data import DataError, load_dataset
from fastbml.train import make_config


def test_empty_cremad_train_csv(tmp_path):
    _cremad(tmp_path)
    (tmp_path / "train.csv").write_text("")
    with pytest.raises(DataError, match=r"train\.csv lists no clips"):
        load_dataset("cremad", tmp_path)


@pytest.mark.parametrize("value", [0, -1, "x", 1.5])
def test_frames_and_image_size_must_be_positive_ints(tmp_path, value):
    _kinetics(tmp_path, "hdf5", {"training": 3, "validation": 3})
    for key in ("frames", "image_size"):
        with pytest.raises(ValueError, match=f"dataset option {key} must be a positive int"):
            load_dataset("kinetics-sounds", tmp_path, options={key: value})


def test_spectrogram_with_the_wrong_bins_names_the_file(tmp_path):
    database = _kinetics(tmp_path, "hdf5", {"training": 9, "validation": 3})
    splits = load_dataset("kinetics-sounds", tmp_path, options={"image_size": 16})
    vid = next(iter(database))
    np.save(tmp_path / "audio" / f"{vid}.npy", np.zeros((7, 18), dtype=np.float32))
    (tmp_path / "audio" / f"{vid}.pkl").unlink()
    reader = splits.train.readers["audio"]
    reader.shape = (12, 18)
    with pytest.raises(DataError, match=rf"{vid}\.npy: spectrogram has 7 frequency bins"):
        reader(vid, False)


def test_empty_class_index(tmp_path):
    _ucf(tmp_path)
    (tmp_path / "classInd.txt").write_text("")
    with pytest.raises(DataError, match=r"classInd\.txt lists no classes"):
        load_dataset("ucf101", tmp_path)


def test_mosi_nan_labels(tmp_path):
    data = _mosi(tmp_path / "mosi_data.pkl")
    data["valid"]["labels"][2, 0, 0] = np.nan
    import pickle

    (tmp_path / "mosi_data.pkl").write_bytes(pickle.dumps(data))
    with pytest.raises(DataError, match=r"mosi_data\.pkl valid: 1 non-finite sentiment labels"):
        load_dataset("mosi", tmp_path)


def test_unknown_synthetic_option():
    with pytest.raises(ValueError, match=r"unknown synthetic dataset options \['n_trian'\]"):
        load_dataset("synthetic", options={"n_trian": 3})


@pytest.mark.parametrize(("flag", "value", "match"), [("--threads", "0", "threads"),
                                                      ("--dr-clusters", "0", "dr_clusters")])
def test_cli_counts_must_be_positive(tmp_path, capsys, flag, value, match):
    assert cli.main(["train", flag, value, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert f"{match} must be None or a positive int" in capsys.readouterr().err
    with pytest.raises(ValueError, match=match):
        make_config(**{match: 0})


def test_a_module_in_two_modality_groups():
    shared = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"groups\['audio'\] and groups\['visual'\] share"):
        fastbml.DiagnoseRelearn({"audio": shared, "visual": shared})


def test_diagnose_relearn_with_empty_labels():
    dr = fastbml.DiagnoseRelearn({"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)})
    full = ({"audio": torch.randn(8, 2), "visual": torch.randn(8, 2)}, torch.arange(8) % 2)
    empty = ({"audio": torch.zeros(0, 2), "visual": torch.zeros(0, 2)},
             torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="held_out gave no labels"):
        dr.diagnose(full, empty)


def test_cluster_purity_needs_feature_columns():
    with pytest.raises(ValueError, match="D >= 1"):
        fastbml.cluster_purity(torch.zeros(10, 0), torch.zeros(10, dtype=torch.long), 2)
