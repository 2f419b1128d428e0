"""Train the toy models on the toy world, and write them in the official layouts.

    python scripts/train_toy.py sd   --work runs/toy-sd      # -> runs/toy-sd/toy-sd.safetensors
    python scripts/train_toy.py flux --work runs/toy-flux    # -> runs/toy-flux/toy-flux/
    python scripts/train_toy.py reader --work runs/reader    # toy-sd's reader stage alone, and its held-out accuracy

The models are written inside --work unless --out says where (`--out weights/toy-sd.safetensors
--overwrite` replaces the shipped model; nothing is written into weights/ unasked, and an existing --out
is refused at the start without --overwrite). Both follow toy world v2's
recipe: text encoders taught to read the toy language first and then frozen, a denoiser trained on
their features. Each stage has its own seed:

    reader   the text encoders alone, taught to read the toy language: linear heads tell each
             mention's attributes from its last token, and the count, background and relation from
             the end token (minigen/toy/reader.py); then frozen. toy-sd has one, its CLIP-style encoder
             (stage `reader`); toy-flux two, `reader-t5` (T5 on toy-flux's own sentencepiece
             vocabulary, learnt from the captions first) and `reader-clip` (whose end-of-text state is
             FLUX's pooled vector)
    vae      the autoencoder alone, on rendered scenes: MSE plus LDM's KL term at weight 1e-6 (no
             perceptual or adversarial loss: the scenes are flat colours and sharp edges)
    decoder  (toy-flux only) the decoder further, on MSE, with the encoder frozen, so the latent
             space stays exactly the one the denoiser learns (as sd-vae-ft-mse did for SD's decoder)
    denoiser the UNet (SD) or the transformer (FLUX), from scratch, on the frozen readers' features
             and latents of the frozen VAE: DDPM noise prediction with Min-SNR-5 weighting (SD) or
             rectified-flow velocity (FLUX), with 10 % of captions dropped to "" for classifier-free
             guidance

With `--init` a denoiser stage continues an exported model instead (stage `continue`, fresh Adam
moments, a lower learning rate): `--init weights/toy-sd.safetensors` keeps toy-sd's VAE and trains its
UNet on; `--init weights/toy-flux` keeps toy-flux's VAE and tokenizer and trains its transformer on.
The text encoders are readers in every stage and stay frozen, in `continue` too (they are only ever
trained to read): the reader stages' (so `--init` of a model whose text encoders never learnt to read,
as the shipped ones, continues its denoiser on new readers), or an exported model's own with
`--text-from`.

Recipe comparisons change the denoiser stage from the command line, and measure it as it trains:

    python scripts/train_toy.py sd --work runs/v2 --vae-from weights/toy-sd.safetensors \\
        --batch 32 --lr 1e-3 --one-object-steps 1500 --eval-every 500 --threads 1
    python scripts/train_toy.py flux --work runs/v2-flux --vae-from weights/toy-flux --eval-every 500

--vae-from keeps an exported model's autoencoder (so runs share one latent space and skip the VAE
stages; for toy-flux its T5 tokenizer too, so the T5 ids stay the same), --text-from its text
encoders (skipping the reader stages; `--init F --text-from F` continues a model on its own readers),
--one-object-steps is a curriculum (one-object scenes first), and --eval-every writes a snapshot of
the exported model (`<work>/snapshots/`), its prompt following on the first --eval-prompts
held-out prompts and the shape probe on as many one-object scenes (`minigen.toy.shape_probe`: does the
caption's shape word decide the drawn shape?) into `<work>/<stage>-eval.jsonl` (`denoiser`, or `continue` with --init), the learning curve.
The changes are recorded in the checkpoints.

Every `--save-every` steps a stage writes `<work>/<stage>.safetensors` (weights, their exponential
moving average, Adam's moments, the random state); running the same command again resumes from it.
Training uses the GPU when there is one, and bf16 autocast where bf16 is native (else fp32).
The exported models are the EMA weights; the denoiser stages warm the EMA's decay up
(min(0.999, (1 + step) / (10 + step))), so a snapshot after a thousand steps holds no trace of the
random start (with a fixed 0.999 it would keep 0.999^1000 = 37 % of it).
"""

from __future__ import annotations

import argparse
import sys
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as serialize
from torch import Tensor, nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from minigen import cli
from minigen.loading.files import (
    METADATA_PIPELINE,
    check_output_path,
    check_writable_folder,
    config_metadata,
    read_metadata,
    write_atomically,
    write_files_together,
)
from minigen.loading.flux import METADATA_FLUX_CONFIG, load_flux
from minigen.loading.hashes import files_digest
from minigen.loading.sd import METADATA_TEXT_CONFIG, METADATA_UNET_CONFIG, METADATA_VAE_CONFIG, load_sd
from minigen.loading.toy import is_toy_file, toy_layout
from minigen.models.flux import Flux
from minigen.models.flux_config import FluxConfig
from minigen.models.unet import UNet
from minigen.models.unet_config import UNetConfig
from minigen.models.vae import AutoencoderKL, VAEConfig
from minigen.pipelines.flux import FluxPipeline
from minigen.pipelines.sd import StableDiffusion
from minigen.sampling import DiscreteSchedule
from minigen.text.encoders import TextEncoderConfig, build_text_encoder
from minigen.text.t5 import NUM_EXTRA_IDS, T5Config, build_t5_encoder, encode_flux_ids, load_t5_tokenizer
from minigen.text.tokenizer import MAX_LENGTH, load_clip_tokenizer, tokenize
from minigen.toy.captions import heldout_prompts, sample_captioned
from minigen.toy.data import ToyData, render_dataset
from minigen.toy.evaluate import prompt_following_on
from minigen.toy.scenes import LAYOUTS, sample_scene
from minigen.toy.shape_probe import shape_following
from minigen.toy.reader import ReadingHeads, reading_batch
from minigen.trainer import Trainer, TrainConfig, cached_tensors, fingerprint
from minigen.transformers_compat import file_layout
from minigen.objectives import diffusion_loss, flow_loss


