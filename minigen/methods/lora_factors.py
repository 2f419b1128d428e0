"""Trainable LoRA factor pairs on named Linear layers: what ED-LoRA training (edlora_training.py) and
AlignGen's reference LoRA (aligngen.py) learn, applied as `LowRank` controls (`Controls(low_rank=...)`) or
as merged weights (`functional_call`).

Down factors start as nn.Linear draws its weights (PEFT's and the official lora_down's start), up factors
at zero, so a fresh LoRA leaves the model unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from minigen.controls import LowRank
from minigen.loading.edlora import Factors


def initial_down(rank: int, in_features: int, generator: torch.Generator | None = None) -> Tensor:
    """A LoRA down factor [rank, in_features] as nn.Linear draws its weight and PEFT / the official
    lora_down start: kaiming_uniform_(a=√5), i.e. uniform in ±1/√in_features."""
    bound = 1 / math.sqrt(in_features)
    return (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound


def check_rank(rank: int, weights: Iterable[Tensor]) -> None:
    """A LoRA rank of at least 1 and at most the smaller side of the narrowest layer it trains: ΔW = up @ down of an
    [out, in] layer has rank min(out, in) at most, so the rest adds nothing but memory (rank 100000 ran out of it)."""
    if rank < 1:
        raise ValueError(f"the LoRA rank must be at least 1, got {rank}")
    if rank > (widest := min(min(weight.shape) for weight in weights)):
        raise ValueError(f"the LoRA rank {rank} is above {widest}, the smaller side of the narrowest layer it trains; give at most {widest}")


class LoRAFactors(nn.Module):
    """LoRA factor pairs on named Linear layers of one model: down[i] [r, in], up[i] [out, r] on `targets[i]`.

    `targets` are the model's own module paths, `names` the same layers as the official files spell them.
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, str], rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.targets, self.names = list(layers), list(layers.values())
        check_rank(rank, [model.get_submodule(target).weight for target in self.targets])
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        for target in self.targets:
            weight = model.get_submodule(target).weight  # [out, in]
            out_features, in_features = weight.shape
            self.down.append(nn.Parameter(initial_down(rank, in_features, generator).to(weight.device)))
            self.up.append(nn.Parameter(torch.zeros(out_features, rank, device=weight.device)))

    def low_rank(self, scale: float = 1.0) -> list[LowRank]:
        """The factors as `LowRank` residuals for `Controls(low_rank=...)`; autograd flows into them."""
        return [LowRank(target, down, up, scale) for target, down, up in zip(self.targets, self.down, self.up)]

    def merged_weights(self, model: nn.Module, scale: float = 1.0) -> dict[str, Tensor]:
        """{"<target>.weight": W + scale · up @ down}, for `functional_call`: differentiable in the factors."""
        merged = {}
        for target, down, up in zip(self.targets, self.down, self.up):
            weight = model.get_submodule(target).weight  # [out, in], frozen
            merged[f"{target}.weight"] = weight + scale * (up @ down).to(weight.dtype)
        return merged

    def factors(self) -> dict[str, Factors]:
        """{file path: Factors}: detached fp32 CPU copies under the official names."""
        return {name: Factors(cpu_copy(down), cpu_copy(up)) for name, down, up in zip(self.names, self.down, self.up)}


def cpu_copy(tensor: Tensor) -> Tensor:
    """A detached fp32 copy on the CPU, for a file."""
    return tensor.detach().float().cpu().clone()
