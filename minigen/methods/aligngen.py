"""AlignGen (Lin et al. 2025): a learned token S* aligns the prompt's concept with a reference image (FLUX).

Zero-shot references fed as OminiControl tokens lose to the text's prior when the two disagree. AlignGen
places a learned token S* before the concept word, lets a small module read the reference's Redux
tokens to turn S* into S*', and keeps the other words of the prompt away from the reference:

    prompt       "a photo of a <extra_id_0> guitar on the beach"      (S* before the concept word)
    T5           c_text [1, M, d]; its state at the placeholder is replaced, nothing else changes
    DEM          c = [S*; c_text[concept]]  [1, 1 + l, d]              (S* learned, d = T5's width)
                 c = c + SelfAttn(LN(c))
                 c = c + CrossAttn(LN(c), LN(c_redux))                 c_redux [1, 729, d]
                 c = c + MLP(LN(c));   S*' = c[0]                       (only S*' replaces a token)
    reference    VAE tokens as OminiControl's condition group (t = 0, ids shifted, LoRA on it only)
    mask         text rows -> reference k: only S*_k and concept k's tokens; references apart

    aligngen = load_aligngen("guitar-aligngen.safetensors", pipe.transformer)   # minigen/loading/aligngen.py
    inputs = prepare(pipe, aligngen, "a photo of a guitar on the beach", ["guitar"], [reference], [redux])
    images = pipe.generate(**inputs.generate_kwargs(), steps=28, seed=1)

`prepare` finds the concept word with the T5 tokenizer and inserts the placeholder; `aligngen_inputs`
does the same from tensors alone (T5 states, the concepts' token positions, images, Redux tokens).
Every switch of the paper's ablation is a field of `AlignGenSettings`.

Nothing of the method is published but the paper, so these are our decisions:

| decision | our default | why |
|---|---|---|
| where S* lives | a learned vector [d] in T5's *output* space; the prompt holds the placeholder `<extra_id_0>`, whose T5 state is overwritten | T5-XXL stays frozen and off the gradient path; a T5 sentinel is one token in every T5 vocabulary. (The paper runs S* through T5, as Textual Inversion.) |
| S* at the start of training | the mean T5 state at the placeholder over the training captions | a token T5 itself produces there, so `txt_in` reads an in-distribution vector |
| DEM width | reads and writes d (T5 width); attention and MLP inside at `inner` = min(d, 1024), heads of 64, MLP 4·inner | the paper gives none; full width at d = 4096 costs 268 M parameters, 1024 costs 67 M |
| DEM norms, init | pre-LN (LayerNorm on the queries, one of its own on the Redux tokens); the three output projections start at 0, so S*' = S* at first | the standard residual block; training starts from the raw token, as LoRA starts from up = 0 |
| Redux tokens in FLUX's sequence | no, only the DEM reads them | Eq. 6 and Fig. 4 attend over [x_t; c'_text; c_ref] |
| reference tokens | `condition_group`: VAE posterior mean of the reference's centred square resized to 512 (`reference_size`), ids shifted left by its own width (`reference_shift`), t = 0 | the paper follows OminiControl and asks that reference and image ids never overlap: OminiControl's training shift, left, never does at any image size; "right" (its 512 px demo's) overlaps an image wider than the reference, and is what files trained before this setting used |
| reference LoRA | rank 16, α 16 (scale 1) on `img_in`, each double block's `img_mod.lin`, `img_attn.qkv`, `img_attn.proj`, `img_mlp.2` and each single block's `modulation.lin`, `linear1`, `linear2`, for the reference tokens only (`TokenGroup.lora`); down drawn as nn.Linear's weights, up 0 | OminiControl's subject LoRA set (x_embedder, norm1, to_q/k/v, to_out, ff.net.2; norm, proj_mlp, proj_out) |
| mask: text -> reference | rows of S*_k and concept k's tokens see reference k; every other text row (other words, `</s>`, padding) gets -inf | the paper's rule; -inf makes the attention probability exactly 0 |
| mask: the rest | image <-> references open; reference j <-> reference k (j != k) -inf always (also without the mask); reference -> text open (`reference_to_text`: "concept" or "none" close it) | the paper's two-subject rule; it says nothing of reference -> text |
| CFG rows | a negative prompt's text rows see no reference | they name no concept |
| several subjects | one S* before each concept word, each its own S*' from its own Redux tokens; every reference at the same position ids | the paper's Sec. 4.2 |

Training (minigen/methods/aligngen_training.py) records its own decisions (dropout, name substitution,
optimizer) in its docstring.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from minigen.attention import attention, split_heads
from minigen.controls import AttentionBias, Controls, LowRank, Site
from minigen.image import from_pil, read_image
from minigen.methods.lora_factors import LoRAFactors
from minigen.methods.ominicontrol import check_reference, condition_group
from minigen.models.flux import Flux
from minigen.models.flux_tokens import TokenGroup
from minigen.models.vae import AutoencoderKL
from minigen.storage import compute_device, compute_dtype
from minigen.text.spans import checked_span, token_span, token_spans
from minigen.text.t5 import encode_flux_ids
from minigen.text.tokenizer import tokenize

PLACEHOLDER = "<extra_id_0>"  # T5's first sentinel: one token in every T5 vocabulary
RANK, ALPHA = 16, 16.0
HEAD_WIDTH = 64  # channels per DEM head
MAX_INNER = 1024  # the DEM's default inner width at T5-XXL's d = 4096
REFERENCE_SIZE = 512
BLOCKED = float("-inf")  # the paper's mask: probability exactly 0 (Conceptrol's official code blocks at -1e7 instead)
ReferenceToText = Literal["all", "concept", "none"]
ReferenceShift = Literal["left", "right"]


# ================================================================ what is learned


@dataclass(frozen=True)
class AlignGenConfig:
    """The shapes of one AlignGen: saved in its file, and checked against the base model on load."""

    dim: int  # T5's width = the transformer's context_in_dim: S*, the DEM's input, the Redux tokens
    inner: int  # the DEM's attention width
    heads: int  # the DEM's attention heads (inner / heads channels each)
    mlp_hidden: int  # the DEM's MLP width
    rank: int = RANK  # the reference LoRA's rank
    alpha: float = ALPHA  # LoRA scale alpha / rank
    placeholder: str = PLACEHOLDER  # the prompt token whose T5 state S*' replaces

    def __post_init__(self):
        if min(self.dim, self.inner, self.heads, self.mlp_hidden, self.rank) < 1 or self.inner % self.heads:
            raise ValueError(f"AlignGenConfig needs positive widths and heads that divide inner; got {self}")

    @classmethod
    def for_transformer(cls, transformer: Flux, inner: int | None = None, rank: int = RANK, **fields) -> AlignGenConfig:
        """The default shapes for a transformer: d its text width, inner min(d, 1024), heads of 64 channels."""
        dim = transformer.config.context_in_dim
        inner = min(dim, MAX_INNER) if inner is None else inner
        heads = fields.pop("heads", max(1, inner // HEAD_WIDTH))
        return cls(dim=dim, inner=inner, heads=heads, mlp_hidden=fields.pop("mlp_hidden", 4 * inner), rank=rank, **fields)


class Attention(nn.Module):
    """Multi-head attention of queries x [B, n, d] to a context [B, m, d], written out: q, k, v projected to
    `inner`, split into heads, softmax(q·kᵀ/√(inner/heads))·v, projected back to d."""

    def __init__(self, dim: int, inner: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q, k, v = (split_heads(f(t), self.heads) for f, t in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        return self.to_out(attention(q, k, v))  # [B, heads, n, inner/heads] -> [B, n, d]


class DeviationExtraction(nn.Module):
    """The DEM: [S*; concept tokens] [B, 1 + l, d] and Redux tokens [B, R, d] -> the updated tokens [B, 1 + l, d]
    (residual self-attention, residual cross-attention to the Redux tokens, residual MLP; pre-LN)."""

    def __init__(self, config: AlignGenConfig, generator: torch.Generator | None = None):
        super().__init__()
        d = config.dim
        self.norm_self, self.self_attn = nn.LayerNorm(d), Attention(d, config.inner, config.heads)
        self.norm_cross, self.norm_redux = nn.LayerNorm(d), nn.LayerNorm(d)
        self.cross_attn = Attention(d, config.inner, config.heads)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, config.mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(config.mlp_hidden, d))
        for layer in self.modules():  # PyTorch's default initialisation, drawn from `generator`: a seeded run repeats
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                if layer.bias is not None:
                    bound = 1 / math.sqrt(layer.in_features)
                    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
        for last in (self.self_attn.to_out, self.cross_attn.to_out, self.mlp[2]):  # start as the identity
            nn.init.zeros_(last.weight), nn.init.zeros_(last.bias)

    def forward(self, concept: Tensor, redux: Tensor) -> Tensor:
        h = self.norm_self(concept)
        c = concept + self.self_attn(h, h)  # Eq. 3
        c = c + self.cross_attn(self.norm_cross(c), self.norm_redux(redux))  # Eq. 4
        return c + self.mlp(self.norm_mlp(c))  # Eq. 5


class LearnedToken(nn.Module):
    """S*: one vector [d] in T5's output space."""

    def __init__(self, vector: Tensor):
        super().__init__()
        self.vector = nn.Parameter(vector.detach().float().clone())


