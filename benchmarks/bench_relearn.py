"""D&R re-learning benchmark: soft re-initialisation of two ResNet-18 encoders (docs/methods.md#soft-re-initialisation).

theta <- (1 - a_m) theta + a_m theta_init over every parameter (conv kernels and BN gamma/beta)
of an audio (1-channel) and a visual (3-channel) ResNet-18, fp32:
- `original`: the D&R repository's loop (ours.py): for each named parameter, a Python branch on
  the name and `p.data = (1 - a) * p.data + a * init[name]` (two temporaries per tensor);
- `torch`: the best plain PyTorch: one `torch._foreach_lerp_` per encoder;
- `fastbml[...]`: `fastbml.soft_reinit_`, one multi-tensor lerp for both encoders.
Every call starts from the same "trained" weights (restored, untimed, by `setup`).
"""

from __future__ import annotations

import torch
from torch import nn

import fastbml
from fastbml.models.resnet import ResNet18Trunk

from .harness import ORIGINAL, PLAIN_TORCH, Case, fastbml_backends, fastbml_impl

STRENGTH = {"audio_net": 0.291, "visual_net": 0.537}  # tanh(3 g) for gaps 0.1 and 0.2


def original_soft_reinit(model: nn.Module, init: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        if "audio_net" in name:
            a = STRENGTH["audio_net"]
        elif "visual_net" in name:
            a = STRENGTH["visual_net"]
        else:
            continue
        p.data = (1 - a) * p.data + a * init[name]


def plain_soft_reinit(groups: list[list[nn.Parameter]], inits: list[list[torch.Tensor]]) -> None:
    with torch.no_grad():
        for params, init, a in zip(groups, inits, STRENGTH.values()):
            torch._foreach_lerp_(params, init, a)


def cases(device: torch.device) -> list[Case]:
    torch.manual_seed(0)
    model = nn.ModuleDict({"audio_net": ResNet18Trunk(1), "visual_net": ResNet18Trunk(3)})
    model.to(device)
    init = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():  # stand-in for training: move every weight away from its init
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
    trained = [p.detach().clone() for p in model.parameters()]
    groups = [list(model[key].parameters()) for key in STRENGTH]
    inits = [[init[f"{key}.{name}"] for name, _ in model[key].named_parameters()]
             for key in STRENGTH]

    def restore():  # `original` rebinds p.data, so the parameters are read afresh each time
        torch._foreach_copy_([p.detach() for p in model.parameters()], trained)

    n_elements = sum(t.numel() for t in trained)
    shape = f"2x ResNet-18 params: {len(trained)} tensors, {n_elements / 1e6:.1f}M fp32"
    bytes_moved = 3 * 4 * n_elements  # read theta and theta_init, write theta
    out = [Case("soft_reinit", shape, ORIGINAL, lambda: original_soft_reinit(model, init),
                setup=restore, bytes_moved=bytes_moved),
           Case("soft_reinit", shape, PLAIN_TORCH, lambda: plain_soft_reinit(groups, inits),
                setup=restore, bytes_moved=bytes_moved)]
    for backend in fastbml_backends(device):
        out.append(Case("soft_reinit", shape, fastbml_impl(backend),
                        lambda b=backend: fastbml.soft_reinit_(groups, inits,
                                                               list(STRENGTH.values()), backend=b),
                        setup=restore, bytes_moved=bytes_moved))
    return out