# ---- The toy-sd model: SD1.5 topology at tiny width ---------------------------------------------
# 64x64 pixels -> 16x16x4 latents (two downsamplings); cross-attention at 16x16 and 8x8.
TOY_SD_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8)
TOY_SD_UNET = UNetConfig(
    model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, transformer_depth=(1, 1, 0),
    num_heads=4, context_dim=64, norm_groups=16,
)  # fmt: skip
TOY_SD_DEFAULTS = {"default_size": 64}
TOY_SD_TEXT = TextEncoderConfig(hidden_size=64, intermediate_size=256, num_layers=3, num_heads=4, hidden_act="quick_gelu")

# ---- The toy-flux model: FLUX.1 topology (schnell-like: no guidance embedding) at tiny width -----
# 64x64 pixels -> 16x16x16 latents -> 8x8 = 64 image tokens of 2x2 latent patches.
TOY_FLUX_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8, z_channels=16,
                         use_quant_conv=False)  # fmt: skip
TOY_FLUX = FluxConfig(
    in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=64, hidden_size=128, num_heads=4,
    depth=2, depth_single_blocks=4, axes_dim=(8, 12, 12), guidance_embed=False,
)  # fmt: skip
TOY_T5_PIECES = 256  # BPE pieces learnt from toy captions (whole words, then characters); the 100 sentinels follow
TOY_T5 = T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=384, num_buckets=16, max_distance=32)
TOY_CLIP = TextEncoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, hidden_act="quick_gelu")
TOY_FLUX_DEFAULTS = {"max_length": 48, "default_size": 64, "default_steps": 25, "default_cfg": 4.0}


STAGES = {
    "sd": {"vae": TrainConfig(steps=4000, batch=32, lr=1e-3, seed=1, ema=0.995),
           "reader": TrainConfig(steps=1500, batch=128, lr=1e-3, seed=7, ema=0.99),
           "denoiser": TrainConfig(steps=7000, batch=64, lr=5e-4, seed=2, ema_warmup=True),
           "continue": TrainConfig(steps=3000, batch=32, lr=2e-4, seed=8, ema_warmup=True)},
    "flux": {"vae": TrainConfig(steps=1200, batch=32, lr=1e-3, seed=3, ema=0.995), "decoder": TrainConfig(steps=3000, batch=32, lr=5e-4, seed=5, ema=0.995),
             "reader-t5": TrainConfig(steps=1500, batch=128, lr=1e-3, seed=9, ema=0.99),
             "reader-clip": TrainConfig(steps=1500, batch=128, lr=1e-3, seed=10, ema=0.99),
             "denoiser": TrainConfig(steps=3500, batch=48, lr=5e-4, seed=4, ema_warmup=True),
             "continue": TrainConfig(steps=1200, batch=48, lr=2e-4, seed=6, ema_warmup=True)},
}
EXPORTED = {"sd": "an exported toy-sd file (e.g. weights/toy-sd.safetensors)",
            "flux": "an exported toy-flux folder (e.g. weights/toy-flux)"}  # fmt: skip
SUFFIX = {"sd": ".safetensors", "flux": ""}  # toy-sd is one file, toy-flux a folder
DATA_SIZE, DATA_SEED = 30_000, 0
READER_CAPTIONS, READER_SEED = 20_000, 11  # captions the reader learns from (train split, caption text only)
CAPTION_DROPOUT = 0.1
SNR_GAMMA = 5.0  # Min-SNR-γ loss weighting of the SD denoiser (`diffusion_loss`)
KL_WEIGHT = 1e-6


# ---- Stages -------------------------------------------------------------------------------------
def training_data(work: Path, shape_only: float = 0.0, shape_only_captions: float = 0.0, layout: str = "anywhere") -> ToyData:
    """The rendered training set, cached beside the work folder (toy-sd and toy-flux share it) as
    `<data_name>.safetensors`; shape_only, shape_only_captions: the shares of mentions and of whole captions
    named by shape words alone (--shape-only, --shape-only-captions); layout: where objects lie (--layout,
    `scenes.LAYOUTS`)."""

    def render() -> tuple[dict[str, Tensor], dict[str, str]]:
        data = render_dataset(DATA_SIZE, DATA_SEED, workers=torch.get_num_threads(),  # a process per thread we may use
                              shape_only=shape_only, shape_only_captions=shape_only_captions, layout=layout, progress=True)  # fmt: skip
        return {"images": data.images}, {"captions": json.dumps(data.captions)}

    tensors, metadata = cached_tensors(work.parent / f"{data_name(shape_only, shape_only_captions, layout)}.safetensors", render)
    return ToyData(tensors["images"], json.loads(metadata["captions"]))


def data_name(shape_only: float = 0.0, shape_only_captions: float = 0.0, layout: str = "anywhere") -> str:
    """The name of `training_data`'s set: its size, seed, caption shares and layout. Its file, its latents' files
    (`encode_dataset`) and the runs of the autoencoder stages go by it."""
    name = f"toy-data-{DATA_SIZE}-{DATA_SEED}" + (f"-shape-only-{shape_only:g}" if shape_only else "")
    name += f"-captions-{shape_only_captions:g}" if shape_only_captions else ""
    return name + (f"-{layout}" if layout != "anywhere" else "")


