"""Parameter shapes of the audio-visual ResNet-18 encoders (docs/methods.md#models-and-initialisation), without building models."""

from __future__ import annotations

import torch


def resnet18_conv_shapes(in_channels: int) -> list[tuple[int, ...]]:
    """The 20 conv kernels of a ResNet-18 (stem, 16 block convs, 3 downsample 1x1 convs)."""
    shapes = [(64, in_channels, 7, 7)]
    width = 64
    for stage, out in enumerate((64, 128, 256, 512)):
        for block in range(2):
            first = stage > 0 and block == 0
            shapes.append((out, width if block == 0 else out, 3, 3))
            shapes.append((out, out, 3, 3))
            if first:
                shapes.append((out, width, 1, 1))
        width = out
    return shapes


def audio_visual_conv_grads(device: torch.device, dtype: torch.dtype = torch.float32,
                            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random stand-ins for the conv gradients of an audio (1-channel) and a visual encoder."""
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda s: (torch.randn(s, generator=g) * 1e-3).to(device=device, dtype=dtype)  # noqa: E731
    return ([make(s) for s in resnet18_conv_shapes(1)], [make(s) for s in resnet18_conv_shapes(3)])
