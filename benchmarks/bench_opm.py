"""OPM benchmarks: the feature drop + rescale, forward and backward, over all modalities.

Three implementations side by side, each running the drop (p_exe = 1, so every call pays for
it), then the backward pass of the modulated features with a fixed upstream gradient:
- `original`: the T-PAMI code's style (Modality_drop.execute_drop): a numpy coin copied to the
  device and read back for a Python `if`, a Bernoulli mask sampled on the CPU and copied over,
  an autograd Function that calls `theta.item()` in forward and backward, and `masked_select`
  compaction of the rows that kept a modality (a data-dependent size: one more host sync);
- `torch`: the best plain PyTorch: coin and mask drawn on the device, the factor table applied
  by broadcasting, autograd saving what it needs, loss weights instead of compaction, no sync;
- `fastbml[...]`: `fastbml.opm_drop` (one fused pass forward, one backward, mask regenerated).
"""

from __future__ import annotations

import numpy as np
import torch

import fastbml

from .harness import ORIGINAL, PLAIN_TORCH, Case, fastbml_backends, fastbml_impl

P_EXE = 1.0
Q_DOMINANT = 0.6  # q_base 0.4, lambda 1: a clearly dominant first modality


class _OriginalRescale(torch.autograd.Function):
    """The reference's rescale Function: a host read of theta in forward and in backward."""

    @staticmethod
    def forward(ctx, x, theta):
        ctx.theta = theta
        return x / (1.0 - theta.item())

    @staticmethod
    def backward(ctx, grad):
        return grad / (1.0 - ctx.theta.item()), None


def original_opm_drop(features, q, dims):
    device = features[0].device
    batch = features[0].shape[0]
    coin = torch.tensor(np.random.rand()).to(device)
    if coin < 1.0 - P_EXE:  # a Python branch on a device value: one host sync
        return features
    q_cpu = q.cpu()
    mask = torch.bernoulli((1.0 - q_cpu)[:, None].expand(len(features), batch)).to(device)
    mask = mask.unsqueeze(-1)
    theta = (torch.tensor(dims, dtype=torch.float32, device=device) * q).sum() / sum(dims)
    dropped = [_OriginalRescale.apply(f * mask[m], theta) for m, f in enumerate(features)]
    keep = mask.sum(0) > 0  # [B, 1]
    return [torch.masked_select(x, keep).view(-1, x.shape[1]) for x in dropped]


def plain_opm_drop(features, q, dims):
    device = features[0].device
    batch = features[0].shape[0]
    executed = torch.rand((), device=device) >= 1.0 - P_EXE
    keep = torch.rand(len(features), batch, device=device) >= q[:, None]
    theta = (torch.tensor(dims, dtype=torch.float32, device=device) * q).sum() / sum(dims)
    factor = torch.where(executed, keep / (1.0 - theta), 1.0)
    kappa = torch.where(executed, keep.any(0), True).float()
    weights = kappa / kappa.sum().clamp(min=1.0)
    return [f * factor[m, :, None] for m, f in enumerate(features)], weights


def _forward_backward(drop, features, upstream):
    outputs = drop(features)
    torch.autograd.backward(outputs, [g[: o.shape[0]] for o, g in zip(outputs, upstream)])


def cases(device: torch.device) -> list[Case]:
    out: list[Case] = []
    g = torch.Generator(device="cpu").manual_seed(3)
    for dims in ([512, 512], [512, 512, 1024]):
        for batch in (64, 1024):
            features = [torch.randn(batch, d, generator=g).to(device).requires_grad_()
                        for d in dims]
            upstream = [torch.randn(batch, d, generator=g).to(device) for d in dims]
            q = torch.tensor([Q_DOMINANT] + [0.0] * (len(dims) - 1), device=device)
            shape = f"B={batch}, d={dims}, fp32"
            n_bytes = 4 * 4 * batch * sum(dims)  # read x, write y; read dy, write dx

            def clear(fs=features):
                for f in fs:
                    f.grad = None

            def run(drop, fs=features, ups=upstream):
                return lambda: _forward_backward(drop, fs, ups)

            out.append(Case("opm_drop_fwd_bwd", shape, ORIGINAL,
                            run(lambda fs, q=q, d=dims: original_opm_drop(fs, q, d)), setup=clear))
            out.append(Case("opm_drop_fwd_bwd", shape, PLAIN_TORCH,
                            run(lambda fs, q=q, d=dims: plain_opm_drop(fs, q, d)[0]),
                            setup=clear, bytes_moved=n_bytes))
            for backend in fastbml_backends(device):
                out.append(Case("opm_drop_fwd_bwd", shape, fastbml_impl(backend),
                                run(lambda fs, q=q, b=backend: fastbml.opm_drop(
                                    fs, q, p_exe=P_EXE, seed=7, backend=b)[0]),
                                setup=clear, bytes_moved=n_bytes))
    return out
