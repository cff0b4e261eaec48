"""Small encoders for feature inputs: an MLP for vectors, a tiny transformer for sequences."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from .._checks import integer


class MLPEncoder(nn.Module):
    """[B, in_dim] -> `depth` Linear+ReLU layers -> [B, out_dim] (post-ReLU, like pooled CNN features)."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: int = 128, depth: int = 3):
        super().__init__()
        integer(in_dim, "in_dim", low=1)
        self.out_dim = integer(out_dim, "out_dim", low=1)
        integer(hidden, "hidden", low=1)
        integer(depth, "depth", low=1)
        dims = [in_dim] + [hidden] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = []
        for a, b in pairwise(dims):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"MLP input must be [B, {self.in_dim}], got {tuple(x.shape)}")
        return self.net(x)


class TransformerEncoder(nn.Module):
    """[B, L, in_dim] sequence -> projection, learned positions, transformer layers, mean pool -> [B, d_model]."""

    def __init__(self, in_dim: int, max_len: int, d_model: int = 64, heads: int = 4,
                 layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.in_dim = integer(in_dim, "in_dim", low=1)
        self.max_len = integer(max_len, "max_len", low=1)
        self.out_dim = integer(d_model, "d_model", low=1)
        if d_model % integer(heads, "heads", low=1):
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.proj = nn.Linear(in_dim, d_model)
        self.pos = nn.Parameter(torch.zeros(1, max_len, d_model))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, integer(layers, "layers", low=1),
                                            enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[2] != self.in_dim or x.shape[1] > self.max_len:
            raise ValueError(f"sequence input must be [B, L <= {self.max_len}, {self.in_dim}], "
                             f"got {tuple(x.shape)}")
        h = self.blocks(self.proj(x) + self.pos[:, : x.shape[1]])
        return h.mean(dim=1)
