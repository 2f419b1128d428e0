"""Personalized Residuals and localized attention-guided (LAG) sampling (Ham et al., CVPR 2024).

A concept is learnt as a low-rank residual ΔW_i = B_i·A_i on the output projection `proj_out` of
every transformer block i (a 1x1 conv in SD1.x, a Linear in SDXL), with rank r_i = round(0.05·m_i)
for a projection of m_i channels. The base model stays frozen; on SD1.5 that is 16 blocks and
1,239,040 trainable parameters.

    residuals = Residuals(unet, identifier="sks", macro_class="dog")
    train_residuals(pipe, residuals, images, "a photo of a sks dog", TRAINING, work)   # 150 steps, batch 4, lr 1e-3
    residuals.save("dog.safetensors", base="sd15", steps=150)

    residuals = Residuals.load("dog.safetensors", unet)
    prompt = "a sks dog on the beach"
    pipe.generate(prompt, controls=residuals.controls(scale=1.0))                         # everywhere
    tokens = concept_tokens(pipe.tokenizers[0], prompt, residuals)                        # [2, 3]: "sks", "dog"
    pipe.generate(prompt, controls=lag_controls([(residuals, tokens, 1.0)]))

LAG applies each block's residual only where that block's own cross-attention puts the concept:
the attention of the image queries to the identifier and class tokens, summed over those tokens
(averaged over heads, and over the blocks of a multi-block transformer as in SDXL), binarized at
its median per image. Because proj_out is linear,

    M ⊙ proj_out_{W+ΔW}(x) + (1 - M) ⊙ proj_out_W(x) = W·x + b + M ⊙ (B·A·x)

so one UNet pass gives it: a `LowRank` control whose region is that mask, read from a
`RecordAttention` of the same call (cross-attention runs before proj_out in every block).
Under classifier-free guidance the unconditional rows reuse the mask of their conditional row.
Several concepts compose: each brings its own record, tokens, scale and residuals.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save as serialize
from torch import Tensor, nn

from minigen.loading.detect import CheckpointError
from minigen.loading.files import checked_file, is_safetensors, read_metadata, read_state_dict, write_atomically
from minigen.controls import BatchLayout, Controls, LowRank, RecordAttention, Site
from minigen.image import check_reference_images
from minigen.models.unet import UNet
from minigen.pipelines.sd import Conditioning, StableDiffusion
from minigen.storage import compute_device
from minigen.text.spans import last_read_position, token_spans
from minigen.trainer import Trainer, TrainConfig, fingerprint
from minigen.objectives import diffusion_loss

RANK_RATIO = 0.05  # r = round(0.05 m), the paper's choice
# The paper's recipe: 150 iterations, batch 4, learning rate 1e-3 (constant: no schedule is stated),
# the plain diffusion loss, no regularization images. No EMA: the last weights are the result.
TRAINING = TrainConfig(steps=150, batch=4, lr=1e-3, seed=0, warmup=0, ema=0.0, cosine=False)
METADATA_KEY = "minigen.residuals"
DOWN, UP = "lora_down.weight", "lora_up.weight"  # kohya-style names, read by conv-LoRA tools


def proj_out_blocks(unet: UNet) -> dict[str, list[str]]:
    """Each transformer's proj_out path -> the ids of its transformer blocks, in UNet order.

    {"input_blocks.1.1.proj_out": ["down.0.0.0"], ...}: the blocks' cross-attention localizes the
    concept for that proj_out (SD1.x has one block per transformer, SDXL up to ten).
    """
    blocks: dict[str, list[str]] = {}
    for layer_id, path in unet.attention_layers().items():  # "up.1.0.0" -> "output_blocks.3.1.transformer_blocks.0"
        blocks.setdefault(path.rsplit(".transformer_blocks.", 1)[0] + ".proj_out", []).append(layer_id)
    return blocks


class Residuals(nn.Module):
    """The low-rank residuals of one concept: `down[i]` [r, m(, 1, 1)] and `up[i]` [m, r(, 1, 1)] on `targets[i]`.

    init "random" draws both factors from a normal distribution, as the paper does (which one it
    does not say: here A ~ N(0, 1/m), B ~ N(0, init_scale²/r), so ΔW starts small but nonzero);
    init "zero" sets B = 0, LoRA's convention, so training starts at the base model.
    """

    def __init__(
        self,
        unet: UNet,
        *,
        identifier: str,
        macro_class: str,
        rank_ratio: float = RANK_RATIO,
        init: str = "random",
        init_scale: float = 1e-2,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if init not in ("random", "zero"):
            raise ValueError(f"init must be 'random' or 'zero', got {init!r}")
        if not 0 < rank_ratio <= 1:  # a file of another ratio could not be loaded back (Residuals.load refuses it)
            raise ValueError(f"rank_ratio is a share of each layer's width, in (0, 1]; got {rank_ratio}")
        if not math.isfinite(init_scale):
            raise ValueError(f"init_scale must be a finite number, got {init_scale}")
        self.identifier, self.macro_class, self.rank_ratio = identifier, macro_class, rank_ratio
        self.info: dict = {}  # a loaded file's metadata (base model, steps, ...)
        self.blocks = proj_out_blocks(unet)
        self.targets = list(self.blocks)
        self.down, self.up = nn.ParameterList(), nn.ParameterList()
        for target in self.targets:
            layer = unet.get_submodule(target)
            weight, device = layer.weight, compute_device(layer)  # [m, m] (Linear) or [m, m, 1, 1] (1x1 conv); offloaded: the GPU
            m, kernel = weight.shape[0], weight.shape[2:]
            r = max(1, round(rank_ratio * m))
            down = torch.randn(r, m, *kernel, generator=generator) / math.sqrt(m)
            up = torch.randn(m, r, *kernel, generator=generator) * (init_scale / math.sqrt(r))
            self.down.append(nn.Parameter(down.to(device)))
            self.up.append(nn.Parameter((up if init == "random" else torch.zeros_like(up)).to(device)))

    def low_rank(self, scale: float = 1.0, regions: dict[str, object] | None = None) -> list[LowRank]:
        """One `LowRank` control per proj_out (autograd flows into the factors); `regions` optionally
        gives a target its spatial mask (a tensor or a callable, see `LowRank.region`)."""
        regions = regions or {}
        return [LowRank(t, d, u, scale, region=regions.get(t)) for t, d, u in zip(self.targets, self.down, self.up)]

    def controls(self, *, scale: float = 1.0) -> Controls:
        """The residuals everywhere, at `scale` (0 gives the base model exactly). `scale` is named, so that
        `generate(controls=residuals.controls)`, which would call it with each step's index, fails."""
        return Controls(low_rank=self.low_rank(scale))

    def parameter_count(self) -> int:
        """The trainable numbers, for a training's log."""
        return sum(p.numel() for p in self.parameters())

    # ---- Files ------------------------------------------------------------------------------------
    def save(self, path: str | Path, *, base: str, overwrite: bool = False, **metadata) -> Path:
        """Write `<target>.lora_down.weight` / `.lora_up.weight` and, in the metadata, the base model,
        rank ratio, identifier, class and anything else given (steps, lr, ...). The write is atomic; an
        existing file is replaced only with `overwrite`."""
        path = Path(path)
        tensors = {}
        for target, down, up in zip(self.targets, self.down, self.up):
            tensors[f"{target}.{DOWN}"], tensors[f"{target}.{UP}"] = down.detach().cpu().contiguous(), up.detach().cpu().contiguous()
        info = {"base": base, "rank_ratio": self.rank_ratio, "identifier": self.identifier,
                "macro_class": self.macro_class, "parameters": self.parameter_count(), **metadata}  # fmt: skip
        data = serialize(tensors, {METADATA_KEY: json.dumps(info)})
        write_atomically(path, lambda file: file.write(data), overwrite)
        return path

    @classmethod
    def load(cls, path: str | Path, unet: UNet) -> Residuals:
        """Read a residual file (.safetensors) for `unet`; a file whose layers or ranks do not fit it (another model family,
        another rank ratio) is refused. Like a LoRA, a file runs on any UNet of its layout, a fine-tune of the
        base it was trained on included; its metadata names that base (`info["base"]`)."""
        path = checked_residuals_file(path)
        tensors, metadata = read_state_dict(path), read_metadata(path)  # a damaged file: a CheckpointError naming it
        if METADATA_KEY not in metadata:
            raise CheckpointError(f"{path} is not a minigen residual file: its metadata has no {METADATA_KEY!r} entry")
        try:
            info = json.loads(metadata[METADATA_KEY])
            settings = dict(identifier=str(info["identifier"]), macro_class=str(info["macro_class"]), rank_ratio=float(info["rank_ratio"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: its {METADATA_KEY!r} metadata is damaged ({type(error).__name__}: {error})") from error
        if not 0 < settings["rank_ratio"] <= 1:
            raise CheckpointError(f"{path}: rank_ratio {settings['rank_ratio']} in its metadata is not in (0, 1]")
        residuals = cls(unet, **settings, init="zero", generator=torch.Generator())  # its random factors are replaced: not torch's global stream
        expected = {f"{t}.{part}": tuple(p.shape) for t, d, u in zip(residuals.targets, residuals.down, residuals.up)
                    for part, p in ((DOWN, d), (UP, u))}  # fmt: skip
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if found != expected:
            missing = sorted(set(expected) - set(found))
            unexpected = sorted(set(found) - set(expected))
            misshaped = [f"{k}: file {found[k]}, model {expected[k]}" for k in sorted(set(found) & set(expected)) if found[k] != expected[k]]
            raise CheckpointError(
                f"{path.name} holds residuals for base model {info.get('base')!r} (rank ratio {info['rank_ratio']}), which do not "
                f"fit this UNet ({len(residuals.targets)} proj_out layers): missing {missing[:4]}, unexpected "
                f"{unexpected[:4]}, mis-shaped {misshaped[:4]}. Load it with the base model it was trained on."
            )
        with torch.no_grad():
            for i, target in enumerate(residuals.targets):
                residuals.down[i].copy_(tensors[f"{target}.{DOWN}"])
                residuals.up[i].copy_(tensors[f"{target}.{UP}"])
        residuals.info = info
        return residuals.requires_grad_(False)


def checked_residuals_file(path: str | Path) -> Path:
    """`path` if it is a file that can hold residuals: a .safetensors one, as `Residuals.save` writes. Their identifier,
    class word and rank ratio live in its metadata, which a pickle has none of: a .bin or .ckpt is refused, trusted or not."""
    path = checked_file(path)
    if not is_safetensors(path):
        raise CheckpointError(f"{path}: Personalized Residuals are .safetensors files (Residuals.save writes them), whose metadata holds "
                              "the identifier, class word and rank ratio; a pickle has no metadata, so a pickled file cannot be loaded, "
                              "trusted (--allow-pickle) or not. Give the .safetensors file the training wrote")
    return path


# ---- Training -------------------------------------------------------------------------------------
def train_residuals(
    pipe: StableDiffusion,
    residuals: Residuals,
    images: Tensor,
    prompt: str | None = None,
    config: TrainConfig = TRAINING,
    work: str | Path = "runs/residuals",
    *,
    context: Tensor | None = None,
    y: Tensor | None = None,
    save_every: int = 50,
    log_every: int = 10,
) -> list[float]:
    """Fit `residuals` to reference `images` ([N, 3, H, W] in [0, 1]) captioned `prompt`; the UNet,
    VAE and text encoders stay frozen. Instead of the prompt, its encoding may be given (no tokenizer
    needed): `context` [1, T, C] and, on SDXL, `y` [1, D] (`pipe.encode_prompt([prompt], H, W)` gives both).
    Any module with `targets`, `controls()` and `parameter_count()` trains the same way
    (scripts/evaluate_residuals.py trains its attention-LoRA baseline so). Each step draws `config.batch`
    references and fresh posterior samples of their latents. Resumable from `work`, but only from a
    checkpoint of the same base model, references, prompt (or encoding) and settings. Returns the losses."""
    check_reference_images(images)
    h, w = images.shape[-2:]
    if (prompt is None) == (context is None) or (prompt is not None and y is not None):
        raise ValueError("train_residuals: give either prompt or its encoding context= (with y= on SDXL), not both")
    if prompt is None:
        cond = encoded_prompt(pipe.unet, context, y)
    elif not pipe.tokenizers:
        raise ValueError("train_residuals: this pipeline has no tokenizer to encode the prompt with: pass its encoding as context= (with y= on SDXL)")
    else:
        with torch.no_grad():
            cond = pipe.encode_prompt([prompt], h, w)
    device = residuals.down[0].device
    pixels = (images * 2 - 1).to(device, pipe.vae.decoder.conv_in.weight.dtype)

    def loss_fn(generator: torch.Generator) -> Tensor:
        index = torch.randint(0, len(pixels), (config.batch,), generator=generator)
        with torch.no_grad():
            latents = pipe.vae.encode(pixels[index], generator=generator)
        context = cond.context.expand(config.batch, -1, -1)
        y = None if cond.y is None else cond.y.expand(config.batch, -1)
        return diffusion_loss(pipe.unet, pipe.schedule, latents, context, y, generator=generator, controls=residuals.controls())

    run = {  # a checkpoint in `work` resumes only if it was trained on the same base, data and settings
        "base": fingerprint(pipe.unet, pipe.vae, *pipe.text_encoders),
        "references": fingerprint(images),
        "prompt": prompt if prompt is not None else fingerprint(*[t for t in (context, y) if t is not None]),
        "residuals": f"{type(residuals).__name__}: {residuals.parameter_count()} parameters on {len(residuals.targets)} layers",
        "initial": fingerprint(residuals),  # where training starts (--init, --seed): another start is another run
        "settings": f"batch {config.batch}, lr {config.lr}, seed {config.seed}",
    }
    trainer = Trainer("residuals", {"residuals": residuals}, config, Path(work), device, run)
    losses = trainer.run(loss_fn, save_every, log_every)
    if config.ema:  # the averaged weights are the result, as the other trainings take them (the paper's recipe has none)
        residuals.load_state_dict(trainer.ema_state("residuals"))
    return losses


def encoded_prompt(unet: UNet, context: Tensor, y: Tensor | None) -> Conditioning:
    """A caption given as its encoding: `context` [1, T, C] of the UNet's text width and, for SDXL, its vector `y` [1, D]."""
    width, vector = unet.config.context_dim, unet.config.adm_in_channels
    if context.dim() != 3 or context.shape[0] != 1 or context.shape[-1] != width or context.shape[1] == 0:
        raise ValueError(f"context must be one caption's encoding [1, T, {width}] (this UNet's text width), got shape {list(context.shape)}")
    if vector is None and y is not None:
        raise ValueError("y is SDXL's vector (pooled text and sizes); this UNet reads the context alone: drop y")
    if vector is not None and (y is None or tuple(y.shape) != (1, vector)):
        raise ValueError(f"this SDXL UNet also reads the caption's vector y [1, {vector}] (pooled text and sizes), got "
                         f"{None if y is None else list(y.shape)}: pass y= from pipe.encode_prompt([prompt], H, W).y")
    return Conditioning(context, y)


# ---- LAG sampling ---------------------------------------------------------------------------------
def concept_tokens(tokenizer, prompt: str, residuals: Residuals, max_length: int | None = None, *, syntax: str = "plain") -> list[int]:
    """Positions of the concept's identifier and macro-class word in `prompt` (the paper's index set C:
    the tokens "specifying the concept"): every "<identifier> <class>" as written ("a sks star"; another
    star of the prompt is not the concept). Without one, the identifier alone (a warning: its class word
    does not follow it), else the class word's first occurrence (a warning: no identifier); neither is
    an error, as is a concept word cut off by truncation. `syntax` is the generation's `prompt_syntax`:
    "plain" gives positions in the plain prompt's tokens, "a1111" in the context of A1111's chunks
    (`token_spans(..., syntax="a1111")`: weights and brackets around the words are fine, nothing is
    truncated, and `max_length` is refused). On SDXL ask both text encoders (`same_for_every_encoder`,
    as sample.py --lag does): `tokenizer` gives the first's positions only.
    """
    identifier, macro_class = residuals.identifier, residuals.macro_class
    last = last_read_position(tokenizer, max_length, syntax=syntax)
    phrases = (f"{identifier} {macro_class}", identifier, macro_class)
    pairs, alone, classes = (token_spans(tokenizer, prompt, phrase, syntax=syntax) for phrase in phrases)
    if pairs:
        chosen = pairs
    elif alone:
        chosen = alone
        warnings.warn(f"LAG: in the prompt {prompt!r} the class word {macro_class!r} does not follow the identifier {identifier!r}; "
                      f"the concept is localized by the identifier alone. Write '{identifier} {macro_class}'.", stacklevel=2)  # fmt: skip
    elif classes:
        chosen = classes[:1]
        warnings.warn(
            f"LAG: the prompt {prompt!r} lacks the identifier {identifier!r}; the concept is localized by the first "
            f"class word {macro_class!r} alone. Add the identifier to the prompt to generate the concept.",
            stacklevel=2,
        )
    else:
        raise ValueError(
            f"the prompt {prompt!r} contains neither the identifier {identifier!r} nor the class word "
            f"{macro_class!r}, so LAG cannot localize the concept; write e.g. 'a {identifier} {macro_class} ...'"
        )
    if last is not None and (cut := [span for span in chosen if span[-1] > last]):
        raise ValueError(f"the concept's words in {prompt!r} sit at token positions {cut[0]}, past the {last} the text encoder "
                         "reads; shorten the prompt or name the concept earlier")  # fmt: skip
    return sorted({i for span in chosen for i in span})


def concept_positions(tokens: Sequence[int] | Sequence[Sequence[int]]) -> tuple[list[int], Tensor | None]:
    """The token positions LAG records, and for positions given per prompt, which of them are each
    prompt's ([prompts, positions], 1 or 0; None when one list serves every prompt)."""
    tokens = tokens.tolist() if isinstance(tokens, Tensor) else [t.tolist() if isinstance(t, Tensor) else t for t in tokens]
    nested = [isinstance(t, Sequence) for t in tokens]
    if not tokens or (all(nested) and not all(tokens)):
        raise ValueError("LAG needs the concept's token positions (concept_tokens gives them): got none")
    if any(nested) and not all(nested) or not all(isinstance(i, numbers.Integral) for t in tokens for i in (t if isinstance(t, Sequence) else [t])):
        raise ValueError(f"LAG's concept positions are whole numbers, one list for all prompts or one per prompt; got {tokens!r:.80}")
    if not all(nested):
        return sorted(set(tokens)), None
    positions = sorted({i for prompt in tokens for i in prompt})
    return positions, torch.tensor([[float(i in prompt) for i in positions] for prompt in tokens])


class LatestMaps(dict):
    """A `RecordAttention` sink that keeps each layer's latest map only (layer id -> [B, 1, N, |C|]):
    LAG reads the current call's, and a generation's earlier maps would only fill memory."""

    def __call__(self, site: Site, probs: Tensor) -> None:
        self[site.layer] = probs


class ConceptMask:
    """LAG's region for one proj_out: a [B, 1, h, w] binary mask from its blocks' attention in this call.

    Called by the `LowRank` it restricts, with the `Site` of proj_out, after the blocks' cross-attention
    has recorded into `maps` (layer id -> [B, 1, N, |C|]). Each row reads the mask of its conditional row
    (`BatchLayout.cond_rows`: under CFG the unconditional rows take their conditional row's), or its own
    when the call gave no layout.
    """

    def __init__(self, maps: Mapping[str, Tensor], layers: Sequence[str], quantile: float, per_prompt: Tensor | None = None):
        self.maps, self.layers, self.quantile = maps, layers, quantile
        self.per_prompt = per_prompt  # [prompts, |C|]: 1 where a recorded position is that prompt's concept (None: all)
        self._rows: dict[BatchLayout | int, tuple[Tensor, Tensor | None]] = {}  # index tensors made once per layout

    def __call__(self, site: Site) -> Tensor:
        maps = self.maps[self.layers[0]]  # [B, 1, N, |C|]
        for layer in self.layers[1:]:  # summed over the blocks: the mean's 1/len(layers) would not move the cut
            maps = maps + self.maps[layer]
        scores = maps[:, 0].float()  # [B, N, |C|]
        cond, own_positions = self._row_indices(site.layout, len(scores), scores.device)
        scores = scores.index_select(0, cond)  # each row reads its conditional row's map
        if own_positions is not None:  # each row sums its own prompt's concept positions
            scores = scores * own_positions[:, None, :]
        scores = scores.sum(-1)  # [B, N]: summed over the concept tokens
        # Binarize at the `quantile` of each row: keep the scores from the k-th smallest up, the same cut
        # torch.quantile's interpolated value makes for distinct scores, at a fraction of its cost.
        k = math.ceil(self.quantile * (scores.shape[1] - 1)) + 1
        threshold = scores.kthvalue(k, dim=1, keepdim=True).values
        return (scores >= threshold).to(maps.dtype).view(-1, 1, *site.grid)

    def _row_indices(self, layout: BatchLayout | None, rows: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """For each batch row, its conditional row (itself without a layout) and, with positions per
        prompt, which recorded positions are its prompt's ([B, |C|]; the conditional rows in order are
        the prompts). Made once per layout, on the maps' device."""
        key = layout if layout is not None else rows
        if key not in self._rows:
            cond = layout.cond_rows() if layout is not None else list(range(rows))
            prompts = list(layout.cond) if layout is not None else list(range(rows))
            own_positions = None
            if self.per_prompt is not None:
                if len(prompts) != len(self.per_prompt):
                    raise ValueError(f"LAG was given concept positions for {len(self.per_prompt)} prompts, but this batch "
                                     f"holds {len(prompts)}: give one list of positions per prompt, or one list for all")
                own_positions = self.per_prompt[[prompts.index(c) for c in cond]].to(device)
            self._rows[key] = (torch.tensor(cond, device=device), own_positions)
        return self._rows[key]


def lag_controls(concepts: Sequence[tuple[Residuals, Sequence[int] | Sequence[Sequence[int]], float]], *, quantile: float = 0.5) -> Controls:
    """Controls for LAG sampling with one or more (residuals, concept token positions, scale).

    The positions (`concept_tokens`) are one list for every prompt of the batch, or one list per prompt
    when the concept's words sit at different positions in them. quantile: where each mask is binarized
    (0.5 = the median, as in the paper; 0 keeps every position). The masks follow the batch layout the
    pipeline gives each call (CFG or not).
    """
    if not 0 <= quantile <= 1:
        raise ValueError(f"quantile must be in [0, 1] (0.5: the median), got {quantile}")
    if not concepts:
        raise ValueError("lag_controls needs at least one (residuals, concept token positions, scale)")
    records, low_rank = [], []
    device = concepts[0][0].down[0].device  # index tensors are made once here, not at every layer of every step
    for residuals, tokens, scale in concepts:
        positions, per_prompt = concept_positions(tokens)
        layers = [b for blocks in residuals.blocks.values() for b in blocks]
        maps = LatestMaps()
        record = RecordAttention(kind="cross", layers=layers, tokens=torch.tensor(positions, device=device), sink=maps)
        regions = {t: ConceptMask(maps, residuals.blocks[t], quantile, per_prompt) for t in residuals.targets}
        records.append(record)
        low_rank += residuals.low_rank(scale, regions)
    return Controls(record=records, low_rank=low_rank)
