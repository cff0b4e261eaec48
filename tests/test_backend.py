"""Backend selection (fastbml.backend): the "auto" choice, FASTBML_BACKEND, and what happens when
a backend is missing (docs/design.md#backends)."""

import warnings

import pytest
import torch

from fastbml import backend

CPU = torch.device("cpu")
CUDA = torch.device("cuda")


@pytest.fixture
def no_cpp_build(monkeypatch):
    """fastbml as installed without a C++ compiler."""
    monkeypatch.setattr(backend, "cpp_module", lambda: None)
    backend._warn_fallback.cache_clear()
    yield
    backend._warn_fallback.cache_clear()


@pytest.fixture
def plain_env(monkeypatch):
    monkeypatch.delenv("FASTBML_BACKEND", raising=False)


@pytest.mark.skipif(backend.cpp_module() is None, reason="needs the C++ build")
def test_auto_is_cpp_on_cpu_when_the_build_is_there(plain_env):
    assert backend.resolve_backend("auto", CPU) == "cpp"


@pytest.mark.skipif(not backend.triton_available(), reason="needs the triton package")
def test_auto_is_triton_on_cuda(plain_env):
    assert backend.resolve_backend("auto", CUDA) == "triton"


def test_auto_on_other_devices_is_torch(plain_env):
    assert backend.resolve_backend("auto", torch.device("meta")) == "torch"


def test_auto_without_the_cpp_build_falls_back_to_torch_with_one_warning(plain_env, no_cpp_build):
    with pytest.warns(RuntimeWarning, match="fastbml._C, which was not built.*'torch' backend"):
        assert backend.resolve_backend("auto", CPU) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback is silent
        assert backend.resolve_backend("auto", CPU) == "torch"


def test_an_explicit_missing_backend_is_an_error_that_says_how_to_get_it(no_cpp_build):
    with pytest.raises(RuntimeError, match=r"install g\+\+ with OpenMP"):
        backend.resolve_backend("cpp", CPU)
    with pytest.raises(RuntimeError, match=r"fastbml\._C"):
        backend.require_cpp()


def test_cpp_refuses_cuda_tensors_and_triton_needs_the_interpreter_on_cpu(monkeypatch):
    with pytest.raises(RuntimeError, match="'cpp' runs CPU tensors only"):
        backend.resolve_backend("cpp", CUDA)
    if backend.triton_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            backend.resolve_backend("triton", CPU)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backend.resolve_backend("triton", CPU) == "triton"


def test_fastbml_backend_replaces_auto_only(monkeypatch):
    monkeypatch.setenv("FASTBML_BACKEND", "torch")
    assert backend.resolve_backend("auto", CPU) == "torch"
    if backend.cpp_module() is not None:
        assert backend.resolve_backend("cpp", CPU) == "cpp"  # an explicit name wins
    monkeypatch.setenv("FASTBML_BACKEND", "")
    assert backend.resolve_backend("auto", torch.device("meta")) == "torch"
    monkeypatch.setenv("FASTBML_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTBML_BACKEND must be one of"):
        backend.resolve_backend("auto", CPU)


@pytest.mark.parametrize("bad", ["CPP", "numpy", None, 1])
def test_bad_backend_names_are_refused(bad):
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.resolve_backend(bad, CPU)


def test_the_torch_backend_is_always_available(plain_env, no_cpp_build):
    assert backend.resolve_backend("torch", CPU) == "torch"
    assert backend.resolve_backend("torch", CUDA) == "torch"
