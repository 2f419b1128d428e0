"""Load an SD1.x or SDXL pipeline from a preset name, a hub id, a single file or a diffusers folder.

Every model is built on the meta device and takes the checkpoint's tensors (`assign=True`), so
weights are read once from the memory-mapped file and never copied twice. Every key must be used
and every shape must match (`load_exact`); the few keys dropped on purpose are listed in
`coverage.LDM_TRAINING_KEYS`; a single file's keys outside its components (a ControlNet or LoRA stored
beside the model) are left out with a warning.

    single file   model.diffusion_model.*  first_stage_model.*  cond_stage_model.* | conditioner.*
    diffusers     unet/ vae/ text_encoder/ [text_encoder_2/] tokenizer/ [tokenizer_2/] scheduler/

Full training checkpoints (CompVis' `v1-5-pruned.ckpt`, say) also hold an EMA shadow of every UNet
weight, named as ldm's LitEma names them: "model_ema." + the key after "model." with its dots
removed (`model.diffusion_model.out.2.weight` -> `model_ema.diffusion_modelout2weight`). The EMA
weights are the ones made for sampling, so they are loaded when the set is complete (`ema_keys`);
`load_sd(..., ema=False)` takes the raw training weights instead.

Inpainting models (SD1.5's `sd-v1-5-inpainting.ckpt`, SDXL inpainting 0.1) load through the same
paths: their UNet reads 9 channels (latent, mask, masked image's latent), which the loaders read off
the first conv's weight, so `pipe.unet.config.in_channels == 9`. `load_sd(..., vae=...)` replaces the
pipeline's VAE by another of its latent space (minigen/loading/vae.py).
"""

from __future__ import annotations

import fnmatch
import logging
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from minigen.loading.coverage import LDM_TRAINING_KEYS, build_exact, cast_floating
from minigen.loading.detect import UNET_PREFIX, CheckpointError, detect
from minigen.loading.files import (
    check_pipeline_class,
    config_from_metadata,
    pipeline_defaults,
    read_diffusers_component,
    read_json,
    read_metadata,
    read_state_dict,
    with_overrides,
)
from minigen.loading.hub import diffusers_patterns, resolve
from minigen.loading.keymaps_text import text_config_from_diffusers, text_config_from_keys, text_encoders_from_single_file
from minigen.loading.keymaps_unet import (
    unet_config_from_diffusers,
    unet_config_from_keys,
    unet_from_diffusers,
    with_weight_channels,
)
from minigen.loading.keymaps_vae import vae_config_from_diffusers, vae_config_from_keys, vae_from_diffusers
from minigen.loading.keys import take_prefix
from minigen.loading.vae import METADATA_VAE_CONFIG, VAE_PREFIX, load_vae
from minigen.models.unet import UNet
from minigen.models.unet_config import UNetConfig
from minigen.models.vae import PRESETS as VAE_PRESETS
from minigen.models.vae import AutoencoderKL, VAEConfig
from minigen.pipelines.sd import StableDiffusion
from minigen.sampling import DiscreteSchedule
from minigen.text.encoders import TextEncoderConfig, build_text_encoder
from minigen.text.tokenizer import OPEN_CLIP_PAD, load_clip_tokenizer

log = logging.getLogger(__name__)  # what a load chose, for callers who want to know (sample.py prints it)

