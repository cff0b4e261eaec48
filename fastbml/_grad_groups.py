"""Per-modality parameter groups and their gradients, shared by the gradient-rewriting methods
(OGM, AGM, MMPareto): grouping, the checks that name a bad parameter, and the in-place
scale (+ noise) of every group's gradients, plain or FSDP2-sharded (docs/design.md#fsdp2).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import NoReturn

import torch

from . import distributed, rng
from ._checks import FLOAT_DTYPES, PLAIN_TENSORS, check_disjoint, check_plain
from ._sharded import Dim0Shard, dim0_shard, is_dtensor
from .ops.scale_noise import multi_tensor_moments, multi_tensor_scale_noise_, std_of_moments

NOISE_EPS = 1e-8  # added to each tensor's gradient std, as the reference code does


def grouped(params, modality_index, name: str = "params") -> list[list[torch.Tensor]]:
    """One list per modality from per-modality lists, or from a flat list with modality_index;
    errors name the argument `name`."""
    if isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
        raise TypeError(f"{name} must be a list of per-modality tensor lists, or a flat list "
                        "with modality_index")
    params = list(params)
    if modality_index is None:
        groups = []
        for m, group in enumerate(params):
            if isinstance(group, torch.Tensor) or not isinstance(group, Iterable):
                raise TypeError(f"{name}[{m}] must be a list of tensors (one list per modality); "
                                "pass modality_index with a flat list")
            groups.append(list(group))
        return groups
    index = list(modality_index)
    if len(index) != len(params):
        raise ValueError(f"modality_index has {len(index)} entries for {len(params)} {name}")
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in index):
        raise ValueError("modality_index must hold non-negative ints")
    groups = [[] for _ in range(max(index, default=-1) + 1)]
    for p, m in zip(params, index):
        groups[m].append(p)
    return groups


def check_params(groups: list[list[torch.Tensor]]) -> None:
    for m, group in enumerate(groups):
        for j, p in enumerate(group):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{m}][{j}] must be a tensor, got {type(p).__name__}")
    seen: set[int] = set()
    for m, group in enumerate(groups):
        for j, p in enumerate(group):
            if id(p) in seen:
                raise ValueError(f"params[{m}][{j}] appears in more than one modality group")
            seen.add(id(p))


def usable_grad(g: torch.Tensor, device: torch.device, *, sharded: bool = True) -> bool:
    """Whether a kernel can rewrite `g` in place: a dense gradient of a kernel dtype on `device`,
    a plain tensor or (with `sharded`) a DTensor. One cheap test per gradient on the hot path;
    `reject_grad` says what is wrong."""
    return ((type(g) in PLAIN_TENSORS or (sharded and is_dtensor(g))) and g.dtype in FLOAT_DTYPES
            and g.device == device and g.layout == torch.strided)


def reject_grad(g: torch.Tensor, name: str, device: torch.device, *, against: str,
                sharded: bool = True) -> NoReturn:
    """The error that says why `g` (called `name`) fails `usable_grad`; `against` names what
    sets the expected device."""
    if not (sharded and is_dtensor(g)):
        check_plain(g, name)
    if g.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {g.dtype}")
    if g.device != device:
        raise ValueError(f"{name} is on {g.device} but {against} on {device}")
    raise TypeError(f"{name} is sparse; only dense gradients can be rewritten in place")


def grads_of(groups: list[list[torch.Tensor]], flat: list[torch.Tensor], index: list[int],
              device: torch.device) -> tuple[list[torch.Tensor], list[int]]:
    """The gradients to modulate (parameters without one skipped) and their modality indices;
    one cheap test per gradient, the detailed checks only to say what is wrong."""
    grads, scale_index = [], []
    for p, m in zip(flat, index):
        g = p.grad
        if g is None:
            continue
        if not usable_grad(g, device):
            m, j = next((m, j) for m, group in enumerate(groups)
                        for j, q in enumerate(group) if q is p)
            reject_grad(g, f"params[{m}][{j}].grad", device, against="coeffs")
        grads.append(g)
        scale_index.append(m)
    return grads, scale_index


def _grad_name(groups: list[list[torch.Tensor]], flat: list[torch.Tensor], i: int,
               labels: Sequence[str] | None = None) -> str:
    """The name of the i-th gradient that `grads_of` returned (built only for an error)."""
    with_grad = (k for k, p in enumerate(flat) if p.grad is not None)
    k = next(itertools.islice(with_grad, i, None))
    m, j = next((m, j) for m, group in enumerate(groups) for j, q in enumerate(group)
                if q is flat[k])
    return f"params[{m}][{j}].grad" + (f" ({labels[k]})" if labels else "")


def _check_grads_disjoint(groups: list[list[torch.Tensor]], flat: list[torch.Tensor],
                          grads: list[torch.Tensor]) -> None:
    """ValueError naming the two parameters whose gradients share memory."""
    check_disjoint(grads, lambda i: _grad_name(groups, flat, i))


def _all_reduce_rows_(moments: torch.Tensor, groups: list[object | None]) -> None:
    """Sums row t of `moments` over groups[t] (None: a whole tensor, left alone): one
    all_reduce per distinct group, one in all for a model sharded on one mesh. Rows are
    addressed as slices (no index tensor to copy to the device, no host sync)."""
    spans: dict[object, list[list[int]]] = {}
    for t, group in enumerate(groups):
        if group is not None:
            runs = spans.setdefault(group, [])
            if runs and runs[-1][1] == t:
                runs[-1][1] = t + 1
            else:
                runs.append([t, t + 1])
    for group, runs in spans.items():
        if len(runs) == 1:  # a contiguous block of rows, reduced in place
            distributed.all_reduce_sum_(moments[runs[0][0]:runs[0][1]], group)
            continue
        part = distributed.all_reduce_sum_(torch.cat([moments[a:b] for a, b in runs]), group)
        start = 0
        for a, b in runs:
            moments[a:b].copy_(part[start:start + b - a])
            start += b - a


def modulate_(groups: list[list[torch.Tensor]], flat: list[torch.Tensor],
               grads: list[torch.Tensor], scale_index: list[int], coeffs: torch.Tensor, *,
               noise: bool, seed: rng.Seed | None, backend: str,
               labels: Sequence[str] | None = None) -> None:
    """g <- k g (+ noise) over the gradients; DTensor ones through their local shards
    (docs/design.md#fsdp2).

    A shard of a DTensor sharded on dim 0 is a contiguous range of the whole tensor's
    flattened elements: it draws the noise of the whole tensor's indices there, and its std
    comes from the (count, sum, sum of squares) of every shard, summed by one all_reduce of a
    [T, 3] float64 tensor over the sharding group. Nothing else crosses ranks, and the kernels
    work on the local shards (buffers of at most this rank's shards): no rank builds a whole
    gradient.
    """
    if not any(is_dtensor(g) for g in grads):
        _check_grads_disjoint(groups, flat, grads)
        multi_tensor_scale_noise_(grads, scale_index, coeffs, noise=noise, seed=seed,
                                  stream=rng.STREAM_NOISE, eps=NOISE_EPS, backend=backend)
        return
    with torch.no_grad():  # the DTensors' local tensors themselves
        shards = [dim0_shard(g, lambda i=i: _grad_name(groups, flat, i, labels))
                  if is_dtensor(g) else Dim0Shard(g, 0, None) for i, g in enumerate(grads)]
    local = [shard.local for shard in shards]
    _check_grads_disjoint(groups, flat, local)
    std = None
    if noise:
        moments = multi_tensor_moments(local, backend=backend)
        _all_reduce_rows_(moments, [shard.group for shard in shards])
        std = std_of_moments(moments)
    multi_tensor_scale_noise_(local, scale_index, coeffs, noise=noise, seed=seed,
                              stream=rng.STREAM_NOISE, eps=NOISE_EPS,
                              shards=[(g.numel(), shard.first)  # a DTensor's numel: whole
                                      for g, shard in zip(grads, shards)],
                              std=std, backend=backend)


def flatten(groups: list[list[torch.Tensor]]) -> tuple[list[torch.Tensor], list[int]]:
    return ([p for group in groups for p in group],
            [m for m, group in enumerate(groups) for _ in group])
