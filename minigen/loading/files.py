"""Reading checkpoint files into flat state dicts.

Two kinds of file exist in the wild:

* `.safetensors`: a JSON header (names, dtypes, shapes, offsets) followed by raw tensor bytes.
  Reading it runs no code. `safe_open` memory-maps the file, so each tensor is a view of the
  mapped pages: nothing is copied, and a full SD1.5 file costs about its own size in RAM.
* `.ckpt` / `.bin` / `.pt` / `.pth`: Python pickles written by `torch.save`. Unpickling can run
  arbitrary code, so these are refused unless the caller opts in with `allow_pickle=True`; even
  then `torch.load(weights_only=True)` only rebuilds tensors and plain containers.

A diffusers folder holds one file per component (`unet/`, `vae/`, ...), sometimes split into
shards listed by an `*.safetensors.index.json`; `read_diffusers_component` reads one of them.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open

from minigen.loading.detect import CheckpointError

T = TypeVar("T")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")

# Weight files of one diffusers component, in the order they are looked for.
DIFFUSERS_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


def read_state_dict(
    path: str | Path, *, allow_pickle: bool = False, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file, by name.

    `.safetensors` tensors are memory-mapped (on "cpu") and loaded once, never copied.
    Pickled files need `allow_pickle=True`; a top-level `state_dict` entry (ldm `.ckpt` files) is
    unwrapped, and nested dicts are flattened with "." (IP-Adapter's `.bin` twin then has the same
    keys as its `.safetensors`). Non-tensor entries such as `global_step` are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                return {name: f.get_tensor(name) for name in f.keys()}
        except SafetensorError as error:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({error}); it may be truncated or corrupt: "
                f"download it again (its size is {path.stat().st_size:,} bytes)"
            ) from error
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path, allow_pickle=allow_pickle, device=device)
    raise ValueError(
        f"{path}: unknown checkpoint format {path.suffix!r}; expected .safetensors or one of {PICKLE_SUFFIXES}"
    )


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` strings of a `.safetensors` file ({} for other formats or none)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def config_from_metadata(metadata: dict[str, str], key: str, config_class: type[T]) -> T | None:
    """The config dataclass a file states in its metadata (JSON under `key`), or None.

    Official files need none: their configs follow from the keys. Small custom models (whose head
    counts or RoPE axes the weights cannot reveal) record theirs when saved: see `config_metadata`.
    """
    if key not in metadata:
        return None
    fields = json.loads(metadata[key])
    return config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def with_overrides(config: T, overrides: Mapping[str, Any] | None) -> T:
    """`config` with the fields a caller sets replaced: for a file whose config its keys cannot show
    (head counts, RoPE axes, norm groups), e.g. `load_flux(file, transformer_config={"axes_dim": (4, 6, 6)})`."""
    return replace(config, **config_fields(type(config), overrides)) if overrides else config


def config_fields(config_class: type, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """`overrides` checked against the fields of `config_class`, lists made tuples (as JSON gives them)."""
    names = [f.name for f in fields(config_class)]
    if unknown := sorted(set(overrides or {}) - set(names)):
        raise ValueError(f"{config_class.__name__} has no field {unknown[0]!r}; its fields are {', '.join(names)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in (overrides or {}).items()}


METADATA_PIPELINE = "minigen.pipeline"  # sampling defaults a custom model states, e.g. {"default_size": 64}


def pipeline_defaults(metadata: dict[str, str], allowed: tuple[str, ...]) -> dict:
    """The pipeline fields a file states under `METADATA_PIPELINE` (the toy models' 64-pixel size and
    their step count, say); {} for official files, whose defaults the pipelines know."""
    stated = json.loads(metadata.get(METADATA_PIPELINE, "{}"))
    unknown = sorted(set(stated) - set(allowed))
    if unknown:
        raise ValueError(f"the file states unknown pipeline defaults {unknown} under {METADATA_PIPELINE}; known: {list(allowed)}")
    return stated


def config_metadata(configs: dict[str, object]) -> dict[str, str]:
    """safetensors metadata {key: JSON} for config dataclasses, read back by `config_from_metadata`."""
    return {key: json.dumps(dataclasses.asdict(config)) for key, config in configs.items()}


def _read_pickle(path: Path, *, allow_pickle: bool, device: str | torch.device) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise PermissionError(
            f"{path} is a pickled PyTorch file. Unpickling a file from an untrusted source can run "
            "arbitrary code on this machine. Prefer the .safetensors version of this checkpoint. "
            "If you trust the file, pass allow_pickle=True: it is then read with "
            "torch.load(weights_only=True), which only rebuilds tensors and plain containers."
        )
    try:
        # Files written by torch >= 1.6 are zip archives and can be memory-mapped like safetensors.
        obj = torch.load(path, map_location=device, weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise pickle.UnpicklingError(
            f"{path} holds Python objects other than tensors and containers, which "
            f"torch.load(weights_only=True) refuses to rebuild. Convert it to .safetensors with a tool "
            f"you trust. Original error: {error}"
        ) from error
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a dict of tensors")
    return _flatten(obj)


def _flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        elif isinstance(value, torch.Tensor):
            flat[f"{prefix}{name}"] = value
    return flat


def read_diffusers_component(
    folder: str | Path, *, variant: str | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The weights of one diffusers component folder (e.g. `<repo>/unet`), shards merged.

    Looks for `diffusion_pytorch_model[.variant].safetensors`, then `model[.variant].safetensors`,
    then the sharded form `<name>[.variant].safetensors.index.json`. `variant="fp16"` picks the
    half-precision copies some repos ship beside the full-precision files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers component folder not found: {folder}")
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    candidates = [folder / f"{name}{suffix}" for name in DIFFUSERS_WEIGHT_NAMES]
    indexes = [folder / f"{name}{suffix}.index.json" for name in DIFFUSERS_WEIGHT_NAMES]
    for file in candidates:
        if file.is_file():
            return read_state_dict(file, device=device)
    for index in indexes:
        if index.is_file():
            return _read_shards(index, device=device)
    looked_for = ", ".join(p.name for p in candidates + indexes)
    present = sorted(p.name for p in folder.iterdir() if p.is_file())
    raise FileNotFoundError(
        f"no weights in {folder}: looked for {looked_for}. Files there: {present or 'none'}. "
        "Pass variant='fp16' (or another variant) if only such files exist; a pickled "
        "diffusion_pytorch_model.bin can be read with read_state_dict(path, allow_pickle=True)."
    )


def _read_shards(index: Path, *, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Merge the shards named by a `*.safetensors.index.json` ({"weight_map": {key: shard file}})."""
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state_dict.update(read_state_dict(index.parent / shard, device=device))
    missing = sorted(set(weight_map) - set(state_dict))
    if missing:
        raise ValueError(f"{index} lists {len(missing)} tensors its shards do not hold, e.g. {missing[:5]}")
    return state_dict
