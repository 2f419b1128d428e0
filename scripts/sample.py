"""Generate an image from a prompt.

    python scripts/sample.py --model sd15 --prompt "a photo of a corgi on the beach"
    python scripts/sample.py --model /models/sd_xl_base_1.0.safetensors --prompt "..." --steps 30
    python scripts/sample.py --model sd15 --prompt "..." --lora my_style.safetensors:0.8

--model takes a preset name (sd15, sdxl), a Hugging Face hub id, a single checkpoint file or a
diffusers folder. The PNG carries the prompt and settings (A1111-style `parameters` text).
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

import torch

from minigen.image import next_free_path, save_png, to_pil
from minigen.loading.lora_files import merge, read_lora
from minigen.loading.sd import HUB_IDS, load_sd
from minigen.sampling import SAMPLERS

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def lora_argument(text: str) -> tuple[str, float]:
    """`path[:scale]` -> (path, scale); the scale defaults to 1."""
    path, colon, scale = text.rpartition(":")
    try:
        return (path, float(scale)) if colon else (text, 1.0)
    except ValueError:  # a colon inside the path itself
        return text, 1.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help=f"preset ({', '.join(HUB_IDS)}), hub id, single file or diffusers folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: the model's native size)")
    parser.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--sampler", default="euler", choices=sorted(SAMPLERS))
    parser.add_argument("--karras", action="store_true", help="Karras sigma schedule")
    parser.add_argument("--seed", type=int, help="random when omitted (and printed)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lora", action="append", default=[], type=lora_argument, metavar="PATH[:SCALE]",
                        help="kohya or peft/diffusers LoRA, merged at SCALE (default 1); repeatable")
    parser.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin files (only if you trust them)")
    parser.add_argument("--out", type=Path, help="output PNG (default: outputs/minigen-NNNNN.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.model is None:
        sys.exit(
            "No --model given. Pass a preset (sd15, sdxl), a Hugging Face hub id such as "
            "stable-diffusion-v1-5/stable-diffusion-v1-5, a single .safetensors checkpoint, or a diffusers folder."
        )
    if args.out is not None and args.out.exists() and not args.overwrite:
        sys.exit(f"{args.out} exists; choose another --out or pass --overwrite")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    if args.seed is None:
        print(f"seed: {seed}")

    pipe = load_sd(args.model, dtype=DTYPES[args.dtype], device=args.device, allow_pickle=args.allow_pickle)
    for path, scale in args.lora:
        encoders = {f"te{i + 1}": encoder for i, encoder in enumerate(pipe.text_encoders)}
        lora = read_lora(path, unet=pipe.unet, text_encoders=encoders, scale=scale)
        merge(pipe.unet, lora.unet)
        for name, deltas in lora.text.items():
            merge(encoders[name], deltas)

    images = pipe.generate(
        args.prompt, args.negative, width=args.width, height=args.height, steps=args.steps, cfg=args.cfg,
        sampler=args.sampler, karras=args.karras, seed=seed,
    )
    settings = {
        "prompt": args.prompt,
        "negative": args.negative,
        "steps": args.steps,
        "sampler": args.sampler + (" karras" if args.karras else ""),
        "cfg_scale": args.cfg,
        "seed": seed,
        "size": f"{images.shape[-1]}x{images.shape[-2]}",
        "model": str(args.model),
        "lora": ", ".join(f"{Path(p).name}:{s}" for p, s in args.lora) or None,
        "dtype": args.dtype,
    }
    out = save_png(to_pil(images)[0], args.out or next_free_path("outputs"), settings, overwrite=args.overwrite)
    print(f"saved {out}")
    return out


if __name__ == "__main__":
    main()
