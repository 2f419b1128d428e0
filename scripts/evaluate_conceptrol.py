"""The toy DreamBench: Conceptrol against the reference adapter alone on toy-sd (IP-Adapter) and toy-flux
(OminiControl), judged from pixels.

    python scripts/evaluate_conceptrol.py --concepts 10 --prompts 20 [--ablations]   # -> runs/dreambench/conceptrol_toy-sd.md, .json, .png
    python scripts/evaluate_conceptrol.py --model toy-flux --concepts 10 --prompts 20  # -> runs/dreambench/conceptrol_toy-flux.md, ...

(The shipped toy adapter by default, `--adapter runs/adapters/ip-adapter-plus_toy-sd.safetensors` for a
freshly trained one; 600 images, about 7 minutes on one CPU thread; with --ablations 4,000 images,
about an hour. On toy-flux, 600 images in about 4 minutes on two threads.)

DreamBench asks a personalization method to draw a subject, shown in a reference image, in new
contexts named by prompts; DreamBench++ scores each image for concept preservation (CP: is it the
subject?) and prompt following (PF: is it the prompt?) and ranks methods by CP·PF. Here the subject
is a personal concept of the toy world (a pink heart with green checks, ...), its reference the
concept alone, large and centred on white or gray (`pairs.reference_scene`, as the adapter saw its
references in training; one fixed draw per concept), and the prompts the fixed recontextualization
prompts of `captions.recontext_prompts`: the concept named by its class word alone, as the adapter
was trained ("a heart below a little brown diamond at night"), beside 0, 1 or 2 other objects in turn
(0 or 1 on toy-flux, whose world holds two objects on the canvas halves), on varied backgrounds. Every
condition draws prompt i from the same starting noise (seed + i), 25 Euler steps with CFG 7.5, one
image per prompt:

    base model     toy-sd without the adapter: what the class word alone gives (a reference row)
    adapter alone  the IP-Adapter at scale 1 in every cross-attention layer, ungated, no warmup
    Conceptrol     the IP branch gated by the concept mask: the class word's text attention in the
                   concept block (default toy-sd's best block by mask AUC, up.1.0.0,
                   docs/attention_auc_toy-sd.md), IP scale 0 for the first 20 % of the steps

On toy-flux (`--model toy-flux`) the adapter is a toy OminiControl subject LoRA (`train_toy_adapters.py
flux`), the reference its condition tokens; 25 Euler steps with the model's true CFG (4), and:

    base model     toy-flux without the reference
    adapter alone  OminiControl: the condition group with its LoRA, every text and image token seeing
                   it (`ConceptrolFlux(mode="ominicontrol")`, condition scale 1)
    Conceptrol     the official FLUX Conceptrol: the class word's mask read at every depth-th block
                   call biases which image tokens see the condition, the other text tokens cannot
                   (`ConceptrolFlux`), condition scale 1, no warmup (the official FLUX demos' defaults)

The toy judge reads each image back into objects (`minigen.toy.judge`), and the metrics are
`minigen.toy.metrics`'s:

    CP        the concept's shape, colour, pattern and pattern colour on the object that shows most
              of them (`concept_preservation`), 0..1
    PF        the asked-for objects found with their stated attributes, extras counted against it
              (`prompt_following`); the concept is asked for by its class word (its shape), the
              other objects with every attribute their words state
    CP·PF     DreamBench++'s figure, the product of the mean CP and the mean PF over the images;
              the mean of the per-image products is given beside it
    leakage   the concept's traits on the other judged objects, traits the prompt asks of them
              excepted (`leakage`), averaged over the images whose prompt asks for other objects

and Conceptrol - adapter alone is given with a paired bootstrap 95 % interval (the same images
resampled for both, 10,000 times).

--ablations adds the paper's ablations on toy-sd (not toy-flux), each against the default settings above:

    IP scale     0.5, 0.75, 1, 1.25, 1.5, for the adapter alone and for Conceptrol
    warmup       0, 0.1, 0.2, 0.3, 0.4 of the steps, for Conceptrol
    mask source  the concept block (the default); a block whose attention finds the object less
                 well (default down.0.0.0, mask AUC 0.74 against up.1.0.0's 0.98); per-layer masks
                 (every layer gated by its own text attention: ConceptrolSD with global_masking=False);
                 and an oracle: at sampling there is no ground truth, so the oracle gates the IP
                 branch of every layer with one fixed mask, the judge's mask of the concept (the
                 object CP scores) in the image the adapter alone drew from the same noise, averaged
                 over each layer's token cells ("area"), with Conceptrol's warmup. It asks what a
                 mask that knows where the adapter puts the concept would give. The same mask grown
                 by 4 and by 8 pixels on every side (a cell of the 8x8 and of the 4x4 token grid)
                 asks whether a tight mask gates away part of what draws a small object.

Conditions that coincide (scale 1 and warmup 0.2 are the defaults) are drawn once. The markdown
holds the tables, the paired interval, per-concept rows and the command that regenerates it; beside
it, with the same stem, the JSON with every image's scores, `<stem>.png` (for the first two prompts
of each concept: the reference, then the base model, the adapter alone and Conceptrol from the same
noise) and, with --ablations, `<stem>_tradeoff.png` (CP against PF for the IP-scale and warmup sweeps
and the mask sources, the paper's trade-off plane). An existing output is refused unless --force.
A killed run goes on where it stopped when the same command runs again: each finished case (a prompt of
a concept under every condition) waits in `<stem>.journal.jsonl` beside --out until the outputs are written.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shlex
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from tqdm import tqdm

from minigen.cli import Parser, check_seeds, draw_seed, positive_int, run
from minigen.controls import Controls, ExtraTokens
from minigen.image import PLOT_COLORS, preprocess_clip, save_png, to_pil
from minigen.journal import Journal
from minigen.loading.files import check_writable, read_metadata, write_atomically
from minigen.loading.flux import load_flux
from minigen.loading.hashes import files_digest
from minigen.loading.ip_adapter import load_ip_adapter
from minigen.loading.lora_flux import read_flux_lora
from minigen.loading.sd import load_sd
from minigen.loading.toy import TOY_FLUX, TOY_SD, WEIGHTS, is_toy_flux_folder, toy_flux_folder_files, toy_ip_adapter_files, toy_layout, toy_subject_lora_file
from minigen.methods.conceptrol import ConceptrolFlux, ConceptrolSD, FluxConcept, SDConcept, default_concept_layer, flux_concepts, warmup_steps
from minigen.models.flux_tokens import TokenGroup
from minigen.models.ip_adapter import reference_tokens
from minigen.pipelines.flux import FluxPipeline
from minigen.text.spans import token_span
from minigen.toy import scenes, world
from minigen.toy.captions import Caption, recontext_prompts, shape_words
from minigen.toy.evaluate import SD_CFG
from minigen.toy.judge import JudgedObject, judge
from minigen.toy.metrics import concept_preservation, concept_score, expected_objects, leakage, prompt_following
from minigen.toy.pairs import reference_scene
from minigen.toy.statistics import RESAMPLES, mean_value, paired_bootstrap, product_of_means
from minigen.trainer import base_fingerprint

WARMUP = 0.2  # Conceptrol's default share of warmup steps (SD)
FLUX_WARMUP = 0.0  # on FLUX: the official demos' (the condition at scale 0.5 during a warmup)
SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)
WARMUPS = (0.0, 0.1, 0.2, 0.3, 0.4)
ORACLE_DILATIONS = (4, 8)  # pixels: a token cell of the 8x8 and of the 4x4 grid is 2 * d pixels wide
LOW_AUC_LAYER = "down.0.0.0"  # toy-sd's lowest mask AUC, 0.74 (docs/attention_auc_toy-sd.md)
PER_LAYER = "per-layer"
REFERENCE_SEED = 0
GRID_PROMPTS = 2  # prompts per concept shown in the image grid


# ---- What is drawn --------------------------------------------------------------------------------
class Condition(NamedTuple):
    """How an image is drawn. method: "base" (no adapter), "adapter" (the IP branch ungated),
    "conceptrol" (gated by the concept mask read at `mask`, a block id, or PER_LAYER: each layer its
    own), "oracle" (gated by the judge's mask of the concept in the adapter-alone image, grown by
    `dilate` pixels on every side)."""

    method: str
    scale: float = 1.0
    warmup: float = 0.0
    mask: str | None = None
    dilate: int = 0

    @property
    def key(self) -> str:
        if self.method == "base":
            return "base"
        key = f"{self.method} scale={self.scale:g} warmup={self.warmup:g}" + (f" mask={self.mask}" if self.mask else "")
        return key + (f" dilate={self.dilate}" if self.dilate else "")


BASE = Condition("base")
ADAPTER = Condition("adapter")


def conditions(concept_layer: str | None, low_auc_layer: str, ablations: bool) -> dict[str, dict[str, Condition]]:
    """The table's rows by group: {group: {row label: condition}}. No concept layer: FLUX, whose Conceptrol
    reads its mask where the official code does."""
    if concept_layer is None:
        return {"main": {"base model (no adapter)": BASE, "adapter alone": ADAPTER, "Conceptrol": Condition("conceptrol", warmup=FLUX_WARMUP)}}
    conceptrol = Condition("conceptrol", warmup=WARMUP, mask=concept_layer)
    groups = {"main": {"base model (no adapter)": BASE, "adapter alone": ADAPTER, "Conceptrol": conceptrol}}
    if ablations:
        pairs = (("adapter alone", ADAPTER), ("Conceptrol", conceptrol))
        groups["IP scale"] = {f"{name}, scale {s:g}": c._replace(scale=s) for s in SCALES for name, c in pairs}
        groups["warmup"] = {f"Conceptrol, warmup {w:g}": conceptrol._replace(warmup=w) for w in WARMUPS}
        groups["mask source"] = {
            f"concept block {concept_layer} (default)": conceptrol,
            f"low-AUC block {low_auc_layer}": conceptrol._replace(mask=low_auc_layer),
            "per-layer masks (each layer its own)": conceptrol._replace(mask=PER_LAYER),
            "oracle: judge's mask of the concept in the adapter-alone image": Condition("oracle", warmup=WARMUP),
            **{f"oracle grown by {d} px (a cell of the {scenes.CANVAS // (2 * d)}x{scenes.CANVAS // (2 * d)} grid)": Condition("oracle", warmup=WARMUP, dilate=d)
               for d in ORACLE_DILATIONS},
        }  # fmt: skip
    return groups


class Case(NamedTuple):
    """One prompt of one concept, drawn under every condition from the same noise."""

    concept: world.PersonalConcept
    index: int  # the prompt's index in the concept's prompt set
    caption: Caption
    span: list[int]  # the concept's class word in the text encoder's tokens (CLIP; T5 on FLUX)
    reference: tuple[Tensor, Tensor] | TokenGroup  # SD: the IP tokens and the empty image's [1, T, C]; FLUX: the condition group
    seed: int


def reference_image(concept: world.PersonalConcept):
    """The concept's reference: its look alone, large and centred on white or gray, one fixed draw."""
    look = (concept.shape, concept.color, concept.pattern, concept.pattern_color)
    return scenes.render(reference_scene(look, np.random.default_rng([REFERENCE_SEED, zlib.crc32(concept.name.encode())]))).image


