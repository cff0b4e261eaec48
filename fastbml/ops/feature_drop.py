"""`opm_drop`: OPM's batch coin, per-sample modality drop and 1/(1 - theta) rescale (SPEC §2.3, §2.6).

One operator, `torch.ops.fastbml.opm_drop` (autograd registered), covers all modalities. Its
forward draws, from the Philox streams of DESIGN §4, one uniform of STREAM_COIN under `seed` (the
drop runs iff it is >= 1 - p_exe) and one uniform of STREAM_MASK under `mask_seed` (default:
`seed`) per sample and modality (element m * B + i; row i of modality m is kept iff it is
>= q_m, i.e. with probability 1 - q_m), and multiplies
every feature of row i of modality m by

    factor[m, i] = keep[m, i] / (1 - theta)   if the coin says "drop",   else 1,
    theta = sum_m d_m q_m / sum_m d_m          (d_m: the feature size of modality m).

Backward multiplies the output gradients by the same factors, regenerated from the seed (nothing
but the seed, q and p_exe is kept between the two). q and theta are constants of the op: no
gradient flows into them (the reference's leak, SPEC P17/P27, is not reproduced).

Instead of compacting away the rows whose every modality was dropped (a data-dependent shape and a
host sync in the reference), the op returns per-sample loss weights
w_i = kappa_i / sum_j kappa_j, kappa_i = any_m keep[m, i] (1 for every row when the coin says no),
so that `(loss_per_sample * w).sum()` equals the reference's mean loss over the kept rows, with
the same gradients whenever nothing after the drop mixes samples (true for a concat/sum head).
If every row is dropped, all weights are 0: the loss and every gradient are 0, which is what the
reference's skipped step amounts to for plain SGD (an optimiser with momentum or weight decay
still takes its step; skip `optimizer.step()` when `w.sum() == 0` if that matters and a host sync
is acceptable). theta = 1 (every q_m = 1) drops every feature; the factor is then 0, not 0 * inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch._C import _functions
from torch.autograd.function import once_differentiable

from .. import rng
from .._checks import finite_number
from ..backend import require_cpp, resolve_backend
from . import _library
from ._multi_tensor import CPP_DTYPE_CODES, FLOAT_DTYPES


def _factors(q: torch.Tensor, dims: Sequence[int], batch: int, threshold: float,
             seed: torch.Tensor, mask_seed: torch.Tensor):
    """(factor [M, B], kappa [B]) in float32 on q's device: the torch definition of the op."""
    device = q.device
    executed = rng.philox_uniform(seed, rng.STREAM_COIN, 1, device=device) >= threshold
    keep = rng.philox_uniform(mask_seed, rng.STREAM_MASK, len(dims) * batch,
                              device=device).view(len(dims), batch) >= q[:, None]
    d = torch.tensor(dims, dtype=torch.float32, device=device)
    theta = (q * d).sum() / max(sum(dims), 1)
    inv = torch.where(theta < 1.0, 1.0 / (1.0 - theta), 0.0)
    factor = torch.where(executed, keep * inv, 1.0)
    kappa = torch.where(executed, keep.any(dim=0), True).to(torch.float32)
    return factor, kappa


