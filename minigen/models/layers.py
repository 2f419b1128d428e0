"""Linear and Conv2d that accept the call's controls, and the sinusoidal timestep embedding.

Every Linear/Conv2d of minigen's denoisers is one of these. Each knows its module `path` (the
checkpoint key without `.weight`), set once by `name_layers`, so a `LowRank` residual in the
controls can target it by name. Without controls they are exactly nn.Linear / nn.Conv2d.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from minigen.controls import Controls


class Linear(nn.Linear):
    path: str = ""

    def forward(self, x: Tensor, controls: Controls | None = None) -> Tensor:
        y = super().forward(x)
        return y if controls is None else controls.add_low_rank(self.path, x, y, self)


class Conv2d(nn.Conv2d):
    path: str = ""

    def forward(self, x: Tensor, controls: Controls | None = None) -> Tensor:
        y = super().forward(x)
        return y if controls is None else controls.add_low_rank(self.path, x, y, self)


def run(layers: nn.Sequential, x: Tensor, controls: Controls | None = None) -> Tensor:
    """Apply a Sequential's layers in order, giving the controls to the Linear/Conv2d among them."""
    for layer in layers:
        x = layer(x, controls) if isinstance(layer, (Linear, Conv2d)) else layer(x)
    return x


def name_layers(model: nn.Module) -> None:
    """Give every minigen Linear/Conv2d in `model` its path, e.g. `output_blocks.3.1.proj_out`."""
    for name, module in model.named_modules():
        if isinstance(module, (Linear, Conv2d)):
            module.path = name


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding [B] -> [B, dim], cosines first (the ldm and SD convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
