"""Hyper-parameters are finite numbers (numpy scalars accepted) in the API and the CLI."""

import numpy as np
import pytest
import torch
from torch import nn

import fastbml
from fastbml import cli
from fastbml.train import make_config

NAN, INF = float("nan"), float("inf")


def _ogm(alpha):
    return fastbml.OGM({"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}, alpha=alpha, seed=0)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_api_refuses_non_finite_hyper_parameters(bad):
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        _ogm(bad)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        fastbml.ogm_coefficients(torch.tensor([2.0, 1.0]), bad)
    for kwargs, name in (({"q_base": bad}, "q_base"), ({"lam": bad}, "lam"),
                         ({"p_exe": bad}, "p_exe")):
        with pytest.raises(ValueError, match=name):
            fastbml.OPM(["audio", "visual"], seed=0, **kwargs)
    with pytest.raises(ValueError, match="lam must be a finite number"):
        fastbml.relearn_strength(0.5, 0.4, bad)
    with pytest.raises(ValueError, match="lam must be a finite number"):
        fastbml.DiagnoseRelearn({"audio": nn.Linear(2, 2), "visual": nn.Linear(2, 2)}, lam=bad)
    with pytest.raises(ValueError, match="purity_train"):
        fastbml.relearn_strength(NAN, 0.4)
    p = torch.ones(3)
    with pytest.raises(ValueError, match="strength"):
        fastbml.soft_reinit_([p], [torch.zeros(3)], bad, backend="torch")
    with pytest.raises(ValueError, match="p_exe"):
        fastbml.opm_drop([torch.ones(2, 3), torch.ones(2, 3)], [0.5, 0.0], p_exe=bad, seed=0)
    with pytest.raises(ValueError, match=r"q\[0\]"):
        fastbml.opm_drop([torch.ones(2, 3), torch.ones(2, 3)], [bad, 0.0], seed=0)


@pytest.mark.parametrize("kind", [np.float32, np.float64, np.int64])
def test_numpy_scalars_are_accepted(kind):
    k = fastbml.ogm_coefficients(torch.tensor([2.0, 1.0]), kind(1))
    torch.testing.assert_close(k, fastbml.ogm_coefficients(torch.tensor([2.0, 1.0]), 1.0))
    assert _ogm(kind(1)).alpha == 1.0
    opm = fastbml.OPM(["audio", "visual"], q_base=kind(0), lam=kind(1), p_exe=kind(1), seed=0)
    assert (opm.q_base, opm.lam, opm.p_exe) == (0.0, 1.0, 1.0)
    assert fastbml.relearn_strength(kind(1), kind(0), kind(1)) == pytest.approx(np.tanh(1.0))
    p = torch.ones(3)
    fastbml.soft_reinit_([p], [torch.zeros(3)], kind(1), backend="torch")
    assert torch.equal(p, torch.zeros(3))


def test_bool_is_not_a_number():
    with pytest.raises(TypeError, match="alpha"):
        fastbml.ogm_coefficients(torch.tensor([2.0, 1.0]), np.bool_(True))


@pytest.mark.parametrize("name", ["lr", "momentum", "weight_decay", "gamma", "alpha", "q_base",
                                  "opm_lambda", "p_exe", "dr_lambda"])
def test_config_refuses_non_finite_floats(name):
    for bad in (NAN, INF):
        with pytest.raises(ValueError, match=f"{name} must be a finite number"):
            make_config(**{name: bad})
    assert getattr(make_config(**{name: np.float32(0.5)}), name) == 0.5


@pytest.mark.parametrize(("flag", "value"), [("--alpha", "nan"), ("--lr", "inf"),
                                             ("--q-base", "nan"), ("--dr-lambda", "inf")])
def test_cli_refuses_non_finite_flags(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    assert cli.main(["train", flag, value, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert flag[2:].replace("-", "_") in err and "finite" in err
    assert not out.exists()