def batch_indices(n: int, batch: int, generator: torch.Generator) -> Tensor:
    return torch.randint(0, n, (batch,), generator=generator)


def train_vae(
    config: VAEConfig, data: ToyData, name: str, stage: TrainConfig, work: Path, device: torch.device, save_every: int
) -> AutoencoderKL:
    """Train an autoencoder on rendered scenes (`name`: theirs, `data_name`); returns it with the EMA weights and a
    measured scaling factor."""
    torch.manual_seed(stage.seed)
    vae = AutoencoderKL(config).to(device)
    trainer = Trainer("vae", {"vae": vae}, stage, work, device, autoencoder_run(config, name))

    def loss_fn(generator: torch.Generator) -> Tensor:
        x = data.images_as_float(batch_indices(len(data), stage.batch, generator)).to(device)
        mean, logvar = vae.quant_conv(vae.encoder(x)).float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator).to(device)
        recon = vae.decoder(vae.post_quant_conv(z)).float()
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum() / x.numel()
        return F.mse_loss(recon, x) + KL_WEIGHT * kl

    trainer.run(loss_fn, save_every)
    vae.load_state_dict(trainer.ema_state("vae"))
    return replace_scaling(vae, data, device)


def finetune_decoder(
    vae: AutoencoderKL, data: ToyData, name: str, stage: TrainConfig, work: Path, device: torch.device, save_every: int
) -> AutoencoderKL:
    """Train the decoder further with the encoder frozen, on MSE alone (as sd-vae-ft-mse did for SD's
    autoencoder): reconstructions sharpen while the latent space the denoiser learns stays the same."""
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    run = {**autoencoder_run(vae.config, name), "encoder": fingerprint(vae.encoder, vae.quant_conv)}
    trainer = Trainer("decoder", {"vae": vae}, stage, work, device, run)

    def loss_fn(generator: torch.Generator) -> Tensor:
        x = data.images_as_float(batch_indices(len(data), stage.batch, generator)).to(device)
        with torch.no_grad():
            z = vae.encode(x, generator)  # a posterior sample, scaled as the denoiser sees it
        return F.mse_loss(vae.decode(z).float(), x)

    trainer.run(loss_fn, save_every)
    vae.load_state_dict(trainer.ema_state("vae"))
    return vae.requires_grad_(True)


def autoencoder_run(config: VAEConfig, name: str) -> dict[str, str]:
    """What an autoencoder stage records of its run: the architecture (the latent scale aside, which neither stage's
    loss depends on) and the training set's name (`data_name`), so a checkpoint of another one is not resumed."""
    return {"config": json.dumps(asdict(replace(config, scaling_factor=1.0, shift_factor=0.0))), "data": name}


@torch.no_grad()
def replace_scaling(vae: AutoencoderKL, data: ToyData, device: torch.device, n: int = 2000) -> AutoencoderKL:
    """Set the latent scale to 1 / std of the latents, as LDM did for SD; a FLUX-style VAE (no quant
    convs) also subtracts their mean (`shift_factor`), as BFL's autoencoder does."""
    vae.config = replace(vae.config, scaling_factor=1.0, shift_factor=0.0)
    latents = torch.cat([vae.encode(data.images_as_float(slice(i, i + 500)).to(device)) for i in range(0, n, 500)])
    shift = 0.0 if vae.config.use_quant_conv else round(latents.mean().item(), 5)
    vae.config = replace(vae.config, scaling_factor=round(1.0 / (latents - shift).std().item(), 5), shift_factor=shift)
    print(f"vae: latent mean {latents.mean().item():.4f} std {latents.std().item():.4f} -> shift_factor "
          f"{vae.config.shift_factor}, scaling_factor {vae.config.scaling_factor}", flush=True)
    return vae


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, data: ToyData, name: str, device: torch.device, cache: Path | None = None) -> Tensor:
    """Scaled latents (posterior means) of every image of the set `name` (`data_name`), [N, C, 16, 16].

    cache: a folder where they are kept per set and autoencoder (`<name>-latents-<fingerprint of its
    weights>.safetensors`), as the training set is: on a CPU, encoding 30,000 scenes takes minutes, and
    every run on the same set and autoencoder needs the same latents."""

    def encode() -> tuple[dict[str, Tensor], dict[str, str]]:
        return {"latents": torch.cat([vae.encode(data.images_as_float(slice(i, i + 500)).to(device)).cpu() for i in tqdm(range(0, len(data), 500), desc=f"encoding {name}")])}, {}

    if cache is None:
        return encode()[0]["latents"]
    return cached_tensors(cache / f"{name}-latents-{fingerprint(vae)}.safetensors", encode)[0]["latents"]


