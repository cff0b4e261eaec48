"""ResNet-18 encoders of the audio-visual references (docs/methods.md#models-and-initialisation), written from scratch.

One ResNet-18 trunk (BasicBlock [2, 2, 2, 2], widths 64/128/256/512); only the stem's input
channels differ: 1 for a spectrogram, 3 for RGB frames, 2 for optical flow (x, y). Frame inputs
run frame-wise and are average-pooled over time and space into one 512-d vector, as the
references do.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

FEATURE_DIM = 512


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet18Trunk(nn.Module):
    """Stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool) and four stages; returns the 512-ch map."""

    def __init__(self, in_channels: int):
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, planes_in = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(planes_in, planes, stride),
                                        BasicBlock(planes, planes, 1)))
            planes_in = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        resnet_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def resnet_init_(module: nn.Module) -> None:
    """ResNet's own init: Kaiming-normal (fan_out, ReLU) convs, BN weight ~ N(1, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class SpectrogramResNet18(nn.Module):
    """Audio encoder: [B, 1, F, T] spectrogram -> ResNet-18 -> 2-D average pool -> [B, 512]."""

    out_dim = FEATURE_DIM

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.trunk = ResNet18Trunk(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # [B, F, T]: one channel
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != self.trunk.in_channels:
            raise ValueError(f"spectrogram input must be [B, {self.trunk.in_channels}, F, T], "
                             f"got {tuple(x.shape)}")
        return torch.flatten(F.adaptive_avg_pool2d(self.trunk(x), 1), 1)


class FrameResNet18(nn.Module):
    """Frame encoder: [B, C, T, H, W] -> ResNet-18 on each of the T frames -> 3-D pool -> [B, 512].

    C = 3 for RGB frames, 2 for optical flow. A 4-D [B, C, H, W] input is one frame.
    """

    out_dim = FEATURE_DIM

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.trunk = ResNet18Trunk(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.unsqueeze(2)
        if x.dim() != 5 or x.shape[1] != self.trunk.in_channels:
            raise ValueError(f"frame input must be [B, {self.trunk.in_channels}, T, H, W], "
                             f"got {tuple(x.shape)}")
        b, c, t, h, w = x.shape
        maps = self.trunk(x.transpose(1, 2).reshape(b * t, c, h, w))
        maps = maps.view(b, t, *maps.shape[1:]).transpose(1, 2)  # [B, 512, T, h, w]
        return torch.flatten(F.adaptive_avg_pool3d(maps, 1), 1)
