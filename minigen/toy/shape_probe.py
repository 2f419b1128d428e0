"""Does a toy model draw the shape its caption names, or only the shape it already sees?

Prompt following (`evaluate`) tells whether sampled images show the asked shape, but a model at
chance there may be failing in two ways: it cannot render shapes at all, or it renders them from
the image yet never from the words. This probe separates the two, in a minute, with no sampling
loop. One-object scenes are rendered, encoded and noised to a level σ (flow matching's σ; for a
toy-sd, its timestep of the same signal-to-noise ratio); the model's one-step clean estimate is
decoded and the judge reads its largest object's shape, once with the scene's own caption and once
with the shape word swapped for another ("a big yellow star ..." -> "a big yellow cross ...").

    kept             the estimate shows the scene's shape, its caption given
    kept_swapped     the estimate still shows the scene's shape, the swapped caption given
    followed         the estimate shows the swapped caption's shape
    effect           kept - kept_swapped: how much of the shape the words decide

At low noise the image decides (kept ~ 1 for any model that renders shapes); at high noise only the
words can, and a model that reads them has a large effect there (toy-sd: docs/toy_v2_learning_curve.md).

    python -m minigen.toy.shape_probe --model toy-sd
    python -m minigen.toy.shape_probe --model runs/flux/toy-flux --sigmas 0.5 0.7 0.85
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np
import torch
from torch import Tensor

from minigen.cli import Parser, draw_seed, positive_int, run
from minigen.controls import BatchLayout
from minigen.image import from_pil, to_pil
from minigen.pipelines.flux import FluxPipeline

from . import world
from .captions import caption
from .judge import judge
from .scenes import Scene, render, sample_scene

SIGMAS = (0.5, 0.7, 0.85)


def probe_scenes(n: int, seed: int = 0, layout: str = "anywhere") -> list[tuple[Scene, str, str, str]]:
    """``n`` one-object training scenes of ``layout``, not small, whose caption names the shape: (scene,
    caption, the caption with the shape word swapped, the swapped-in shape)."""
    rng, rows = np.random.default_rng(seed), []
    while len(rows) < n:
        scene = sample_scene(rng, "train", 1, layout)
        shape = scene.objects[0].shape
        text = caption(scene, rng).text
        if scene.objects[0].size == "small" or not re.search(rf"\b{shape}\b", text):
            continue
        other = str(rng.choice([s for s in world.SHAPES if s != shape]))
        rows.append((scene, text, re.sub(rf"\b{shape}\b", other, text), other))
    return rows


@torch.no_grad()
def one_step_estimates(pipe, latents: Tensor, noise: Tensor, sigma: float, prompts: list[str]) -> Tensor:
    """The model's clean latents estimated in one step from `latents` noised to flow σ = `sigma`."""
    n = len(prompts)
    if isinstance(pipe, FluxPipeline):
        c = pipe.encode_prompt(prompts)
        denoise = pipe.denoiser(None, BatchLayout.plain(n))
        return denoise((1 - sigma) * latents + sigma * noise, torch.full((n,), sigma, device=latents.device), txt=c.txt, y=c.y)
    height, width = (side * pipe.vae.config.downsample_factor for side in latents.shape[-2:])
    c = pipe.encode_prompt(prompts, height, width)
    s = sigma / (1 - sigma)  # the same signal-to-noise ratio as k-diffusion's x0 + s * noise
    denoise = pipe.denoiser(None, BatchLayout.plain(n), round_timesteps=False)
    return denoise(latents + s * noise, torch.full((n,), s, device=latents.device), context=c.context, y=c.y)


def _judged_shapes(pipe, latents: Tensor) -> list[str | None]:
    """The shape of the largest object the judge finds in each decoded latent (None: no object)."""
    shapes = []
    for image in to_pil(pipe.vae.decode_images(latents)):
        found = judge(image)
        shapes.append(max(found, key=lambda o: o.mask.sum()).shape if found else None)
    return shapes


@torch.no_grad()
def shape_following(
    pipe, n: int = 96, sigmas: tuple[float, ...] = SIGMAS, seed: int = 0, layout: str = "anywhere"
) -> dict[float, dict[str, float]]:
    """For each σ in `sigmas`: {"kept", "kept_swapped", "followed", "effect"} over `n` scenes of the
    model's world ``layout`` (module docstring)."""
    if not all(0 < s < 1 for s in sigmas):
        raise ValueError(f"sigmas {sigmas}: give noise levels strictly between 0 and 1, e.g. 0.5 0.7 0.85")
    rows = probe_scenes(n, seed, layout)
    images = torch.cat([from_pil(render(scene).image) for scene, *_ in rows])  # [n, 3, 64, 64] in [0, 1]
    weight = pipe.vae.decoder.conv_in.weight  # the autoencoder's device and dtype
    latents = pipe.vae.encode((images * 2 - 1).to(weight.device, weight.dtype)).float()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents.device)
    truth, swapped = [scene.objects[0].shape for scene, *_ in rows], [other for *_, other in rows]
    result = {}
    for sigma in sigmas:
        right = _judged_shapes(pipe, one_step_estimates(pipe, latents, noise, sigma, [text for _, text, _, _ in rows]))
        wrong = _judged_shapes(pipe, one_step_estimates(pipe, latents, noise, sigma, [text for _, _, text, _ in rows]))
        kept = float(np.mean([a == b for a, b in zip(right, truth)]))
        kept_swapped = float(np.mean([a == b for a, b in zip(wrong, truth)]))
        followed = float(np.mean([a == b for a, b in zip(wrong, swapped)]))
        result[sigma] = {"kept": kept, "kept_swapped": kept_swapped, "followed": followed, "effect": kept - kept_swapped}
    return result


def main(argv=None) -> None:
    from minigen.loading.auto import load_pipeline
    from minigen.loading.toy import toy_layout

    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-sd", help="toy-sd, toy-flux, a toy-sd file or an exported toy-flux folder")
    parser.add_argument("--n", type=positive_int, default=96, help="one-object scenes")
    parser.add_argument("--sigmas", type=float, nargs="+", default=list(SIGMAS), help="flow-matching noise levels in (0, 1)")
    parser.add_argument("--seed", type=draw_seed, default=0)
    args = parser.parse_args(argv)
    if not all(0 < s < 1 for s in args.sigmas):
        parser.error(f"--sigmas {args.sigmas}: give noise levels strictly between 0 and 1, e.g. 0.5 0.7 0.85")
    layout = toy_layout(args.model)  # the scenes of the world the model learnt
    result = shape_following(load_pipeline(args.model, dtype=torch.float32), args.n, tuple(args.sigmas), args.seed, layout)
    print(json.dumps({"model": str(args.model), "layout": layout, "scenes": args.n,
                      "sigma": {f"{s:g}": {k: round(v, 3) for k, v in row.items()} for s, row in result.items()}}, indent=2))  # fmt: skip


if __name__ == "__main__":
    sys.exit(run(main))
