"""FLUX transformer key map: diffusers `FluxTransformer2DModel` names <-> BFL names (minigen's names).

Both layouts hold the same numbers. They differ in three ways:

1. Names: `img_in` is diffusers' `x_embedder`, `double_blocks.{i}` its `transformer_blocks.{i}`,
   `single_blocks.{i}` its `single_transformer_blocks.{i}`, ... (tables below).
2. Fused projections: BFL computes q, k and v with one Linear (`qkv`, rows [q; k; v]); a single
   block's `linear1` also carries the MLP input (rows [q; k; v; mlp]). diffusers keeps one Linear
   per part. Fusing is `torch.cat` along the output rows, splitting is the inverse.
3. The final adaLN: BFL's `final_layer.adaLN_modulation.1` outputs (shift, scale), diffusers'
   `norm_out.linear` outputs (scale, shift), so the two halves of its rows trade places.

    BFL                                       diffusers
    img_in, txt_in                            x_embedder, context_embedder
    time_in / vector_in / guidance_in         time_text_embed.{timestep,text,guidance}_embedder
      .{in,out}_layer                           .linear_{1,2}
    double_blocks.i.img_attn.qkv              transformer_blocks.i.attn.to_{q,k,v}
    double_blocks.i.txt_attn.qkv              transformer_blocks.i.attn.add_{q,k,v}_proj
    single_blocks.i.linear1                   single_transformer_blocks.i.{attn.to_q, attn.to_k,
                                                attn.to_v, proj_mlp}
    final_layer.linear                        proj_out
    final_layer.adaLN_modulation.1            norm_out.linear           (halves swapped)

Both functions expect the transformer's own names: strip a file's prefix first (ComfyUI's
`model.diffusion_model.`, a pipeline's `transformer.`), e.g. with `minigen.loading.keys.take_prefix`.
Tensors are renamed, sliced (views, no copy) or concatenated; nothing reads their values, so meta
tensors work, and dtypes are kept. Note that the diffusers tensors made by splitting are views of
one fused tensor: `.clone()` them before saving with safetensors, which refuses shared storage.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from minigen.loading.detect import CheckpointError
from minigen.loading.keys import count_children

# (BFL name, diffusers names) outside the blocks. A name is a module (its `.weight`/`.bias` follow)
# or a whole key.
TOP_LEVEL: list[tuple[str, tuple[str, ...]]] = [
    ("img_in", ("x_embedder",)),
    ("txt_in", ("context_embedder",)),
    ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),  # FLUX-dev only
    ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    ("final_layer.linear", ("proj_out",)),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",)),  # (shift, scale) <-> (scale, shift)
]

# Inside `double_blocks.{i}` / `transformer_blocks.{i}`. Several diffusers names: the BFL tensor is
# their concatenation along dim 0, in this order.
DOUBLE_BLOCK: list[tuple[str, tuple[str, ...]]] = [
    ("img_mod.lin", ("norm1.linear",)),
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("img_attn.norm.query_norm.scale", ("attn.norm_q.weight",)),
    ("img_attn.norm.key_norm.scale", ("attn.norm_k.weight",)),
    ("img_attn.proj", ("attn.to_out.0",)),
    ("img_mlp.0", ("ff.net.0.proj",)),
    ("img_mlp.2", ("ff.net.2",)),
    ("txt_mod.lin", ("norm1_context.linear",)),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("txt_attn.norm.query_norm.scale", ("attn.norm_added_q.weight",)),
    ("txt_attn.norm.key_norm.scale", ("attn.norm_added_k.weight",)),
    ("txt_attn.proj", ("attn.to_add_out",)),
    ("txt_mlp.0", ("ff_context.net.0.proj",)),
    ("txt_mlp.2", ("ff_context.net.2",)),
]

# Inside `single_blocks.{i}` / `single_transformer_blocks.{i}`. linear2 reads cat(attention, MLP)
# in both layouts, so it is a plain rename.
SINGLE_BLOCK: list[tuple[str, tuple[str, ...]]] = [
    ("modulation.lin", ("norm.linear",)),
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("norm.query_norm.scale", ("attn.norm_q.weight",)),
    ("norm.key_norm.scale", ("attn.norm_k.weight",)),
    ("linear2", ("proj_out",)),
]

SWAPPED_HALVES = "final_layer.adaLN_modulation.1"


def name_pairs(depth: int, depth_single_blocks: int) -> list[tuple[str, tuple[str, ...]]]:
    """(BFL name, diffusers names) of every module or key of a FLUX transformer with these block counts."""
    pairs = list(TOP_LEVEL)
    for i in range(depth):
        pairs += [(f"double_blocks.{i}.{bfl}", tuple(f"transformer_blocks.{i}.{d}" for d in diffusers))
                  for bfl, diffusers in DOUBLE_BLOCK]
    for i in range(depth_single_blocks):
        pairs += [(f"single_blocks.{i}.{bfl}", tuple(f"single_transformer_blocks.{i}.{d}" for d in diffusers))
                  for bfl, diffusers in SINGLE_BLOCK]
    return pairs


def flux_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BFL FLUX transformer state dict (no prefix) -> diffusers `FluxTransformer2DModel` keys."""
    pairs = dict(name_pairs(count_children(sd, "double_blocks."), count_children(sd, "single_blocks.")))
    out: dict[str, Tensor] = {}
    for key, tensor in sd.items():
        name, suffix = _split_name(key, pairs, "BFL")
        targets = pairs[name]
        if name == SWAPPED_HALVES:
            tensor = _swap_halves(tensor)
        if len(targets) == 1:
            out[targets[0] + suffix] = tensor
            continue
        # q, k and v are each as wide as the token stream; a single block's MLP part takes the rest.
        hidden = _hidden_size(sd)
        sizes = [hidden] * (len(targets) - 1) + [tensor.shape[0] - hidden * (len(targets) - 1)]
        for target, part in zip(targets, tensor.split(sizes, dim=0)):
            out[target + suffix] = part
    return out


