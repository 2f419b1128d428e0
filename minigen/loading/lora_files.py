"""LoRA files for SD1.x / SDXL, read into `LowRank` residuals; merging any residuals into weights.

A LoRA stores, for some Linear or Conv2d layers W, two factors and sometimes an alpha:

    ΔW = (alpha / rank) · up @ down        down: [rank, in] or [rank, in, kh, kw],  up: [out, rank]

Each becomes one `LowRank(target, down, up, scale)` with `scale = user scale · alpha / rank`
(alpha defaults to the rank, i.e. no rescaling). minigen applies it as a residual through
`Controls(low_rank=...)` (per call, per row, per region), or adds ΔW into the weight with `merge`.

The files name each layer by a module path, in one of two formats:

    kohya      lora_unet_<path with "_">.lora_down.weight / .lora_up.weight / .alpha
               lora_te_… (SD1.x text encoder), lora_te1_… / lora_te2_… (SDXL's two)
    peft       unet.<path>.lora_A.weight / .lora_B.weight (/ .alpha)
               text_encoder.… / text_encoder_2.…
    older diffusers spellings of the factors: `.lora.down.weight`, `.lora_linear_layer.down.weight`,
               and attention processors `attn1.processor.to_q_lora.down.weight` (= `attn1.to_q`)

and the UNet path itself comes in two namings: diffusers' (`down_blocks.0.attentions.0…`, used by
peft files and by kohya's SD1.x LoRAs) and ldm/sgm's (`input_blocks.1.1…`, used by kohya's SDXL
LoRAs), which is minigen's own. kohya's underscores make a path ambiguous to split
(`to_out_0`: `to_out.0` or `to.out_0`?), so names are never parsed: a table lists every layer of
the model under each spelling it can have, in both namings, flattened with "_", and a LoRA name
is looked up there. A name that is not in the table is an error, as is a key nobody reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from minigen.controls import LowRank
from minigen.loading.detect import CheckpointError, detect
from minigen.loading.coverage import non_finite
from minigen.loading.files import read_metadata, read_state_dict
from minigen.loading.lora_metadata import adapter_scales, layer_scale
from minigen.loading.keymaps_unet import unet_to_diffusers
from minigen.loading.textual_inversion import is_embedding
from minigen.models.unet import UNet
from minigen.transformers_compat import file_layout
from minigen.storage import to_compute  # the layer's compute dtype and device (a stored layer's weight may be fp16)

DIFFUSERS_NAMES = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}  # the models' names in diffusers' files

# Key prefix -> the model it addresses: "unet", or a text encoder ("te1", "te2").
COMPONENT_PREFIXES = {
    "lora_unet_": "unet",  # kohya
    "lora_te_": "te1",
    "lora_te1_": "te1",
    "lora_te2_": "te2",
    "unet.": "unet",  # peft / diffusers
    "text_encoder.": "te1",
    "text_encoder_2.": "te2",
}

PEFT_SAVED = "base_model.model."  # what peft's own save_pretrained puts before one model's names

# Key suffix (after the layer's name) -> what the tensor is.
PART_SUFFIXES = {
    "lora_down.weight": "down",  # kohya
    "lora_up.weight": "up",
    "lora_A.weight": "down",  # peft
    "lora_B.weight": "up",
    "lora.down.weight": "down",  # diffusers 0.15-0.24
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",  # diffusers' text-encoder patches
    "lora_linear_layer.up.weight": "up",
    "alpha": "alpha",
}

# Older diffusers files name a LoRA after the attention processor that applied it.
OLD_ATTENTION_NAMES = (
    (re.compile(r"\.processor\.to_(q|k|v)_lora\."), r".to_\1.lora."),  # UNet attention
    (re.compile(r"\.processor\.to_out_lora\."), r".to_out.0.lora."),
    (re.compile(r"\.self_attn\.to_(q|k|v|out)_lora\."), r".self_attn.\1_proj.lora."),  # CLIP attention
)

FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sdxl-refiner": "the SDXL refiner"}
# What a file given as a LoRA is instead, by `detect`'s family: its name, and where it goes (sample.py's flag, the loader in code).
MODEL = ("--model", "minigen.loading.auto.load_pipeline")
OTHER_KINDS = {
    "sd1": ("an SD1.x model", *MODEL), "sd2": ("an SD2.x model", *MODEL), "sdxl": ("an SDXL model", *MODEL),
    "sdxl-refiner": ("an SDXL refiner", *MODEL), "flux-dev": ("a FLUX.1-dev transformer", *MODEL),
    "flux-schnell": ("a FLUX.1-schnell transformer", *MODEL),
    "sd-vae": ("an SD VAE", "--vae", "minigen.loading.vae.load_vae"),
    "flux-ae": ("a FLUX autoencoder", "--ae", "load_pipeline(..., ae=path)"),
    "ip-adapter": ("an IP-Adapter", "--ip-adapter", "minigen.loading.ip_adapter.load_ip_adapter"),
    "flux-redux": ("a FLUX Redux projector", "--redux", "minigen.loading.redux.load_redux"),
    "embedding": ("a textual-inversion embedding", "--embedding", "minigen.loading.textual_inversion.load_textual_inversion"),
}  # fmt: skip
TEXT_FEATURE_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # what cross-attention keys read


@dataclass
class LoraFile:
    """The residuals of one LoRA file: `unet` targets minigen UNet module paths, `text["te1"]` /
    `text["te2"]` module paths inside the transformers text encoders."""

    unet: list[LowRank] = field(default_factory=list)
    text: dict[str, list[LowRank]] = field(default_factory=dict)


def read_lora(
    path_or_state_dict: str | Path | Mapping[str, Tensor],
    *,
    unet: nn.Module,
    text_encoders: Mapping[str, nn.Module] = {},
    scale: float = 1.0,
) -> LoraFile:
    """Read a kohya or peft/diffusers LoRA for `unet` and `text_encoders` ({"te1": …, "te2": …}).

    A layer's scale is alpha / rank from its `.alpha` tensor (none: 1), or, where the file's metadata holds
    diffusers' LoRA config, peft's scale from it (minigen/loading/lora_metadata.py), times `scale`.
    Factors are cast to the dtype and device of the layer they target. Every key must be read and
    every layer must exist with the LoRA's shapes, otherwise a CheckpointError says which keys, and,
    for a LoRA made for another base model, which model that probably is. Files are read with
    `read_state_dict` (safetensors; for a pickled `.bin` you trust, pass
    `read_state_dict(path, allow_pickle=True)` instead of the path).
    """
    state_dict, metadata = lora_tensors(path_or_state_dict)
    if detect(state_dict).family == "lora-flux":
        raise CheckpointError(
            "this is a LoRA for FLUX's transformer, not for an SD UNet. Fix: use it with a FLUX model (sample.py "
            "--model flux-dev, or minigen.loading.lora_flux.read_flux_lora(path, pipe.transformer) in code), or pick an SD LoRA."
        )
    layers, unread = group_by_layer(state_dict, _parse_key)
    if unread:
        raise CheckpointError(
            f"{len(unread)} keys of this LoRA were not read: {unread[:10]}. minigen reads LoRA factors "
            "(kohya .lora_down/.lora_up/.alpha, peft .lora_A/.lora_B/.alpha, and the older diffusers "
            "names) for the UNet and the CLIP text encoders; LyCORIS (LoHa, LoKr), DoRA and full-weight "
            "diffs are not supported. Remove these keys or convert the file to a plain LoRA."
        )

    if set(text_encoders) - {"te1", "te2"}:
        raise ValueError(f"name the text encoders 'te1' and 'te2' (SDXL's second), not {sorted(text_encoders)}")
    models = {"unet": unet, **text_encoders}
    tables = {name: layer_table(model) for name, model in models.items()}
    # diffusers' LoRA configs in the file's metadata (lora_metadata.py), by its model names
    in_metadata = adapter_scales(metadata, tuple(DIFFUSERS_NAMES.values()))
    scales = {component: in_metadata[name] for component, name in DIFFUSERS_NAMES.items() if name in in_metadata}
    found: dict[str, list[LowRank]] = {name: [] for name in models}
    missing, misfit = [], []
    for (component, name), parts in layers.items():
        if parts["down"].dim() not in (2, 4) or parts["up"].dim() not in (2, 4):  # a Linear's factors are 2-D, a Conv2d's 4-D
            shapes = f"{list(parts['down'].shape)}, {list(parts['up'].shape)}"
            raise CheckpointError(f"{component}:{name}: its factors have shapes {shapes}, not 2-D or 4-D; the file is damaged. "
                                  "Fix: re-export the LoRA")
        target = tables[component].get(name.replace(".", "_")) if component in tables else None
        if target is None:
            missing.append((component, name))
            continue
        layer = models[component].get_submodule(target)
        weight = layer.weight
        down, up = _fit_factor_shapes(parts["down"], parts["up"], weight)
        if down is None:
            shapes = f"down {tuple(parts['down'].shape)}, up {tuple(parts['up'].shape)}"
            misfit.append(f"{component}:{name} ({shapes} for a weight {tuple(weight.shape)})")
            continue
        own = layer_scale(name, parts, scales.get(component))
        found[component].append(LowRank(target, to_compute(down, layer), to_compute(up, layer), scale * own))
    if missing or misfit:
        raise _mismatch_error(layers, missing, misfit, unet, text_encoders)
    return LoraFile(unet=found.pop("unet"), text=found)


def layer_table(model: nn.Module) -> dict[str, str]:
    """Every Linear/Conv2d of `model` under each name a LoRA file may give it, flattened with "_".

    UNet: minigen's path (= ldm/sgm) and the diffusers path. Text encoder: the transformers path,
    and the files' `text_model.` path where this transformers version has flattened it out.
    """
    paths = [name for name, module in model.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    spellings = {path: path for path in paths}
    if isinstance(model, UNet):
        # Tag each path with its index, let the key map rename the keys, read the index back.
        tagged = {f"{path}.weight": torch.tensor(i) for i, path in enumerate(paths)}
        for key, index in unet_to_diffusers(tagged, model.config).items():
            spellings[key.removesuffix(".weight")] = paths[int(index)]
    else:
        spellings.update(file_layout(spellings, model, "text_model"))

    return flattened(spellings)


def flattened(spellings: Mapping[str, object]) -> dict:
    """{spelling with "." -> "_": what it names}, refusing two layers that flatten to one name."""
    table = {}
    for spelling, layer in spellings.items():
        flat = spelling.replace(".", "_")
        if table.setdefault(flat, layer) != layer:
            raise ValueError(f"layers {table[flat]!r} and {layer!r} are both spelled {flat!r} in LoRA files")
    return table


def lora_tensors(path_or_state_dict: str | Path | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A LoRA's tensors and its file's metadata (none for tensors given directly), refusing a file of another kind
    (`OTHER_KINDS`) and NaN or infinite values: what `read_lora` and `read_flux_lora` start from."""
    if isinstance(path_or_state_dict, Mapping):
        state_dict, metadata = dict(path_or_state_dict), {}
    else:
        state_dict, metadata = read_state_dict(path_or_state_dict), read_metadata(path_or_state_dict)
    if not state_dict:
        raise CheckpointError("this LoRA holds no tensors: the file is empty or was saved without its factors")
    family = "embedding" if is_embedding(state_dict) else detect(state_dict).family
    if kind := OTHER_KINDS.get("ip-adapter" if family.startswith("ip-adapter") else family):
        what, flag, loader = kind
        raise CheckpointError(f"this is {what} file, not a LoRA; pass it as {flag} (sample.py), or to {loader} in code")
    if bad := non_finite(state_dict):
        raise CheckpointError(f"this LoRA has NaN or infinite values in {len(bad)} tensors (e.g. {bad[0]}): the file is damaged")
    return state_dict, metadata


