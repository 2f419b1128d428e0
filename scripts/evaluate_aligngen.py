"""The toy misalignment benchmark: AlignGen against an OminiControl-style baseline on toy-flux, judged from pixels.

    python scripts/evaluate_aligngen.py --work runs/aligngen-bench              # trains what is missing, then -> <work>/aligngen_toy-flux.md, .json
    python scripts/evaluate_aligngen.py --work runs/aligngen-bench --variants baseline aligngen no-mask

AlignGen's claim (Lin et al. 2025): when the reference's look differs from what the prompt's class word
usually draws, reference tokens alone lose to the text's prior; a learned token S* before the concept
word, updated from the reference (the Deviation Extraction Module), and a mask that keeps the other
words away from the reference raise concept preservation (CP) with prompt following (PF) kept.

The toy world holds that misalignment by construction: each personal concept's look (a pink heart with
green checks, ...) is a colour and pattern combination toy-flux never saw on any shape, so "a heart"
pulls towards the hearts it learnt. Every variant below is trained by scripts/train_aligngen.py on the
same toy pairs (random looks, `--pairs`; the personal concepts' looks never appear in them), with
the same steps, batch, rates and seed (default 6000 steps of 8, the DEM and the LoRA at lr 1e-3: about
40 min a variant on one thread of a 2-core Xeon), and measured on the same prompts:

    prompts    `captions.recontext_prompts(concept, identifier=None, layout=toy-flux's)`: the concept named
               by its class word beside 0 or 1 other objects, "a heart to the left of a small blue circle
               on grass"; prompts whose class word appears twice are skipped (AlignGen's placeholder goes
               before the word's first occurrence), so each concept keeps its first `--prompts` others
    reference  the concept alone in toy-flux's world (`scenes.reference_images`, seed 0)
    Redux      no Redux model exists at toy width; as in training, the T5 states of the look's
               description ("a pink heart with green checks") stand in for its tokens
    drawing    25 Euler steps, toy-flux's true CFG 4, prompt i of every concept from seed + i; each file
               runs with the settings it was trained with (`trained_settings`)

The variants (`VARIANTS`: name, train_aligngen.py's flags):

    baseline            reference tokens + their LoRA only: no S*, no mask, no dropout or name substitution
    aligngen            S*, the DEM, the selective mask, reference dropout 0.5 and name substitution
    no-s-star           --no-s-star        (the DEM is then unused)
    no-dem              --no-dem           (S* as learnt, not updated from the reference)
    no-mask             --no-mask          (every text token sees the reference)
    no-strategy         --no-strategy      (no reference dropout, no name substitution)
    dropout-0, dropout-0.25, dropout-0.75  the reference-dropout sweep (0.5 is aligngen)

and the base model without any reference as a reference row. Scores are minigen.toy.metrics's, as in the
toy DreamBench (scripts/evaluate_conceptrol.py): CP the concept's shape, colour, pattern and pattern
colour on the object showing most of them; PF the asked-for objects with their stated attributes;
CP·PF the product of the means. Every row gives its CP·PF less AlignGen's with a paired bootstrap 95 % interval
over the same images, and AlignGen - baseline is spelt out below the table.

Trained files go to <work>/<name>.safetensors (resumable: rerun the command); --force rewrites the
report, never a trained file. A run killed while drawing goes on where it stopped when the same command
runs again (each finished prompt's scores wait in <work>/journal.jsonl).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minigen.cli import Parser, check_seeds, draw_seed, positive_float, positive_int, run
from minigen.image import from_pil, to_pil
from minigen.journal import Journal
from minigen.loading.aligngen import TRAINING_KEY, load_aligngen, trained_settings
from minigen.loading.auto import load_pipeline
from minigen.loading.files import check_output_path, check_writable_folder, read_metadata, write_atomically
from minigen.loading.hashes import files_digest
from minigen.loading.toy import toy_layout
from minigen.methods.aligngen import aligngen_inputs, encode_prompt
from minigen.text.tokenizer import tokenize
from minigen.toy import scenes, world
from minigen.toy.captions import Caption, recontext_prompts
from minigen.toy.judge import judge
from minigen.toy.metrics import concept_preservation, prompt_following
from minigen.toy.statistics import paired_bootstrap, product_of_means
from minigen.trainer import base_fingerprint

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts this benchmark builds on
import train_aligngen  # noqa: E402

VARIANTS = {  # name: (the table's label, train_aligngen.py flags beyond the shared ones)
    "baseline": ("baseline: reference tokens + LoRA (OminiControl-style)", ["--no-s-star", "--no-mask", "--no-strategy"]),
    "aligngen": ("AlignGen", []),
    "no-s-star": ("AlignGen without S*", ["--no-s-star"]),
    "no-dem": ("AlignGen without the DEM", ["--no-dem"]),
    "no-mask": ("AlignGen without the mask", ["--no-mask"]),
    "no-strategy": ("AlignGen without the training strategy", ["--no-strategy"]),
    "dropout-0": ("AlignGen, reference dropout 0", ["--dropout", "0"]),
    "dropout-0.25": ("AlignGen, reference dropout 0.25", ["--dropout", "0.25"]),
    "dropout-0.75": ("AlignGen, reference dropout 0.75", ["--dropout", "0.75"]),
}
BASE = "base model (no reference)"
REFERENCE_SEED = 0


# ---- Training -------------------------------------------------------------------------------------
def train_variants(variants: list[str], args: argparse.Namespace) -> dict[str, Path]:
    """Each variant's trained file, trained by scripts/train_aligngen.py where it is not there yet."""
    shared = ["--model", str(args.model), "--toy-pairs", str(args.pairs), "--steps", str(args.steps), "--batch", str(args.batch),
              "--seed", str(args.seed), "--lr-lora", str(args.lr), "--lr-dem", str(args.lr)]  # fmt: skip
    files = {}
    for variant in variants:
        files[variant] = args.work / f"{variant}.safetensors"
        flags = [*shared, *VARIANTS[variant][1], "--out", str(files[variant])]
        if files[variant].exists():
            check_trained_as_asked(files[variant], flags)
        else:
            print(f"training {variant}: python scripts/train_aligngen.py {shlex.join(flags)}")
            train_aligngen.main(flags)
    shifts = {variant: trained_settings(file).reference_shift for variant, file in files.items()}
    if len(set(shifts.values())) > 1:  # files trained before AlignGenSettings.reference_shift sit right, newer ones left
        raise ValueError(f"the variants' references sit on different sides of the image ({shifts}): rows would not compare; "
                         "give another --work to train them all anew")
    return files