def flux_from_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `FluxTransformer2DModel` state dict (no prefix) -> BFL keys, loadable by minigen's FLUX."""
    pairs = dict(name_pairs(count_children(sd, "transformer_blocks."),
                            count_children(sd, "single_transformer_blocks.")))
    part_of = {d: (bfl, position) for bfl, ds in pairs.items() for position, d in enumerate(ds)}

    out: dict[str, Tensor] = {}
    fused: dict[tuple[str, str], dict[int, Tensor]] = {}  # (BFL name, suffix) -> parts met so far
    for key, tensor in sd.items():
        name, suffix = _split_name(key, part_of, "diffusers")
        bfl, position = part_of[name]
        if bfl == SWAPPED_HALVES:
            tensor = _swap_halves(tensor)
        if len(pairs[bfl]) == 1:
            out[bfl + suffix] = tensor
        else:
            fused.setdefault((bfl, suffix), {})[position] = tensor

    for (bfl, suffix), parts in fused.items():
        missing = [d + suffix for position, d in enumerate(pairs[bfl]) if position not in parts]
        if missing:
            raise CheckpointError(
                f"cannot build {bfl + suffix}: the diffusers state dict lacks {missing}. "
                "A FLUX checkpoint carries every part of each fused projection."
            )
        out[bfl + suffix] = torch.cat([parts[position] for position in range(len(parts))], dim=0)
    return out


def _split_name(key: str, names: Mapping[str, object], layout: str) -> tuple[str, str]:
    """(name, rest) for the longest name in `names` that is `key` or a module path leading it:
    `double_blocks.0.img_attn.qkv.bias` -> ("double_blocks.0.img_attn.qkv", ".bias")."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        if name in names:
            return name, key[len(name) :]
    raise CheckpointError(
        f"{key!r} is not a {layout} FLUX transformer key. Strip the file's prefix first (e.g. "
        "'model.diffusion_model.' or 'transformer.', see minigen.loading.keys.take_prefix) and pass "
        "only the transformer's tensors."
    )


def _swap_halves(tensor: Tensor) -> Tensor:
    """[a; b] -> [b; a] along dim 0: BFL's (shift, scale) rows <-> diffusers' (scale, shift)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _hidden_size(sd: Mapping[str, Tensor]) -> int:
    """Width of the token stream: the output features of `img_in`."""
    if "img_in.weight" not in sd:
        raise CheckpointError("splitting the fused q/k/v projections needs img_in.weight (the hidden size)")
    return sd["img_in.weight"].shape[0]


