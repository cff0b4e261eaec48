"""`prototype_cross_entropy`: per row, the cross-entropy of a softmax over the negative Euclidean
distances to class prototypes; registered as `torch.ops.fastbml.prototype_cross_entropy` with
its backward `torch.ops.fastbml.prototype_cross_entropy_backward`.

For features f [B, D], prototypes P [C, D] (float32), a class mask [C] (bool) and labels y [B]:

    d_ic   = ||f_i - P_c||_2,        s_ic = -d_ic for c in the mask, -inf elsewhere,
    lse_i  = logsumexp_c s_ic,       loss_i = lse_i + d_{i, y_i}.

A row whose label is outside the mask is ignored (loss 0, gradient 0: cross_entropy's
ignore_index rule), so an empty mask gives zeros, never NaN. The op returns (loss, lse), float32
[B] each; lse is kept for the backward and is not differentiable. The gradient with respect to f_i
is sum_c a_ic (P_c - f_i) with a_ic = g_i (p_ic - [c = y_i]) / d_ic, p = softmax(s); at d_ic = 0
the norm's subgradient 0 is taken (a_ic = 0), so a feature equal to a prototype gets a finite
gradient. The prototypes, mask and labels are constants of the op: no gradient flows into them.
A label outside [0, C) would make the kernels read out of bounds, so the op guards the range
(inside the C++ kernel; one device-side check elsewhere, no host sync).
"""

from __future__ import annotations

import torch
from torch._C import _functions

from ..backend import require_cpp, resolve_backend
from . import _library
from ._multi_tensor import CPP_DTYPE_CODES
from .true_class_prob import _check_label_range, _labels_outside


def _compute_dtype(features: torch.Tensor) -> torch.dtype:
    """float32 for the kernel dtypes; float64 stays float64 (the reference's gradcheck)."""
    return torch.promote_types(features.dtype, torch.float32)


def _reference_distances(features, prototypes):
    dtype = _compute_dtype(features)
    f, p = features.to(dtype), prototypes.to(dtype)
    if f.shape[0] == 0:
        return f, p, f.new_empty(0, p.shape[0])
    return f, p, torch.cdist(f, p, compute_mode="donot_use_mm_for_euclid_dist")


def _torch_forward(features, prototypes, class_mask, labels):
    """The reference: the op in plain torch, in float32 (float64 for float64 inputs)."""
    _, _, d = _reference_distances(features, prototypes)
    lse = torch.logsumexp((-d).masked_fill(~class_mask, float("-inf")), dim=1)
    kept = class_mask[labels]
    loss = torch.where(kept, lse + d.gather(1, labels[:, None]).squeeze(1), 0.0)
    return loss, lse


def _torch_coefficients(grad, features, prototypes, class_mask, labels, lse):
    """a [B, C] of the module docstring, in the reference's dtype."""
    f, p, d = _reference_distances(features, prototypes)
    prob = torch.where(class_mask, torch.exp(-d - lse[:, None]), 0.0)
    target = (labels[:, None] == torch.arange(p.shape[0], device=d.device)).to(d.dtype)
    kept = class_mask[labels][:, None]
    safe = torch.where(d != 0, d, 1.0)
    a = torch.where((d != 0) & kept, grad.to(d.dtype)[:, None] * (prob - target) / safe, 0.0)
    return f, p, a


def _finish_gradient(a, f, p, dtype):
    """sum_c a_ic (P_c - f_i): one matrix product and one row scaling."""
    return (a @ p - f * a.sum(dim=1, keepdim=True)).to(dtype)


def _torch_backward(grad, features, prototypes, class_mask, labels, lse):
    f, p, a = _torch_coefficients(grad, features, prototypes, class_mask, labels, lse)
    return _finish_gradient(a, f, p, features.dtype)


def _rows(features: torch.Tensor) -> torch.Tensor:
    """features with unit column stride (the C++ kernel's row layout)."""
    return features if features.shape[1] <= 1 or features.stride(1) == 1 else features.contiguous()


def _cpp_problem(features, prototypes, class_mask, labels):
    f = _rows(features)
    p = prototypes.contiguous()
    mask = class_mask.contiguous().view(torch.uint8)
    labels = labels.contiguous()
    batch, dim = f.shape
    args = (f.data_ptr(), CPP_DTYPE_CODES[f.dtype], batch, dim, f.stride(0) if batch else dim,
            p.data_ptr(), p.shape[0], mask.data_ptr(), labels.data_ptr())
    return args, (f, p, mask, labels)  # the buffers must outlive the call


def _cpp_forward(features, prototypes, class_mask, labels):
    args, _keep = _cpp_problem(features, prototypes, class_mask, labels)
    loss = torch.empty(features.shape[0], dtype=torch.float32)
    lse = torch.empty(features.shape[0], dtype=torch.float32)
    if require_cpp().prototype_cross_entropy_forward(*args, loss.data_ptr(), lse.data_ptr()):
        raise _labels_outside(prototypes.shape[0])
    return loss, lse