def check_trained_as_asked(path: Path, flags: list[str]) -> None:
    """A file already in the work folder is measured only if its metadata records the training that
    train_aligngen.py's `flags` ask for (base model, steps, pairs, batch, seed, rates, the variant's switches): rows
    trained otherwise would not compare."""
    asked = train_aligngen.parse(flags)
    method, training = train_aligngen.settings_from(asked)
    metadata, trained = read_metadata(path), trained_settings(path)
    record = json.loads(metadata.get(TRAINING_KEY, "{}"))
    switches, rates = ("s_star", "dem", "mask"), ("reference_dropout", "strategy", "lr_dem", "lr_lora")
    found = {"model": metadata.get("model"), "steps": metadata.get("steps"), "pairs": metadata.get("pairs"), "batch": record.get("batch"), "seed": record.get("seed"),
             **{k: getattr(trained, k) for k in switches},
             **{k: record.get("training", {}).get(k) for k in rates}}  # fmt: skip
    wanted = {"model": str(asked.model), "steps": str(asked.steps), "pairs": str(asked.toy_pairs), "batch": asked.batch, "seed": asked.seed,
              **{k: getattr(method, k) for k in switches}, **{k: getattr(training, k) for k in rates}}  # fmt: skip
    if differ := [f"{key} {wanted[key]} (the file: {found[key]})" for key in wanted if found[key] != wanted[key]]:
        raise ValueError(f"{path} was trained otherwise than asked: {', '.join(differ)}; run with the flags it was trained with, or give another --work to train anew")


# ---- The prompts ----------------------------------------------------------------------------------
def concept_prompts(concept: world.PersonalConcept, n: int, layout: str) -> list[Caption]:
    """The first `n` recontextualization prompts of the concept whose class word appears once."""
    found, pool = [], n
    while len(found) < n:
        pool *= 2
        captions = [c for _, c in recontext_prompts(concept, pool, identifier=None, layout=layout)]
        found = [c for c in captions if len(re.findall(rf"(?<!\w){concept.shape}(?!\w)", c.text)) == 1][:n]
    return found


@torch.no_grad()
def redux_stand_in(pipe, concept: world.PersonalConcept) -> torch.Tensor:
    """[1, R, d]: the T5 states of the look's description, what training gave the DEM for a reference."""
    ids = tokenize(pipe.t5_tokenizer, [concept.description], pipe.max_length).to(pipe.t5.device)
    return pipe.t5(ids).last_hidden_state.float()


