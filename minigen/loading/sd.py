"""Load an SD1.x or SDXL pipeline from a preset name, a hub id, a single file or a diffusers folder.

Every model is built on the meta device and takes the checkpoint's tensors (`assign=True`), so
weights are read once from the memory-mapped file and never copied twice. Every key must be used
and every shape must match (`load_exact`); the few keys dropped on purpose are listed in
`coverage.LDM_TRAINING_KEYS`.

    single file   model.diffusion_model.*  first_stage_model.*  cond_stage_model.* | conditioner.*
    diffusers     unet/ vae/ text_encoder/ [text_encoder_2/] tokenizer/ [tokenizer_2/] scheduler/
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from minigen.loading.coverage import LDM_TRAINING_KEYS, build_exact, cast_floating
from minigen.loading.detect import UNET_PREFIX, CheckpointError, detect, require
from minigen.loading.files import (
    config_from_metadata,
    pipeline_defaults,
    read_diffusers_component,
    read_metadata,
    read_state_dict,
    with_overrides,
)
from minigen.loading.hub import diffusers_patterns, resolve
from minigen.loading.keymaps_text import text_config_from_diffusers, text_config_from_keys, text_encoders_from_single_file
from minigen.loading.keymaps_unet import unet_config_from_diffusers, unet_config_from_keys, unet_from_diffusers
from minigen.loading.keymaps_vae import vae_config_from_diffusers, vae_config_from_keys, vae_from_diffusers
from minigen.loading.keys import take_prefix
from minigen.models.unet import UNet
from minigen.models.unet_config import UNetConfig
from minigen.models.vae import PRESETS as VAE_PRESETS
from minigen.models.vae import AutoencoderKL, VAEConfig
from minigen.pipelines.sd import StableDiffusion
from minigen.sampling import DiscreteSchedule
from minigen.text.encoders import TextEncoderConfig, build_text_encoder
from minigen.text.tokenizer import OPEN_CLIP_PAD, load_clip_tokenizer

HUB_IDS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
VAE_PREFIX = "first_stage_model."
# Configs that small custom files (the toy models) state in their metadata, because their head
# counts and latent scale cannot be read off the weights (see files.config_from_metadata).
METADATA_UNET_CONFIG = "minigen.unet_config"
METADATA_VAE_CONFIG = "minigen.vae_config"
METADATA_TEXT_CONFIG = "minigen.text_config"


def load_sd(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    variant: str | None = None,
    unet_config: Mapping[str, Any] | None = None,
    vae_config: Mapping[str, Any] | None = None,
) -> StableDiffusion:
    """source: "sd15" | "sdxl" | a hub id | a `.safetensors` single file | a diffusers folder.

    `unet_config` and `vae_config` set fields of the UNetConfig / VAEConfig that a file cannot show
    (a custom model's head counts or GroupNorm groups, say); they override what is read from the
    keys, the metadata or config.json.
    """
    path = resolve(HUB_IDS.get(str(source), source), diffusers_patterns(COMPONENTS, variant))
    overrides = {"unet": unet_config, "vae": vae_config}
    if path.is_dir():
        pipe = _from_diffusers_folder(path, dtype, variant, overrides)
    else:
        pipe = _from_single_file(path, dtype, allow_pickle, overrides)
    for module in (pipe.unet, pipe.vae, *pipe.text_encoders):
        module.to(device).eval().requires_grad_(False)
    return pipe


def _from_single_file(path: Path, dtype: torch.dtype, allow_pickle: bool, overrides: dict) -> StableDiffusion:
    checkpoint = read_state_dict(path, allow_pickle=allow_pickle)
    found = detect(checkpoint)
    if found.family not in ("sd1", "sdxl") or found.layout != "single-file":
        raise CheckpointError(
            f"{path.name} looks like a {found.family} checkpoint ({found.layout} layout), not an SD1.x or SDXL "
            "single file with UNet, VAE and text encoders; pass such a file or a diffusers folder"
        )
    require(checkpoint, found.family)
    sdxl = found.family == "sdxl"

    unet_weights = take_prefix(checkpoint, UNET_PREFIX)
    metadata = read_metadata(path)
    unet_config = config_from_metadata(metadata, METADATA_UNET_CONFIG, UNetConfig) or unet_config_from_keys(unet_weights)
    unet_config = with_overrides(unet_config, overrides["unet"])
    unet = build_exact(UNet, unet_config, unet_weights, dtype=dtype, ignore=LDM_TRAINING_KEYS)
    vae_weights = take_prefix(checkpoint, VAE_PREFIX)
    scaling = VAE_PRESETS["sdxl" if sdxl else "sd"].scaling_factor
    vae_config = config_from_metadata(metadata, METADATA_VAE_CONFIG, VAEConfig) or vae_config_from_keys(vae_weights, scaling)
    vae_config = with_overrides(vae_config, overrides["vae"])
    vae = build_exact(AutoencoderKL, vae_config, vae_weights, dtype=dtype)
    texts = text_encoders_from_single_file(checkpoint)
    text_config = config_from_metadata(metadata, METADATA_TEXT_CONFIG, TextEncoderConfig)
    text_config = text_config or text_config_from_keys(texts["text_encoder"], "quick_gelu")
    encoders = [build_text_encoder(text_config, cast_floating(texts["text_encoder"], dtype))]
    tokenizers = [load_clip_tokenizer()]  # single files carry no tokenizer: OpenAI's BPE, shipped by open_clip
    if sdxl:
        bigg = texts["text_encoder_2"]
        encoders.append(build_text_encoder(text_config_from_keys(bigg, "gelu"), cast_floating(bigg, dtype)))
        tokenizers.append(load_clip_tokenizer(pad_token=OPEN_CLIP_PAD))
    defaults = {"default_size": 1024 if sdxl else 512, **pipeline_defaults(metadata, ("default_size",))}
    return StableDiffusion(unet, vae, encoders, tokenizers, DiscreteSchedule(), **defaults)


def _from_diffusers_folder(folder: Path, dtype: torch.dtype, variant: str | None, overrides: dict) -> StableDiffusion:
    def config(component: str) -> dict:
        file = folder / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
        if not file.exists():
            raise FileNotFoundError(f"{file} not found: {folder} is not a complete diffusers SD/SDXL folder")
        return json.loads(file.read_text())

    unet_config = with_overrides(unet_config_from_diffusers(config("unet")), overrides["unet"])
    unet_weights = unet_from_diffusers(read_diffusers_component(folder / "unet", variant=variant), unet_config)
    unet = build_exact(UNet, unet_config, unet_weights, dtype=dtype)
    vae_weights = vae_from_diffusers(read_diffusers_component(folder / "vae", variant=variant))
    vae = build_exact(AutoencoderKL, with_overrides(vae_config_from_diffusers(config("vae")), overrides["vae"]), vae_weights, dtype=dtype)

    sdxl = unet_config.adm_in_channels is not None
    encoders, tokenizers = [], []
    for i in range(2 if sdxl else 1):
        suffix = f"_{i + 1}" if i else ""
        weights = read_diffusers_component(folder / f"text_encoder{suffix}", variant=variant)
        text_config = text_config_from_diffusers(config(f"text_encoder{suffix}"), weights)
        encoders.append(build_text_encoder(text_config, cast_floating(weights, dtype)))
        tokenizers.append(load_clip_tokenizer(folder / f"tokenizer{suffix}"))
    schedule = DiscreteSchedule.from_diffusers_config(config("scheduler"))
    default_size = 8 * config("unet").get("sample_size", 64)
    return StableDiffusion(unet, vae, encoders, tokenizers, schedule, default_size=default_size)