def train_reader(
    name: str, build: Callable[[], nn.Module], tokenizer: PreTrainedTokenizerBase, length: int, stage: TrainConfig,
    work: Path, device: torch.device, save_every: int, shape_only: float = 0.0, shape_only_captions: float = 0.0,
    run: dict[str, str] | None = None,
) -> nn.Module:  # fmt: skip
    """A text encoder taught to read the toy language (minigen/toy/reader.py) as stage `name`: returns it
    with its EMA weights, and prints the heads' held-out accuracy.

    build: the encoder with random weights (drawn under the stage's seed); length: the token ids it reads
    (CLIP 77, toy-flux's T5 48); run: what else the reader's run depends on (toy-flux's T5: its tokenizer's
    digest), recorded with the caption shares, so that a reader of other ids is not resumed. The captions
    are a pool drawn once from the train split; accuracy is measured on the captions of the 200 held-out
    evaluation prompts (unseen colour x shape pairs, held-out phrasings). Every weight trains, the whole
    token table included, but only the rows of the tokens the captions use matter: the other rows get zero
    gradients, and AdamW without weight decay leaves them (and their EMA) exactly as they were drawn.
    """
    torch.manual_seed(stage.seed)
    text = build().to(device)
    pool = [sample_captioned(np.random.default_rng([READER_SEED, i]), shape_only=shape_only, shape_only_captions=shape_only_captions)[1]
            for i in range(READER_CAPTIONS)]  # fmt: skip
    batch = reading_batch(pool, tokenizer, length)  # a fact a caption leaves open is not read (label IGNORE)
    torch.manual_seed(stage.seed)
    heads = ReadingHeads(text.config.hidden_size).to(device)
    shares = {"shape_only": shape_only, "shape_only_captions": shape_only_captions}
    run = {**(run or {}), **{k: f"{v:g}" for k, v in shares.items() if v}}  # a reader of other captions is not resumed
    trainer = Trainer(name, {"text": text, "heads": heads}, stage, work, device, run=run)

    def loss_fn(generator: torch.Generator) -> Tensor:
        index = batch_indices(READER_CAPTIONS, stage.batch, generator)
        features = text(batch.ids[index].to(device)).last_hidden_state  # [B, length, width]
        return heads.loss(features, {k: labels[index] for k, labels in batch.labels.items()})[0]

    trainer.run(loss_fn, save_every)
    text.load_state_dict(trainer.ema_state("text"))
    heads.load_state_dict(trainer.ema_state("heads"))
    heldout = reading_batch([c for _, c in heldout_prompts(200)], tokenizer, length)
    with torch.no_grad():
        _, accuracy = heads.loss(text(heldout.ids.to(device)).last_hidden_state, heldout.labels)
    print(f"{name}: held-out accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()), flush=True)
    return text


# ---- The denoiser stage both toy models share ---------------------------------------------------
class DenoiserRun(NamedTuple):
    """A toy model's denoiser stage as `train_sd` or `train_flux` sets it up; `train_denoiser` runs it."""

    model: str  # "sd" or "flux": its stages in STAGES, the names of its exports
    stage: str  # "denoiser" (from scratch) or "continue" (--init)
    run: dict[str, str]  # what it trains against (readers, autoencoder, start), recorded in its checkpoints
    name: str  # the denoiser's name in the checkpoints
    denoiser: nn.Module
    vae: AutoencoderKL  # frozen: the training latents are its encodings
    tokenizers: list[tuple[PreTrainedTokenizerBase, int]]  # each frozen text encoder's tokenizer and token count
    loss: Callable[[Tensor, list[Tensor], torch.Generator], Tensor]  # latents [B, C, 16, 16], ids [B, L] per encoder
    export: Callable[[Path], Path]  # writes the model as it stands (a file or a folder); returns the path


class CaptionIds:
    """Every scene's captions as token ids, for each text encoder, and the captions a training batch reads."""

    def __init__(self, data: ToyData, tokenizers: list[tuple[PreTrainedTokenizerBase, int]]):
        captions = list(zip(*data.captions))  # K lists of the N scenes' captions
        self.ids = [torch.stack([tokenize(tokenizer, list(texts), length) for texts in captions], 1)
                    for tokenizer, length in tokenizers]  # [N, K, L] each  # fmt: skip
        self.empty = [tokenize(tokenizer, [""], length)[0] for tokenizer, length in tokenizers]  # [L] each: the dropped caption

    def draw(self, index: Tensor, generator: torch.Generator) -> list[Tensor]:
        """One of its captions for each scene of `index`, the same for every encoder ([B, L] each), with
        CAPTION_DROPOUT of them "" (what classifier-free guidance contrasts with)."""
        which = torch.randint(0, self.ids[0].shape[1], (len(index),), generator=generator)
        drop = torch.rand(len(index), generator=generator) < CAPTION_DROPOUT
        tokens = [ids[index, which] for ids in self.ids]
        for ids, empty in zip(tokens, self.empty):
            ids[drop] = empty
        return tokens


def train_denoiser(setup: DenoiserRun, data: ToyData, args: argparse.Namespace, device: torch.device) -> None:
    """Train a denoiser on the frozen autoencoder's latents and the frozen readers' features; export its EMA.

    What the two toy models share: the command line's recipe changes (recorded in the checkpoints), the
    curriculum (--one-object-steps), a caption per sample, the learning curve (--eval-every: a snapshot
    in <work>/snapshots/ and its prompt following) and the export (--out, else inside --work).
    """
    default = STAGES[setup.model][setup.stage]
    stage = denoiser_stage(default, args)
    run = {**setup.run, **recipe_changes(stage, default, args)}
    latents = encode_dataset(setup.vae, data, data_name(args.shape_only, args.shape_only_captions, args.layout), device, cache=args.work.parent)
    captions = CaptionIds(data, setup.tokenizers)
    single = torch.from_numpy(np.flatnonzero(object_counts(len(data), DATA_SEED, args.layout) == 1)) if args.one_object_steps else None
    trainer = Trainer(setup.stage, {setup.name: setup.denoiser}, stage, args.work, device, run)

    def loss_fn(generator: torch.Generator) -> Tensor:
        if trainer.step < args.one_object_steps:  # the curriculum: one-object scenes first
            index = single[batch_indices(len(single), stage.batch, generator)]
        else:
            index = batch_indices(len(data), stage.batch, generator)
        return setup.loss(latents[index].to(device), captions.draw(index, generator), generator)

    def evaluate(step: int) -> dict:
        """A snapshot of the exported model, and its prompt following on the first held-out prompts."""
        snapshot = setup.export(args.work / "snapshots" / f"toy-{setup.model}-{step:06d}{SUFFIX[setup.model]}")
        return learning_curve_point(load_toy(setup.model, snapshot, device), args.eval_prompts or 48, args.layout)

    trainer.run(loss_fn, args.save_every, evaluate=evaluate if args.eval_every else None, eval_every=args.eval_every)
    setup.denoiser.load_state_dict(trainer.ema_state(setup.name))
    setup.export(args.out)


def denoiser_stage(stage: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """The denoiser stage with the command line's --steps/--batch/--lr, for recipe comparisons."""
    changes = {k: getattr(args, k) for k in ("steps", "batch", "lr") if getattr(args, k) is not None}
    return replace(stage, **changes)


def recipe_changes(stage: TrainConfig, default: TrainConfig, args: argparse.Namespace) -> dict[str, str]:
    """What a run changes from the recipe, recorded in its checkpoints (a resume must not change it)."""
    changes = {k: str(getattr(stage, k)) for k in ("steps", "batch", "lr") if getattr(stage, k) != getattr(default, k)}
    if args.one_object_steps:
        changes["one_object_steps"] = str(args.one_object_steps)
    if args.sigma_shift != 1:
        changes["sigma_shift"] = f"{args.sigma_shift:g}"
    if args.layout != "anywhere":
        changes["layout"] = args.layout
    for share in ("shape_only", "shape_only_captions"):
        if getattr(args, share):
            changes[share] = f"{getattr(args, share):g}"
    return changes


def object_counts(n: int, seed: int, layout: str = "anywhere") -> np.ndarray:
    """How many objects scene i of `render_dataset(n, seed, layout=layout)` holds (its scenes drawn again, not rendered)."""
    return np.array([len(sample_scene(np.random.default_rng([seed, i]), "train", layout=layout).objects) for i in range(n)])


def learning_curve_point(pipe, n: int, layout: str = "anywhere") -> dict:
    """Prompt following of `pipe` on the first `n` held-out prompts of `layout` (25 Euler steps, the project's
    CFG), and the shape probe on `n` one-object scenes: whether the caption's shape word decides the drawn shape."""
    result = prompt_following_on(pipe, n, layout=layout)
    probe = {f"{sigma:g}": {k: round(v, 4) for k, v in row.items()} for sigma, row in shape_following(pipe, n, layout=layout).items()}
    return {**{k: v for k, v in result.items() if k not in ("scores", "images")}, "shape_probe": probe}


def load_toy(model: str, path: Path, device: torch.device) -> StableDiffusion | FluxPipeline:
    """An exported toy model in fp32: a toy-sd file, or a toy-flux folder (BFL files, text encoders, tokenizer_2)."""
    if model == "sd":
        return load_sd(path, dtype=torch.float32, device=device)
    return load_flux(path / "flux1-toy.safetensors", ae=path / "ae.safetensors", text_encoders=path, dtype=torch.float32, device=device)


# ---- toy-sd ---------------------------------------------------------------------------------------
def train_sd(args: argparse.Namespace, device: torch.device) -> None:
    """toy-sd: its reader (or --text-from's), its autoencoder (or --vae-from's, or --init's), then its UNet."""
    stages = STAGES["sd"]
    data = training_data(args.work, args.shape_only, args.shape_only_captions, args.layout)
    tokenizer = load_clip_tokenizer()
    if args.text_from:  # the reader of an exported toy-sd, as its UNet learnt to read it
        text = load_toy("sd", args.text_from, device).text_encoders[0]
    else:
        text = sd_reader(args, device)
    text.requires_grad_(False)  # frozen: the denoiser learns to use what the reader learnt to say
    if args.init:  # continue an exported toy-sd: its autoencoder (frozen) and UNet as the start
        base = load_toy("sd", args.init, device)
        vae, unet = base.vae, base.unet.requires_grad_(True)
        stage, run = "continue", {"init": fingerprint(unet, vae), "text": fingerprint(text)}
    else:
        name = data_name(args.shape_only, args.shape_only_captions, args.layout)
        vae = load_toy("sd", args.vae_from, device).vae if args.vae_from else \
            train_vae(TOY_SD_VAE, data, name, stages["vae"], args.work, device, args.save_every)  # fmt: skip
        torch.manual_seed(stages["denoiser"].seed)
        unet = UNet(TOY_SD_UNET).to(device)
        stage, run = "denoiser", {"text": fingerprint(text), "vae": fingerprint(vae)}
    schedule = DiscreteSchedule()

    def loss(latents: Tensor, ids: list[Tensor], generator: torch.Generator) -> Tensor:
        with torch.no_grad():
            context = text(ids[0].to(device)).last_hidden_state  # [B, 77, 64]
        return diffusion_loss(unet, schedule, latents, context, generator=generator, snr_gamma=SNR_GAMMA)

    setup = DenoiserRun("sd", stage, run, "unet", unet, vae, [(tokenizer, MAX_LENGTH)], loss, partial(export_sd, unet, vae, text, layout=args.layout))
    train_denoiser(setup, data, args, device)


def sd_reader(args: argparse.Namespace, device: torch.device) -> nn.Module:
    """toy-sd's reader stage (`train_toy.py reader --work runs/reader` runs it alone, for its held-out accuracy)."""
    return train_reader("reader", partial(build_text_encoder, TOY_SD_TEXT), load_clip_tokenizer(), MAX_LENGTH,
                        STAGES["sd"]["reader"], args.work, device, args.save_every, args.shape_only, args.shape_only_captions)  # fmt: skip


def export_sd(unet: UNet, vae: AutoencoderKL, text: nn.Module, out: Path, layout: str = "anywhere") -> Path:
    """One file in the SD1.5 single-file layout, fp16, with the configs the weights cannot show and the
    world layout it learnt; returns its path."""
    tensors = {
        **{"model.diffusion_model." + k: v for k, v in unet.state_dict().items()},
        **{"first_stage_model." + k: v for k, v in vae.state_dict().items()},
        # the official key names (text_model.*), whichever way this transformers version nests the CLIPTextModel
        **{"cond_stage_model.transformer." + k: v
           for k, v in file_layout(text.state_dict(), text, "text_model").items() if not k.endswith("position_ids")},
    }
    metadata = config_metadata({METADATA_UNET_CONFIG: unet.config, METADATA_VAE_CONFIG: vae.config, METADATA_TEXT_CONFIG: TOY_SD_TEXT})
    metadata[METADATA_PIPELINE] = json.dumps(TOY_SD_DEFAULTS)
    metadata["minigen.toy"] = json.dumps({"model": "toy-sd", "layout": layout, "data": {"scenes": DATA_SIZE, "seed": DATA_SEED}})
    data = serialize({k: v.detach().cpu().to(torch.float16).contiguous() for k, v in tensors.items()}, metadata)
    write_atomically(out, lambda file: file.write(data), overwrite=True)  # an existing --out was refused at the start
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)", flush=True)
    return out


# ---- toy-flux -------------------------------------------------------------------------------------
def train_flux(args: argparse.Namespace, device: torch.device) -> None:
    """toy-flux: its T5 tokenizer, its two readers (or --text-from's), its autoencoder (or --vae-from's, or
    --init's), then its transformer."""
    stages = STAGES["flux"]
    data = training_data(args.work, args.shape_only, args.shape_only_captions, args.layout)
    tokenizer_2 = t5_tokenizer_folder(args, data)
    t5_tokenizer, clip_tokenizer = load_t5_tokenizer(tokenizer_2), load_clip_tokenizer()
    assert len(t5_tokenizer) == TOY_T5_PIECES + NUM_EXTRA_IDS <= TOY_T5.vocab_size
    length = TOY_FLUX_DEFAULTS["max_length"]
    if args.text_from:  # the readers of an exported toy-flux, as its transformer learnt to read them
        base = load_toy("flux", args.text_from, device)
        t5, clip = base.t5, base.clip
    else:
        t5 = train_reader("reader-t5", partial(build_t5_encoder, TOY_T5), t5_tokenizer, length, stages["reader-t5"], args.work,
                          device, args.save_every, args.shape_only, args.shape_only_captions, {"tokenizer": files_digest(tokenizer_2)})  # fmt: skip
        clip = train_reader("reader-clip", partial(build_text_encoder, TOY_CLIP), clip_tokenizer, MAX_LENGTH,
                            stages["reader-clip"], args.work, device, args.save_every, args.shape_only, args.shape_only_captions)  # fmt: skip
    for reader in (t5, clip):
        reader.requires_grad_(False)  # frozen: the transformer learns to use what the readers learnt to say
    if args.init:  # continue an exported toy-flux: its autoencoder (frozen) and transformer as the start
        base = load_toy("flux", args.init, device)
        vae, flux = base.vae, base.transformer.requires_grad_(True)
        stage, run = "continue", {"init": fingerprint(flux, vae), "text": fingerprint(t5, clip)}
    else:
        vae = load_toy("flux", args.vae_from, device).vae if args.vae_from else train_flux_vae(data, args, device)
        torch.manual_seed(stages["denoiser"].seed)
        flux = Flux(TOY_FLUX).to(device)
        stage, run = "denoiser", {"text": fingerprint(t5, clip), "vae": fingerprint(vae)}

    def loss(latents: Tensor, ids: list[Tensor], generator: torch.Generator) -> Tensor:
        t5_ids, clip_ids = ids
        with torch.no_grad():
            txt, y = encode_flux_ids(t5, clip, t5_ids, clip_ids, clip_tokenizer.eos_token_id)  # [B, 48, 64], pooled [B, 64]
        return flow_loss(flux, latents, txt, y, generator=generator, shift=args.sigma_shift)

    tokenizers = [(t5_tokenizer, length), (clip_tokenizer, MAX_LENGTH)]
    setup = DenoiserRun("flux", stage, run, "flux", flux, vae, tokenizers, loss, partial(export_flux, flux, vae, t5, clip, tokenizer_2, layout=args.layout))
    train_denoiser(setup, data, args, device)


def train_flux_vae(data: ToyData, args: argparse.Namespace, device: torch.device) -> AutoencoderKL:
    """toy-flux's autoencoder: the VAE stage, then its decoder alone."""
    name = data_name(args.shape_only, args.shape_only_captions, args.layout)
    vae = train_vae(TOY_FLUX_VAE, data, name, STAGES["flux"]["vae"], args.work, device, args.save_every)
    return finetune_decoder(vae, data, name, STAGES["flux"]["decoder"], args.work, device, args.save_every)


def t5_tokenizer_folder(args: argparse.Namespace, data: ToyData) -> Path:
    """`<work>/tokenizer_2`: the T5 tokenizer of the exported model the readers, the start or the
    autoencoder come from (--text-from, --init, --vae-from, in that order: a T5 reader reads the ids of
    the tokenizer it learnt on), or, with none, one learnt from the captions (once per work folder). Another
    tokenizer already there is refused: the work folder's readers read its ids."""
    folder = args.work / "tokenizer_2"
    source = args.text_from or args.init or args.vae_from
    if source and folder.exists() and files_digest(folder) != files_digest(source / "tokenizer_2"):
        raise ValueError(f"{folder} is another T5 tokenizer than {source}'s, and this work folder's readers read its ids: "
                         f"give a new --work (e.g. {args.work}-{source.name}) for a run on {source}'s tokenizer")
    if source:
        shutil.copytree(source / "tokenizer_2", folder, dirs_exist_ok=True)
    elif not (folder / "spiece.model").is_file():
        train_t5_tokenizer(data, folder)
    return folder


def train_t5_tokenizer(data: ToyData, folder: Path) -> None:
    """A sentencepiece model of the toy captions with T5's special ids (pad 0, </s> 1, <unk> 2, no BOS).

    The real T5 vocabulary cannot be shipped here; this one covers the toy world's words in
    `TOY_T5_PIECES` pieces, and `load_t5_tokenizer` reads it exactly as it reads T5's spiece.model.
    """
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([text for texts in data.captions for text in texts]),
        model_prefix=str(folder / "spiece"), vocab_size=TOY_T5_PIECES, model_type="bpe",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1,
        input_sentence_size=len(data) * len(data.captions[0]), shuffle_input_sentence=False, minloglevel=2,
    )  # fmt: skip
    (folder / "spiece.vocab").unlink()


