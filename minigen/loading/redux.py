"""Load FLUX.1 Redux: BFL's projector file and the SigLIP vision tower whose features it projects.

    projector   flux1-redux-dev.safetensors (black-forest-labs/FLUX.1-Redux-dev): 4 tensors,
                redux_up.{weight,bias} [12288, 1152], [12288] and redux_down.{weight,bias} [4096, 12288], [4096]
    SigLIP      google/siglip-so400m-patch14-384: config.json + model.safetensors, the whole SiglipModel
                of which only `vision_model.*` is loaded; or a .safetensors of the vision tower alone
                (`vision_model.*`, e.g. the `image_encoder/` of the diffusers Redux repo)

Both are built on the meta device and take the file's tensors; every key must be used (the SigLIP
text tower is dropped on purpose: SIGLIP_NON_VISION_KEYS). Each argument may be a local path or a
hub id; hub files are fetched once and then read from the local cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from math import isqrt
from pathlib import Path
from typing import Any

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from minigen.loading.coverage import build_exact, load_exact
from minigen.loading.detect import CheckpointError, detect, require
from minigen.loading.files import config_fields, read_diffusers_component, read_json, read_state_dict, with_overrides
from minigen.loading.hub import resolve
from minigen.loading.keys import count_children, take_prefix
from minigen.models.redux import SIGLIP_PRESETS, ReduxConfig, ReduxImageEncoder, SiglipConfig
from minigen.transformers_compat import installed_layout, rebuild_position_ids

REDUX_HUB_ID = "black-forest-labs/FLUX.1-Redux-dev"
REDUX_FILE = "flux1-redux-dev.safetensors"
SIGLIP_HUB_ID = "google/siglip-so400m-patch14-384"

# Keys of the hub's full SigLIP file (google/siglip-so400m-patch14-384 `model.safetensors`, a
# SiglipModel) that Redux does not load: the text tower and the two scalars of the contrastive loss.
SIGLIP_NON_VISION_KEYS: tuple[str, ...] = ("text_model.*", "logit_scale", "logit_bias")


def load_redux(
    redux_file: str | Path = REDUX_HUB_ID,
    siglip_source: str | Path = SIGLIP_HUB_ID,
    *,
    siglip_config: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> tuple[SiglipVisionModel, ReduxImageEncoder]:
    """(SigLIP vision tower, Redux projector), frozen, in eval mode; use them with `redux_tokens`.

    redux_file: `flux1-redux-dev.safetensors`, a folder holding it, or a hub id (default: BFL's repo).
    siglip_source: a folder with config.json + model.safetensors, a `.safetensors` file, or a hub id.
    siglip_config: SiglipConfig fields a bare `.safetensors` file cannot show (its `num_heads`).
    dtype: bfloat16 by default, as BFL runs both (the SigLIP release is float32).
    """
    siglip = load_siglip(siglip_source, config=siglip_config, dtype=dtype)
    projector = load_redux_projector(redux_file, dtype=dtype)
    if projector.config.siglip_dim != siglip.config.hidden_size:
        raise CheckpointError(
            f"the Redux projector reads {projector.config.siglip_dim}-wide features but this SigLIP tower "
            f"gives {siglip.config.hidden_size}: pair flux1-redux-dev with {SIGLIP_HUB_ID}"
        )
    for module in (siglip, projector):
        module.to(device).eval().requires_grad_(False)
    return siglip, projector


def load_redux_projector(source: str | Path = REDUX_HUB_ID, *, dtype: torch.dtype | None = None) -> ReduxImageEncoder:
    """The projector of `flux1-redux-dev.safetensors` (a file, a folder holding it, or a hub id)."""
    path = resolve(source, [REDUX_FILE])
    if path.is_dir():
        path = path / REDUX_FILE
    weights = read_state_dict(path)
    try:
        require(weights, "flux-redux")
    except CheckpointError as error:
        raise CheckpointError(
            f"{path.name} is not a FLUX Redux projector file: {error}\n"
            f"Pass {REDUX_FILE} from {REDUX_HUB_ID}; the SigLIP weights go in `siglip_source`."
        ) from error
    return build_exact(ReduxImageEncoder, redux_config_from_keys(weights), weights, dtype=dtype).eval()


def load_siglip(
    source: str | Path = SIGLIP_HUB_ID, *, config: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None
) -> SiglipVisionModel:
    """A SigLIP vision tower from a hub folder (config.json + weights), a `.safetensors` file or a hub id.
    `config` sets SiglipConfig fields the files do not show, or overrides those they do."""
    path = resolve(source, ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"])
    if path.is_dir():
        weights = read_diffusers_component(path)  # model.safetensors, or its shards
    else:
        weights = read_state_dict(path)
    if detect(weights).family != "siglip":  # the whole SiglipModel is fine too
        try:
            require(weights, "siglip-vision")
        except CheckpointError as error:
            raise CheckpointError(f"{path.name} is not a SigLIP checkpoint: {error}") from error
    if path.is_dir():
        model_config = with_overrides(siglip_config_from_json(path / "config.json"), config)
    else:
        model_config = siglip_config_from_keys(weights, config)
    return build_siglip(model_config, weights, dtype=dtype)


def build_siglip(
    config: SiglipConfig, state_dict: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None
) -> SiglipVisionModel:
    """A SigLIP vision tower in eval mode holding exactly `state_dict`, cast to `dtype` if given.

    state_dict: the hub file's layout, either the vision tower alone (`vision_model.*`) or the
    whole SiglipModel, whose text tower and `logit_scale` / `logit_bias` are dropped on purpose
    (SIGLIP_NON_VISION_KEYS). Every vision key, the pooling head `vision_model.head.*` included,
    must be present with the model's shape. The model is built on the meta device.
    """
    with torch.device("meta"):
        model = SiglipVisionModel(config.to_transformers())
    load_exact(model, installed_layout(state_dict, model, "vision_model"), ignore=SIGLIP_NON_VISION_KEYS, dtype=dtype)
    rebuild_position_ids(model, "vision_model")
    return model.eval()


def redux_config_from_keys(weights: dict[str, torch.Tensor]) -> ReduxConfig:
    """Every width of the projector is in its weight shapes ([out, in] each)."""
    hidden, siglip_dim = weights["redux_up.weight"].shape
    txt_dim = weights["redux_down.weight"].shape[0]
    return ReduxConfig(siglip_dim=siglip_dim, hidden=hidden, txt_dim=txt_dim)


def siglip_config_from_json(file: Path) -> SiglipConfig:
    """The vision tower's config from a hub `config.json`: of a SiglipModel (the tower is its
    `vision_config`) or of a SiglipVisionModel. Fields it leaves out take transformers' defaults."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a SigLIP folder needs its config.json beside the weights")
    fields = read_json(file)
    if fields.get("model_type") == "siglip":
        fields = fields.get("vision_config", {})
    return SiglipConfig.from_transformers(SiglipVisionConfig.from_dict(fields))


