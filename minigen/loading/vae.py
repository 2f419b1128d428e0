"""Load a VAE on its own, to replace the VAE of an SD1.x / SDXL pipeline (`load_sd(..., vae=...)`).

Fine-tuned VAEs come in three forms, all read here:

    LDM single file     vae-ft-mse-840000-ema-pruned.safetensors, sdxl_vae.safetensors:
                        encoder.* decoder.* quant_conv.* post_quant_conv.* (sometimes under first_stage_model.)
    diffusers file      diffusion_pytorch_model.safetensors: encoder.down_blocks.* ... (renamed by keymaps_vae)
    diffusers folder    config.json + diffusion_pytorch_model.safetensors (stabilityai/sd-vae-ft-mse,
                        madebyollin/sdxl-vae-fp16-fix, a hub id or a local folder), or a pipeline's vae/

A full SD / SDXL single file gives its own VAE (`first_stage_model.*`). Pickled `.ckpt` / `.pt` files
need `allow_pickle=True`, as everywhere in minigen.

One VAE can replace another only in the same latent space: the same number of latent channels (a
FLUX autoencoder's 16 cannot serve an SD UNet trained on 4) and the same downsampling factor. The
latent scale belongs to the diffusion model, which was trained on latents multiplied by it, so the new
VAE keeps the scaling and shift factors of the VAE it replaces (SD1.x 0.18215, SDXL 0.13025, the toy
models' own) whatever its file states: fine-tuned VAEs (ft-mse, the fp16 fix) keep their model's
latent space, and the scale is not in the weights anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from minigen.loading.coverage import build_exact
from minigen.loading.detect import CheckpointError, detect
from minigen.loading.files import config_from_metadata, read_diffusers_component, read_json, read_metadata, read_state_dict
from minigen.loading.hub import resolve
from minigen.loading.keymaps_vae import vae_config_from_diffusers, vae_config_from_keys, vae_from_diffusers
from minigen.loading.keys import take_prefix
from minigen.models.vae import PRESETS as VAE_PRESETS
from minigen.models.vae import AutoencoderKL, VAEConfig

log = logging.getLogger(__name__)

VAE_PREFIX = "first_stage_model."  # the VAE's keys in SD / SDXL single files (ldm's LatentDiffusion.first_stage_model)
METADATA_VAE_CONFIG = "minigen.vae_config"  # the VAEConfig a small custom file states (see files.config_from_metadata)
# Keys of ldm's AutoencoderKL training that unpruned VAE files keep and no decoder needs: the training
# loss (`loss.logvar`, LPIPS and discriminator weights) and EMA bookkeeping. Dropped on purpose.
VAE_TRAINING_KEYS = ("loss.*", "model_ema.decay", "model_ema.num_updates")
SINGLE_FILE_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")  # full pipelines: their VAE is first_stage_model.*
LOCAL_FILES = (
    "Offline, pass a local VAE instead: a file such as vae-ft-mse-840000-ema-pruned.safetensors (SD1.5, from "
    "stabilityai/sd-vae-ft-mse-original) or sdxl_vae.safetensors (SDXL, from madebyollin/sdxl-vae-fp16-fix), or a "
    "folder with config.json and diffusion_pytorch_model.safetensors, e.g. --vae /models/vae-ft-mse-840000-ema-pruned.safetensors"
)


def load_vae(
    source: str | Path,
    *,
    like: VAEConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    variant: str | None = None,
) -> AutoencoderKL:
    """A VAE from a single file (LDM or diffusers layout), a diffusers folder or a hub id (module docstring).

    like: the config of the VAE this one replaces (`pipe.vae.config`). The new VAE must have its latent
    channels and downsampling factor (else a CheckpointError says why), and takes its scaling and shift
    factors and, where the source does not state it, its GroupNorm group count. Without `like`, the
    source's own config counts (config.json, minigen metadata), else SD1.x's scale and the group count
    of the official VAEs (32; half the first width for narrower ones).
    variant: "fp16" reads `diffusion_pytorch_model.fp16.safetensors` from a diffusers folder.
    """
    path = resolve(source, _hub_patterns(variant), local_files=LOCAL_FILES)
    name = path.name if path.is_file() else str(source)  # a hub snapshot's folder is named by its commit
    if path.is_dir():
        folder = path / "vae" if (path / "vae").is_dir() else path  # a pipeline folder, or a VAE's own
        weights = vae_from_diffusers(read_diffusers_component(folder, variant=variant))
        stated = _diffusers_config(folder)
    else:
        checkpoint = read_state_dict(path, allow_pickle=allow_pickle)
        weights = vae_weights(checkpoint, name)
        stated = config_from_metadata(read_metadata(path), METADATA_VAE_CONFIG, VAEConfig)
        if like is not None:
            check_latent_space(checkpoint, stated, like, name)
    config = vae_config(weights, stated, like, name=name)
    vae = build_exact(AutoencoderKL, config, weights, dtype=dtype, ignore=VAE_TRAINING_KEYS)
    return vae.to(device).eval().requires_grad_(False)


def vae_weights(checkpoint: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The VAE tensors of a checkpoint file under minigen's (ldm) names: an LDM VAE file's keys as they
    are (a `first_stage_model.` prefix removed), a diffusers VAE file's renamed, a full SD / SDXL file's
    `first_stage_model.*`. Any other file is a CheckpointError naming what it looks like."""
    found = detect(checkpoint)
    if found.family in ("sd-vae", "flux-ae") and found.layout in ("ldm", "bfl"):
        return take_prefix(checkpoint, found.prefix) if found.prefix else dict(checkpoint)
    if found.layout == "diffusers-vae":
        return vae_from_diffusers(take_prefix(checkpoint, found.prefix))
    full = found.family in SINGLE_FILE_FAMILIES and found.layout == "single-file"
    if full and f"{VAE_PREFIX}encoder.conv_in.weight" in checkpoint:
        log.info("%s is a full %s checkpoint: using its VAE (%s*)", name, found.family, VAE_PREFIX)
        return take_prefix(checkpoint, VAE_PREFIX)
    described = "could not be recognised" if found.family == "unknown" else f"looks like {found.family} ({found.layout} layout)"
    raise CheckpointError(
        f"{name} is not a VAE: it {described}. Pass a VAE file in the LDM layout (encoder.*, decoder.*, quant_conv.*, "
        "post_quant_conv.*, e.g. vae-ft-mse-840000-ema-pruned.safetensors) or the diffusers layout "
        "(diffusion_pytorch_model.safetensors), or a diffusers VAE folder"
    )