HUB_IDS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd15-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "sdxl-inpainting": "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
}
# The weights variant a preset's repository has in safetensors form: SD1.5 inpainting ships its
# full-precision diffusers weights only as pickles (.bin), its fp16 ones also as .safetensors
# (upcast to the requested dtype on load).
PRESET_VARIANTS = {"sd15-inpainting": "fp16"}
# What to download and pass instead of each preset when the hub cannot be reached.
PRESET_FILES = {
    "sd15": "v1-5-pruned-emaonly.safetensors from stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "sd_xl_base_1.0.safetensors from stabilityai/stable-diffusion-xl-base-1.0",
    "sd15-inpainting": (
        "sd-v1-5-inpainting.ckpt from stable-diffusion-v1-5/stable-diffusion-inpainting (a pickle: add --allow-pickle "
        "if you trust it), or that repository's model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/ "
        "with the *.fp16.safetensors weights (load_sd(folder, variant='fp16'))"
    ),
    "sdxl-inpainting": (
        "the diffusers folder of diffusers/stable-diffusion-xl-1.0-inpainting-0.1 (it has no single file): "
        "model_index.json, unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ and scheduler/"
    ),
}
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
LOCAL_FILES = (
    "Offline, pass local files instead: an SD1.5 single file (v1-5-pruned-emaonly.safetensors from "
    "stable-diffusion-v1-5/stable-diffusion-v1-5), an SDXL one (sd_xl_base_1.0.safetensors from "
    "stabilityai/stable-diffusion-xl-base-1.0), or a diffusers folder with model_index.json, unet/, vae/, text_encoder/ "
    "and tokenizer/ (SDXL: also text_encoder_2/ and tokenizer_2/), e.g. --model /models/v1-5-pruned-emaonly.safetensors"
)
# Configs that small custom files (the toy models) state in their metadata, because their head
# counts and latent scale cannot be read off the weights (see files.config_from_metadata).
METADATA_UNET_CONFIG = "minigen.unet_config"
METADATA_TEXT_CONFIG = "minigen.text_config"
EMA_PREFIX = "model_ema."  # ldm's LitEma: shadows of the UNet weights, plus decay and num_updates


def load_sd(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    variant: str | None = None,
    unet_config: Mapping[str, Any] | None = None,
    vae_config: Mapping[str, Any] | None = None,
    ema: bool = True,
    vae: str | Path | None = None,
    weights_dtype: torch.dtype | None = None,
) -> StableDiffusion:
    """source: a preset (`HUB_IDS`: "sd15", "sdxl", "sd15-inpainting", "sdxl-inpainting") | a hub id |
    a single file (`.safetensors`; `.ckpt` with `allow_pickle=True`) | a diffusers folder (`variant`:
    its weights variant, e.g. "fp16"; pickled `.bin` weights with `allow_pickle=True`).

    `unet_config` and `vae_config` set fields of the UNetConfig / VAEConfig that a file cannot show
    (a custom model's head counts or GroupNorm groups, say); they override what is read from the
    keys, the metadata or config.json.

    `ema`: which UNet weights a single file with EMA shadows gives (module docstring). True (the
    default): the EMA weights, as diffusers' converter does with `extract_ema=True`; a file whose
    shadows miss some UNet weight is then a CheckpointError. False: the non-EMA weights; a source with
    one set of weights (the released `*-emaonly` files, SDXL, diffusers folders) refuses it, as it would
    choose nothing.

    `vae`: a VAE to use instead of the model's (`load_vae`: an LDM or diffusers file, a diffusers folder
    or a hub id such as "stabilityai/sd-vae-ft-mse"). It must share the model's latent space, and it
    keeps the model's latent scale (SD1.x 0.18215, SDXL 0.13025); `allow_pickle` covers it too.

    `weights_dtype`: the UNet computes in `dtype` with its Linear/Conv2d weights stored in this dtype
    (`store_weights`), each read into it from the file, so the UNet never exists whole in `dtype`.

    With dtype float16, SDXL's VAE is kept in float32: the official one overflows in float16 (diffusers'
    `force_upcast`). With the fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix), `pipe.vae.half()` halves it.
    """
    variant = variant or PRESET_VARIANTS.get(str(source))
    path = resolve(HUB_IDS.get(str(source), source), diffusers_patterns(COMPONENTS, variant), local_files=local_files(source))
    overrides = {"unet": unet_config, "vae": vae_config}
    if path.is_dir():
        if not ema:
            raise CheckpointError(f"ema=False (sample.py --no-ema) picks a training checkpoint's non-EMA UNet weights; the "
                                  f"diffusers folder {path} holds one set: leave it out")
        pipe = _from_diffusers_folder(path, dtype, variant, overrides, allow_pickle, weights_dtype)
    else:
        pipe = _from_single_file(path, dtype, allow_pickle, overrides, ema, weights_dtype, own_vae=vae is None)
    if vae is not None:
        pipe.vae = load_vae(vae, like=pipe.vae.config, dtype=dtype, allow_pickle=allow_pickle)
        log.info("VAE replaced by %s", vae)
    channels, z = pipe.unet.config.in_channels, pipe.vae.config.z_channels
    if channels == 2 * z + 1:
        log.info("an inpainting UNet: it reads %d channels (latent, mask, masked image's latent)", channels)
    elif channels != z:
        raise CheckpointError(
            f"{path.name}: this UNet reads {channels} input channels, neither the latent's {z} (text to image) nor {2 * z + 1} "
            "(inpainting): an image-conditioned model such as instruct-pix2pix (8) or SD2 depth (5), which minigen does not run"
        )
    if dtype == torch.float16 and pipe.is_sdxl:
        pipe.vae.float()
        log.info("SDXL's VAE runs in float32: the official one overflows in float16 (pipe.vae.half() for the fp16-fix VAE)")
    for module in (pipe.unet, pipe.vae, *pipe.text_encoders):
        module.to(device).eval().requires_grad_(False)
    return pipe


