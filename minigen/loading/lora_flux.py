"""LoRA files for FLUX, read into `LowRank` residuals on minigen's transformer (BFL names).

Four dialects name the layers of one FLUX transformer:

    peft / diffusers   transformer.transformer_blocks.0.attn.to_q.lora_A.weight / .lora_B.weight (/ .alpha)
                       (diffusers' trainers, ai-toolkit, SimpleTuner, OminiControl)
    kohya              lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight / .lora_up.weight / .alpha
                       (sd-scripts: BFL's path flattened with "_"; `lora_transformer_` + diffusers' path
                       from some exporters)
    BFL / ComfyUI      diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight / .lora_B.weight
                       (also under `model.diffusion_model.`, `transformer.` or no prefix)
    XLabs              double_blocks.0.processor.qkv_lora1.down.weight / .up.weight

diffusers splits BFL's fused projections (see keymaps_flux): a LoRA on a double block's `attn.to_k`
is a residual on rows [h, 2h) of `img_attn.qkv`, i.e. `LowRank(..., outputs=(h, 2h))` with h the
hidden size; one on a single block's `proj_mlp` covers rows [3h, 3h + mlp) of `linear1`. diffusers'
`norm_out.linear` emits (scale, shift) where BFL's `final_layer.adaLN_modulation.1` emits
(shift, scale), so the two halves of the up factor's rows trade places. XLabs' `qkv_lora1` /
`qkv_lora2` / `proj_lora1` / `proj_lora2` are the image and text `qkv` / `proj` of a double
block; in a single block `qkv_lora` covers the q, k, v rows of `linear1` and `proj_lora` is `linear2`.

As for SD LoRAs (lora_files.py), names are never parsed: a table lists every Linear of the model
under each spelling, flattened with "_", and a file's name is looked up there. Each factor pair
becomes `LowRank(target, down, up, scale · alpha / rank, outputs=...)`, to be used in one of three ways:

    lora = read_flux_lora("style.safetensors", pipe.transformer, scale=0.8)
    merge(pipe.transformer, lora)                            # into the weights (lora_files.merge)
    pipe.generate(..., controls=Controls(low_rank=lora))     # per call, removable
    TokenGroup(..., lora=tuple(lora))                        # on one token group only (OminiControl)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from minigen.controls import LowRank
from minigen.loading.detect import CheckpointError, detect
from minigen.loading.keymaps_flux import SWAPPED_HALVES, name_pairs
from minigen.loading.lora_files import PART_SUFFIXES, flattened, group_by_layer, lora_tensors
from minigen.loading.lora_metadata import adapter_scales, layer_scale
from minigen.models.flux import Flux
from minigen.models.flux_config import FluxConfig
from minigen.storage import to_compute  # the layer's compute dtype and device (a stored layer's weight may be fp16)

# What precedes a transformer layer's name, longest first.
PREFIXES = ("model.diffusion_model.", "base_model.model.", "diffusion_model.", "transformer.", "lora_transformer_", "lora_unet_")
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.", "text_encoders.")  # the last ComfyUI's

# Key suffix -> factor, longest first so that `.lora.down.weight` is not read as XLabs' `.down.weight`.
PARTS = sorted({**PART_SUFFIXES, "down.weight": "down", "up.weight": "up"}.items(), key=lambda item: -len(item[0]))

# XLabs' processor names -> BFL module inside a double block.
XLABS_DOUBLE = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv", "proj_lora1": "img_attn.proj", "proj_lora2": "txt_attn.proj"}


@dataclass(frozen=True)
class Place:
    """Where a file's layer lands: a Linear of the transformer, the slice of its output rows that the
    file's layer is (None: all of them), and whether the halves of those rows trade places."""

    target: str
    outputs: tuple[int, int] | None = None
    swap_halves: bool = False


