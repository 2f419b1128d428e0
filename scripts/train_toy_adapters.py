"""Train the toy reference adapters on pairs of the toy world, and write them in the official layouts.

    python scripts/train_toy_adapters.py sd --work runs/adapters   # -> runs/adapters/ip-adapter-plus_toy-sd.safetensors
                                                                   #    and runs/adapters/image_encoder/
    python scripts/train_toy_adapters.py flux --work runs/omini    # -> runs/omini/subject_toy-flux.safetensors

sd: a toy IP-Adapter-Plus (Ye et al. 2023) for toy-sd, with a tiny CLIP vision tower trained with it
(no CLIP knows the toy world). The method, as minigen/models/ip_adapter.py runs it:

    reference [B, 3, 64, 64] --vision tower--> hidden_states[-2] [B, 65, 64] --Resampler--> tokens [B, 16, 64]
    every cross-attention layer of the frozen UNet:
        out = Attn(q, K_text, V_text) + Attn(q, to_k_ip(tokens), to_v_ip(tokens))

The recipe is the official training's (IP-Adapter's tutorial_train_plus.py) at toy scale:

    data       pairs (minigen/toy/pairs.py): an object alone -> a training scene holding it among
               0-2 others, captioned with the object named by its shape word; rendered once and
               cached beside the work folder, as the targets' latents are (per autoencoder). The
               scenes are those of the base's world (`toy_layout`: toy-flux's lie on the canvas halves)
    frozen     the base toy-sd's UNet, text encoder and autoencoder (--base; default the shipped one)
    trained    the vision tower (from scratch), the Resampler, and every cross-attention layer's
               to_k_ip / to_v_ip, initialised from the layer's text to_k / to_v as the official
               training does
    loss       ε-prediction on the target's latents, with the caption as text and the reference's
               tokens through the control the sampler uses (`IPAdapter.extra_tokens`, scale 1)
    dropout    5 % of the rows without the image, 5 % without the caption, 5 % without both: a
               dropped image is the all-zero input (zero after normalization), whose tokens are the
               unconditional ones `reference_tokens` makes at sampling; a dropped caption is ""
    schedule   AdamW, lr 5e-4 with 100 warmup steps and a cosine to a tenth, 3000 steps of 32, an
               EMA of the weights (decay warmed up to 0.999), bf16 autocast where native

The tower is transformers' CLIPVisionModelWithProjection at 64 pixels (8x8 patches of 8, width 64,
3 layers); Plus reads the penultimate hidden states, so its last layer, final layer norm and
projection receive no gradient and keep their seeded initial weights (the folder is still a
complete tower). The Resampler has the official Plus's proportions at toy-sd's width: 16 queries,
heads of 64 (one), feed-forward 4x; 2 layers instead of 4.

Written (fp32, the EMA weights): `<out>/ip-adapter-plus_toy-sd.safetensors` in h94/IP-Adapter's keys
(`image_proj.*`, `ip_adapter.N.to_k_ip / to_v_ip`) and `<out>/image_encoder/` (config.json +
model.safetensors), which `load_ip_adapter` and `load_clip_vision` read as they read the official files:

    python scripts/sample.py --ip-adapter runs/adapters/ip-adapter-plus_toy-sd.safetensors \\
        --image-encoder runs/adapters/image_encoder --image star.png --concept star \\
        --prompt "a star to the left of a small blue circle on grass"

flux: a toy OminiControl subject LoRA (Tan et al. 2024) for toy-flux, as minigen/methods/ominicontrol.py
runs it: the reference's latents join FLUX's joint attention as condition tokens (timestep 0, position
ids shifted right by the grid's width), and only those tokens pass through the LoRA. The recipe is the
official subject training's at toy scale, with AdamW where OminiControl uses Prodigy:

    data       the same pairs; the references' latents are cached as the targets' are
    frozen     toy-flux's transformer, text encoders and autoencoder (--base; default the shipped one)
    trained    omini/subject_512's LoRA: rank 16 on each double block's norm1.linear, attn.to_q,
               attn.to_k and each single block's norm.linear, attn.to_q, attn.to_k (diffusers' names;
               in BFL's layout the q and k rows of the fused qkv / linear1), up 0 at the start. The last
               single block's to_q never learns: its condition queries only make condition outputs,
               which the model drops after that block
    loss       rectified flow (`flow_loss`) on the target's latents, with the caption as text and the
               condition group through `extra=`, as the sampler passes it
    dropout    10 % of the rows with a black reference, 10 % with the caption "", drawn apart (the
               subject config's drop_image_prob, drop_text_prob)
    schedule   as for sd: AdamW, lr 5e-4, 3000 steps of 32, EMA, bf16 autocast where native

Written (fp32, the EMA weights): `<out>/subject_toy-flux.safetensors` in the official file's keys
(`transformer.<diffusers name>.lora_A.weight / .lora_B.weight`), which `read_flux_lora` reads as it
reads omini/subject_512:

    python scripts/sample.py --model toy-flux --omini runs/omini/subject_toy-flux.safetensors \\
        --image star.png --concept star --prompt "a star to the left of a small blue circle on grass"

--out defaults to --work; nothing is written into weights/ unasked. Every --save-every steps the run
writes `<work>/ip-adapter.safetensors` (sd) or `<work>/subject-lora.safetensors` (flux): weights, EMA,
Adam's moments, the random state; the same
command resumes from it, and refuses a checkpoint of another base model or recipe.
"""