def _torch_impl(features, q, threshold, seed, mask_seed):
    """The reference: the op in plain torch."""
    batch = features[0].shape[0]
    dims = [math.prod(f.shape[1:]) for f in features]
    factor, kappa = _factors(q, dims, batch, threshold, seed, mask_seed)
    outputs = [(f.to(torch.float32) * fm.view(-1, *[1] * (f.dim() - 1))).to(f.dtype)
               for f, fm in zip(features, factor)]
    return outputs, kappa / kappa.sum().clamp(min=1.0)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, ...] as [B, d] with unit column stride (a view when the layout allows it)."""
    rows = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    return rows if rows.shape[1] <= 1 or rows.stride(1) == 1 else rows.contiguous()


def _cpp_kernel(features, q, threshold, seed, mask_seed):
    rows = [_as_rows(f) for f in features]
    batch = rows[0].shape[0]
    outputs = [torch.empty(f.shape, dtype=f.dtype) for f in features]
    weights = torch.empty(batch, dtype=torch.float32)
    require_cpp().opm_drop_scale(
        [x.data_ptr() for x in rows], [y.data_ptr() for y in outputs],
        CPP_DTYPE_CODES[rows[0].dtype], batch, [x.shape[1] for x in rows],
        [x.stride(0) for x in rows], q.data_ptr(), threshold, int(seed), int(mask_seed),
        weights.data_ptr())
    return outputs, weights


def _triton_kernel(features, q, threshold, seed, mask_seed):
    from ..kernels.feature_drop import opm_drop_scale

    rows = [_as_rows(f) for f in features]
    device = rows[0].device
    outputs = [torch.empty(f.shape, dtype=f.dtype, device=device) for f in features]
    weights = torch.empty(rows[0].shape[0], dtype=torch.float32, device=device)
    opm_drop_scale(rows, [y.view(x.shape) for x, y in zip(rows, outputs)], q,
                   threshold=threshold, seed=seed, mask_seed=mask_seed, weights=weights)
    return outputs, weights


def _fake(features, q, threshold, seed, mask_seed):
    weights = features[0].new_empty(features[0].shape[0], dtype=torch.float32)
    return [torch.empty_like(f, memory_format=torch.contiguous_format) for f in features], weights


def _setup_context(ctx, inputs, output):
    features, q, threshold, seed, mask_seed = inputs
    ctx.save_for_backward(q, seed, mask_seed)
    ctx.threshold = threshold
    ctx.shapes = [(f.shape, f.dtype) for f in features]
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_outputs, grad_weights):
    """The output gradients times the same factors, regenerated from the seeds. Like every
    backend's backward it is once differentiable: a double backward raises."""
    q, seed, mask_seed = ctx.saved_tensors
    grads = [g if g is not None else torch.zeros(shape, dtype=dtype, device=q.device)
             for g, (shape, dtype) in zip(grad_outputs, ctx.shapes)]
    with torch.no_grad():
        grad_features, _ = opm_drop_op(grads, q, ctx.threshold, seed, mask_seed)
    if torch.is_grad_enabled() and any(g.requires_grad for g in grads):
        refuse = _functions.DelayedError(b"fastbml.opm_drop does not support double backward",
                                         len(grad_features))
        grad_features = refuse(*(g.detach().requires_grad_() for g in grad_features))
        grad_features = [grad_features] if isinstance(grad_features, torch.Tensor) else grad_features
    return list(grad_features), None, None, None, None


opm_drop_op = _library.define(
    "opm_drop",
    "(Tensor[] features, Tensor q, float threshold, Tensor seed, Tensor mask_seed) "
    "-> (Tensor[] outputs, Tensor weights)",
    cpu=_cpp_kernel, cuda=_triton_kernel, fake=_fake, autograd=(_backward, _setup_context))


def _check_features(features) -> list[torch.Tensor]:
    if isinstance(features, torch.Tensor) or not isinstance(features, Sequence) or not features:
        raise TypeError("features must be a non-empty sequence of tensors [B, ...], one per "
                        "modality")
    features = list(features)
    first = features[0]
    for m, f in enumerate(features):
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"features[{m}] must be a tensor, got {type(f).__name__}")
        _library.check_plain(f, f"features[{m}]")
        if f.dtype not in FLOAT_DTYPES:
            raise TypeError(f"features[{m}] must be float32, bfloat16 or float16, got {f.dtype}")
        if f.dim() < 1:
            raise ValueError(f"features[{m}] must be [B, ...] with a batch dimension, got a scalar")
        if f.shape[0] != first.shape[0]:
            raise ValueError(f"features[{m}] has batch size {f.shape[0]} but features[0] has "
                             f"{first.shape[0]}")
        if f.device != first.device or f.dtype != first.dtype:
            raise ValueError(f"features[{m}] is {f.dtype} on {f.device} but features[0] is "
                             f"{first.dtype} on {first.device}: all modalities must share both")
    return features


def _check_q(q, n_mod: int, device: torch.device) -> torch.Tensor:
    """q as a detached float32 [M] tensor on `device`; its range is checked without a host sync."""
    if isinstance(q, torch.Tensor):
        if not q.dtype.is_floating_point:
            raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
        if q.shape != (n_mod,):
            raise ValueError(f"q must have shape [{n_mod}] (one drop probability per modality), "
                             f"got {tuple(q.shape)}")
        if q.device != device:
            raise ValueError(f"q is on {q.device} but features on {device}")
        q = q.detach().to(torch.float32).contiguous()
        _library.check_unit_range(q, "q")
        return q
    if isinstance(q, (str, bytes)) or not isinstance(q, Sequence):
        raise TypeError(f"q must be a tensor or a sequence of floats, got {type(q).__name__}")
    if len(q) != n_mod:
        raise ValueError(f"q must have {n_mod} entries (one per modality), got {len(q)}")
    q = [finite_number(value, f"q[{m}]", low=0.0, high=1.0) for m, value in enumerate(q)]
    return torch.tensor(q, dtype=torch.float32, device=device)


