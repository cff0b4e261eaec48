"""`multi_tensor_axpby_`: x_t <- a_t x_t + b_t y_t over many tensor pairs, (a_t, b_t) read from a
device table.

Computed in float32 whatever the storage dtype; non-finite values are not masked. Registered as
`torch.ops.fastbml.axpby_`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..backend import require_cpp, resolve_backend
from . import _library
from ._multi_tensor import CPP_DTYPE_CODES, ContiguousWork


def _torch_impl(xs, ys, coeffs):
    a, b = coeffs.unbind(1)
    results = [(ai * x.float() + bi * y.float()).to(x.dtype)
               for x, y, ai, bi in zip(xs, ys, a.unbind(0), b.unbind(0))]
    torch._foreach_copy_(xs, results)


def _cpp_kernel(xs, ys, coeffs):
    work = ContiguousWork(xs)
    ys = [t.contiguous() for t in ys]  # kept alive across the call
    require_cpp().multi_tensor_axpby(
        [t.data_ptr() for t in work.tensors], [t.data_ptr() for t in ys],
        [CPP_DTYPE_CODES[t.dtype] for t in work.tensors], [t.numel() for t in work.tensors],
        coeffs.data_ptr())
    work.write_back()


def _triton_kernel(xs, ys, coeffs):
    from ..kernels.axpby import multi_tensor_axpby_ as launch

    work = ContiguousWork(xs)
    launch(work.tensors, [t.contiguous() for t in ys], coeffs)
    work.write_back()


def _fake(xs, ys, coeffs):
    return None


axpby_op = _library.define(
    "axpby_", "(Tensor(a!)[] xs, Tensor[] ys, Tensor coeffs) -> ()",
    cpu=_cpp_kernel, cuda=_triton_kernel, fake=_fake)


def multi_tensor_axpby_(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor],
                        coeffs: torch.Tensor, *, backend: str = "auto") -> None:
    """In place: xs[t] <- coeffs[t, 0] * xs[t] + coeffs[t, 1] * ys[t].

    Arguments are trusted (validated by the caller): floating tensors on one device, each y of
    its x's shape and dtype and not sharing its memory, `coeffs` a floating [n, 2] tensor on
    that device. No host sync.
    """
    xs = list(xs)
    if not xs:
        return
    device = xs[0].device
    coeffs = coeffs.to(torch.float32).contiguous()
    impl = resolve_backend(backend, device)
    args = (xs, list(ys), coeffs)
    if impl == "torch":
        _torch_impl(*args)
    else:
        _library.call(axpby_op, _triton_kernel, impl, device, *args)
