"""UNet key names: diffusers <-> ldm/sgm (the official single-file names minigen's UNet uses).

The two layouts hold the same tensors under different module paths. ldm numbers its blocks in one
flat sequence; diffusers nests them by resolution level:

    ldm                                   diffusers
    time_embed.{0,2}                      time_embedding.linear_{1,2}
    label_emb.0.{0,2}        (SDXL)       add_embedding.linear_{1,2}
    input_blocks.0.0                      conv_in
    input_blocks.b.0         (ResBlock)   down_blocks.l.resnets.i
    input_blocks.b.1         (attention)  down_blocks.l.attentions.i
    input_blocks.b.0.op      (downsample) down_blocks.l.downsamplers.0.conv
    middle_block.{0,1,2}                  mid_block.{resnets.0, attentions.0, resnets.1}
    output_blocks.b.{0,1}                 up_blocks.u.{resnets,attentions}.i   (u counts from the deepest level)
    output_blocks.b.{1|2}.conv            up_blocks.u.upsamplers.0.conv
    out.{0,2}                             conv_norm_out, conv_out

Inside a ResBlock the layer names differ (`RESNET_NAMES`); inside a SpatialTransformer they are
identical. Shapes need no change: proj_in/proj_out are 1x1 convs [o, i, 1, 1] in both layouts for
SD1.x and Linear [o, i] in both for SD2.x/SDXL, because diffusers' `use_linear_projection` is set
exactly where ldm's `use_linear_in_transformer` is (checked on the official manifests).

The table of module pairs is derived from a UNetConfig by walking the levels, so SD1.x, SD2.x,
SDXL and the tiny test configs share one rule set.
"""

from __future__ import annotations

import warnings

import logging
from collections.abc import Mapping
from dataclasses import replace

import torch

from minigen.loading.detect import UNET_PREFIX, CheckpointError
from minigen.loading.keys import channel_multipliers, count_children, take_prefix
from minigen.models.unet_config import UNetConfig

log = logging.getLogger(__name__)

