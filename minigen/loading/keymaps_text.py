"""Text-encoder tensors of the official single files, as transformers state dicts.

The ldm/sgm single files embed their text encoders under a prefix:

    SD1.5  cond_stage_model.transformer.text_model.*       OpenAI CLIP-L, already transformers naming
    SDXL   conditioner.embedders.0.transformer.text_model.* OpenAI CLIP-L, already transformers naming
    SDXL   conditioner.embedders.1.model.*                 OpenCLIP ViT-bigG, open_clip naming

CLIP-L therefore needs only its prefix removed. OpenCLIP's text tower is the same computation under
other names, with two layout differences:

    open_clip                                    transformers (CLIPTextModelWithProjection)
    token_embedding.weight                       text_model.embeddings.token_embedding.weight
    positional_embedding          [77, D]        text_model.embeddings.position_embedding.weight
    transformer.resblocks.N.ln_1                 text_model.encoder.layers.N.layer_norm1
    transformer.resblocks.N.attn.in_proj_weight  [3D, D] = q, k, v stacked -> self_attn.{q,k,v}_proj.weight
    transformer.resblocks.N.attn.in_proj_bias    [3D]                      -> self_attn.{q,k,v}_proj.bias
    transformer.resblocks.N.attn.out_proj        text_model.encoder.layers.N.self_attn.out_proj
    transformer.resblocks.N.ln_2                 text_model.encoder.layers.N.layer_norm2
    transformer.resblocks.N.mlp.c_fc / c_proj    text_model.encoder.layers.N.mlp.fc1 / fc2
    ln_final                                     text_model.final_layer_norm
    text_projection               [D, P]         text_projection.weight [P, D]: open_clip computes x @ P,
                                                 nn.Linear computes x @ W.T, so W = P.T
    logit_scale                                  (none: CLIP's contrastive temperature, unused for text)
    *position_ids                                (none: see below)

Buffers that hold nothing learned are dropped from either tower (`is_rebuilt_buffer`): CLIP's
`position_ids`, arange(77), which transformers < 4.31 saved with the weights, so SD1.5 and SDXL
files carry it under CLIP-L (`…text_model.embeddings.position_ids`); some re-saves (older ComfyUI)
also write one under the OpenCLIP prefix, e.g. `conditioner.embedders.1.model.text_model.embeddings.position_ids`.
`build_text_encoder` rebuilds it, so a file's copy is never read (some merges carry it corrupted).

Output keys use the file layout (``text_model.*``); ``minigen.text.encoders.build_text_encoder`` fits
them to the installed transformers version.
"""

from __future__ import annotations

import re

import torch

from minigen.loading.detect import CheckpointError
from minigen.loading.files import required
from minigen.loading.keys import count_children, take_prefix
from minigen.text.encoders import TextEncoderConfig

SD15_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