def local_files(source: str | Path) -> str:
    """What to pass instead of `source` when the hub cannot be reached: a preset's own files, else the
    general advice."""
    if str(source) in PRESET_FILES:
        return f"Offline, pass local files instead of the preset {source}: {PRESET_FILES[str(source)]}"
    return LOCAL_FILES


def _from_single_file(
    path: Path, dtype: torch.dtype, allow_pickle: bool, overrides: dict, ema: bool, weights_dtype: torch.dtype | None, own_vae: bool
) -> StableDiffusion:
    """An SD/SDXL single file's pipeline; `own_vae` False: load_sd replaces the VAE, so a file without one is fine."""
    checkpoint = read_state_dict(path, allow_pickle=allow_pickle)
    found = detect(checkpoint)
    if found.family not in ("sd1", "sdxl") or found.layout != "single-file":
        raise CheckpointError(
            f"{path.name} holds {found.family} weights ({found.layout} layout), not an SD1.x or SDXL "
            "single file with UNet, VAE and text encoders; pass such a file or a diffusers folder"
        )
    sdxl = found.family == "sdxl"

    unet_weights = _unet_weights(checkpoint, ema)
    metadata = read_metadata(path)
    unet_config = config_from_metadata(metadata, METADATA_UNET_CONFIG, UNetConfig) or unet_config_from_keys(unet_weights)
    unet_config = with_overrides(unet_config, overrides["unet"])
    unet = build_exact(UNet, unet_config, unet_weights, dtype=dtype, weights_dtype=weights_dtype, ignore=LDM_TRAINING_KEYS)
    vae_weights = take_prefix(checkpoint, VAE_PREFIX)
    preset = VAE_PRESETS["sdxl" if sdxl else "sd"]
    vae_config = config_from_metadata(metadata, METADATA_VAE_CONFIG, VAEConfig)
    vae_config = with_overrides(vae_config or (vae_config_from_keys(vae_weights, preset.scaling_factor) if vae_weights else preset), overrides["vae"])
    if vae_weights:
        vae = build_exact(AutoencoderKL, vae_config, vae_weights, dtype=dtype)
    elif own_vae:
        raise CheckpointError(f"{path.name} has no VAE (no {VAE_PREFIX}* keys): pass the base model's with vae= (sample.py --vae), "
                              "e.g. the VAE file of SD1.5 or SDXL")
    else:
        with torch.device("meta"):  # its config only, no weights made: load_sd puts the vae= one in its place
            vae = AutoencoderKL(vae_config)
    texts = text_encoders_from_single_file(checkpoint)
    text_config = config_from_metadata(metadata, METADATA_TEXT_CONFIG, TextEncoderConfig)
    text_config = text_config or text_config_from_keys(texts["text_encoder"], "quick_gelu")
    encoders = [build_text_encoder(text_config, cast_floating(texts["text_encoder"], dtype))]
    tokenizers = [load_clip_tokenizer()]  # single files carry no tokenizer: OpenAI's BPE, shipped by open_clip
    if sdxl:
        bigg = texts.get("text_encoder_2", {})
        if "text_projection.weight" not in bigg:  # SDXL reads bigG's projected pooled output
            what = "its text_projection" if bigg else "SDXL's second text encoder, OpenCLIP-bigG"
            raise CheckpointError(f"{path.name} lacks {what} (conditioner.embedders.1.model.*); use a complete SDXL single file "
                                  "or a diffusers folder")
        encoders.append(build_text_encoder(text_config_from_keys(bigg, "gelu"), cast_floating(bigg, dtype)))
        tokenizers.append(load_clip_tokenizer(pad_token=OPEN_CLIP_PAD))
    warn_unused(checkpoint, path.name)
    defaults = {"default_size": 1024 if sdxl else 512, **pipeline_defaults(metadata, ("default_size",))}
    return StableDiffusion(unet, vae, encoders, tokenizers, single_file_schedule(checkpoint, path.name), **defaults)