@torch.no_grad()
def concept_cases(pipe, adapter, encoder, concept: world.PersonalConcept, n_prompts: int, seed: int, layout: str = "anywhere") -> list[Case]:
    """The concept's prompts in the base model's world (``layout``), each with its class word's token
    positions (its own occurrence, when another object has the same shape) and the reference as the
    adapter takes it (SD: IP tokens; FLUX: the condition group, `adapter` its LoRA); prompt i starts
    from seed + i."""
    if isinstance(pipe, FluxPipeline):
        [reference], _ = flux_concepts(pipe, adapter, "", [(reference_image(concept), None)], width=pipe.default_size)
        tokenizer, length = pipe.t5_tokenizer, pipe.max_length
    else:
        reference = reference_tokens(adapter, encoder, preprocess_clip(reference_image(concept), encoder.config.image_size))
        tokenizer, length = pipe.tokenizers[0], None
    cases = []
    for i, (_, caption) in enumerate(recontext_prompts(concept, n_prompts, identifier=None, layout=layout)):
        mention = next(m for m, named in enumerate(caption.mentions) if named.concept is not None)
        phrase, occurrence = shape_words(caption, mention)
        cases.append(Case(concept, i, caption, token_span(tokenizer, caption.text, phrase, occurrence, length), reference, seed + i))
    return cases


