"""What is in a checkpoint? Model family and key layout, read from tensor names and a few shapes.

Checkpoints do not say what they are, but their key names do. A few anchor keys settle the layout
(official single file, diffusers folder, BFL file, ...) and a few shapes settle the family:

* the width of cross-attention keys (`attn2.to_k.weight` is [channels, context_dim]) separates
  SD1 (CLIP-L, 768) from SD2 (OpenCLIP-H, 1024) and SDXL (CLIP-L + OpenCLIP-G, 2048);
* `label_emb` (SDXL's embedding of pooled text + image sizes) marks SDXL; its input width
  separates the base model (2816) from the refiner (2560);
* `guidance_in` (distilled guidance embedding) separates FLUX-dev from FLUX-schnell;
* the latent channels of a VAE encoder (conv_out emits mean and log-variance, 2 x latent channels)
  separate the SD VAE (4) from the FLUX autoencoder (16).

`detect` only reads `.shape`, so meta tensors (or a file's header) are enough.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

UNET_PREFIX = "model.diffusion_model."


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it is loaded into."""


@dataclass(frozen=True)
class Detected:
    """family: the model, e.g. "sd1", "sdxl", "flux-dev", "sd-vae", "clip-text".
    layout: how its keys are named: "single-file" (ldm/sgm), "ldm", "bfl", "diffusers-unet",
    "diffusers-vae", "diffusers-transformer", "transformers", "ip-adapter"; for LoRAs the dialect
    (`LORA_LAYOUTS`): "kohya", "peft", "diffusers", "xlabs", "mixofshow".
    prefix: what precedes the model's own key names, e.g. "model.diffusion_model." ("" if none).
    """

    family: str
    layout: str
    prefix: str = ""


# A few keys every file of a family has, in the family's official layout. `require` lists the
# absent ones when a file is given to the wrong model.
SIGNATURE_KEYS: dict[str, tuple[str, ...]] = {
    "sd1": (
        f"{UNET_PREFIX}input_blocks.0.0.weight",
        f"{UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        f"{UNET_PREFIX}middle_block.1.proj_in.weight",
        f"{UNET_PREFIX}out.2.weight",
        "first_stage_model.encoder.conv_in.weight",
        "first_stage_model.decoder.conv_out.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    ),
    "sd2": (
        f"{UNET_PREFIX}input_blocks.0.0.weight",
        f"{UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        f"{UNET_PREFIX}out.2.weight",
        "first_stage_model.encoder.conv_in.weight",
        "cond_stage_model.model.token_embedding.weight",
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
    ),
    "sdxl": (
        f"{UNET_PREFIX}input_blocks.0.0.weight",
        f"{UNET_PREFIX}label_emb.0.0.weight",
        f"{UNET_PREFIX}label_emb.0.2.weight",
        f"{UNET_PREFIX}input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
        f"{UNET_PREFIX}middle_block.1.transformer_blocks.9.attn2.to_k.weight",
        f"{UNET_PREFIX}out.2.weight",
        "first_stage_model.encoder.conv_in.weight",
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
        "conditioner.embedders.1.model.token_embedding.weight",
        "conditioner.embedders.1.model.text_projection",
    ),
    "sdxl-refiner": (
        f"{UNET_PREFIX}input_blocks.0.0.weight",
        f"{UNET_PREFIX}label_emb.0.0.weight",
        f"{UNET_PREFIX}out.2.weight",
        "first_stage_model.encoder.conv_in.weight",
        "conditioner.embedders.0.model.token_embedding.weight",
    ),
    "flux-dev": (
        "img_in.weight",
        "txt_in.weight",
        "time_in.in_layer.weight",
        "vector_in.in_layer.weight",
        "guidance_in.in_layer.weight",
        "double_blocks.0.img_attn.qkv.weight",
        "single_blocks.0.linear1.weight",
        "final_layer.linear.weight",
    ),
    "flux-schnell": (
        "img_in.weight",
        "txt_in.weight",
        "time_in.in_layer.weight",
        "vector_in.in_layer.weight",
        "double_blocks.0.img_attn.qkv.weight",
        "single_blocks.0.linear1.weight",
        "final_layer.linear.weight",
    ),
    "flux-ae": ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.conv_out.weight",
                "decoder.conv_in.weight", "decoder.up.0.block.0.conv1.weight", "decoder.conv_out.weight"),
    "sd-vae": ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "encoder.conv_out.weight",
               "quant_conv.weight", "post_quant_conv.weight", "decoder.conv_out.weight"),
    "flux-redux": ("redux_up.weight", "redux_down.weight"),
    "ip-adapter-sd1": ("image_proj.proj.weight", "image_proj.norm.weight", "ip_adapter.1.to_k_ip.weight"),
    "ip-adapter-sdxl": ("image_proj.proj.weight", "image_proj.norm.weight", "ip_adapter.1.to_k_ip.weight"),
    "ip-adapter-plus-sd1": ("image_proj.latents", "image_proj.proj_in.weight", "ip_adapter.1.to_k_ip.weight"),
    "ip-adapter-plus-sdxl": ("image_proj.latents", "image_proj.proj_in.weight", "ip_adapter.1.to_k_ip.weight"),
    "clip-text": ("text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.0.self_attn.q_proj.weight",
                  "text_model.final_layer_norm.weight"),
    "t5-text": ("shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.final_layer_norm.weight"),
    "clip-vision": ("vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
                    "visual_projection.weight"),
    "siglip-vision": ("vision_model.embeddings.patch_embedding.bias", "vision_model.head.probe"),
    "siglip": ("vision_model.embeddings.patch_embedding.bias", "text_model.embeddings.token_embedding.weight",
               "logit_bias"),
}