def export_flux(
    flux: Flux, vae: AutoencoderKL, t5: nn.Module, clip: nn.Module, tokenizer: Path, out: Path, layout: str = "anywhere"
) -> Path:
    """BFL files (transformer, ae), a diffusers-style folder of text encoders, fp16 (T5 in fp32), and the
    T5 tokenizer's folder `tokenizer` copied; the transformer's metadata states the world layout it learnt.
    Returns the folder `out`."""

    files = {}  # path -> bytes, written together at the end (an existing --out was refused at the start)

    def save(tensors: dict[str, Tensor], file: Path, dtype: torch.dtype, metadata: dict | None = None) -> None:
        files[file] = serialize({k: v.detach().cpu().to(dtype).contiguous() for k, v in tensors.items()}, metadata)

    transformer_metadata = config_metadata({METADATA_FLUX_CONFIG: flux.config})
    transformer_metadata[METADATA_PIPELINE] = json.dumps(TOY_FLUX_DEFAULTS)
    transformer_metadata["minigen.toy"] = json.dumps({"model": "toy-flux", "layout": layout, "data": {"scenes": DATA_SIZE, "seed": DATA_SEED}})
    save(flux.state_dict(), out / "flux1-toy.safetensors", torch.float16, transformer_metadata)
    save(vae.state_dict(), out / "ae.safetensors", torch.float16, config_metadata({METADATA_VAE_CONFIG: vae.config}))
    # the official key names (text_model.*), whichever way this transformers version nests the CLIPTextModel
    clip_state = {k: v for k, v in file_layout(clip.state_dict(), clip, "text_model").items() if not k.endswith("position_ids")}
    t5_state = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared.weight
    for folder, model, state, dtype in (("text_encoder", clip, clip_state, torch.float16), ("text_encoder_2", t5, t5_state, torch.float32)):
        save(state, out / folder / "model.safetensors", dtype)
        files[out / folder / "config.json"] = (json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n").encode()
    if (out / "tokenizer_2").resolve() != tokenizer.resolve():
        files.update({out / "tokenizer_2" / path.relative_to(tokenizer): path.read_bytes() for path in sorted(tokenizer.rglob("*")) if path.is_file()})
    write_files_together(files)  # a kill while writing leaves an earlier model whole, not parts of two
    for file, data in files.items():
        if file.suffix == ".safetensors":
            print(f"wrote {file} ({len(data) / 2**20:.1f} MiB)", flush=True)
    return out


# ---- The command line -----------------------------------------------------------------------------
def main(argv=None) -> None:
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=[*sorted(STAGES), "reader"])
    parser.add_argument("--work", type=Path, required=True, help="folder for resumable checkpoints")
    parser.add_argument("--out", type=Path, help="where to write the model (default: inside --work; weights/ only when asked)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--init", type=Path, help="an exported model to continue (stage `continue`): toy-sd file or toy-flux folder")
    parser.add_argument("--save-every", type=cli.positive_int, default=250)
    parser.add_argument("--threads", type=cli.positive_int, help="CPU threads (default: all)")
    recipe = parser.add_argument_group("recipe changes (the denoiser stage of sd and flux; recorded in its checkpoints)")
    recipe.add_argument("--steps", type=cli.positive_int, help="steps of the denoiser stage (default: the recipe's)")
    recipe.add_argument("--batch", type=cli.positive_int, help="batch size of the denoiser stage")
    recipe.add_argument("--lr", type=cli.positive_float, help="peak learning rate of the denoiser stage")
    recipe.add_argument("--sigma-shift", type=cli.positive_float, default=1.0, metavar="S",
                        help="toy-flux: training times shifted towards noise by SD3's shift S (flow_loss; default 1, none)")
    recipe.add_argument("--one-object-steps", type=cli.non_negative_int, default=0, help="curriculum: the first N steps draw one-object scenes only")
    recipe.add_argument("--shape-only", type=float, default=0.0, metavar="P",
                        help="the share of caption mentions named by their shape word alone (\"a heart\"), for the readers and the "
                        "denoiser, so that a model draws a subject named by its class word, as reference adapters ask (default 0)")  # fmt: skip
    recipe.add_argument("--shape-only-captions", type=float, default=0.0, metavar="Q",
                        help="the share of captions whose every mention is named by its shape word alone (\"a heart and a star on "
                        "sand\"), as multi-subject prompts name their subjects; --shape-only's mentions, drawn one by one, rarely "
                        "make such a caption (default 0)")  # fmt: skip
    recipe.add_argument("--layout", choices=list(LAYOUTS), default="anywhere",
                        help="where objects lie: anywhere (1-3 objects), or halves (1-2, each centred on the left or right half: "
                        "toy-flux's re-scoped world, weights/README.md); evaluation and export follow it (default anywhere)")  # fmt: skip
    recipe.add_argument("--vae-from", type=Path, help="take the autoencoder of an exported model (frozen) instead of training one "
                        "(toy-flux: its T5 tokenizer too)")  # fmt: skip
    recipe.add_argument("--text-from", type=Path, help="take the text encoders (readers) of an exported model instead of training "
                        "them (with --init the same model: continue it on its own readers)")  # fmt: skip
    recipe.add_argument("--eval-every", type=cli.non_negative_int, default=0, help="every N steps: a snapshot in <work>/snapshots/ and "
                        "its prompt following on --eval-prompts held-out prompts and the shape probe on as many one-object scenes, "
                        "into <work>/<stage>-eval.jsonl")  # fmt: skip
    recipe.add_argument("--eval-prompts", type=cli.positive_int, help="held-out prompts of each --eval-every measurement (default 48)")
    args = parser.parse_args(argv)
    if args.model == "reader" and (args.out or args.overwrite):
        parser.error("--out and --overwrite name the model that sd and flux export; the reader stage keeps its readers in --work")
    check_writable_folder(args.work, "--work")
    if args.model != "reader":
        default = args.out is None
        args.out = args.out or args.work / f"toy-{args.model}{SUFFIX[args.model]}"
        if args.out.exists() and not args.overwrite:
            said = f"{args.out} (the default --out, in --work)" if default else f"--out {args.out}"
            parser.error(f"{said} exists; give another --out, or pass --overwrite to replace it when the run ends")
        if args.model == "flux":  # toy-flux is a folder, toy-sd one file
            check_writable_folder(args.out, "--out")
        else:  # a .safetensors file, not a folder (found when the export is written, hours in)
            check_output_path(args.out, overwrite=True, suffix=".safetensors", flag="--overwrite")
    if args.init and args.model == "reader":
        parser.error("--init continues an exported toy-sd or toy-flux; the reader trains from scratch")
    recipe_flags = [f"--{k.replace('_', '-')}" for k in ("steps", "batch", "lr", "vae_from", "text_from") if getattr(args, k) is not None]
    recipe_flags += [f"--{k.replace('_', '-')}" for k in ("one_object_steps", "eval_every") if getattr(args, k)]
    if args.sigma_shift != 1 and args.model != "flux":
        parser.error(f"--sigma-shift {args.sigma_shift}: the timestep shift applies to toy-flux's flow matching only")
    for flag, share in (("--shape-only", args.shape_only), ("--shape-only-captions", args.shape_only_captions)):
        if not 0 <= share < 1:
            parser.error(f"{flag} {share}: give a share in [0, 1), e.g. 0.15 (every mention shape-only leaves no look to learn)")
    if args.eval_prompts is not None and not args.eval_every:
        parser.error("--eval-prompts sets how many prompts each --eval-every measurement draws; give --eval-every N too")
    recipe_flags += ["--layout"] if args.layout != "anywhere" else []
    if recipe_flags and args.model == "reader":
        parser.error(f"{', '.join(recipe_flags)}: recipe changes apply to the denoiser stage of sd and flux; the reader has none")
    if args.vae_from and args.init:
        parser.error("--vae-from trains a denoiser from scratch on another model's autoencoder; --init continues that model (its autoencoder included)")
    for flag, path in (("--init", args.init), ("--vae-from", args.vae_from), ("--text-from", args.text_from)):
        if path and not is_exported(args.model, path):
            parser.error(f"{flag} {path}: give {EXPORTED[args.model]}")
    if args.init and toy_layout(args.init) != args.layout:
        parser.error(f"--init {args.init} learnt the layout {toy_layout(args.init)!r}; continue it with --layout {toy_layout(args.init)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    {"sd": train_sd, "flux": train_flux, "reader": sd_reader}[args.model](args, device)


def is_exported(model: str, path: Path) -> bool:
    """Whether `path` is what --init, --vae-from and --text-from take for `model` (`EXPORTED`): its file states the
    model under "minigen.toy", as `export_sd` and `export_flux` write it; read from the header, before any training."""
    file = path if model == "sd" else path / "flux1-toy.safetensors"
    return is_toy_file(file) and json.loads(read_metadata(file)["minigen.toy"]).get("model") == f"toy-{model}"


if __name__ == "__main__":
    sys.exit(cli.run(main, resumes=True))  # bad input: one line on stderr, exit code 2, no traceback