from __future__ import annotations

import argparse
import sys
import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save as serialize
from torch import Tensor, nn
from tqdm import tqdm
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from minigen import cli
from minigen.controls import Controls, LowRank
from minigen.image import normalize_clip
from minigen.loading.files import check_writable_folder, write_atomically, write_files_together
from minigen.loading.flux import load_flux
from minigen.loading.ip_adapter import RESAMPLER_HEAD_DIM, unet_cross_attention_widths
from minigen.loading.lora_flux import Place, flux_layer_table
from minigen.loading.sd import load_sd
from minigen.loading.toy import TOY_FLUX, TOY_SD, is_toy_flux_folder, toy_flux_folder_files, toy_layout
from minigen.methods.lora_factors import initial_down
from minigen.models.flux import Flux
from minigen.models.flux_tokens import TokenGroup, image_ids, pack_latents
from minigen.models.ip_adapter import IPAdapter, Resampler
from minigen.models.vae import AutoencoderKL
from minigen.objectives import diffusion_loss, flow_loss
from minigen.pipelines.flux import FluxPipeline
from minigen.pipelines.sd import StableDiffusion
from minigen.toy.pairs import PairData, render_pairs
from minigen.trainer import Trainer, TrainConfig, base_fingerprint, cached_tensors, fingerprint
from minigen.transformers_compat import file_layout

TOY_VISION = dict(image_size=64, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, projection_dim=64)
TOY_RESAMPLER = dict(depth=2, dim_head=RESAMPLER_HEAD_DIM, heads=1, num_queries=16, ff_mult=4)  # dim: heads x dim_head
STAGES = {"sd": TrainConfig(steps=3000, batch=32, lr=5e-4, seed=21, ema_warmup=True),
          "flux": TrainConfig(steps=3000, batch=32, lr=5e-4, seed=23, ema_warmup=True)}
PAIRS, PAIR_SEED = 20_000, 1
IMAGE_DROP, TEXT_DROP, BOTH_DROP = 0.05, 0.05, 0.05  # the official rates
ADAPTER_FILE = "ip-adapter-plus_toy-sd.safetensors"
SUBJECT_RANK = 16  # omini/subject_512's rank; no alpha in the file, so its scale alpha / rank is 1
SUBJECT_PARTS = {"double": ("norm1.linear", "attn.to_q", "attn.to_k"), "single": ("norm.linear", "attn.to_q", "attn.to_k")}
OMINI_IMAGE_DROP, OMINI_TEXT_DROP = 0.1, 0.1  # OminiControl's subject config: drop_image_prob, drop_text_prob, drawn apart
SUBJECT_FILE = "subject_toy-flux.safetensors"


# ---- Data ---------------------------------------------------------------------------------------
def pairs_name(layout: str, n: int = PAIRS) -> str:
    """What names ``n`` pairs in cache files: their number, seed and (where not the default) the
    layout of their targets."""
    return f"{n}-{PAIR_SEED}" + ("" if layout == "anywhere" else f"-{layout}")