def detect(state_dict: Mapping[str, torch.Tensor]) -> Detected:
    """Family, key layout and key prefix of a checkpoint, or family "unknown" when no rule fits.

    Full pipeline files (UNet + VAE + text encoders) are reported by their denoiser's family.
    """
    for rule in _RULES:
        found = rule(state_dict)
        if found is not None:
            return found
    return Detected("unknown", "unknown")


def require(state_dict: Mapping[str, torch.Tensor], family: str) -> Detected:
    """`detect(state_dict)`, raising CheckpointError unless it found `family`."""
    if family not in SIGNATURE_KEYS:
        raise ValueError(f"unknown model family {family!r}; known families: {sorted(SIGNATURE_KEYS)}")
    found = detect(state_dict)
    if found.family == family:
        return found
    missing = [key for key in SIGNATURE_KEYS[family] if key not in state_dict]
    described = (
        "could not be recognised"
        if found.family == "unknown"
        else f"looks like {found.family} ({found.layout} layout, key prefix {found.prefix!r})"
    )
    lines = [f"expected a {family} checkpoint, but this one {described}."]
    if missing:
        lines.append(f"Keys a {family} file has that this one lacks ({len(missing)}):")
        lines += [f"  {key}" for key in missing[:10]]
    lines.append(f"It has {len(state_dict)} tensors, e.g. {sorted(state_dict)[:3]}.")
    raise CheckpointError("\n".join(lines))


# --- rules, tried in order; each returns a Detected or None -----------------------------------


def _prefix_of(state_dict: Mapping[str, torch.Tensor], anchor: str) -> str | None:
    """The prefix p such that p + anchor is a key (the shortest one), or None."""
    prefixes = [key[: -len(anchor)] for key in state_dict if key.endswith(anchor)]
    prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
    return min(prefixes, key=len) if prefixes else None


