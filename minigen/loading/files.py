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
import math
import os
import pickle
import re
import secrets
import tempfile
import types
import typing
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import torch
from safetensors import SafetensorError, safe_open

from minigen.loading.detect import CheckpointError

T = TypeVar("T")
PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SAFETENSORS_SUFFIXES = (".safetensors", ".safetensor", ".sft")  # .sft: BFL's original FLUX files

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
    path = checked_file(path)
    if is_safetensors(path):
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                return {name: f.get_tensor(name) for name in f.keys()}
        except SafetensorError as error:
            raise _unreadable(path, error) from error
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path, allow_pickle=allow_pickle, device=device)
    raise ValueError(
        f"{path}: unknown checkpoint format {path.suffix!r}; expected one of {SAFETENSORS_SUFFIXES} or {PICKLE_SUFFIXES}"
    )


def is_safetensors(path: Path) -> bool:
    """Whether `path` names a safetensors file by its suffix (BFL's originals are `.sft`)."""
    return path.suffix.lower() in SAFETENSORS_SUFFIXES


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` strings of a `.safetensors` file ({} for other formats or none)."""
    path = checked_file(path)
    if not is_safetensors(path):
        return {}
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except SafetensorError as error:
        raise _unreadable(path, error) from error


def read_json(file: str | Path) -> dict:
    """A JSON config file (config.json, model_index.json, an index of shards) as a dict; a damaged one is
    a CheckpointError naming it, a missing one a FileNotFoundError."""
    file = Path(file)
    try:
        content = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON ({error}); download it again") from error
    if not isinstance(content, dict):
        raise CheckpointError(f"{file} must hold a JSON object, not a {type(content).__name__}")
    return content


def check_pipeline_class(folder: Path, accepted: Callable[[str], bool], family: str, hint: str) -> dict:
    """A diffusers folder's model_index.json ({} without one), refused with `hint` when `accepted` refuses
    the pipeline class it names (an SD3 or FLUX Fill folder handed to the SD or FLUX loader)."""
    index = folder / "model_index.json"
    content = read_json(index) if index.is_file() else {}
    kind = content.get("_class_name")
    if kind is not None and not accepted(kind):
        raise CheckpointError(f"{folder} holds a {kind} (its model_index.json says), not a {family} pipeline; {hint}")
    return content


def checked_file(path: str | Path) -> Path:
    """`path` if it is a regular file; a folder, a device or a pipe is a CheckpointError, a missing
    path a FileNotFoundError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.is_dir():
        inside = [file for file in path.iterdir() if file.is_file() and is_safetensors(file)]
        example = f", such as {inside[0]}, the only safetensors file in it" if len(inside) == 1 else ""
        raise CheckpointError(f"{path} is a folder; give a checkpoint file{example}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a regular file (a device or a pipe?); give a checkpoint file")
    return path


def checked_input(path: str | Path, *, allow_pickle: bool = False) -> Path:
    """`checked_file(path)`, refused as a pickle unless `allow_pickle`: what a script checks of an input
    file before the model loads (it is read later)."""
    path = checked_file(path)
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise _pickle_refused(path)
    return path


def required(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """`state_dict[key]`, for a key a loader reads a shape from; one the file lacks is a CheckpointError naming it."""
    if key not in state_dict:
        raise CheckpointError(f"the file lacks {key}; it is incomplete or another kind of checkpoint")
    return state_dict[key]


def _unreadable(path: Path, error: Exception) -> CheckpointError:
    """The error for a `.safetensors` path that safetensors cannot read, saying what the file really is."""
    with path.open("rb") as file:
        head = file.read(4)
    if head.startswith(b"PK"):
        what = "a zip archive (a PyTorch pickle saved by torch.save?) named .safetensors; rename it to .ckpt and read it with allow_pickle=True if you trust it"
    elif head[:1] == b"\x80":
        what = "a Python pickle named .safetensors; rename it to .ckpt and read it with allow_pickle=True if you trust it"
    else:
        what = f"not a readable safetensors file ({error}); it may be truncated or corrupt: download it again"
    return CheckpointError(f"{path} is {what} (its size is {path.stat().st_size:,} bytes)")


def config_from_metadata(metadata: dict[str, str], key: str, config_class: type[T]) -> T | None:
    """The config dataclass a file states in its metadata (JSON under `key`), or None.

    Official files need none: their configs follow from the keys. Small custom models (whose head
    counts or RoPE axes the weights cannot reveal) record theirs when saved: see `config_metadata`.
    A file is untrusted input, and its config decides how much is built, so every value is checked
    (type, finite, within `MAX_WIDTH` / `MAX_REPEATS`) before anything exists; a bad one is a
    CheckpointError naming the key and the field. The tensors' shapes are checked later, by `load_exact`.
    """
    if key not in metadata:
        return None
    try:
        stated = json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"metadata {key} is not valid JSON ({error}); the file is damaged or was not written by minigen")
    if not isinstance(stated, dict):
        raise CheckpointError(f"metadata {key} must be a JSON object of {config_class.__name__} fields, got {type(stated).__name__}")
    hints = typing.get_type_hints(config_class)
    if unknown := sorted(set(stated) - set(hints)):
        raise CheckpointError(f"metadata {key} has unknown field {unknown[0]!r}; {config_class.__name__} has {', '.join(hints)}")
    values = {name: _checked(f"metadata {key}: {name}", value, hints[name]) for name, value in stated.items()}
    try:
        return config_class(**values)
    except (TypeError, ValueError, ArithmeticError) as error:
        raise CheckpointError(f"metadata {key} does not make a valid {config_class.__name__}: {error}") from error


# Bounds on what a file's metadata may ask to build: widths (channels, vocabulary sizes, RoPE theta)
# up to MAX_WIDTH, and counts of repeated modules (fields named num_*, *depth*, *layers*, *blocks*)
# up to MAX_REPEATS. Every official model is far inside them: FLUX has 57 blocks, CLIP 49,408 tokens.
MAX_WIDTH, MAX_REPEATS, MAX_LEVELS = 2**18, 256, 16


def _checked(where: str, value: Any, hint: Any) -> Any:
    """`value` from JSON if it fits the type `hint` (int, float, bool, str, tuple[int, ...], X | None)
    and the bounds above, as the dataclass wants it (lists become tuples); else CheckpointError."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise CheckpointError(f"{where} is null; it must be {_type_name(hint)}")
    kind = next(option for option in options if option is not type(None))
    repeats = any(word in where.rsplit(": ", 1)[-1] for word in ("num_", "depth", "layers", "blocks"))
    if typing.get_origin(kind) is tuple:
        if not isinstance(value, list) or not 0 < len(value) <= MAX_LEVELS:
            raise CheckpointError(f"{where} must be a list of 1 to {MAX_LEVELS} integers, got {value!r}")
        return tuple(_checked(f"{where}[{i}]", item, int) for i, item in enumerate(value))
    if kind is bool or kind is str:
        if type(value) is not kind:
            raise CheckpointError(f"{where} must be {_type_name(kind)}, got {value!r}")
        return value
    if kind is int:
        limit = MAX_REPEATS if repeats else MAX_WIDTH
        if type(value) is not int or not 0 <= value <= limit:
            raise CheckpointError(f"{where} must be an integer from 0 to {limit}, got {value!r}")
        return value
    if kind is float:
        if type(value) not in (int, float) or not math.isfinite(value) or abs(value) > MAX_WIDTH:
            raise CheckpointError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    raise TypeError(f"{where}: no check for fields of type {hint}")  # a config class minigen does not know


def _type_name(hint: Any) -> str:
    return {bool: "true or false", str: "a string", int: "an integer", float: "a number"}.get(hint, str(hint))


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
# What a pipeline default may be: its type and range (a file asking for 100,000 pixels is refused at load).
PIPELINE_FIELDS: dict[str, tuple[type, float, float]] = {
    "default_size": (int, 16, 4096),
    "default_steps": (int, 1, 1000),
    "default_cfg": (float, 0.0, 100.0),
    "max_length": (int, 1, 512),
}


def pipeline_defaults(metadata: dict[str, str], allowed: tuple[str, ...]) -> dict:
    """The pipeline fields a file states under `METADATA_PIPELINE` (the toy models' 64-pixel size and
    their step count, say), each checked against `PIPELINE_FIELDS`; {} for official files, whose
    defaults the pipelines know."""
    try:
        stated = json.loads(metadata.get(METADATA_PIPELINE, "{}"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"metadata {METADATA_PIPELINE} is not valid JSON ({error})")
    if not isinstance(stated, dict):
        raise CheckpointError(f"metadata {METADATA_PIPELINE} must be a JSON object, got {type(stated).__name__}")
    unknown = sorted(set(stated) - set(allowed))
    if unknown:
        raise CheckpointError(f"the file states unknown pipeline defaults {unknown} under {METADATA_PIPELINE}; known: {list(allowed)}")
    for name, value in stated.items():
        kind, low, high = PIPELINE_FIELDS[name]
        if type(value) not in ((int,) if kind is int else (int, float)) or not low <= value <= high:
            raise CheckpointError(f"metadata {METADATA_PIPELINE}: {name} must be {_type_name(kind)} from {low} to {high}, got {value!r}")
    return stated


def config_metadata(configs: dict[str, object]) -> dict[str, str]:
    """safetensors metadata {key: JSON} for config dataclasses, read back by `config_from_metadata`."""
    return {key: json.dumps(dataclasses.asdict(config)) for key, config in configs.items()}


def _pickle_refused(path: Path) -> PermissionError:
    return PermissionError(
        f"{path} is a pickled PyTorch file. Unpickling a file from an untrusted source can run "
        "arbitrary code on this machine. Prefer the .safetensors version of this checkpoint. "
        "If you trust the file, pass allow_pickle=True (scripts/sample.py: --allow-pickle): it is then read with "
        "torch.load(weights_only=True), which only rebuilds tensors and plain containers."
    )


def _read_pickle(path: Path, *, allow_pickle: bool, device: str | torch.device) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise _pickle_refused(path)
    try:
        # Files written by torch >= 1.6 are zip archives and can be memory-mapped like safetensors.
        obj = torch.load(path, map_location=device, weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        # torch's message advises weights_only=False, which runs whatever code the file holds: only its reason is passed on
        if blocked := re.search(r"GLOBAL (\S+) whose module \S+ is blocked", str(error)):  # os.system, say: torch refused to call it
            raise CheckpointError(f"{path} asks to call {blocked[1]} when unpickled, which a checkpoint never needs: the file may be "
                                  "malicious; do not load it") from error
        reason = re.split(r"\.\s|\n\n", str(error).partition("WeightsUnpickler error:")[2].strip())[0] or "no reason given"
        if "Unsupported global" not in str(error):  # not a pickle at all: bytes torch could not read
            raise CheckpointError(f"{path} is not a readable PyTorch file: it may be cut short or not a checkpoint torch can read "
                                  f"safely ({reason})") from error
        raise CheckpointError(
            f"{path} holds Python objects other than tensors and containers, which "
            f"torch.load(weights_only=True) refuses to rebuild ({reason}). Convert it to .safetensors with a tool you trust."
        ) from error
    except Exception as error:  # a damaged zip or pickle stream fails anywhere in torch.load (KeyError, OSError, EOFError, ...)
        raise CheckpointError(f"{path} is not a readable PyTorch file: it may be cut short or not a checkpoint "
                              f"({type(error).__name__}: {str(error)[:200]})") from error
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
    folder: str | Path, *, variant: str | None = None, device: str | torch.device = "cpu", allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """The weights of one diffusers component folder (e.g. `<repo>/unet`), shards merged.

    Looks for `diffusion_pytorch_model[.variant].safetensors`, then `model[.variant].safetensors`,
    then the sharded form `<name>.safetensors.index[.variant].json`; with `allow_pickle`, then the
    older pickled `diffusion_pytorch_model[.variant].bin` / `pytorch_model[.variant].bin`.
    `variant="fp16"` picks the half-precision copies some repos ship beside the full-precision files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers component folder not found: {folder}")
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    candidates = [folder / f"{name}{suffix}" for name in DIFFUSERS_WEIGHT_NAMES]
    index = f".safetensors.index.{variant}.json" if variant else ".safetensors.index.json"  # diffusers' and transformers' names
    indexes = [folder / f"{name}{index}" for name in DIFFUSERS_WEIGHT_NAMES]
    for file in candidates:
        if file.is_file():
            return read_state_dict(file, device=device)
    for index in indexes:
        if index.is_file():
            return _read_shards(index, device=device)
    pickled = [folder / f"{name}{suffix.replace('.safetensors', '.bin')}" for name in ("diffusion_pytorch_model", "pytorch_model")]
    for file in pickled:
        if file.is_file() and allow_pickle:
            return read_state_dict(file, device=device, allow_pickle=True)
    looked_for = ", ".join(p.name for p in candidates + indexes)
    present = sorted(p.name for p in folder.iterdir() if p.is_file())
    hint = ("the pickled .bin there is read with allow_pickle=True (sample.py --allow-pickle), if you trust it"
            if any(file.is_file() for file in pickled) else "pass variant='fp16' (or another variant) if only such files exist")
    raise FileNotFoundError(f"no weights in {folder}: looked for {looked_for}. Files there: {present or 'none'}; {hint}")


def _read_shards(index: Path, *, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Merge the shards named by a `*.safetensors.index.json` ({"weight_map": {key: shard file}})."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no weight_map of tensor names to shard files")
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state_dict.update(read_state_dict(index.parent / shard, device=device))
    missing = sorted(set(weight_map) - set(state_dict))
    if missing:
        raise ValueError(f"{index} lists {len(missing)} tensors its shards do not hold, e.g. {missing[:5]}")
    return state_dict


def check_writable(path: str | Path, what: str) -> Path:
    """Refuse, before any work, an output `path` (a file or a folder, existing or not) whose folder takes
    no files (found when the work is done, the work was lost): a file written into the nearest folder that
    exists tells, where permission bits do not (root, read-only mounts). `what` names the path in the
    message (a script's option, "--out")."""
    path = Path(path)
    folder = next(p for p in (path, *path.parents) if p.exists())
    if not folder.is_dir() and folder != path:
        raise NotADirectoryError(f"{what} {path}: {folder} is a file, so nothing can be written under it; choose another path")
    folder = folder if folder.is_dir() else folder.parent  # an output there already (to be replaced)
    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PermissionError(f"{what} {path}: cannot write into {folder} ({error.strerror or error}); choose a folder you can write to") from error
    return path


def check_writable_folder(path: str | Path, what: str) -> Path:
    """`check_writable` for an output that is a folder (its files are written into it when the work is done):
    a file already at `path` is refused too, where an output file would be replaced."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} is a file, and {what} names a folder (a missing one is made); give a folder")
    return check_writable(path, what)


def check_output_path(path: str | Path, *, overwrite: bool = False, suffix: str = ".png", flag: str = "overwrite=True") -> Path:
    """Refuse, before any work is done, an output file that cannot be written: another extension, a
    folder, an existing file (unless `overwrite`; `flag` names what allows it, for the message: a script
    passes its option, "--overwrite"), a folder that takes no files (`check_writable`)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path inside it, e.g. {path / ('image' + suffix)}")
    if path.suffix.lower() != suffix:
        raise ValueError(f"{path}: the output must be a {suffix} file; give a path like {path.with_suffix(suffix).name}")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; choose another output path or allow overwriting ({flag})")
    return check_writable(path, "output")


def write_atomically(path: Path, write: Callable[[BinaryIO], object], overwrite: bool) -> None:
    """Let `write` fill a temporary file beside `path`, flush it to disk, then give it the name:
    `path` never holds a partial file. Without `overwrite` the name is taken only if still free."""
    temporary = write_temporary(path, write)
    try:
        if overwrite:
            os.replace(temporary, path)
        else:
            take_free_name(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_temporary(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """A new temporary file beside `path` (its folder made if missing), filled by `write` and flushed
    to disk; removed again if `write` fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    file = open(temporary, "xb")  # outside the try: a name taken by another writer is never removed here
    try:
        with file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def write_files_together(files: Mapping[Path, bytes]) -> None:
    """Several files that belong together (a model and its tower, a model's parts), replacing what is
    there: every one is written to a temporary file beside its name and flushed to disk first, then all
    are renamed in one go. A kill while they are written leaves the old files as they were; only one
    that falls between the renames (microseconds) can leave old and new side by side."""
    temporaries = {}
    try:
        for path, data in files.items():
            temporaries[path] = write_temporary(path, lambda file, data=data: file.write(data))
        for path, temporary in temporaries.items():
            os.replace(temporary, path)
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)


def take_free_name(temporary: Path, path: Path) -> None:
    """Rename `temporary` to `path` only if no file is there (FileExistsError otherwise)."""
    try:
        os.link(temporary, path)  # atomic: fails if the name is taken
    except FileExistsError:
        message = f"{path} appeared while the file was written; it is kept: choose another path or pass overwrite=True"
        raise FileExistsError(message) from None
    except OSError:  # a filesystem without hard links: look, then rename (a tiny window for a race)
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True") from None
        os.replace(temporary, path)
