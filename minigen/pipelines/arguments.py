"""What a generate call's arguments must be, and where a call starts: shared by the SD and FLUX pipelines.

Sizes (and the output size a starting image gives), finite numbers, tensors, the output kind, seeds (and one
generator per row, as A1111 seeds a batch), prompts and negatives given once or per row, negatives that
guidance would not read, pooled embeddings without their text embeddings, starting latents, and
`ImageStart`: the first step, the image's latent and the masks of an image-to-image or inpainting call,
and the sampling run from there. Each refusal names the argument and the fix.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from minigen.models.vae import AutoencoderKL
from minigen.sampling import Denoiser, FiniteCheck, InpaintDenoiser
from minigen.sampling.image_start import check_image, latent_mask, start_index


def check_size(width: int, height: int, multiple: int, reason: str) -> None:
    """Refuse an image size that is not a positive multiple of `multiple`, suggesting the nearest smaller one."""
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in (width, height)):
        raise TypeError(f"width and height take whole numbers of pixels, got {width!r} and {height!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    if width % multiple or height % multiple:
        raise ValueError(
            f"width and height must be multiples of {multiple} ({reason}), got {width}x{height}; "
            f"try {max(multiple, width // multiple * multiple)}x{max(multiple, height // multiple * multiple)}"
        )


def whole(value: object) -> bool:
    """A whole number (1024 or 1024.0), not a bool, NaN or infinity."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and int(value) == value


def output_size(image: Tensor | None, width: int | None, height: int | None, default: int) -> tuple[int, int]:
    """(width, height) of a call's images: as given, else the starting image's size, else `default` square."""
    if image is not None and image.dim() == 4:
        height, width = (image.shape[-2] if height is None else height), (image.shape[-1] if width is None else width)
    return (default if width is None else width), (default if height is None else height)


def check_output(output: str) -> None:
    """Refuse an `output=` other than "images" (decoded) or "latents" (before decoding)."""
    if output not in ("images", "latents"):
        raise ValueError(f"output must be 'images' or 'latents', got {output!r}")


def number(value: object) -> object:
    """A number argument as given, or a one-element tensor's value (`torch.tensor(7.5)` reads as 7.5)."""
    return value.item() if isinstance(value, Tensor) and value.numel() == 1 else value


def check_finite(**values: float | Tensor | None) -> None:
    """Refuse a number argument that is not a real number or a one-element tensor (text, a bool) or not finite
    (NaN, Inf), naming it; None is allowed (not given)."""
    for name, value in values.items():
        if value is None:
            continue
        value = number(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} takes a number, got {value!r:.40}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


def check_tensors(**values: Tensor | None) -> None:
    """Refuse a tensor argument given as something else (a NumPy array, a list), naming it; None is allowed."""
    for name, value in values.items():
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"{name} takes a torch tensor, got {type(value).__name__}: give a torch tensor "
                            "(torch.from_numpy(a) for a NumPy array)")


MAX_SEED = 2**32 - 1  # torch's CPU generator reads a seed's low 32 bits (5 and 5 + 2^32 draw the same noise); A1111's range too


def row_generators(seed: int, batch: int) -> list[torch.Generator]:
    """One CPU generator per image, image k seeded with seed + k (as AUTOMATIC1111 does): image k of a
    batch then gets the starting and step noise of a batch of one with seed + k."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed takes a whole number, got {type(seed).__name__} {seed!r:.40}; to draw from a generator of your own, "
                        "pass latents= drawn with it")
    if not 0 <= seed <= MAX_SEED + 1 - batch:
        raise ValueError(f"seed {seed}: image k draws with seed + k, which must stay within 0 .. 2^32 - 1 (torch's CPU generator "
                         "reads a seed's low 32 bits: seeds 5 and 5 + 2^32 would draw the same noise)")
    return [torch.Generator().manual_seed(int(seed) + k) for k in range(batch)]


def per_row(text: str | Sequence[str], batch: int, name: str) -> list[str]:
    """One text per image: a string for every image, or a list of `batch` strings (diffusers' lists)."""
    if isinstance(text, str):
        return [text] * batch
    texts = list(text) if isinstance(text, Sequence) else None  # None (diffusers' "no negative"): say so
    if texts is None or len(texts) != batch or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} is a string ('' for none), or a list of {batch} strings (one per image); got {text!r}")
    return texts


