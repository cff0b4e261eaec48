"""The RNG contract (docs/design.md#rng): Philox4x32-10, identical draws on every backend and blocking."""

import os
import subprocess
import sys

import pytest
import torch
from utils import DEVICE, FAST_BACKENDS

from fastbml import rng
from fastbml.ops.scale_noise import multi_tensor_scale_noise_

# Known-answer vectors of Philox4x32-10 published with Random123 (Salmon et al., SC'11):
# counter words, key words, expected output words.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    words = rng.philox4x32(*(torch.tensor([c]) for c in counter), *key)
    assert words[0].tolist() == list(expected)


def test_uniforms_are_open_and_normals_standard():
    u = rng.philox_uniform(7, 0, 200_000)
    assert u.min().item() > 0.0 and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005
    z = rng.philox_normal(7, 0, 200_000)
    assert abs(z.mean().item()) < 0.01  # 4.5 standard errors
    assert abs(z.std().item() - 1.0) < 0.01
    assert torch.isfinite(z).all()


def test_streams_and_seeds_differ_and_offsets_index_one_sequence():
    z = rng.philox_normal(11, 0, 1024)
    assert not torch.equal(z, rng.philox_normal(12, 0, 1024))
    assert not torch.equal(z, rng.philox_normal(11, 1, 1024))
    torch.testing.assert_close(rng.philox_normal(11, 0, 512, offset=512), z[512:], rtol=0, atol=0)


def test_step_seeds_are_deterministic_distinct_and_valid():
    seeds = [rng.step_seed(123, step) for step in range(1000)]
    assert seeds == [rng.step_seed(123, step) for step in range(1000)]
    assert len(set(seeds)) == 1000
    assert all(0 <= s < 2**63 for s in seeds)
    assert rng.step_seed(124, 0) != seeds[0]


@pytest.mark.parametrize("bad", [-1, 2**63, 1.5, "3", True])
def test_bad_seed_is_rejected(bad):
    with pytest.raises((TypeError, ValueError), match="seed"):
        rng.check_seed(bad)


def _noise_only(backend, numels, seed, dtype=torch.float32):
    """The op with scale 0 on unit-variance tensors: returns sigma * N(0,1) draws."""
    tensors = [torch.randn(n, device=DEVICE, dtype=dtype) for n in numels]
    multi_tensor_scale_noise_(tensors, [0] * len(numels), torch.zeros(1, device=DEVICE),
                              noise=True, seed=seed, backend=backend)
    return tensors


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_fast_backends_draw_the_torch_definition(backend):
    numels = [5, 4099, 1, 40000]
    torch.manual_seed(0)
    expected = _noise_only("torch", numels, seed=2**62 + 5)
    torch.manual_seed(0)
    actual = _noise_only(backend, numels, seed=2**62 + 5)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="compares the two CPU-runnable fast backends")
def test_cpp_and_triton_give_the_same_noise():
    torch.manual_seed(1)
    cpp = _noise_only("cpp", [3, 70001], seed=99)
    torch.manual_seed(1)
    tri = _noise_only("triton", [3, 70001], seed=99)
    for a, b in zip(cpp, tri):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_triton_block_size_does_not_change_the_draws():
    from fastbml.kernels.scale_noise import multi_tensor_scale_noise_ as launch

    results = []
    for block in (4096, 8192, 32768):
        torch.manual_seed(3)
        tensors = [torch.randn(n, device=DEVICE) for n in (9000, 13)]
        launch(tensors, [0, 9000], [0, 0], torch.full((1,), 0.5, device=DEVICE), noise=True,
               seed=torch.tensor(5, device=DEVICE), stream=0, eps=1e-8, block=block)
        results.append(torch.cat(tensors))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0], results[2], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="OpenMP thread count of the cpp backend")
def test_cpp_draws_do_not_depend_on_thread_count():
    script = (
        "import torch, sys\n"
        "from fastbml.ops.scale_noise import multi_tensor_scale_noise_\n"
        "torch.manual_seed(0)\n"
        "t = [torch.randn(300_000), torch.randn(77)]\n"
        "multi_tensor_scale_noise_(t, [0, 1], torch.tensor([0.3, 1.0]), noise=True, seed=8,"
        " backend='cpp')\n"
        "torch.save(t, sys.argv[1])\n"
    )
    outputs = []
    for threads in ("1", "2"):
        path = f"{os.environ.get('TMPDIR', '/tmp')}/fastbml_threads_{threads}_{os.getpid()}.pt"
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        subprocess.run([sys.executable, "-c", script, path], check=True, env=env)
        outputs.append(torch.load(path))
        os.remove(path)
    for a, b in zip(*outputs):
        assert torch.equal(a, b)
