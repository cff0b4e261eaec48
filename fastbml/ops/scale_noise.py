"""`multi_tensor_scale_noise_`: x <- scale * x (+ (unbiased std(x) + eps) * N(0, 1)) over many
tensors, and `multi_tensor_moments`: each tensor's (count, sum, sum of squares).

The std is that of each tensor's values *before* scaling, or one the caller supplies (the std
of a whole tensor of which the op is given a shard: docs/design.md#fsdp2). A
tensor with one element has no unbiased std; its noise std is `eps`. Non-finite values are not
masked: a tensor that holds inf/NaN comes out non-finite (its std is non-finite), the other
tensors are unaffected. Registered as `torch.ops.fastbml.scale_noise_` and
`torch.ops.fastbml.moments`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import rng
from ..backend import require_cpp, resolve_backend
from . import _library
from ._multi_tensor import CPP_DTYPE_CODES, ContiguousWork, stream_offsets


def _segments(tensors):
    """The tensors' values flattened into one float32 vector, and each value's tensor index."""
    device = tensors[0].device
    numels = [t.numel() for t in tensors]
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
    segment = torch.repeat_interleave(torch.arange(len(tensors), device=device),
                                      torch.tensor(numels, device=device),
                                      output_size=flat.numel())
    return flat, segment


def _torch_impl(tensors, scale_index, scales, seed, stream, eps, noise, offsets, std):
    device = tensors[0].device
    numels = [t.numel() for t in tensors]
    flat, segment = _segments(tensors)
    group = torch.tensor(scale_index, device=device)
    out = flat * scales.to(torch.float32)[group][segment]
    if noise:
        if std is None:
            count = torch.tensor(numels, dtype=torch.float64, device=device)
            values = flat.to(torch.float64)
            mean = torch.zeros_like(count).index_add_(0, segment, values) / count.clamp(min=1)
            m2 = torch.zeros_like(count).index_add_(0, segment, (values - mean[segment]) ** 2)
            std = torch.where(count > 1, m2 / (count - 1).clamp(min=1), 0.0).sqrt()
        sigma = (std.to(torch.float64) + eps).to(torch.float32)
        # each tensor's own index range: a shard draws its indices only, never the whole stream
        normals = torch.cat([rng.philox_normal(seed, stream, n, offset=o, device=device)
                             for n, o in zip(numels, offsets)])
        out = out + sigma[segment] * normals
    torch._foreach_copy_(tensors, [o.view_as(t) for o, t in zip(out.split(numels), tensors)])


def _cpp_kernel(tensors, scale_index, scales, seed, stream, eps, noise, offsets, std):
    work = ContiguousWork(tensors)
    require_cpp().multi_tensor_scale_noise(
        [t.data_ptr() for t in work.tensors], [CPP_DTYPE_CODES[t.dtype] for t in work.tensors],
        [t.numel() for t in work.tensors], offsets, scale_index, scales.data_ptr(), noise,
        int(seed), stream, eps, 0 if std is None else std.data_ptr())
    work.write_back()


def _triton_kernel(tensors, scale_index, scales, seed, stream, eps, noise, offsets, std):
    from ..kernels.scale_noise import multi_tensor_scale_noise_ as launch

    work = ContiguousWork(tensors)
    launch(work.tensors, offsets, scale_index, scales, noise=noise, seed=seed, stream=stream,
           eps=eps, std=std)
    work.write_back()


def _fake(tensors, scale_index, scales, seed, stream, eps, noise, offsets, std):
    return None


scale_noise_op = _library.define(
    "scale_noise_",
    "(Tensor(a!)[] tensors, int[] scale_index, Tensor scales, Tensor seed, int stream, "
    "float eps, bool noise, int[] offsets, Tensor? std) -> ()",
    cpu=_cpp_kernel, cuda=_triton_kernel, fake=_fake)


def multi_tensor_scale_noise_(tensors: Sequence[torch.Tensor], scale_index: Sequence[int],
                              scales: torch.Tensor, *, noise: bool, seed: rng.Seed,
                              stream: int = rng.STREAM_NOISE, eps: float = 1e-8,
                              shards: Sequence[tuple[int, int]] | None = None,
                              std: torch.Tensor | None = None, backend: str = "auto") -> None:
    """In place: tensors[t] <- scales[scale_index[t]] * tensors[t] (+ noise).

    Arguments are trusted (validated by the caller): floating tensors on one device, `scales` a
    float32 vector on that device, `seed` an int or an int64 0-dim tensor on that device. The
    noise of element i of tensor t is the Philox normal of flattened index
    stream_offsets(numels)[t] + i under (seed, stream). A tensor may be a contiguous part of a
    whole one (a shard): shards[t] = (numel of the whole tensor, flattened index of tensors[t]'s
    first element in it) makes its elements draw the whole tensors' indices
    (docs/design.md#rng). The noise std is std[t] + eps, with `std` each tensor's unbiased std
    by default, or a [T] device tensor given by the caller (cast to float64).
    """
    tensors = list(tensors)
    if not tensors:
        return
    device = tensors[0].device
    scales = scales.to(torch.float32).contiguous()
    seed = rng.seed_tensor(seed, device)
    if shards is None:
        offsets = stream_offsets([t.numel() for t in tensors])
    else:
        whole, first = zip(*shards)
        offsets = [start + i for start, i in zip(stream_offsets(whole), first)]
    if std is not None:
        std = std.to(torch.float64).contiguous()
    impl = resolve_backend(backend, device)
    args = (tensors, list(scale_index), scales, seed, stream, float(eps), bool(noise), offsets,
            std)
    if impl == "torch":
        _torch_impl(*args)
    else:
        _library.call(scale_noise_op, _triton_kernel, impl, device, *args)


def _moments_torch(tensors):
    device = tensors[0].device
    flat, segment = _segments(tensors)
    values = flat.to(torch.float64)
    out = torch.zeros(len(tensors), 3, dtype=torch.float64, device=device)
    out[:, 0] = torch.tensor([float(t.numel()) for t in tensors], dtype=torch.float64,
                             device=device)
    out[:, 1].index_add_(0, segment, values)
    out[:, 2].index_add_(0, segment, values * values)
    return out


def _moments_cpp(tensors):
    work = ContiguousWork(tensors)
    out = torch.empty(len(tensors), 3, dtype=torch.float64)
    require_cpp().multi_tensor_moments([t.data_ptr() for t in work.tensors],
                                       [CPP_DTYPE_CODES[t.dtype] for t in work.tensors],
                                       [t.numel() for t in work.tensors], out.data_ptr())
    return out


def _moments_triton(tensors):
    from ..kernels.scale_noise import multi_tensor_moments as launch

    work = ContiguousWork(tensors)
    out = torch.empty(len(tensors), 3, dtype=torch.float64, device=tensors[0].device)
    launch(work.tensors, out)
    return out


def _moments_fake(tensors):
    return tensors[0].new_empty((len(tensors), 3), dtype=torch.float64)


moments_op = _library.define("moments", "(Tensor[] tensors) -> Tensor", cpu=_moments_cpp,
                             cuda=_moments_triton, fake=_moments_fake)


def multi_tensor_moments(tensors: Sequence[torch.Tensor], *,
                         backend: str = "auto") -> torch.Tensor:
    """Each tensor's (count, sum, sum of squares) as a float64 [T, 3] tensor on their device.

    Trusted arguments: at least one floating tensor, all on one device. Sums of shards add up
    to the sums of the whole tensor, so an all-reduce of the rows gives its moments, from which
    `std_of_moments` gives its std.
    """
    tensors = list(tensors)
    device = tensors[0].device
    impl = resolve_backend(backend, device)
    if impl == "torch":
        return _moments_torch(tensors)
    return _library.call(moments_op, _moments_triton, impl, device, tensors)


def std_of_moments(moments: torch.Tensor) -> torch.Tensor:
    """The unbiased std [T] (float64) of each row's (count, sum, sum of squares); 0 where the
    count is below 2. Exact to float64 rounding unless a tensor's |mean| dwarfs its std (the
    variance is the difference of two sums of squares)."""
    count, total, squares = moments.unbind(1)
    var = (squares - total * total / count.clamp(min=1)) / (count - 1).clamp(min=1)
    return torch.where(count > 1, var.clamp(min=0), 0.0).sqrt()
