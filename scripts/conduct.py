"""Concept Conductor: personal concepts (ED-LoRA files; the method is for two or more, one works too) in one
image, laid out like a reference.

    python scripts/conduct.py --model sd15 \\
        --reference layout.png --reference-prompt "a dog and a cat in the street" \\
        --prompt "a dog and a cat on the beach" \\
        --concept "a <dog1> <dog2> on the beach" dog.safetensors dog_mask.png \\
        --concept "a <cat1> <cat2> on the beach" cat.safetensors cat_mask.png

Each --concept gives the concept's prompt (its ED-LoRA words in it), its ED-LoRA file and its mask on
the reference image (white = the concept), in that order; instead of a mask file, a point "X,Y" on the
concept in the reference (pixels) lets the reference's self-attention find the region (K-means,
k = 6). The reference is inverted once (DDIM, 999 steps) and kept in the --cache folder (default
runs/conductor/inversions, whatever --out says), named by a hash of the image, the reference prompt, the
model and the steps, for later runs to reuse. The official defaults: 200 DDIM steps, CFG 7.5, layout
alignment at steps 0-60, mask refinement at steps 50-80 (see minigen/methods/concept_conductor.py); these
are step numbers, as in the official code, so with fewer --steps refinement may not run (the script says
so). `--save-masks` also writes the fusion masks: the
initial ones, then one row after each refinement, one column per concept. Object placement (the paper's
application, the official init_image / init_mask): `--init-image` gives an image to draw the concepts
into and `--init-mask` (drawn on it, white = where the concepts go) the part that is redrawn; outside
it the image is kept. Official `.pth` ED-LoRAs are pickles: convert them once with
scripts/convert_edlora.py, or pass --allow-pickle for a file you trust.

SDXL models run with the official SDXL configuration (layout alignment at steps 0-50 with weight 40,
refinement at 60-80, IoU threshold 0.7; `ConductorSettings.sdxl`), on the layers this UNet has. Every
path reads its vector y: pooled text and the size conditioning (the image size, no crop; the official
SDXL pipeline conditions the reference's inversion on the size (4, size/8), read off the latent's shape:
to reproduce that, give `invert_reference` a y with those size ids). A point "X,Y" marks the grid cell
it falls in (the official SDXL code halves both coordinates: `conductor_masks.masks_from_points(official_cell=32)`
reproduces it). As the
official SDXL script passes negative_prompt="", the base uncond is "" encoded (not SDXL's zero
embeddings); a concept's uncond is "" through its LoRA-merged encoders, and its pooled text is that of
the first of its layer-wise prompt copies (official).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from minigen import cli
from minigen.image import from_pil, next_free_path, read_image, save_png, to_pil
from minigen.loading.files import check_output_path, check_writable_folder
from minigen.loading.auto import load_pipeline
from minigen.loading.edlora import (
    EDLoRA,
    edlora_low_rank,
    layerwise_prompt_embeddings,
    layerwise_prompt_embeddings_sdxl,
    read_edlora,
)
from minigen.methods.concept_conductor import Concept, ConceptConductor, ConductorSettings, Reference, invert_reference
from minigen.pipelines.memory import check_memory, decode_bytes, unet_call_bytes
from minigen.pipelines.sd import Conditioning, StableDiffusion
from minigen.storage import compute_device

INVERSIONS = Path("runs/conductor/inversions")  # inside the default output folder, beside the PNGs


def parse(argv=None) -> argparse.Namespace:
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-sd", help="an SD1.x or SDXL preset, hub id, file or folder (default: toy-sd)")
    p.add_argument("--reference", required=True, type=Path, help="the layout reference image")
    p.add_argument("--reference-prompt", required=True, help="what the reference shows")
    p.add_argument("--prompt", required=True, help="the base prompt, with plain words for the concepts")
    p.add_argument("--concept", nargs=3, action="append", required=True, metavar=("PROMPT", "EDLORA", "MASK"),
                   help="a concept's prompt, its ED-LoRA file and its mask on the reference (a PNG, or a point X,Y); repeat per concept")
    p.add_argument("--steps", type=cli.positive_int, default=200)
    p.add_argument("--cfg", type=cli.non_negative_float, default=7.5)
    p.add_argument("--alpha", type=cli.non_negative_float, default=0.7, help="the ED-LoRA merge weight")
    p.add_argument("--seed", type=cli.draw_seed, default=0)
    p.add_argument("--size", type=cli.positive_int, default=None, help="image size in pixels (default: the model's)")
    p.add_argument("--no-layout", action="store_true", help="turn layout alignment off (an ablation)")
    p.add_argument("--no-refine", action="store_true", help="keep the reference masks (an ablation)")
    p.add_argument("--init-image", type=Path, default=None, help="object placement: the image to draw the concepts into")
    p.add_argument("--init-mask", type=Path, default=None, help="object placement: a mask drawn on --init-image, white where the concepts go")
    p.add_argument("--out", type=Path, default=None, help="the PNG to write (default: runs/conductor/conduct-NNNNN.png)")
    p.add_argument("--cache", type=Path, default=INVERSIONS,
                   help="the folder that keeps the reference's inversions for later runs (default: runs/conductor/inversions)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--save-masks", action="store_true", help="also write <out>-masks.png")
    p.add_argument("--allow-pickle", action="store_true", help="read official .pth ED-LoRAs (pickles) you trust")
    p.add_argument("--no-memory-check", action="store_true", help="run even if the memory estimate exceeds what is free")
    return p.parse_args(argv)


def point(text: str) -> tuple[float, float] | None:
    """"X,Y" -> (x, y); None for anything else (a mask file)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*,\s*(\d+(?:\.\d*)?)\s*", text)
    return (float(match[1]), float(match[2])) if match else None


