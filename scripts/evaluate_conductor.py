"""Concept Conductor on the toy world: two similar personal concepts in one image, judged from pixels.

    python scripts/evaluate_conductor.py --pair my_heart my_heart_2 --layouts 8      # toy-sd, -> runs/conductor-eval/

Two personal concepts of one shape (my_heart and my_heart_2: a pink heart with green checks and a
black heart with yellow dots) get an ED-LoRA each (scripts/train_edlora.py's recipe, cached in
--work). Each layout is a toy render with two plain objects of that shape where the concepts go: its
masks are the objects' exact masks, and its caption the reference prompt. Per layout and method one
image, read back by the toy judge; per method the mean over layouts of

    omission   an image in which some concept is not found (no object with >= 3 of its 4 traits)
    CP         each concept's traits (shape, colour, pattern, pattern colour) on the object matched
               to it (the best one-to-one matching of objects to concepts), averaged
    leakage    the other concept's distinct traits (those the two concepts do not share) on each
               matched object, averaged
    layout     IoU of each matched object's mask with its reference mask, averaged
    PF         prompt following of both concepts' looks (shape, colour, pattern) on the background

Methods: `naive` (both ED-LoRAs in one model: both UNet LoRAs applied, the prompt names both
concepts with their layer-wise words), `conductor`, and the paper's ablations `no-layout` (no layout
alignment) and `no-refine` (the reference masks kept). The schedule is shortened to --steps DDIM
steps with the official windows scaled to it (alignment over the first 30 %, refinement from 25 % to
40 %). The table goes to <work>/table.md and the numbers to <work>/results.json. A killed run goes on
where it stopped when the same command runs again (each finished layout's scores wait in
<work>/journal.jsonl; to draw them again, delete it and pass --force); --force replaces an earlier
run's images, table and numbers, and starts afresh over a killed run of other settings (one of the
same settings is resumed).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from minigen import cli
from minigen.image import from_pil, save_png, to_pil
from minigen.journal import Journal
from minigen.loading.auto import load_pipeline
from minigen.loading.files import check_writable_folder, read_metadata, write_atomically
from minigen.loading.edlora import EDLoRA, edlora_low_rank, layerwise_prompt_embeddings, read_edlora
from minigen.controls import Controls
from minigen.methods.concept_conductor import Concept, ConceptConductor, ConductorSettings, Reference, as_noise, ddim_step, invert_reference
from minigen.models.unet import UNet
from minigen.pipelines.sd import StableDiffusion
from minigen.text.encoders import encode_sd1
from minigen.toy import judge, metrics, scenes, world
from minigen.trainer import fingerprint

METHODS = ("naive", "conductor", "no-layout", "no-refine")
TRAITS = ("shape", "color", "pattern", "pattern_color")
JOURNAL = "journal.jsonl"  # a killed run's finished layouts, in --work


def parse(argv=None) -> argparse.Namespace:
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-sd")
    p.add_argument("--pair", nargs=2, default=["my_heart", "my_heart_2"], choices=[c.name for c in world.CONCEPTS])
    p.add_argument("--layouts", type=cli.positive_int, default=8)
    p.add_argument("--steps", type=cli.positive_int, default=50, help="DDIM steps (the official 200, windows scaled)")
    p.add_argument("--train-steps", type=cli.positive_int, default=300, help="ED-LoRA training steps per concept")
    p.add_argument("--background", default="sand", choices=list(world.BACKGROUNDS))
    p.add_argument("--seed", type=cli.draw_seed, default=0)
    p.add_argument("--work", type=Path, default=Path("runs/conductor-eval"), help="trained ED-LoRAs and inversions (reused), images and table")
    p.add_argument("--force", action="store_true", help="replace the images and table of an earlier run in --work (and start afresh over a killed run of other settings)")
    args = p.parse_args(argv)
    check_writable_folder(args.work, "--work")
    cli.check_seeds(p, args.seed, args.layouts, "--layouts")
    if args.pair[0] == args.pair[1]:
        p.error(f"--pair {' '.join(args.pair)}: name two different concepts (the study measures how one leaks into the other)")
    taken = sorted(path.name for path in earlier_outputs(args.work))
    if taken and not args.force and not (args.work / JOURNAL).exists():  # a killed run's images: the journal tells whether it resumes
        p.error(f"--work {args.work} holds an earlier run's {', '.join(taken[:3])}{' ...' if len(taken) > 3 else ''}; "
                "give another --work, or pass --force to replace them (its ED-LoRAs and inversions are reused)")
    return args


def earlier_outputs(work: Path) -> list[Path]:
    """The images, table and numbers an earlier run left in `work` (its ED-LoRAs and inversions are kept)."""
    return [*work.glob("layout*-*.png"), *(path for path in (work / "table.md", work / "results.json") if path.exists())]


def train(name: str, args: argparse.Namespace) -> Path:
    """The concept's ED-LoRA, trained once by scripts/train_edlora.py and kept in --work (named by the
    model and steps it was trained with, so that another --model or --train-steps trains its own)."""
    out = args.work / f"{name}-{Path(args.model).stem}-{args.train_steps}steps.safetensors"
    if not out.exists():
        spec = importlib.util.spec_from_file_location("train_edlora", Path(__file__).with_name("train_edlora.py"))
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        script.main(["--model", args.model, "--toy-concept", name, "--steps", str(args.train_steps), "--out", str(out)])
    return out


def layout(shapes: tuple[str, str], background: str, seed: int) -> tuple[scenes.Scene, scenes.Rendering]:
    """Two plain objects of the concepts' shapes in two plain colours, left and right with some jitter, on `background`."""
    rng = np.random.default_rng(seed)
    objects = tuple(
        scenes.ObjectSpec(shape, str(color), "large", x=x + rng.uniform(-3, 3), y=32 + rng.uniform(-6, 6), extent=24.0)
        for shape, color, x in zip(shapes, rng.choice(["red", "blue", "orange", "cyan"], 2, replace=False), (17.0, 47.0))
    )
    scene = scenes.Scene(background, objects)
    return scene, scenes.render(scene)


