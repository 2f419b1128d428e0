"""Training AlignGen: S*, the DEM and the reference LoRA on (reference, target, caption) pairs, FLUX frozen.

One pair is a reference image of a subject, a target image showing it elsewhere, the Redux tokens of the
reference and the target's caption with the concept named at up to three levels ("acoustic guitar",
"guitar", "musical instrument"), each already T5-encoded with the placeholder before the name
(`EncodedCaption`; `encode_caption` makes one with the tokenizer). One step, for a batch of pairs:

    draw         pairs, reference dropout, name level, σ = sigmoid(N(0, 1)), noise    (one generator)
    reference    the reference, or a black image of its size with p = `reference_dropout`; its
                 VAE tokens form the group "ref0" with the LoRA (its Redux tokens are kept: S*' still
                 carries the subject, which is the point of dropping the pixels)
    text         the caption at the drawn level; S*' = DEM(S*, concept states, Redux) replaces the
                 placeholder's state (no gradient into T5: the states are data)
    loss         ‖v̂(x_σ, σ, text, ref) - (noise - x0)‖², x_σ = (1 - σ)·x0 + σ·noise, x0 the target's
                 VAE posterior mean; the selective mask in every block; guidance 1 on a dev base

| decision | our default | why |
|---|---|---|
| reference dropout | p = 0.5, a black image | the paper's Table 3 best |
| name substitution | class 0.5, parent 0.25, broad category 0.25 (renormalized over the levels a pair has) | the paper gives no numbers |
| strategy off (ablation TS) | no dropout, always the class name | Table 2's "TS" |
| optimizer | AdamW of `minigen.trainer` (warmup 100, then constant; clip 1; no EMA; no weight decay) at 1e-3 (S*), 1e-4 (DEM), 1e-4 (LoRA) | the issue asks for AdamW (the paper: Prodigy, weight decay 0.01) |
| steps, batch | 15,000 (the paper's), batch 4 | the paper gives no batch |
| timesteps, guidance | logit-normal σ, guidance 1 | OminiControl's trainer, which AlignGen builds on |
| S* at the start | the mean T5 state at the placeholder over the pairs' class-name captions | `initial_token` |
| several processes | torchrun + DDP: every rank draws the whole global batch from the same generator and takes its slice, DDP averages the gradients, the loss logged is the global mean | the same curve as one process with the same global batch |

    pairs = [TrainingPair(target, reference, redux, (encode_caption(pipe, "a {} on the beach", "acoustic guitar"), ...)), ...]
    aligngen = AlignGen(AlignGenConfig.for_transformer(pipe.transformer), pipe.transformer, initial_token=initial_token(pairs))
    trained = train_aligngen(pipe, aligngen, pairs, work="runs/aligngen")      # resumable
    save_aligngen(trained.aligngen, "aligngen.safetensors", metadata=trained.metadata)
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from minigen.image import check_unit_range
from minigen.controls import AttentionBias, Controls
from minigen.methods.aligngen import (
    PLACEHOLDER,
    AlignGen,
    AlignGenSettings,
    ConceptTokens,
    encode_prompt,
    reference_groups,
    selective_mask,
    with_updated_tokens,
)
from minigen.models.flux_tokens import TokenGroup, image_ids, pack_latents, text_ids
from minigen.storage import compute_device, compute_dtype
from minigen.trainer import TrainConfig, Trainer, fingerprint

TRAINING = TrainConfig(steps=15_000, batch=4, lr=1e-4, seed=0, warmup=100, ema=0.0, cosine=False)
LEVELS = ("class", "parent", "broad")  # the names a caption may give its concept, most specific first


@dataclass(frozen=True)
class TrainingSettings:
    """The training strategy (the paper's "TS") and the optimizer's rates."""

    reference_dropout: float = 0.5  # P(the reference becomes a black image)
    name_probabilities: tuple[float, ...] = (0.5, 0.25, 0.25)  # P(class), P(parent), P(broad category)
    strategy: bool = True  # False: the ablation without dropout and substitution
    guidance: float = 1.0  # given to a guidance-distilled (dev) base
    lr_token: float = 1e-3
    lr_dem: float = 1e-4
    lr_lora: float = 1e-4
    autocast: bool | None = None  # bf16 autocast: None lets the Trainer choose (where bf16 is native)

    def __post_init__(self):
        if not 0 <= self.reference_dropout <= 1:
            raise ValueError(f"reference_dropout is a probability in [0, 1], got {self.reference_dropout}")
        p = self.name_probabilities
        if not 1 <= len(p) <= len(LEVELS) or min(p) < 0 or not abs(sum(p) - 1) < 1e-6:
            raise ValueError(f"name_probabilities: one probability per name level {LEVELS[:len(p) or 1]}, each >= 0, summing to 1; got {p}")

    @property
    def dropout(self) -> float:
        return self.reference_dropout if self.strategy else 0.0

    @property
    def levels(self) -> tuple[float, ...]:
        return self.name_probabilities if self.strategy else (1.0,)


# --- the data ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedCaption:
    """A caption as FLUX reads it: T5 states [M, d] (the placeholder before the concept name), CLIP pooled
    [D], and where the concept stands (`ConceptTokens`, S* None when trained without S*)."""

    txt: Tensor
    pooled: Tensor
    concept: ConceptTokens


@dataclass(frozen=True)
class TrainingPair:
    """One subject: a target image and a reference [3, H, W] in [0, 1], the reference's Redux tokens [R, d],
    and the target's caption naming the concept by class, parent and broad category (1 to 3 of them)."""

    target: Tensor
    reference: Tensor
    redux: Tensor
    captions: tuple[EncodedCaption, ...]


def encode_caption(pipe, template: str, name: str, *, s_star: bool = True, placeholder: str = PLACEHOLDER) -> EncodedCaption:
    """`template` ("a {} on the beach") with the concept `name` in it, encoded with the placeholder before it
    (at the template's place, also where the name occurs elsewhere: "a cross right of a {}")."""
    try:
        parts = list(string.Formatter().parse(template))  # (text, field) pieces; "{{" is the text "{"
    except ValueError:
        parts = []
    fields = [field for _, field, _, _ in parts if field is not None]
    if fields != [""]:
        raise ValueError(f"the caption template {template!r} must hold the concept's place once, as '{{}}'")
    place = 0  # where the name goes in the caption
    for text, field, _, _ in parts:
        place += len(text)
        if field is not None:
            break
    encoded = encode_prompt(pipe, template.format(name), [name], s_star=s_star, placeholder=placeholder, starts=[place])
    return EncodedCaption(encoded.txt[0], encoded.pooled[0], encoded.concepts[0])


def initial_token(pairs: Sequence[TrainingPair]) -> Tensor:
    """S*'s start: the mean T5 state at the placeholder over the pairs' first (class-name) captions [d]."""
    states = [pair.captions[0].txt[pair.captions[0].concept.s_star] for pair in pairs if pair.captions[0].concept.s_star is not None]
    return torch.stack(states).float().mean(0) if states else torch.zeros(pairs[0].captions[0].txt.shape[-1])


def check_pairs(pairs: Sequence[TrainingPair], dim: int, settings: AlignGenSettings) -> None:
    """Pairs of one image size and one text length, captions that fit the settings, finite images in [0, 1]."""
    if not pairs:
        raise ValueError("give at least one training pair")
    first = pairs[0]
    for i, pair in enumerate(pairs):
        for what, image, like in (("target", pair.target, first.target), ("reference", pair.reference, first.reference)):
            if image.dim() != 3 or image.shape[0] != 3 or image.shape != like.shape:
                raise ValueError(f"pair {i}: the {what} must be [3, H, W] like pair 0's {list(like.shape)}, got {list(image.shape)}")
            check_unit_range(image, f"pair {i}: the {what}")
        if pair.redux.dim() != 2 or pair.redux.shape[-1] != dim:
            raise ValueError(f"pair {i}: Redux tokens must be [R, {dim}], got {list(pair.redux.shape)}")
        if not 1 <= len(pair.captions) <= len(LEVELS):
            raise ValueError(f"pair {i}: give 1 to {len(LEVELS)} captions (the concept named by {', '.join(LEVELS)}), got {len(pair.captions)}")
        for caption in pair.captions:
            if caption.txt.shape != first.captions[0].txt.shape:
                raise ValueError(f"pair {i}: caption states {list(caption.txt.shape)}, but pair 0's are {list(first.captions[0].txt.shape)}")
            if (caption.concept.s_star is None) == settings.s_star:
                raise ValueError(f"pair {i}: its captions are encoded {'without' if settings.s_star else 'with'} S*, the settings train "
                                 f"{'with' if settings.s_star else 'without'} it: encode them with s_star={settings.s_star}")  # fmt: skip


# --- one step's randomness -------------------------------------------------------------------------------


@dataclass
class Draws:
    """The random choices of one step for the whole global batch, in the order they are drawn."""

    pairs: Tensor  # [G] which pairs
    dropped: Tensor  # [G] bool: the reference is a black image
    levels: Tensor  # [G] the name level of the caption (0 class, 1 parent, 2 broad)
    sigma: Tensor  # [G] flow time
    noise: Tensor  # [G, C, h, w]

    def rows(self, rows: slice) -> Draws:
        return Draws(*(getattr(self, f)[rows] for f in ("pairs", "dropped", "levels", "sigma", "noise")))


def draw(generator: torch.Generator, pairs: Sequence[TrainingPair], batch: int, latent_shape: tuple[int, ...], settings: TrainingSettings) -> Draws:
    """One step's draws from `generator`: a pair's level is drawn among the levels it has, the probabilities
    renormalized over them."""
    index = torch.randint(0, len(pairs), (batch,), generator=generator)
    dropped = torch.rand(batch, generator=generator) < settings.dropout
    u = torch.rand(batch, generator=generator)
    levels = torch.empty(batch, dtype=torch.long)
    for b, i in enumerate(index.tolist()):
        p = torch.tensor(settings.levels[: len(pairs[i].captions)], dtype=torch.float64)
        if p.sum() <= 0:
            raise ValueError(f"pair {i} has captions at levels 0..{len(p) - 1} only, which the name probabilities "
                             f"{tuple(settings.levels)} never draw: give one of them a probability > 0, or that pair more captions")
        cumulative = (p / p.sum()).cumsum(0)  # level l when cumulative[l - 1] <= u < cumulative[l]
        levels[b] = int((cumulative[:-1] <= u[b]).sum())
    sigma = torch.sigmoid(torch.randn(batch, generator=generator))
    noise = torch.randn((batch, *latent_shape), generator=generator)
    return Draws(index, dropped, levels, sigma, noise)


# --- the loss ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FrozenBase:
    """The frozen models a step runs (kept out of the module tree, so DDP neither copies nor reduces them)."""

    transformer: nn.Module
    vae: nn.Module


class AlignGenStep(nn.Module):
    """The loss of one batch as a module (what DDP wraps): the trainable AlignGen is its only submodule."""

    def __init__(self, aligngen: AlignGen, base: FrozenBase, settings: AlignGenSettings, training: TrainingSettings):
        super().__init__()
        self.aligngen, self.base, self.settings = aligngen, base, settings
        self.recipe = training  # not `self.training`: nn.Module's train/eval flag

    def forward(self, pairs: Sequence[TrainingPair], draws: Draws) -> Tensor:
        transformer, vae = self.base.transformer, self.base.vae
        device, dtype = compute_device(transformer), compute_dtype(transformer)  # not a stored weight's dtype
        captions = [pair.captions[level] for pair, level in zip(pairs, draws.levels.tolist())]
        with torch.no_grad():
            x0 = vae.encode_images(torch.stack([pair.target for pair in pairs]).to(device))  # [b, 16, h, w]
        references = [torch.zeros_like(p.reference) if drop else p.reference for p, drop in zip(pairs, draws.dropped.tolist())]
        groups = reference_groups(self.aligngen, vae, transformer, [r[None].to(device) for r in references], self.settings)
        reference = TokenGroup(torch.cat([g.tokens for g in groups]), groups[0].ids, timestep=0.0, lora=groups[0].lora, name="ref0")

        txt = torch.stack([c.txt for c in captions]).to(device)  # [b, M, d]
        txt = with_updated_tokens(self.aligngen, txt, [[c.concept] for c in captions], [[p.redux.to(device)] for p in pairs], self.settings)
        mask = selective_mask(txt.shape[1], [[c.concept.positions] for c in captions], ["ref0"], self.settings)

        b, _, h, w = x0.shape
        sigma, noise = draws.sigma.to(device), draws.noise.to(device)
        s = sigma.view(b, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        guidance = torch.full((b,), self.recipe.guidance, device=device) if transformer.config.guidance_embed else None
        v = transformer(
            pack_latents(noisy).to(dtype), image_ids(h // 2, w // 2).to(device), txt.to(dtype), text_ids(txt.shape[1]).to(device),
            sigma.to(dtype), torch.stack([c.pooled for c in captions]).to(device, dtype), guidance,
            extra=[reference], controls=Controls(bias=[AttentionBias(mask, kind="joint")]),
        )  # fmt: skip
        return F.mse_loss(v.float(), pack_latents(noise - x0).float())


# --- several processes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")


def init_distributed(device: str | torch.device | None = None) -> Distributed:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT): NCCL with one GPU per process, gloo on CPUs. Without WORLD_SIZE > 1, one
    process on `device` (default: the GPU if there is one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Distributed(device=torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    chosen = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=chosen if cuda else None)
    return Distributed(dist.get_rank(), dist.get_world_size(), chosen)


def global_mean(loss: Tensor, world: int) -> Tensor:
    """`loss` whose value is the mean over the ranks and whose gradient is this rank's own (DDP averages those)."""
    if world == 1:
        return loss
    total = loss.detach().clone()
    dist.all_reduce(total)
    return loss + (total / world - loss.detach())


# --- training -----------------------------------------------------------------------------------------------


@dataclass
class TrainedAlignGen:
    aligngen: AlignGen
    metadata: dict[str, str]
    losses: list[float]


def trainable_parts(aligngen: AlignGen, settings: AlignGenSettings, training: TrainingSettings) -> dict[str, tuple[nn.Module, float]]:
    """The parts the run trains and their rates: S* with S*, the DEM with S* and DEM, the LoRA always."""
    parts = {"token": (aligngen.token, training.lr_token), "dem": (aligngen.dem, training.lr_dem), "lora": (aligngen.lora, training.lr_lora)}
    used = {"token": settings.s_star, "dem": settings.s_star and settings.dem, "lora": True}
    for name, (part, lr) in parts.items():
        part.requires_grad_(used[name] and lr > 0)
    chosen = {name: entry for name, entry in parts.items() if used[name] and entry[1] > 0}
    if not chosen:
        raise ValueError("every part AlignGen would train has learning rate 0: nothing to train")
    return chosen


def train_aligngen(
    pipe,
    aligngen: AlignGen,
    pairs: Sequence[TrainingPair],
    config: TrainConfig = TRAINING,
    work: str | Path = "runs/aligngen",
    *,
    settings: AlignGenSettings = AlignGenSettings(),
    training: TrainingSettings = TrainingSettings(),
    distributed: Distributed = Distributed(),
    save_every: int = 250,
    log_every: int = 50,
) -> TrainedAlignGen:
    """Train `aligngen` on `pairs` with the base pipeline's transformer and autoencoder frozen (bit for bit).
    `config.batch` is the global batch: with torchrun, each of the `distributed.world` ranks takes its share.
    Resumable from `work`, only from a checkpoint of the same base, pairs and settings."""
    transformer, vae = pipe.transformer, pipe.vae
    check_pairs(pairs, aligngen.config.dim, settings)
    if config.batch % distributed.world:
        raise ValueError(f"the global batch {config.batch} does not split over {distributed.world} processes; make it a multiple")
    for model in (transformer, vae):
        model.requires_grad_(False)
    device = compute_device(transformer)
    aligngen.to(device)
    parts = trainable_parts(aligngen, settings, training)
    step = AlignGenStep(aligngen, FrozenBase(transformer, vae), settings, training)
    model = DistributedDataParallel(step) if distributed.world > 1 else step
    factor = vae.config.downsample_factor
    latent_shape = (vae.config.z_channels, pairs[0].target.shape[1] // factor, pairs[0].target.shape[2] // factor)
    local = config.batch // distributed.world
    mine = slice(distributed.rank * local, (distributed.rank + 1) * local)

    def loss_fn(generator: torch.Generator) -> Tensor:
        draws = draw(generator, pairs, config.batch, latent_shape, training).rows(mine)  # every rank draws it all
        return global_mean(model([pairs[i] for i in draws.pairs.tolist()], draws), distributed.world)

    described = {"method": asdict(settings), "training": asdict(training), "batch": config.batch, "seed": config.seed}
    run = {
        "base": fingerprint(transformer, vae),  # the weights (aligngen.base, which the file records, is the config's)
        "pairs": fingerprint(*(t for p in pairs for t in (p.target, p.reference, p.redux, *(c.txt for c in p.captions)))),
        "settings": json.dumps(described, sort_keys=True),
        "config": json.dumps(asdict(aligngen.config), sort_keys=True),
    }
    modules = {name: part for name, (part, _) in parts.items()}
    trainer = Trainer("aligngen", modules, config, Path(work), device, run,
                      lr={name: lr for name, (_, lr) in parts.items()}, rank=distributed.rank)  # fmt: skip
    if training.autocast is not None:
        trainer.autocast = training.autocast
    losses = trainer.run(loss_fn, save_every, log_every)
    aligngen.eval()
    aligngen.settings = settings  # it runs as it was trained
    metadata = {"steps": str(config.steps), "pairs": str(len(pairs)), "training": json.dumps(described), "world": str(distributed.world)}
    return TrainedAlignGen(aligngen, metadata, losses)

