"""Load a state dict only if it covers the model exactly, else say precisely what differs.

`load_state_dict(strict=True)` already refuses a mismatch, but its message is one long line of
hundreds of keys. `load_exact` checks names and shapes first (this works for a model built on the
meta device, whose tensors have shapes but no data) and raises a CheckpointError grouped by kind
and by block, so "the VAE file was given to the UNet" reads as such.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from minigen.loading.detect import CheckpointError
from minigen.storage import PLAIN_LAYERS, in_storage_dtype, store_weights

# Keys official single-file checkpoints carry that no inference module needs. They are dropped on
# purpose, never silently by accident: pass them as `ignore` to `load_exact`.
#   - ldm's DDPM noise schedule, registered as buffers of LatentDiffusion; minigen recomputes the
#     schedule in `minigen.sampling`.
#   - EMA bookkeeping (`model_ema.decay`, `model_ema.num_updates`) of training runs. The EMA shadows
#     of the UNet weights (`model_ema.diffusion_model…`) are not dropped: `sd.ema_keys` chooses them.
#   - sgm's `denoiser.sigmas`, the same schedule again as noise levels.
#   - CLIP's `position_ids`, an arange(77) buffer that newer transformers no longer save.
LDM_TRAINING_KEYS: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "model_ema.decay",
    "model_ema.num_updates",
    "denoiser.sigmas",
    "*position_ids",
)

LISTED_PER_KIND = 10  # keys shown per kind of problem before summarising the rest by block


def load_exact(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    ignore: Iterable[str] = (),
    dtype: torch.dtype | None = None,
    weights_dtype: torch.dtype | None = None,
) -> None:
    """Load `state_dict` into `module` if its keys and shapes match `module.state_dict()` exactly.

    ignore: fnmatch patterns (e.g. "model_ema.*") of checkpoint keys dropped on purpose.
    dtype: cast floating-point tensors to this dtype (integer buffers are kept).
    weights_dtype: cast the weights of the Linear/Conv2d layers `store_weights` stores to this dtype
    instead, so that they never exist in `dtype` (`build_exact` then stores the layers).
    Tensors are assigned, not copied (`assign=True`), so a model built on the meta device takes
    the checkpoint's storage. Non-persistent buffers are not in any state dict: a meta-built
    module must create those itself.
    """
    if weights_dtype is not None and dtype is None:
        raise ValueError("load_exact: weights_dtype stores the weights of a model that computes in dtype; give dtype too")
    ignore, stored = tuple(ignore), set()
    wanted = {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}
    given = {key: t for key, t in state_dict.items() if not any(fnmatch.fnmatchcase(key, p) for p in ignore)}

    floating = {key for key, tensor in module.state_dict().items() if tensor.is_floating_point()}
    missing = [key for key in wanted if key not in given]
    unexpected = [key for key in given if key not in wanted]
    mismatched = [
        f"{key}: checkpoint {list(given[key].shape)} vs model {list(wanted[key])}"
        for key in wanted
        if key in given and tuple(given[key].shape) != wanted[key]
    ] + [
        f"{key}: checkpoint dtype {given[key].dtype}, the model needs floating-point weights"
        for key in wanted
        if key in given and key in floating and not given[key].is_floating_point()
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            _report(type(module).__name__, missing=missing, unexpected=unexpected, mismatched=mismatched)
        )

    if weights_dtype is not None:  # a stored layer's weight goes straight to weights_dtype, never through dtype
        stored = {f"{path}.weight" for path, layer in module.named_modules() if type(layer) in PLAIN_LAYERS}
        given = {key: in_storage_dtype(key, t, weights_dtype) if key in stored else t for key, t in given.items()}
    if dtype is not None:
        given |= cast_floating({key: t for key, t in given.items() if key not in stored}, dtype)
    if bad := non_finite(given):
        raise CheckpointError(
            f"checkpoint for {type(module).__name__} has NaN or infinite values in {len(bad)} tensors, e.g. "
            f"{', '.join(bad[:3])}: the file is damaged, or was saved from a diverged run or an fp16 overflow; "
            "download it again or use another file"
        )
    module.load_state_dict(given, strict=True, assign=True)


def non_finite(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity: one sum per tensor, in float64
    (which no finite weights overflow, while a NaN or an infinity always reaches the sum); meta
    tensors, which hold no values, are skipped."""
    bad = []
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not tensor.is_meta:
            values = tensor if tensor.dtype.itemsize > 1 else tensor.float()  # fp8 tensors have no sum kernel
            if not values.sum(dtype=torch.float64).isfinite():
                bad.append(key)
    return bad


def build_exact(model_class, config, state_dict: Mapping[str, torch.Tensor], *, dtype=None, weights_dtype=None, ignore: Iterable[str] = ()):
    """`model_class(config)` built on the meta device, then given `state_dict` by `load_exact`. A config
    that builds no model (zero heads, groups that do not divide the channels) is a CheckpointError.
    With `weights_dtype` the model computes in `dtype` with its Linear/Conv2d weights stored in
    `weights_dtype` (`store_weights`), each read into it from the file: the model never exists whole in `dtype`."""
    try:
        with torch.device("meta"):
            model = model_class(config)
    except (ValueError, ArithmeticError, TypeError, RuntimeError) as error:
        raise CheckpointError(f"{config} does not build a {model_class.__name__}: {type(error).__name__}: {error}") from error
    load_exact(model, state_dict, ignore=ignore, dtype=dtype, weights_dtype=weights_dtype)
    return model if weights_dtype is None else store_weights(model, weights_dtype, dtype)  # its weights are in weights_dtype: no copy


def cast_floating(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to `dtype` (fp8 files are upcast this way); integer buffers kept."""
    return {key: t.to(dtype) if t.is_floating_point() else t for key, t in state_dict.items()}


def _report(model_name: str, *, missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    counts = [
        f"{len(missing)} missing keys" if missing else "",
        f"{len(unexpected)} unexpected keys" if unexpected else "",
        f"{len(mismatched)} shape mismatches" if mismatched else "",
    ]
    lines = [f"checkpoint does not fit {model_name}: " + ", ".join(c for c in counts if c)]
    sections = (
        ("missing (in the model, not in the checkpoint)", missing),
        ("unexpected (in the checkpoint, not in the model)", unexpected),
        ("shape mismatches", mismatched),
    )
    for title, keys in sections:
        if keys:
            lines.append(f"{title}:")
            lines += _summarize(keys)
    return "\n".join(lines)


def _summarize(keys: list[str]) -> list[str]:
    """The first keys in natural order, then how many more sit under each block."""
    keys = sorted(keys, key=_natural_order)
    lines = [f"  {key}" for key in keys[:LISTED_PER_KIND]]
    rest = keys[LISTED_PER_KIND:]
    if rest:
        blocks = Counter(_block_of(key) for key in rest)
        listed = ", ".join(f"{block} ({n})" for block, n in sorted(blocks.items(), key=lambda b: _natural_order(b[0])))
        lines.append(f"  ... and {len(rest)} more under: {listed}")
    return lines


def _block_of(key: str) -> str:
    """`input_blocks.4.1.proj_in.weight` -> `input_blocks.4`; `time_embed.0.bias` -> `time_embed`."""
    parts = key.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def _natural_order(key: str) -> list:
    """Sort `blocks.10` after `blocks.9`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]