def _context_dim(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int | None:
    """Width of the text features the UNet cross-attends to: attn2.to_k.weight is [inner, context]."""
    for key, tensor in state_dict.items():
        if key.startswith(prefix) and key.endswith("attn2.to_k.weight"):
            return tensor.shape[1]
    return None


def _unet_family(context_dim: int | None, adm_in_channels: int | None) -> str:
    if adm_in_channels is not None:
        return "sdxl-refiner" if adm_in_channels == 2560 else "sdxl"
    return "sd2" if context_dim == 1024 else "sd1"


def _ldm_unet(sd: Mapping[str, torch.Tensor]) -> Detected | None:
    prefix = _prefix_of(sd, "input_blocks.0.0.weight")
    if prefix is None:
        return None
    label_emb = sd.get(f"{prefix}label_emb.0.0.weight")
    family = _unet_family(_context_dim(sd, prefix), None if label_emb is None else label_emb.shape[1])
    return Detected(family, "single-file" if prefix else "ldm", prefix)


def _diffusers_unet(sd: Mapping[str, torch.Tensor]) -> Detected | None:
    prefix = _prefix_of(sd, "time_embedding.linear_1.weight")
    if prefix is None or f"{prefix}down_blocks.0.resnets.0.conv1.weight" not in sd:
        return None
    add_embedding = sd.get(f"{prefix}add_embedding.linear_1.weight")
    family = _unet_family(_context_dim(sd, prefix), None if add_embedding is None else add_embedding.shape[1])
    return Detected(family, "diffusers-unet", prefix)


def _bfl_flux(sd: Mapping[str, torch.Tensor]) -> Detected | None:
    # ComfyUI saves FLUX with the ldm prefix "model.diffusion_model."; BFL's files have none.
    prefix = _prefix_of(sd, "double_blocks.0.img_attn.qkv.weight")
    if prefix is None:
        return None
    family = "flux-dev" if f"{prefix}guidance_in.in_layer.weight" in sd else "flux-schnell"
    return Detected(family, "bfl", prefix)


def _diffusers_flux(sd: Mapping[str, torch.Tensor]) -> Detected | None:
    prefix = _prefix_of(sd, "single_transformer_blocks.0.attn.to_q.weight")
    if prefix is None or f"{prefix}x_embedder.weight" not in sd:
        return None
    guidance = f"{prefix}time_text_embed.guidance_embedder.linear_1.weight" in sd
    return Detected("flux-dev" if guidance else "flux-schnell", "diffusers-transformer", prefix)


def _vae_family(sd: Mapping[str, torch.Tensor], prefix: str) -> str:
    key = f"{prefix}encoder.conv_out.weight"
    if key not in sd:
        raise CheckpointError(f"this VAE has encoder blocks but no {key}, which gives its latent channels; the file is incomplete")
    latent_channels = sd[key].shape[0] // 2  # mean and log-variance
    return "flux-ae" if latent_channels == 16 else "sd-vae"


def _ldm_vae(sd: Mapping[str, torch.Tensor]) -> Detected | None:
    prefix = _prefix_of(sd, "encoder.down.0.block.0.conv1.weight")
    if prefix is None:
        return None
    family = _vae_family(sd, prefix)
    return Detected(family, "bfl" if family == "flux-ae" else "ldm", prefix)


def _diffusers_vae(sd: Mapping[str, torch.Tensor]) -> Detected | None:
    prefix = _prefix_of(sd, "encoder.down_blocks.0.resnets.0.conv1.weight")
    if prefix is None:
        return None
    return Detected(_vae_family(sd, prefix), "diffusers-vae", prefix)


def _flux_redux(sd: Mapping[str, torch.Tensor]) -> Detected | None:
    prefix = _prefix_of(sd, "redux_up.weight")
    return None if prefix is None else Detected("flux-redux", "bfl", prefix)


def _ip_adapter(sd: Mapping[str, torch.Tensor]) -> Detected | None:
    to_k_ip = next((t for k, t in sd.items() if k.startswith("ip_adapter.") and k.endswith("to_k_ip.weight")), None)
    if to_k_ip is None:
        return None
    base = "sdxl" if to_k_ip.shape[1] == 2048 else "sd1"  # as for UNets: any other text width (toy-sd's 64) is SD1.x-like
    kind = "ip-adapter-plus" if "image_proj.latents" in sd else "ip-adapter"
    return Detected(f"{kind}-{base}", "ip-adapter")


# The down factor of a LoRA (peft, kohya, older diffusers, XLabs); a FLUX layer name in any dialect
# (SD's diffusers names have attn1/attn2 where FLUX's double blocks have attn); an SD UNet's.
LORA_DOWN = re.compile(r"\.lora_A\.|\.lora_down\.|\.lora\.down\.|\.lora_linear_layer\.down\.|_lora\d?\.down\.")
FLUX_LAYER = re.compile(r"double_blocks|single_blocks|single_transformer_blocks|transformer_blocks[._]\d+[._]attn[._]")
SD_LAYER = re.compile(r"attn[12]|(down|up|input|output)_blocks|mid(dle)?_block|conv_in|time_embed")
# A LoRA's dialect, from the names of its down factors; the first that matches a key wins, and a file
# matching none (`.lora_down` under dotted names, say) is "peft". Every dialect that
# `lora_files.read_lora` (SD) and `lora_flux.read_flux_lora` (FLUX) read is named here:
#   mixofshow  params/unet/….lora_down.weight beside params/new_concept_embedding/<token>
#   kohya      lora_unet_… / lora_te_… / lora_te1_… / lora_te2_… with .lora_down.weight
#   xlabs      double_blocks.N.processor.qkv_lora1.down.weight (FLUX's XLabs trainer)
#   diffusers  diffusers' pre-peft names: ….lora.down.weight, ….lora_linear_layer.down.weight and the
#              attention processors' ….processor.to_q_lora.down.weight
#   peft       ….lora_A.weight (diffusers since 0.25, BFL / ComfyUI FLUX files)
LORA_LAYOUTS: tuple[tuple[str, re.Pattern], ...] = (
    ("mixofshow", re.compile(r"new_concept_embedding")),
    ("kohya", re.compile(r"^lora_(unet|te\d?)_.*\.lora_down\.weight$")),
    ("xlabs", re.compile(r"\.processor\.(qkv|proj)_lora\d?\.down\.weight$")),
    ("diffusers", re.compile(r"\.lora\.down\.weight$|\.lora_linear_layer\.down\.weight$|_lora\.down\.weight$")),
)
# The text features an SD UNet's cross-attention reads (attn2's to_k / to_v down factor is
# [rank, width]), in every dialect's spelling of the layer; and what each width says.
CROSS_ATTENTION_DOWN = re.compile(r"attn2[._](processor[._])?to_[kv](_lora)?[._]")
LORA_FAMILY_BY_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
SDXL_ONLY = re.compile(r"^(text_encoder_2\.|lora_te2_)|label_emb|add_embedding")  # what SD1.x and SD2.x lack


def _lora(sd: Mapping[str, torch.Tensor]) -> Detected | None:
    lora_keys = [k for k in sd if LORA_DOWN.search(k)]
    if not lora_keys:
        return None
    if any(FLUX_LAYER.search(k) for k in lora_keys):
        base = "flux"
    elif any(SDXL_ONLY.search(k) for k in lora_keys):
        base = "sdxl"
    elif not any(SD_LAYER.search(k) for k in lora_keys):
        base = "unknown"  # e.g. only FLUX's embedders, or only a (first) text encoder
    else:
        # [rank, context_dim]; a damaged factor of fewer dimensions says nothing (read_lora names it)
        down = next((sd[k] for k in lora_keys if CROSS_ATTENTION_DOWN.search(k) and sd[k].dim() >= 2), None)
        base = "sd1" if down is None else LORA_FAMILY_BY_WIDTH.get(down.shape[1], "sd1")
    return Detected(f"lora-{base}", _lora_layout(sd))


def _lora_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """The dialect of a LoRA's key names (`LORA_LAYOUTS`)."""
    for layout, pattern in LORA_LAYOUTS:
        if any(pattern.search(k) for k in sd):
            return layout
    return "peft"


def _text_or_vision_encoder(sd: Mapping[str, torch.Tensor]) -> Detected | None:
    if "logit_bias" in sd and "vision_model.embeddings.patch_embedding.bias" in sd:
        return Detected("siglip", "transformers")
    if "vision_model.embeddings.class_embedding" in sd:
        return Detected("clip-vision", "transformers")
    if "vision_model.embeddings.patch_embedding.bias" in sd:
        return Detected("siglip-vision", "transformers")
    prefix = _prefix_of(sd, "text_model.embeddings.token_embedding.weight")
    if prefix is not None:
        return Detected("clip-text", "transformers", prefix)
    prefix = _prefix_of(sd, "encoder.block.0.layer.0.SelfAttention.q.weight")
    if prefix is not None:
        return Detected("t5-text", "transformers", prefix)
    return None


# Denoisers first: a full pipeline file also holds a VAE and text encoders.
_RULES: tuple[Callable[[Mapping[str, torch.Tensor]], Detected | None], ...] = (
    _ldm_unet,
    _diffusers_unet,
    _bfl_flux,
    _diffusers_flux,
    _ldm_vae,
    _diffusers_vae,
    _flux_redux,
    _ip_adapter,
    _lora,
    _text_or_vision_encoder,
)
