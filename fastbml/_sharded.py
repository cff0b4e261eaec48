"""DTensor parameters and gradients as the kernels see them (docs/design.md#fsdp2).

A kernel is handed the local tensor of a DTensor, never the DTensor: this module says what that
local tensor is (where its first element lies in the whole tensor's flattened order, which
process group holds the other shards) and refuses the layouts the methods do not support.
Nothing here communicates, gathers or allocates a whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

try:
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # torch built without distributed support
    DTensor = Shard = compute_local_shape_and_global_offset = None


def is_dtensor(tensor: object) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


@dataclass(frozen=True)
class Dim0Shard:
    """`local`: this rank's part of a DTensor sharded on dim 0 (or all of a replicated one);
    `first`: the flattened index of its first element in the whole tensor; `group`: the process
    group over the mesh dimension that shards dim 0 (None for a replicated DTensor)."""

    local: torch.Tensor
    first: int
    group: object | None


def dim0_shard(tensor: torch.Tensor, name_of: Callable[[], str]) -> Dim0Shard:
    """The local shard of a DTensor whose placements are Shard(0) (FSDP2's layout) or
    Replicate() on each mesh dimension, at most one of them Shard(0); a ValueError naming
    the tensor (`name_of()`, built only for the error) and the placement for any other layout
    (Shard(d > 0), Partial, strided shards)."""
    placements = tuple(tensor.placements)
    shard_dims = []
    for d, placement in enumerate(placements):
        if placement.is_replicate():
            continue
        if type(placement) is Shard and placement.dim == 0:
            shard_dims.append(d)
            continue
        raise ValueError(f"{name_of()} is a DTensor with placement {placement!r} on mesh "
                         f"dimension {d} (placements {placements}): fastbml supports DTensors "
                         "sharded on dim 0 (Shard(0), as FSDP2 shards) or replicated")
    if len(shard_dims) > 1:
        raise ValueError(f"{name_of()} is a DTensor sharded on dim 0 over mesh dimensions "
                         f"{shard_dims} (placements {placements}): fastbml supports one "
                         "sharding mesh dimension (FSDP2, or HSDP's replicate x shard)")
    local = tensor.to_local()  # under no_grad the local tensor itself, else a view of it
    if not shard_dims:
        return Dim0Shard(local, 0, None)
    shape, first, group = _dim0_layout(tuple(tensor.shape), tensor.device_mesh, placements,
                                       shard_dims[0])
    if tuple(local.shape) != shape:
        raise ValueError(f"{name_of()} is a DTensor whose local tensor has shape "
                         f"{tuple(local.shape)} where its placements give {shape}: "
                         "fastbml supports the shards of torch.chunk (DTensor's Shard(0))")
    return Dim0Shard(local, first, group)


_LAYOUTS: dict[tuple, tuple] = {}
_MAX_LAYOUTS = 4096


def _dim0_layout(shape: tuple[int, ...], mesh, placements: tuple,
                 shard_dim: int) -> tuple[tuple[int, ...], int, object]:
    """(local shape, first flattened index, sharding group) of this rank's shard. The same for
    every step of a training loop, so computed once per parameter layout: cached by the mesh's
    identity (a mesh built anew, e.g. after the process group was re-initialised, is another
    entry)."""
    key = (id(mesh), placements, shape)
    hit = _LAYOUTS.get(key)
    if hit is None or hit[0] is not mesh:
        local, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        hit = _LAYOUTS[key] = (mesh, tuple(local), offset[0] * math.prod(shape[1:]),
                               mesh.get_group(shard_dim))
    return hit[1:]


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two DTensors lie on the same mesh with the same placements (so that their local
    tensors hold the same elements of the whole tensors)."""
    return a.device_mesh == b.device_mesh and tuple(a.placements) == tuple(b.placements)


def replicate_groups(tensor: torch.Tensor) -> list[object]:
    """The process groups of the mesh dimensions over which a DTensor is replicated."""
    mesh = tensor.device_mesh
    return [mesh.get_group(d) for d, p in enumerate(tensor.placements) if p.is_replicate()]


def local_slice(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of a whole (plain) tensor that DTensor `like`'s local tensor holds, for
    placements of Shard and Replicate; a ValueError otherwise."""
    placements = tuple(like.placements)
    if any(not (p.is_replicate() or type(p) is Shard) for p in placements):
        raise ValueError(f"cannot take the local part of a whole tensor for placements "
                         f"{placements}")
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh,
                                                          placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
