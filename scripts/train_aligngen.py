"""Train AlignGen (S*, the deviation extraction module, the reference LoRA) on subject pairs, FLUX frozen.

    python scripts/train_aligngen.py --model toy-flux --toy-pairs 512 --out runs/aligngen-toy.safetensors
    torchrun --nproc_per_node 8 scripts/train_aligngen.py --model flux-dev --pairs pairs.jsonl --out aligngen.safetensors

Data, one of:
  --toy-pairs N   N pairs of the toy world (minigen/toy): a random object look, its reference render, a scene
                  holding it and the scene's caption naming it by class, parent and broad category
                  ("star", "symbol", "shape"). No Redux model exists for the toy models: the stand-in for
                  the reference's Redux tokens is the T5 states of its exact description ("a yellow star
                  with purple dots"), text-aligned by construction.
  --pairs FILE    a JSON-lines file, one pair a line, paths relative to the file:
                  {"target": "t.jpg", "reference": "r.jpg", "caption": "a {} on the beach",
                   "names": ["acoustic guitar", "guitar", "musical instrument"]}
                  Redux tokens come from --redux (flux1-redux-dev.safetensors) and --siglip.

Training is resumable (checkpoints in --work, default beside --out; the same command continues) and runs
on several GPUs through torchrun (DDP; --batch is the global batch). The output .safetensors holds the
base model's config fingerprint: another base model refuses it. See minigen/methods/aligngen_training.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minigen import cli
from minigen.image import from_pil, preprocess_siglip, read_square
from minigen.loading.files import check_output_path, check_writable_folder
from minigen.loading.aligngen import save_aligngen
from minigen.loading.auto import load_pipeline
from minigen.loading.toy import toy_layout
from minigen.methods.aligngen import PLACEHOLDER, AlignGen, AlignGenConfig, AlignGenSettings
from minigen.methods.aligngen_training import (
    TRAINING,
    TrainingPair,
    TrainingSettings,
    encode_caption,
    init_distributed,
    initial_token,
    train_aligngen,
)
from minigen.pipelines.flux import FluxPipeline
from minigen.text.tokenizer import tokenize
from minigen.toy import captions, scenes, world

DEFAULTS = TrainingSettings()


def parse(argv=None) -> argparse.Namespace:
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-flux", help="a FLUX preset, hub id, file or folder (default: toy-flux)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--toy-pairs", type=cli.positive_int, help="train on this many toy-world pairs")
    data.add_argument("--pairs", type=Path, help="a JSON-lines file of pairs (see above)")
    p.add_argument("--redux", default=None, help="with --pairs: the Redux projector (file, folder or hub id)")
    p.add_argument("--siglip", default=None, help="with --pairs: the SigLIP tower Redux reads (folder, file or hub id)")
    p.add_argument("--size", type=cli.positive_int, help="target images are resized to this square side (default: the model's, at most 512)")
    p.add_argument("--reference-size", type=cli.positive_int, help="references are resized to this side (default: --size)")
    p.add_argument("--steps", type=cli.positive_int, default=TRAINING.steps)
    p.add_argument("--batch", type=cli.positive_int, default=TRAINING.batch, help="the global batch (split over torchrun's processes)")
    p.add_argument("--seed", type=cli.draw_seed, default=TRAINING.seed)
    p.add_argument("--inner", type=cli.positive_int, help="the DEM's inner width (default: min(T5 width, 1024))")
    p.add_argument("--rank", type=cli.positive_int, default=16, help="the reference LoRA's rank")
    p.add_argument("--lr-token", type=cli.non_negative_float, default=DEFAULTS.lr_token)
    p.add_argument("--lr-dem", type=cli.non_negative_float, default=DEFAULTS.lr_dem)
    p.add_argument("--lr-lora", type=cli.non_negative_float, default=DEFAULTS.lr_lora)
    p.add_argument("--dropout", type=float, default=DEFAULTS.reference_dropout, help="P(reference -> black image)")
    p.add_argument("--names", type=float, nargs="+", default=list(DEFAULTS.name_probabilities), metavar="P",
                   help="P(class name), P(parent), P(broad category)")  # fmt: skip
    p.add_argument("--no-s-star", action="store_true", help="ablation: no learned token (the DEM is unused)")
    p.add_argument("--no-dem", action="store_true", help="ablation: S* replaces the placeholder as learned")
    p.add_argument("--no-mask", action="store_true", help="ablation: every text token sees the reference")
    p.add_argument("--no-strategy", action="store_true", help="ablation: no reference dropout, no name substitution")
    p.add_argument("--work", type=Path, help="folder for resumable checkpoints (default: <out>.work beside --out)")
    p.add_argument("--out", type=Path, required=True, help="the AlignGen .safetensors to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--device", default=None, help="default: a GPU if there is one (torchrun: this process's GPU)")
    return p.parse_args(argv)


# --- data ------------------------------------------------------------------------------------------------


def read_manifest(path: Path) -> list[dict]:
    """The pairs of a JSON-lines file, each checked for its fields (paths made relative to the file)."""
    if not path.is_file():
        raise FileNotFoundError(f"--pairs {path} does not exist")
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not JSON ({error})") from None
        names = entry.get("names") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("target", "reference", "caption")) \
                or not isinstance(names, list) or not 1 <= len(names) <= 3 or not all(isinstance(n, str) and n for n in names):  # fmt: skip
            raise ValueError(f"{path} line {number}: give target, reference, caption (with '{{}}') and names (1 to 3 strings)")
        entries.append(entry | {"target": path.parent / entry["target"], "reference": path.parent / entry["reference"]})
    if not entries:
        raise ValueError(f"{path} holds no pairs")
    return entries


def manifest_pairs(pipe: FluxPipeline, entries: list[dict], redux, size: int, reference_size: int, s_star: bool) -> list[TrainingPair]:
    siglip, projector = redux
    from minigen.models.redux import redux_tokens

    pairs = []
    for entry in entries:
        reference = read_square(entry["reference"], reference_size)
        with torch.no_grad():
            tokens = redux_tokens(siglip, projector, preprocess_siglip(reference[None], siglip.config.image_size))[0].float().cpu()
        encoded = tuple(encode_caption(pipe, entry["caption"], name, s_star=s_star) for name in entry["names"])
        pairs.append(TrainingPair(read_square(entry["target"], size), reference, tokens, encoded))
    return pairs


def toy_look(rng: np.random.Generator, i: int) -> world.PersonalConcept:
    """A random object look (shape, colour, pattern, pattern colour) as a toy concept."""
    colors = list(world.COLORS)
    color, pattern = str(rng.choice(colors)), str(rng.choice(world.PATTERNS))
    pattern_color = None if pattern == "plain" else str(rng.choice([c for c in colors if c != color]))
    return world.PersonalConcept(f"pair{i}", str(rng.choice(world.SHAPES)), color, pattern, pattern_color)


@torch.no_grad()
def toy_pairs(pipe: FluxPipeline, n: int, seed: int, s_star: bool, size: int, layout: str = "anywhere") -> list[TrainingPair]:
    """`n` toy pairs: a look's reference render, a scene holding it, its caption naming it at three levels, and
    the T5 states of the look's description as the Redux stand-in; scenes and references of the base
    model's world (``layout``: toy-flux's hold one or two objects on the canvas halves)."""
    pairs = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        look = toy_look(rng, i)
        scene = scenes.concept_scene(look, rng, n_objects=int(rng.integers(1, 3)), layout=layout)
        text = captions.caption(scene, rng)
        mention = next(m for m, named in enumerate(text.mentions) if 0 in named.objects)
        template = captions.with_concept(text, mention, "{}", level=None).text  # "a {} to the left of ..."
        encoded = tuple(encode_caption(pipe, template, name, s_star=s_star) for name in look.class_path[:3])
        description = pipe.t5(tokenize(pipe.t5_tokenizer, [look.description], pipe.max_length).to(pipe.t5.device)).last_hidden_state
        reference = from_pil(scenes.reference_images(look, n=1, size=size, seed=seed, layout=layout)[0].image)[0]
        target = from_pil(scenes.render(scene, size).image)[0]
        pairs.append(TrainingPair(target, reference, description[0].float().cpu(), encoded))
    return pairs


# --- the run ---------------------------------------------------------------------------------------------


def settings_from(args: argparse.Namespace) -> tuple[AlignGenSettings, TrainingSettings]:
    method = AlignGenSettings(s_star=not args.no_s_star, dem=not args.no_dem, mask=not args.no_mask)
    training = TrainingSettings(reference_dropout=args.dropout, name_probabilities=tuple(args.names), strategy=not args.no_strategy,
                                lr_token=args.lr_token, lr_dem=args.lr_dem, lr_lora=args.lr_lora)  # fmt: skip
    return method, training


def main(argv=None) -> Path:
    args = parse(argv)
    out = check_output_path(args.out, overwrite=args.overwrite, suffix=".safetensors", flag="--overwrite")
    work = check_writable_folder(args.work or out.with_suffix(".work"), "--work")
    if args.no_strategy and (args.dropout != DEFAULTS.reference_dropout or tuple(args.names) != DEFAULTS.name_probabilities):
        raise ValueError("--dropout and --names set the training strategy that --no-strategy turns off: give one or the other")
    method, training = settings_from(args)  # bad probabilities fail here, before anything loads
    entries = read_manifest(args.pairs) if args.pairs else None
    if entries and not (args.redux and args.siglip):
        raise ValueError("--pairs needs --redux (flux1-redux-dev.safetensors) and --siglip (its SigLIP tower) for the Redux tokens")
    if not args.pairs and (args.redux or args.siglip):
        raise ValueError("--redux and --siglip give --pairs' references their Redux tokens; toy pairs bring their own: drop them")
    for entry in entries or ():
        for key in ("target", "reference"):
            read_square(entry[key], 16)  # every image exists and is readable before the model loads

    job = init_distributed(args.device)
    pipe = load_pipeline(args.model, device=job.device)
    if not isinstance(pipe, FluxPipeline):
        raise ValueError(f"AlignGen trains on FLUX models; {args.model} is a {type(pipe).__name__}")
    size = args.size or min(pipe.default_size, 512)  # OminiControl's and AlignGen's training side
    reference_size = args.reference_size or size
    method = replace(method, reference_size=reference_size)
    if entries:
        from minigen.loading.redux import load_redux

        redux = load_redux(args.redux, args.siglip, device=job.device)
        pairs = manifest_pairs(pipe, entries, redux, size, reference_size, method.s_star)
    else:
        pairs = toy_pairs(pipe, args.toy_pairs, args.seed, method.s_star, size, toy_layout(args.model))

    config = AlignGenConfig.for_transformer(pipe.transformer, inner=args.inner, rank=args.rank)
    aligngen = AlignGen(config, pipe.transformer, initial_token=initial_token(pairs), generator=torch.Generator().manual_seed(args.seed))
    aligngen.to(job.device)
    parameters = sum(p.numel() for p in aligngen.parameters())
    if job.rank == 0:
        print(f"{parameters:,} AlignGen parameters ({config}); {len(pairs)} pairs; {job.world} process(es); placeholder {PLACEHOLDER}")
    run = replace(TRAINING, steps=args.steps, batch=args.batch, seed=args.seed)
    start = time.time()
    trained = train_aligngen(pipe, aligngen, pairs, run, work, settings=method, training=training, distributed=job)
    if job.rank == 0:
        if trained.losses:
            seconds = time.time() - start
            print(f"trained {len(trained.losses)} steps in {seconds:.1f} s; mean loss of the first and last 10 steps "
                  f"{np.mean(trained.losses[:10]):.4f} -> {np.mean(trained.losses[-10:]):.4f}")  # fmt: skip
        save_aligngen(trained.aligngen, out, overwrite=args.overwrite, metadata=trained.metadata | {"model": str(args.model)})
        print(f"saved {out}")
    if job.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


def run(argv=None) -> int:
    """main() for the command line: bad input ends with one line on stderr and exit code 2 (minigen/cli.py)."""
    return cli.run(main, argv, resumes=True)


if __name__ == "__main__":
    sys.exit(run())