def read_flux_lora(path_or_state_dict: str | Path | Mapping[str, Tensor], transformer: Flux, *, scale: float = 1.0) -> list[LowRank]:
    """Read a FLUX LoRA in any of the dialects above for `transformer` (a minigen `Flux`).

    A layer's scale is as `read_lora`'s: alpha / rank from `.alpha` tensors, or peft's from diffusers'
    config in the file's metadata (minigen/loading/lora_metadata.py), times `scale`.
    Factors are cast to the dtype and device of the layer they target. Every key must be read and
    land on a layer of matching shape, otherwise a CheckpointError names the keys, and says so when
    the file is a LoRA for SD or for the other FLUX.1 model. Files are read with `read_state_dict`
    (safetensors; for a pickled file you trust, pass `read_state_dict(path, allow_pickle=True)`).
    """
    state_dict, metadata = lora_tensors(path_or_state_dict)
    if not isinstance(transformer, Flux):
        raise TypeError(f"read_flux_lora reads LoRAs for minigen's Flux transformer, got {type(transformer).__name__}; "
                        "for SD1.x/SDXL UNets use minigen.loading.lora_files.read_lora")
    found = detect(state_dict).family
    if found in ("lora-sd1", "lora-sd2", "lora-sdxl"):
        raise CheckpointError(
            f"this is a LoRA for {dict(lora_sd1='SD1.x', lora_sd2='SD2.x', lora_sdxl='SDXL')[found.replace('-', '_')]}'s UNet, not for FLUX. Fix: use it "
            "with an SD model (sample.py --model sd15 or sdxl, or minigen.loading.lora_files.read_lora(path, unet=pipe.unet) in code), or pick a FLUX LoRA."
        )
    text = [key for key in state_dict if key.startswith(TEXT_ENCODER_PREFIXES)]
    if text:
        raise CheckpointError(
            f"{len(text)} keys of this LoRA train a text encoder (e.g. {text[0]!r}); minigen reads a FLUX LoRA's "
            "transformer part only. Fix: read the rest without them, read_flux_lora({k: v for k, v in "
            "read_state_dict(path).items() if not k.startswith(minigen.loading.lora_flux.TEXT_ENCODER_PREFIXES)}, "
            "transformer), "
            "knowing the images will differ from the trainer's."
        )
    if widened := [key for key, tensor in state_dict.items() if re.search(r"(^|\.|_)(img_in|x_embedder)\.(lora_A|lora_down|lora\.down)\.weight$", key)
                   and tensor.shape[-1] != transformer.config.in_channels]:  # fmt: skip
        raise CheckpointError(
            f"{widened[0]} reads {state_dict[widened[0]].shape[-1]} input channels per token, not the {transformer.config.in_channels} "
            "of text-to-image FLUX.1: a FLUX Control LoRA (Depth or Canny), which widens the input layer for a control image "
            "and needs that image beside the text; minigen does not run the control models"
        )
    layers, unread = group_by_layer(state_dict, _parse_key)
    if unread:
        raise CheckpointError(
            f"{len(unread)} keys of this LoRA were not read: {unread[:10]}. minigen reads LoRA factors (peft "
            ".lora_A/.lora_B/.alpha, kohya .lora_down/.lora_up/.alpha, XLabs .down/.up); LyCORIS (LoHa, LoKr), "
            "DoRA and full-weight diffs are not supported. Remove these keys or convert the file to a plain LoRA."
        )

    table = flux_layer_table(transformer)
    in_metadata = adapter_scales(metadata, ("transformer",)).get("transformer")  # diffusers' LoRA config (lora_metadata.py)
    deltas, missing, misfit = [], [], []
    for name, parts in layers.items():
        place = table.get(name.replace(".", "_"))
        if place is None:
            missing.append(name)
            continue
        layer = transformer.get_submodule(place.target)
        weight = layer.weight
        start, stop = place.outputs or (0, weight.shape[0])
        down, up = parts["down"], parts["up"]
        if down.dim() != 2 or down.shape[1] != weight.shape[1] or up.shape != (stop - start, down.shape[0]):
            misfit.append(f"{name} (down {tuple(down.shape)}, up {tuple(up.shape)} for rows {start}:{stop} of "
                          f"{place.target}, weight {tuple(weight.shape)})")
            continue
        if place.swap_halves:
            up = torch.cat(up.chunk(2)[::-1])
        own = layer_scale(name, parts, in_metadata)
        deltas.append(LowRank(place.target, to_compute(down, layer), to_compute(up, layer), scale * own, outputs=place.outputs))
    if missing or misfit:
        raise _mismatch_error(len(layers), missing, misfit, transformer)
    return deltas