# ---- Drawing and scoring --------------------------------------------------------------------------
def draw(pipe, aligngen, settings, caption: Caption, concept, reference, redux, steps: int, seed: int) -> torch.Tensor:
    """One image [1, 3, H, W]: the base model's when `aligngen` is None."""
    if aligngen is None:
        return pipe.generate(caption.text, steps=steps, seed=seed, progress=False)
    encoded = encode_prompt(pipe, caption.text, [concept.shape], s_star=settings.s_star, placeholder=aligngen.config.placeholder)
    inputs = aligngen_inputs(aligngen, pipe.vae, pipe.transformer, encoded.txt, encoded.pooled, encoded.concepts, [reference], [redux], settings)
    return pipe.generate(**inputs.generate_kwargs(), steps=steps, seed=seed, progress=False)


def evaluate(pipe, files: dict[str, Path], concepts: list, n_prompts: int, steps: int, seed: int, layout: str,
             journal: Journal) -> tuple[list[dict], float]:  # fmt: skip
    """Per image: the concept, prompt, condition, CP and PF; and the seconds the drawing took. A prompt the
    journal holds (a killed run's, under every condition) is read back, not drawn again."""
    conditions = {BASE: (None, None), **{VARIANTS[name][0]: (load_aligngen(path, pipe.transformer), trained_settings(path)) for name, path in files.items()}}
    keys = [f"{concept.name}/{i}" for concept in concepts for i in range(n_prompts)]
    with tqdm(total=len(keys) * len(conditions), desc="generations", unit="image") as bar:
        for concept in concepts:
            reference = from_pil(scenes.reference_images(concept, n=1, seed=REFERENCE_SEED, layout=layout)[0].image)
            redux = redux_stand_in(pipe, concept)
            for i, caption in enumerate(concept_prompts(concept, n_prompts, layout)):
                if f"{concept.name}/{i}" in journal.done:
                    bar.update(len(conditions))
                    continue
                start, records = time.time(), []
                for label, (aligngen, settings) in conditions.items():
                    found = judge(to_pil(draw(pipe, aligngen, settings, caption, concept, reference, redux, steps, seed + i))[0])
                    cp, pf = concept_preservation(found, concept), prompt_following(found, caption)
                    records.append({"concept": concept.name, "prompt": i, "text": caption.text, "condition": label, "cp": cp, "pf": pf})
                    bar.update()
                journal.add(f"{concept.name}/{i}", {"records": records, "seconds": time.time() - start})
    finished = [journal.done[key] for key in keys]
    return [r for done in finished for r in done["records"]], sum(done["seconds"] for done in finished)


def summary(records: list[dict]) -> dict:
    cp, pf = (float(np.mean([r[k] for r in records])) for k in ("cp", "pf"))
    return {"cp": cp, "pf": pf, "cp_pf": cp * pf, "n": len(records)}


def paired_difference(records: list[dict], better: str, baseline: str) -> tuple[float, float, float]:
    """CP·PF(better) - CP·PF(baseline) over the same images, with its paired bootstrap 95 % interval (the
    toy DreamBench's: minigen/toy/statistics.py)."""
    a, b = (np.array([[r["cp"], r["pf"]] for r in records if r["condition"] == c]) for c in (better, baseline))
    return paired_bootstrap(a, b, product_of_means)


