"""Where transformers keeps a text or vision tower: the one thing minigen adapts to its version.

The official files name the weights of CLIP's text tower `text_model.*` and those of SigLIP's vision
tower `vision_model.*`, as transformers 4.x did: it wrapped each tower in a `.text_model` /
`.vision_model` submodule. Later versions put the tower's layers on the model itself
(SiglipVisionModel from 5.0, CLIPTextModel from 5.6; CLIPTextModelWithProjection still wraps it),
so that there the same weights are `embeddings.*`, `encoder.*`. minigen keeps the files' names
and converts at the model's edge:

    tower(model, "text_model")                          the module holding embeddings and encoder
    installed_layout(state_dict, model, "text_model")   file keys -> keys of model.state_dict()
    file_layout(state_dict, model, "text_model")        keys of model.state_dict() (or module paths) -> file keys
    rebuild_position_ids(model, "text_model")           after building on the meta device
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import torch
from torch import nn

V = TypeVar("V")


def tower(model: nn.Module, name: str) -> nn.Module:
    """The module holding the tower's embeddings and encoder: `model.<name>`, or the model itself."""
    return getattr(model, name, model)


def installed_layout(state_dict: Mapping[str, V], model: nn.Module, name: str) -> dict[str, V]:
    """The files' keys -> the installed model's: `name.` stripped where the model has no `name`
    submodule. Keys without it (the text tower of a whole SiglipModel file, say) stay as they are."""
    if hasattr(model, name):
        return dict(state_dict)
    return {key.removeprefix(f"{name}."): value for key, value in state_dict.items()}


def file_layout(state_dict: Mapping[str, V], model: nn.Module, name: str) -> dict[str, V]:
    """The installed model's keys or module paths -> the files': `name.` put back where the model
    has no `name` submodule."""
    if hasattr(model, name):
        return dict(state_dict)
    return {f"{name}.{key}": value for key, value in state_dict.items()}


def rebuild_position_ids(model: nn.Module, name: str) -> None:
    """position_ids (arange over the positions) is a non-persistent buffer: loading does not set it,
    so after building on the meta device it is still empty. Recreate it beside the weights."""
    embeddings = tower(model, name).embeddings
    table = embeddings.position_embedding.weight  # [positions, hidden]
    embeddings.position_ids = torch.arange(table.shape[0], device=table.device).expand(1, -1)