# Keys of a single file that no component reads: ldm's schedule buffers, EMA bookkeeping, the markers
# `single_file_schedule` reads, and the position-id buffers the text encoders rebuild.
SINGLE_FILE_PARTS = (UNET_PREFIX, VAE_PREFIX, EMA_PREFIX, "cond_stage_model.", "conditioner.")
SCHEDULE_MARKERS = ("v_pred", "ztsnr")


def single_file_schedule(checkpoint: Mapping[str, torch.Tensor], name: str) -> DiscreteSchedule:
    """SD's schedule, predicting v where the file says so with an empty `v_pred` key (as ComfyUI and
    A1111 read v-prediction files); a zero-terminal-SNR file (`ztsnr`) is refused, as its diffusers
    config is: its last sigma is infinite."""
    if "ztsnr" in checkpoint:
        raise CheckpointError(f"{name} marks zero-terminal-SNR training (a ztsnr key), which minigen's schedules do not run")
    return DiscreteSchedule(prediction_type="v" if "v_pred" in checkpoint else "epsilon")


def warn_unused(checkpoint: Mapping[str, torch.Tensor], name: str) -> None:
    """Warn about weights of a single file that no component reads (a ControlNet or LoRA stored in it,
    an optimizer state): they are left out, and the user should know."""
    unused = [key for key in checkpoint if not key.startswith(SINGLE_FILE_PARTS) and key not in SCHEDULE_MARKERS
              and not any(fnmatch.fnmatchcase(key, pattern) for pattern in LDM_TRAINING_KEYS)]  # fmt: skip
    if unused:
        groups = sorted({re.match(r"[^._]*(_[^._]*)?", key)[0] + "*" for key in unused})  # control_model*, lora_unet*
        warnings.warn(f"{name}: {len(unused)} keys outside the UNet, VAE and text encoders are not used "
                      f"({', '.join(groups[:5])}{', ...' if len(groups) > 5 else ''}; e.g. {unused[0]})", stacklevel=4)


