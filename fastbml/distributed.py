"""What the method helpers need from torch.distributed: a group, summed statistics, one seed.

All of it is a no-op without an initialised process group (world size 1 costs nothing). The
per-step collective is one all_reduce of a small device tensor, enqueued without a host sync;
the one-time agreement checks (same seed, same modalities and shapes on every rank) run at a
helper's first step.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist

GROUP_AUTO = "auto"


def resolve_group(group: object = GROUP_AUTO) -> object | None:
    """The process group a helper synchronises over: None when running as a single process.

    `group="auto"` means the default group when torch.distributed is initialised; `None`
    disables synchronisation; anything else is used as the group.
    """
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if group == GROUP_AUTO else group
    return group if dist.get_world_size(group) > 1 else None


def all_reduce_sum_(tensor: torch.Tensor, group: object | None) -> torch.Tensor:
    """Sum `tensor` over the ranks of `group` in place (nothing when group is None)."""
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def _flat_by_dtype(tensors: list[torch.Tensor]):
    """(tensors, one flat copy of them) for each dtype among `tensors`: one collective each."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        yield same, torch.cat([t.reshape(-1) for t in same])


def _copy_back_(same: list[torch.Tensor], flat: torch.Tensor) -> None:
    torch._foreach_copy_(same, [part.view_as(t) for part, t in
                                zip(flat.split([t.numel() for t in same]), same)])


def broadcast_(tensors: list[torch.Tensor], group: object | None) -> None:
    """Overwrite `tensors` with the values of the group's first rank: one broadcast per dtype
    (nothing when group is None)."""
    if group is None:
        return
    source = dist.get_global_rank(group, 0)
    for same, flat in _flat_by_dtype(tensors):
        dist.broadcast(flat, src=source, group=group)
        _copy_back_(same, flat)


def all_reduce_mean_(tensors: list[torch.Tensor], group: object | None) -> None:
    """Average `tensors` over the ranks of `group` in place, as DDP averages gradients: one
    all_reduce per dtype (nothing when group is None)."""
    if group is None:
        return
    world = dist.get_world_size(group)
    for same, flat in _flat_by_dtype(tensors):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        _copy_back_(same, flat.div_(world))


def shared_seed(seed: int, group: object | None) -> int:
    """Rank 0's seed, on every rank: for a seed drawn at random (an explicit one is checked,
    never silently replaced)."""
    if group is None:
        return seed
    box = [seed]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def fingerprint(config: dict) -> str:
    """A short digest of a JSON-able configuration, compared across ranks."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_on_all_ranks(config: dict, group: object | None, what: str) -> None:
    """Raise ValueError on every rank if the ranks of `group` disagree on `config`."""
    if group is None:
        return
    mine = fingerprint(config)
    everyone: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, {"digest": mine, "config": config}, group=group)
    different = [rank for rank, other in enumerate(everyone) if other["digest"] != mine]
    if different:
        first = everyone[different[0]]["config"]
        keys = sorted(k for k in config if config.get(k) != first.get(k))
        raise ValueError(f"{what}: ranks disagree on {', '.join(keys) or 'the configuration'} "
                         f"(rank {dist.get_rank(group)} has {[config.get(k) for k in keys]}, "
                         f"group rank {different[0]} has {[first.get(k) for k in keys]}); every "
                         "rank must use the same modalities, parameters and seed")