def match(found: list, concepts: list[world.PersonalConcept]) -> list:
    """The judged object of each concept (or None): the one-to-one assignment of highest total trait share."""
    best, best_score = [None] * len(concepts), -1.0
    slots = found + [None] * len(concepts)
    for chosen in itertools.permutations(range(len(slots)), len(concepts)):
        picked = [slots[i] for i in chosen]
        score = sum(metrics.concept_score(o, c) for o, c in zip(picked, concepts) if o is not None)
        if score > best_score:
            best, best_score = picked, score
    return best


def score(image, rendering: scenes.Rendering, concepts: list[world.PersonalConcept], base_scene: scenes.Scene) -> dict:
    found = judge.judge(image)
    matched = match(found, concepts)
    present = [o is not None and metrics.concept_score(o, c) >= 0.75 for o, c in zip(matched, concepts)]
    cp = [0.0 if o is None else metrics.concept_score(o, c) for o, c in zip(matched, concepts)]
    leak = []
    for i, (o, c) in enumerate(zip(matched, concepts)):
        other = concepts[1 - i]
        distinct = [t for t in TRAITS if getattr(other, t) != getattr(c, t)]
        leak.append(0.0 if o is None else float(np.mean([getattr(o, t) == getattr(other, t) for t in distinct])))
    ious = []
    for o, mask in zip(matched, rendering.masks):
        ious.append(0.0 if o is None else float((o.mask & mask).sum() / max((o.mask | mask).sum(), 1)))
    return {"omission": float(not all(present)), "cp": float(np.mean(cp)), "leakage": float(np.mean(leak)),
            "layout": float(np.mean(ious)), "pf": metrics.prompt_following(found, base_scene)}  # fmt: skip


def main(argv=None) -> dict:
    args = parse(argv)
    recorded = {k: str(v) for k, v in vars(args).items()}
    concepts = [world.concept(name) for name in args.pair]
    if concepts[0].shape != concepts[1].shape:
        print(f"note: {args.pair} have different shapes; the study is about similar concepts", file=sys.stderr)
    pipe, edloras, base = prepare_model_and_concepts(args)
    settings = method_settings(pipe.unet, args.steps)
    journal = open_journal(args, recorded, base)
    for index in range(args.layouts):
        if str(index) not in journal.done:
            scored = study_layout(index, args, pipe, edloras, concepts, settings, recorded)
            journal.add(str(index), scored)
            print(f"layout {index}: " + "; ".join(f"{m} CP {scored[m]['cp']:.2f}" for m in METHODS))
    table = write_results(args, recorded, journal)
    journal.close()
    return table


