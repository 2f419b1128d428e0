"""Train the toy reference adapters on pairs of the toy world, and write them in the official layouts.

    python scripts/train_toy_adapters.py sd --work runs/adapters   # -> runs/adapters/ip-adapter-plus_toy-sd.safetensors
                                                                   #    and runs/adapters/image_encoder/

sd: a toy IP-Adapter-Plus (Ye et al. 2023) for toy-sd, with a tiny CLIP vision tower trained with it
(no CLIP knows the toy world). The method, as minigen/models/ip_adapter.py runs it:

    reference [B, 3, 64, 64] --vision tower--> hidden_states[-2] [B, 65, 64] --Resampler--> tokens [B, 16, 64]
    every cross-attention layer of the frozen UNet:
        out = Attn(q, K_text, V_text) + Attn(q, to_k_ip(tokens), to_v_ip(tokens))

The recipe is the official training's (IP-Adapter's tutorial_train_plus.py) at toy scale:

    data       pairs (minigen/toy/pairs.py): an object alone -> a training scene holding it among
               0-2 others, captioned with the object named by its shape word; rendered once and
               cached beside the work folder, as the targets' latents are (per autoencoder)
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

--out defaults to --work; nothing is written into weights/ unasked. Every --save-every steps the run
writes `<work>/ip-adapter.safetensors` (weights, EMA, Adam's moments, the random state); the same
command resumes from it, and refuses a checkpoint of another base model or recipe.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from minigen.controls import Controls
from minigen.image import normalize_clip
from minigen.loading.ip_adapter import RESAMPLER_HEAD_DIM, unet_cross_attention_widths
from minigen.loading.sd import load_sd
from minigen.loading.toy import TOY_SD
from minigen.models.ip_adapter import IPAdapter, Resampler
from minigen.models.vae import AutoencoderKL
from minigen.objectives import diffusion_loss
from minigen.pipelines.sd import StableDiffusion
from minigen.toy.pairs import PairData, render_pairs
from minigen.trainer import Trainer, TrainConfig, cached_tensors, fingerprint
from minigen.transformers_compat import file_layout

TOY_VISION = dict(image_size=64, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, projection_dim=64)
TOY_RESAMPLER = dict(depth=2, dim_head=RESAMPLER_HEAD_DIM, heads=1, num_queries=16, ff_mult=4)  # dim: heads x dim_head
STAGES = {"sd": TrainConfig(steps=3000, batch=32, lr=5e-4, seed=21, ema_warmup=True)}
PAIRS, PAIR_SEED = 20_000, 1
IMAGE_DROP, TEXT_DROP, BOTH_DROP = 0.05, 0.05, 0.05  # the official rates
ADAPTER_FILE = "ip-adapter-plus_toy-sd.safetensors"


# ---- Data ---------------------------------------------------------------------------------------
def training_pairs(work: Path) -> PairData:
    """The rendered pairs, cached beside the work folder (runs on other bases share them)."""

    def render() -> tuple[dict[str, Tensor], dict[str, str]]:
        pairs = render_pairs(PAIRS, PAIR_SEED, workers=torch.get_num_threads())  # a process per thread we may use
        return {"references": pairs.references, "targets": pairs.targets}, {"captions": json.dumps(pairs.captions)}

    tensors, metadata = cached_tensors(work.parent / f"toy-pairs-{PAIRS}-{PAIR_SEED}.safetensors", render)
    return PairData(tensors["references"], tensors["targets"], json.loads(metadata["captions"]))


@torch.no_grad()
def target_latents(vae: AutoencoderKL, pairs: PairData, device: torch.device, cache: Path) -> Tensor:
    """Scaled latents (posterior means) of the targets [N, 4, 16, 16], cached per autoencoder."""

    def encode() -> tuple[dict[str, Tensor], dict[str, str]]:
        return {"latents": torch.cat([vae.encode_images(pairs.targets[i : i + 500].to(device) / 255).cpu() for i in tqdm(range(0, len(pairs), 500), desc="encoding the targets")])}, {}

    return cached_tensors(cache / f"toy-pair-latents-{len(pairs)}-{PAIR_SEED}-{fingerprint(vae)}.safetensors", encode)[0]["latents"]


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
    folder.mkdir(parents=True, exist_ok=True)
    file = out / ADAPTER_FILE
    save_file({k: v.detach().cpu().float().contiguous() for k, v in adapter.state_dict().items()}, file, {"minigen.toy": json.dumps(info)})
    # the official key names (vision_model.*), whichever way this transformers version nests the tower
    tower = {k: v.detach().cpu().float().contiguous() for k, v in file_layout(encoder.state_dict(), encoder, "vision_model").items()
             if not k.endswith("position_ids")}  # fmt: skip
    save_file(tower, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(encoder.config.to_dict(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {file} and {folder}/", flush=True)
    return file


# ---- Commands -----------------------------------------------------------------------------------
def train_sd(args: argparse.Namespace, device: torch.device) -> None:
    stage = replace(STAGES["sd"], **{k: getattr(args, k) for k in ("steps", "batch", "lr") if getattr(args, k) is not None})
    pipe = load_sd(args.base, dtype=torch.float32, device=device)  # frozen, in eval mode
    pairs = training_pairs(args.work)
    latents = target_latents(pipe.vae, pairs, device, cache=args.work.parent)
    run = {  # a checkpoint resumes only on the same base, data and recipe
        "base": fingerprint(pipe.unet, pipe.vae, *pipe.text_encoders),
        "pairs": f"{len(pairs)} from seed {PAIR_SEED}",
        "recipe": f"steps {stage.steps}, batch {stage.batch}, lr {stage.lr}",
    }
    encoder, adapter = train_ip_adapter(pipe, pairs, latents, stage, args.work, run, args.save_every)
    info = {"model": "ip-adapter-plus_toy-sd", "base_file": args.base.name, **run}
    export_ip_adapter(encoder, adapter, args.out or args.work, info)


def run_arguments(command: argparse.ArgumentParser) -> None:
    """The flags every adapter's command takes: where, how long, how fast."""
    command.add_argument("--work", type=Path, required=True, help="folder for resumable checkpoints")
    command.add_argument("--out", type=Path, help="folder to write the adapter into (default: --work; weights/ only when asked)")
    command.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    command.add_argument("--batch", type=int, help="batch size (default: the recipe's)")
    command.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    command.add_argument("--save-every", type=int, default=250, help="steps between checkpoints")
    command.add_argument("--threads", type=int, help="CPU threads (default: all)")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="model", required=True)
    sd = commands.add_parser("sd", help="a toy IP-Adapter-Plus for toy-sd, with its vision tower")
    sd.add_argument("--base", type=Path, default=TOY_SD, help="the frozen toy-sd file (default: the shipped weights/toy-sd.safetensors)")
    run_arguments(sd)
    args = parser.parse_args(argv)
    for flag, value in (("--steps", args.steps), ("--batch", args.batch), ("--save-every", args.save_every), ("--threads", args.threads)):
        if value is not None and value < 1:
            parser.error(f"{flag} {value}: give 1 or more")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr {args.lr}: give a positive learning rate, e.g. 5e-4")
    if args.model == "sd" and not args.base.is_file():
        parser.error(f"--base {args.base}: not a file; give an exported toy-sd (e.g. weights/toy-sd.safetensors)")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    {"sd": train_sd}[args.model](args, device)


if __name__ == "__main__":
    main()
