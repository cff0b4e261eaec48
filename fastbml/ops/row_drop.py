"""`row_drop`: a per-row random drop with rescale over several [B, ...] tensors at once.

One operator, `torch.ops.fastbml.row_drop` (autograd registered), covers all M tensors. Its
forward draws (docs/design.md#rng) one uniform of `coin_stream` under `seed` (the drop runs iff
it is >= threshold) and one uniform of `mask_stream` under `mask_seed` per row and tensor
(element m * B + i; row i of tensor m is kept iff it is >= q_m, i.e. with probability 1 - q_m),
and multiplies every element of row i of tensor m by

    factor[m, i] = keep[m, i] / (1 - theta)   if the coin fired,   else 1,
    theta = sum_m d_m q_m / sum_m d_m          (d_m: the row size of tensor m).

It also returns per-row weights w_i = kappa_i / sum_j kappa_j, kappa_i = any_m keep[m, i]
(1 for every row when the coin did not fire; all 0 when every row is dropped), and the coin
itself as a bool scalar. Backward multiplies the output gradients by the same factors,
regenerated from the seeds (nothing else is kept between the two); q and theta are constants
of the op: no gradient flows into them. theta = 1 drops everything: the factor is 0, not 0 * inf.
OPM is this op with its own streams and q (docs/methods.md#opm).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch._C import _functions
from torch.autograd.function import once_differentiable

from .. import rng
from ..backend import require_cpp, resolve_backend
from . import _library
from ._multi_tensor import CPP_DTYPE_CODES


def _factors(q: torch.Tensor, dims: Sequence[int], batch: int, threshold: float,
             seed: torch.Tensor, mask_seed: torch.Tensor, coin_stream: int, mask_stream: int):
    """(factor [M, B], kappa [B], coin) in float32 on q's device: the torch definition."""
    device = q.device
    executed = rng.philox_uniform(seed, coin_stream, 1, device=device)[0] >= threshold
    keep = rng.philox_uniform(mask_seed, mask_stream, len(dims) * batch,
                              device=device).view(len(dims), batch) >= q[:, None]
    d = torch.tensor(dims, dtype=torch.float32, device=device)
    theta = (q * d).sum() / max(sum(dims), 1)
    inv = torch.where(theta < 1.0, 1.0 / (1.0 - theta), 0.0)
    factor = torch.where(executed, keep * inv, 1.0)
    kappa = torch.where(executed, keep.any(dim=0), True).to(torch.float32)
    return factor, kappa, executed


def _torch_impl(features, q, threshold, seed, mask_seed, coin_stream, mask_stream):
    """The reference: the op in plain torch."""
    batch = features[0].shape[0]
    dims = [math.prod(f.shape[1:]) for f in features]
    factor, kappa, executed = _factors(q, dims, batch, threshold, seed, mask_seed, coin_stream,
                                       mask_stream)
    outputs = [(f.to(torch.float32) * fm.view(-1, *[1] * (f.dim() - 1))).to(f.dtype)
               for f, fm in zip(features, factor)]
    return outputs, kappa / kappa.sum().clamp(min=1.0), executed


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [B, ...] as [B, d] with unit column stride (a view when the layout allows it)."""
    rows = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    return rows if rows.shape[1] <= 1 or rows.stride(1) == 1 else rows.contiguous()


def _cpp_kernel(features, q, threshold, seed, mask_seed, coin_stream, mask_stream):
    rows = [_as_rows(f) for f in features]
    batch = rows[0].shape[0]
    outputs = [torch.empty(f.shape, dtype=f.dtype) for f in features]
    weights = torch.empty(batch, dtype=torch.float32)
    executed = torch.empty((), dtype=torch.bool)
    require_cpp().row_drop_scale(
        [x.data_ptr() for x in rows], [y.data_ptr() for y in outputs],
        CPP_DTYPE_CODES[rows[0].dtype], batch, [x.shape[1] for x in rows],
        [x.stride(0) for x in rows], q.data_ptr(), threshold, int(seed), int(mask_seed),
        coin_stream, mask_stream, weights.data_ptr(), executed.data_ptr())
    return outputs, weights, executed


def _triton_kernel(features, q, threshold, seed, mask_seed, coin_stream, mask_stream):
    from ..kernels.row_drop import row_drop_scale

    rows = [_as_rows(f) for f in features]
    device = rows[0].device
    outputs = [torch.empty(f.shape, dtype=f.dtype, device=device) for f in features]
    weights = torch.empty(rows[0].shape[0], dtype=torch.float32, device=device)
    executed = torch.empty((), dtype=torch.bool, device=device)
    row_drop_scale(rows, [y.view(x.shape) for x, y in zip(rows, outputs)], q,
                   threshold=threshold, seed=seed, mask_seed=mask_seed, coin_stream=coin_stream,
                   mask_stream=mask_stream, weights=weights, executed=executed)
    return outputs, weights, executed


def _fake(features, q, threshold, seed, mask_seed, coin_stream, mask_stream):
    weights = features[0].new_empty(features[0].shape[0], dtype=torch.float32)
    executed = features[0].new_empty((), dtype=torch.bool)
    outputs = [torch.empty_like(f, memory_format=torch.contiguous_format) for f in features]
    return outputs, weights, executed


def _setup_context(ctx, inputs, output):
    features, q, threshold, seed, mask_seed, coin_stream, mask_stream = inputs
    ctx.save_for_backward(q, seed, mask_seed)
    ctx.arguments = (threshold, coin_stream, mask_stream)
    ctx.shapes = [(f.shape, f.dtype) for f in features]
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_outputs, grad_weights, grad_executed):
    """The output gradients times the same factors, regenerated from the seeds. Like every
    backend's backward it is once differentiable: a double backward raises."""
    q, seed, mask_seed = ctx.saved_tensors
    threshold, coin_stream, mask_stream = ctx.arguments
    grads = [g if g is not None else torch.zeros(shape, dtype=dtype, device=q.device)
             for g, (shape, dtype) in zip(grad_outputs, ctx.shapes)]
    with torch.no_grad():
        grad_features, _, _ = row_drop_op(grads, q, threshold, seed, mask_seed, coin_stream,
                                          mask_stream)
    if torch.is_grad_enabled() and any(g.requires_grad for g in grads):
        refuse = _functions.DelayedError(b"fastbml.row_drop does not support double backward",
                                         len(grad_features))
        grad_features = refuse(*(g.detach().requires_grad_() for g in grad_features))
        grad_features = [grad_features] if isinstance(grad_features, torch.Tensor) else grad_features
    return list(grad_features), None, None, None, None, None, None