def flux_layer_table(transformer: Flux) -> dict[str, Place]:
    """Every Linear of `transformer` under each name a LoRA file may give it (BFL's, diffusers', XLabs'),
    flattened with "_"."""
    config = transformer.config
    rows = {path: module.out_features for path, module in transformer.named_modules() if isinstance(module, nn.Linear)}
    spellings = {path: Place(path) for path in rows}
    for bfl, parts in name_pairs(config.depth, config.depth_single_blocks):
        if bfl not in rows:  # QK-norm scales are keys, not layers
            continue
        if len(parts) == 1:
            spellings[parts[0]] = Place(bfl, swap_halves=bfl == SWAPPED_HALVES)
            continue
        # q, k and v are each as wide as the token stream; a single block's MLP input takes the rest.
        for i, part in enumerate(parts):
            stop = rows[bfl] if i == 3 else (i + 1) * config.hidden_size
            spellings[part] = Place(bfl, (i * config.hidden_size, stop))
    for i in range(config.depth):
        for xlabs, bfl in XLABS_DOUBLE.items():
            spellings[f"double_blocks.{i}.processor.{xlabs}"] = Place(f"double_blocks.{i}.{bfl}")
    for i in range(config.depth_single_blocks):
        spellings[f"single_blocks.{i}.processor.qkv_lora"] = Place(f"single_blocks.{i}.linear1", (0, 3 * config.hidden_size))
        spellings[f"single_blocks.{i}.processor.proj_lora"] = Place(f"single_blocks.{i}.linear2")
    return flattened(spellings)


def _parse_key(key: str) -> tuple[str, str] | None:
    """(layer name without prefix, part) of a LoRA key, or None if it is not a factor."""
    rest = key.removeprefix(next((p for p in PREFIXES if key.startswith(p)), ""))
    for suffix, part in PARTS:
        if rest.endswith(f".{suffix}"):
            return rest[: -len(suffix) - 1], part
    return None


def _mismatch_error(count: int, missing: list[str], misfit: list[str], transformer: Flux) -> CheckpointError:
    config = transformer.config
    lines = [f"this LoRA does not fit the given FLUX transformer ({count} layers in the LoRA):"]
    if missing:
        lines.append(f"  {len(missing)} name no layer of the model, e.g. {', '.join(missing[:5])}")
    if misfit:
        lines.append(f"  {len(misfit)} have factors of the wrong shape, e.g. " + "; ".join(misfit[:3]))
    if any("guidance" in name for name in missing) and not config.guidance_embed:
        lines.append("It targets the guidance embedder, which FLUX.1-dev has and this model (schnell-like) lacks.")
        lines.append("Fix: use this LoRA with FLUX.1-dev, or pick a LoRA trained for this model.")
    elif any(_beyond_the_blocks(name, config) for name in missing):
        lines.append(f"It targets blocks this model lacks: it has {config.depth} double and {config.depth_single_blocks} "
                     "single blocks. Fix: pick a LoRA trained for this model.")
    else:
        lines.append(f"Fix: check that the file is a LoRA for this FLUX model (hidden size {config.hidden_size}).")
    return CheckpointError("\n".join(lines))


def _beyond_the_blocks(name: str, config: FluxConfig) -> bool:
    """Whether a layer name points into a double or single block past the model's last one."""
    flat = name.replace(".", "_")
    single = re.search(r"single_(?:transformer_)?blocks_(\d+)", flat)
    if single:
        return int(single.group(1)) >= config.depth_single_blocks
    double = re.search(r"(?:double|transformer)_blocks_(\d+)", flat)
    return double is not None and int(double.group(1)) >= config.depth
