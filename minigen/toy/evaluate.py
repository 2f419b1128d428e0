"""Measure a toy model: autoencoder reconstruction and prompt following on the held-out prompts.

    python -m minigen.toy.evaluate --model toy-sd            # 200 held-out prompts, 25 steps
    python -m minigen.toy.evaluate --model toy-flux --n 50
    python -m minigen.toy.evaluate --model toy-sd --shape-only 1   # every object named by its shape word alone

reconstruction_psnr   PSNR (dB) of VAE encode -> decode on held-out renders (unseen color x shape pairs)
generate              one image per prompt, the same way for SD and FLUX pipelines
prompt_following_on   the judge reads each image; `metrics.attribute_report` scores it against the caption
                      (prompt following, with stated relations too, and per attribute: `metrics.attribute_table`)

Prompts and renders come from the world the model learnt: the layout its file states
(`minigen.loading.toy.toy_layout`; toy-flux's world is re-scoped to the canvas halves, weights/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from torch import Tensor

from minigen.cli import Parser, check_seeds, draw_seed, non_negative_float, positive_int, run
from minigen.pipelines.flux import FluxPipeline
from minigen.image import to_pil
from minigen.models.vae import AutoencoderKL

from . import captions, scenes
from .metrics import attribute_report, attribute_table

SD_CFG = 7.5  # the SD pipeline's own default


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, n: int = 200, seed: int = 0, layout: str = "anywhere") -> float:
    """Mean PSNR over ``n`` held-out renders of ``layout``, on 0..255 pixels rounded as a saved PNG would be."""
    prompts = captions.heldout_prompts(n, seed, layout=layout)
    truth = np.stack([np.asarray(scenes.render(scene).image) for scene, _ in prompts])
    x = torch.from_numpy(truth).permute(0, 3, 1, 2).float() / 127.5 - 1
    dtype = vae.decoder.conv_in.weight.dtype
    decoded = torch.cat([vae.decode_images(vae.encode(x[i : i + 50].to(dtype))) for i in range(0, n, 50)])
    pixels = np.stack([np.asarray(image, np.float64) for image in to_pil(decoded)])
    mse = ((pixels - truth) ** 2).reshape(n, -1).mean(1)
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def generate(pipe, prompts: list[str], *, steps: int = 25, cfg: float | None = None, seed: int = 0, batch: int = 50) -> Tensor:
    """[N, 3, H, W] images in [0, 1], in chunks of ``batch``; prompt i draws its noise from seed + i
    (the pipelines seed image k of a call with the call's seed + k), whatever the chunk size.

    cfg: classifier-free guidance scale (SD: `cfg`, default 7.5; FLUX: `true_cfg`, default the model's).
    """
    chunks = []
    for start in range(0, len(prompts), batch):
        part = prompts[start : start + batch]
        if isinstance(pipe, FluxPipeline):
            scale = pipe.default_cfg if cfg is None else cfg
            chunks.append(pipe.generate(part, steps=steps, true_cfg=scale, seed=seed + start, progress=False))
        else:
            chunks.append(pipe.generate(part, steps=steps, cfg=SD_CFG if cfg is None else cfg, seed=seed + start, progress=False))
    return torch.cat(chunks)


def prompt_following_on(
    pipe, n: int = 200, *, steps: int = 25, cfg: float | None = None, seed: int = 0, prompt_seed: int = 0,
    shape_only: float = 0.0, layout: str = "anywhere",
) -> dict:
    """Prompt following of ``pipe`` on the first ``n`` fixed held-out prompts of its world ``layout``
    (`scenes.LAYOUTS`; with ``shape_only``, that share of their mentions named by the shape word alone:
    then only the shape and count are asked for).

    Returns {"mean", "by_objects" {1, 2, 3: mean}, "with_relations" (the mean of
    `metrics.prompt_following_with_relations`), "table" (`metrics.attribute_table`), "scores" [n],
    "images" [n PIL]}.
    """
    prompts = captions.heldout_prompts(n, prompt_seed, shape_only, layout)
    images = to_pil(generate(pipe, [c.text for _, c in prompts], steps=steps, cfg=cfg, seed=seed))
    reports = [attribute_report(image, caption) for image, (_, caption) in zip(images, prompts)]
    table = attribute_table(reports)
    return {"mean": table["prompt_following"], "by_objects": table["prompt_following_by_objects"],
            "with_relations": table["prompt_following_with_relations"], "table": table,
            "scores": [r["prompt_following"] for r in reports], "images": images}  # fmt: skip


def _rounded(value):
    """``value`` with its numbers rounded to 4 places, through dicts; None stays None."""
    if isinstance(value, dict):
        return {key: _rounded(v) for key, v in value.items()}
    return None if value is None else round(value, 4)


def main(argv=None) -> None:
    from minigen.loading.auto import load_pipeline
    from minigen.loading.toy import toy_layout

    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-sd")
    parser.add_argument("--n", type=positive_int, default=200, help="held-out prompts (and renders for the PSNR)")
    parser.add_argument("--steps", type=positive_int, default=25)
    parser.add_argument("--cfg", type=non_negative_float, help="guidance scale (default: SD 7.5, FLUX the model's)")
    parser.add_argument("--seed", type=draw_seed, default=0)
    parser.add_argument("--shape-only", type=float, default=0.0, metavar="P",
                        help="the share of mentions named by their shape word alone (1: all; default 0)")
    args = parser.parse_args(argv)
    check_seeds(parser, args.seed, args.n, "--n")
    if not 0 <= args.shape_only <= 1:
        parser.error(f"--shape-only {args.shape_only}: give a share in [0, 1]")
    pipe, layout = load_pipeline(args.model), toy_layout(args.model)  # measured in the world the model learnt
    psnr = reconstruction_psnr(pipe.vae, args.n, layout=layout)
    following = prompt_following_on(pipe, args.n, steps=args.steps, cfg=args.cfg, seed=args.seed, shape_only=args.shape_only,
                                    layout=layout)  # fmt: skip
    cfg_used = (pipe.default_cfg if isinstance(pipe, FluxPipeline) else SD_CFG) if args.cfg is None else args.cfg
    report = {"model": args.model, "layout": layout, "prompts": args.n, "steps": args.steps, "cfg": cfg_used, "shape_only": args.shape_only,
              "vae_psnr_db": round(psnr, 2),
              "prompt_following": round(following["mean"], 4),
              "prompt_following_by_objects": {k: round(v, 4) for k, v in following["by_objects"].items()},
              "prompt_following_with_relations": round(following["with_relations"], 4),
              "attribute_table": _rounded(following["table"])}  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(run(main))
