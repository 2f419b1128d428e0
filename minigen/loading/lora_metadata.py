"""The LoRA scale a peft/diffusers file keeps in its metadata instead of `.alpha` tensors.

diffusers' `save_lora_weights(..., unet_lora_adapter_metadata=..., transformer_lora_adapter_metadata=...)`
(what its training scripts call) writes each model's peft `LoraConfig` as JSON under the metadata key
"lora_adapter_metadata", each field prefixed by the model it is for:

    {"transformer.r": 16, "transformer.lora_alpha": 32, "transformer.alpha_pattern": {}, ...}

(a single model's `save_lora_adapter` writes the fields without the prefix). diffusers builds the adapter
from these fields, not from the tensors, so a layer's scale is peft's:

    scale = lora_alpha / r                 (lora_alpha / sqrt(r) with use_rslora)

where `alpha_pattern` / `rank_pattern` give a module its own alpha / r when a pattern matches the end
of its name. Such files hold no `.alpha` tensors: read without the metadata, every layer would get
scale 1 (alpha = rank), silently. DoRA (`use_dora`) needs magnitude vectors minigen does not apply,
so it is refused.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor

from minigen.loading.files import CheckpointError

KEY = "lora_adapter_metadata"
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8}  # peft's LoraConfig defaults, for a field the file leaves out


@dataclass(frozen=True)
class AdapterScale:
    """One model's LoRA scale fields, as peft's LoraConfig holds them."""

    r: int
    lora_alpha: float
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False

    def rank(self, module: str) -> int:
        """The rank the config gives the LoRA on `module` (its name in the file, without the model prefix)."""
        return self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r)

    def of(self, module: str) -> float:
        """The scale of the LoRA on `module`."""
        r, alpha = self.rank(module), self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def layer_scale(name: str, parts: Mapping[str, Tensor], config: AdapterScale | None) -> float:
    """The scale of one layer of a LoRA file (`parts`: its "down", "up" and maybe "alpha" tensors): peft's
    from diffusers' metadata `config` where the file has one, else alpha / rank from its `.alpha` tensor
    (none: 1). A file with both, or whose metadata gives the layer another rank than its factors have, is
    refused, as diffusers refuses it; so is a rank of 0, and an alpha that is not one positive number
    (kohya's sd-scripts read an alpha of 0 as the rank, diffusers and ComfyUI as a LoRA that does nothing)."""
    rank = parts["down"].shape[0]
    if rank == 0:
        raise CheckpointError(f"{name}: its factors have rank 0 (shapes {list(parts['down'].shape)}, {list(parts['up'].shape)}); "
                              "the file is damaged. Fix: re-export the LoRA")
    if config is None:
        alpha = _alpha(name, parts["alpha"]) if "alpha" in parts else rank
        return alpha / rank
    if "alpha" in parts:
        raise CheckpointError(f"{name} has an .alpha tensor, and the file's metadata {KEY} scales it too: diffusers refuses "
                              "such a file. Fix: remove the .alpha tensors or the metadata, whichever its trainer did not write")
    if config.rank(name) != rank:
        raise CheckpointError(f"{name}: its factors have rank {rank}, but the file's metadata {KEY} gives it rank "
                              f"{config.rank(name)}; the file is inconsistent. Fix: write the metadata of the rank trained")
    scale = config.of(name)
    if not scale > 0 or not math.isfinite(scale):
        raise CheckpointError(f"{name}: the file's metadata {KEY} gives it alpha {scale * config.rank(name):g}, which scales it by "
                              f"{scale:g}; an alpha must be a positive number. Fix: write the alpha trained")
    return scale


def _alpha(name: str, alpha: Tensor) -> float:
    """The one positive number of a layer's `.alpha` tensor (0-d or [1])."""
    if alpha.numel() != 1:
        raise CheckpointError(f"{name}.alpha holds {alpha.numel()} numbers (shape {list(alpha.shape)}), not one; the file is damaged")
    value = float(alpha)
    if not value > 0 or not math.isfinite(value):
        raise CheckpointError(f"{name}.alpha is {value:g}: an alpha must be a positive number (kohya's sd-scripts read 0 as the "
                              "rank, diffusers as a LoRA that does nothing, so minigen reads neither). Fix: set it to the alpha "
                              "trained, or to the rank for a scale of 1")
    return value


def pattern_key(patterns: Mapping[str, object], module: str) -> str | None:
    """The first pattern that matches the end of `module` at a name boundary (peft's get_pattern_key)."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


def adapter_scales(metadata: Mapping[str, str], models: tuple[str, ...]) -> dict[str, AdapterScale]:
    """{model: AdapterScale} for the `models` (their prefixes, e.g. "unet", "text_encoder") whose fields
    the file's metadata holds; every model gets the unprefixed fields of a single-model file. {} when the
    file has no such metadata."""
    if KEY not in metadata:
        return {}
    try:
        fields = json.loads(metadata[KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"metadata {KEY} is not valid JSON ({error}); the file is damaged") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"metadata {KEY} must be a JSON object of peft LoraConfig fields; got {type(fields).__name__}")
    own = {model: {k.removeprefix(f"{model}."): v for k, v in fields.items() if k.startswith(f"{model}.")} for model in models}
    shared = {k: v for k, v in fields.items() if "." not in k}
    return {model: _scale(model, {**shared, **own[model]}) for model in models if own[model] or shared}


def _scale(model: str, config: dict) -> AdapterScale:
    if config.get("use_dora"):
        raise CheckpointError(f"this is a DoRA (use_dora for the {model} in metadata {KEY}); minigen applies plain LoRAs "
                              "only. Fix: merge it into the weights with the trainer, or pick a plain LoRA")
    try:
        scale = AdapterScale(
            r=int(config.get("r", PEFT_DEFAULTS["r"])),
            lora_alpha=float(config.get("lora_alpha", PEFT_DEFAULTS["lora_alpha"])),
            rank_pattern={str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()},
            use_rslora=bool(config.get("use_rslora", False)),
        )
    except (TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"metadata {KEY}: {model}'s r, lora_alpha, rank_pattern or alpha_pattern cannot be read ({error})") from None
    if scale.r < 1 or any(r < 1 for r in scale.rank_pattern.values()):
        raise CheckpointError(f"metadata {KEY}: {model}'s rank must be 1 or more; got r={scale.r}, rank_pattern={scale.rank_pattern}")
    return scale
