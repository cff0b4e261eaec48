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