def group_by_layer(state_dict: Mapping[str, Tensor], parse: Callable[[str], tuple[Hashable, str] | None]) -> tuple[dict, list[str]]:
    """{layer: {"down", "up", ["alpha"]}}, and the keys that are not LoRA factors. `parse(key)` gives a
    key's (layer, part), or None for a key that is not a factor. Two keys for one part of a layer (the
    same layer under two prefixes, or two spellings of a factor) are refused: one would be dropped."""
    layers: dict[Hashable, dict[str, Tensor]] = {}
    owners: dict[Hashable, dict[str, str]] = {}
    unread = []
    for key, tensor in state_dict.items():
        parsed = parse(key)
        if parsed is None:
            unread.append(key)
            continue
        layer, part = parsed
        if part in owners.setdefault(layer, {}):
            raise CheckpointError(f"{owners[layer][part]} and {key} are both the {part} factor of one layer; the file holds "
                                  "two LoRAs for it (merged under two prefixes?). Fix: keep one of them")
        layers.setdefault(layer, {})[part] = tensor
        owners[layer][part] = key
    for layer, parts in list(layers.items()):
        if "down" not in parts or "up" not in parts:  # half a LoRA: nothing to apply
            unread += owners[layer].values()
            del layers[layer]
    return layers, unread


