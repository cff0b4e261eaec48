"""The `torch.ops.fastbml` namespace: how each kernel-backed op is registered and called.

Every op is a PyTorch operator with a schema that declares what it mutates, a fake (meta)
implementation for tracing, the C++ kernel (`fastbml._C`) as its CPU implementation and the
Triton kernels as its CUDA implementation. `torch.compile` therefore keeps an op in its graph
(no graph break) and AOTAutograd/functionalisation know exactly what it writes. The Triton
kernels are also run outside the op on CPU tensors under TRITON_INTERPRET=1: that is how the
test suite checks them on a machine without a GPU.

The ops are opaque to Inductor (`torch.library.define`/`impl`, not `triton_op`): the
multi-tensor kernels address their tensors through device tables of addresses, which a traced
`wrap_triton` call cannot express (fake tensors have no address, and Inductor's analysis of what
a user kernel writes only follows tensor arguments). The low-level registration also keeps the
eager dispatch cost to a few microseconds per call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

NAMESPACE = "fastbml"
_LIB = torch.library.Library(NAMESPACE, "DEF")


def define(name: str, schema: str, *, cpu: Callable, cuda: Callable, fake: Callable,
           autograd: tuple[Callable, Callable] | None = None):
    """Registers `fastbml::<name><schema>` with its CPU, CUDA and fake implementations (and
    `autograd` = (backward, setup_context) for a differentiable op); returns the op
    (`torch.ops.fastbml.<name>`)."""
    qualname = f"{NAMESPACE}::{name}"
    _LIB.define(name + schema)
    _LIB.impl(name, cpu, "CPU")
    _LIB.impl(name, cuda, "CUDA")
    torch.library.register_fake(qualname, fake, lib=_LIB)
    if autograd is not None:
        backward, setup_context = autograd
        torch.library.register_autograd(qualname, backward, setup_context=setup_context,
                                        lib=_LIB)
    return getattr(torch.ops.fastbml, name)


def call(op, triton_kernel: Callable, impl: str, device: torch.device, *args):
    """Runs a fast backend: the op itself (cpp on CPU, triton on CUDA), or, for triton on CPU
    tensors (the interpreter), the Triton implementation directly."""
    if impl == "triton" and device.type == "cpu":
        return triton_kernel(*args)
    return op(*args)


PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


def check_plain(tensor: torch.Tensor, name: str) -> None:
    """Refuses tensor subclasses (DTensor, ...): a kernel given a subclass's local storage would
    read or write the wrong memory."""
    if type(tensor) not in PLAIN_TENSORS:
        raise TypeError(f"{name} is a {type(tensor).__name__}: fastbml's kernels take plain "
                        "tensors only (sharded DTensor gradients and parameters are not "
                        "supported)")


def check_on_device(ok: torch.Tensor, message: str) -> None:
    """Enforces a condition held in a bool device tensor without a host sync where one would
    cost: a ValueError(message) for eager CPU tensors; on CUDA, and inside a compiled graph
    (where reading the value would break it), a device-side assert."""
    if ok.device.type == "cuda" or torch.compiler.is_compiling():
        torch._assert_async(ok, f"fastbml: {message}")
    elif ok.device.type == "cpu" and not ok:
        raise ValueError(message)


def check_unit_range(values: torch.Tensor, name: str) -> None:
    """`check_on_device` of 0 <= values <= 1 (NaN fails)."""
    lo, hi = torch.aminmax(values)  # NaN propagates into both and fails either bound
    check_on_device((lo >= 0) & (hi <= 1), f"{name} must lie in [0, 1], got values outside it")