def siglip_config_from_keys(weights: dict[str, torch.Tensor], given: Mapping[str, Any] | None = None) -> SiglipConfig:
    """The vision tower's config from its weights. They do not show its number of heads (nor its image
    size exactly: 384 and 383 px both give 27 x 27 patches of 14), so the weights must have the shapes
    of a preset or the number of heads must be `given` (with any other fields to set)."""
    given = config_fields(SiglipConfig, given)
    tower = take_prefix(weights, "vision_model.")
    width, channels, patch, _ = tower["embeddings.patch_embedding.weight"].shape  # [hidden, 3, p, p]
    shape = dict(
        hidden_size=width,
        num_channels=channels,
        patch_size=patch,
        num_patches=tower["embeddings.position_embedding.weight"].shape[0],
        intermediate_size=tower["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_layers=count_children(tower, "encoder.layers."),
    )
    for config in SIGLIP_PRESETS.values():
        if all(getattr(config, field) == value for field, value in shape.items()):
            return replace(config, **given)
    if "num_heads" not in given:
        raise CheckpointError(
            f"this SigLIP vision tower ({', '.join(f'{k}={v}' for k, v in shape.items())}) matches no preset in "
            f"{sorted(SIGLIP_PRESETS)}, and its number of heads is not in the weights: pass the folder with its "
            "config.json instead of the bare .safetensors file, or give it: siglip_config={'num_heads': ...}"
        )
    image_size = isqrt(shape.pop("num_patches")) * shape["patch_size"]
    return SiglipConfig(**{"image_size": image_size, **shape, **given})