# diffusers ResnetBlock2D layer -> ldm ResBlock layer
RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def module_pairs(config: UNetConfig) -> list[tuple[str, str]]:
    """(ldm name, diffusers name) of every module whose parameters the two layouts share."""
    pairs = [
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ]
    if config.adm_in_channels is not None:
        pairs += [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")]

    def resblock(ldm: str, diffusers: str) -> list[tuple[str, str]]:
        return [(f"{ldm}.{ours}", f"{diffusers}.{theirs}") for theirs, ours in RESNET_NAMES.items()]

    levels = len(config.channel_mult)
    n = config.num_res_blocks

    # Encoder: per level, n ResBlocks (each followed by attention where the level has it), then
    # a downsampler on every level but the deepest.
    block = 1
    for level in range(levels):
        attention = config.transformer_depth[level] > 0
        for i in range(n):
            pairs += resblock(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{i}")
            if attention:
                pairs.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{i}"))
            block += 1
        if level < levels - 1:
            pairs.append((f"input_blocks.{block}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
            block += 1

    pairs += resblock("middle_block.0", "mid_block.resnets.0")
    pairs.append(("middle_block.1", "mid_block.attentions.0"))
    pairs += resblock("middle_block.2", "mid_block.resnets.1")

    # Decoder: from the deepest level up, n + 1 ResBlocks per level (one more than the encoder, to
    # consume every skip connection), the last followed by an upsampler on all but the top level.
    block = 0
    for up, level in enumerate(reversed(range(levels))):
        attention = config.transformer_depth[level] > 0
        for i in range(n + 1):
            pairs += resblock(f"output_blocks.{block}.0", f"up_blocks.{up}.resnets.{i}")
            if attention:
                pairs.append((f"output_blocks.{block}.1", f"up_blocks.{up}.attentions.{i}"))
            if i == n and level > 0:
                upsampler = 2 if attention else 1
                pairs.append((f"output_blocks.{block}.{upsampler}.conv", f"up_blocks.{up}.upsamplers.0.conv"))
            block += 1
    return pairs


def unet_from_diffusers(sd: Mapping[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> minigen/ldm keys (without `model.diffusion_model.`)."""
    return _rename(sd, {diffusers: ldm for ldm, diffusers in module_pairs(config)}, "diffusers")


def unet_to_diffusers(sd: Mapping[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """minigen/ldm UNet keys (without `model.diffusion_model.`) -> diffusers UNet2DConditionModel keys."""
    return _rename(sd, dict(module_pairs(config)), "ldm")


def _rename(sd: Mapping[str, torch.Tensor], modules: dict[str, str], source: str) -> dict[str, torch.Tensor]:
    """Rename each key by its longest module path found in `modules`; the tensors are not touched."""
    renamed: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in modules:
                renamed[".".join([modules[module], *parts[cut:]])] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} keys are not {source} UNet keys of this UNetConfig, e.g. {unknown[:10]}. "
            "Check that the file is a UNet of the configured model (see minigen.loading.detect)."
        )
    return renamed


# --- configs ------------------------------------------------------------------------------------

# diffusers UNet2DConditionModel settings minigen's UNet implements (the ldm/sgm architecture);
# the first value of each is diffusers' default. A config.json with another value is refused.
SUPPORTED_DIFFUSERS_SETTINGS: dict[str, tuple] = {
    "act_fn": ("silu",),
    "center_input_sample": (False,),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "time_embedding_type": ("positional",),
    "time_cond_proj_dim": (None,),
    "class_embed_type": (None,),
    "addition_embed_type": (None, "text_time"),
    "encoder_hid_dim": (None,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "reverse_transformer_layers_per_block": (None,),
    "norm_eps": (1e-5,),
    "resnet_out_scale_factor": (1.0,),
    "mid_block_scale_factor": (1,),
    "timestep_post_act": (None,),
    "time_embedding_act_fn": (None,),
}


def unet_config_from_diffusers(config_json: Mapping) -> UNetConfig:
    """UNetConfig of a diffusers `unet/config.json`.

    diffusers' `attention_head_dim` historically holds the number of heads (SD1.5: 8;
    SDXL: [5, 10, 20]); `num_attention_heads`, when set, is the same thing. A constant head count
    becomes `num_heads`, a constant head width (channels / heads, 64 for SD2.x and SDXL) `head_dim`;
    where both are constant (a single attention level) the two descriptions build the same model.
    """
    for field, allowed in SUPPORTED_DIFFUSERS_SETTINGS.items():
        value = config_json.get(field, allowed[0])
        if value not in allowed:
            raise ValueError(f"unet config sets {field}={value!r}; minigen's UNet implements {field} in {allowed}")

    widths = list(config_json["block_out_channels"])
    channel_mult = channel_multipliers(widths, "unet config block_out_channels")
    levels = len(widths)
    attention = ["CrossAttn" in kind for kind in config_json["down_block_types"]]
    up_attention = ["CrossAttn" in kind for kind in reversed(config_json["up_block_types"])]
    if up_attention != attention:
        raise ValueError("unet config: up_block_types must mirror down_block_types (attention at the same levels)")
    depths = _per_level(config_json.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block")
    heads = _per_level(
        config_json.get("num_attention_heads") or config_json["attention_head_dim"], levels, "attention_head_dim"
    )

    # Head counts and widths of every attention layer: the attention levels, then the middle block
    # (diffusers gives the middle block the settings of the deepest level).
    used = [i for i in range(levels) if attention[i]] + [levels - 1]
    counts = {heads[i] for i in used}
    head_widths = {widths[i] // heads[i] for i in used}
    if len(head_widths) == 1:
        num_heads, head_dim = None, head_widths.pop()
    elif len(counts) == 1:
        num_heads, head_dim = counts.pop(), None
    else:
        raise ValueError(f"unet config: neither the head count nor the head width is constant ({heads=}, {widths=})")

    adm = config_json.get("projection_class_embeddings_input_dim")
    return UNetConfig(
        in_channels=config_json["in_channels"],
        out_channels=config_json["out_channels"],
        model_channels=widths[0],
        channel_mult=channel_mult,
        num_res_blocks=_constant(config_json["layers_per_block"], "layers_per_block"),
        transformer_depth=tuple(d if a else 0 for d, a in zip(depths, attention)),
        transformer_depth_middle=depths[-1],
        num_heads=num_heads,
        head_dim=head_dim,
        context_dim=config_json["cross_attention_dim"],
        use_linear_proj=config_json.get("use_linear_projection", False),
        adm_in_channels=adm if config_json.get("addition_embed_type") == "text_time" else None,
        norm_groups=config_json.get("norm_num_groups", 32),
    )


def with_weight_channels(config: UNetConfig, weights: Mapping[str, torch.Tensor], source: str = "unet") -> UNetConfig:
    """`config` with the input and output channels the diffusers-named `weights` have: conv_in.weight is
    [model_channels, in_channels, 3, 3] and conv_out.weight [out_channels, model_channels, 3, 3].

    The weights decide, as they do for single files (`unet_config_from_keys`): an inpainting UNet
    (SD1.5 / SDXL inpainting) reads 9 channels, the latent, the mask and the masked image's latent.
    A config.json that states other numbers is logged and overruled; weights without conv_in /
    conv_out leave `config` as it is (`load_exact` then names the missing keys).
    """
    found = {
        field: weights[key].shape[axis]
        for field, key, axis in (("in_channels", "conv_in.weight", 1), ("out_channels", "conv_out.weight", 0))
        if key in weights and weights[key].ndim == 4
    }
    for field, channels in found.items():
        if getattr(config, field) != channels:
            log.warning("%s: config.json states %s=%d, its weights have %d; using %d", source, field,
                        getattr(config, field), channels, channels)
    return replace(config, **found)


def _per_level(value: int | list[int], levels: int, name: str) -> list[int]:
    """A diffusers setting given once or per level, as a list of `levels` values."""
    if isinstance(value, int):
        return [value] * levels
    if len(value) != levels:
        raise ValueError(f"unet config: {name}={value} should give one value per level ({levels})")
    return list(value)


def _constant(value: int | list[int], name: str) -> int:
    """A diffusers setting that minigen's UNet needs to be the same at every level."""
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ValueError(f"unet config: {name}={value} varies by level; minigen's UNet uses one value for all levels")
    return value[0]


def unet_config_from_keys(sd: Mapping[str, torch.Tensor]) -> UNetConfig:
    """UNetConfig of an ldm/sgm UNet state dict (with or without the `model.diffusion_model.` prefix).

    Channels, levels, depths, context width, SDXL's adm input and linear projections are read from
    shapes. The attention heads are not visible in the weights; the official models settle them by
    text encoder: SD1.x (CLIP-L, context 768) uses 8 heads, SD2.x and SDXL use 64-wide heads.
    GroupNorm's group count is not visible either: 32, as in every official model.
    """
    prefix = UNET_PREFIX if f"{UNET_PREFIX}input_blocks.0.0.weight" in sd else ""
    unet = take_prefix(sd, prefix)
    if "input_blocks.0.0.weight" not in unet:
        raise CheckpointError("not an ldm UNet state dict: no (model.diffusion_model.)input_blocks.0.0.weight key")

    in_channels, model_channels = unet["input_blocks.0.0.weight"].shape[1], unet["input_blocks.0.0.weight"].shape[0]
    num_input_blocks = count_children(unet, "input_blocks.")
    downsamplers = [b for b in range(num_input_blocks) if f"input_blocks.{b}.0.op.weight" in unet]
    num_res_blocks = downsamplers[0] - 1 if downsamplers else num_input_blocks - 1
    first_blocks = [1 + level * (num_res_blocks + 1) for level in range(len(downsamplers) + 1)]

    context_dim = next(t.shape[1] for key, t in unet.items() if key.endswith("attn2.to_k.weight"))
    proj_in = next(t for key, t in unet.items() if key.endswith("proj_in.weight"))
    label_emb = unet.get("label_emb.0.0.weight")
    if context_dim not in (768, 1024, 2048):  # SD1.x, SD2.x, SDXL: the head counts below are theirs
        warnings.warn(f"this UNet reads {context_dim}-wide text, none of SD1.x/SD2.x/SDXL's, so its attention heads are a guess "
                      "(64 wide) that no weight can confirm: state them with unet_config={'num_heads': ...} or {'head_dim': ...} "
                      "if outputs look wrong (minigen's own files state their config in their metadata)", stacklevel=2)
    return UNetConfig(
        in_channels=in_channels,
        out_channels=unet["out.2.weight"].shape[0],
        model_channels=model_channels,
        channel_mult=channel_multipliers([model_channels] + [unet[f"input_blocks.{b}.0.emb_layers.1.weight"].shape[0] for b in first_blocks],
                                         "unet weights")[1:],
        num_res_blocks=num_res_blocks,
        transformer_depth=tuple(count_children(unet, f"input_blocks.{b}.1.transformer_blocks.") for b in first_blocks),
        transformer_depth_middle=count_children(unet, "middle_block.1.transformer_blocks."),
        num_heads=8 if context_dim == 768 else None,
        head_dim=None if context_dim == 768 else 64,
        context_dim=context_dim,
        use_linear_proj=proj_in.ndim == 2,
        adm_in_channels=None if label_emb is None else label_emb.shape[1],
    )