def gated_adapter(
    projections: dict, reference: tuple[Tensor, Tensor], steps: int, scale: float, warmup: float, gate: Tensor | None = None
) -> Callable[[int], Controls]:
    """The IP branch at `scale` after `warmup`, in every layer: everywhere (`gate` None, the adapter alone)
    or inside one fixed spatial mask (the oracle), read per token cell as its covered share."""
    first = warmup_steps(steps, warmup)

    def controls(step: int) -> Controls:
        tokens, empty = reference
        branch = ExtraTokens(tokens, projections, scale if step >= first else 0.0, gate, resize="area", uncond=empty)
        return Controls(extra_tokens=[branch], steps=steps)

    return controls


def method_controls(condition: Condition, case: Case, projections: dict, steps: int, oracle: Tensor | None = None):
    """What the pipeline applies at each step under `condition` (None for the base model)."""
    if condition.method == "base":
        return None
    if condition.method in ("adapter", "oracle"):
        gate = oracle if condition.method == "oracle" else None
        return gated_adapter(projections, case.reference, steps, condition.scale, condition.warmup, gate)
    concept = [SDConcept(case.span, *case.reference)]
    if condition.mask == PER_LAYER:
        return ConceptrolSD(projections, concept, steps, scale=condition.scale, warmup=condition.warmup, global_masking=False).controls
    return ConceptrolSD(projections, concept, steps, concept_layer=condition.mask, scale=condition.scale, warmup=condition.warmup).controls


@torch.no_grad()
def draw(pipe, case: Case, condition: Condition, projections: dict | None, steps: int, oracle: Tensor | None = None) -> Tensor:
    """The case's image under `condition`, [3, H, W] in [0, 1]."""
    if isinstance(pipe, FluxPipeline):
        return draw_flux(pipe, case, condition, steps)
    controls = method_controls(condition, case, projections, steps, oracle)
    return pipe.generate(case.caption.text, steps=steps, cfg=SD_CFG, seed=case.seed, controls=controls, progress=False)[0]


