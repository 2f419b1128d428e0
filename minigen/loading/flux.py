"""Load FLUX.1 from a preset name, a hub id, a diffusers folder, or BFL single files.

    diffusers folder   transformer/ (sharded) vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/
    BFL single files   flux1-dev.safetensors | flux1-schnell.safetensors  +  ae.safetensors
                       (+ the text encoders and tokenizers from a diffusers folder or hub id)

A transformer file may carry a `model.diffusion_model.` prefix (ComfyUI exports) and may be stored in
fp8 (e4m3fn): both load, fp8 upcast to the requested dtype. ComfyUI's all-in-one checkpoints also hold
the autoencoder (`vae.*`, BFL's names), which serves when `ae` is not given; their text encoders
(`text_encoders.*`) are not read, as the tokenizers come from the `text_encoders` folder anyway. ComfyUI's "scaled fp8" files (a
`scaled_fp8` marker key, and a `scale_weight` beside each fp8 Linear weight) load dequantized:
weight · scale_weight (`dequantize_scaled_fp8`). Every model is built on the meta device
and takes the file's tensors; every key must be used and every shape must match (`load_exact`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minigen.pipelines.flux import FluxPipeline
from minigen.sampling.flow import FlowSchedule
from minigen.loading.coverage import build_exact, cast_floating
from minigen.loading.detect import CheckpointError, detect, require
from minigen.loading.files import (
    check_pipeline_class,
    config_fields,
    config_from_metadata,
    pipeline_defaults,
    read_diffusers_component,
    read_json,
    read_metadata,
    read_state_dict,
    with_overrides,
)
from minigen.loading.hub import diffusers_patterns, resolve
from minigen.loading.keymaps_flux import flux_config_from_diffusers, flux_config_from_keys, flux_from_diffusers
from minigen.loading.keymaps_text import text_config_from_diffusers
from minigen.loading.keymaps_vae import vae_config_from_diffusers, vae_config_from_keys, vae_from_diffusers
from minigen.loading.keys import take_prefix
from minigen.loading.sd import METADATA_VAE_CONFIG  # as in SD single files: a custom ae file's scale and shift
from minigen.models.flux import Flux
from minigen.models.flux_config import FluxConfig
from minigen.models.vae import PRESETS as VAE_PRESETS
from minigen.models.vae import AutoencoderKL, VAEConfig
from minigen.text.encoders import build_text_encoder
from minigen.text.t5 import MAX_LENGTH_DEV, MAX_LENGTH_SCHNELL, build_t5_encoder, load_t5_tokenizer, t5_config_from_diffusers
from minigen.text.tokenizer import load_clip_tokenizer

HUB_IDS = {"flux-dev": "black-forest-labs/FLUX.1-dev", "flux-schnell": "black-forest-labs/FLUX.1-schnell"}
FLUX_PIPELINES = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")  # model_index.json's _class_name of text-to-image FLUX.1
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
COMPONENTS = ("transformer", "vae", *TEXT_COMPONENTS, "scheduler")
# schnell is Apache-2.0 and ungated; its text encoders and autoencoder are the same files as dev's
DEFAULT_TEXT_ENCODERS = HUB_IDS["flux-schnell"]
LOCAL_FILES = (
    "Offline, pass local files instead: the transformer (flux1-dev.safetensors from black-forest-labs/FLUX.1-dev or "
    "flux1-schnell.safetensors from black-forest-labs/FLUX.1-schnell) with --ae ae.safetensors (same repositories) and "
    "--text-encoders a folder with text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/ of FLUX.1-schnell; "
    "or a whole FLUX diffusers folder with model_index.json and transformer/"
)
METADATA_FLUX_CONFIG = "minigen.flux_config"
COMFY_AE_PREFIX = "vae."  # the autoencoder in ComfyUI's all-in-one FLUX checkpoints
PIPELINE_DEFAULTS = ("max_length", "default_size", "default_steps", "default_cfg")
SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI's mark of a scaled-fp8 file: an empty tensor of the weights' fp8 dtype
SCALE_KEYS = ("scale_weight", "scale_input")  # what such a file adds beside a quantized Linear's weight and bias


def load_flux(
    source: str | Path,
    *,
    ae: str | Path | None = None,
    text_encoders: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    transformer_config: Mapping[str, Any] | None = None,
    ae_config: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    weights_dtype: torch.dtype | None = None,
) -> FluxPipeline:
    """source: "flux-dev" | "flux-schnell" | a hub id | a diffusers folder | a transformer file (BFL's
    layout, or the diffusers folder's transformer weights in one file).

    For a transformer file, `ae` is the autoencoder file (default: the hub's FLUX.1-schnell
    `ae.safetensors`) and `text_encoders` a diffusers folder or hub id with text_encoder/,
    text_encoder_2/, tokenizer/ and tokenizer_2/ (default: FLUX.1-schnell's). bf16 is the
    default dtype: FLUX was trained in it, and T5 overflows in fp16. `transformer_config` and
    `ae_config` set fields of the FluxConfig / VAEConfig that the files cannot show (a custom
    model's RoPE axes, say); they override what is read from the keys, the metadata or config.json.
    `allow_pickle` lets pickled files (a `.ckpt` transformer or autoencoder, a folder's `.bin` weights) be read.
    `weights_dtype`: the transformer computes in `dtype` with its Linear weights stored in this dtype (fp8:
    half of bf16's memory; `store_weights`), each read into it from the file, never whole in `dtype`.
    """
    if text_encoders is not None and Path(text_encoders).is_file():  # said before the transformer loads
        raise ValueError(f"text_encoders {text_encoders} is a file; text_encoders (sample.py --text-encoders) takes a diffusers folder "
                         f"or hub id with {', '.join(f'{name}/' for name in TEXT_COMPONENTS)}, e.g. {DEFAULT_TEXT_ENCODERS}")
    path = resolve(HUB_IDS.get(str(source), source), diffusers_patterns(COMPONENTS), local_files=LOCAL_FILES)
    defaults = {}
    if path.is_dir():
        check_pipeline_class(path, FLUX_PIPELINES.__contains__, "FLUX.1 dev or schnell",
                             "minigen runs text-to-image FLUX.1 (Fill, Kontext and the control models read images beside the text)")
        if ae is not None or text_encoders is not None:
            raise ValueError(f"ae and text_encoders complete a FLUX transformer file; {source} is a diffusers folder (or preset, "
                             "or hub id) with its own vae/ and text encoders: leave them out")
        transformer = _build_transformer_from_diffusers(path / "transformer", dtype, transformer_config, allow_pickle, weights_dtype)
        vae = _build_vae(path / "vae", dtype, ae_config, allow_pickle)
        if (scheduler := path / "scheduler" / "scheduler_config.json").exists():  # a fine-tune may ship its own shift
            try:
                defaults["schedule"] = FlowSchedule.from_diffusers_config(read_json(scheduler))
            except ValueError as error:
                raise CheckpointError(f"{scheduler}: {error}") from None
    else:
        transformer = load_flux_transformer(path, dtype, transformer_config, allow_pickle=allow_pickle, weights_dtype=weights_dtype)
        defaults = pipeline_defaults(read_metadata(path), PIPELINE_DEFAULTS)
        if ae is None and f"{COMFY_AE_PREFIX}encoder.conv_in.weight" in read_state_dict(path, allow_pickle=allow_pickle):  # all-in-one
            vae = _build_vae(path, dtype, ae_config, allow_pickle, prefix=COMFY_AE_PREFIX)
        else:
            ae = ae or resolve(DEFAULT_TEXT_ENCODERS, ["ae.safetensors"], local_files=LOCAL_FILES) / "ae.safetensors"
            vae = _build_vae(Path(ae), dtype, ae_config, allow_pickle)

    if transformer.config.in_channels != 4 * vae.config.z_channels:  # 2x2 patches of the latent; said before T5 is fetched
        raise CheckpointError(
            f"{path.name}: this FLUX transformer reads {transformer.config.in_channels} input channels per token, not the "
            f"{4 * vae.config.z_channels} of text-to-image FLUX.1: an image-conditioned model (FLUX.1 Fill 384, Depth or "
            "Canny 128), which minigen does not run; use flux1-dev or flux1-schnell"
        )
    text_folder = path if path.is_dir() else resolve(
        text_encoders or DEFAULT_TEXT_ENCODERS, diffusers_patterns(TEXT_COMPONENTS), local_files=LOCAL_FILES
    )
    t5, t5_tokenizer, clip, clip_tokenizer = _load_text_encoders(text_folder, dtype, allow_pickle)
    defaults = {"max_length": MAX_LENGTH_DEV if transformer.config.guidance_embed else MAX_LENGTH_SCHNELL, **defaults}
    t5_tokenizer.model_max_length = defaults["max_length"]  # what this model reads: token_span's default (schnell 256, not 512)
    pipe = FluxPipeline(transformer, vae, t5, t5_tokenizer, clip, clip_tokenizer, **defaults)
    for module in (pipe.transformer, pipe.vae, pipe.t5, pipe.clip):
        module.to(device).eval().requires_grad_(False)
    return pipe


def _load_text_encoders(folder: Path, dtype: torch.dtype, allow_pickle: bool) -> tuple[nn.Module, object, nn.Module, object]:
    """T5 and its tokenizer, CLIP and its tokenizer, from a diffusers folder's text_encoder_2/, tokenizer_2/,
    text_encoder/ and tokenizer/."""
    clip_weights = read_diffusers_component(folder / "text_encoder", allow_pickle=allow_pickle)
    clip_config = text_config_from_diffusers(_config(folder / "text_encoder"), clip_weights)
    clip = build_text_encoder(clip_config, cast_floating(clip_weights, dtype))
    t5_config = t5_config_from_diffusers(_config(folder / "text_encoder_2"))
    t5 = build_t5_encoder(t5_config, cast_floating(read_diffusers_component(folder / "text_encoder_2", allow_pickle=allow_pickle), dtype))
    # a folder without tokenizer/ (the toy model's) reads OpenAI's CLIP vocabulary, as SD single files do
    clip_tokenizer = load_clip_tokenizer(folder / "tokenizer" if (folder / "tokenizer").is_dir() else None)
    return t5, load_t5_tokenizer(folder / "tokenizer_2"), clip, clip_tokenizer


def load_flux_transformer(
    file: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    config: Mapping[str, Any] | None = None,
    *,
    allow_pickle: bool = False,
    weights_dtype: torch.dtype | None = None,
) -> Flux:
    """A FLUX transformer from a BFL-layout (or diffusers-layout) file (optionally `model.diffusion_model.`-prefixed; fp8,
    ComfyUI's scaled fp8 or not); `config` sets FluxConfig fields the file cannot show; a pickle is read with `allow_pickle`;
    `weights_dtype` stores the Linear weights in it (see `load_flux`)."""
    file = Path(file)
    checkpoint = read_state_dict(file, allow_pickle=allow_pickle)
    found = detect(checkpoint)
    if found.family not in ("flux-dev", "flux-schnell"):
        raise CheckpointError(
            f"{file.name} holds {found.family} weights ({found.layout} layout), not a FLUX.1 "
            "transformer; pass flux1-dev.safetensors or flux1-schnell.safetensors (BFL layout), or a "
            "diffusers folder with transformer/"
        )
    weights = take_prefix(checkpoint, found.prefix) if found.prefix else checkpoint
    if any(key.rpartition(".")[2] in (SCALED_FP8_MARKER, *SCALE_KEYS) for key in weights):
        weights = dequantize_scaled_fp8(weights, dtype)
    if found.layout == "diffusers-transformer":
        weights = flux_from_diffusers(weights)
    stated = config_from_metadata(read_metadata(file), METADATA_FLUX_CONFIG, FluxConfig)
    if stated is None:
        model_config = FluxConfig(**flux_config_from_keys(weights, config_fields(FluxConfig, config)))
    else:
        model_config = with_overrides(stated, config)
    return build_exact(Flux, model_config, weights, dtype=dtype, weights_dtype=weights_dtype)  # fp8 tensors are upcast here (or kept)


def dequantize_scaled_fp8(weights: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A ComfyUI "scaled fp8" transformer's tensors (prefix removed) as plain weights in `dtype`.

    Such a file stores each quantized Linear's weight in fp8 (e4m3fn) beside a float32 scalar
    `scale_weight`, and sometimes `scale_input`. ComfyUI computes with weight · scale_weight (its
    `scaled_fp8_op.convert_weight`, comfy/ops.py), so that product, taken in float32 and then cast to
    `dtype`, is the weight. `scale_input` scales activations for fp8 matmuls only and is dropped, as
    is the `scaled_fp8` marker; tensors without a scale (norms, biases) are kept as they are.
    """
    scales = {key.removesuffix("scale_weight"): weights[key] for key in weights if key.endswith(".scale_weight")}
    if orphans := [module for module in scales if f"{module}weight" not in weights]:
        raise CheckpointError(f"{orphans[0]}scale_weight scales no weight ({orphans[0]}weight is absent): the file is damaged")
    if uneven := [f"{module}scale_weight {list(s.shape)}" for module, s in scales.items() if s.numel() != 1]:
        raise CheckpointError(
            f"{uneven[0]}: minigen reads scaled fp8 files with one scale per tensor, as ComfyUI writes them; "
            "this one has several (a per-channel or block format?). Use a bf16 or plain fp8 file instead."
        )
    plain = {}
    for key, tensor in weights.items():
        module, _, name = key.rpartition(".")
        if key == SCALED_FP8_MARKER or name in SCALE_KEYS:
            continue
        scale = scales.get(f"{module}.") if name == "weight" else None
        plain[key] = tensor if scale is None else (tensor.float() * scale.float()).to(dtype)
    return plain


def _build_transformer_from_diffusers(
    folder: Path, dtype: torch.dtype, overrides: Mapping[str, Any] | None, allow_pickle: bool, weights_dtype: torch.dtype | None
) -> Flux:
    config = with_overrides(FluxConfig(**flux_config_from_diffusers(_config(folder))), overrides)
    weights = flux_from_diffusers(read_diffusers_component(folder, allow_pickle=allow_pickle))
    return build_exact(Flux, config, weights, dtype=dtype, weights_dtype=weights_dtype)


def _build_vae(
    source: Path, dtype: torch.dtype, overrides: Mapping[str, Any] | None, allow_pickle: bool, prefix: str = ""
) -> AutoencoderKL:
    """The FLUX autoencoder from a diffusers vae/ folder, a BFL `ae.safetensors`, the diffusers
    folder's `vae/diffusion_pytorch_model.safetensors` alone, or the `prefix`ed part of a file."""
    if source.is_dir():
        config = with_overrides(vae_config_from_diffusers(_config(source)), overrides)
        return build_exact(AutoencoderKL, config, vae_from_diffusers(read_diffusers_component(source, allow_pickle=allow_pickle)), dtype=dtype)
    weights = read_state_dict(source, allow_pickle=allow_pickle)
    weights = take_prefix(weights, prefix) if prefix else weights
    found = require(weights, "flux-ae")
    weights = take_prefix(weights, found.prefix) if found.prefix else weights
    if found.layout == "diffusers-vae":
        weights = vae_from_diffusers(weights)
    flux_ae = VAE_PRESETS["flux"]
    config = config_from_metadata(read_metadata(source), METADATA_VAE_CONFIG, VAEConfig)
    config = config or vae_config_from_keys(weights, flux_ae.scaling_factor, flux_ae.shift_factor)
    return build_exact(AutoencoderKL, with_overrides(config, overrides), weights, dtype=dtype)


def _config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: {folder.parent} is not a complete FLUX diffusers folder")
    return read_json(file)
