"""VAE key map: diffusers `AutoencoderKL` names <-> ldm/BFL single-file names (minigen's names).

The two layouts hold the same tensors. They differ in three ways:

1. Names: diffusers says `down_blocks.{i}.resnets.{j}`, `mid_block.attentions.0.to_q`,
   `conv_norm_out`, ...; ldm says `down.{i}.block.{j}`, `mid.attn_1.q`, `norm_out`, ... (table below).
2. Decoder order: diffusers numbers `decoder.up_blocks` from the deepest level (`up_blocks.0`
   runs first), ldm numbers `decoder.up` by resolution like the encoder (`up.0` runs last).
3. Attention projections: diffusers uses Linear weights [out, in], ldm 1x1 convs [out, in, 1, 1].

SD1.5's diffusers VAE (saved with diffusers 0.6) still uses the old attention names
`query/key/value/proj_attn`; `vae_from_diffusers` accepts them, `vae_to_diffusers` writes the
current names `to_q/to_k/to_v/to_out.0`.
"""

from __future__ import annotations

import re

from torch import Tensor

from minigen.loading.files import required
from minigen.loading.keys import channel_multipliers, count_children
from minigen.models.vae import VAEConfig

# (diffusers, ldm) name fragments, matched between dots and applied in this order.
_RENAMES: list[tuple[str, str]] = [
    ("conv_norm_out", "norm_out"),
    ("mid_block.resnets.0", "mid.block_1"),
    ("mid_block.resnets.1", "mid.block_2"),
    ("mid_block.attentions.0", "mid.attn_1"),
    ("down_blocks", "down"),
    ("up_blocks", "up"),
    ("resnets", "block"),
    ("conv_shortcut", "nin_shortcut"),
    ("downsamplers.0", "downsample"),
    ("upsamplers.0", "upsample"),
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
]

# Attention names of diffusers <= 0.13 checkpoints (read only).
_LEGACY_RENAMES: list[tuple[str, str]] = [
    ("query", "q"),
    ("key", "k"),
    ("value", "v"),
    ("proj_attn", "proj_out"),
]

_ATTENTION_PROJECTION = re.compile(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$")
_DECODER_LEVEL = re.compile(r"^decoder\.up\.(\d+)\.")


def vae_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `AutoencoderKL` state dict -> ldm/BFL names, loadable by `AutoencoderKL`."""
    num_levels = count_children(sd, "decoder.up_blocks.")
    out = {}
    for key, tensor in sd.items():
        key = _flip_decoder_level(_rename(key, _RENAMES + _LEGACY_RENAMES), num_levels)
        if _ATTENTION_PROJECTION.search(key) and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear [o, i] -> 1x1 conv [o, i, 1, 1]
        out[key] = tensor
    return out


def vae_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """ldm/BFL VAE state dict -> diffusers `AutoencoderKL` names (current attention names)."""
    num_levels = count_children(sd, "decoder.up.")
    inverse = [(ldm, diffusers) for diffusers, ldm in reversed(_RENAMES)]
    out = {}
    for key, tensor in sd.items():
        if _ATTENTION_PROJECTION.search(key):
            tensor = tensor.flatten(1)  # 1x1 conv [o, i, 1, 1] -> Linear [o, i]
        out[_rename(_flip_decoder_level(key, num_levels), inverse)] = tensor
    return out


def _rename(key: str, renames: list[tuple[str, str]]) -> str:
    key = f".{key}."  # so that every fragment is matched between dots
    for old, new in renames:
        key = key.replace(f".{old}.", f".{new}.")
    return key[1:-1]


def _flip_decoder_level(ldm_key: str, num_levels: int) -> str:
    """decoder.up.{i} <-> decoder.up.{num_levels - 1 - i}: the two numberings of the decoder levels."""
    return _DECODER_LEVEL.sub(lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.", ldm_key)


def vae_config_from_diffusers(config: dict) -> VAEConfig:
    """The VAEConfig of a diffusers `vae/config.json`."""
    channels = config["block_out_channels"]
    if config.get("latents_mean") is not None or config.get("latents_std") is not None:
        raise ValueError("vae config sets latents_mean / latents_std (an EDM model such as Playground v2.5): minigen's "
                         "autoencoder scales latents by scaling_factor and shift_factor only")
    return VAEConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        base_channels=channels[0],
        channel_mult=channel_multipliers(channels, "vae config block_out_channels"),
        num_res_blocks=config.get("layers_per_block", 2),
        z_channels=config["latent_channels"],
        scaling_factor=config.get("scaling_factor", 0.18215),
        shift_factor=config.get("shift_factor") or 0.0,
        use_quant_conv=config.get("use_quant_conv", True),
        norm_groups=config.get("norm_num_groups", 32),
    )


def vae_config_from_keys(weights: dict[str, Tensor], scaling_factor: float, shift_factor: float = 0.0) -> VAEConfig:
    """The VAEConfig of ldm-named VAE weights (channels, levels, blocks, latent width from shapes).

    The latent scale and shift are not in the weights: the caller knows them from the model family.
    """
    base = required(weights, "encoder.conv_in.weight").shape[0]
    levels = count_children(weights, "encoder.down.")
    widths = [required(weights, f"encoder.down.{i}.block.0.conv2.weight").shape[0] for i in range(levels)]
    mult = channel_multipliers([base, *widths], "vae weights")[1:]
    blocks = count_children(weights, "encoder.down.0.block.")
    return VAEConfig(
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=blocks,
        z_channels=required(weights, "decoder.conv_in.weight").shape[1],
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv="quant_conv.weight" in weights,
        norm_groups=min(32, base // 2),  # not visible in the weights: 32 for every official VAE
    )