def training_pairs(work: Path, layout: str) -> PairData:
    """The rendered pairs with targets in ``layout``, cached beside the work folder (runs on other
    bases of the same world share them)."""

    def render() -> tuple[dict[str, Tensor], dict[str, str]]:
        pairs = render_pairs(PAIRS, PAIR_SEED, workers=torch.get_num_threads(), layout=layout)  # a process per thread we may use
        return {"references": pairs.references, "targets": pairs.targets}, {"captions": json.dumps(pairs.captions)}

    tensors, metadata = cached_tensors(work.parent / f"toy-pairs-{pairs_name(layout)}.safetensors", render)
    return PairData(tensors["references"], tensors["targets"], json.loads(metadata["captions"]))


@torch.no_grad()
def pair_latents(vae: AutoencoderKL, pairs: PairData, layout: str, device: torch.device, cache: Path, which: str = "targets") -> Tensor:
    """Scaled latents (posterior means) of the pairs' targets (or references) [N, C, h, w], cached per
    autoencoder; ``layout`` names the pairs (`training_pairs`)."""
    images = getattr(pairs, which)

    def encode() -> tuple[dict[str, Tensor], dict[str, str]]:
        return {"latents": torch.cat([vae.encode_images(images[i : i + 500].to(device) / 255).cpu() for i in tqdm(range(0, len(pairs), 500), desc=f"encoding the {which}")])}, {}

    name = "toy-pair-latents" if which == "targets" else f"toy-pair-{which}-latents"
    return cached_tensors(cache / f"{name}-{pairs_name(layout, len(pairs))}-{fingerprint(vae)}.safetensors", encode)[0]["latents"]


def clip_input(images: Tensor) -> Tensor:
    """uint8 renders [B, 3, 64, 64] -> the tower's input: `preprocess_clip(image, 64)` of each 64x64 image
    (resizing to its own size changes nothing; the normalization is OpenAI's)."""
    return normalize_clip(images.float() / 255)


def dropped(batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Which rows train without the image and which without the caption ([B] bool each), at the
    official rates: image alone, caption alone, both."""
    u = torch.rand(batch, generator=generator)
    text = (u >= IMAGE_DROP) & (u < IMAGE_DROP + TEXT_DROP + BOTH_DROP)
    image = (u < IMAGE_DROP) | ((u >= IMAGE_DROP + TEXT_DROP) & (u < IMAGE_DROP + TEXT_DROP + BOTH_DROP))
    return image, text


# ---- The adapter --------------------------------------------------------------------------------
def toy_ip_adapter(pipe: StableDiffusion, seed: int) -> tuple[CLIPVisionModelWithProjection, IPAdapter]:
    """A fresh vision tower and IP-Adapter-Plus for `pipe`'s UNet: random tower and Resampler (from
    `seed`), each layer's to_k_ip / to_v_ip a copy of its text to_k / to_v."""
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TOY_VISION))
    unet, width = pipe.unet, pipe.unet.config.context_dim
    proj = Resampler(dim=TOY_RESAMPLER["heads"] * RESAMPLER_HEAD_DIM, embedding_dim=TOY_VISION["hidden_size"], output_dim=width, **TOY_RESAMPLER)
    adapter = IPAdapter(proj, unet_cross_attention_widths(unet), width)
    with torch.no_grad():
        for layer, (to_k_ip, to_v_ip) in adapter.projections().items():
            text = unet.get_submodule(unet.attention_layers()[layer]).attn2
            to_k_ip.weight.copy_(text.to_k.weight)
            to_v_ip.weight.copy_(text.to_v.weight)
    device = next(unet.parameters()).device
    return encoder.to(device), adapter.to(device)