def draw_flux(pipe: FluxPipeline, case: Case, condition: Condition, steps: int) -> Tensor:
    """FLUX: the base model, or the condition group under a fresh ConceptrolFlux (its mask and block-call
    counter live for one image) in OminiControl's mode (adapter alone) or Conceptrol's."""
    extra, controls = (), None
    if condition.method != "base":
        mode = "ominicontrol" if condition.method == "adapter" else "conceptrol"
        method = ConceptrolFlux(pipe.transformer.attention_layers(), [FluxConcept(case.span, case.reference.name)], steps,
                                condition_scale=condition.scale, warmup=condition.warmup, mode=mode)  # fmt: skip
        extra, controls = [case.reference], method.controls
    return pipe.generate(case.caption.text, steps=steps, true_cfg=pipe.default_cfg, seed=case.seed, extra=extra, controls=controls, progress=False)[0]


def concept_object_mask(found: list[JudgedObject], concept: world.PersonalConcept, dilate: int = 0) -> Tensor:
    """[1, 1, 64, 64] float: the judged object that shows most of the concept's look (the one CP scores;
    the first on ties), grown by `dilate` pixels on every side (a square max filter); all zeros when
    nothing was found."""
    if not found:
        return torch.zeros(1, 1, scenes.CANVAS, scenes.CANVAS)
    best = max(found, key=lambda o: concept_score(o, concept))
    mask = torch.from_numpy(best.mask).float()[None, None]
    return F.max_pool2d(mask, 2 * dilate + 1, stride=1, padding=dilate) if dilate else mask


# ---- Scores ---------------------------------------------------------------------------------------
def scores(found: list[JudgedObject], case: Case) -> dict:
    """One image's CP, PF, their product and leakage, from the judge's objects."""
    cp, pf = concept_preservation(found, case.concept), prompt_following(found, case.caption)
    return {"cp": cp, "pf": pf, "cp_pf": cp * pf, "leakage": leakage(found, case.concept, case.caption),
            "others_asked": len(expected_objects(case.caption)) > 1, "objects": len(found)}  # fmt: skip


def evaluate(pipe, adapter, cases: list[Case], todo: list[Condition], steps: int, journal: Journal) -> tuple[list[dict], dict, float]:
    """Every case under every condition: the per-image records, the images of each concept's first
    GRID_PROMPTS prompts by (concept, prompt) and condition key, and the seconds the drawing took. A case
    the journal holds (a killed run's) is read back, not drawn again."""
    projections = None if isinstance(pipe, FluxPipeline) else adapter.projections()
    keys = [f"{case.concept.name}/{case.index}" for case in cases]
    with tqdm(total=len(cases) * len(todo), desc="generations", unit="image") as bar:
        for case, key in zip(cases, keys):
            if key not in journal.done:
                journal.add(key, draw_case(pipe, case, todo, projections, steps, bar))
            else:
                bar.update(len(todo))
    finished = [journal.done[key] for key in keys]
    shown = {(case.concept.name, case.index): {k: png_image(v) for k, v in done["shown"].items()} for case, done in zip(cases, finished) if done["shown"]}
    return [r for done in finished for r in done["records"]], shown, sum(done["seconds"] for done in finished)


def draw_case(pipe, case: Case, todo: list[Condition], projections: dict | None, steps: int, bar: tqdm) -> dict:
    """One case under every condition (the adapter alone before the oracle, which reads its image): its
    records, its images (PNG, base64) if the grid shows them, and the seconds it took."""
    start, judged, records, shown = time.time(), {}, [], {}
    for condition in todo:
        oracle = concept_object_mask(judged[ADAPTER], case.concept, condition.dilate) if condition.method == "oracle" else None
        image = to_pil(draw(pipe, case, condition, projections, steps, oracle)[None])[0]
        judged[condition] = judge(image)
        if case.index < GRID_PROMPTS:
            shown[condition.key] = png_text(image)
        records.append({"concept": case.concept.name, "prompt": case.index, "text": case.caption.text, "seed": case.seed,
                        "condition": condition.key, **scores(judged[condition], case)})  # fmt: skip
        bar.update()
    return {"records": records, "shown": shown, "seconds": time.time() - start}