def prepare_model_and_concepts(args: argparse.Namespace) -> tuple[StableDiffusion, list[EDLoRA], str]:
    """The model, the pair's ED-LoRAs (trained once into --work) and the model's fingerprint; ED-LoRAs
    trained on another base model are refused."""
    args.work.mkdir(parents=True, exist_ok=True)
    files = [train(name, args) for name in args.pair]
    pipe = load_pipeline(args.model)
    base = fingerprint(pipe.unet, pipe.vae, pipe.text_encoders[0])  # as train_edlora.py records it
    for file in files:  # the cache is named by the model file's stem: a retrained model of that name is another base
        if (trained_on := read_metadata(file).get("base_fingerprint")) != base:
            sys.exit(f"{file} was trained on another base model (fingerprint {trained_on}; --model {args.model} has {base}): "
                     "delete it to train it anew on this model, or give another --work")
    return pipe, [read_edlora(f) for f in files], base


def method_settings(unet: UNet, steps: int) -> dict[str, ConductorSettings]:
    """The conductor's settings per method: the official windows scaled to `steps`, and the two ablations."""
    official = ConductorSettings.for_unet(unet, steps=steps, guidance_end=round(0.3 * steps), refine_start=round(0.25 * steps),
                                          refine_end=round(0.4 * steps), refine_interval=max(1, round(steps / 40)))  # fmt: skip
    return {"conductor": official, "no-layout": replace(official, guidance_end=-1), "no-refine": replace(official, refine_start=steps)}


def open_journal(args: argparse.Namespace, recorded: dict, base: str) -> Journal:
    """The journal of finished layouts, resumed when a killed run had these settings; a fresh start removes
    an earlier run's images, table and numbers."""
    journal = Journal(args.work / JOURNAL, {**{k: v for k, v in recorded.items() if k not in ("work", "force")}, "base_fingerprint": base},
                      restart=args.force)  # fmt: skip
    journal.report_resumed(args.layouts, "layouts")
    if not journal.resumed:  # a fresh start: an earlier run's images (of more layouts, say) would sit beside this run's results
        for path in earlier_outputs(args.work):
            path.unlink()
    return journal


def study_layout(index: int, args: argparse.Namespace, pipe: StableDiffusion, edloras: list[EDLoRA],
                 concepts: list[world.PersonalConcept], settings: dict[str, ConductorSettings], recorded: dict) -> dict:  # fmt: skip
    """Layout `index` drawn by every method from one noise: each image saved in --work and scored."""
    shapes = (concepts[0].shape, concepts[1].shape)
    scene, rendering = layout(shapes, args.background, args.seed + index)
    base_scene = scenes.Scene(args.background, tuple(scenes.ObjectSpec(c.shape, c.color, "large", c.pattern, c.pattern_color) for c in concepts))
    words = [" ".join(e.words) for e in edloras]
    context, uncond, paths, reference = conductor_inputs(pipe, edloras, words, scene, rendering, f"a {shapes[0]} and a {shapes[1]} on {args.background}", args)
    latent = pipe.default_size // pipe.vae.config.downsample_factor
    noise = torch.randn(1, pipe.unet.config.in_channels, latent, latent, generator=torch.Generator().manual_seed(args.seed + index))
    scored = {}
    for method in METHODS:
        with torch.no_grad():
            if method == "naive":
                z = naive(pipe, noise, edloras, words, args.background, args.steps)
            else:
                z = ConceptConductor(pipe.unet, settings[method], pipe.schedule).sample(noise, context, uncond, paths, reference, progress=False)
            image = to_pil(pipe.vae.decode_images(z))[0]
        save_png(image, args.work / f"layout{index}-{method}.png", {"layout": index, "method": method, **recorded}, overwrite=True)
        scored[method] = score(image, rendering, concepts, base_scene)
    return scored