def prompt_list(prompt: str | Sequence[str]) -> list[str]:
    """The prompts of a call: one string, or a non-empty list of them (one per image)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, Iterable) else []
    if not prompts or not all(isinstance(text, str) for text in prompts):
        raise ValueError(f"prompt is a string or a non-empty list of strings, got {prompt!r:.60}")
    return prompts


def no_text(text: str | Sequence[str] | Tensor | None) -> bool:
    """Whether `text` gives no text: None, "" or a list of "" (one per image)."""
    return text is None or (isinstance(text, Sequence) and all(t == "" for t in text))  # a string's characters are never ""


def refuse_unread_negatives(guidance: str, setting: str, **negatives: str | Sequence[str] | Tensor | None) -> None:
    """Refuse negatives (text or embeddings; "" or a list of "" is none) given to a call whose `guidance` is off
    (`setting` = 1): nothing would read them."""
    for name, value in negatives.items():
        if not no_text(value):
            raise ValueError(f"{name} is read by {guidance}, which {setting}=1 turns off: use {setting} > 1 or drop it")


def refuse_lone_pooled(prompt_embeds: Tensor | None, pooled_prompt_embeds: Tensor | None, negative_prompt_embeds: Tensor | None,
                       negative_pooled_prompt_embeds: Tensor | None) -> None:  # fmt: skip
    """Refuse a pooled embedding given without the text embeddings it goes with: the pooled embedding of a
    prompt given as text is encoded from that text, so the given one would be ignored."""
    for name, pooled, embeds in (("", pooled_prompt_embeds, prompt_embeds), ("negative_", negative_pooled_prompt_embeds, negative_prompt_embeds)):
        if pooled is not None and embeds is None:
            raise ValueError(f"{name}pooled_prompt_embeds goes with {name}prompt_embeds: without them the pooled embedding is encoded "
                             f"from the {'negative' if name else 'prompt'}'s text and this one would not be read; pass {name}prompt_embeds too, or drop it")  # fmt: skip


def check_latents(latents: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Refuse starting latents whose shape is not [batch, channels, height/f, width/f] of this call."""
    if tuple(latents.shape) != shape:
        raise ValueError(
            f"latents of shape {list(latents.shape)} do not fit this call, which needs {list(shape)} "
            "(batch, latent channels, height and width divided by the VAE's factor); pass width and height to match"
        )
    return latents


@dataclass
class ImageStart:
    """Where a call starts: the first sigma's index, the image's latent x0, the latent mask of the
    blending (plain UNets) and the extra input channels of an inpainting UNet. Text to image: index 0
    and nothing else."""

    first: int = 0
    x0: Tensor | None = None  # [B, C, h, w]
    blend: Tensor | None = None  # [B, 1, h, w], 1 = sample, 0 = keep x0
    concat: Tensor | None = None  # [B, 1 + C, h, w] (inpainting UNets)

    @staticmethod
    @torch.no_grad()
    def of(vae: AutoencoderKL, device: torch.device, image: Tensor | None, mask: Tensor | None, strength: float | None,
           batch: int, width: int, height: int, steps: int, *, inpainting: bool = False, flow: bool = False) -> ImageStart:  # fmt: skip
        """The start of a call given its image, mask and strength (see `StableDiffusion.generate`);
        `flow`: strength counts steps as diffusers' flow-matching pipelines do (`start_index`)."""
        if image is None:
            if mask is not None or strength is not None:
                raise ValueError(f"{'mask' if mask is not None else 'strength'} needs an image to start from: pass image=")
            if not inpainting:
                return ImageStart()
            image, strength = torch.zeros(1, 3, height, width), 1.0
        image = check_image(image, batch, width, height).to(device)  # [1 or B, 3, H, W]; what it is, before what to do with it
        strength = (1.0 if mask is not None else 0.75) if strength is None else strength
        first = start_index(steps, number(strength), flow=flow)
        x0 = vae.encode_images(image).expand(batch, -1, -1, -1)  # one image given for every row is encoded once
        factor = vae.config.downsample_factor
        pixels = torch.ones(1, 1, height, width) if mask is None else check_image(mask, batch, width, height, "mask", channels=1)
        pixels = pixels.to(device)  # [1 or B, 1, H, W]
        masked = latent_mask(pixels, (height // factor, width // factor)).expand(batch, -1, -1, -1)
        if not bool(masked.flatten(1).amax(1).all()):  # a row would come back as its image, untouched
            raise ValueError(f"the mask of a row marks nothing to repaint at the latent grid ({width // factor}x{height // factor}): "
                             "white (>= 0.5) marks what is redrawn")
        if not inpainting:
            return ImageStart(first, x0, None if mask is None else masked)
        kept = image * (pixels < 0.5) + 0.5 * (pixels >= 0.5)  # the masked pixels grey (0 in the VAE's [-1, 1]); [1 or B, 3, H, W]
        return ImageStart(first, x0, None, torch.cat([masked, vae.encode_images(kept).expand(batch, -1, -1, -1)], dim=1))

    def sample(self, sampler: Callable[..., Tensor], model: Denoiser, noise: Tensor, sigmas: Tensor, *, pure: Tensor,
               noised: Callable[[Tensor, Tensor, Tensor], Tensor], **sampler_args) -> Tensor:  # fmt: skip
        """The final latent of `sampler` over `sigmas` (already cut at this start's first step) from this start.

        `pure` is where text to image starts (the noise at sigmas[0] in the model family's form), `noised` the
        family's forward process, which noises the image's latent to sigmas[0] otherwise. With a blend mask the
        denoiser is wrapped for inpainting and the final latent blended once more; every call of the denoiser is
        checked for NaN and Inf (`FiniteCheck`)."""
        inpaint = None
        if self.blend is not None:  # from pure noise (strength 1), the first call sees it unblended, as diffusers'
            model = inpaint = InpaintDenoiser(model, self.x0.to(noise.device), self.blend.to(noise.device), noise, noised, blend_first=self.first > 0)
        model = FiniteCheck(model, len(sigmas) - 1)
        x = pure if self.first == 0 else noised(self.x0.to(noise.device), noise, sigmas[0])  # part-way down from the image (SDEdit)
        if len(sigmas) > 1:
            x = sampler(model, x, sigmas, **sampler_args)
        return x if inpaint is None else inpaint.blend(x)
