"""Personalized Residuals on toy-sd: train per concept, then compare four ways of drawing it.

    python scripts/evaluate_residuals.py --concepts 10 --prompts 40 --out docs/residuals_toy-sd.md --force   # ~35 min on 2 CPU cores

For each personal concept (its 6 reference renders, "a sks <shape>", the paper's recipe) this trains
Personalized Residuals and, as the baseline, a LoRA on the attention q/k/v/out projections with the
same recipe, timing both. Then over fixed recontextualization prompts (the concept on a new
background, beside 0-2 other objects: "a sks star to the left of a small blue circle on grass") it
draws, with the same seeds:

    class only        the base model, identifier removed ("a star to the left of ...")
    residuals         the residuals everywhere
    residuals + LAG   the residuals where each block's cross-attention finds "sks star"
    attention LoRA    the baseline

and measures with the judge: concept preservation (the concept's shape, colour, pattern and pattern
colour on the best object), prompt following (the concept as its class word, the other objects
with their stated attributes, no extras), background (the prompt's background is the judged one),
and change outside the concept: the mean absolute pixel change against the base model with the
same prompt and seed, outside the judged concept masks of both images (0..1 scale).

Trainings resume from their checkpoints in --work, and a killed run's finished concepts wait in
<work>/<model>-seed<seed>/journal.jsonl: the same command goes on where it stopped.
"""

from __future__ import annotations

import argparse
import sys
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from minigen import cli
from minigen.controls import Controls, LowRank
from minigen.image import to_pil
from minigen.loading.auto import load_pipeline
from minigen.journal import Journal
from minigen.loading.files import check_output_path, check_writable_folder, write_atomically
from minigen.methods.lora_factors import check_rank
from minigen.methods.residuals import TRAINING, Residuals, concept_tokens, lag_controls, train_residuals
from minigen.pipelines.sd import StableDiffusion
from minigen.toy import world
from minigen.toy.captions import recontext_prompts
from minigen.toy.data import concept_references
from minigen.toy.evaluate import SD_CFG
from minigen.toy.judge import judge, judge_background
from minigen.toy.metrics import concept_preservation, concept_score, outside_change, prompt_following
from minigen.toy.statistics import mean_value, paired_bootstrap
from minigen.trainer import base_fingerprint

IDENTIFIER = "sks"
CONDITIONS = ("class only", "residuals", "residuals + LAG", "attention LoRA")


class AttentionLoRA(nn.Module):
    """The baseline: LoRA factors on to_q, to_k, to_v and to_out.0 of every attention layer (down
    random, up zero, as LoRA starts), with the same `low_rank` / `controls` interface as `Residuals`."""

    def __init__(self, unet: nn.Module, rank: int, generator: torch.Generator):
        super().__init__()
        self.targets = [f"{path}.{attn}.{proj}" for path in unet.attention_layers().values()
                        for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")]  # fmt: skip
        check_rank(rank, [unet.get_submodule(target).weight for target in self.targets])
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        for target in self.targets:
            out_features, in_features = unet.get_submodule(target).weight.shape
            self.down.append(nn.Parameter(torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)))
            self.up.append(nn.Parameter(torch.zeros(out_features, rank)))

    def low_rank(self, scale: float = 1.0) -> list[LowRank]:
        return [LowRank(t, d, u, scale) for t, d, u in zip(self.targets, self.down, self.up)]

    def controls(self, *, scale: float = 1.0) -> Controls:  # named: passed as a step function it would fail, not read the step as a scale
        return Controls(low_rank=self.low_rank(scale))

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


def concept_masks(image, concept: world.PersonalConcept) -> np.ndarray:
    """Union of the judged objects that show at least half of the concept's look (shape, colour,
    pattern, pattern colour): where the concept is drawn, if anywhere."""
    masks = [o.mask for o in judge(image) if concept_score(o, concept) >= 0.5]
    return np.any(masks, axis=0) if masks else np.zeros((image.height, image.width), bool)


