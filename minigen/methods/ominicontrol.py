"""OminiControl (Tan et al. 2024): a reference image as extra tokens of FLUX's joint attention.

The reference is encoded by FLUX's own autoencoder and packed like the image, then joins the
sequence as a token group `[text | image | condition]` with

    position ids   the reference's grid shifted right: by default its own width; the official subject
                   pipelines shift it by the image's width (W/16 columns: 32 at 512 px), so the two grids
                   lie side by side (`position_delta`; conceptrol.flux_concepts does this);
    timestep       0: the condition is a clean image whatever the step;
    LoRA           the subject LoRA on the condition's tokens only (never merged into the weights).

    condition = condition_group(pipe.vae, reference, size=512, lora=read_flux_lora("subject_512.safetensors", pipe.transformer))
    images = pipe.generate("a statue reading the book", extra=[condition], width=512, height=512, steps=8)

Conceptrol (minigen/methods/conceptrol.py) then biases the attention to this group by its name.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from minigen.controls import LowRank
from minigen.image import check_unit_range
from minigen.models.flux_tokens import TokenGroup, image_ids, pack_latents
from minigen.models.vae import AutoencoderKL
from minigen.storage import compute_device, compute_dtype


def condition_group(
    vae: AutoencoderKL,
    image: Tensor,
    *,
    size: int | None,
    lora: Sequence[LowRank] = (),
    name: str = "cond",
    position_delta: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> TokenGroup:
    """The condition token group of a reference `image` [1, 3, H, W] (or [3, H, W]) in [0, 1].

    size: the side the reference is resized to first, without cropping: the side the subject LoRA was
    trained at (the official subject_512: 512; toy-flux's: 64, its own side), None keeps the image's.
    Required: a LoRA given references of another side still runs, only worse. position_delta: the (row,
    column) shift of its position ids, default its own width in tokens (the official pipelines shift by
    the generated image's width: (0, width // 16)). generator: sample the autoencoder's posterior (as
    the official code does, from its own random state); None takes the posterior mean.
    """
    image = check_reference(image)
    if position_delta is not None:
        given = position_delta.tolist() if hasattr(position_delta, "tolist") else position_delta  # a tensor or a NumPy array
        pair = isinstance(given, Sequence) and len(given) == 2
        if not pair or any(isinstance(d, bool) or not isinstance(d, numbers.Real) for d in given):
            raise ValueError(f"position_delta is the (row, column) shift of the reference's position ids: give two numbers, got {position_delta!r}")
        position_delta = tuple(given)
    if size is not None:
        image = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    device, dtype = compute_device(vae), compute_dtype(vae)  # an offloaded VAE's parameters stay in CPU memory
    latents = vae.encode(image.to(device, dtype) * 2 - 1, generator=generator)  # [1, 16, h, w], shifted and scaled
    h, w = latents.shape[-2] // 2, latents.shape[-1] // 2  # 2x2 patches
    delta = (0, w) if position_delta is None else position_delta
    return TokenGroup(pack_latents(latents), image_ids(h, w, offset=delta), stream="img", timestep=0.0, lora=tuple(lora), name=name)


def check_reference(image: Tensor, name: str = "the reference image", *, or_path: bool = False) -> Tensor:
    """A reference image as [1, 3, H, W] (given so or as [3, H, W]) of finite floats in [0, 1]; the errors call it
    `name` (and say a file path is taken too where the caller reads one: `or_path`)."""
    if not isinstance(image, Tensor):
        raise TypeError(f"{name} is a {type(image).__name__}: give a tensor [1, 3, H, W] in [0, 1] (minigen.image.from_pil)"
                        + (" or a file path" if or_path else ""))
    image = image[None] if image.dim() == 3 else image
    if image.dim() != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"{name} must be one RGB image [1, 3, H, W] (or [3, H, W]) in [0, 1], got shape {list(image.shape)}")
    check_unit_range(image, name)
    return image