def png_text(image: Image.Image) -> str:
    """An image as text for the journal: its PNG bytes in base64 (lossless)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def png_image(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def summary(records: list[dict]) -> dict:
    """Means over images: CP, PF, CP·PF as the product of the means and as the mean per image, leakage
    over the images whose prompt asks for other objects; counts."""
    cp, pf = (float(np.mean([r[k] for r in records])) for k in ("cp", "pf"))
    leaks = [r["leakage"] for r in records if r["others_asked"]]
    return {"cp": cp, "pf": pf, "cp_pf": cp * pf, "cp_pf_per_image": float(np.mean([r["cp_pf"] for r in records])),
            "leakage": float(np.mean(leaks)) if leaks else None, "n": len(records), "n_leakage": len(leaks)}  # fmt: skip


def comparison(records: list[dict], better: Condition, baseline: Condition) -> dict[str, tuple[float, float, float]]:
    """better - baseline on CP·PF (both readings) and leakage, paired over the images both drew."""
    a, b = (np.array([[r["cp"], r["pf"], r["cp_pf"], r["leakage"], r["others_asked"]] for r in records if r["condition"] == c.key])
            for c in (better, baseline))  # the same cases in the same order: `evaluate` draws every condition per case
    others = a[:, 4] > 0
    out = {"CP·PF (product of means)": paired_bootstrap(a[:, :2], b[:, :2], product_of_means),
           "CP·PF (mean per image)": paired_bootstrap(a[:, 2:3], b[:, 2:3], mean_value)}  # fmt: skip
    if others.any():
        out["leakage"] = paired_bootstrap(a[others, 3:4], b[others, 3:4], mean_value)
    return out


# ---- The report -----------------------------------------------------------------------------------
def number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(rows: dict[str, dict]) -> list[str]:
    lines = ["| condition | CP | PF | CP·PF | mean CP·PF per image | leakage | n |", "|---|---|---|---|---|---|---|"]
    for label, s in rows.items():
        lines.append(f"| {label} | {number(s['cp'])} | {number(s['pf'])} | {number(s['cp_pf'])} | {number(s['cp_pf_per_image'])} | "
                     f"{number(s['leakage'])} | {s['n']} |")  # fmt: skip
    return lines


def report(records: list[dict], groups: dict[str, dict[str, Condition]], settings: dict) -> str:
    """The markdown: main table, paired interval, ablations, per-concept rows, how it was made."""
    by_key = {key: summary([r for r in records if r["condition"] == key]) for key in {r["condition"] for r in records}}
    main = groups["main"]
    _, adapter, conceptrol = main.values()
    n, n_leak = by_key[adapter.key]["n"], by_key[adapter.key]["n_leakage"]
    if settings["model"] == "toy-flux":
        how = (f"OminiControl subject LoRA `{settings['adapter']}`. Conceptrol as the official FLUX code (the mask read at every "
               f"depth-th block call), condition scale 1, warmup {FLUX_WARMUP:g}")  # fmt: skip
    else:
        how = (f"adapter `{settings['adapter']}` with the tower `{settings['image_encoder']}`. Concept block {settings['concept_layer']}, "
               f"warmup {WARMUP:g}")  # fmt: skip
    lines = [f"# The toy DreamBench: Conceptrol on {settings['model']} ({settings['concepts']} concepts x {settings['prompts']} prompts, "
             f"{settings['steps']} steps, CFG {settings['cfg']:g})", "",
             f"Regenerate: `{settings['command']}`", "",
             f"Base `{settings['base']}` (fingerprint {settings['base_fingerprint']}); {how}; {settings['seconds']:.0f} s "
             f"for {settings['generations']} generations.", ""]  # fmt: skip
    lines += table({label: by_key[c.key] for label, c in main.items()})
    lines += ["", f"CP·PF is DreamBench++'s: the product of the mean CP and the mean PF; beside it the mean of the per-image "
              f"products. Leakage: mean over the {n_leak} of {n} images whose prompt asks for other objects.", "",
              f"Conceptrol - adapter alone, paired over the same {n} images (concept, prompt, seed), 95 % bootstrap interval "
              f"({RESAMPLES:,} resamples of the images):"]  # fmt: skip
    for name, (mean, low, high) in comparison(records, conceptrol, adapter).items():
        lines.append(f"- {name}: {mean:+.3f} [{low:+.3f}, {high:+.3f}]")
    ours, theirs = by_key[conceptrol.key]["cp_pf"], by_key[adapter.key]["cp_pf"]
    ratio = f"{ours / theirs:.2f}x" if theirs else "n/a (the adapter alone scores 0)"
    lines.append(f"- CP·PF ratio Conceptrol / adapter alone: {ratio} (the issue asks for 1.2x or more)")
    for group, rows in groups.items():
        if group != "main":
            lines += ["", f"## Ablation: {group}", "", *table({label: by_key[c.key] for label, c in rows.items()})]
    lines += ["", "## Per concept (CP·PF, product of means; leakage)", "",
              "| concept | look | " + " | ".join(f"CP·PF {label}" for label in main) + " | leakage adapter alone | leakage Conceptrol | n |",
              "|---|---|" + "---|" * (len(main) + 3)]  # fmt: skip
    for name in dict.fromkeys(r["concept"] for r in records):
        per = {c.key: summary([r for r in records if r["concept"] == name and r["condition"] == c.key]) for c in main.values()}
        lines.append(f"| {name} | {world.concept(name).description} | " + " | ".join(number(per[c.key]["cp_pf"]) for c in main.values())
                     + f" | {number(per[adapter.key]['leakage'])} | {number(per[conceptrol.key]['leakage'])} | {per[adapter.key]['n']} |")  # fmt: skip
    lines += ["", "Each concept's reference is `pairs.reference_scene` of its look (one fixed draw); its prompts are "
              f"`captions.recontext_prompts(concept, n, identifier=None, layout={settings['layout']!r})`, the concept named by its class word. The judge reads "
              "every image; see scripts/evaluate_conceptrol.py for the conditions and the oracle's mask."]  # fmt: skip
    return "\n".join(lines) + "\n"


# ---- The figures ----------------------------------------------------------------------------------
def image_grid(cases: list[Case], shown: dict, columns: dict[str, Condition], cell: int = 96, pad: int = 4) -> Image.Image:
    """Rows: each shown case (its prompt above it). Columns: the reference, then each condition's image."""
    rows = [case for case in cases if (case.concept.name, case.index) in shown]
    label = 14
    grid = Image.new("RGB", (pad + (1 + len(columns)) * (cell + pad), label + len(rows) * (label + cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(["reference", *(column.split(" (")[0] for column in columns)]):  # "base model (no adapter)" -> "base model"
        draw.text((pad + c * (cell + pad), 2), name, fill="black")
    for r, case in enumerate(rows):
        y = label + r * (label + cell + pad)
        draw.text((pad, y + 1), f"{case.concept.name}: {case.caption.text}"[:100], fill="black")
        images = shown[(case.concept.name, case.index)]
        tiles = [reference_image(case.concept), *(images[c.key] for c in columns.values())]
        for c, tile in enumerate(tiles):
            grid.paste(tile.resize((cell, cell), Image.Resampling.NEAREST), (pad + c * (cell + pad), y + label))
    return grid


def tradeoff_plot(series: dict[str, list[tuple[float, float, str]]], title: str) -> Image.Image:
    """CP (x) against PF (y): each series a line through its labelled points, drawn with PIL; the axes
    span the points with a margin."""
    width, height, left, right, top, bottom = 760, 480, 60, 250, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs, ys = ([p[k] for points in series.values() for p in points] for k in (0, 1))
    (x_low, x_high), (y_low, y_high) = ((min(v) - 0.02, max(v) + 0.02) for v in (xs, ys))
    x0, x1, y0, y1 = left, width - right, height - bottom, top

    def point(x: float, y: float) -> tuple[float, float]:
        return x0 + (x1 - x0) * (x - x_low) / (x_high - x_low), y0 + (y1 - y0) * (y - y_low) / (y_high - y_low)

    draw.rectangle([x0, y1, x1, y0], outline="black")
    for k in range(5):
        x, y = x_low + (x_high - x_low) * k / 4, y_low + (y_high - y_low) * k / 4
        draw.text((point(x, y_low)[0] - 12, y0 + 6), f"{x:.2f}", fill="black")
        draw.text((x0 - 40, point(x_low, y)[1] - 6), f"{y:.2f}", fill="black")
    for k, (name, points) in enumerate(series.items()):
        color = PLOT_COLORS[k % len(PLOT_COLORS)]
        at = [point(x, y) for x, y, _ in points]
        if len(at) > 1:
            draw.line(at, fill=color, width=2)
        for (px, py), (_, _, text) in zip(at, points):
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
            draw.text((px + 5, py - 12), text, fill=color)
        draw.line([(x1 + 12, top + 16 * k + 6), (x1 + 32, top + 16 * k + 6)], fill=color, width=3)
        draw.text((x1 + 38, top + 16 * k), name, fill="black")
    draw.text((left, 4), title, fill="black")
    draw.text(((x0 + x1) // 2 - 80, height - 22), "concept preservation (CP)", fill="black")
    draw.text((4, top - 16), "prompt following (PF)", fill="black")
    return image


def tradeoff_series(by_key: dict[str, dict], groups: dict[str, dict[str, Condition]]) -> dict[str, list[tuple[float, float, str]]]:
    """The ablations as (CP, PF, label) points: the IP scale sweep per method, the warmup sweep, the mask sources."""
    series = {}
    for method, name in (("adapter", "adapter alone, IP scale"), ("conceptrol", "Conceptrol, IP scale")):
        series[name] = [(by_key[c.key]["cp"], by_key[c.key]["pf"], f"{c.scale:g}") for c in groups["IP scale"].values() if c.method == method]
    series["Conceptrol, warmup"] = [(by_key[c.key]["cp"], by_key[c.key]["pf"], f"{c.warmup:g}") for c in groups["warmup"].values()]
    for label, c in groups["mask source"].items():
        series[f"mask: {label.split(':')[0].split(' (')[0]}"] = [(by_key[c.key]["cp"], by_key[c.key]["pf"], "")]
    return series


# ---- Command line ---------------------------------------------------------------------------------
def parse(argv=None) -> argparse.Namespace:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("toy-sd", "toy-flux"), default="toy-sd", help="which toy model and adapter (default toy-sd)")
    parser.add_argument("--base", type=Path, help="the toy-sd file or toy-flux folder (default: the shipped weights/toy-sd.safetensors, "
                        "weights/toy-flux)")  # fmt: skip
    parser.add_argument("--adapter", type=Path, help="the adapter file scripts/train_toy_adapters.py writes (default: the shipped "
                        "weights/toy-sd-ip-adapter/ip-adapter-plus_toy-sd.safetensors, weights/toy-flux-omini/subject_toy-flux.safetensors)")  # fmt: skip
    parser.add_argument("--image-encoder", type=Path, help="toy-sd: the vision tower's folder (default: image_encoder/ beside --adapter)")
    parser.add_argument("--concepts", type=positive_int, help="the first N personal concepts of the toy world (default: all)")
    parser.add_argument("--concept", action="append", default=[], help="a personal concept by name, instead of --concepts; repeatable")
    parser.add_argument("--prompts", type=positive_int, default=20, help="prompts per concept")
    parser.add_argument("--steps", type=positive_int, default=25)
    parser.add_argument("--seed", type=draw_seed, default=0, help="prompt i of every concept starts from the noise of seed + i")
    parser.add_argument("--concept-layer", help="toy-sd: Conceptrol's concept block (default: toy-sd's best by mask AUC, up.1.0.0)")
    parser.add_argument("--low-auc-layer", help=f"with --ablations: the mask-source ablation's poor block (default {LOW_AUC_LAYER})")
    parser.add_argument("--ablations", action="store_true", help="toy-sd: add the IP scale, warmup and mask-source sweeps")
    parser.add_argument("--out", type=Path, help="the table; the JSON goes beside it (default: runs/dreambench/conceptrol_<model>.md)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out and its JSON (and start afresh over a killed run of other settings)")
    args = parser.parse_args(argv)
    check_seeds(parser, args.seed, args.prompts, "--prompts")
    if args.low_auc_layer is not None and not args.ablations:
        parser.error("--low-auc-layer is the mask-source ablation's block: it applies with --ablations")
    args.low_auc_layer = args.low_auc_layer or LOW_AUC_LAYER
    flux = args.model == "toy-flux"
    if flux and (given := [flag for flag, value in (("--image-encoder", args.image_encoder), ("--concept-layer", args.concept_layer),
                                                     ("--ablations", args.ablations)) if value]):  # fmt: skip
        parser.error(f"{', '.join(given)}: toy-sd's IP-Adapter settings; toy-flux's Conceptrol runs as the official FLUX code, without ablations")
    args.base = args.base or (TOY_FLUX if flux else TOY_SD)
    args.out = args.out or Path(f"runs/dreambench/conceptrol_{args.model}.md")
    if args.adapter is None:
        try:
            args.adapter = toy_subject_lora_file() if flux else toy_ip_adapter_files()["adapter"]
        except FileNotFoundError as error:
            parser.error(f"--adapter not given and {error}")
    args.image_encoder = None if flux else args.image_encoder or args.adapter.parent / "image_encoder"
    if args.concept and args.concepts is not None:
        parser.error("--concept and --concepts both choose the concepts; give one of them")
    if args.concepts is not None and args.concepts > len(world.CONCEPTS):
        parser.error(f"--concepts {args.concepts}: the toy world has {len(world.CONCEPTS)} personal concepts")
    try:
        args.selected = [world.concept(name) for name in dict.fromkeys(args.concept)] or list(world.CONCEPTS[: args.concepts])
    except ValueError as error:
        parser.error(f"--concept: {error}")
    if flux and not is_toy_flux_folder(args.base):
        parser.error(f"--base {args.base}: not a toy-flux folder; give an exported toy-flux, e.g. weights/toy-flux")
    if not flux and not args.base.is_file():
        parser.error(f"--base {args.base}: not a file; give an exported toy-sd, e.g. weights/toy-sd.safetensors")
    if not args.adapter.is_file():
        command, written = ("flux", "subject_toy-flux.safetensors") if flux else ("sd", "ip-adapter-plus_toy-sd.safetensors")
        parser.error(f"--adapter {args.adapter}: not a file; give the adapter file scripts/train_toy_adapters.py {command} writes ({written})")
    if not flux and not args.image_encoder.exists():
        parser.error(f"--image-encoder {args.image_encoder}: not found; give the image_encoder/ folder written beside the adapter")
    if args.out.suffix != ".md":
        parser.error(f"--out {args.out}: give a .md file (the JSON goes beside it)")
    existing = [str(p) for p in outputs(args.out) if p.exists()]
    if existing and not args.force:
        parser.error(f"{' and '.join(existing)} already written; pass --force to overwrite, or give another --out")
    check_writable(args.out, "--out")
    return args


def as_reported(path: Path) -> str:
    """A path as the report names it: a shipped file relative to weights/, others as given."""
    try:
        return f"weights/{path.resolve().relative_to(WEIGHTS.resolve())} (shipped)"
    except ValueError:
        return str(path)


def outputs(out: Path) -> tuple[Path, ...]:
    """The files a run writes: the table, its JSON, the image grid and (with --ablations) the trade-off plot."""
    return out, out.with_suffix(".json"), out.with_suffix(".png"), out.with_name(f"{out.stem}_tradeoff.png")


def journal_file(out: Path) -> Path:
    """Where a run keeps its finished cases until its outputs are written (a killed run resumes from it)."""
    return out.with_name(f"{out.stem}.journal.jsonl")


def load(args: argparse.Namespace):
    """toy-sd and the adapter with its tower, or toy-flux and its subject LoRA (as `LowRank` residuals, no
    tower); an adapter trained on another base is refused."""
    flux = args.model == "toy-flux"
    pipe = load_flux(**toy_flux_folder_files(args.base), dtype=torch.float32) if flux else load_sd(args.base, dtype=torch.float32)
    base = base_fingerprint(pipe)
    trained_on = json.loads(read_metadata(args.adapter).get("minigen.toy", "{}")).get("base")
    if trained_on is not None and trained_on != base:
        raise ValueError(f"--adapter {args.adapter} was trained on another {args.model} (fingerprint {trained_on}); --base {args.base} is "
                         f"{base}: pass the base it was trained on")  # fmt: skip
    if flux:
        return pipe, read_flux_lora(args.adapter, pipe.transformer), None, base
    adapter, encoder = load_ip_adapter(args.adapter, pipe.unet, image_encoder=args.image_encoder)
    layers = list(pipe.unet.attention_layers())
    args.concept_layer = args.concept_layer or default_concept_layer(pipe.unet)
    for flag, layer in (("--concept-layer", args.concept_layer), ("--low-auc-layer", args.low_auc_layer)):
        if layer not in layers:
            raise ValueError(f"{flag} {layer}: not an attention block of this UNet; choose one of {layers}")
    return pipe, adapter, encoder, base


def main(argv=None) -> dict:
    args = parse(argv)
    command = "python scripts/evaluate_conceptrol.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    pipe, adapter, encoder, base = load(args)
    groups = conditions(args.concept_layer, args.low_auc_layer, args.ablations)
    todo = list(dict.fromkeys(c for rows in groups.values() for c in rows.values()))  # each condition once, main rows first
    layout = toy_layout(args.base)  # toy-flux's prompts hold one or two objects on the canvas halves
    cases = [case for concept in args.selected for case in concept_cases(pipe, adapter, encoder, concept, args.prompts, args.seed, layout)]
    drawn = {"model": args.model, "base": as_reported(args.base), "base_fingerprint": base, "adapter": as_reported(args.adapter),
             "image_encoder": args.image_encoder and as_reported(args.image_encoder), "concepts": len(args.selected), "prompts": args.prompts,
             "layout": layout, "steps": args.steps, "cfg": pipe.default_cfg if isinstance(pipe, FluxPipeline) else SD_CFG, "seed": args.seed,
             "concept_layer": args.concept_layer, "low_auc_layer": args.low_auc_layer, "warmup": WARMUP}  # fmt: skip
    table_file, json_file, grid_file, tradeoff_file = outputs(args.out)
    journal = Journal(journal_file(args.out), {**drawn, "concept_names": [c.name for c in args.selected], "conditions": [c.key for c in todo],
                                               "adapter_digest": files_digest(args.adapter, args.image_encoder)}, restart=args.force)  # fmt: skip
    journal.report_resumed(len(cases), "cases")
    records, shown, seconds = evaluate(pipe, adapter, cases, todo, args.steps, journal)
    settings = {"command": command, **drawn, "seconds": seconds, "generations": len(records), "torch": torch.__version__}
    text = report(records, groups, settings)
    results = {"settings": settings, "conditions": {c.key: c._asdict() for c in todo},
               "rows": {group: {label: c.key for label, c in rows.items()} for group, rows in groups.items()},
               "summary": {c.key: summary([r for r in records if r["condition"] == c.key]) for c in todo}, "images": records}  # fmt: skip
    save_png(image_grid(cases, shown, groups["main"]), grid_file, {"figure": "reference | " + " | ".join(groups["main"]), "command": command},
             overwrite=args.force)  # fmt: skip
    if args.ablations:
        by_key = {c.key: results["summary"][c.key] for c in todo}
        plot = tradeoff_plot(tradeoff_series(by_key, groups), f"toy-sd, {len(records) // len(todo)} images per point")
        save_png(plot, tradeoff_file, {"figure": "CP against PF of the ablations", "command": command}, overwrite=args.force)
    else:
        tradeoff_file.unlink(missing_ok=True)  # an earlier run's plot would not belong to this table (only with --force is one there)
    for path, content in ((json_file, json.dumps(results, indent=1) + "\n"), (table_file, text)):
        write_atomically(path, lambda file: file.write(content.encode()), overwrite=args.force)
    journal.close()
    print(text)
    return results


if __name__ == "__main__":
    sys.exit(run(main, resumes=True))
