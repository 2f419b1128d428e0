"""Load IP-Adapter files (h94/IP-Adapter) and the CLIP vision towers they read.

    variant                      base   image projection   tower (h94/IP-Adapter folder)
    ip-adapter_sd15              SD1.5  ImageProjModel     ViT-H/14     models/image_encoder
    ip-adapter-plus_sd15         SD1.5  Resampler          ViT-H/14     models/image_encoder
    ip-adapter_sdxl              SDXL   ImageProjModel     ViT-bigG/14  sdxl_models/image_encoder
    ip-adapter_sdxl_vit-h        SDXL   ImageProjModel     ViT-H/14     models/image_encoder
    ip-adapter-plus_sdxl_vit-h   SDXL   Resampler          ViT-H/14     models/image_encoder

`.safetensors` files hold flat `image_proj.*` / `ip_adapter.*` keys; the `.bin` twins hold a nested
dict with the same inner keys and are read only with allow_pickle=True. The adapter's shape is read
off its tensors (the Resampler's heads from its width: IP-Adapter's heads are 64 wide), built on the
meta device and given every key; its `ip_adapter.{N}` must be exactly the UNet's cross-attention
layers (N by `official_indices`), or the error says which base model the adapter is for.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from minigen.loading.coverage import load_exact
from minigen.loading.detect import CheckpointError
from minigen.loading.files import read_diffusers_component, read_state_dict, required
from minigen.loading.hub import resolve
from minigen.loading.keys import count_children
from minigen.loading.toy import TOY_IP_ADAPTER, toy_ip_adapter_files
from minigen.models.ip_adapter import IPAdapter, ImageProjModel, Resampler, official_indices
from minigen.models.unet import UNet
from minigen.storage import compute_device, compute_dtype
from minigen.transformers_compat import installed_layout, rebuild_position_ids

IP_ADAPTER_HUB_ID = "h94/IP-Adapter"
VARIANTS = {  # name -> (file in h94/IP-Adapter, the folder of the tower it reads)
    "ip-adapter_sd15": ("models/ip-adapter_sd15.safetensors", "models/image_encoder"),
    "ip-adapter-plus_sd15": ("models/ip-adapter-plus_sd15.safetensors", "models/image_encoder"),
    "ip-adapter_sdxl": ("sdxl_models/ip-adapter_sdxl.safetensors", "sdxl_models/image_encoder"),
    "ip-adapter_sdxl_vit-h": ("sdxl_models/ip-adapter_sdxl_vit-h.safetensors", "models/image_encoder"),
    "ip-adapter-plus_sdxl_vit-h": ("sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", "models/image_encoder"),
}
RESAMPLER_HEAD_DIM = 64
BASE_MODELS = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}  # by the width of the text features

# The two towers' configs (h94/IP-Adapter image_encoder/config.json), for a bare .safetensors file.
CLIP_VISION = {
    "ViT-H/14": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, projection_dim=1024),
    "ViT-bigG/14": dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16, projection_dim=1280),
}
CLIP_VISION_COMMON = dict(image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)


def load_ip_adapter(
    source: str | Path,
    unet: UNet,
    *,
    image_encoder: str | Path | None = None,
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> tuple[IPAdapter, CLIPVisionModelWithProjection]:
    """(adapter, CLIP vision tower), frozen, in eval mode, on the UNet's device and dtype (or `dtype`).

    source: a variant name above (fetched from h94/IP-Adapter), "ip-adapter-plus_toy-sd" (toy-sd's, shipped
    in weights/ with its tower), or an adapter file.
    image_encoder: a folder with config.json + model.safetensors, a .safetensors file, or a hub
    id; default: the tower the variant reads, from h94/IP-Adapter (for a file: the tower whose width
    the adapter reads).
    """
    device, dtype = compute_device(unet), dtype or compute_dtype(unet)  # where and how it computes (stored, offloaded weights)
    if str(source) == TOY_IP_ADAPTER:  # shipped in weights/, for toy-sd
        files = toy_ip_adapter_files()
        source, image_encoder = files["adapter"], image_encoder or files["image_encoder"]
    if str(source) in VARIANTS:
        file, tower = VARIANTS[str(source)]
        folder = resolve(IP_ADAPTER_HUB_ID, [file, *tower_files(tower)])
        adapter = ip_adapter_from_state_dict(read_state_dict(folder / file), unet, dtype=dtype)
        image_encoder = image_encoder or folder / tower
    else:
        if not Path(source).exists():
            raise FileNotFoundError(f"{source!r} is neither an IP-Adapter file nor one of the variants {sorted([*VARIANTS, TOY_IP_ADAPTER])}")
        adapter = ip_adapter_from_state_dict(read_state_dict(source, allow_pickle=allow_pickle), unet, dtype=dtype)
    if image_encoder is None:
        tower = _default_tower(adapter)
        image_encoder = resolve(IP_ADAPTER_HUB_ID, tower_files(tower)) / tower
    encoder = load_clip_vision(image_encoder, dtype=dtype)
    width = getattr(encoder.config, _width_field(adapter))
    if width != _tower_width(adapter):
        raise CheckpointError(
            f"this IP-Adapter reads {_tower_width(adapter)}-wide image features but the tower gives {width}-wide "
            f"{_width_field(adapter)}: pair it with the tower of its variant (see minigen.loading.ip_adapter.VARIANTS)"
        )
    for module in (adapter, encoder):
        module.to(device).eval().requires_grad_(False)
    return adapter, encoder


def ip_adapter_from_state_dict(state_dict: dict[str, Tensor], unet: UNet, *, dtype: torch.dtype | None = None) -> IPAdapter:
    """An IPAdapter for `unet` holding exactly the file's `image_proj.*` / `ip_adapter.*` tensors."""
    if not any(key.startswith("ip_adapter.") for key in state_dict) or not any(key.startswith("image_proj.") for key in state_dict):
        raise CheckpointError(
            "not an IP-Adapter file: it needs image_proj.* and ip_adapter.* keys (h94/IP-Adapter's layout; "
            f"first keys here: {list(state_dict)[:3]})"
        )
    cross_dim = state_dict["ip_adapter.1.to_k_ip.weight"].shape[1] if "ip_adapter.1.to_k_ip.weight" in state_dict else None
    layers = unet_cross_attention_widths(unet)
    expected = {str(n) for n in official_indices(list(layers)).values()}
    given = {key.split(".")[1] for key in state_dict if key.startswith("ip_adapter.")}
    if cross_dim != unet.config.context_dim or given != expected:
        adapter_base = BASE_MODELS.get(cross_dim, f"a UNet reading {cross_dim}-wide text")
        unet_base = BASE_MODELS.get(unet.config.context_dim, f"a UNet reading {unet.config.context_dim}-wide text")
        raise CheckpointError(
            f"this IP-Adapter is for {adapter_base} ({len(given)} cross-attention layers, {cross_dim}-wide image "
            f"tokens) but the UNet is {unet_base} ({len(expected)} layers, {unet.config.context_dim}-wide text). "
            "Fix: pick the adapter variant made for this base model."
        )
    with torch.device("meta"):
        adapter = IPAdapter(_image_proj(state_dict), layers, cross_dim)
    load_exact(adapter, state_dict, dtype=dtype)
    return adapter.eval()


