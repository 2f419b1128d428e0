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
from pathlib import Path

import torch

from minigen.loading.coverage import LDM_TRAINING_KEYS, load_exact
from minigen.loading.detect import UNET_PREFIX, CheckpointError, detect, require
from minigen.loading.files import read_diffusers_component, read_metadata, read_state_dict
from minigen.loading.hub import diffusers_patterns, resolve
from minigen.loading.keymaps_text import take_prefix, text_encoders_from_single_file
from minigen.loading.keymaps_unet import unet_config_from_diffusers, unet_config_from_keys, unet_from_diffusers
from minigen.loading.keymaps_vae import vae_from_diffusers
from minigen.models.unet import UNet
from minigen.models.unet_config import UNetConfig
from minigen.models.vae import PRESETS as VAE_PRESETS
from minigen.models.vae import AutoencoderKL, VAEConfig
from minigen.pipeline import StableDiffusion
from minigen.sampling import DiscreteSchedule
from minigen.text.encoders import TextEncoderConfig, build_text_encoder
from minigen.text.tokenizer import OPEN_CLIP_PAD, load_clip_tokenizer

HUB_IDS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
VAE_PREFIX = "first_stage_model."
METADATA_UNET_CONFIG = "minigen.unet_config"


def load_sd(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    variant: str | None = None,
) -> StableDiffusion:
    """source: "sd15" | "sdxl" | a hub id | a `.safetensors` single file | a diffusers folder."""
    path = resolve(HUB_IDS.get(str(source), source), diffusers_patterns(COMPONENTS, variant))
    if path.is_dir():
        pipe = _from_diffusers_folder(path, dtype, variant)
    else:
        pipe = _from_single_file(path, dtype, allow_pickle)
    for module in (pipe.unet, pipe.vae, *pipe.text_encoders):
        module.to(device).eval().requires_grad_(False)
    return pipe


def _build(model_class, config, state_dict, dtype, ignore=()):
    with torch.device("meta"):
        model = model_class(config)
    load_exact(model, state_dict, ignore=ignore, dtype=dtype)
    return model


def _from_single_file(path: Path, dtype: torch.dtype, allow_pickle: bool) -> StableDiffusion:
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
    unet_config = unet_config_from_metadata(read_metadata(path)) or unet_config_from_keys(unet_weights)
    unet = _build(UNet, unet_config, unet_weights, dtype, LDM_TRAINING_KEYS)
    vae_weights = take_prefix(checkpoint, VAE_PREFIX)
    scaling = VAE_PRESETS["sdxl" if sdxl else "sd"].scaling_factor
    vae = _build(AutoencoderKL, vae_config_from_keys(vae_weights, scaling), vae_weights, dtype)
    texts = text_encoders_from_single_file(checkpoint)
    encoders = [build_text_encoder(text_config_from_keys(texts["text_encoder"], "quick_gelu"), _cast(texts["text_encoder"], dtype))]
    tokenizers = [load_clip_tokenizer()]  # single files carry no tokenizer: OpenAI's BPE, shipped by open_clip
    if sdxl:
        bigg = texts["text_encoder_2"]
        encoders.append(build_text_encoder(text_config_from_keys(bigg, "gelu"), _cast(bigg, dtype)))
        tokenizers.append(load_clip_tokenizer(pad_token=OPEN_CLIP_PAD))
    return StableDiffusion(unet, vae, encoders, tokenizers, DiscreteSchedule(), default_size=1024 if sdxl else 512)


