"""Learn Personalized Residuals for one concept from a few reference images.

    python scripts/train_residuals.py --images dog/*.png --class dog --model sd15 --out dog.safetensors
    python scripts/train_residuals.py --toy-concept my_star --out runs/my_star.safetensors   # toy-sd

The prompt of every reference is the template with a unique identifier and the concept's macro
class ("a photo of a sks dog"). Defaults are the paper's: rank round(0.05 m) on every proj_out,
150 steps, batch 4, lr 1e-3, both factors random at start. The file records the base model, rank
ratio, identifier, class and training settings, and is used with

    python scripts/sample.py --model sd15 --residuals dog.safetensors --prompt "a sks dog on the moon" [--lag]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from minigen import cli
from minigen.image import read_image, read_square
from minigen.loading.files import check_output_path, check_writable_folder
from minigen.loading.auto import load_pipeline
from minigen.methods.residuals import RANK_RATIO, TRAINING, Residuals, train_residuals
from minigen.pipelines.sd import StableDiffusion
from minigen.toy import world
from minigen.toy.data import concept_references
from minigen.toy.scenes import MAX_REFERENCES


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-sd", help="the base model (an SD1.x or SDXL source; default toy-sd)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", type=Path, help="reference images of the concept")
    source.add_argument("--toy-concept", choices=[c.name for c in world.CONCEPTS], help="a toy-world personal concept")
    parser.add_argument("--references", type=cli.positive_int, help="with --toy-concept: how many references, 1-64 (default 6; DreamBench has 4-6)")
    parser.add_argument("--identifier", default="sks", help="the unique, rarely used token that names the concept")
    parser.add_argument("--class", dest="macro_class", help="the concept's macro class (default for a toy concept: its shape)")
    parser.add_argument("--template", default="a photo of a {identifier} {macro_class}")
    parser.add_argument("--steps", type=cli.positive_int, default=TRAINING.steps)
    parser.add_argument("--batch", type=cli.positive_int, default=TRAINING.batch)
    parser.add_argument("--lr", type=cli.positive_float, default=TRAINING.lr)
    parser.add_argument("--seed", type=cli.draw_seed, default=0)
    parser.add_argument("--rank-ratio", type=cli.positive_float, default=RANK_RATIO, help="the residuals' rank as a share of each layer's width, in (0, 1]")
    parser.add_argument("--init", choices=["random", "zero"], default="random", help="zero: B = 0, so training starts at the base")
    parser.add_argument("--work", type=Path, help="folder for resumable checkpoints (default: beside --out)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.rank_ratio > 1:
        parser.error(f"--rank-ratio {args.rank_ratio}: a share of each layer's width, in (0, 1] (the paper's 0.05)")
    try:
        args.template.format(identifier=args.identifier, macro_class="class")
    except (KeyError, IndexError, ValueError) as error:
        parser.error(f"--template {args.template!r}: it may name {{identifier}} and {{macro_class}} only ({error!r})")
    if args.references is not None and args.references > MAX_REFERENCES:
        parser.error(f"--references {args.references}: the toy world renders 1 to {MAX_REFERENCES} references of a concept")
    if args.references and args.images:
        parser.error("--references sets how many toy references are rendered; with --images every image given is a reference")
    if "{identifier}" not in args.template:  # the residuals would learn a prompt that never names the concept (LAG finds it by name)
        parser.error(f"--template {args.template!r} has no {{identifier}}: write e.g. 'a photo of a {{identifier}} {{macro_class}}'")
    if len(args.identifier.split()) != 1:
        parser.error(f"--identifier {args.identifier!r}: one rare word (the paper's 'sks'), no spaces")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    check_output_path(args.out, overwrite=args.overwrite, suffix=".safetensors", flag="--overwrite")  # before minutes of training
    work = check_writable_folder(args.work or args.out.with_suffix(".work"), "--work")
    macro_class = args.macro_class or (world.concept(args.toy_concept).shape if args.toy_concept else None)
    if macro_class is None:
        sys.exit("--class is required with --images: the concept's macro class, e.g. --class dog")
    for path in args.images or []:
        read_image(path, "reference image")  # a missing or damaged image fails before the model loads
    pipe = load_pipeline(args.model, device=args.device)
    if not isinstance(pipe, StableDiffusion):
        sys.exit("Personalized Residuals are implemented for SD1.x and SDXL UNets; pass such a --model")
    images = concept_references(args.toy_concept, args.references or 6) if args.toy_concept else torch.stack([read_square(path, pipe.default_size, "reference image") for path in args.images])
    prompt = args.template.format(identifier=args.identifier, macro_class=macro_class)

    residuals = Residuals(pipe.unet, identifier=args.identifier, macro_class=macro_class, rank_ratio=args.rank_ratio,
                          init=args.init, generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    print(f"{residuals.parameter_count():,} trainable parameters on {len(residuals.targets)} proj_out layers; "
          f"{len(images)} references; prompt {prompt!r}")  # fmt: skip
    config = replace(TRAINING, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    start = time.time()
    try:
        losses = train_residuals(pipe, residuals, images, prompt, config, work)
    except ValueError as error:  # a work folder holding another run's checkpoint
        sys.exit(str(error))
    seconds = time.time() - start
    if losses:
        print(f"trained {len(losses)} steps in {seconds:.1f} s; mean loss of the last 10 steps {np.mean(losses[-10:]):.4f}")
    out = residuals.save(args.out, base=str(args.model), overwrite=args.overwrite, steps=config.steps, batch=config.batch, lr=config.lr,
                         seed=config.seed, prompt=prompt, references=len(images))  # fmt: skip
    print(f"saved {out}")
    return out


if __name__ == "__main__":
    sys.exit(cli.run(main, resumes=True))  # bad input: one line on stderr, exit code 2, no traceback
