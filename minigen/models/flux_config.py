"""FLUX.1 transformer configuration: the numbers of BFL's `flux.util.configs`, as a dataclass.

dev and schnell share every shape; dev adds the guidance embedding (`guidance_in`), a second
timestep-like input through which the distilled model takes its guidance strength.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 64  # 16 latent channels x a 2x2 patch
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled output
    context_in_dim: int = 4096  # T5-XXL hidden size
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE channels per id axis (axis, row, col); sums to head_dim
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


_DEV = FluxConfig()

PRESETS: dict[str, FluxConfig] = {
    "flux-dev": _DEV,
    "flux-schnell": replace(_DEV, guidance_embed=False),
    # a few blocks of the real width: the benchmark's mid-size model
    "flux-mid": replace(_DEV, depth=2, depth_single_blocks=4),
}
