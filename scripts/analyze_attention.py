"""Where does each attention layer look for an object's word? Mask AUC per layer and step.

    python scripts/analyze_attention.py --model toy-sd --prompts 40 --out docs
    python scripts/analyze_attention.py --model toy-flux --prompts 40 --out docs

For held-out toy prompts, the image is generated while every attention layer's map is recorded at
every step: the image queries' attention to the tokens of one object's shape word ("star"), summed
over those tokens (cross-attention in SD; the image-to-text block of the joint attention in FLUX).
The judge then finds that object in the finished image, and the map is scored against its mask with
`metrics.mask_auc`. This is the Conceptrol paper's Figure 6 on the toy models; it picks the block a
concept mask should come from.

--match says how the judged object is tied to the caption's mention:
    look    the one judged object with the mention's shape and colour (default)
    color   the one judged object with the mention's colour, when no other mention asks for that colour:
            for a model that already places and colours objects but does not yet draw their shapes

Writes to --out (default runs/attention; the figures committed in docs/ were made with --out docs):
    attention_auc_<model>.png    mask AUC per layer (one line each) against the sampling step
    attention_auc_<model>.md     the table: mean AUC over all steps and over the second half, per layer
    attention_maps_<model>.png   for a few prompts: the image, its object mask, and each layer's map
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from minigen import cli
from minigen.controls import Controls, RecordAttention
from minigen.pipelines.flux import FluxPipeline
from minigen.image import PLOT_COLORS, save_png, to_pil
from minigen.loading.auto import load_pipeline
from minigen.loading.files import check_writable_folder, write_atomically
from minigen.loading.toy import toy_layout
from minigen.text.spans import token_span
from minigen.toy import captions
from minigen.toy.captions import shape_words
from minigen.toy.evaluate import SD_CFG
from minigen.toy.judge import judge
from minigen.toy.metrics import mask_auc


MATCHES = {"look": ("shape", "color"), "color": ("color",)}


def targets(caption: captions.Caption, image: Image.Image, match: str = "look") -> list[tuple[int, np.ndarray]]:
    """(mention, mask) for each single-object mention the judge finds exactly once by the `match` attributes
    (and that no other mention shares those attributes with)."""
    keys = MATCHES[match]
    found = judge(image)
    asked = [tuple(m.attributes[k] for k in keys) for m in caption.mentions]
    picked = []
    for m, mention in enumerate(caption.mentions):
        if len(mention.objects) != 1 or asked.count(asked[m]) > 1:
            continue
        hits = [o for o in found if tuple(getattr(o, k) for k in keys) == asked[m]]
        if len(hits) == 1:
            picked.append((m, hits[0].mask))
    return picked


def prompt_rows(n: int, cfg: float) -> list[int]:
    """The batch rows of n prompts: under guidance the batch is [negatives | prompts], without it the prompts alone."""
    return list(range(n, 2 * n)) if cfg != 1.0 else list(range(n))


def record_and_generate(pipe, prompts: list[str], steps: int, seed: int) -> tuple[list[Image.Image], RecordAttention]:
    """Generate the prompts (with CFG where the model takes it) while recording the prompts' rows of every
    layer at every step."""
    n = len(prompts)
    if isinstance(pipe, FluxPipeline):  # the image queries' attention to the text keys of the joint attention
        record = RecordAttention(kind="joint", rows=prompt_rows(n, pipe.default_cfg), queries="img", tokens="txt")
        images = pipe.generate(prompts, steps=steps, true_cfg=pipe.default_cfg, seed=seed, controls=Controls(record=[record]),
                               progress=False)  # fmt: skip
    else:
        record = RecordAttention(kind="cross", rows=prompt_rows(n, SD_CFG))
        images = pipe.generate(prompts, steps=steps, cfg=SD_CFG, seed=seed, controls=Controls(record=[record]), progress=False)
    return to_pil(images), record


def object_map(record: RecordAttention, layer: str, step: int, row: int, span: list[int]) -> np.ndarray:
    """[side, side] attention of the image queries to the span's tokens at one layer and step."""
    probs = record.maps[layer][step][row, 0]  # [queries, tokens]
    values = probs[:, span].sum(-1).float().numpy()
    side = int(round(values.size**0.5))
    return values.reshape(side, side)