def train_ip_adapter(
    pipe: StableDiffusion, pairs: PairData, latents: Tensor, stage: TrainConfig, work: Path, run: dict[str, str], save_every: int = 250,
) -> tuple[CLIPVisionModelWithProjection, IPAdapter]:  # fmt: skip
    """Train a toy IP-Adapter-Plus and its tower on `pairs` against the frozen `pipe`; returns them with their EMA weights."""
    encoder, adapter = toy_ip_adapter(pipe, stage.seed)
    device, size = next(pipe.unet.parameters()).device, pairs.targets.shape[-1]
    trainer = Trainer("ip-adapter", {"vision": encoder, "adapter": adapter}, stage, work, device, run)

    def loss_fn(generator: torch.Generator) -> Tensor:
        index = torch.randint(0, len(pairs), (stage.batch,), generator=generator)
        which = torch.randint(0, len(pairs.captions[0]), (stage.batch,), generator=generator)
        no_image, no_text = dropped(stage.batch, generator)
        texts = ["" if drop else pairs.captions[i][k] for i, k, drop in zip(index.tolist(), which.tolist(), no_text.tolist())]
        pixels = clip_input(pairs.references[index].to(device))
        pixels[no_image.to(device)] = 0.0  # the unconditional input
        features = encoder(pixels, output_hidden_states=True).hidden_states[-2]  # [B, 65, 64]
        tokens = adapter.tokens(features)  # [B, 16, 64]
        context = pipe.encode_prompt(texts, size, size).context  # [B, 77, 64], frozen
        controls = Controls(extra_tokens=[adapter.extra_tokens(tokens)])
        return diffusion_loss(pipe.unet, pipe.schedule, latents[index].to(device), context, generator=generator, controls=controls)

    trainer.run(loss_fn, save_every)
    encoder.load_state_dict(trainer.ema_state("vision"))
    adapter.load_state_dict(trainer.ema_state("adapter"))
    return encoder.eval(), adapter.eval()


def export_ip_adapter(encoder: CLIPVisionModelWithProjection, adapter: IPAdapter, out: Path, info: dict) -> Path:
    """The adapter file (h94's keys) and the tower's folder (transformers' names), fp32; returns the file."""
    folder = out / "image_encoder"
    file = out / ADAPTER_FILE
    adapter_data = serialize({k: v.detach().cpu().float().contiguous() for k, v in adapter.state_dict().items()}, {"minigen.toy": json.dumps(info)})
    # the official key names (vision_model.*), whichever way this transformers version nests the tower
    tower = {k: v.detach().cpu().float().contiguous() for k, v in file_layout(encoder.state_dict(), encoder, "vision_model").items()
             if not k.endswith("position_ids")}  # fmt: skip
    config = (json.dumps(encoder.config.to_dict(), indent=2, sort_keys=True) + "\n").encode()
    # an existing --out was refused at the start; with --overwrite, adapter and tower are replaced together
    write_files_together({file: adapter_data, folder / "model.safetensors": serialize(tower), folder / "config.json": config})
    print(f"wrote {file} and {folder}/", flush=True)
    return file


# ---- toy-flux's OminiControl subject LoRA ---------------------------------------------------------
def subject_layers(transformer: Flux) -> dict[str, Place]:
    """omini/subject_512's layers under diffusers' names -> where each lands in minigen's (BFL) transformer:
    a whole modulation, or the q or k rows of a fused qkv / linear1."""
    config, table = transformer.config, flux_layer_table(transformer)
    names = [f"transformer_blocks.{i}.{part}" for i in range(config.depth) for part in SUBJECT_PARTS["double"]]
    names += [f"single_transformer_blocks.{i}.{part}" for i in range(config.depth_single_blocks) for part in SUBJECT_PARTS["single"]]
    return {name: table[name.replace(".", "_")] for name in names}


class SubjectLoRA(nn.Module):
    """OminiControl's subject LoRA: a factor pair down [r, in], up [rows, r] per layer of `subject_layers`,
    down drawn as nn.Linear's weights and up 0 (PEFT's default), applied to the condition tokens only."""

    def __init__(self, transformer: Flux, rank: int = SUBJECT_RANK, generator: torch.Generator | None = None):
        super().__init__()
        self.places = subject_layers(transformer)
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        for place in self.places.values():
            weight = transformer.get_submodule(place.target).weight  # [out, in]
            start, stop = place.outputs or (0, weight.shape[0])
            self.down.append(nn.Parameter(initial_down(rank, weight.shape[1], generator).to(weight.device)))
            self.up.append(nn.Parameter(torch.zeros(stop - start, rank, device=weight.device)))

    def low_rank(self) -> list[LowRank]:
        """The factors as residuals for a `TokenGroup`'s lora; autograd flows into them."""
        return [LowRank(p.target, down, up, 1.0, outputs=p.outputs) for p, down, up in zip(self.places.values(), self.down, self.up)]

    def file_tensors(self) -> dict[str, Tensor]:
        """The official file's keys (diffusers / PEFT, as OminiControl saves them), fp32."""
        tensors = {}
        for name, down, up in zip(self.places, self.down, self.up):
            tensors[f"transformer.{name}.lora_A.weight"] = down.detach().cpu().float().contiguous()
            tensors[f"transformer.{name}.lora_B.weight"] = up.detach().cpu().float().contiguous()
        return tensors


