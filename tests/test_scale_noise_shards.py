"""The pieces sharded OGM-GE is built from (docs/design.md#fsdp2): scale_noise_ on
shards with stream offsets that start inside a Philox block and stds supplied by the caller,
and the moments op whose rows add up over shards. Every backend against the torch reference."""

import pytest
import torch
from utils import ALL_BACKENDS, DEVICE, FAST_BACKENDS, FLOAT_DTYPES, assert_close, randn

from fastbml import rng
from fastbml.ops._multi_tensor import stream_offsets
from fastbml.ops.scale_noise import multi_tensor_moments, multi_tensor_scale_noise_, std_of_moments

# (shape, ranks): dim 0 split as torch.chunk splits it (uneven; some shards start mid-block,
# one of (1, 6) over 3 ranks is empty)
SHARDED = [((7, 3), 2), ((5, 3), 2), ((1, 6), 3), ((9,), 4), ((4099,), 3), ((6, 5, 3), 4)]


def shards_of(x: torch.Tensor, ranks: int) -> list[tuple[torch.Tensor, int]]:
    """x's dim-0 shards (as torch.chunk makes them, padded with empty ones) and each shard's
    first flattened index."""
    rows = -(-x.shape[0] // ranks)
    row = x[0].numel() if x.dim() > 1 else 1
    return [(x[r * rows:(r + 1) * rows].clone(), min(r * rows, x.shape[0]) * row)
            for r in range(ranks)]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_shards_with_offsets_and_the_whole_std_equal_the_whole_tensor(backend, dtype):
    wholes = [randn(*shape, dtype=dtype, scale=0.7, shift=0.05) for shape, _ in SHARDED]
    scales = torch.tensor([0.4, 1.0], device=DEVICE)
    groups = [i % 2 for i in range(len(wholes))]
    expected = [w.clone() for w in wholes]
    multi_tensor_scale_noise_(expected, groups, scales, noise=True, seed=99, backend="torch")
    stds = torch.stack([w.double().std() if w.numel() > 1 else w.new_zeros((), dtype=torch.float64)
                        for w in wholes])
    for r in range(max(ranks for _, ranks in SHARDED)):
        pieces, shards, std, index = [], [], [], []
        for t, (w, (_, ranks)) in enumerate(zip(wholes, SHARDED)):
            piece, first = shards_of(w, ranks)[r] if r < ranks else (w[:0], 0)  # none: empty
            pieces.append(piece)
            shards.append((w.numel(), first))
            std.append(stds[t])
            index.append(groups[t])
        multi_tensor_scale_noise_(pieces, index, scales, noise=True, seed=99, shards=shards,
                                  std=torch.stack(std), backend=backend)
        for t, piece in enumerate(pieces):
            if r >= SHARDED[t][1]:
                continue
            want = shards_of(expected[t], SHARDED[t][1])[r][0]
            assert piece.shape == want.shape
            assert_close(piece, want, scale=2.0)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_unaligned_offsets_draw_the_normals_of_their_indices(backend):
    """x = 0 and scale 0 leave sigma * z: z must be the reference normal of offset + i."""
    sizes, shards = [5, 37, 1, 20000], [(8, 1), (50, 6), (13, 11), (90001, 70003)]
    offsets = [start + first for start, (_, first) in
               zip(stream_offsets([whole for whole, _ in shards]), shards)]
    assert [o % 4 for o in offsets] == [1, 2, 3, 3]
    tensors = [torch.zeros(n, device=DEVICE) for n in sizes]
    std = torch.ones(len(sizes), dtype=torch.float64, device=DEVICE)
    multi_tensor_scale_noise_(tensors, [0] * 4, torch.zeros(1, device=DEVICE), noise=True,
                              seed=3, shards=shards, std=std, eps=0.0, backend=backend)
    for x, n, o in zip(tensors, sizes, offsets):
        z = rng.philox_normal(3, rng.STREAM_NOISE, n, offset=o, device=DEVICE)
        torch.testing.assert_close(x, z, rtol=2e-6, atol=2e-6)
        # the same indices drawn as part of a longer range from 0
        torch.testing.assert_close(z, rng.philox_normal(3, rng.STREAM_NOISE, o + n,
                                                        device=DEVICE)[o:], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_supplied_std_replaces_the_tensors_own(backend):
    x = randn(40, 3)
    y = x.clone()
    multi_tensor_scale_noise_([x], [0], torch.ones(1, device=DEVICE), noise=True, seed=8,
                              std=torch.tensor([2.5], device=DEVICE), backend=backend)
    z = rng.philox_normal(8, rng.STREAM_NOISE, 120, device=DEVICE).view(40, 3)
    torch.testing.assert_close(x, y + (2.5 + 1e-8) * z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_moments_match_float64_and_add_up_over_shards(backend, dtype):
    wholes = [randn(*shape, dtype=dtype, scale=1.3, shift=0.2) for shape, _ in SHARDED]
    wholes.append(randn(12, 7, dtype=dtype, noncontiguous=True))
    got = multi_tensor_moments(wholes, backend=backend)
    assert got.dtype == torch.float64 and got.shape == (len(wholes), 3)
    for row, w in zip(got, wholes):
        v = w.double().reshape(-1)
        want = torch.stack([torch.tensor(float(v.numel()), dtype=torch.float64), v.sum(),
                            (v * v).sum()])
        torch.testing.assert_close(row.cpu(), want.cpu(), rtol=1e-10, atol=1e-10)
    for t, (w, (_, ranks)) in enumerate(zip(wholes, SHARDED)):
        parts = multi_tensor_moments([s for s, _ in shards_of(w, ranks)], backend=backend)
        torch.testing.assert_close(parts.sum(0), got[t], rtol=1e-10, atol=1e-10)
        if w.numel() > 1:
            torch.testing.assert_close(std_of_moments(parts.sum(0, keepdim=True))[0],
                                       w.double().std(), rtol=1e-9, atol=1e-12)


def test_std_of_moments_of_empty_one_element_and_non_finite_tensors():
    rows = multi_tensor_moments([torch.empty(0, device=DEVICE), torch.ones(1, device=DEVICE),
                                 torch.tensor([1.0, float("inf")], device=DEVICE)],
                                backend="torch")
    std = std_of_moments(rows)
    assert std[0] == 0 and std[1] == 0 and not torch.isfinite(std[2])
