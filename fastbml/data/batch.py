"""From loader batches to model inputs: uint8 clips normalised on the training device, the
default number of loader workers, and per-sample augmentation seeds.

Frame modalities leave the loader as uint8 (a quarter of float32's bytes through collate,
shared memory, pinning and the host-to-device copy); `prepare_batch` moves a batch to the
device and turns each uint8 modality into normalised float in one fused kernel there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import Sampler

from .. import rng
from .base import DatasetInfo
from .encoded import EncodedBatch, decode_batch

MAX_DEFAULT_WORKERS = 16


def normalize_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(x / 255 - mean) / std per channel (dim 1) of a uint8 batch [B, C, ...], as `dtype`.

    `x * scale + shift` (scale = 1 / (255 std), shift = -mean / std, float32 arithmetic) on x's
    device: on CUDA one elementwise kernel reading uint8 and writing `dtype`; on the CPU, where
    mixed-dtype broadcasting is slow, a float32 conversion and two in-place passes.
    """
    if x.dtype != torch.uint8:
        raise ValueError(f"normalize_uint8 expects a uint8 tensor, got {x.dtype}")
    if x.dim() < 2 or x.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"normalize_uint8: a [B, C, ...] batch with C = {len(mean)} channels "
                         f"(one mean and std each) expected, got shape {tuple(x.shape)} and "
                         f"{len(mean)} means, {len(std)} stds")
    if not dtype.is_floating_point:
        raise ValueError(f"normalize_uint8: dtype must be a float dtype, got {dtype}")
    view = (1, len(mean)) + (1,) * (x.dim() - 2)
    std_t = torch.tensor(std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std_t)).view(view).to(x.device, non_blocking=True)
    shift = (-torch.tensor(mean, dtype=torch.float32) / std_t).view(view).to(
        x.device, non_blocking=True)
    if x.device.type == "cpu":
        return x.to(torch.float32).mul_(scale).add_(shift).to(dtype)
    return _fused_affine(x, scale, shift, dtype)


def _fused_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    """shift + x * scale in one TensorIterator kernel: x read as uint8, computed in float32,
    written as `dtype`."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    return torch.addcmul(shift, x, scale, out=out)


def prepare_batch(inputs: Mapping[str, torch.Tensor], info: DatasetInfo, device: torch.device,
                  dtype: torch.dtype | None = None,
                  modalities: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """A loader batch as model inputs on `device`: every modality moved there (non-blocking
    from pinned memory), uint8 ones normalised with `info.uint8_norm` into `dtype` (float32 when
    None; pass the autocast dtype under AMP), EncodedBatch ones (`gpu_decode`) decoded there.
    Float modalities are moved unchanged.

    Use it in a training loop of your own: `x = prepare_batch(batch, splits.info, "cuda")`.
    """
    device = torch.device(device)
    out = {}
    for m in (inputs if modalities is None else modalities):
        if m not in inputs:
            raise ValueError(f"prepare_batch: the batch has no modality {m!r} "
                             f"(it has {sorted(inputs)})")
        x = inputs[m]
        if isinstance(x, EncodedBatch):
            out[m] = decode_batch(x, *_norm(info, m), device, dtype or torch.float32)
            continue
        x = x.to(device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = normalize_uint8(x, *_norm(info, m), dtype=dtype or torch.float32)
        out[m] = x
    return out


def _norm(info: DatasetInfo, m: str):
    if m not in info.uint8_norm:
        raise ValueError(f"prepare_batch: modality {m!r} of dataset {info.name!r} is uint8 (or "
                         "encoded) but the dataset gives no normalisation for it "
                         "(DatasetInfo.uint8_norm)")
    return info.uint8_norm[m]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which also reflects cgroup-pinned
    containers and taskset), or os.cpu_count() where the mask is unavailable."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    """DataLoader workers per process when --workers is not given: the available cores shared
    among the node's ranks (LOCAL_WORLD_SIZE, set by torchrun), at most 16; 0 (load in the main
    process) when that leaves fewer than 2. A launcher that binds each rank to its own cores
    already divides them: pass --workers there."""
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    share = available_cores() // local_ranks
    return min(share, MAX_DEFAULT_WORKERS) if share >= 2 else 0


class SeededSampler(Sampler):
    """Yields (index, seed) pairs of `sampler`'s indices: the augmentation seed of a sample is a
    function of (`seed`, index) alone, so a FileDataset's random crops are the same whatever
    the worker count, worker persistence, world size or resume point. Set `seed` each epoch."""

    def __init__(self, sampler: Sampler | Sequence[int], seed: int = 0):
        self.sampler, self.seed = sampler, seed

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.sampler:
            yield i, rng.step_seed(self.seed, int(i))
