"""Images in and out: tensor <-> PIL, and PNGs that carry their settings.

A saved PNG holds an A1111-style `parameters` text chunk (read by most image viewers and web UIs)
and the same settings as JSON in a `minigen` chunk. Existing files are never overwritten unless
asked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> list of RGB PIL images."""
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def from_pil(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def a1111_parameters(settings: dict) -> str:
    """The `parameters` text of A1111: prompt, `Negative prompt:` line, then `Key: value, ...`."""
    rest = {k: v for k, v in settings.items() if k not in ("prompt", "negative") and v is not None}
    lines = [settings.get("prompt", "")]
    if settings.get("negative"):
        lines.append(f"Negative prompt: {settings['negative']}")
    lines.append(", ".join(f"{k.replace('_', ' ').capitalize()}: {v}" for k, v in rest.items()))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, settings: dict, *, overwrite: bool = False) -> Path:
    """Write `image` to `path` with its settings in the PNG text chunks."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another output path or allow overwriting (--overwrite)")
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(settings))
    info.add_text("minigen", json.dumps(settings))
    image.save(path, pnginfo=info)
    return path


def next_free_path(folder: str | Path, stem: str = "minigen") -> Path:
    """`folder/stem-00000.png`, counting up past the files already there."""
    folder = Path(folder)
    taken = {p.name for p in folder.glob(f"{stem}-*.png")} if folder.exists() else set()
    index = 0
    while f"{stem}-{index:05d}.png" in taken:
        index += 1
    return folder / f"{stem}-{index:05d}.png"