def load_mask(path: Path, reference: Image.Image, size: int, factor: int, drawn_on: str = "the reference image") -> torch.Tensor:
    """A mask image drawn on `reference` -> [size/factor]² in {0, 1}, as the official code: grey, resized
    (PIL's default, then bilinearly to the latent grid), > 127."""
    with Image.open(path) as image:
        check_drawn_on(path, image.size, reference, drawn_on)
        grey = image.convert("L").resize((size, size)).resize((size // factor, size // factor), Image.BILINEAR)
    return torch.from_numpy((np.asarray(grey) > 127).astype(np.float32))


def check_drawn_on(path: Path, mask_size: tuple[int, int], reference: Image.Image, drawn_on: str) -> None:
    """A mask is drawn on its image, at its size."""
    if mask_size != reference.size:
        raise ValueError(f"the mask {path} is {mask_size[0]}x{mask_size[1]} but {drawn_on} is "
                         f"{reference.size[0]}x{reference.size[1]}: draw the mask on it, at its size")


def image_latent(pipe: StableDiffusion, image: Image.Image, size: int) -> torch.Tensor:
    """An image's latent [1, C, size/f, size/f] (f: the VAE's factor) at the output size: resized by PIL's default (bicubic,
    no crop), as the official sample.py prepares the reference and the init image."""
    with torch.no_grad():
        return pipe.vae.encode_images(from_pil(image.resize((size, size), Image.BICUBIC)))


def mask_grid(history: list[torch.Tensor]) -> Image.Image:
    """Masks over updates [U, N, h, w] as one image: a row per update, a column per concept."""
    masks = torch.stack(history).float()  # [U, N, h, w]
    rows = torch.cat([torch.cat(list(update), dim=1) for update in masks], dim=0)  # [U·h, N·w]
    return Image.fromarray((rows.numpy() * 255).astype(np.uint8)).resize((rows.shape[1] * 8, rows.shape[0] * 8), Image.NEAREST)


def concept_inputs(pipe: StableDiffusion, prompt: str, edlora: EDLoRA, size: int, alpha: float) -> dict:
    """A concept path's text inputs, as Concept fields: layer-wise `context` and `uncond` [L, 77, C]
    and, for SDXL, the vectors `y` and `y_uncond` [D] (pooled text of the first prompt copy, sizes)."""
    if not pipe.is_sdxl:
        encoder, tokenizer = pipe.text_encoders[0], pipe.tokenizers[0]
        return {"context": layerwise_prompt_embeddings(encoder, tokenizer, prompt, edlora, alpha=alpha),
                "uncond": layerwise_prompt_embeddings(encoder, tokenizer, "", edlora, alpha=alpha)}  # fmt: skip
    context, pooled = layerwise_prompt_embeddings_sdxl(pipe.text_encoders, pipe.tokenizers, prompt, edlora, alpha=alpha)
    uncond, pooled_uncond = layerwise_prompt_embeddings_sdxl(pipe.text_encoders, pipe.tokenizers, "", edlora, alpha=alpha)
    vectors = pipe.conditioning(torch.stack([context[0], uncond[0]]), torch.stack([pooled, pooled_uncond]), size, size).y  # [2, D]
    return {"context": context, "uncond": uncond, "y": vectors[0], "y_uncond": vectors[1]}  # [L, 77, 2048] twice, [D] twice


class Inputs(NamedTuple):
    """What the command line names, read and checked before the model loads."""

    out: Path
    edloras: list[EDLoRA]
    reference_image: Image.Image
    init_image: Image.Image | None


def main(argv=None) -> list[Path]:
    args = parse(argv)
    inputs = check_inputs(args)  # everything that can be checked without the model, before it loads and before minutes of inversion
    pipe, size = load_model(args)
    conductor = make_conductor(args, pipe)
    masks, init_mask = latent_masks(args, inputs, conductor, size, pipe.vae.config.downsample_factor)
    base = pipe.encode_prompt([args.prompt, "", args.reference_prompt], size, size)  # context [3, 77, C]; SDXL: "" encoded, as the official script
    concepts, reference = prepare_concepts(args, inputs, pipe, size, conductor, base, masks)
    image, history = draw(args, inputs, pipe, size, conductor, base, concepts, reference, init_mask)
    return write_pngs(args, inputs.out, size, image, history)


def check_inputs(args: argparse.Namespace) -> Inputs:
    """The output names, the files, the masks and the points, each refused with a clear error before the model loads."""
    out = check_output_path(args.out or next_free_path("runs/conductor", "conduct"), overwrite=args.overwrite, flag="--overwrite")
    if args.save_masks:
        check_output_path(out.with_name(f"{out.stem}-masks.png"), overwrite=args.overwrite, flag="--overwrite")
    if not args.reference.is_file():
        raise FileNotFoundError(f"--reference {args.reference} not found; give the reference image the masks are drawn on")
    for _, _, where in args.concept:
        if point(where) is None and not Path(where).is_file():
            raise FileNotFoundError(f"mask {where} not found; give a PNG drawn on the reference, or a point X,Y")
    if (args.init_image is None) != (args.init_mask is None):
        raise ValueError("object placement needs both --init-image and --init-mask (white where the concepts go)")
    for flag, path in (("--init-image", args.init_image), ("--init-mask", args.init_mask)):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{flag} {path} not found")
    check_writable_folder(args.cache, "--cache")  # found when the inversion is written, minutes in
    edloras = [read_edlora(file, allow_pickle=args.allow_pickle) for _, file, _ in args.concept]
    reference_image = read_image(args.reference, "--reference")  # a damaged image fails before the model loads
    init_image = None if args.init_image is None else read_image(args.init_image, "--init-image")
    masks = [*((where, reference_image, "the reference image", f"the mask {where}", "the concept's region") for _, _, where in args.concept),
             *([(str(args.init_mask), init_image, "--init-image", f"--init-mask {args.init_mask}", "the region to redraw")]
               if init_image is not None else [])]  # fmt: skip
    for mask, image, drawn_on, name, region in masks:
        if (xy := point(mask)) is None:  # masks and points are checked here, not after the model and minutes of inversion
            try:
                with Image.open(mask) as opened:
                    opened.load()  # the whole file, not its header only: a mask cut short fails here
                    size, brightest = opened.size, opened.convert("L").getextrema()[1]
            except (OSError, SyntaxError) as error:  # PIL's errors for a file that is no image, or one cut short
                raise ValueError(f"mask {mask}: cannot be read as an image ({type(error).__name__}: {error})") from None
            check_drawn_on(Path(mask), size, image, drawn_on)
            if brightest <= 127:  # load_mask's cut: the concept would be drawn nowhere, or nothing redrawn
                raise ValueError(f"{name} has no white pixel (none above 127, where masks are cut): paint {region} white")
        elif not (xy[0] < image.width and xy[1] < image.height):
            raise ValueError(f"the point {mask} lies outside {drawn_on} ({image.width}x{image.height}): give X < {image.width}, Y < {image.height}")
    return Inputs(out, edloras, reference_image, init_image)


def load_model(args: argparse.Namespace) -> tuple[StableDiffusion, int]:
    """The SD1.x or SDXL pipeline and the image size, checked against the UNet's levels and the free memory."""
    pipe = load_pipeline(args.model)
    if not isinstance(pipe, StableDiffusion):
        raise ValueError(f"Concept Conductor runs SD1.x and SDXL models here; {args.model!r} is neither")
    size, factor = args.size or pipe.default_size, pipe.vae.config.downsample_factor
    multiple = factor * 2 ** (len(pipe.unet.config.channel_mult) - 1)  # the UNet halves the latent per level
    if size % multiple:
        raise ValueError(f"--size must be a multiple of {multiple} for this model, got {size}")
    # one generation call holds a CFG pair of rows per path (the base and each concept); layout alignment also
    # keeps a forward's activations for its backward: about twice the rows (sample.py's estimate, minigen/pipelines/memory.py)
    rows = 2 * (1 + len(args.concept)) * (1 if args.no_layout else 2)
    check_memory(unet_call_bytes(pipe.unet, rows, size // factor, size // factor), decode_bytes(pipe.vae, 1, size, size),
                 compute_device(pipe.unet.out[2]), float("inf") if args.no_memory_check else None, f"Concept Conductor at {size}x{size}")
    return pipe, size


def refinement(settings: ConductorSettings) -> str:
    """The mask refinement window in words: step numbers, not shares of the steps, as in the official code."""
    return f"mask refinement (steps {settings.refine_start}-{settings.refine_end} of the official 200)"


def make_conductor(args: argparse.Namespace, pipe: StableDiffusion) -> ConceptConductor:
    """The official settings of the model's family with the ablations asked for (--no-refine refused where it changes nothing)."""
    official = ConductorSettings.for_unet(pipe.unet, steps=args.steps, cfg=args.cfg)
    if args.no_refine and not official.refinement_runs:
        sys.exit(f"--no-refine: with --steps {args.steps} {refinement(official)} never runs anyway; drop --no-refine, or take more steps")
    settings = replace(official, **({"guidance_end": -1} if args.no_layout else {}), **({"refine_start": args.steps} if args.no_refine else {}))
    return ConceptConductor(pipe.unet, settings, schedule=pipe.schedule)  # the model's own (v-prediction, betas)


def latent_masks(
    args: argparse.Namespace, inputs: Inputs, conductor: ConceptConductor, size: int, factor: int
) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """The masks given as files on the latent grid [size/factor]²: the concepts' by index, and --init-mask's (None without
    it), each refused before the inversion if its white pixels vanish on the grids it is used at."""
    grid = (size // factor,) * 2
    masks = {i: load_mask(Path(where), inputs.reference_image, size, factor) for i, (_, _, where) in enumerate(args.concept) if point(where) is None}
    for i, mask in masks.items():
        conductor.check_mask(mask, grid, f"the mask {args.concept[i][2]}")
    if inputs.init_image is None:
        return masks, None
    init_mask = load_mask(args.init_mask, inputs.init_image, size, factor, drawn_on="--init-image")
    ConceptConductor.check_init_mask(init_mask, grid, f"--init-mask {args.init_mask} (resized as the official code resizes it)")
    return masks, init_mask


def prepare_concepts(
    args: argparse.Namespace, inputs: Inputs, pipe: StableDiffusion, size: int, conductor: ConceptConductor, base: Conditioning,
    masks: dict[int, torch.Tensor],
) -> tuple[list[Concept], Reference | None]:
    """Each concept's text, ED-LoRA and mask (`masks`: those given as files; the others found from points on the
    reference's inversion), and that inversion when layout alignment or a point needs it (None without layout alignment)."""
    factor = pipe.vae.config.downsample_factor
    # each concept's text and ED-LoRA (a prompt without its ED-LoRA's words fails here, before the inversion)
    prepared = [(concept_inputs(pipe, prompt, edlora, size, args.alpha), edlora_low_rank(edlora, pipe.unet, alpha=args.alpha))
                for (prompt, _, _), edlora in zip(args.concept, inputs.edloras)]  # fmt: skip
    points = {i: point(where) for i, (_, _, where) in enumerate(args.concept) if point(where) is not None}
    reference = None
    if points or not args.no_layout:
        ref_y = None if base.y is None else base.y[2]  # SDXL: [D]
        reference = invert_reference(pipe.unet, image_latent(pipe, inputs.reference_image, size), base.context[2], steps=args.steps,
                                     schedule=pipe.schedule, cache=args.cache, y=ref_y)  # fmt: skip
    if points:
        found = conductor.masks_from_points(reference, list(points.values()), inputs.reference_image.size, (size // factor,) * 2)
        from_points = dict(zip(points, found.float()))
    concepts = [
        Concept(**text, low_rank=low_rank, mask=from_points[i] if i in points else masks[i]) for i, (text, low_rank) in enumerate(prepared)
    ]
    return concepts, None if args.no_layout else reference


def draw(
    args: argparse.Namespace, inputs: Inputs, pipe: StableDiffusion, size: int, conductor: ConceptConductor, base: Conditioning,
    concepts: list[Concept], reference: Reference | None, init_mask: torch.Tensor | None,
) -> tuple[Image.Image, list[torch.Tensor]]:
    """The image from the seed's noise (into --init-image where given), and the fusion masks [N, h, w] it started
    with and had after each refinement (a note says when --steps leave out refinement)."""
    factor = pipe.vae.config.downsample_factor
    placement = {} if init_mask is None else {"init_latent": image_latent(pipe, inputs.init_image, size), "init_mask": init_mask}
    context, uncond, _ = base.context  # [77, C] each
    y, y_uncond, _ = (None, None, None) if base.y is None else base.y  # SDXL: [D] each
    if not args.no_refine and not conductor.settings.refinement_runs:
        print(f"note: with --steps {args.steps} {refinement(conductor.settings)} does not run: the masks stay the reference's", file=sys.stderr)
    history = []
    remember = lambda step, z, masks: history.append(masks[max(masks)][0].clone()) if conductor.settings.refines(step) or step == 0 else None  # noqa: E731
    noise = torch.randn(1, pipe.unet.config.in_channels, size // factor, size // factor, generator=torch.Generator().manual_seed(args.seed))
    with torch.no_grad():
        z = conductor.sample(noise, context, uncond, concepts, reference, y=y, y_uncond=y_uncond, on_step=remember, **placement)
        return to_pil(pipe.vae.decode_images(z))[0], history


def write_pngs(args: argparse.Namespace, out: Path, size: int, image: Image.Image, history: list[torch.Tensor]) -> list[Path]:
    """The image, and with --save-masks the mask grid, each carrying the run's settings; prints and returns their paths."""
    settings_text = {"prompt": args.prompt, "steps": args.steps, "cfg_scale": args.cfg, "seed": args.seed,
                     "size": f"{size}x{size}", "model": args.model, "sampler": "ddim", "method": "concept conductor",
                     "concepts": [c[0] for c in args.concept], "alpha": args.alpha,
                     **({"layout_alignment": "off"} if args.no_layout else {}), **({"mask_refinement": "off"} if args.no_refine else {}),
                     **({"init_image": args.init_image.name} if args.init_image else {})}  # fmt: skip
    written = [save_png(image, out, settings_text, overwrite=args.overwrite)]
    if args.save_masks:
        written.append(save_png(mask_grid(history), out.with_name(f"{out.stem}-masks.png"), settings_text, overwrite=args.overwrite))
    for path in written:
        print(path)
    return written


def run(argv=None) -> int:
    """main() for the command line: bad input ends with one line on stderr and exit code 2 (minigen/cli.py)."""
    return cli.run(main, argv)


if __name__ == "__main__":
    sys.exit(run())
