"""Images in and out: tensor <-> PIL, PNGs that carry their settings, and the vision towers' input.

A saved PNG holds an A1111-style `parameters` text chunk (read by most image viewers and web UIs)
and the same settings as JSON in a `minigen` chunk. Files are written atomically, and existing
files are never overwritten unless asked. `preprocess_siglip` turns images into the input of the SigLIP tower that FLUX Redux reads,
`preprocess_clip` into that of the CLIP towers IP-Adapter reads (`normalize_clip` its last step, for
pixels already at the tower's size). `PLOT_COLORS` is the palette the scripts' figures share.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps, PngImagePlugin

from minigen.loading.files import check_output_path, take_free_name, write_temporary

# matplotlib's tab10, one color per line of a figure
PLOT_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> list of RGB PIL images."""
    array = (images.clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def read_image(path: str | Path, flag: str = "image") -> Image.Image:
    """The RGB image in the file at `path`, as an image viewer shows it: turned upright by its EXIF
    orientation, 16-bit channels scaled to 8 bits, transparent parts on white (`on_white`). A missing
    file is a FileNotFoundError, one cut short or no image a ValueError, each naming `flag` (a script's
    option, e.g. "--image") and the file."""
    return on_white(_open(path, flag))


def read_square(path: str | Path, size: int, flag: str = "image") -> torch.Tensor:
    """[3, size, size] in [0, 1]: the image at `path` (as `read_image` reads it), its centred square resized
    with PIL's bicubic filter; how the training scripts read their images."""
    image = read_image(path, flag)
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return from_pil(image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC))[0]


def read_mask(path: str | Path, flag: str = "mask") -> Image.Image:
    """An inpainting mask file (read as `read_image` reads images), redrawn where AUTOMATIC1111 redraws:
    where the alpha of an image with transparency (a mask painted on a transparent layer) is above 128,
    else where the grey level is 128 or more (`generate` binarizes a mask at 0.5 too). Returned binary
    ("L", 0 or 255) and used for both steps, the drawing and the pasting back (A1111 pastes back through
    a soft grey, minigen through this mask blurred by --mask-blur): a grey or coloured mask is neither
    half drawn nor half pasted over."""
    image = _open(path, flag)
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):  # A1111's create_binary_mask
            return alpha.point(lambda value: 255 if value > 128 else 0)
    return image.convert("L").point(lambda value: 255 if value >= 128 else 0)