def _cpp_backward(grad, features, prototypes, class_mask, labels, lse):
    args, _keep = _cpp_problem(features, prototypes, class_mask, labels)
    grad, lse = grad.to(torch.float32).contiguous(), lse.contiguous()
    out = torch.empty(features.shape, dtype=features.dtype)
    require_cpp().prototype_cross_entropy_backward(grad.data_ptr(), *args, lse.data_ptr(),
                                                   out.data_ptr())
    return out


def _triton_forward(features, prototypes, class_mask, labels):
    from ..kernels.prototype_cross_entropy import prototype_ce_forward

    return prototype_ce_forward(features, prototypes.contiguous(),
                                class_mask.contiguous().view(torch.uint8), labels.contiguous())


def _triton_backward(grad, features, prototypes, class_mask, labels, lse):
    from ..kernels.prototype_cross_entropy import prototype_ce_coefficients

    p = prototypes.contiguous()
    a = prototype_ce_coefficients(grad.to(torch.float32).contiguous(), features, p,
                                  class_mask.contiguous().view(torch.uint8), labels.contiguous(),
                                  lse.contiguous())
    return _finish_gradient(a, features.to(torch.float32), p, features.dtype)


def _fake_forward(features, prototypes, class_mask, labels):
    batch = features.shape[0]
    return (features.new_empty(batch, dtype=torch.float32),
            features.new_empty(batch, dtype=torch.float32))


def _fake_backward(grad, features, prototypes, class_mask, labels, lse):
    return torch.empty_like(features, memory_format=torch.contiguous_format)


backward_op = _library.define(
    "prototype_cross_entropy_backward",
    "(Tensor grad, Tensor features, Tensor prototypes, Tensor class_mask, Tensor labels, "
    "Tensor lse) -> Tensor",
    cpu=_cpp_backward, cuda=_triton_backward, fake=_fake_backward)


def _setup_context(ctx, inputs, output):
    features, prototypes, class_mask, labels = inputs
    ctx.save_for_backward(features, prototypes, class_mask, labels, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, grad_lse):
    """The op's backward (once differentiable: a double backward raises)."""
    features, prototypes, class_mask, labels, lse = ctx.saved_tensors
    if grad_loss is None:
        return torch.zeros_like(features), None, None, None
    with torch.no_grad():
        grad = backward_op(grad_loss, features, prototypes, class_mask, labels, lse)
    if torch.is_grad_enabled() and (grad_loss.requires_grad or features.requires_grad):
        refuse = _functions.DelayedError(
            b"fastbml.prototype_cross_entropy does not support double backward", 1)
        grad = refuse(grad.detach().requires_grad_())
    return grad, None, None, None


forward_op = _library.define(
    "prototype_cross_entropy",
    "(Tensor features, Tensor prototypes, Tensor class_mask, Tensor labels) "
    "-> (Tensor loss, Tensor lse)",
    cpu=_cpp_forward, cuda=_triton_forward, fake=_fake_forward,
    autograd=(_backward, _setup_context))


def _autograd_of(forward, backward) -> type[torch.autograd.Function]:
    """The op's autograd around `forward` and `backward` called directly (eager code)."""

    class PrototypeCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, features, prototypes, class_mask, labels):
            loss, lse = forward(features, prototypes, class_mask, labels)
            _setup_context(ctx, (features, prototypes, class_mask, labels), (loss, lse))
            return loss, lse

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_loss, grad_lse):
            features, prototypes, class_mask, labels, lse = ctx.saved_tensors
            return backward(grad_loss, features, prototypes, class_mask, labels, lse), None, \
                None, None

    return PrototypeCrossEntropy


_EAGER = {"torch": _autograd_of(_torch_forward, _torch_backward),
          "cpp": _autograd_of(_cpp_forward, _cpp_backward),
          "triton": _autograd_of(_triton_forward, _triton_backward)}


def prototype_cross_entropy(features: torch.Tensor, prototypes: torch.Tensor,
                            class_mask: torch.Tensor, labels: torch.Tensor, *,
                            backend: str) -> torch.Tensor:
    """loss [B] of the module docstring (float32; float64 on the torch path for float64
    features), differentiable with respect to `features`, on `backend`.

    Trusts shapes and dtypes (features [B, D] of a kernel dtype, prototypes float32 [C, D],
    class_mask bool [C] and labels int64 [B], all on one device); guards the label range.
    """
    device = features.device
    impl = resolve_backend(backend, device)
    if impl != "cpp" and features.shape[0]:  # the cpp kernel checks the range itself
        _check_label_range(labels, prototypes.shape[0])
    in_op = impl == "cpp" or (impl == "triton" and device.type == "cuda")
    if in_op and torch.compiler.is_compiling():  # the registered op: one node in the graph
        return forward_op(features, prototypes, class_mask, labels)[0]
    # Eager: the same kernels under a plain autograd.Function, which costs a fraction of the
    # registered autograd's Python dispatch (docs/design.md#ops-and-torchcompile).
    return _EAGER[impl].apply(features, prototypes, class_mask, labels)[0]
