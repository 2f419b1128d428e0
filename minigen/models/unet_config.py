"""Configuration of the Stable Diffusion UNet family (SD1.x, SD2.x, SDXL).

The fields follow the ldm/sgm `UNetModel` arguments, so a config reads like the official YAML
files, and every preset is data: SD2.x is one preset away from SD1.x.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class UNetConfig:
    # Channels of the UNet's input: the latent (4), and for inpainting UNets (SD1.5 and SDXL
    # inpainting) also the mask (1) and the masked image's latent (4): 9. Loaders read it off the
    # first conv's weight (input_blocks.0.0 / conv_in: [model_channels, in_channels, 3, 3]).
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Transformer blocks per SpatialTransformer at each level; 0 means the level has no attention.
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    # Attention heads: either a fixed head count (SD1.x) or a fixed head width (SD2.x, SDXL).
    num_heads: int | None = 8
    head_dim: int | None = None
    context_dim: int = 768
    use_linear_proj: bool = False  # proj_in/proj_out as Linear (SD2, SDXL) instead of 1x1 conv
    adm_in_channels: int | None = None  # SDXL: pooled text + size/crop embeddings (2816)
    norm_groups: int = 32

    def __post_init__(self):
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("UNetConfig: set exactly one of num_heads (SD1.x) and head_dim (SD2.x, SDXL)")
        if len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError(
                f"UNetConfig: transformer_depth has {len(self.transformer_depth)} levels but "
                f"channel_mult has {len(self.channel_mult)}; give one depth per level"
            )

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of an attention layer with `channels` channels."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        return channels // self.head_dim, self.head_dim


PRESETS: dict[str, UNetConfig] = {
    "sd15": UNetConfig(),
    "sd15-inpainting": UNetConfig(in_channels=9),
    "sd21": UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_proj=True),
    "sdxl": UNetConfig(
        channel_mult=(1, 2, 4),
        transformer_depth=(0, 2, 10),
        transformer_depth_middle=10,
        num_heads=None,
        head_dim=64,
        context_dim=2048,
        use_linear_proj=True,
        adm_in_channels=2816,
    ),
}
PRESETS["sdxl-inpainting"] = replace(PRESETS["sdxl"], in_channels=9)