OPEN_CLIP_TOP_LEVEL = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
OPEN_CLIP_BLOCK = {  # module names inside transformer.resblocks.N / text_model.encoder.layers.N
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
OPEN_CLIP_UNUSED = ("logit_scale",)  # read by CLIP's image-text loss only; not mapped, not restored
REBUILT_BUFFERS = ("position_ids",)  # last name part of buffers a text tower rebuilds: dropped from any file

_OPEN_CLIP_BLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_TRANSFORMERS_LAYER_KEY = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


def text_encoders_from_single_file(checkpoint: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split an SD1.5 or SDXL single file's text encoders into transformers state dicts.

    Returns {"text_encoder": CLIP-L} for SD1.5 and additionally {"text_encoder_2": OpenCLIP-bigG} for
    SDXL (the diffusers folder names). `position_ids` buffers are dropped from both (module docstring).
    """
    checkpoint = {key: value for key, value in checkpoint.items() if not is_rebuilt_buffer(key)}
    for clip_prefix in (SD15_CLIP_PREFIX, SDXL_CLIP_PREFIX):
        clip = take_prefix(checkpoint, clip_prefix)
        if clip:
            break
    else:
        raise CheckpointError(
            f"this file has no CLIP-L text encoder: no key starts with {SD15_CLIP_PREFIX!r} (SD1.5) or {SDXL_CLIP_PREFIX!r} "
            "(SDXL); minigen needs a single file with its text encoders, or a diffusers folder"
        )
    if not any(key.startswith("text_model.") for key in clip):  # the older layout without text_model.: A1111 renames it too
        clip = {f"text_model.{key}": value for key, value in clip.items()}
    encoders = {"text_encoder": clip}
    open_clip = take_prefix(checkpoint, SDXL_OPEN_CLIP_PREFIX)
    if open_clip:
        encoders["text_encoder_2"] = open_clip_to_transformers(open_clip)
    return encoders


def open_clip_to_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text tower (keys without the file prefix) -> CLIPTextModelWithProjection state dict;
    `logit_scale` and any `position_ids` are dropped, any other unknown key is a KeyError."""
    converted = {}
    for key, value in state_dict.items():
        block = _OPEN_CLIP_BLOCK_KEY.fullmatch(key)
        if key in OPEN_CLIP_UNUSED or is_rebuilt_buffer(key):
            continue
        elif key in OPEN_CLIP_TOP_LEVEL:
            converted[OPEN_CLIP_TOP_LEVEL[key]] = value
        elif key == "text_projection":
            converted["text_projection.weight"] = value.T.contiguous()
        elif block and block[2] in ("attn.in_proj_weight", "attn.in_proj_bias"):
            attention = f"text_model.encoder.layers.{block[1]}.self_attn"
            param = block[2].removeprefix("attn.in_proj_")
            for name, part in zip("qkv", value.chunk(3, dim=0)):  # rows [0:D] = q, [D:2D] = k, [2D:3D] = v
                converted[f"{attention}.{name}_proj.{param}"] = part.clone()
        elif block and (parts := block[2].rsplit(".", 1))[0] in OPEN_CLIP_BLOCK:
            module, param = parts
            converted[f"text_model.encoder.layers.{block[1]}.{OPEN_CLIP_BLOCK[module]}.{param}"] = value
        else:
            raise KeyError(f"Unexpected key {key!r} in an OpenCLIP text tower; expected open_clip text-model names.")
    return converted


def is_rebuilt_buffer(key: str) -> bool:
    """Whether `key` names a buffer the text encoder rebuilds (`REBUILT_BUFFERS`), under any prefix."""
    return key.rsplit(".", 1)[-1] in REBUILT_BUFFERS


def open_clip_from_transformers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection state dict -> OpenCLIP text tower: the exact inverse, except that
    ``logit_scale`` (dropped going the other way) is not recreated."""
    top_level = {hf: oc for oc, hf in OPEN_CLIP_TOP_LEVEL.items()}
    block_names = {hf: oc for oc, hf in OPEN_CLIP_BLOCK.items()}
    converted, qkv_parts = {}, {}
    for key, value in state_dict.items():
        layer = _TRANSFORMERS_LAYER_KEY.fullmatch(key)
        if key in top_level:
            converted[top_level[key]] = value
        elif key == "text_projection.weight":
            converted["text_projection"] = value.T.contiguous()
        elif layer and layer[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            stacked = f"transformer.resblocks.{layer[1]}.attn.in_proj_{layer[3]}"
            qkv_parts.setdefault(stacked, {})[layer[2][len("self_attn.")]] = value
        elif layer and layer[2] in block_names:
            converted[f"transformer.resblocks.{layer[1]}.{block_names[layer[2]]}.{layer[3]}"] = value
        else:
            raise KeyError(f"Unexpected key {key!r} in a CLIPTextModelWithProjection state dict.")
    for stacked, parts in qkv_parts.items():
        converted[stacked] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return converted


def text_config_from_diffusers(config: dict, weights: dict[str, torch.Tensor]) -> TextEncoderConfig:
    """The TextEncoderConfig of a diffusers `text_encoder*/config.json` (transformers' CLIPTextConfig)."""
    return TextEncoderConfig(
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        hidden_act=config["hidden_act"],
        projection_dim=config.get("projection_dim") if "text_projection.weight" in weights else None,
    )


def text_config_from_keys(weights: dict[str, torch.Tensor], hidden_act: str) -> TextEncoderConfig:
    """The TextEncoderConfig of CLIP text weights (file layout); heads are 64 wide in every CLIP."""
    tokens = required(weights, "text_model.embeddings.token_embedding.weight")  # [vocabulary, hidden]
    hidden = tokens.shape[1]
    layers = count_children(weights, "text_model.encoder.layers.")
    projection = weights.get("text_projection.weight")
    return TextEncoderConfig(
        hidden_size=hidden,
        intermediate_size=required(weights, "text_model.encoder.layers.0.mlp.fc1.weight").shape[0],
        num_layers=layers,
        num_heads=max(1, hidden // 64),
        hidden_act=hidden_act,
        projection_dim=None if projection is None else projection.shape[0],
        vocab_size=tokens.shape[0],
    )