def _parse_key(key: str) -> tuple[tuple[str, str], str] | None:
    """((component, layer name), part) of a LoRA key, or None if it is not one."""
    if key.startswith(PEFT_SAVED):  # peft's save_pretrained of one model: a text encoder's names go on with text_model.
        key = ("text_encoder." if key.startswith(f"{PEFT_SAVED}text_model.") else "unet.") + key.removeprefix(PEFT_SAVED)
    # The oldest diffusers files have no prefix: their keys are UNet keys.
    prefix = max((p for p in COMPONENT_PREFIXES if key.startswith(p)), key=len, default="")
    component, rest = COMPONENT_PREFIXES.get(prefix, "unet"), key[len(prefix) :]
    for pattern, modern in OLD_ATTENTION_NAMES:
        rest = pattern.sub(modern, rest)
    for suffix, part in PART_SUFFIXES.items():
        if rest.endswith(f".{suffix}"):
            return (component, rest[: -len(suffix) - 1]), part
    return None


def _fit_factor_shapes(down: Tensor, up: Tensor, weight: Tensor) -> tuple[Tensor | None, Tensor]:
    """down shaped like the weight's input side, up as [out, rank]; down None if they do not fit.

    A 1x1 conv and a Linear are the same map, so [r, in] and [r, in, 1, 1] factors fit either
    (SD1.x's proj_in/proj_out are 1x1 convs in the checkpoint, Linear in some trainers).
    """
    if down.dim() == 4 and weight.dim() == 2 and down.shape[2:] == (1, 1):
        down = down.flatten(1)
    elif down.dim() == 2 and weight.dim() == 4 and weight.shape[2:] == (1, 1):
        down = down[:, :, None, None]
    fits = (
        down.shape[1:] == weight.shape[1:]
        and up.shape[:2] == (weight.shape[0], down.shape[0])
        and up.shape[2:] in ((), (1, 1))
    )
    return (down if fits else None), up.flatten(1)


