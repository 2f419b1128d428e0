"""Starting from an image: image-to-image (SDEdit) and inpainting by masked latent blending.

Image-to-image (Meng et al. 2022, "SDEdit") noises the image's latent x0 to a level part-way down the
schedule and samples from there. `strength` in [0, 1] is the share of the steps that run, counted as
diffusers counts them: of `steps` sigmas s_0 > ... > s_steps = 0, the last int(steps * strength) steps
run for the SD family, and steps - int(steps - steps * strength) (one more where steps * strength is not
whole) for flow matching (diffusers' FLUX and SD3 pipelines), from

    start = steps - int(steps * strength)  or  int(steps - steps * strength)      x = noised(x0, noise, s_start)

where `noised` is the model family's forward process: x0 + sigma * noise for the SD family (the
variance-exploding form the samplers work in), (1 - sigma) * x0 + sigma * noise for flow matching.
Strength 0 runs no step and returns x0; strength 1 starts from the noise alone, exactly as text-to-image
does (for the SD family that start is noise * sqrt(s_0^2 + 1), not x0 + s_0 * noise, as diffusers'
inpainting pipeline also does at strength 1), so the image of strength 1 is the text-to-image image of
the same seed.

Inpainting by masked latent blending works with any model. `mask` is 1 where the image is repainted
and 0 where it is kept. Every call of the denoiser sees, outside the mask, the known latent noised to
the current sigma with the run's own noise (but the first, when sampling starts from pure noise at
strength 1: it sees that noise everywhere, as in diffusers), and its output there is replaced by the
known latent:

    x' = m * x + (1 - m) * noised(x0, noise, sigma)
    D' = m * D(x', sigma) + (1 - m) * x0

so the kept region follows the path of the image itself while the masked region is sampled, and the
two meet through the network's view of the whole latent at every step (this is ComfyUI's
KSamplerX0Inpaint; diffusers blends once per step after the scheduler, which for Euler gives the same
path). Every sampler then works unchanged, and the final latent is blended once more, so the kept
region is x0 exactly and the decoded pixels differ from the input only by the autoencoder's error.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .denoisers import Denoiser, per_sample_sigma

Noised = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x0, noise, sigma [B, 1, 1, 1]) -> x at sigma


def noised_ve(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """The SD family's noisy latent in sigma form: x = x0 + sigma * noise."""
    return x0 + sigma * noise


def noised_flow(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """Flow matching's point on the line from x0 (sigma 0) to the noise (sigma 1)."""
    return (1 - sigma) * x0 + sigma * noise


def start_index(steps: int, strength: float, *, flow: bool = False) -> int:
    """Index of the first sigma to sample from, as diffusers' pipelines count it: `steps - int(steps *
    strength)` for the SD family, `int(steps - steps * strength)` for flow matching (`flow`)."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:  # NaN too
        raise ValueError(f"strength must be a number in [0, 1] (0 keeps the image, 1 repaints it all), got {strength!r}")
    first = int(max(steps - min(steps * strength, steps), 0)) if flow else steps - min(int(steps * strength), steps)
    if first == steps and strength > 0:  # as diffusers refuses it: the image would come back untouched
        raise ValueError(f"strength {strength} of {steps} steps runs no step (int(steps * strength) = 0): give a strength of at "
                         f"least {1 / steps:.3g} or more steps (strength 0 keeps the image on purpose)")
    return first


def check_image(image: Tensor, batch: int, width: int, height: int, what: str = "image", channels: int = 3) -> Tensor:
    """`image` [1 or batch, channels, height, width] in [0, 1], returned as given; refused otherwise."""
    if image.dim() != 4 or image.shape[1] != channels or image.shape[0] not in (1, batch):
        raise ValueError(
            f"{what} must be a tensor [{'1' if batch == 1 else f'1 or {batch}'}, {channels}, H, W] in [0, 1], got shape {list(image.shape)}"
        )
    if tuple(image.shape[-2:]) != (height, width):
        raise ValueError(
            f"{what} is {image.shape[-1]}x{image.shape[-2]} but the call makes {width}x{height} images; "
            "resize it first or leave width and height out (they default to the image's size)"
        )
    if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
        hint = f"; this {image.dtype} tensor reaches {image.max().item()}: from 0-255 pixels, give image.float() / 255" if not image.is_floating_point() else ""
        raise ValueError(f"{what} must hold finite values in [0, 1] (the pipelines' image range){hint}")
    return image


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """A pixel mask [B, 1, H, W] (1 = repaint) binarized at 0.5 and resized to the latent grid, as
    diffusers' inpainting pipelines prepare it. [B, 1, h, w] float, values 0 or 1."""
    return F.interpolate((mask >= 0.5).float(), size=size, mode="nearest")


class InpaintDenoiser:
    """A denoiser that samples only inside `mask` [B, 1, h, w] and keeps the known latent `x0` outside
    it (see the module docstring). `noise` is the run's starting noise (unit variance) and `noised` the
    family's forward process (`noised_ve` or `noised_flow`). `blend_first=False` leaves the first call's
    input as the sampler gives it (a run from pure noise); one object serves one run."""

    def __init__(self, denoiser: Denoiser, x0: Tensor, mask: Tensor, noise: Tensor, noised: Noised, *, blend_first: bool = True) -> None:
        self.denoiser, self.x0, self.mask, self.noise, self.noised = denoiser, x0, mask, noise, noised
        self.blend_next = blend_first  # whether the next call's input is blended; every call after the first is

    def __call__(self, x: Tensor, sigma: Tensor, *, step: int | None = None, **extra_args: Any) -> Tensor:
        if self.blend_next:
            s = per_sample_sigma(sigma, x).view(-1, 1, 1, 1)
            x = self.mask * x + (1 - self.mask) * self.noised(self.x0, self.noise, s)
        self.blend_next = True
        return self.blend(self.denoiser(x, sigma, step=step, **extra_args))

    def blend(self, x: Tensor) -> Tensor:
        """`x` inside the mask, the known latent outside."""
        return self.mask * x + (1 - self.mask) * self.x0