def condition_tokens(latents: Tensor, lora: SubjectLoRA) -> TokenGroup:
    """The references' latents [B, 16, h, w] as OminiControl's condition group: packed, timestep 0, ids
    shifted right by the grid's own width (as `ominicontrol.condition_group` and the subject pipeline place
    them at sampling), with the subject LoRA."""
    h, w = latents.shape[-2] // 2, latents.shape[-1] // 2
    ids = image_ids(h, w, offset=(0, w)).to(latents.device)
    return TokenGroup(pack_latents(latents), ids, stream="img", timestep=0.0, lora=tuple(lora.low_rank()), name="cond")


def train_subject_lora(
    pipe: FluxPipeline, pairs: PairData, latents: Tensor, references: Tensor, stage: TrainConfig, work: Path, run: dict[str, str],
    save_every: int = 250,
) -> SubjectLoRA:  # fmt: skip
    """Train a toy subject LoRA on `pairs` (target latents, reference latents) against the frozen `pipe`;
    returns it with its EMA weights."""
    device = next(pipe.transformer.parameters()).device
    lora = SubjectLoRA(pipe.transformer, generator=torch.Generator().manual_seed(stage.seed)).to(device)
    black = pipe.vae.encode_images(torch.zeros(1, 3, *pairs.references.shape[-2:], device=device))  # a dropped reference
    trainer = Trainer("subject-lora", {"lora": lora}, stage, work, device, run)

    def loss_fn(generator: torch.Generator) -> Tensor:
        index = torch.randint(0, len(pairs), (stage.batch,), generator=generator)
        which = torch.randint(0, len(pairs.captions[0]), (stage.batch,), generator=generator)
        no_image = torch.rand(stage.batch, generator=generator) < OMINI_IMAGE_DROP
        no_text = torch.rand(stage.batch, generator=generator) < OMINI_TEXT_DROP
        texts = ["" if drop else pairs.captions[i][k] for i, k, drop in zip(index.tolist(), which.tolist(), no_text.tolist())]
        condition = torch.where(no_image.view(-1, 1, 1, 1).to(device), black, references[index].to(device))
        text = pipe.encode_prompt(texts)  # frozen
        return flow_loss(pipe.transformer, latents[index].to(device), text.txt, text.y, generator=generator,
                         extra=[condition_tokens(condition, lora)])  # fmt: skip

    trainer.run(loss_fn, save_every)
    lora.load_state_dict(trainer.ema_state("lora"))
    return lora.eval()


def export_subject_lora(lora: SubjectLoRA, out: Path, info: dict) -> Path:
    file = out / SUBJECT_FILE
    data = serialize(lora.file_tensors(), {"minigen.toy": json.dumps(info)})
    write_atomically(file, lambda f: f.write(data), overwrite=True)  # an existing --out was refused at the start
    print(f"wrote {file}", flush=True)
    return file


# ---- Commands -----------------------------------------------------------------------------------
def pair_record(layout: str) -> str:
    """The pairs as the run and the exported file state them."""
    return f"{PAIRS} from seed {PAIR_SEED}" + ("" if layout == "anywhere" else f", layout {layout}")


def recipe(args: argparse.Namespace) -> TrainConfig:
    """The model's stage with the command line's --steps, --batch and --lr where given."""
    return replace(STAGES[args.model], **{k: getattr(args, k) for k in ("steps", "batch", "lr") if getattr(args, k) is not None})


def train_sd(args: argparse.Namespace, device: torch.device) -> None:
    stage = recipe(args)
    pipe, layout = load_sd(args.base, dtype=torch.float32, device=device), toy_layout(args.base)  # frozen, in eval mode
    pairs = training_pairs(args.work, layout)
    latents = pair_latents(pipe.vae, pairs, layout, device, cache=args.work.parent)
    run = {  # a checkpoint resumes only on the same base, data and recipe
        "base": base_fingerprint(pipe),
        "pairs": pair_record(layout),
        "recipe": f"steps {stage.steps}, batch {stage.batch}, lr {stage.lr}",
    }
    encoder, adapter = train_ip_adapter(pipe, pairs, latents, stage, args.work, run, args.save_every)
    info = {"model": "ip-adapter-plus_toy-sd", "base_file": args.base.name, **run}
    export_ip_adapter(encoder, adapter, args.out, info)