def analyze(pipe, n_prompts: int, steps: int, seed: int, match: str = "look", batch: int = 10, layout: str = "anywhere") -> tuple[dict, list, int]:
    """AUC[layer] = [steps] means over every (prompt, object) found, a few examples for the grid, and
    how many objects were found; the prompts are those of the world ``layout`` (the model's)."""
    tokenizer = pipe.t5_tokenizer if isinstance(pipe, FluxPipeline) else pipe.tokenizers[0]
    max_length = pipe.max_length if isinstance(pipe, FluxPipeline) else None
    prompts = [c for _, c in captions.heldout_prompts(n_prompts, layout=layout)]
    auc: dict[str, list[list[float]]] = {}
    examples = []
    for start in range(0, len(prompts), batch):
        part = prompts[start : start + batch]
        images, record = record_and_generate(pipe, [c.text for c in part], steps, seed + start)  # prompt i: seed + i
        for row, (caption, image) in enumerate(zip(part, images)):
            for mention, mask in targets(caption, image, match):
                phrase, occurrence = shape_words(caption, mention)
                span = token_span(tokenizer, caption.text, phrase, occurrence, max_length=max_length)
                for layer in record.maps:
                    per_step = [mask_auc(object_map(record, layer, s, row, span), mask) for s in range(steps)]
                    auc.setdefault(layer, []).append(per_step)
                if len(examples) < 4:
                    maps = {layer: object_map(record, layer, steps - 1, row, span) for layer in record.maps}
                    examples.append((caption.text, phrase, image, mask, maps))
        print(f"{min(start + batch, len(prompts))}/{len(prompts)} prompts, {len(next(iter(auc.values()), []))} objects found", flush=True)
    if not auc:
        raise SystemExit(f"the judge found none of the named objects in the {len(prompts)} images: is the model trained?")
    objects = len(next(iter(auc.values())))
    return {layer: np.mean(values, axis=0).tolist() for layer, values in auc.items()}, examples, objects


