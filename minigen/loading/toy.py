"""The toy models shipped in minigen's `weights/` folder, by name.

    toy-sd     weights/toy-sd.safetensors            one file in the SD1.5 single-file layout
    toy-flux   weights/toy-flux/flux1-toy.safetensors + ae.safetensors (BFL layouts)
               + text_encoder/ text_encoder_2/ tokenizer_2/ (diffusers layout)

and the reference adapters: toy-sd's, by the name `load_ip_adapter` takes for it, and toy-flux's:

    ip-adapter-plus_toy-sd   weights/toy-sd-ip-adapter/ip-adapter-plus_toy-sd.safetensors (h94/IP-Adapter's
                             layout) + image_encoder/ (transformers' CLIPVisionModelWithProjection)
    subject_toy-flux         weights/toy-flux-omini/subject_toy-flux.safetensors (OminiControl's subject
                             LoRA layout, read by `read_flux_lora`)

They load through the same code as the official files (`load_sd`, `load_flux`); their files state
in metadata what the weights cannot show (head counts, latent scale, 64-pixel size, step count).
How they were trained: weights/README.md and scripts/train_toy.py.

setup.py installs weights/ as the package `minigen.weights`, so the files are found through
importlib.resources: in the clone for an editable install, in site-packages for a regular one.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from .files import is_safetensors, read_metadata

WEIGHTS = Path(resources.files("minigen.weights"))  # a folder on disk: pip installs packages unzipped
TOY_SD = WEIGHTS / "toy-sd.safetensors"
TOY_FLUX = WEIGHTS / "toy-flux"
TOY_MODELS = ("toy-sd", "toy-flux")
TOY_IP_ADAPTER = "ip-adapter-plus_toy-sd"
TOY_SUBJECT_LORA = WEIGHTS / "toy-flux-omini" / "subject_toy-flux.safetensors"


def toy_files(name: str) -> dict[str, Path]:
    """The files of a toy model: {"source"} for toy-sd; {"source", "ae", "text_encoders"} for toy-flux."""
    if name not in TOY_MODELS:
        raise ValueError(f"unknown toy model {name!r}; choose one of {TOY_MODELS}")
    files = {"source": TOY_SD} if name == "toy-sd" else toy_flux_folder_files(TOY_FLUX)
    return _present(name, files, f"python scripts/train_toy.py {name.removeprefix('toy-')} --work runs/{name}")


def toy_flux_folder_files(folder: str | Path) -> dict[str, Path]:
    """`load_flux`'s files of a toy-flux folder (weights/toy-flux's layout, as train_toy.py flux writes it)."""
    folder = Path(folder)
    return {"source": folder / "flux1-toy.safetensors", "ae": folder / "ae.safetensors", "text_encoders": folder}


def is_toy_flux_folder(source: str | Path) -> bool:
    return Path(source).is_dir() and (Path(source) / "flux1-toy.safetensors").is_file()


def is_toy_file(source: str | Path) -> bool:
    """Whether `source` is a toy model's own file (a toy-sd file, toy-flux's transformer): train_toy.py
    states the model under "minigen.toy" in its metadata."""
    path = Path(source)
    return is_safetensors(path) and path.is_file() and "minigen.toy" in read_metadata(path)


def toy_layout(model: str | Path) -> str:
    """The world layout a toy model was trained on (`minigen.toy.scenes.LAYOUTS`), as its file states
    under "minigen.toy": toy-sd's "anywhere", toy-flux's "halves". ``model``: a toy name, a toy-sd file or
    a toy-flux folder; a file that states none (models trained before layouts existed, real checkpoints)
    and any other source (a hub id, a diffusers folder) give "anywhere", the whole world."""
    if str(model) in TOY_MODELS:
        file = toy_files(str(model))["source"]
    elif is_toy_flux_folder(model):
        file = toy_flux_folder_files(model)["source"]
    elif Path(model).is_file():
        file = Path(model)
    else:
        return "anywhere"
    return json.loads(read_metadata(file).get("minigen.toy", "{}")).get("layout", "anywhere")


def toy_ip_adapter_files() -> dict[str, Path]:
    """{"adapter", "image_encoder"}: toy-sd's IP-Adapter-Plus and the vision tower trained with it."""
    folder = WEIGHTS / "toy-sd-ip-adapter"
    files = {"adapter": folder / f"{TOY_IP_ADAPTER}.safetensors", "image_encoder": folder / "image_encoder"}
    return _present(TOY_IP_ADAPTER, files, "python scripts/train_toy_adapters.py sd --work runs/adapters")


def toy_subject_lora_file() -> Path:
    """toy-flux's OminiControl subject LoRA."""
    files = _present("subject_toy-flux", {"lora": TOY_SUBJECT_LORA}, "python scripts/train_toy_adapters.py flux --work runs/omini")
    return files["lora"]


def _present(name: str, files: dict[str, Path], train: str) -> dict[str, Path]:
    missing = [str(path) for path in files.values() if not path.exists()]
    if missing:
        raise FileNotFoundError(
            f"{name} is not at {', '.join(missing)}. The toy models ship in the weights/ folder of the minigen "
            "git repository: install minigen from a clone that has them (pip install . or pip install -e .), or "
            f"train them with {train}."
        )
    return files
