"""D&R re-learning (Diagnosing & Re-learning, ECCV 2024;
docs/methods.md#diagnosing-and-re-learning).

Every few epochs D&R diagnoses how much each modality's encoder has over-fitted (the gap between
the cluster purity of its features on train and on held-out data) and pulls that encoder back
toward its initial weights by a strength that grows with the gap:

    a_m = tanh(lam * |P_m(train) - P_m(val)|),    theta <- (1 - a_m) theta + a_m theta_init

for every parameter of encoder m (BN gamma/beta included; buffers, the fusion head and the
optimizer state are left alone). The re-initialisation is one multi-tensor lerp per call, with
the strengths read from device memory: no host sync.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NoReturn

import torch

from ._checks import (
    FLOAT_DTYPES,
    PLAIN_TENSORS,
    check_disjoint,
    check_plain,
    check_unit_range,
    finite_number,
)
from ._sharded import is_dtensor, same_layout
from .ops.lerp import multi_tensor_lerp_

Number = int | float


def relearn_strength(purity_train: Number | torch.Tensor, purity_val: Number | torch.Tensor,
                     lam: float = 3.0) -> float | torch.Tensor:
    """Re-initialisation strength a = tanh(lam * |purity_train - purity_val|) (docs/methods.md#re-learning-strength).

    Python numbers give a float (purities checked to lie in [0, 1]); if either purity is a
    tensor the result is a tensor on its device, computed without a host sync (unchecked).
    """
    lam = finite_number(lam, "lam", low=0.0)
    for name, value in (("purity_train", purity_train), ("purity_val", purity_val)):
        if isinstance(value, torch.Tensor):
            if not value.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        else:
            finite_number(value, name, low=0.0, high=1.0)
    gap = purity_train - purity_val
    if isinstance(gap, torch.Tensor):
        return torch.tanh(lam * gap.abs())
    return math.tanh(lam * abs(gap))


def _pairs(params, init_params) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]], bool]:
    """(param groups, init groups, grouped?): a flat list becomes one group."""
    for name, value in (("params", params), ("init_params", init_params)):
        if isinstance(value, (torch.Tensor, str)) or not isinstance(value, Iterable):
            raise TypeError(f"{name} must be a sequence of tensors (one encoder) or of such "
                            f"sequences (one per modality), got {type(value).__name__}")
    params, init_params = list(params), list(init_params)
    if len(params) != len(init_params):
        raise ValueError(f"params has {len(params)} entries but init_params {len(init_params)}")
    if not params:
        return [], [], False
    if isinstance(params[0], torch.Tensor):
        return [params], [init_params], False
    groups, inits = [], []
    for m, (group, init) in enumerate(zip(params, init_params)):
        for name, value in ((f"params[{m}]", group), (f"init_params[{m}]", init)):
            if isinstance(value, (torch.Tensor, str)) or not isinstance(value, Iterable):
                raise TypeError(f"{name} must be a sequence of tensors (params is a list of "
                                f"per-modality lists), got {type(value).__name__}")
        groups.append(list(group))
        inits.append(list(init))
        if len(groups[-1]) != len(inits[-1]):
            raise ValueError(f"params[{m}] has {len(groups[-1])} tensors but init_params[{m}] "
                             f"{len(inits[-1])}")
    return groups, inits, True


def _check_strength(strength, n_groups: int, grouped: bool) -> torch.Tensor | list[float]:
    """The strengths as Python floats (checked here) or a tensor [n_groups] (checked later)."""
    if isinstance(strength, torch.Tensor):
        if not strength.dtype.is_floating_point:
            raise TypeError(f"strength must be a floating-point tensor, got {strength.dtype}")
        expected = (n_groups,) if grouped else ()
        if strength.shape != expected:
            what = "one strength per group" if grouped else "a 0-dim tensor for a flat list"
            raise ValueError(f"strength must have shape {list(expected)} ({what}), got "
                             f"{list(strength.shape)}")
        return strength.detach().reshape(-1)
    if grouped:
        if isinstance(strength, str) or not isinstance(strength, Sequence):
            raise TypeError(f"strength must be a sequence or 1-D tensor with one value per group "
                            f"of params, got {type(strength).__name__}")
        if len(strength) != n_groups:
            raise ValueError(f"strength has {len(strength)} values for {n_groups} groups of params")
        values, names = list(strength), [f"strength[{m}]" for m in range(n_groups)]
    else:
        values, names = [strength], ["strength"]
    return [finite_number(value, name, low=0.0, high=1.0) for name, value in zip(names, values)]


def _reject_pair(where: str, p, p0, device: torch.device | None) -> NoReturn:
    """Raises the error that says why params{where} / init_params{where} cannot be used."""
    for name, value in (("params", p), ("init_params", p0)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}{where} must be a tensor, got {type(value).__name__}")
    if is_dtensor(p) or is_dtensor(p0):
        for name, value in (("params", p), ("init_params", p0)):
            partial = [x for x in getattr(value, "placements", ()) if x.is_partial()]
            if partial:
                raise ValueError(f"{name}{where} is a DTensor with placement {partial[0]!r}: "
                                 "its local tensor is a summand, not a part of the tensor; "
                                 "soft re-initialisation takes Shard or Replicate placements")
        if not (is_dtensor(p) and is_dtensor(p0) and same_layout(p, p0)):
            def layout(t):
                return (f"a DTensor with placements {tuple(t.placements)} on {t.device_mesh}"
                        if is_dtensor(t) else f"a {type(t).__name__}")
            raise ValueError(f"params{where} is {layout(p)} but init_params{where} "
                             f"{layout(p0)}: a DTensor parameter needs a snapshot sharded like "
                             "it (e.g. p.detach().clone())")
    else:
        for name, value in (("params", p), ("init_params", p0)):
            check_plain(value, f"{name}{where}")
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(f"params{where} must be float32, bfloat16 or float16, got {p.dtype}")
    if p0.shape != p.shape:
        raise ValueError(f"init_params{where} has shape {list(p0.shape)} but params{where} "
                         f"{list(p.shape)}")
    if p0.dtype != p.dtype or p0.device != p.device:
        raise ValueError(f"init_params{where} is {p0.dtype} on {p0.device} but params{where} "
                         f"{p.dtype} on {p.device}")
    if p.device != device:
        raise ValueError(f"params{where} is on {p.device} but the first parameter on {device}")
    raise ValueError(f"params{where} appears more than once")


def soft_reinit_(params, init_params, strength: float | Sequence[float] | torch.Tensor, *,
                 backend: str = "auto") -> None:
    """D&R's soft re-initialisation, in place: theta <- (1 - a) theta + a theta_init (docs/methods.md#soft-re-initialisation).

    `params` is one encoder's parameters (a sequence of tensors, `strength` a number or 0-dim
    tensor) or one such sequence per modality (`strength` then a sequence or 1-D tensor with one
    value per group); `init_params` has the same structure, each tensor of its parameter's
    shape, dtype and device (e.g. clones taken right after construction). a lies in [0, 1]:
    0 leaves the parameters bit for bit unchanged on every backend (even where the snapshot
    holds NaN), 1 restores the initial values. DTensor parameters (FSDP2) take snapshots that
    are DTensors on the same mesh with the same placements (Shard or Replicate); the update is
    elementwise, so each rank rewrites its local shards, without communicating. Computed in
    float32 whatever the storage dtype; gradients are not tracked; empty lists are a no-op.
    Strength tensors are range checked on the device, without a host sync.
    """
    groups, inits, grouped = _pairs(params, init_params)
    if not groups:
        return
    weights = _check_strength(strength, len(groups), grouped)
    first = next((p for group in groups for p in group), None)
    device = first.device if isinstance(first, torch.Tensor) else None
    tensors, targets, weight_index, seen, where = [], [], [], set(), []
    for m, (group, init) in enumerate(zip(groups, inits)):
        for j, (p, p0) in enumerate(zip(group, init)):
            # One cheap test per pair (this runs for every parameter of every encoder); the
            # detailed checks only to say what is wrong.
            plain = type(p) in PLAIN_TENSORS and type(p0) in PLAIN_TENSORS
            if not ((plain or (is_dtensor(p) and is_dtensor(p0) and same_layout(p, p0)
                               and not any(x.is_partial() for x in p.placements)))
                    and p.dtype in FLOAT_DTYPES and p0.dtype == p.dtype
                    and p0.shape == p.shape and p.device == device and p0.device == device
                    and id(p) not in seen):
                _reject_pair(f"[{m}][{j}]" if grouped else f"[{j}]", p, p0, device)
            seen.add(id(p))
            where.append(f"[{m}][{j}]" if grouped else f"[{j}]")
            tensors.append(p)
            targets.append(p0)
            weight_index.append(m)
    if not tensors:
        return
    with torch.no_grad():  # a DTensor's local tensor holds the same elements of p and p0
        tensors = [t.to_local() if is_dtensor(t) else t for t in tensors]
        targets = [t.to_local() if is_dtensor(t) else t for t in targets]
    check_disjoint(tensors, lambda i: f"params{where[i]}", targets,
                   lambda i: f"init_params{where[i]}")
    if isinstance(weights, torch.Tensor):
        if weights.device != device:
            raise ValueError(f"strength is on {weights.device} but params on {device}")
        check_unit_range(weights, "strength")
    else:
        weights = torch.tensor(weights, dtype=torch.float32)
        if device.type == "cuda":  # a blocking copy would wait for the queued work
            weights = weights.pin_memory()
        weights = weights.to(device, non_blocking=True)
    with torch.no_grad():  # in place on the parameters themselves, untracked
        multi_tensor_lerp_(tensors, targets, weight_index, weights, backend=backend)
