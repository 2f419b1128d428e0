"""One entry point for every model family: pick the SD or the FLUX loader from what `source` is.

    load_pipeline("sd15")                          preset names: sd15, sdxl, sd15-inpainting, sdxl-inpainting,
                                                   flux-dev, flux-schnell
    load_pipeline("toy-sd")                        the toy models in weights/: toy-sd and toy-flux
    load_pipeline("/models/flux1-dev.safetensors")  a single file: its keys tell the family
    load_pipeline("/models/FLUX.1-dev")             a diffusers folder: transformer/ means FLUX
    load_pipeline("black-forest-labs/FLUX.1-dev")   a hub id: its model_index.json tells
"""

from __future__ import annotations

from pathlib import Path

import torch

from minigen.pipelines.flux import FluxPipeline
from minigen.loading import flux, sd
from minigen.loading.detect import detect
from minigen.loading.files import read_json, read_state_dict
from minigen.loading.hub import resolve
from minigen.loading.toy import TOY_MODELS, is_toy_file, is_toy_flux_folder, toy_files, toy_flux_folder_files
from minigen.pipelines.sd import StableDiffusion

PRESETS = (*TOY_MODELS, *sd.HUB_IDS, *flux.HUB_IDS)


def is_flux(source: str | Path, allow_pickle: bool = False) -> bool:
    """Whether `source` names a FLUX model (else it is taken for SD1.x / SDXL)."""
    if str(source) in flux.HUB_IDS or str(source) in sd.HUB_IDS:
        return str(source) in flux.HUB_IDS
    try:
        path = resolve(source, ["model_index.json"])
    except FileNotFoundError as error:
        if "/" in str(source):  # a path or hub id: the message says what is near it
            raise
        raise FileNotFoundError(f"{error}; the presets are {', '.join(PRESETS)}") from None
    if path.is_dir():
        index = path / "model_index.json"
        if index.exists():
            return "Flux" in str(read_json(index).get("_class_name", ""))
        return (path / "transformer").is_dir()
    return detect(read_state_dict(path, allow_pickle=allow_pickle)).family.startswith("flux")


def load_pipeline(
    source: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    allow_pickle: bool = False,
    ae: str | Path | None = None,
    text_encoders: str | Path | None = None,
    ema: bool = True,
    vae: str | Path | None = None,
    weights_dtype: torch.dtype | None = None,
) -> StableDiffusion | FluxPipeline:
    """`load_flux` for FLUX sources (default dtype bf16), `load_sd` for the rest (default fp32).

    `ae` and `text_encoders` complete a FLUX transformer file (see `load_flux`); `ema=False` picks the
    non-EMA UNet weights of a full SD training checkpoint, and `vae` replaces an SD / SDXL model's VAE
    (see `load_sd` and `minigen.loading.vae.load_vae`). A folder in weights/toy-flux's layout (a
    toy-flux of `train_toy.py flux`) loads as toy-flux does. The toy models, named or by their files,
    default to fp32 (toy-flux too: it was trained in fp32 with bf16 autocast, and is small).
    `weights_dtype` keeps the denoiser's (UNet's, transformer's) Linear/Conv2d weights in that dtype, read
    into it from the file, computing in `dtype` (`minigen.storage.store_weights`).
    """
    for name, given in (("dtype", dtype), ("weights_dtype", weights_dtype)):
        if given is not None and not (isinstance(given, torch.dtype) and given.is_floating_point):
            raise TypeError(f"{name} takes a floating torch.dtype (torch.float32, torch.float16, torch.bfloat16), got {given!r}")
    if (str(source) in TOY_MODELS or is_toy_flux_folder(source)) and (ae is not None or text_encoders is not None):
        raise ValueError(f"ae and text_encoders complete a FLUX transformer file; the toy model {source} brings its own: leave them out")
    if str(source) in TOY_MODELS:
        files = toy_files(str(source))
        if str(source) == "toy-sd":
            return sd.load_sd(files["source"], dtype=dtype or torch.float32, device=device, vae=vae, allow_pickle=allow_pickle, ema=ema,
                              weights_dtype=weights_dtype)
        _refuse_sd_options(source, vae, ema)
        return flux.load_flux(**files, dtype=dtype or torch.float32, device=device, weights_dtype=weights_dtype)
    if is_toy_flux_folder(source):  # a toy-flux of train_toy.py (a snapshot, an export)
        _refuse_sd_options(source, vae, ema)
        return flux.load_flux(**toy_flux_folder_files(source), dtype=dtype or torch.float32, device=device, weights_dtype=weights_dtype)
    if is_flux(source, allow_pickle):
        _refuse_sd_options(source, vae, ema)
        default = torch.float32 if is_toy_file(source) else torch.bfloat16  # toy-flux's transformer file: as its preset
        return flux.load_flux(source, ae=ae, text_encoders=text_encoders, dtype=dtype or default, device=device, allow_pickle=allow_pickle,
                              weights_dtype=weights_dtype)
    if ae is not None or text_encoders is not None:
        raise ValueError(f"ae and text_encoders complete a FLUX transformer file; {source} is an SD model")
    return sd.load_sd(source, dtype=dtype or torch.float32, device=device, allow_pickle=allow_pickle, ema=ema, vae=vae, weights_dtype=weights_dtype)


def _refuse_sd_options(source: str | Path, vae: str | Path | None, ema: bool) -> None:
    """A FLUX source with SD's options, which would choose nothing: vae (FLUX's is ae) or ema=False."""
    if not ema:
        raise ValueError(f"ema=False (sample.py --no-ema) picks the non-EMA UNet weights of an SD training checkpoint; {source} "
                         "is a FLUX model, whose files hold one set: leave it out")
    if vae is not None:
        raise ValueError(
            f"vae replaces an SD / SDXL model's VAE; {source} is a FLUX model, whose autoencoder is given with "
            "ae= (sample.py --ae), e.g. ae.safetensors, together with its transformer file"
        )