row_drop_op = _library.define(
    "row_drop",
    "(Tensor[] features, Tensor q, float threshold, Tensor seed, Tensor mask_seed, "
    "int coin_stream, int mask_stream) -> (Tensor[] outputs, Tensor weights, Tensor executed)",
    cpu=_cpp_kernel, cuda=_triton_kernel, fake=_fake, autograd=(_backward, _setup_context))


def row_drop(features: Sequence[torch.Tensor], q: torch.Tensor, *, threshold: float,
             seed: torch.Tensor, mask_seed: torch.Tensor, coin_stream: int, mask_stream: int,
             backend: str) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(scaled rows, per-row weights [B] float32, coin) of the module docstring, on `backend`.

    Trusts its inputs (the public entry points check them): `features` non-empty [B, ...]
    tensors sharing batch, float dtype and device; `q` float32 [M] in [0, 1] on that device;
    the seeds int64 0-dim tensors there.
    """
    device = features[0].device
    impl = resolve_backend(backend, device)
    q = q.detach()
    streams = (coin_stream, mask_stream)
    in_op = impl == "cpp" or (impl == "triton" and device.type == "cuda")
    if in_op and torch.compiler.is_compiling():  # the registered op: one node in the graph
        outputs, weights, executed = row_drop_op(features, q, threshold, seed, mask_seed, *streams)
        return list(outputs), weights, executed
    # Eager: the same kernels under a plain autograd.Function, which costs a fraction of the
    # registered autograd's Python dispatch (docs/design.md#ops-and-torchcompile).
    kernel, function = _EAGER[impl]
    if not (torch.is_grad_enabled() and any(f.requires_grad for f in features)):
        return kernel(features, q, threshold, seed, mask_seed, *streams)
    if mask_seed is seed:  # autograd.Function under dynamo takes no tensor twice
        mask_seed = seed.view(())
    *outputs, weights, executed = function.apply(q, threshold, seed, mask_seed, *streams,
                                                 *features)
    return outputs, weights, executed


def _autograd_of(kernel) -> type[torch.autograd.Function]:
    """The op's autograd around `kernel` called directly (eager code): forward and backward are
    the same pass of `kernel`."""

    class Drop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, threshold, seed, mask_seed, coin_stream, mask_stream, *features):
            arguments = (q, threshold, seed, mask_seed, coin_stream, mask_stream)
            outputs, weights, executed = kernel(list(features), *arguments)
            _setup_context(ctx, (features, *arguments), (outputs, weights, executed))
            return (*outputs, weights, executed)

        @staticmethod
        @once_differentiable
        def backward(ctx, *grads):
            q, seed, mask_seed = ctx.saved_tensors
            threshold, coin_stream, mask_stream = ctx.arguments
            grad_features, _, _ = kernel(list(grads[:-2]), q, threshold, seed, mask_seed,
                                         coin_stream, mask_stream)
            return (None,) * 6 + tuple(grad_features)

    return Drop


_EAGER = {"torch": (_torch_impl, _autograd_of(_torch_impl)),
          "cpp": (_cpp_kernel, _autograd_of(_cpp_kernel)),
          "triton": (_triton_kernel, _autograd_of(_triton_kernel))}