def report(records: list[dict], settings: dict) -> str:
    by = {c: summary([r for r in records if r["condition"] == c]) for c in dict.fromkeys(r["condition"] for r in records)}
    lines = [f"# The toy misalignment benchmark: AlignGen on toy-flux ({settings['concepts']} concepts x {settings['prompts']} prompts, "
             f"{settings['steps']} steps)", "",
             f"Command: `{settings['command']}` ({settings['seconds']:.0f} s for {len(records)} generations, torch {settings['torch']}).",
             f"Training of every variant: {settings['training']}.", "",
             "| condition | CP | PF | CP·PF | n | CP·PF − AlignGen's [95 %] |", "|---|---|---|---|---|---|"]  # fmt: skip
    method, baseline = VARIANTS["aligngen"][0], VARIANTS["baseline"][0]
    for c, s in by.items():  # each row against AlignGen over the same images, where AlignGen was drawn
        against = "" if c == method or method not in by else "{:+.3f} [{:+.3f}, {:+.3f}]".format(*paired_difference(records, c, method))
        lines.append(f"| {c} | {s['cp']:.3f} | {s['pf']:.3f} | {s['cp_pf']:.3f} | {s['n']} | {against} |")
    if method in by and baseline in by:
        diff, low, high = paired_difference(records, method, baseline)
        ratio = by[method]["cp_pf"] / by[baseline]["cp_pf"] if by[baseline]["cp_pf"] else float("nan")
        lines += ["", f"AlignGen - baseline, CP·PF over the same {by[method]['n']} images: {diff:+.3f} [{low:+.3f}, {high:+.3f}] "
                  f"(95 % paired bootstrap); ratio {ratio:.2f}x (the issue asks for 1.1x or more); "
                  f"CP {by[method]['cp'] - by[baseline]['cp']:+.3f}, PF {by[method]['pf'] - by[baseline]['pf']:+.3f}."]  # fmt: skip
    lines += ["", "See scripts/evaluate_aligngen.py for the prompts, the references, the Redux stand-in and the variants."]
    return "\n".join(lines) + "\n"


# ---- The command ----------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder of the trained variants and the report")
    parser.add_argument("--model", default="toy-flux", help="the toy-flux to train and measure on (default: the shipped one)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"which of {list(VARIANTS)} (default: all)")
    parser.add_argument("--concepts", type=positive_int, default=len(world.CONCEPTS), help="the first N personal concepts")
    parser.add_argument("--prompts", type=positive_int, default=10, help="prompts per concept")
    parser.add_argument("--steps", type=positive_int, default=25, help="sampling steps")
    parser.add_argument("--seed", type=draw_seed, default=0, help="training seed; prompt i is drawn from seed + i")
    parser.add_argument("--pairs", type=positive_int, default=1024, help="toy pairs to train on")
    parser.add_argument("--train-steps", dest="train_steps", type=positive_int, default=6000, help="training steps of every variant")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="the DEM's and the LoRA's learning rate (S*'s stays train_aligngen's)")
    parser.add_argument("--force", action="store_true", help="rewrite an existing report (and start afresh over a killed run of other settings)")
    args = parser.parse_args(argv)
    check_seeds(parser, args.seed, args.prompts, "--prompts")  # before the trainings, not at the first drawing after them
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants {' '.join(unknown)}: not a variant; choose from {list(VARIANTS)}")
    if args.concepts > len(world.CONCEPTS):
        parser.error(f"--concepts {args.concepts}: the toy world has {len(world.CONCEPTS)} personal concepts")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    check_writable_folder(args.work, "--work")
    command = "python scripts/evaluate_aligngen.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    args.work.mkdir(parents=True, exist_ok=True)
    table = check_output_path(args.work / "aligngen_toy-flux.md", overwrite=args.force, suffix=".md", flag="--force")  # refused before any training
    files = train_variants(args.variants, argparse.Namespace(**{**vars(args), "steps": args.train_steps}))
    pipe, layout = load_pipeline(args.model), toy_layout(args.model)
    drawn = {k: v for k, v in vars(args).items() if k not in ("work", "force")}
    journal = Journal(args.work / "journal.jsonl", {**drawn, "base_fingerprint": base_fingerprint(pipe),
                                                    "trained": files_digest(*files.values())}, restart=args.force)  # fmt: skip
    journal.report_resumed(args.concepts * args.prompts, "prompts")
    records, seconds = evaluate(pipe, files, list(world.CONCEPTS[: args.concepts]), args.prompts, args.steps, args.seed, layout, journal)
    settings = {"command": command, "model": str(args.model), "layout": layout, "concepts": args.concepts, "prompts": args.prompts,
                "steps": args.steps, "seconds": seconds, "torch": torch.__version__,
                "training": f"{args.pairs} toy pairs, {args.train_steps} steps of {args.batch}, seed {args.seed}, "
                            f"DEM and LoRA lr {args.lr:g}"}  # fmt: skip
    results = {"settings": settings, "summary": {c: summary([r for r in records if r["condition"] == c]) for c in dict.fromkeys(r["condition"] for r in records)},
               "images": records}  # fmt: skip
    text = report(records, settings)
    for path, content in ((table.with_suffix(".json"), json.dumps(results, indent=1) + "\n"), (table, text)):
        write_atomically(path, lambda file: file.write(content.encode()), overwrite=True)
    journal.close()
    print(text)
    return results


if __name__ == "__main__":
    sys.exit(run(main, resumes=True))