def check_latent_space(checkpoint: Mapping[str, torch.Tensor], stated: VAEConfig | None, like: VAEConfig, name: str) -> None:
    """A full SD/SDXL checkpoint's VAE serves models of its own latent space only: SDXL's VAE was trained
    anew, so SD1.x latents mean nothing to it (and the reverse). Told apart by the latent scale of the
    file's family (or the one its metadata states) against the pipeline's."""
    found = detect(checkpoint)
    if found.layout != "single-file":
        return
    scale = stated.scaling_factor if stated else VAE_PRESETS["sdxl" if found.family.startswith("sdxl") else "sd"].scaling_factor
    if scale != like.scaling_factor:
        raise CheckpointError(f"{name} is a full {found.family} checkpoint: its VAE encodes latents of scale {scale}, but this "
                              f"pipeline's model reads latents of scale {like.scaling_factor}; pass a VAE of the model's own family")


def vae_config(
    weights: Mapping[str, torch.Tensor], stated: VAEConfig | None, like: VAEConfig | None, name: str = "the VAE"
) -> VAEConfig:
    """The config to build for ldm-named VAE `weights`: `stated` (by config.json or metadata) or the one
    their shapes show, checked against and completed by `like` (see `load_vae`)."""
    shapes = _config_from_shapes(weights, name, norm_groups=like.norm_groups if like else None)
    config = stated or shapes
    if like is None:
        return config
    if shapes.z_channels != like.z_channels:
        flux = " (a FLUX autoencoder)" if shapes.z_channels == 16 else ""
        raise CheckpointError(
            f"{name} is a VAE with {shapes.z_channels} latent channels{flux}, but this pipeline's model works on "
            f"{like.z_channels}-channel latents: pass a VAE made for it (SD1.x / SDXL VAEs have 4 latent channels, e.g. "
            "vae-ft-mse-840000-ema-pruned.safetensors for SD1.5, sdxl_vae.safetensors for SDXL)"
        )
    if shapes.downsample_factor != like.downsample_factor:
        raise CheckpointError(
            f"{name} shrinks images {shapes.downsample_factor}x into latents, but this pipeline's VAE "
            f"{like.downsample_factor}x: its latents are not the ones the model was trained on; pass a VAE of this model family"
        )
    scale = {"scaling_factor": like.scaling_factor, "shift_factor": like.shift_factor}
    if stated is not None and (stated.scaling_factor, stated.shift_factor) != (like.scaling_factor, like.shift_factor):
        log.warning(
            "%s states scaling factor %s and shift %s; keeping the pipeline's %s and %s, the latent scale its model was trained with",
            name, stated.scaling_factor, stated.shift_factor, like.scaling_factor, like.shift_factor,
        )
    return replace(config, **scale)


def _config_from_shapes(weights: Mapping[str, torch.Tensor], name: str, norm_groups: int | None) -> VAEConfig:
    """`vae_config_from_keys` with SD1.x's scale (the caller sets the family's), the given GroupNorm group
    count if any; weights that lack the keys it reads are a CheckpointError naming the first."""
    needed = ["encoder.conv_in.weight", "encoder.down.0.block.0.conv2.weight", "decoder.conv_in.weight"]
    if missing := [key for key in needed if key not in weights]:
        raise CheckpointError(f"{name} is not a complete VAE: it has no {missing[0]} (it has {len(weights)} tensors, e.g. {sorted(weights)[:3]})")
    try:
        config = vae_config_from_keys(dict(weights), VAE_PRESETS["sd"].scaling_factor)
    except KeyError as error:
        raise CheckpointError(f"{name} is not a complete VAE: it has no {error.args[0]}") from error
    return replace(config, norm_groups=norm_groups) if norm_groups else config


def _diffusers_config(folder: Path) -> VAEConfig:
    file = folder / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: a diffusers VAE folder holds config.json beside its weights")
    return vae_config_from_diffusers(read_json(file))


def _hub_patterns(variant: str | None) -> list[str]:
    """What to fetch of a hub repository for its VAE: a VAE repository's root files, or a pipeline's vae/."""
    weights = f"diffusion_pytorch_model.{variant}.safetensors" if variant else "diffusion_pytorch_model.safetensors"
    return ["config.json", weights, "vae/config.json", f"vae/{weights}"]