def evaluate_concept(pipe, concept: world.PersonalConcept, n_prompts: int, lora_rank: int, work: Path, seed: int) -> dict:
    references = concept_references(concept.name, 6)
    prompt = f"a {IDENTIFIER} {concept.shape}"
    residuals = Residuals(pipe.unet, identifier=IDENTIFIER, macro_class=concept.shape, generator=torch.Generator().manual_seed(seed))
    lora = AttentionLoRA(pipe.unet, lora_rank, torch.Generator().manual_seed(seed))
    seconds = {}  # {"seconds", "steps"} trained in this run; fewer steps than the recipe's where a checkpoint in `work` resumed
    for name, module in (("residuals", residuals), ("attention LoRA", lora)):
        start = time.time()
        losses = train_residuals(pipe, module, references, prompt, TRAINING, work / concept.name / name.replace(" ", "-"), log_every=50)
        seconds[name] = {"seconds": time.time() - start, "steps": len(losses)}
        module.requires_grad_(False)

    pairs = recontext_prompts(concept, n_prompts, IDENTIFIER)
    texts = [c.text for _, c in pairs]
    class_only = [t.replace(f"{IDENTIFIER} ", "") for t in texts]
    n = len(texts)

    side = pipe.default_size // pipe.vae.config.downsample_factor
    noise = torch.randn(n, pipe.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(seed))  # one start per prompt, every condition

    def draw(prompts, controls, rows=slice(None)):
        with torch.no_grad():
            images = pipe.generate(prompts, steps=25, cfg=SD_CFG, controls=controls, latents=noise[rows], progress=False)
        return to_pil(images)

    def draw_lag():  # one prompt at a time: each names the concept at its own token positions
        return [draw([t], lag_controls([(residuals, concept_tokens(pipe.tokenizers[0], t, residuals), 1.0)]),
                     slice(i, i + 1))[0] for i, t in enumerate(texts)]  # fmt: skip

    conditions = {
        "class only": lambda: draw(class_only, None),
        "residuals": lambda: draw(texts, residuals.controls()),
        "residuals + LAG": draw_lag,
        "attention LoRA": lambda: draw(texts, lora.controls()),
        "base": lambda: draw(texts, None),  # the same prompts without the concept: what "outside" compares against
    }
    images = {name: make() for name, make in tqdm(conditions.items(), desc=f"sampling {concept.name}", unit="condition")}
    same_prompt_base = images.pop("base")
    results, preservation = {}, {}
    for condition, pictures in images.items():
        rows = []
        for picture, (scene, caption), base in zip(pictures, pairs, same_prompt_base):
            drawn = concept_masks(picture, concept) | concept_masks(base, concept)  # the concept in either image
            rows.append({
                "concept_preservation": concept_preservation(picture, concept),
                "prompt_following": prompt_following(picture, caption),
                "background": float(judge_background(picture) == scene.background),
                "outside_change": outside_change(base, picture, drawn),
            })  # fmt: skip
        results[condition] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        preservation[condition] = [r["concept_preservation"] for r in rows]
    return {"train_seconds": seconds, "results": results, "preservation": preservation, "images": images}


def duration(trained: dict) -> str:
    """A training's time as the table gives it: the seconds of a whole training, or what was resumed."""
    if trained["steps"] == 0:
        return "resumed"
    if trained["steps"] < TRAINING.steps:
        return f"{trained['seconds']:.1f} for the last {trained['steps']} of {TRAINING.steps} steps (resumed)"
    return f"{trained['seconds']:.1f}"