def _from_diffusers_folder(folder: Path, dtype: torch.dtype, variant: str | None) -> StableDiffusion:
    def config(component: str) -> dict:
        file = folder / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
        if not file.exists():
            raise FileNotFoundError(f"{file} not found: {folder} is not a complete diffusers SD/SDXL folder")
        return json.loads(file.read_text())

    unet_config = unet_config_from_diffusers(config("unet"))
    unet_weights = unet_from_diffusers(read_diffusers_component(folder / "unet", variant=variant), unet_config)
    unet = _build(UNet, unet_config, unet_weights, dtype)
    vae_weights = vae_from_diffusers(read_diffusers_component(folder / "vae", variant=variant))
    vae = _build(AutoencoderKL, vae_config_from_diffusers(config("vae")), vae_weights, dtype)

    sdxl = unet_config.adm_in_channels is not None
    encoders, tokenizers = [], []
    for i in range(2 if sdxl else 1):
        suffix = f"_{i + 1}" if i else ""
        weights = read_diffusers_component(folder / f"text_encoder{suffix}", variant=variant)
        text = config(f"text_encoder{suffix}")
        text_config = TextEncoderConfig(
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"],
            hidden_act=text["hidden_act"],
            projection_dim=text.get("projection_dim") if "text_projection.weight" in weights else None,
        )
        encoders.append(build_text_encoder(text_config, _cast(weights, dtype)))
        tokenizers.append(load_clip_tokenizer(folder / f"tokenizer{suffix}"))
    schedule = DiscreteSchedule.from_diffusers_config(config("scheduler"))
    default_size = 8 * config("unet").get("sample_size", 64)
    return StableDiffusion(unet, vae, encoders, tokenizers, schedule, default_size=default_size)


def vae_config_from_diffusers(config: dict) -> VAEConfig:
    """The VAEConfig of a diffusers `vae/config.json`."""
    channels = config["block_out_channels"]
    return VAEConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        base_channels=channels[0],
        channel_mult=tuple(c // channels[0] for c in channels),
        num_res_blocks=config.get("layers_per_block", 2),
        z_channels=config["latent_channels"],
        scaling_factor=config.get("scaling_factor", 0.18215),
        shift_factor=config.get("shift_factor") or 0.0,
        use_quant_conv=config.get("use_quant_conv", True),
        norm_groups=config.get("norm_num_groups", 32),
    )


def unet_config_from_metadata(metadata: dict[str, str]) -> UNetConfig | None:
    """The UNetConfig a file states in its metadata (`minigen.unet_config`, JSON), if any.

    Official files need none: their configs follow from the keys. Small custom models (whose head
    count the weights cannot reveal) record theirs when saved by minigen.
    """
    if METADATA_UNET_CONFIG not in metadata:
        return None
    fields = json.loads(metadata[METADATA_UNET_CONFIG])
    return UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def vae_config_from_keys(weights: dict[str, torch.Tensor], scaling_factor: float) -> VAEConfig:
    """The VAEConfig of ldm-named VAE weights (channels, levels, blocks, latent width from shapes)."""
    base = weights["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.down."))
    mult = tuple(weights[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // base for i in range(levels))
    blocks = 1 + max(int(k.split(".")[4]) for k in weights if k.startswith("encoder.down.0.block."))
    return VAEConfig(
        base_channels=base,
        channel_mult=mult,
        num_res_blocks=blocks,
        z_channels=weights["decoder.conv_in.weight"].shape[1],
        scaling_factor=scaling_factor,
        use_quant_conv="quant_conv.weight" in weights,
        norm_groups=min(32, base // 2),  # not visible in the weights: 32 for every official VAE
    )


def text_config_from_keys(weights: dict[str, torch.Tensor], hidden_act: str) -> TextEncoderConfig:
    """The TextEncoderConfig of CLIP text weights (file layout); heads are 64 wide in every CLIP."""
    hidden = weights["text_model.embeddings.token_embedding.weight"].shape[1]
    layers = 1 + max(int(k.split(".")[3]) for k in weights if k.startswith("text_model.encoder.layers."))
    projection = weights.get("text_projection.weight")
    return TextEncoderConfig(
        hidden_size=hidden,
        intermediate_size=weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_layers=layers,
        num_heads=max(1, hidden // 64),
        hidden_act=hidden_act,
        projection_dim=None if projection is None else projection.shape[0],
        vocab_size=weights["text_model.embeddings.token_embedding.weight"].shape[0],
    )


def _cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