def _open(path: str | Path, flag: str) -> Image.Image:
    """The image in the file at `path`, upright (`ImageOps.exif_transpose`, as diffusers' load_image and
    A1111 read photos) and with 8-bit channels: 16-bit grey ("I;16", a 16-bit PNG) is scaled by 255 / 65535;
    32-bit integer and float images, whose range no file states, are refused."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path} does not exist" + (" (it is a folder)" if Path(path).is_dir() else ""))
    try:
        with Image.open(path) as image:
            png = image.format == "PNG"  # whose integer images are 16-bit (older Pillow opens them as "I")
            image = ImageOps.exif_transpose(image)  # a loaded copy, upright
    except (OSError, SyntaxError) as error:  # PIL's errors for a file that is no image, or one cut short
        raise ValueError(f"{flag} {path}: cannot be read as an image ({type(error).__name__}: {error})") from None
    if image.mode.startswith("I;16") or (image.mode == "I" and png):
        grey = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().astype(np.uint8), "L")
        if isinstance(image.info.get("transparency"), int):  # the one grey level drawn transparent, in 8 bits too
            grey.info["transparency"] = round(image.info["transparency"] / 257)
        return grey
    if image.mode in ("I", "F"):
        raise ValueError(f"{flag} {path}: a {'32-bit integer' if image.mode == 'I' else 'floating-point'} image, whose range "
                         "of values the file does not state; save it as an 8-bit or 16-bit PNG")
    return image


def on_white(image: Image.Image) -> Image.Image:
    """`image` in RGB, its transparent parts laid on white, as transformers' image processors convert
    (`convert_to_rgb`) and image viewers show them; an image without transparency is only converted."""
    if image.mode == "RGB":
        return image
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")


def from_pil(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def paste_outside(generated: Image.Image, original: Image.Image, mask: Image.Image, blur: float = 4) -> Image.Image:
    """Inpainting's last step in AUTOMATIC1111 (its default "mask blur" 4): the original pixels pasted
    back outside the mask (white = repainted), through the mask blurred by a Gaussian of radius `blur`,
    so the kept region is the input exactly, not its trip through the autoencoder."""
    alpha = mask.convert("L").resize(generated.size, Image.NEAREST)
    if blur > 0:
        alpha = alpha.filter(ImageFilter.GaussianBlur(blur))
    return Image.composite(generated.convert("RGB"), original.convert("RGB").resize(generated.size, Image.LANCZOS), alpha)


# A1111's names for the settings it knows (its PNG Info and "send to txt2img" read these words), and
# for minigen's samplers (`sampler` + " karras" in the settings).
A1111_KEYS = {"steps": "Steps", "sampler": "Sampler", "cfg_scale": "CFG scale", "seed": "Seed", "size": "Size",
              "model_hash": "Model hash", "model": "Model", "vae": "VAE",
              "strength": "Denoising strength", "mask_blur": "Mask blur", "clip_skip": "Clip skip",
              "guidance": "Distilled CFG Scale", "lora": "Lora", "dtype": "Dtype", "aligngen": "AlignGen",
              "ip_adapter": "IP-Adapter", "omini": "OminiControl", "ip_scale": "IP scale", "hashes": "Hashes", "ema": "EMA"}  # fmt: skip
# The order A1111's create_infotext writes its own settings in (Forge's "Distilled CFG Scale" after the CFG
# scale, as Forge writes it); the others follow, in the order given.
A1111_ORDER = ("steps", "sampler", "cfg_scale", "guidance", "seed", "size", "model_hash", "model", "vae", "strength", "clip_skip")
A1111_SAMPLERS = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_sde": "DPM++ SDE", "ddim": "DDIM", "unipc": "UniPC", "lcm": "LCM",
    "flow euler": "Euler",
}  # fmt: skip


def a1111_sampler(name: str) -> str:
    """minigen's sampler setting ("dpmpp_2m karras") in A1111's words ("DPM++ 2M Karras")."""
    base, karras = name.removesuffix(" karras"), name.endswith(" karras")
    return A1111_SAMPLERS.get(base, base) + (" Karras" if karras else "")


def one_line(text) -> str:
    """`text` with its line breaks turned into spaces."""
    return " ".join(str(text).splitlines())


def a1111_quote(value) -> str:
    """A value as A1111 writes it: as is, or as a JSON string when it holds a comma, a colon or a quote,
    so that no value can split the `Key: value, ...` line."""
    text = one_line(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"') else text


def a1111_parameters(settings: dict) -> str:
    """The `parameters` text of A1111: prompt, `Negative prompt:` line, then `Key: value, ...`.

    Keys are A1111's words where it has one (`A1111_KEYS`), A1111's own first and in its order
    (`A1111_ORDER`), values are quoted as A1111 quotes them,
    and line breaks inside a prompt or a value become spaces: no text can forge a `Negative prompt:`
    line or a setting (the JSON chunk keeps everything exactly).
    """
    rest = {k: v for k, v in settings.items() if k not in ("prompt", "negative") and v is not None}
    rest = {**{k: rest[k] for k in A1111_ORDER if k in rest}, **rest}  # A1111's keys first, in its order
    if "sampler" in rest:
        rest["sampler"] = a1111_sampler(rest["sampler"])
    lines = [one_line(settings.get("prompt", ""))]
    if settings.get("negative"):
        lines.append(f"Negative prompt: {one_line(settings['negative'])}")
    lines.append(", ".join(f"{A1111_KEYS.get(k, k.replace('_', ' ').capitalize())}: {a1111_quote(v)}" for k, v in rest.items()))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, settings: dict, *, overwrite: bool = False) -> Path:
    """Write `image` to `path` with its settings in the PNG text chunks; returns where it went.

    The write is atomic: the PNG goes to a temporary file in the same folder, is flushed to disk,
    and only then takes its name, so `path` never holds a partial or empty file, even if the process
    is killed or the disk fills. A symlink at `path` is replaced (with `overwrite`), never followed.
    Without `overwrite`, a file that appeared at `path` meanwhile is kept, and the image is saved
    beside it as `<stem>-1.png` (then -2, ...): nothing is overwritten and nothing is lost.
    """
    path = check_output_path(path, overwrite=overwrite)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(settings))
    info.add_text("minigen", json.dumps(settings))
    temporary = write_temporary(path, lambda file: image.save(file, format="PNG", pnginfo=info))
    try:
        if overwrite:
            os.replace(temporary, path)
            return path
        for n in itertools.count():
            target = path if n == 0 else path.with_name(f"{path.stem}-{n}{path.suffix}")
            try:
                take_free_name(temporary, target)
                return target
            except FileExistsError:
                continue
    finally:
        temporary.unlink(missing_ok=True)


def next_free_path(folder: str | Path, stem: str = "minigen") -> Path:
    """`folder/stem-00000.png`, or the number after the highest one there (as A1111 numbers its images:
    a deleted image's number is not drawn into again, so the numbers keep the order the images were made)."""
    folder = Path(folder)
    found = [re.fullmatch(rf"{re.escape(stem)}-(\d+)\.png", p.name) for p in folder.glob(f"{stem}-*.png")] if folder.exists() else []
    return folder / f"{stem}-{max((int(m.group(1)) for m in found if m), default=-1) + 1:05d}.png"


SIGLIP_MEAN = SIGLIP_STD = 0.5  # pixels in [0, 1] -> [-1, 1]


def preprocess_siglip(images: Image.Image | Sequence[Image.Image] | torch.Tensor, size: int = 384) -> torch.Tensor:
    """Images -> SigLIP's input [B, 3, size, size] in [-1, 1]: squash-resize, then (x - 0.5) / 0.5.

    The aspect ratio is not kept (no crop, no padding), as in SiglipImageProcessor.
    PIL images: converted to RGB (transparency composited onto white), resized with PIL's bicubic
    filter on 8-bit pixels. This is exactly transformers' SiglipImageProcessor with the hub's
    settings (PIL backend, the one that existed when Redux was released).
    Tensors [B, 3, H, W] in [0, 1]: resized with torch's antialiased bicubic, the tensor twin of
    PIL's filter; the result is clipped to [0, 1] as PIL's 8-bit output is, and agrees with the
    PIL path up to 8-bit rounding.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, torch.Tensor):
        pixels = _resize_tensor(images, size)
    else:
        pixels = torch.cat([_resize_pil(image, size) for image in images])
    return (pixels - SIGLIP_MEAN) / SIGLIP_STD


def _resize_pil(image: Image.Image, size: int) -> torch.Tensor:
    """One PIL image -> [1, 3, size, size] in [0, 1]."""
    return from_pil(on_white(image).resize((size, size), Image.Resampling.BICUBIC))


def _resize_tensor(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected images as [B, 3, H, W], got shape {list(images.shape)}; add a batch axis with x[None]"
        )
    if not images.is_floating_point() or images.min() < 0 or images.max() > 1:
        raise ValueError(
            "expected float pixels in [0, 1]: convert uint8 images with x / 255 and [-1, 1] images "
            "(e.g. VAE decodes) with (x + 1) / 2"
        )
    resized = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp(0, 1)


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's, used by every CLIP image processor
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_clip(images: Image.Image | Sequence[Image.Image], size: int = 224) -> torch.Tensor:
    """Images -> CLIP's input [B, 3, size, size]: the shorter side resized to `size` (PIL bicubic on
    8-bit pixels), the center cropped to a square, normalized with OpenAI's mean and std; transparency
    composited onto white (`on_white`). This is transformers' CLIPImageProcessor with its defaults, as IP-Adapter uses it; the crop drops the
    edges of a non-square reference."""
    if isinstance(images, Image.Image):
        images = [images]
    pixels = []
    for image in images:
        image = on_white(image)
        width, height = image.size
        long = int(size * max(width, height) / min(width, height))  # transformers' rounding: 71x71 -> 224x224, not 224x223
        resized = (size, long) if width <= height else (long, size)
        image = image.resize(resized, Image.Resampling.BICUBIC)
        left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
        pixels.append(from_pil(image.crop((left, top, left + size, top + size))))
    return normalize_clip(torch.cat(pixels))


def normalize_clip(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [0, 1] -> normalized with OpenAI's mean and std, as every CLIP tower reads them."""
    mean, std = (torch.tensor(v, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1) for v in (CLIP_MEAN, CLIP_STD))
    return (pixels - mean) / std


def check_reference_images(images: torch.Tensor) -> None:
    """Refuse training references that are not a [N, 3, H, W] tensor (N >= 1) of finite values in [0, 1]."""
    if images.dim() != 4 or images.shape[1] != 3 or len(images) == 0:
        raise ValueError(f"reference images must be a [N, 3, H, W] tensor with N >= 1, got shape {list(images.shape)}")
    check_unit_range(images, "reference images")


def check_unit_range(images: torch.Tensor, what: str) -> None:
    """Refuse `what` (images) unless it holds floats, finite and in [0, 1] (to_tensor's range), saying what it holds."""
    if not images.is_floating_point():
        raise ValueError(f"{what} must hold floats in [0, 1], got {images.dtype}: divide 0-255 pixels by 255 (from_pil does)")
    if images.numel() and (not bool(torch.isfinite(images).all()) or images.min() < 0 or images.max() > 1):
        raise ValueError(f"{what} must hold finite values in [0, 1] (to_tensor's range, not 0-255 or [-1, 1]), got "
                         f"{images.min().item():g} to {images.max().item():g}")
