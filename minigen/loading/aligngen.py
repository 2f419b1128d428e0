"""AlignGen files: S*, the DEM and the reference LoRA of one training run, in one `.safetensors`.

    token.vector                           [d]          S*, in T5's output space
    dem.<module path>                      ...          the deviation extraction module (minigen/methods/aligngen.py)
    lora.<transformer layer>.down / .up    [r, in] / [out, r]   the reference tokens' LoRA (BFL module paths)

    metadata  format                   "minigen.aligngen"
              aligngen.config          the AlignGenConfig (JSON: widths, heads, rank, alpha, placeholder)
              aligngen.base            the base transformer's config fingerprint (`config_fingerprint`)
              aligngen.base_config     that config as JSON (to name it in an error)
              training                 scripts/train_aligngen.py's record, JSON: {"method": the AlignGenSettings
                                       it trained with, ...}; `trained_settings` reads them back for inference
              ...                      whatever else the trainer adds (steps, pairs)

A file is untrusted input: only `.safetensors` is read (nothing is unpickled), its config is checked
field by field before anything is built, every tensor must be there with its shape and finite, and a
file trained for another base model (another FluxConfig: dev vs schnell, toy vs real) is refused.
Files are written atomically and never overwrite one unless asked.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path

import safetensors.torch
from torch import Tensor

from minigen.loading.coverage import load_exact
from minigen.loading.detect import CheckpointError
from minigen.loading.files import check_output_path, checked_file, config_from_metadata, read_metadata, read_state_dict, write_atomically
from minigen.methods.aligngen import AlignGen, AlignGenConfig, AlignGenSettings, config_fingerprint
from minigen.models.flux import Flux
from minigen.storage import compute_device

FORMAT = "minigen.aligngen"
CONFIG_KEY, BASE_KEY, BASE_CONFIG_KEY = "aligngen.config", "aligngen.base", "aligngen.base_config"
TRAINING_KEY = "training"  # train_aligngen's record: {"method": AlignGenSettings fields, "training": ..., ...}
MAX_REFERENCE_SIZE = 4096  # the largest reference side a file may ask for


def file_tensors(aligngen: AlignGen) -> dict[str, Tensor]:
    """The tensors of `aligngen` under their file keys, as contiguous fp32 CPU copies."""
    tensors = {"token.vector": aligngen.token.vector}
    tensors |= {f"dem.{key}": value for key, value in aligngen.dem.state_dict().items()}
    for target, down, up in zip(aligngen.lora.targets, aligngen.lora.down, aligngen.lora.up):
        tensors[f"lora.{target}.down"], tensors[f"lora.{target}.up"] = down, up
    return {key: t.detach().float().cpu().contiguous().clone() for key, t in tensors.items()}


def module_state(aligngen: AlignGen, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """File keys -> `aligngen.state_dict()` keys (the LoRA's factors are numbered there, named in the file)."""
    index = {target: i for i, target in enumerate(aligngen.lora.targets)}
    state = {}
    for key, value in tensors.items():
        if key.startswith("lora.") and key.rsplit(".", 1)[-1] in ("down", "up"):
            target, part = key[len("lora.") :].rsplit(".", 1)
            if target in index:
                key = f"lora.{part}.{index[target]}"
        state[key] = value
    return state


def save_aligngen(aligngen: AlignGen, path: str | Path, *, overwrite: bool = False, metadata: Mapping[str, str] | None = None) -> Path:
    """Write `aligngen` to `path` (.safetensors) with its config and base fingerprint, and, unless `metadata` holds a
    training record (train_aligngen's), its `settings` as one, so that the file runs as the AlignGen did; atomic."""
    path = check_output_path(path, overwrite=overwrite, suffix=".safetensors")
    info = {
        "format": FORMAT,
        CONFIG_KEY: json.dumps(asdict(aligngen.config)),
        BASE_KEY: aligngen.base,
        BASE_CONFIG_KEY: json.dumps(aligngen.base_config),
    }
    if clash := sorted(set(info) & set(metadata or {})):
        raise ValueError(f"metadata keys {clash} are AlignGen's own; name yours differently")
    metadata = {TRAINING_KEY: json.dumps({"method": asdict(aligngen.settings)}), **(metadata or {})}
    data = safetensors.torch.save(file_tensors(aligngen), {**info, **{k: str(v) for k, v in metadata.items()}})
    write_atomically(path, lambda file: file.write(data), overwrite)
    return path


def load_aligngen(path: str | Path, transformer: Flux) -> AlignGen:
    """The AlignGen of a file, for `transformer` (on its device, eval mode), with the settings it was trained
    with (`trained_settings`) as its `settings`. Refuses a file of another base model, a damaged or incomplete
    one, and anything but `.safetensors`."""
    path = checked_file(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: AlignGen weights are read from .safetensors files only (nothing is unpickled)")
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an AlignGen file (its metadata has no format {FORMAT!r}); pass a file written by train_aligngen")
    config = config_from_metadata(metadata, CONFIG_KEY, AlignGenConfig)
    if config is None:
        raise CheckpointError(f"{path} has no {CONFIG_KEY} in its metadata; the file is damaged")
    base = config_fingerprint(transformer)
    if metadata.get(BASE_KEY) != base:
        raise CheckpointError(
            f"{path} was trained for another base model ({base_difference(metadata, transformer)}). "
            "Load the AlignGen file trained for this model, or train one for it with scripts/train_aligngen.py"
        )
    try:
        aligngen = AlignGen(config, transformer)
    except (ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: its config {config} does not build an AlignGen for this transformer: {error}") from error
    load_exact(aligngen, module_state(aligngen, read_state_dict(path)))
    aligngen.settings = trained_settings(path)  # it runs as it was trained
    return aligngen.to(compute_device(transformer)).eval()  # where the transformer computes (an offloaded one: its device)


def base_difference(metadata: Mapping[str, str], transformer: Flux) -> str:
    """How the base model a file records differs from `transformer`: the config fields that differ, or
    the two fingerprints when the file's config cannot be read."""
    ours = json.loads(json.dumps(asdict(transformer.config)))  # tuples as JSON lists, as the file has them
    try:
        theirs = json.loads(metadata.get(BASE_CONFIG_KEY, ""))
    except json.JSONDecodeError:
        theirs = None
    if not isinstance(theirs, dict) or theirs == ours:
        return f"fingerprint {metadata.get(BASE_KEY)!r}; this transformer's is {config_fingerprint(transformer)!r}"
    differ = [key for key, value in ours.items() if theirs.get(key) != value]
    hint = " (FLUX.1 dev has guidance_embed true, schnell false)" if differ == ["guidance_embed"] else ""
    return "its base's FluxConfig has " + "; ".join(f"{key} {theirs.get(key)!r}, this model's {ours[key]!r}" for key in differ) + hint


def trained_settings(path: str | Path) -> AlignGenSettings:
    """The AlignGenSettings a file was trained with (scripts/train_aligngen.py records them in its metadata
    `training` -> `method`), to run it as trained: the ablations (s_star, dem, mask), reference_to_text,
    reference_size (the toy runs train at 64 px, the real ones at 512), lora_scale and reference_shift ("right"
    for a record from before that setting). A file that records none (saved from Python, not trained by the
    script) gets the defaults, whatever it was trained with; a field of the wrong type or range is a
    CheckpointError naming it."""
    path = checked_file(path)
    metadata = read_metadata(path)
    if TRAINING_KEY not in metadata:
        return AlignGenSettings()
    try:
        record = json.loads(metadata[TRAINING_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: metadata {TRAINING_KEY} is not valid JSON ({error}); the file is damaged") from None
    method = record.get("method") if isinstance(record, dict) else None
    if method is None:
        return AlignGenSettings()
    where = f"{path}: metadata {TRAINING_KEY} -> method"
    names = [f.name for f in fields(AlignGenSettings)]
    if not isinstance(method, dict):
        raise CheckpointError(f"{where} must be an object of AlignGenSettings fields ({', '.join(names)}); got {method!r}")
    if unknown := sorted(set(method) - set(names)):
        raise CheckpointError(f"{where} has unknown field {unknown[0]!r}; AlignGenSettings has {', '.join(names)}")
    for name, value in method.items():
        if name in ("s_star", "dem", "mask") and type(value) is not bool:
            raise CheckpointError(f"{where}: {name} must be true or false, got {value!r}")
        if name in ("reference_to_text", "reference_shift") and not isinstance(value, str):
            raise CheckpointError(f"{where}: {name} must be a string, got {value!r}")
        if name == "reference_size" and value is not None and (type(value) is not int or not 1 <= value <= MAX_REFERENCE_SIZE):
            raise CheckpointError(f"{where}: {name} must be null or an integer from 1 to {MAX_REFERENCE_SIZE}, got {value!r}")
        if name == "lora_scale" and (type(value) not in (int, float) or not math.isfinite(value)):
            raise CheckpointError(f"{where}: {name} must be a finite number, got {value!r}")
    # reference_shift came after the first files were trained; they put the references right of the image ids
    method = {"reference_shift": "right", **method}
    try:
        return AlignGenSettings(**method)
    except ValueError as error:
        raise CheckpointError(f"{where}: {error}") from None