def main(argv=None) -> None:
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=cli.positive_int, default=5, help="the first N personal concepts of the toy world")
    parser.add_argument("--prompts", type=cli.positive_int, default=20, help="recontextualization prompts per concept")
    parser.add_argument("--lora-rank", type=cli.positive_int, default=8)
    parser.add_argument("--seed", type=cli.draw_seed, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/residuals-eval"),
                        help="trained factors in <work>/<model>-seed<seed>/<concept>/ (a rerun resumes from them; runs before 2026-12-07 kept them in <work>/<concept>/: move them there to reuse them)")
    parser.add_argument("--model", default="toy-sd", help="the toy-sd to evaluate: toy-sd (the shipped weights) or an exported toy-sd file")
    parser.add_argument("--out", type=Path, help="write the table (markdown) here as well")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out (and start afresh over a killed run of other settings)")
    args = parser.parse_args(argv)
    if args.concepts > len(world.CONCEPTS):
        parser.error(f"--concepts {args.concepts}: the toy world has {len(world.CONCEPTS)} personal concepts")
    check_writable_folder(args.work, "--work")
    if args.out:
        check_output_path(args.out, overwrite=args.force, suffix=".md", flag="--force")  # before the trainings and samples
    pipe = load_pipeline(args.model)
    if not isinstance(pipe, StableDiffusion):
        sys.exit(f"--model {args.model}: Personalized Residuals sit on an SD UNet's proj_out layers; give an SD model (default toy-sd)")
    concepts = world.CONCEPTS[: args.concepts]
    probe = Residuals(pipe.unet, identifier=IDENTIFIER, macro_class="star")
    lora_params = AttentionLoRA(pipe.unet, args.lora_rank, torch.Generator()).parameter_count()
    work = args.work / f"{Path(args.model).stem}-seed{args.seed}"  # the factors start from the seed: each seed trains its own
    settings = {"model": str(args.model), "base": base_fingerprint(pipe), "prompts": args.prompts, "lora_rank": args.lora_rank}
    journal = Journal(work / "journal.jsonl", settings, restart=args.force)  # a killed run's finished concepts
    journal.report_resumed(len(concepts), "concepts")
    for concept in concepts:
        if concept.name not in journal.done:
            journal.add(concept.name, {k: v for k, v in evaluate_concept(pipe, concept, args.prompts, args.lora_rank, work, args.seed).items() if k != "images"})
    per_concept = {c.name: journal.done[c.name] for c in concepts}

    lines = [f"# Personalized Residuals on {args.model} ({len(concepts)} concepts x {args.prompts} prompts, 25 steps, CFG {SD_CFG})", "",
             f"Trainable parameters: residuals {probe.parameter_count():,}, attention LoRA (rank {args.lora_rank}) {lora_params:,} "
             f"({lora_params / probe.parameter_count():.1f}x). Recipe for both: {TRAINING.steps} steps, batch {TRAINING.batch}, "
             f"lr {TRAINING.lr}, 6 references, prompt 'a {IDENTIFIER} <shape>'.", "",
             "| condition | concept preservation | prompt following | background | change outside the concept |",
             "|---|---|---|---|---|"]  # fmt: skip
    for condition in CONDITIONS:
        means = {k: np.mean([r["results"][condition][k] for r in per_concept.values()]) for k in per_concept[concepts[0].name]["results"][condition]}
        lines.append(f"| {condition} | {means['concept_preservation']:.3f} | {means['prompt_following']:.3f} | "
                     f"{means['background']:.3f} | {means['outside_change']:.4f} |")  # fmt: skip
    lines += ["", "Training time per concept (s, this machine; \"resumed\" where --work held the trained factors): " + ", ".join(
        f"{name}: residuals {duration(r['train_seconds']['residuals'])}, LoRA {duration(r['train_seconds']['attention LoRA'])}"
        for name, r in per_concept.items())]  # fmt: skip
    pooled = {c: [x for r in per_concept.values() for x in r["preservation"][c]] for c in CONDITIONS}
    lines += ["", f"Paired differences in concept preservation over all {len(pooled[CONDITIONS[0]])} concept x prompt pairs "
              "(mean, 95 % bootstrap interval):"]  # fmt: skip
    for a, b in (("residuals", "attention LoRA"), ("residuals", "class only"), ("attention LoRA", "class only"), ("residuals + LAG", "residuals")):
        mean, low, high = paired_bootstrap(np.array(pooled[a])[:, None], np.array(pooled[b])[:, None], mean_value)
        lines.append(f"- {a} - {b}: {mean:+.3f} [{low:+.3f}, {high:+.3f}]")
    lines += ["", "Per concept (concept preservation: class only / residuals / + LAG / LoRA):"]
    lines += [f"- {name}: " + " / ".join(f"{r['results'][c]['concept_preservation']:.2f}" for c in CONDITIONS) for name, r in per_concept.items()]
    table = "\n".join(lines) + "\n"
    print(table)
    print(json.dumps({name: {"train_seconds": r["train_seconds"], "results": r["results"]} for name, r in per_concept.items()}, indent=1))
    if args.out:
        write_atomically(args.out, lambda file: file.write(table.encode()), overwrite=args.force)
    journal.close()


if __name__ == "__main__":
    sys.exit(cli.run(main, resumes=True))  # bad input: one line on stderr, exit code 2, no traceback