def unet_cross_attention_widths(unet: UNet) -> dict[str, int]:
    """{cross-attention layer id: its query width}, in the UNet's order."""
    return {layer: unet.get_submodule(path).attn2.to_q.out_features for layer, path in unet.attention_layers().items()}


def tower_files(tower: str) -> list[str]:
    """The files of a tower folder in h94/IP-Adapter that are fetched: its config and safetensors weights
    (the folder also holds a pickled twin of several GB)."""
    return [f"{tower}/config.json", f"{tower}/model.safetensors"]


def _image_proj(state_dict: dict[str, Tensor]) -> ImageProjModel | Resampler:
    if "image_proj.latents" in state_dict:  # Plus: a Resampler
        _, queries, dim = state_dict["image_proj.latents"].shape
        inner = required(state_dict, "image_proj.layers.0.0.to_q.weight").shape[0]
        return Resampler(
            dim=dim, depth=count_children(state_dict, "image_proj.layers."), dim_head=RESAMPLER_HEAD_DIM,
            heads=inner // RESAMPLER_HEAD_DIM, num_queries=queries,
            embedding_dim=required(state_dict, "image_proj.proj_in.weight").shape[1],
            output_dim=required(state_dict, "image_proj.proj_out.weight").shape[0],
            ff_mult=required(state_dict, "image_proj.layers.0.1.1.weight").shape[0] // dim,
        )  # fmt: skip
    if "image_proj.proj.weight" not in state_dict:
        found = sorted({key.rsplit(".", 1)[0] for key in state_dict if key.startswith("image_proj.")})[:4]
        raise CheckpointError(
            f"this IP-Adapter's image projection ({', '.join(found)}, ...) is neither the plain one (image_proj.proj) nor "
            "the Plus Resampler (image_proj.latents): full-face and FaceID adapters are not supported; use one of "
            f"{sorted(VARIANTS)}"
        )
    out_features, clip_dim = state_dict["image_proj.proj.weight"].shape
    cross_dim = required(state_dict, "image_proj.norm.weight").shape[0]
    return ImageProjModel(clip_dim, cross_dim, out_features // cross_dim)


def _default_tower(adapter: IPAdapter) -> str:
    """The h94/IP-Adapter folder of the tower an adapter file reads: ViT-bigG's for the one adapter that
    reads a 1280-wide projection (ip-adapter_sdxl), ViT-H's for the others."""
    bigg = not adapter.plus and _tower_width(adapter) == CLIP_VISION["ViT-bigG/14"]["projection_dim"]
    return "sdxl_models/image_encoder" if bigg else "models/image_encoder"


def _width_field(adapter: IPAdapter) -> str:
    """Which width of the tower the adapter reads: its hidden states (Plus) or its projection."""
    return "hidden_size" if adapter.plus else "projection_dim"


def _tower_width(adapter: IPAdapter) -> int:
    proj = adapter.image_proj
    return proj.proj_in.in_features if adapter.plus else proj.proj.in_features


def load_clip_vision(source: str | Path, *, dtype: torch.dtype | None = None) -> CLIPVisionModelWithProjection:
    """A CLIP vision tower with its projection, from a folder (config.json + model.safetensors), a
    .safetensors file (ViT-H/14 or ViT-bigG/14, told apart by width) or a hub id."""
    path = resolve(source, ["config.json", "model.safetensors"])
    if path.is_dir():
        weights = read_diffusers_component(path)
        config = CLIPVisionConfig.from_json_file(path / "config.json")
    else:
        weights = read_state_dict(path)
        config = CLIPVisionConfig(**CLIP_VISION_COMMON, **_clip_vision_preset(weights))
    return build_clip_vision(config, weights, dtype=dtype)


def build_clip_vision(config: CLIPVisionConfig, state_dict: dict[str, Tensor], *, dtype: torch.dtype | None = None) -> CLIPVisionModelWithProjection:
    """A CLIP vision tower in eval mode holding exactly `state_dict` (the files' `vision_model.*` and
    `visual_projection.*` names), built on the meta device."""
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    # older transformers saved position_ids (arange) with the weights; it is rebuilt below
    load_exact(model, installed_layout(state_dict, model, "vision_model"), ignore=["*.position_ids"], dtype=dtype)
    rebuild_position_ids(model, "vision_model")
    return model.eval()


def _clip_vision_preset(weights: dict[str, Tensor]) -> dict:
    key = "vision_model.embeddings.class_embedding"
    if key not in weights:
        raise CheckpointError(f"not a CLIP vision tower file: {key} is missing (first keys: {list(weights)[:3]})")
    width = weights[key].shape[0]
    for preset in CLIP_VISION.values():
        if preset["hidden_size"] == width:
            return preset
    raise CheckpointError(
        f"a {width}-wide CLIP vision tower: only ViT-H/14 (1280) and ViT-bigG/14 (1664) are known from their "
        "weights alone; pass the folder with its config.json instead"
    )