def ema_keys(checkpoint: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{UNet key (after "model.diffusion_model."): its EMA shadow's key} for the UNet weights whose
    shadow is in `checkpoint`; {} for a file without shadows (`model_ema.decay` alone is no shadow)."""
    shadows = {key.removeprefix(UNET_PREFIX): ema_name(key) for key in checkpoint if key.startswith(UNET_PREFIX)}
    return {key: shadow for key, shadow in shadows.items() if shadow in checkpoint}


def ema_name(key: str) -> str:
    """The EMA shadow's key of a UNet key, as ldm's LitEma names it: "model.diffusion_model.out.2.weight"
    -> "model_ema.diffusion_modelout2weight" (diffusers' `convert_ldm_unet_checkpoint` reads the same)."""
    return EMA_PREFIX + key.removeprefix("model.").replace(".", "")


def _unet_weights(checkpoint: Mapping[str, torch.Tensor], ema: bool) -> dict[str, torch.Tensor]:
    """The UNet's weights of a single file: the EMA shadows if `ema` and the file has them, else its own."""
    weights = take_prefix(checkpoint, UNET_PREFIX)
    if not ema:
        if not ema_keys(checkpoint):  # the one set of weights: ema=False would choose nothing
            raise CheckpointError("ema=False (sample.py --no-ema) picks a training checkpoint's non-EMA UNet weights, but this "
                                  "file holds one set (no model_ema.* shadows): leave it out")
        return weights
    shadows = ema_keys(checkpoint)
    if not shadows:
        return weights
    if missing := [key for key in weights if key not in shadows]:
        raise CheckpointError(
            f"this checkpoint has EMA weights for {len(shadows)} of the UNet's {len(weights)} weights; "
            f"e.g. {UNET_PREFIX}{missing[0]} has no shadow {ema_name(UNET_PREFIX + missing[0])} "
            f"({len(missing)} missing). The EMA set is incomplete: load the non-EMA weights with "
            "load_sd(..., ema=False), or use a file with a complete EMA (or none)."
        )
    log.info("loaded the UNet's EMA weights (model_ema.*); ema=False (sample.py --no-ema) loads the others")
    return {key: checkpoint[shadows[key]] for key in weights}


def is_sd_pipeline(kind: str) -> bool:
    """Whether model_index.json's `_class_name` is an SD1.x/2.x/XL pipeline (ControlNet's and PAG's too: their
    UNet is SD's; one that reads other inputs is refused by its channels). SD3 is another model."""
    return kind.startswith("StableDiffusion") and not kind.startswith("StableDiffusion3")


def _from_diffusers_folder(
    folder: Path, dtype: torch.dtype, variant: str | None, overrides: dict, allow_pickle: bool, weights_dtype: torch.dtype | None
) -> StableDiffusion:
    index = check_pipeline_class(folder, is_sd_pipeline, "Stable Diffusion 1.x/2.x/XL",
                                 "minigen runs those (and FLUX.1, with load_flux or load_pipeline)")
    if index.get("requires_aesthetics_score") or (not (folder / "text_encoder").is_dir() and (folder / "text_encoder_2").is_dir()):
        raise CheckpointError(f"{folder} holds the SDXL refiner (it reads an aesthetic score and has no first text "
                              "encoder), which minigen does not run; use an SDXL base model")

    def config(component: str) -> dict:
        file = folder / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
        if not file.exists():
            checkpoints = sorted(p.name for p in folder.glob("*.safetensors"))
            hint = f"; for a single-file checkpoint pass the file itself ({', '.join(checkpoints)})" if checkpoints else ""
            raise FileNotFoundError(f"{file} not found: {folder} is not a complete diffusers SD/SDXL folder{hint}")
        return read_json(file)

    unet_json = config("unet")
    try:  # every config first: a model minigen does not run is named before any weight is read
        schedule = DiscreteSchedule.from_diffusers_config(config("scheduler"))
        unet_config = unet_config_from_diffusers(unet_json)
        vae_config = vae_config_from_diffusers(config("vae"))
    except CheckpointError:
        raise
    except ValueError as error:
        raise CheckpointError(f"{folder}: {error}") from error
    unet_weights = read_diffusers_component(folder / "unet", variant=variant, allow_pickle=allow_pickle)
    unet_config = with_weight_channels(unet_config, unet_weights, str(folder / "unet"))  # inpainting: 9 in
    unet_config = with_overrides(unet_config, overrides["unet"])
    unet = build_exact(UNet, unet_config, unet_from_diffusers(unet_weights, unet_config), dtype=dtype, weights_dtype=weights_dtype)
    vae_weights = vae_from_diffusers(read_diffusers_component(folder / "vae", variant=variant, allow_pickle=allow_pickle))
    vae = build_exact(AutoencoderKL, with_overrides(vae_config, overrides["vae"]), vae_weights, dtype=dtype)

    sdxl = unet_config.adm_in_channels is not None
    encoders, tokenizers = [], []
    for i in range(2 if sdxl else 1):
        suffix = f"_{i + 1}" if i else ""
        weights = read_diffusers_component(folder / f"text_encoder{suffix}", variant=variant, allow_pickle=allow_pickle)
        text_config = text_config_from_diffusers(config(f"text_encoder{suffix}"), weights)
        encoders.append(build_text_encoder(text_config, cast_floating(weights, dtype)))
        tokenizers.append(load_clip_tokenizer(folder / f"tokenizer{suffix}"))
    default_size = 8 * unet_json.get("sample_size", 64)
    return StableDiffusion(unet, vae, encoders, tokenizers, schedule, default_size=default_size,
                           force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))