# --- configs ------------------------------------------------------------------------------------

# FLUX.1's RoPE splits each 128-wide head into (index, row, column) axes of these widths. The split
# is not stored in the weights.
FLUX1_AXES_DIM = (16, 56, 56)
FLUX1_THETA = 10_000  # RoPE base of every FLUX.1 model; hard-coded in diffusers too
FLUX1_MLP_RATIO = 4.0  # fixed in diffusers' blocks


def flux_config_from_diffusers(config_json: Mapping) -> dict:
    """FluxConfig fields of a diffusers `transformer/config.json`, as a keyword dict."""
    class_name = config_json.get("_class_name", "FluxTransformer2DModel")
    if class_name != "FluxTransformer2DModel":
        raise ValueError(f"transformer config is for {class_name}; expected FluxTransformer2DModel")
    if config_json.get("patch_size", 1) != 1:
        raise ValueError(
            f"transformer config sets patch_size={config_json['patch_size']}; FLUX packs 2x2 latent patches "
            "outside the transformer and minigen implements patch_size=1 only"
        )
    heads, head_dim = config_json.get("num_attention_heads", 24), config_json.get("attention_head_dim", 128)
    in_channels = config_json.get("in_channels", 64)
    return dict(
        in_channels=in_channels,
        out_channels=config_json.get("out_channels") or in_channels,
        vec_in_dim=config_json.get("pooled_projection_dim", 768),
        context_in_dim=config_json.get("joint_attention_dim", 4096),
        hidden_size=heads * head_dim,
        mlp_ratio=FLUX1_MLP_RATIO,
        num_heads=heads,
        depth=config_json.get("num_layers", 19),
        depth_single_blocks=config_json.get("num_single_layers", 38),
        axes_dim=tuple(config_json.get("axes_dims_rope", FLUX1_AXES_DIM)),
        theta=FLUX1_THETA,
        qkv_bias=True,  # diffusers' q/k/v projections always carry biases
        guidance_embed=bool(config_json.get("guidance_embeds", False)),
    )


def flux_config_from_keys(sd: Mapping[str, Tensor], overrides: Mapping[str, object] | None = None) -> dict:
    """FluxConfig fields read off a BFL-named state dict (no prefix: strip it first), as a keyword dict,
    with `overrides` (fields the caller knows) taking precedence.

    Widths, depths, the head count (hidden size / length of a QK-norm scale), the qkv bias and the
    guidance embedder are visible in the tensors. Two fields are not: theta is 10000 for every
    FLUX.1 model, and axes_dim is taken as FLUX.1's (16, 56, 56) when heads are 128 wide; for any
    other head width it must come from the file's metadata or the overrides, else ValueError.
    """
    overrides = dict(overrides or {})
    if "img_in.weight" not in sd or "double_blocks.0.img_attn.norm.query_norm.scale" not in sd:
        raise CheckpointError(
            "not a BFL FLUX transformer state dict: img_in.weight or double_blocks.0.* is missing "
            "(strip a prefix such as 'model.diffusion_model.' first)"
        )
    hidden, in_channels = sd["img_in.weight"].shape
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if head_dim != 128 and "axes_dim" not in overrides:
        raise ValueError(
            f"FLUX weights with head_dim={head_dim}: axes_dim (how RoPE splits a head) is not stored in the "
            f"weights and is only known for FLUX.1's head_dim=128 {FLUX1_AXES_DIM}. Take the config from the "
            "file's metadata, or give it: load_flux(..., transformer_config={'axes_dim': (...)}), summing to "
            f"{head_dim}."
        )
    return dict(
        in_channels=in_channels,
        out_channels=sd["final_layer.linear.weight"].shape[0],
        vec_in_dim=sd["vector_in.in_layer.weight"].shape[1],
        context_in_dim=sd["txt_in.weight"].shape[1],
        hidden_size=hidden,
        mlp_ratio=sd["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
        num_heads=hidden // head_dim,
        depth=count_children(sd, "double_blocks."),
        depth_single_blocks=count_children(sd, "single_blocks."),
        axes_dim=FLUX1_AXES_DIM,
        theta=FLUX1_THETA,
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in sd,
        guidance_embed="guidance_in.in_layer.weight" in sd,
    ) | overrides