def conductor_inputs(
    pipe: StableDiffusion, edloras: list[EDLoRA], words: list[str], scene: scenes.Scene, rendering: scenes.Rendering, prompt: str,
    args: argparse.Namespace,
) -> tuple[torch.Tensor, torch.Tensor, list[Concept], Reference]:
    """The conductor's inputs for one layout: the base `prompt`'s and ""'s contexts [77, C], each concept on its
    object's mask (its layer-wise words on the background), and the layout's render inverted under its caption
    (cached in <work>/inversions)."""
    encoder, tokenizer = pipe.text_encoders[0], pipe.tokenizers[0]
    latent = pipe.default_size // pipe.vae.config.downsample_factor
    reference_prompt = " and ".join(world.describe(o.shape, o.color) for o in scene.objects) + f" on {args.background}"
    with torch.no_grad():
        context, uncond, ref_context = encode_sd1(encoder, tokenizer, [prompt, "", reference_prompt])
    masks = [torch.from_numpy(m.astype(np.float32))[None, None] for m in rendering.masks]
    masks = [torch.nn.functional.interpolate(m, size=(latent, latent), mode="bilinear", antialias=True)[0, 0] > 0.5 for m in masks]
    paths = [
        Concept(
            context=layerwise_prompt_embeddings(encoder, tokenizer, f"a {w} on {args.background}", e),
            uncond=layerwise_prompt_embeddings(encoder, tokenizer, "", e),
            low_rank=edlora_low_rank(e, pipe.unet),
            mask=m.float(),
        )
        for w, e, m in zip(words, edloras, masks)
    ]  # fmt: skip
    with torch.no_grad():
        z0 = pipe.vae.encode_images(from_pil(rendering.image))
    reference = invert_reference(pipe.unet, z0, ref_context, steps=args.steps, schedule=pipe.schedule, cache=args.work / "inversions", progress=False)
    return context, uncond, paths, reference


def write_results(args: argparse.Namespace, recorded: dict, journal: Journal) -> dict:
    """Each method's mean scores over the layouts: <work>/table.md (also printed) and, with every layout's
    scores, <work>/results.json."""
    results = {method: [journal.done[str(index)][method] for index in range(args.layouts)] for method in METHODS}
    table = {m: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for m, rs in results.items()}
    lines = ["| method | omission | CP | leakage | layout IoU | PF |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {t['omission']:.2f} | {t['cp']:.3f} | {t['leakage']:.3f} | {t['layout']:.3f} | {t['pf']:.3f} |" for m, t in table.items()]
    report = ("\n".join(lines) + "\n").encode()
    write_atomically(args.work / "table.md", lambda file: file.write(report), overwrite=True)  # --force was checked at the start
    data = json.dumps({"args": recorded, "table": table, "per_layout": results}, indent=1).encode()
    write_atomically(args.work / "results.json", lambda file: file.write(data), overwrite=True)
    print("\n".join(lines))
    return table


def naive(pipe, noise, edloras, words, background, steps):
    """Both ED-LoRAs in one model: both UNet LoRAs on every row, one prompt naming both concepts
    (layer-wise, both text LoRAs merged), DDIM with CFG 7.5 as the conductor's loop."""
    encoder, tokenizer = pipe.text_encoders[0], pipe.tokenizers[0]
    context = layerwise_prompt_embeddings(encoder, tokenizer, f"a {words[0]} and a {words[1]} on {background}", edloras)
    uncond = layerwise_prompt_embeddings(encoder, tokenizer, "", edloras)
    conductor = ConceptConductor(pipe.unet, ConductorSettings.for_unet(pipe.unet, steps=steps))
    contexts = conductor.contexts([context, uncond])
    controls = Controls(contexts=contexts, low_rank=[d for e in edloras for d in edlora_low_rank(e, pipe.unet)])
    abar = pipe.schedule.alphas_cumprod()
    timesteps = [int(t) for t in pipe.schedule.timesteps(steps)]
    z = noise
    for i, t in enumerate(timesteps):
        cond, un = pipe.unet(torch.cat([z, z]), torch.full((2,), float(t)), None, controls=controls).chunk(2)
        eps = as_noise(un + 7.5 * (cond - un), z, abar[t], pipe.schedule.prediction_type)
        z = ddim_step(z, eps, abar[t], abar[timesteps[i + 1] if i + 1 < len(timesteps) else 0])
    return z


if __name__ == "__main__":
    sys.exit(cli.run(main, resumes=True))  # bad input: one line on stderr, exit code 2, no traceback