# ---- Pictures ---------------------------------------------------------------------------------------
def line_plot(series: dict[str, list[float]], title: str, y_range=(0.0, 1.0)) -> Image.Image:
    """One line per series over its index (the sampling step), drawn with PIL; 0.5 is chance."""
    width, height, left, right, top, bottom = 760, 440, 60, 190, 40, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    x0, x1, y0, y1 = left, width - right, height - bottom, top
    steps = max(len(v) for v in series.values())

    def point(i: int, value: float) -> tuple[float, float]:
        fraction = (value - y_range[0]) / (y_range[1] - y_range[0])
        return x0 + (x1 - x0) * i / max(1, steps - 1), y0 + (y1 - y0) * min(max(fraction, 0), 1)

    for tick in np.arange(y_range[0], y_range[1] + 1e-9, 0.1):
        _, y = point(0, tick)
        draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        draw.text((x0 - 35, y - 6), f"{tick:.1f}", fill="black")
    for i in range(0, steps, 5):
        x, _ = point(i, y_range[0])
        draw.text((x - 4, y0 + 8), str(i), fill="black")
    draw.rectangle([x0, y1, x1, y0], outline="black")
    for k, (name, values) in enumerate(series.items()):
        color = PLOT_COLORS[k % len(PLOT_COLORS)]
        draw.line([point(i, v) for i, v in enumerate(values)], fill=color, width=2)
        draw.line([(x1 + 12, top + 16 * k + 6), (x1 + 32, top + 16 * k + 6)], fill=color, width=3)
        draw.text((x1 + 38, top + 16 * k), name, fill="black")
    draw.text((left, 12), title, fill="black")
    draw.text(((x0 + x1) // 2 - 60, height - 22), "sampling step (0 = pure noise)", fill="black")
    return image


def heat(values: np.ndarray, size: int = 64) -> Image.Image:
    """A map normalised to its own range, as a grayscale image of size x size."""
    v = (values - values.min()) / max(float(values.max() - values.min()), 1e-12)
    return Image.fromarray((v * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


def map_grid(examples: list, cell: int = 64, pad: int = 4) -> Image.Image:
    """Rows: examples. Columns: image, judged object mask, then each layer's map at the last step."""
    layers = list(examples[0][4])
    columns = 2 + len(layers)
    label = 14
    grid = Image.new("RGB", (columns * (cell + pad) + pad, len(examples) * (cell + pad + label) + label + pad), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(["image", "mask", *layers]):
        draw.text((pad + c * (cell + pad), 2), name[:11], fill="black")
    for r, (text, phrase, image, mask, maps) in enumerate(examples):
        y = label + r * (cell + pad + label)
        draw.text((pad, y), f"{phrase!r} in: {text}"[:110], fill="black")
        tiles = [image.resize((cell, cell)), Image.fromarray((mask * 255).astype(np.uint8)).resize((cell, cell)).convert("RGB")]
        tiles += [heat(maps[layer], cell) for layer in layers]
        for c, tile in enumerate(tiles):
            grid.paste(tile, (pad + c * (cell + pad), y + label))
    return grid


def table(auc: dict[str, list[float]], model: str, prompts: int, steps: int, objects: int, command: str, match: str = "look", layout: str = "anywhere") -> str:
    half = steps // 2
    rows = sorted(auc.items(), key=lambda item: -np.mean(item[1][half:]))
    world = "" if layout == "anywhere" else f" of the {layout} world (the model's)"
    lines = [f"# Mask AUC of the object word's attention, {model}", "",
             f"{prompts} held-out prompts{world}, {steps} steps; {objects} objects found by the judge by "
             f"{' and '.join(MATCHES[match])}. Second half = steps {half}..{steps - 1}. Command: `python {command}`.", "",
             "| layer | mean AUC, all steps | mean AUC, second half | AUC at the last step |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {layer} | {np.mean(v):.3f} | {np.mean(v[half:]):.3f} | {v[-1]:.3f} |" for layer, v in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-sd", help="toy-sd, toy-flux, or another SD/FLUX source (the prompts and the judge are "
                        "the toy world's, so the figures mean something for models trained on it)")
    parser.add_argument("--prompts", type=cli.positive_int, default=40)
    parser.add_argument("--steps", type=cli.positive_int, default=25)
    parser.add_argument("--seed", type=cli.draw_seed, default=0)
    parser.add_argument("--match", choices=sorted(MATCHES), default="look", help="how a judged object is tied to its mention")
    parser.add_argument("--out", type=Path, default=Path("runs/attention"), help="folder for the plots and table (default runs/attention; the committed figures live in docs/)")
    parser.add_argument("--force", action="store_true", help="replace the plots and table of an earlier run in --out")
    args = parser.parse_args(argv)
    cli.check_seeds(parser, args.seed, args.prompts, "--prompts")
    name = Path(args.model).stem
    plot, maps, report = (args.out / f"attention_{what}_{name}{suffix}" for what, suffix in (("auc", ".png"), ("maps", ".png"), ("auc", ".md")))
    if not args.force and (taken := [path.name for path in (plot, maps, report) if path.exists()]):
        parser.error(f"--out {args.out} holds {', '.join(taken)} already; give another --out, or pass --force to replace them")
    check_writable_folder(args.out, "--out")  # before minutes of generation
    pipe, layout = load_pipeline(args.model), toy_layout(args.model)  # the prompts of the world the model learnt
    auc, examples, objects = analyze(pipe, args.prompts, args.steps, args.seed, args.match, layout=layout)
    settings = {"figure": f"mask AUC of the object word's attention, {name}", "command": " ".join(["scripts/analyze_attention.py", *(argv or sys.argv[1:])])}
    save_png(line_plot(auc, f"{name}: mask AUC of the object word's attention, per layer"), plot, settings, overwrite=args.force)
    save_png(map_grid(examples), maps, settings, overwrite=args.force)
    text = table(auc, name, args.prompts, args.steps, objects, settings["command"], args.match, layout)  # the command as run
    write_atomically(report, lambda file: file.write(text.encode()), overwrite=args.force)
    print(text)


if __name__ == "__main__":
    sys.exit(cli.run(main))  # bad input: one line on stderr, exit code 2, no traceback
