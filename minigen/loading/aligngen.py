"""AlignGen files: S*, the DEM and the reference LoRA of one training run, in one `.safetensors`.

    token.vector                           [d]          S*, in T5's output space
    dem.<module path>                      ...          the deviation extraction module (minigen/methods/aligngen.py)
    lora.<transformer layer>.down / .up    [r, in] / [out, r]   the reference tokens' LoRA (BFL module paths)

    metadata  format                   "minigen.aligngen"
              aligngen.config          the AlignGenConfig (JSON: widths, heads, rank, alpha, placeholder)
              aligngen.base            the base transformer's config fingerprint (`base_fingerprint`)
              aligngen.base_config     that config as JSON (to name it in an error)
              ...                      whatever the trainer adds (steps, data, settings)

A file is untrusted input: only `.safetensors` is read (nothing is unpickled), its config is checked
field by field before anything is built, every tensor must be there with its shape and finite, and a
file trained for another base model (another FluxConfig: dev vs schnell, toy vs real) is refused.
Files are written atomically and never overwrite one unless asked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import safetensors.torch
from torch import Tensor

from minigen.image import check_output_path
from minigen.loading.coverage import load_exact
from minigen.loading.detect import CheckpointError
from minigen.loading.files import checked_file, config_from_metadata, read_metadata, read_state_dict, write_atomically
from minigen.methods.aligngen import AlignGen, AlignGenConfig, base_fingerprint
from minigen.models.flux import Flux

FORMAT = "minigen.aligngen"
CONFIG_KEY, BASE_KEY, BASE_CONFIG_KEY = "aligngen.config", "aligngen.base", "aligngen.base_config"


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
    """Write `aligngen` to `path` (.safetensors) with its config and base fingerprint; atomic."""
    path = check_output_path(path, overwrite=overwrite, suffix=".safetensors")
    info = {
        "format": FORMAT,
        CONFIG_KEY: json.dumps(asdict(aligngen.config)),
        BASE_KEY: aligngen.base,
        BASE_CONFIG_KEY: json.dumps(aligngen.base_config),
    }
    if clash := sorted(set(info) & set(metadata or {})):
        raise ValueError(f"metadata keys {clash} are AlignGen's own; name yours differently")
    data = safetensors.torch.save(file_tensors(aligngen), {**info, **{k: str(v) for k, v in (metadata or {}).items()}})
    write_atomically(path, lambda file: file.write(data), overwrite)
    return path


def load_aligngen(path: str | Path, transformer: Flux) -> AlignGen:
    """The AlignGen of a file, for `transformer` (on its device, eval mode). Refuses a file of another
    base model, a damaged or incomplete one, and anything but `.safetensors`."""
    path = checked_file(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: AlignGen weights are read from .safetensors files only (nothing is unpickled)")
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an AlignGen file (its metadata has no format {FORMAT!r}); pass a file written by train_aligngen")
    config = config_from_metadata(metadata, CONFIG_KEY, AlignGenConfig)
    if config is None:
        raise CheckpointError(f"{path} has no {CONFIG_KEY} in its metadata; the file is damaged")
    base = base_fingerprint(transformer)
    if metadata.get(BASE_KEY) != base:
        raise CheckpointError(
            f"{path} was trained for another base model (fingerprint {metadata.get(BASE_KEY)!r}, config "
            f"{metadata.get(BASE_CONFIG_KEY, '?')}); this transformer is {base!r} ({json.dumps(asdict(transformer.config))}). "
            "Load the AlignGen file trained for this model, or train one for it with scripts/train_aligngen.py"
        )
    try:
        aligngen = AlignGen(config, transformer)
    except (ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: its config {config} does not build an AlignGen for this transformer: {error}") from error
    load_exact(aligngen, module_state(aligngen, read_state_dict(path)))
    return aligngen.to(transformer.img_in.weight.device).eval()
