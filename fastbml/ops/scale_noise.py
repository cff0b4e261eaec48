"""`multi_tensor_scale_noise_`: x <- scale * x (+ (unbiased std(x) + eps) * N(0, 1)) over many tensors.

The std is that of each tensor's values *before* scaling. A tensor with one element has no
unbiased std; its noise std is `eps`. Non-finite values are not masked: a tensor that holds
inf/NaN comes out non-finite (its std is non-finite), the other tensors are unaffected.
Registered as `torch.ops.fastbml.scale_noise_`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import rng
from ..backend import require_cpp, resolve_backend
from . import _library
from ._multi_tensor import CPP_DTYPE_CODES, ContiguousWork, stream_offsets


def _torch_impl(tensors, scale_index, scales, seed, stream, eps, noise):
    device = tensors[0].device
    numels = [t.numel() for t in tensors]
    offsets = stream_offsets(numels)
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
    segment = torch.repeat_interleave(torch.arange(len(tensors), device=device),
                                      torch.tensor(numels, device=device),
                                      output_size=flat.numel())
    group = torch.tensor(scale_index, device=device)
    out = flat * scales.to(torch.float32)[group][segment]
    if noise:
        count = torch.tensor(numels, dtype=torch.float64, device=device)
        values = flat.to(torch.float64)
        mean = torch.zeros_like(count).index_add_(0, segment, values) / count.clamp(min=1)
        m2 = torch.zeros_like(count).index_add_(0, segment, (values - mean[segment]) ** 2)
        var = torch.where(count > 1, m2 / (count - 1).clamp(min=1), 0.0)
        sigma = (var.sqrt() + eps).to(torch.float32)
        first = torch.tensor(offsets, device=device)
        begin = torch.tensor([0, *numels[:-1]], device=device).cumsum(0)
        index = first[segment] + torch.arange(flat.numel(), device=device) - begin[segment]
        normals = rng.philox_normal(seed, stream, offsets[-1] + numels[-1], device=device)
        out = out + sigma[segment] * normals[index]
    torch._foreach_copy_(tensors, [o.view_as(t) for o, t in zip(out.split(numels), tensors)])


def _cpp_kernel(tensors, scale_index, scales, seed, stream, eps, noise):
    work = ContiguousWork(tensors)
    numels = [t.numel() for t in work.tensors]
    require_cpp().multi_tensor_scale_noise(
        [t.data_ptr() for t in work.tensors], [CPP_DTYPE_CODES[t.dtype] for t in work.tensors],
        numels, stream_offsets(numels), scale_index, scales.data_ptr(), noise, int(seed),
        stream, eps)
    work.write_back()


def _triton_kernel(tensors, scale_index, scales, seed, stream, eps, noise):
    from ..kernels.scale_noise import multi_tensor_scale_noise_ as launch

    work = ContiguousWork(tensors)
    launch(work.tensors, stream_offsets([t.numel() for t in work.tensors]), scale_index, scales,
           noise=noise, seed=seed, stream=stream, eps=eps)
    work.write_back()


def _fake(tensors, scale_index, scales, seed, stream, eps, noise):
    return None


scale_noise_op = _library.define(
    "scale_noise_",
    "(Tensor(a!)[] tensors, int[] scale_index, Tensor scales, Tensor seed, int stream, "
    "float eps, bool noise) -> ()",
    cpu=_cpp_kernel, cuda=_triton_kernel, fake=_fake)


def multi_tensor_scale_noise_(tensors: Sequence[torch.Tensor], scale_index: Sequence[int],
                              scales: torch.Tensor, *, noise: bool, seed: rng.Seed,
                              stream: int = rng.STREAM_NOISE, eps: float = 1e-8,
                              backend: str = "auto") -> None:
    """In place: tensors[t] <- scales[scale_index[t]] * tensors[t] (+ noise).

    Arguments are trusted (validated by the caller): floating tensors on one device, `scales` a
    float32 vector on that device, `seed` an int or an int64 0-dim tensor on that device. The
    noise of element i of tensor t is the Philox normal of flattened index
    stream_offsets(numels)[t] + i under (seed, stream).
    """
    tensors = list(tensors)
    if not tensors:
        return
    device = tensors[0].device
    scales = scales.to(torch.float32).contiguous()
    seed = rng.seed_tensor(seed, device)
    impl = resolve_backend(backend, device)
    args = (tensors, list(scale_index), scales, seed, stream, float(eps), bool(noise))
    if impl == "torch":
        _torch_impl(*args)
    else:
        _library.call(scale_noise_op, _triton_kernel, impl, device, *args)
