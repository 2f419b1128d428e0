"""Degradations that make a clean render look like a generated image, for validating the judge.

A generated 64x64 image differs from a render in softer edges, pixel noise, a shifted white balance
and compression or resampling artefacts. Each `DEGRADATIONS` entry reproduces one of them (and
"combined" a milder dose of all), deterministic for a seed:

    degraded = degrade(image, "blur")

JPEG keeps full-resolution chroma (4:4:4). The common 4:2:0 subsampling stores colour at 32x32,
which smears away 3-4 pixel pattern elements that differ from the body mostly in hue (purple dots
on blue); generated images do not carry that artefact, so the judge is not held to it.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

DEGRADATIONS: dict[str, str] = {
    "clean": "the render itself",
    "blur": "gaussian blur, sigma 1.0 px",
    "noise": "gaussian noise, sigma 10 (0-255 scale), per pixel and channel",
    "color_shift": "per-channel gain 0.9-1.1 and offset -20..20",
    "jpeg": "JPEG at quality 75, full-resolution chroma (4:4:4)",
    "rescale": "bicubic down to 40x40 and back up to 64x64",
    "combined": "blur 0.6 px, noise 5, gain 0.95-1.05 and offset -10..10, JPEG quality 75",
}


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0)  # 4:4:4, see DEGRADATIONS
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _shift_colors(image: Image.Image, rng: np.random.Generator, gain: float, offset: float) -> Image.Image:
    pixels = np.asarray(image, np.float32) * rng.uniform(1 - gain, 1 + gain, 3) + rng.uniform(-offset, offset, 3)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def _add_noise(image: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    pixels = np.asarray(image, np.float32) + rng.normal(0, sigma, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def degrade(image: Image.Image, kind: str, rng: int | np.random.Generator = 0) -> Image.Image:
    """``image`` degraded as named in `DEGRADATIONS`, deterministic for a seed."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    if kind == "clean":
        return image.copy()
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(1.0))
    if kind == "noise":
        return _add_noise(image, rng, 10.0)
    if kind == "color_shift":
        return _shift_colors(image, rng, 0.1, 20.0)
    if kind == "jpeg":
        return _jpeg(image, 75)
    if kind == "rescale":
        small = image.resize((40, 40), Image.Resampling.BICUBIC)
        return small.resize(image.size, Image.Resampling.BICUBIC)
    if kind == "combined":
        image = _add_noise(image.filter(ImageFilter.GaussianBlur(0.6)), rng, 5.0)
        return _jpeg(_shift_colors(image, rng, 0.05, 10.0), 75)
    raise ValueError(f"Unknown degradation {kind!r}; choose one of {tuple(DEGRADATIONS)}.")