def check_probability(value: object, name: str) -> float:
    """A finite number (Python or numpy scalar) in [0, 1], else a TypeError/ValueError naming it."""
    return finite_number(value, name, low=0.0, high=1.0)


def opm_drop(features: Sequence[torch.Tensor], q: torch.Tensor | Sequence[float], *,
             p_exe: float = 1.0, seed: int | None = None, mask_seed: int | None = None,
             backend: str = "auto") -> tuple[list[torch.Tensor], torch.Tensor]:
    """OPM's modality drop: (modulated features, per-sample loss weights [B] float32).

    `features` holds one tensor [B, ...] per modality (same batch, dtype and device; d_m is the
    product of the trailing sizes), `q` the per-modality drop probabilities [M] in [0, 1] (a
    device tensor, typically from `opm_drop_probs`; detached here), `p_exe` the probability that
    the drop runs at all this call. See the module docstring for the exact maths. Autograd-aware:
    gradients see the same mask and scale. Use the weights as
    `loss = (F.cross_entropy(logits, y, reduction="none") * weights).sum()`, which equals the
    plain mean loss when nothing is dropped. The same `seed` gives the same result on every
    backend (masks bit-identical); None draws one from torch's generator. `mask_seed` (default:
    `seed`) keys the masks alone: under DDP every rank passes the same `seed` (one coin for the
    global batch) and its own `mask_seed` (independent masks per rank). No host sync.
    """
    features = _check_features(features)
    q = _check_q(q, len(features), features[0].device)
    return drop_with_valid_q(features, q, p_exe=p_exe, seed=seed, mask_seed=mask_seed,
                             backend=backend)


def drop_with_valid_q(features: Sequence[torch.Tensor], q: torch.Tensor, *, p_exe: float,
                      seed: rng.Seed | None, mask_seed: rng.Seed | None,
                      backend: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`opm_drop` for a q already known to be a float32 [M] tensor in [0, 1] on the features'
    device (as `opm_drop_probs` returns it): skips q's range check, which costs device launches
    on every training step. The features are still checked (on the host, at no device cost)."""
    features = _check_features(features)
    device = features[0].device
    threshold = 1.0 - check_probability(p_exe, "p_exe")
    seed = rng.seed_tensor(seed, device)
    mask_seed = seed if mask_seed is None else rng.seed_tensor(mask_seed, device, "mask_seed")
    impl = resolve_backend(backend, device)
    q = q.detach()
    if impl == "cpp" or device.type == "cuda":
        outputs, weights = opm_drop_op(features, q, threshold, seed, mask_seed)
        return list(outputs), weights
    kernel, function = ((_torch_impl, _TorchDrop) if impl == "torch"
                        else (_triton_kernel, _InterpretedDrop))  # triton: the interpreter
    if not (torch.is_grad_enabled() and any(f.requires_grad for f in features)):
        return kernel(features, q, threshold, seed, mask_seed)
    if mask_seed is seed:  # autograd.Function under dynamo takes no tensor twice
        mask_seed = seed.view(())
    *outputs, weights = function.apply(q, threshold, seed, mask_seed, *features)
    return outputs, weights


def _autograd_of(kernel) -> type[torch.autograd.Function]:
    """The op's autograd around a path that does not go through the op (the torch reference,
    the Triton interpreter): forward and backward are the same pass of `kernel`."""

    class Drop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, threshold, seed, mask_seed, *features):
            outputs, weights = kernel(list(features), q, threshold, seed, mask_seed)
            _setup_context(ctx, (features, q, threshold, seed, mask_seed), (outputs, weights))
            return (*outputs, weights)

        @staticmethod
        @once_differentiable
        def backward(ctx, *grads):
            q, seed, mask_seed = ctx.saved_tensors
            grad_features, _ = kernel(list(grads[:-1]), q, ctx.threshold, seed, mask_seed)
            return (None, None, None, None, *grad_features)

    return Drop


_TorchDrop = _autograd_of(_torch_impl)
_InterpretedDrop = _autograd_of(_triton_kernel)