# --- the error for a LoRA that does not fit --------------------------------------------------------


def _mismatch_error(
    layers: Mapping[tuple[str, str], Mapping[str, Tensor]],
    missing: list[tuple[str, str]],
    misfit: list[str],
    unet: nn.Module,
    text_encoders: Mapping[str, nn.Module],
) -> CheckpointError:
    model_family = detect(unet.state_dict()).family
    model = FAMILY_NAMES.get(model_family, model_family)
    lora_family, evidence = _guess_lora_family(layers)
    lines = [f"this LoRA does not fit the given model ({len(layers)} layers in the LoRA):"]
    if missing:
        examples = ", ".join(f"{component}:{name}" for component, name in missing[:5])
        lines.append(f"  {len(missing)} name no layer of the model, e.g. {examples}")
    if misfit:
        lines.append(f"  {len(misfit)} have factors of the wrong shape, e.g. " + "; ".join(misfit[:3]))
    absent = sorted({component for component, _ in missing if component != "unet" and component not in text_encoders})
    if lora_family is not None and lora_family != model_family:
        lora = FAMILY_NAMES[lora_family]
        lines.append(f"The LoRA looks made for {lora} ({evidence}), but the UNet is {model}.")
        lines.append(f"Fix: use this LoRA with a {lora} model, or pick a LoRA trained for {model}.")
    elif absent:
        encoders = ", ".join(f"{component!r}: ..." for component in absent)
        lines.append(f"Fix: the LoRA has text-encoder weights; pass read_lora(..., text_encoders={{{encoders}}}).")
    else:
        lines.append(f"Fix: check that the file is a LoRA for this {model} model and its configuration.")
    return CheckpointError("\n".join(lines))


