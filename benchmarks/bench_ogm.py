"""OGM-GE benchmarks: scores, and the whole OGM-GE step on two ResNet-18 encoders' conv grads.

Three implementations side by side:
- `original`: the authors' style (OGM-GE main.py): scores by a Python loop over the batch,
  a Python branch on the ratio, and per tensor `std().item()` plus a fresh `normal_` buffer;
- `torch`: the best plain PyTorch: vectorised scores, device-side coefficients, per-tensor std
  without `.item()`, `randn_like` and `_foreach_*` updates;
- `fastbml[...]`: `fastbml.OGM`'s path: scores kernel + one multi-tensor modulation.
"""

from __future__ import annotations

import math

import torch

import fastbml

from .harness import ORIGINAL, PLAIN_TORCH, Case, fastbml_backends, fastbml_impl
from .resnet_shapes import audio_visual_conv_grads

ALPHA = 0.8


def original_scores(out_a, out_v, labels):
    softmax = torch.nn.Softmax(dim=1)
    score_a = sum(softmax(out_a)[i][labels[i]] for i in range(out_a.size(0)))
    score_v = sum(softmax(out_v)[i][labels[i]] for i in range(out_v.size(0)))
    return score_a, score_v


def original_ogm_ge_step(params_a, params_v, out_a, out_v, labels):
    score_a, score_v = original_scores(out_a, out_v, labels)
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:  # a Python branch on a device value: one host sync
        coeff_v, coeff_a = 1 - math.tanh(ALPHA * ratio_v.item()), 1.0
    else:
        coeff_a, coeff_v = 1 - math.tanh(ALPHA * ratio_a.item()), 1.0
    for params, coeff in ((params_a, coeff_a), (params_v, coeff_v)):
        for p in params:
            noise = torch.zeros_like(p.grad).normal_(0, p.grad.std().item() + 1e-8)
            p.grad = p.grad * coeff + noise


def plain_scores(out_a, out_v, labels):
    logits = torch.stack((out_a, out_v)).float()
    index = labels.expand(2, -1).unsqueeze(-1)
    return logits.log_softmax(-1).gather(-1, index).squeeze(-1).exp().sum(1)


def plain_ogm_ge_step(params_a, params_v, out_a, out_v, labels):
    grads_a, grads_v = [p.grad for p in params_a], [p.grad for p in params_v]
    s = plain_scores(out_a, out_v, labels)
    rho = s / s.flip(0)
    k = torch.where(rho > 1, 1 - torch.tanh(ALPHA * rho), torch.ones_like(rho))
    grads = grads_a + grads_v
    stds = [g.std() + 1e-8 for g in grads]
    noise = [torch.randn_like(g) for g in grads]
    torch._foreach_mul_(grads_a, k[0])
    torch._foreach_mul_(grads_v, k[1])
    torch._foreach_addcmul_(grads, noise, stds)


def _score_inputs(batch, classes, device):
    g = torch.Generator(device="cpu").manual_seed(1)
    out_a, out_v = (torch.randn(batch, classes, generator=g).to(device) for _ in range(2))
    labels = torch.randint(0, classes, (batch,), generator=g).to(device)
    return out_a, out_v, labels


def cases(device: torch.device) -> list[Case]:
    out: list[Case] = []
    for batch, classes in ((64, 31), (256, 400)):
        out_a, out_v, labels = _score_inputs(batch, classes, device)
        shape = f"B={batch}, C={classes}, M=2"
        out.append(Case("scores", shape, ORIGINAL, lambda a=out_a, v=out_v, y=labels:
                        original_scores(a, v, y)))
        out.append(Case("scores", shape, PLAIN_TORCH, lambda a=out_a, v=out_v, y=labels:
                        plain_scores(a, v, y)))
        for backend in fastbml_backends(device):
            out.append(Case("scores", shape, fastbml_impl(backend),
                            lambda a=out_a, v=out_v, y=labels, b=backend:
                            fastbml.modality_scores([a, v], y, backend=b)))

    params = []
    for grads in audio_visual_conv_grads(device):
        group = [torch.nn.Parameter(torch.empty_like(g)) for g in grads]
        for p, g in zip(group, grads):
            p.grad = g
        params.append(group)
    pristine = [p.grad.clone() for group in params for p in group]
    n_elements = sum(g.numel() for g in pristine)
    shape = f"2x ResNet-18 conv grads: {len(pristine)} tensors, {n_elements / 1e6:.1f}M fp32"
    out_a, out_v, labels = _score_inputs(64, 31, device)

    def restore():
        torch._foreach_copy_([p.grad for group in params for p in group], pristine)

    step_args = (params[0], params[1], out_a, out_v, labels)
    out.append(Case("ogm_ge_step", shape, ORIGINAL, lambda: original_ogm_ge_step(*step_args),
                    setup=restore))
    out.append(Case("ogm_ge_step", shape, PLAIN_TORCH, lambda: plain_ogm_ge_step(*step_args),
                    setup=restore))
    coeffs = torch.tensor([0.336, 1.0], device=device)
    for backend in fastbml_backends(device):
        ogm = fastbml.OGM({"audio": params[0], "visual": params[1]}, alpha=ALPHA, seed=0,
                          backend=backend)
        out.append(Case("ogm_ge_step", shape, fastbml_impl(backend),
                        lambda o=ogm: o.step([out_a, out_v], labels, epoch=0), setup=restore,
                        bytes_moved=2 * 4 * n_elements))
        out.append(Case("ogm_ge_modulate", shape, fastbml_impl(backend),
                        lambda b=backend: fastbml.ogm_modulate_(params, coeffs, seed=1, backend=b),
                        setup=restore, bytes_moved=2 * 4 * n_elements))
    return out