def train_flux(args: argparse.Namespace, device: torch.device) -> None:
    stage = recipe(args)
    pipe, layout = load_flux(**toy_flux_folder_files(args.base), dtype=torch.float32, device=device), toy_layout(args.base)  # frozen
    pairs = training_pairs(args.work, layout)
    latents = pair_latents(pipe.vae, pairs, layout, device, cache=args.work.parent)
    references = pair_latents(pipe.vae, pairs, layout, device, cache=args.work.parent, which="references")
    run = {  # a checkpoint resumes only on the same base, data and recipe
        "base": base_fingerprint(pipe),
        "pairs": pair_record(layout),
        "recipe": f"steps {stage.steps}, batch {stage.batch}, lr {stage.lr}, rank {SUBJECT_RANK}",
    }
    lora = train_subject_lora(pipe, pairs, latents, references, stage, args.work, run, args.save_every)
    export_subject_lora(lora, args.out, {"model": "subject_toy-flux", "base_folder": args.base.name, **run})


def run_arguments(command: argparse.ArgumentParser) -> None:
    """The flags every adapter's command takes: where, how long, how fast."""
    command.add_argument("--work", type=Path, required=True, help="folder for resumable checkpoints")
    command.add_argument("--out", type=Path, help="folder to write the adapter into (default: --work; weights/ only when asked)")
    command.add_argument("--overwrite", action="store_true", help="replace the adapter file already in --out")
    command.add_argument("--steps", type=cli.positive_int, help="training steps (default: the recipe's)")
    command.add_argument("--batch", type=cli.positive_int, help="batch size (default: the recipe's)")
    command.add_argument("--lr", type=cli.positive_float, help="peak learning rate (default: the recipe's)")
    command.add_argument("--save-every", type=cli.positive_int, default=250, help="steps between checkpoints")
    command.add_argument("--threads", type=cli.positive_int, help="CPU threads (default: all)")


def parse(argv=None) -> argparse.Namespace:
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="model", required=True)
    sd = commands.add_parser("sd", help="a toy IP-Adapter-Plus for toy-sd, with its vision tower")
    sd.add_argument("--base", type=Path, default=TOY_SD, help="the frozen toy-sd file (default: the shipped weights/toy-sd.safetensors)")
    run_arguments(sd)
    flux = commands.add_parser("flux", help="a toy OminiControl subject LoRA for toy-flux")
    flux.add_argument("--base", type=Path, default=TOY_FLUX, help="the frozen toy-flux folder (default: the shipped weights/toy-flux)")
    run_arguments(flux)
    args = parser.parse_args(argv)
    check_writable_folder(args.work, "--work")
    default = args.out is None
    args.out = args.out or args.work  # the folder the adapter is exported to (default: beside its checkpoint)
    written = [args.out / ADAPTER_FILE, args.out / "image_encoder"] if args.model == "sd" else [args.out / SUBJECT_FILE]  # the tower's folder too
    if (taken := [path for path in written if path.exists()]) and not args.overwrite:
        said = f"--work {args.out} (the default --out)" if default else f"--out {args.out}"
        parser.error(f"{said} holds {taken[0].name} already; give another --out, or pass --overwrite to replace it when the run ends")
    check_writable_folder(args.out, "--out")
    if args.model == "sd" and not args.base.is_file():
        parser.error(f"--base {args.base}: not a file; give an exported toy-sd (e.g. weights/toy-sd.safetensors)")
    if args.model == "flux" and not is_toy_flux_folder(args.base):
        parser.error(f"--base {args.base}: not a toy-flux folder; give an exported toy-flux (e.g. weights/toy-flux)")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    {"sd": train_sd, "flux": train_flux}[args.model](args, device)


if __name__ == "__main__":
    sys.exit(cli.run(main, resumes=True))  # bad input: one line on stderr, exit code 2, no traceback