def _guess_lora_family(layers: Mapping[tuple[str, str], Mapping[str, Tensor]]) -> tuple[str | None, str]:
    """The base model a LoRA was probably trained for, and why; for error messages only.

    The clues are architectural: SDXL has a second text encoder, an added-conditioning MLP
    (label_emb / add_embedding) and several transformer blocks per attention layer where SD1.x and
    SD2.x have one; the width of the text features read by cross-attention separates all three.
    """
    unet_names = [name.replace(".", "_") for component, name in layers if component == "unet"]
    if any(component == "te2" for component, _ in layers):
        return "sdxl", "it has weights for a second text encoder"
    for (component, name), parts in layers.items():
        width = parts["down"].shape[1]  # down of attn2.to_k / to_v: [rank, text feature width]
        if component == "unet" and re.search(r"attn2_to_[kv]$", name.replace(".", "_")):
            if width in TEXT_FEATURE_WIDTHS:
                return TEXT_FEATURE_WIDTHS[width], f"its cross-attention reads {width}-wide text features"
    if any(re.search(r"label_emb|add_embedding", name) for name in unet_names):
        return "sdxl", "it targets SDXL's added-conditioning embedding"
    if any(re.search(r"transformer_blocks_[1-9]", name) for name in unet_names):
        return "sdxl", "it targets a second transformer block in an attention layer; SD1.x and SD2.x have one"
    return None, ""


# --- merging ---------------------------------------------------------------------------------------


def merge(module: nn.Module, deltas: list[LowRank]) -> None:
    """Add each delta's ΔW to its target's weight in place: the LoRA then costs nothing per call.
    Works for any model and residuals, FLUX LoRAs (lora_flux.py) on output slices included. Weights kept
    in fp8 (`store_weights`) are refused: rounded to fp8, most of a LoRA's ΔW is lost (a ΔW of 1 % of W
    changes no entry); merge before storing them, or apply the LoRA per call."""
    _add_to_weights(module, deltas, sign=1.0)


def unmerge(module: nn.Module, deltas: list[LowRank]) -> None:
    """Subtract what `merge` added: W comes back within the rounding of W + ΔW in the weight's dtype
    (fp32: ~1e-7 of W; fp16 and bf16: a few units in the last place of W + ΔW, so more of W for a large ΔW)."""
    _add_to_weights(module, deltas, sign=-1.0)


@torch.no_grad()
def _add_to_weights(module: nn.Module, deltas: list[LowRank], sign: float) -> None:
    for delta in deltas:
        if delta.rows is not None or delta.region is not None:
            raise ValueError(
                f"the LowRank on {delta.target!r} is scoped to rows or a region, which a weight cannot "
                "express; apply it per call with Controls(low_rank=[...]) instead of merging"
            )
        weight = module.get_submodule(delta.target).weight
        if weight.element_size() == 1:
            raise ValueError(
                f"{delta.target}'s weight is kept in {weight.dtype}, where a LoRA's ΔW is mostly rounded away; merge "
                "before store_weights (sample.py does), or apply it per call with Controls(low_rank=[...])"
            )
        # W ± ΔW is formed in a wider dtype and rounded once (rather than ΔW rounded, then the sum).
        wide = torch.float64 if weight.dtype in (torch.float32, torch.float64) else torch.float32
        dense = replace(delta, down=delta.down.to(wide), up=delta.up.to(wide)).weight(out_features=weight.shape[0])
        dense = dense.view(weight.shape)  # a 1x1 conv's [out, in] from a down given as [r, in]
        weight.copy_(weight.to(wide) + sign * dense.to(weight.device))  # an offloaded weight stays in storage, its factors on the GPU