def reference_lora_targets(transformer: Flux) -> dict[str, str]:
    """{module path: module path} of the layers the reference LoRA adapts (OminiControl's set, BFL names)."""
    config = transformer.config
    targets = ["img_in"]
    for i in range(config.depth):
        targets += [f"double_blocks.{i}.{layer}" for layer in ("img_mod.lin", "img_attn.qkv", "img_attn.proj", "img_mlp.2")]
    for i in range(config.depth_single_blocks):
        targets += [f"single_blocks.{i}.{layer}" for layer in ("modulation.lin", "linear1", "linear2")]
    return {target: target for target in targets}


class AlignGen(nn.Module):
    """Everything AlignGen learns: `token` (S*), `dem` and `lora` (the reference tokens' LoRA, up = 0 at start).

    `token` starts at `initial_token` [d] (zeros when not given; training starts it from the captions,
    `aligngen_training.initial_token`). Random draws (the DEM's layers, the LoRA's down factors) come
    from `generator`.
    """

    def __init__(self, config: AlignGenConfig, transformer: Flux, *, initial_token: Tensor | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if config.dim != transformer.config.context_in_dim:
            raise ValueError(f"AlignGen of width {config.dim} for a transformer whose text is {transformer.config.context_in_dim} wide")
        self.config = config
        self.base = config_fingerprint(transformer)  # the base model's config: its file refuses one of another shape
        self.base_config = asdict(transformer.config)
        self.token = LearnedToken(torch.zeros(config.dim) if initial_token is None else initial_token.reshape(config.dim))
        self.dem = DeviationExtraction(config, generator)
        self.lora = LoRAFactors(transformer, reference_lora_targets(transformer), config.rank, generator)
        self.lora.float()
        self.settings = AlignGenSettings()  # how it runs unless told otherwise: load_aligngen sets its file's trained ones

    def updated_token(self, concept: Tensor, redux: Tensor, *, dem: bool = True) -> Tensor:
        """S*' [d] from the concept word's T5 states [l, d] and the reference's Redux tokens [R, d]; without the
        DEM (`dem=False`, the ablation) the raw S*."""
        if not dem:
            return self.token.vector
        redux = redux[0] if redux.dim() == 3 and len(redux) == 1 else redux
        if redux.dim() != 2 or redux.shape[-1] != self.config.dim or len(redux) == 0:
            raise ValueError(f"Redux tokens must be [R, {self.config.dim}] (or [1, R, {self.config.dim}]), R at least 1, got {list(redux.shape)}")
        if not torch.isfinite(redux).all():
            raise ValueError("Redux tokens hold NaN or infinite values: check the SigLIP tower and Redux projector that made them")
        tokens = torch.cat([self.token.vector[None], concept.float().to(self.token.vector.device)])  # [1 + l, d]
        return self.dem(tokens[None], redux.float()[None].to(tokens.device))[0, 0]  # S*' = the first token

    def low_rank(self, like: Tensor, scale: float = 1.0) -> list[LowRank]:
        """The reference LoRA as `LowRank` residuals in the dtype and device of `like` (a tensor of the
        transformer's compute dtype and device), at scale alpha / rank · `scale`; autograd reaches the factors."""
        s = self.config.alpha / self.config.rank * scale
        return [LowRank(d.target, d.down.to(like), d.up.to(like), s) for d in self.lora.low_rank()]


def config_fingerprint(transformer: Flux) -> str:
    """A digest of the transformer's config (not its weights: two fine-tunes of one model share it): an
    AlignGen file records its base's and refuses a transformer of another shape."""
    text = json.dumps(asdict(transformer.config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ================================================================ the switches


@dataclass(frozen=True)
class AlignGenSettings:
    """How AlignGen runs; the first three are the paper's ablation (Table 2: LT, DEM, SCMAM)."""

    s_star: bool = True  # False: no placeholder in the prompt, nothing replaced (the DEM unused)
    dem: bool = True  # False: S*' is the raw learned S* (Redux tokens unused)
    mask: bool = True  # False: every text row sees every reference (references still never see each other)
    reference_to_text: ReferenceToText = "all"  # which text keys the reference tokens attend to
    reference_size: int | None = REFERENCE_SIZE  # references are cropped to their centred square and resized to this side first (None: as given)
    lora_scale: float = 1.0
    reference_shift: ReferenceShift = "left"  # the references' column ids: -w..-1 ("left") or w..2w-1 ("right"), w their width

    def __post_init__(self):
        if self.reference_to_text not in ("all", "concept", "none"):
            raise ValueError(f"reference_to_text must be 'all', 'concept' or 'none', got {self.reference_to_text!r}")
        if self.reference_shift not in ("left", "right"):
            raise ValueError(f"reference_shift must be 'left' or 'right', got {self.reference_shift!r}")


# ================================================================ the prompt: S* and the concept tokens


@dataclass(frozen=True)
class ConceptTokens:
    """Where one concept stands in the T5 prompt: its word's token positions and S*'s (None without S*)."""

    span: tuple[int, ...]
    s_star: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "span", tuple(checked_span(self.span, "ConceptTokens.span")))  # frozen: set once, here

    @property
    def positions(self) -> list[int]:
        """The text rows that may see this concept's reference: S* and the concept word."""
        return ([] if self.s_star is None else [self.s_star]) + list(self.span)


def replace_tokens(txt: Tensor, rows: Sequence[int], positions: Sequence[int], tokens: Sequence[Tensor]) -> Tensor:
    """txt [B, M, d] with txt[rows[i], positions[i]] = tokens[i]; every other entry is copied bit for bit."""
    out = txt.clone()
    if tokens:
        out[list(rows), list(positions)] = torch.stack(list(tokens)).to(out)
    return out


def with_updated_tokens(
    aligngen: AlignGen, txt: Tensor, concepts: Sequence[Sequence[ConceptTokens]], redux: Sequence[Sequence[Tensor]], settings: AlignGenSettings
) -> Tensor:
    """The prompt embeddings txt [B, M, d] with each concept's S* position holding its S*'.

    concepts[b] / redux[b]: the concepts of row b and their Redux tokens ([R, d] each)."""
    if not settings.s_star:
        return txt
    rows, positions, tokens = [], [], []
    for b, (row_concepts, row_redux) in enumerate(zip(concepts, redux)):
        for concept, tokens_of_reference in zip(row_concepts, row_redux):
            concept_states = txt[b, list(concept.span)].detach()  # [l, d]: T5 is frozen, no gradient flows into it
            tokens.append(aligngen.updated_token(concept_states, tokens_of_reference, dem=settings.dem))
            rows.append(b), positions.append(concept.s_star)
    return replace_tokens(txt, rows, positions, tokens)


def check_concepts(concepts: Sequence[ConceptTokens], text_length: int, settings: AlignGenSettings) -> None:
    """Positions inside the prompt, and S* where (and only where) the settings use it."""
    for k, concept in enumerate(concepts):
        if not concept.span:
            raise ValueError(f"concept {k} has no token positions; give the positions of its word in the prompt")
        if settings.s_star and concept.s_star is None:
            raise ValueError(f"concept {k} has no S* position: encode the prompt with the placeholder before its word, or set s_star=False")
        if not settings.s_star and concept.s_star is not None:
            raise ValueError(f"concept {k} has an S* position but settings.s_star is False: encode the prompt without the placeholder")
        checked_span(concept.positions, f"concept {k} (its S* and word)", text_length)


# ================================================================ the selective cross-modal attention mask


def selective_mask(text_length: int, allowed: Sequence[Sequence[Sequence[int]]], names: Sequence[str], settings: AlignGenSettings) -> dict:
    """The bias by token group {(query group, key group): 0 / -inf block} over [text | image | references].

    allowed[b][k]: the text positions of batch row b that may attend to reference k (its S* and concept
    tokens; [] for a row that names no concept). Blocks are [B, 1, M, 1] per text query (or [B, 1, 1, M]
    per text key): B = len(allowed), M = text_length.
    """
    bias: dict = {}
    for k, name in enumerate(names):
        if settings.mask:
            rows = torch.full((len(allowed), 1, text_length, 1), BLOCKED)
            for b, row in enumerate(allowed):
                rows[b, 0, list(row[k]), 0] = 0.0
            bias[("txt", name)] = rows  # concept-irrelevant text cannot attend to the reference
        if settings.reference_to_text == "none":
            bias[(name, "txt")] = BLOCKED
        elif settings.reference_to_text == "concept":
            keys = torch.full((len(allowed), 1, 1, text_length), BLOCKED)
            for b, row in enumerate(allowed):
                keys[b, 0, 0, list(row[k])] = 0.0
            bias[(name, "txt")] = keys
        for other in names:
            if other != name:
                bias[(name, other)] = BLOCKED  # references never see each other
    return bias


@dataclass(eq=False)
class SelectiveMask:
    """The mask of one prompt for a pipeline's calls: conditional rows let each concept's tokens see its
    reference, unconditional rows (a negative prompt under true CFG) let no text row see any. Without
    the mask (`settings.mask` False, the ablation) every text row of every row sees the references."""

    text_length: int
    concepts: Sequence[ConceptTokens]
    names: Sequence[str]
    settings: AlignGenSettings
    _cache: dict = field(default_factory=dict, repr=False)

    def __call__(self, site: Site) -> dict:
        uncond = () if site.layout is None else site.layout.uncond
        size = 1 if site.layout is None else site.layout.size
        key = (size, tuple(uncond))
        if key not in self._cache:
            own = [c.positions for c in self.concepts]
            allowed = [[[] for _ in self.names] if b in uncond else own for b in range(size)]
            self._cache[key] = selective_mask(self.text_length, allowed, self.names, self.settings)
        return self._cache[key]


# ================================================================ everything a generation needs


@dataclass
class AlignGenInputs:
    """What `FluxPipeline.generate` takes for AlignGen: `pipe.generate(**inputs.generate_kwargs(), ...)`."""

    prompt_embeds: Tensor  # [1, M, d] T5 states, S*' in place
    pooled_prompt_embeds: Tensor  # [1, D] CLIP pooled, unchanged
    extra: list[TokenGroup]  # the reference groups "ref0", "ref1", ...
    bias: list[AttentionBias]  # the selective mask (compose with more controls: Controls(bias=inputs.bias, record=...))
    concepts: list[ConceptTokens]

    @property
    def controls(self) -> Controls:
        """The selective mask as controls (the same at every step)."""
        return Controls(bias=self.bias)

    def generate_kwargs(self) -> dict:
        """FluxPipeline.generate's prompt_embeds, pooled_prompt_embeds, extra and controls for this AlignGen; to add
        controls of your own, pop "controls" and pass `combine(inputs.controls, yours)`."""
        return dict(prompt_embeds=self.prompt_embeds, pooled_prompt_embeds=self.pooled_prompt_embeds, extra=self.extra, controls=self.controls)


def centre_square(image: Tensor) -> Tensor:
    """The centred square of an image [..., H, W] (side min(H, W)), as train_aligngen.py crops references."""
    side = min(image.shape[-2:])
    top, left = (image.shape[-2] - side) // 2, (image.shape[-1] - side) // 2
    return image[..., top : top + side, left : left + side]


def reference_groups(
    aligngen: AlignGen, vae: AutoencoderKL, transformer: Flux, references: Sequence[Tensor], settings: AlignGenSettings
) -> list[TokenGroup]:
    """One condition group per reference [1, 3, H, W] in [0, 1], named "ref0", "ref1", ..., all at the same
    position ids (the paper's multi-subject rule), shifted by their width (`settings.reference_shift`),
    each with the reference LoRA."""
    like = torch.empty(0, dtype=compute_dtype(transformer), device=compute_device(transformer))  # a stored or offloaded weight is not
    lora = tuple(aligngen.low_rank(like, settings.lora_scale))  # autograd reaches the factors
    groups, multiple = [], vae.config.downsample_factor * 2  # pixels per token: 2x2 latent patches
    for k, reference in enumerate(references):
        if settings.reference_size is not None:  # as train_aligngen.py reads references: the centred square, then resized
            reference = centre_square(reference)
        sides = (settings.reference_size,) * 2 if settings.reference_size is not None else tuple(reference.shape[-2:])
        if any(s % multiple for s in sides):
            raise ValueError(f"reference {k} is drawn at {sides[0]}x{sides[1]} pixels, but FLUX reads 2x2 latent patches of {multiple} pixels: "
                             f"give a reference_size (or a reference) whose sides are multiples of {multiple}")  # fmt: skip
        width = sides[1] // multiple
        shift = (0, -width if settings.reference_shift == "left" else width)
        with torch.no_grad():  # the VAE is frozen
            groups.append(condition_group(vae, reference, size=settings.reference_size, name=f"ref{k}", position_delta=shift))
    return [replace(group, lora=lora) for group in groups]


@torch.no_grad()
def aligngen_inputs(
    aligngen: AlignGen,
    vae: AutoencoderKL,
    transformer: Flux,
    prompt_embeds: Tensor,
    pooled_prompt_embeds: Tensor,
    concepts: Sequence[ConceptTokens],
    references: Sequence[Tensor],
    redux: Sequence[Tensor],
    settings: AlignGenSettings | None = None,
) -> AlignGenInputs:
    """AlignGen from tensors alone (no tokenizer): T5 states [1, M, d] holding the placeholder at each
    concept's `s_star`, CLIP pooled [1, D], and per concept, in order, a reference [1, 3, H, W] in [0, 1]
    and its Redux tokens [1, R, d] (`minigen.models.redux.redux_tokens`). `settings` default to the
    AlignGen's own (`AlignGen.settings`: a loaded file's trained settings)."""
    settings = aligngen.settings if settings is None else settings
    if prompt_embeds.dim() != 3 or len(prompt_embeds) != 1 or prompt_embeds.shape[-1] != aligngen.config.dim:
        raise ValueError(f"prompt_embeds must be one prompt's T5 states [1, M, {aligngen.config.dim}], got {list(prompt_embeds.shape)}")
    check_subjects(len(concepts), references, redux)
    check_concepts(concepts, prompt_embeds.shape[1], settings)
    references = [check_reference(r, f"reference {k}") for k, r in enumerate(references)]
    txt = with_updated_tokens(aligngen, prompt_embeds, [concepts], [list(redux)], settings)
    groups = reference_groups(aligngen, vae, transformer, references, settings)
    mask = SelectiveMask(prompt_embeds.shape[1], list(concepts), [g.name for g in groups], settings)
    return AlignGenInputs(txt, pooled_prompt_embeds, groups, [AttentionBias(mask, kind="joint")], list(concepts))


def check_subjects(concepts: int, references: Sequence, redux: Sequence) -> None:
    """One reference and one set of Redux tokens per concept."""
    if isinstance(references, (Tensor, str, Path)) or isinstance(redux, Tensor):
        raise ValueError("give references and Redux tokens as lists, one entry per concept (in the order the concepts appear)")
    if not concepts:
        raise ValueError("give at least one concept (its word in the prompt) with its reference image")
    if not concepts == len(references) == len(redux):
        raise ValueError(
            f"{concepts} concept(s) but {len(references)} reference image(s) and {len(redux)} set(s) of Redux tokens: "
            "give one reference image and its Redux tokens per concept, in the order the concepts appear"
        )


def load_reference(path: str | Path) -> Tensor:
    """A reference image file as [1, 3, H, W] in [0, 1] (`read_image`: upright, transparency on white); a
    missing or unreadable file is a clear error."""
    return from_pil(read_image(path, "reference image"))


# ================================================================ the convenience path: a prompt and concept words


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt encoded for AlignGen: the T5 text (placeholders inserted), its states and the concepts."""

    t5_text: str
    txt: Tensor  # [1, M, d]
    pooled: Tensor  # [1, D] CLIP pooled of the prompt as written (CLIP never sees the placeholder)
    concepts: list[ConceptTokens]


def whole_word_starts(prompt: str, word: str) -> list[int]:
    """Where `word` occurs in `prompt` as a whole word (character positions)."""
    return [m.start() for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", prompt)] if word else []


def concept_starts(prompt: str, words: Sequence[str]) -> list[int]:
    """Each concept word's character position in `prompt`: its first whole-word occurrence outside the
    others'. Longer words claim theirs first, so in "an acoustic guitar near a guitar" the concepts
    "guitar" and "acoustic guitar" are the two guitars, and "a star and a star" holds two stars."""
    starts: list[int | None] = [None] * len(words)
    taken: list[tuple[int, int]] = []
    for i in sorted(range(len(words)), key=lambda i: -len(words[i].strip())):
        word = words[i].strip()
        free = [s for s in whole_word_starts(prompt, word) if not any(a < s + len(word) and s < b for a, b in taken)]
        if not free:
            raise ValueError(
                f"the concept word {word!r} is not in the prompt {prompt!r}" + (" outside the other concept words" if whole_word_starts(prompt, word) else "")
                + f": write it into the prompt as a whole word, e.g. 'a photo of a {word or 'guitar'} on the beach'"
            )  # fmt: skip
        starts[i] = free[0]
        taken.append((free[0], free[0] + len(word)))
    return starts


def insert_placeholders(prompt: str, words: Sequence[str], placeholder: str = PLACEHOLDER, starts: Sequence[int] | None = None) -> tuple[str, list[int]]:
    """`prompt` with `placeholder` before each concept word (at `starts`, its character position; default
    `concept_starts`), and for each word the index of its placeholder among them in text order."""
    if placeholder in prompt:
        raise ValueError(f"the prompt already holds the placeholder {placeholder!r}; write the concept words without it")
    starts = concept_starts(prompt, words) if starts is None else list(starts)
    for start in sorted(starts, reverse=True):
        prompt = prompt[:start] + placeholder + " " + prompt[start:]
    return prompt, [sorted(starts).index(start) for start in starts]


def locate_concepts(
    tokenizer, t5_text: str, words: Sequence[str], ranks: Sequence[int], max_length: int, placeholder: str = PLACEHOLDER
) -> list[ConceptTokens]:
    """Each concept word's T5 positions in `t5_text` and S*'s position right before it (`ranks`: the
    words' placeholders in text order, from `insert_placeholders`)."""
    placeholder_id = tokenizer.convert_tokens_to_ids(placeholder)
    if tokenizer(placeholder, add_special_tokens=False).input_ids != [placeholder_id]:
        raise ValueError(f"the T5 tokenizer has no single token {placeholder!r}; AlignGen needs one for S*")
    ids = tokenizer(t5_text, verbose=False).input_ids[: max_length - 1]  # what T5 reads before </s>
    s_positions = [i for i, token in enumerate(ids) if token == placeholder_id]
    concepts = []
    for word, rank in zip(words, ranks):
        if rank >= len(s_positions):
            raise ValueError(f"the concept word {word!r} lies beyond the {max_length} tokens T5 reads; shorten the prompt before it")
        s_star, occurrence, span = s_positions[rank], 0, []
        while not span or span[0] <= s_star:  # the first occurrence of the word after its placeholder
            try:
                span = token_span(tokenizer, t5_text, word.strip(), occurrence=occurrence, max_length=max_length)
            except ValueError as error:
                raise ValueError(f"the concept word {word!r} is not among the T5 tokens after its placeholder: {error}") from None
            occurrence += 1
        if span[0] != s_star + 1:
            raise ValueError(f"the concept word {word!r} does not follow its placeholder in the T5 tokens of {t5_text!r}")
        concepts.append(ConceptTokens(tuple(span), s_star))
    return concepts


@torch.no_grad()
def encode_prompt(
    pipe, prompt: str, words: Sequence[str], *, s_star: bool = True, placeholder: str = PLACEHOLDER, starts: Sequence[int] | None = None
) -> EncodedPrompt:
    """T5 states of `prompt` with the placeholder before each concept word (none when `s_star` is False),
    CLIP pooled of `prompt` as written, and where each concept stands. `starts`: the words' character
    positions in `prompt` (default `concept_starts`: each word's first occurrence outside the others')."""
    words = [words] if isinstance(words, str) else list(words)
    starts = concept_starts(prompt, words) if starts is None else list(starts)
    if len(starts) != len(words) or len(set(starts)) != len(starts):
        raise ValueError(f"starts gives {len(starts)} distinct position(s) of {starts} for {len(words)} concept word(s): give one each")
    occurrences = [whole_word_starts(prompt, word.strip()) for word in words]  # each word's, as characters
    for word, start, found in zip(words, starts, occurrences):
        if start not in found:
            raise ValueError(f"the concept word {word.strip()!r} does not stand as a whole word at character {start} of {prompt!r}")
    if s_star:
        t5_text, ranks = insert_placeholders(prompt, words, placeholder, starts)
        concepts = locate_concepts(pipe.t5_tokenizer, t5_text, words, ranks, pipe.max_length, placeholder)
    else:  # each word at its own occurrence, counted among the prompt's whole-word ones
        t5_text, concepts = prompt, []
        for word, start, found in zip(words, starts, occurrences):
            word, spans = word.strip(), token_spans(pipe.t5_tokenizer, prompt, word.strip())
            if len(spans) != len(found):  # "(star": sentencepiece starts no word there
                raise ValueError(f"the concept word {word!r} occurs {len(found)} time(s) in {prompt!r} but T5 reads it "
                                 f"as a word {len(spans)} time(s) (punctuation glued to it, as in '(star'): set it apart with spaces")  # fmt: skip
            span = spans[found.index(start)]
            if span[-1] > pipe.max_length - 2:
                raise ValueError(f"the concept word {word!r} lies beyond the {pipe.max_length} tokens T5 reads; shorten the prompt before it")
            concepts.append(ConceptTokens(tuple(span)))
    t5_ids = tokenize(pipe.t5_tokenizer, [t5_text], pipe.max_length)  # [1, M]
    clip_ids = tokenize(pipe.clip_tokenizer, [prompt])  # [1, 77]
    txt, pooled = encode_flux_ids(pipe.t5, pipe.clip, t5_ids, clip_ids, pipe.clip_tokenizer.eos_token_id)
    return EncodedPrompt(t5_text, txt, pooled, concepts)


def prepare(
    pipe,
    aligngen: AlignGen,
    prompt: str,
    words: Sequence[str],
    references: Sequence[Tensor | str | Path],
    redux: Sequence[Tensor],
    settings: AlignGenSettings | None = None,
) -> AlignGenInputs:
    """AlignGen for a FLUX pipeline from a prompt: `words[k]` is concept k's word in the prompt, `references[k]`
    its reference (an image [1, 3, H, W] in [0, 1] or a file path) and `redux[k]` its Redux tokens [1, R, d]
    (of the reference's `centre_square` when settings.reference_size is set, as training reads references).
    `settings` default to the AlignGen's own (`AlignGen.settings`), which `load_aligngen` sets to those its file
    was trained with (`trained_settings`, minigen/loading/aligngen.py): a toy run trained at 64 px references
    runs at 64 px, an older file with its references on the right; `AlignGenSettings()` are the paper's."""
    settings = aligngen.settings if settings is None else settings
    if isinstance(words, str):
        words = [words]
    check_subjects(len(words), references, redux)
    images = [load_reference(r) if isinstance(r, (str, Path)) else check_reference(r, f"reference {k}", or_path=True) for k, r in enumerate(references)]
    encoded = encode_prompt(pipe, prompt, words, s_star=settings.s_star, placeholder=aligngen.config.placeholder)
    return aligngen_inputs(aligngen, pipe.vae, pipe.transformer, encoded.txt, encoded.pooled, encoded.concepts, images, redux, settings)
