"""Conceptrol (He et al. 2025): a textual concept mask gates an adapter's image attention.

A personalization adapter (IP-Adapter on SD/SDXL, OminiControl on FLUX) injects a reference image
everywhere in the picture. Conceptrol reads, from one attention block, where the text's concept
phrase ("the book") is attended to, and lets the reference act only there. No training.

SD / SDXL, IP-Adapter (the official code's arithmetic, ../shared/notes/conceptrol.md §2):

    mask  = mean over the concept's tokens and the heads of the concept layer's text attention,
            divided by its spatial max (+1e-6), from each image's conditional row;
    every cross-attention layer: out = Attn(q, text) + scale · mask ⊙ Attn(q, IP tokens),
            with the concept layer's mask resized to the layer (nearest); layers that run before the
            concept layer take the previous step's mask, and their own at step 0 (`global_masking`;
            off: every layer its own mask); the first `warmup` of the steps (and those past `end`) run the
            IP branch at 0.

FLUX, OminiControl (§3): an attention bias over [text | image | condition]:

    image -> condition        log λ + log Â    Â: the image tokens' share of their text attention that
                                                goes to the concept tokens, over heads and concept
                                                tokens, divided by its mean (so its mean is 1)
    concept text -> condition log λ            other text rows -> condition: -1e7
    condition -> image        log λ            condition -> text: 0

    Â is extracted at `extract_at` blocks and biases every block call after it (within the same
    forward, and into the next step). The official code extracts at every 19th block call, counting
    double and single blocks (double block 18, single blocks 18 and 37: `extraction="code"`, the
    default, `period` the double blocks' count); the paper names double block 18 only
    (`extraction="paper"`). λ is the condition scale, 0.5 during warmup (and past `end`).

Beyond the official code (which runs one concept, batch 1, CFG on, 77 tokens, square latents, FLUX
at 512 px only): several (reference, concept) pairs, each gated by its own mask; any batch size with
or without CFG (each row reads its conditional row's mask); any resolution and text length. (FLUX: the
condition's position ids sit right of the image, one image width from column 0, as in the official
pipeline; further references follow one reference width apart.) A concept's span is one for every
row: the prompts of a batch must name it at the same token positions (`sd_concepts` reads one prompt).
Spans are positions in the context the generation reads: for a generation with `prompt_syntax="a1111"`,
`sd_concepts(..., prompt_syntax="a1111")` finds them in the chunks of A1111's syntax (any length; a
phrase after a BREAK or past 75 tokens sits at 78 or later). `steps` is the number of steps the sampler
runs: with `image` and `strength`, the steps left after the strength cut (diffusers applies its control_guidance
start and end to those), not generate's `steps`; a generation of another length refuses the controls.

Compared with the official code run unchanged on tiny random models in fp32, the same inputs give
the same noise predictions and velocities within 2e-5. Two inputs are made differently there. A
concept phrase's span: the official SD code takes the first occurrences of its first and last tokens,
each found on its own, and the FLUX code the first run of its T5 pieces, which may start inside a
longer word (`sd_concepts` and `flux_concepts` match whole words; pass the span yourself to reproduce
either). And SD's CLIP pixels are cast to fp16 before the vision tower whatever the model's dtype
(`reference_tokens(adapter, encoder, pixels.half().float())` reproduces it).

Both methods are objects whose `controls(step)` a pipeline calls at every step (pass the bound
method: `pipe.generate(prompt, controls=method.controls)`); their state lives in the object (never in
the concepts, which may be shared). Reused, they do what the official pipelines do: `ConceptrolSD` starts
every generation (step 0) without the last one's masks, and `ConceptrolFlux` counts block calls on
across generations, as the official `forward_count` does (a new object counts from 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import Tensor

from PIL import Image

from minigen.controls import AttentionBias, Controls, ExtraTokens, RecordAttention, Site, resize_mask
from minigen.image import from_pil, preprocess_clip
from minigen.methods.ominicontrol import condition_group
from minigen.models.flux_tokens import TokenGroup
from minigen.models.ip_adapter import IPAdapter, reference_tokens
from minigen.text.spans import checked_span, same_for_every_encoder, token_span

SD15_CONCEPT_LAYER = "up.1.0.0"  # the official code's up_blocks.1.attentions.0.transformer_blocks.0 (toy-sd has it too)
SDXL_CONCEPT_LAYER = "up.0.1.3"  # up_blocks.0.attentions.1.transformer_blocks.3 (the paper also names 0.1.5)
CONDITION_SIZE = 512  # the side OminiControl's subject LoRA was trained at; references are resized to it
# (a model whose own default side is smaller, toy-flux at 64, takes references at that side)
BLOCKED = -1e7  # the official code's "cannot attend" (not -inf: a row with every key blocked stays finite)


def warmup_steps(steps: int, warmup: float) -> int:
    """How many of `steps` steps run in warmup: the official rule is step i warms up while i / steps < warmup."""
    return sum(1 for i in range(steps) if i / steps < warmup)


def reference_held_back(step: int, steps: int, warmup: float, end: float) -> bool:
    """Whether step i runs without the reference at full scale, by the official rule (the pipelines'
    control_guidance_start and _end): while i / steps < warmup, or once (i + 1) / steps > end."""
    if not 0 <= step < steps:  # past `steps` the end rule would hold the reference back for the rest of the run
        raise ValueError(f"Conceptrol was made for {steps} steps, but the sampler is at step {step}: give it steps= the generation's step count")
    return step < warmup_steps(steps, warmup) or (step + 1) / steps > end


def held_back_throughout(steps: int, warmup: float, end: float) -> bool:
    """Whether every one of `steps` steps holds the reference back (`reference_held_back`), so that its
    full scale applies nowhere."""
    return steps >= 1 and all(reference_held_back(i, steps, warmup, end) for i in range(steps))


def cond_rows(mask: Tensor, site: Site) -> Tensor:
    """Each row's mask taken from its conditional row (under CFG the unconditional rows take their pair's)."""
    return mask if site.layout is None else mask[site.layout.cond_rows()]


# ================================================================ SD / SDXL: gating the IP-Adapter


@dataclass(eq=False)
class SDConcept:
    """One (reference, concept) pair: the concept's token positions in the prompt and the IP tokens of
    its reference: with `uncond_tokens` (the empty image's, `reference_tokens`) the conditional rows', and
    the generation's batch layout places each (as `ExtraTokens(uncond=)`); without, every row's, stacked
    like the batch ([uncond rows | cond rows] under CFG)."""

    span: Sequence[int]
    ip_tokens: Tensor  # [B or 1, T, C]
    uncond_tokens: Tensor | None = None  # [B or 1, T, C]

    def __post_init__(self):
        self.span = checked_span(self.span, "SDConcept.span")


@dataclass(eq=False)
class ConceptrolSD:
    """Conceptrol on an SD/SDXL UNet with an IP-Adapter.

    projections: the adapter's per-layer (to_k_ip, to_v_ip), keyed by cross-attention layer id;
    concepts: the (span, IP tokens) pairs; steps: the steps the sampler runs (for warmup and end; from
    an image at `strength`, those left after the cut: see the module docstring);
    concept_layer: the attention block whose text attention gives the mask, a layer id of
    `UNet.attention_layers()` (`default_concept_layer(unet)`: the official one for SD1.5 or SDXL).
    `conceptrol=False` gives the plain IP-Adapter (ungated, with the same warmup). Neither it nor
    `global_masking=False` (every layer gated by its own text attention) has a concept layer.
    """

    projections: dict
    concepts: Sequence[SDConcept]
    steps: int
    concept_layer: str | None = None
    scale: float = 1.0
    warmup: float = 0.2
    end: float = 1.0  # the official control_guidance_end: steps past it run the IP branch at 0 too
    global_masking: bool = True
    conceptrol: bool = True

    def __post_init__(self):
        if not 0 <= self.warmup < self.end:
            raise ValueError(f"warmup {self.warmup} and end {self.end}: the IP branch runs only from warmup to end, so give "
                             "0 <= warmup < end (the official defaults: warmup 0.2, end 1)")
        if held_back_throughout(self.steps, self.warmup, self.end):
            raise ValueError(f"warmup {self.warmup} and end {self.end} of {self.steps} steps leave no step to the IP branch, so the "
                             "reference would change nothing: lower warmup (or raise end), or take more steps")
        if self.conceptrol and any(len(c.span) == 0 for c in self.concepts):
            raise ValueError("an SDConcept has no token span, so Conceptrol has no concept to mask by: give each reference "
                             "its concept phrase, or pass conceptrol=False for the plain IP-Adapter")
        if self.conceptrol and self.global_masking and self.concept_layer is None:
            raise ValueError(f"ConceptrolSD needs concept_layer=: default_concept_layer(unet) gives the official one "
                             f"({SD15_CONCEPT_LAYER!r} on SD1.5, {SDXL_CONCEPT_LAYER!r} on SDXL)")
        if self.concept_layer is not None and not self.conceptrol:
            raise ValueError("concept_layer is where Conceptrol reads its mask; conceptrol=False (the plain IP-Adapter) reads none: drop one of them")
        if self.concept_layer is not None and not self.global_masking:
            raise ValueError("concept_layer is where global masking reads the mask every layer shares; global_masking=False gates each layer "
                             "by its own text attention and reads none: drop one of them")
        if self.concept_layer is not None and self.concept_layer not in self.projections:
            raise ValueError(f"concept_layer {self.concept_layer!r} is not a cross-attention layer of this adapter; choose one of {list(self.projections)}")
        widths = {getattr(module, "in_features", None) for pair in self.projections.values() for module in pair} - {None}
        for i, concept in enumerate(self.concepts):
            for name in ("ip_tokens", "uncond_tokens"):
                tokens = getattr(concept, name)
                if tokens is not None and tokens.dim() != 3:
                    fix = "add its batch dimension (tokens[None])" if tokens.dim() == 2 else "give the tokens reference_tokens returns"
                    raise ValueError(f"SDConcept {i}'s {name} must be [B or 1, T, C], got shape {list(tokens.shape)}: {fix}")
                if tokens is not None and widths and widths != {tokens.shape[-1]}:
                    raise ValueError(f"SDConcept {i}'s {name} are {tokens.shape[-1]} wide, but the adapter's projections read {sorted(widths)}: "
                                     "give the tokens of this IP-Adapter's image encoder (reference_tokens)")
        self.global_masks: list[Tensor | None] = [None] * len(self.concepts)  # each concept layer's, kept across steps
        self.local_masks: list[Tensor | None] = [None] * len(self.concepts)  # the layer now running's

    def controls(self, step: int) -> Controls:
        """The controls of sampling step `step`; generate calls it at each step: `generate(controls=method.controls)`. The IP
        branch at its scale (0 while held back), gated by the concept masks unless conceptrol=False."""
        scale = 0.0 if reference_held_back(step, self.steps, self.warmup, self.end) else self.scale
        if step == 0:  # a new generation: no mask from the last one (the official pipelines clear theirs in __call__)
            self.global_masks = [None] * len(self.concepts)
            self.local_masks = [None] * len(self.concepts)
        if not self.conceptrol:
            tokens = [ExtraTokens(c.ip_tokens, self.projections, scale, uncond=c.uncond_tokens) for c in self.concepts]
            return Controls(extra_tokens=tokens, steps=self.steps)
        # the concept layer always; every layer where a layer's own mask is used (step 0, or no global masking)
        layers = None if step == 0 or not self.global_masking else {self.concept_layer}
        records, tokens = [], []
        for i, concept in enumerate(self.concepts):
            span = torch.as_tensor(concept.span)
            records.append(RecordAttention(layers=layers, kind="cross", tokens=span, sink=self._keeper(i)))
            tokens.append(ExtraTokens(concept.ip_tokens, self.projections, scale, gate=self._gate(i), uncond=concept.uncond_tokens))
        return Controls(record=records, extra_tokens=tokens if scale else [], steps=self.steps)

    def _keeper(self, i: int):
        def keep(site: Site, probs: Tensor) -> None:  # after the text softmax: [B, 1, N, |span|], heads averaged
            mask = cond_rows(probs.mean(-1), site)  # [B, 1, N]
            mask = mask / (mask.amax(-1, keepdim=True) + 1e-6)
            self.local_masks[i] = mask.unflatten(-1, site.grid)  # [B, 1, h, w]
            if site.layer == self.concept_layer:
                self.global_masks[i] = self.local_masks[i]

        return keep

    def _gate(self, i: int):
        def gate(site: Site) -> Tensor:
            if self.global_masking and self.global_masks[i] is not None and site.layer != self.concept_layer:
                return resize_mask(self.global_masks[i], site.grid, "nearest")
            if self.local_masks[i] is None:
                raise ValueError(f"Conceptrol has no mask at {site.layer!r}: its text attention was not recorded")
            return self.local_masks[i]

        return gate

    def masks(self) -> list[Tensor | None]:
        """Each concept's latest concept-layer mask [B, 1, h, w] (for --save-masks)."""
        return list(self.global_masks)


# ================================================================ FLUX: biasing the condition tokens


@dataclass(eq=False)
class FluxConcept:
    """One (reference, concept) pair: the concept's token positions in the T5 prompt and the name of
    the reference's condition token group (a TokenGroup passed to the pipeline's `extra=`)."""

    span: Sequence[int]
    group: str = "cond"

    def __post_init__(self):
        self.span = checked_span(self.span, "FluxConcept.span")


@dataclass(eq=False)
class ConceptrolFlux:
    """Conceptrol on FLUX with OminiControl condition groups.

    layers: the transformer's attention layers in call order (`Flux.attention_layers()`); steps: the
    steps the sampler runs (for warmup and end; from an image at `strength`, those left after the cut). `mode="ominicontrol"` gives the plain OminiControl bias B(λ) (every
    text and image row sees the condition at log λ, the condition sees them at log λ), for comparison.
    """

    layers: Sequence[str]
    concepts: Sequence[FluxConcept]
    steps: int
    condition_scale: float = 1.0
    warmup: float = 0.0
    end: float = 1.0  # the official control_guidance_end: steps past it run at warmup_scale too
    warmup_scale: float = 0.5
    extraction: str = "code"  # "code": every period-th block call, as the official code; "paper": one block
    period: int | None = None  # "code"'s; default the double blocks' count (the official NUM_BLOCKS = 19, FLUX.1's)
    phase: int | None = None  # "code"'s call within each period that extracts (official CONCEPT_BLOCK_IDX); default period - 1
    concept_block: str | None = None  # "paper" extraction's block; default the last double block
    mode: str = "conceptrol"  # or "ominicontrol"
    calls_before: int = field(default=0, repr=False)  # block calls of earlier forwards (the official counter)

    def __post_init__(self):
        if self.extraction not in ("code", "paper"):
            raise ValueError(f"extraction must be 'code' or 'paper', got {self.extraction!r}")
        if self.mode not in ("conceptrol", "ominicontrol"):
            raise ValueError(f"mode must be 'conceptrol' or 'ominicontrol', got {self.mode!r}")
        if not (self.condition_scale > 0 and self.warmup_scale > 0):
            raise ValueError(f"condition_scale and warmup_scale enter the attention as their logs, so both must be > 0; "
                             f"got {self.condition_scale} and {self.warmup_scale} (leave the condition group out to draw without it)")
        if self.mode == "conceptrol" and any(len(c.span) == 0 for c in self.concepts):
            raise ValueError("a FluxConcept has no token span, so Conceptrol has no concept to mask by: give each reference "
                             "its concept phrase, or use mode='ominicontrol' for the plain adapter")
        depth = sum(1 for layer in self.layers if layer.startswith("double_blocks."))
        if depth == 0:
            raise ValueError(f"layers holds no double blocks ('double_blocks.0', ...), got {list(self.layers)[:4]}: "
                             "pass transformer.attention_layers(), the FLUX transformer's blocks in call order")
        if (self.period is not None or self.phase is not None) and (self.extraction == "paper" or self.mode == "ominicontrol"):
            raise ValueError("period and phase count block calls between extractions under extraction='code' in mode 'conceptrol'; "
                             "'paper' extracts at concept_block, and mode 'ominicontrol' extracts nothing")
        if self.concept_block is not None and (self.extraction == "code" or self.mode == "ominicontrol"):
            raise ValueError("concept_block is where extraction='paper' reads the mask in mode 'conceptrol'; 'code' extracts every "
                             "period-th block call (period, phase), and mode 'ominicontrol' extracts nothing: drop concept_block")
        if self.concept_block is not None and self.concept_block not in self.layers:
            raise ValueError(f"concept_block {self.concept_block!r} is not one of the transformer's blocks; choose one of layers, "
                             f"e.g. {self.layers[0]!r}")
        if self.period is not None and self.period < 1:
            raise ValueError(f"period must be a positive number of block calls, got {self.period}")
        period = self.period or depth
        phase = period - 1 if self.phase is None else self.phase
        if not 0 <= phase < period:
            raise ValueError(f"phase is the block call within each period that extracts, so 0 <= phase < period = {period}; got {phase}")
        # the fields stay as given (dataclasses.replace builds anew from them); what they resolve to:
        self.extraction_calls = (period, phase)  # "code": block call c extracts when c % period == phase
        self.extraction_block = self.concept_block or f"double_blocks.{depth - 1}"  # "paper"
        self.log_masks: list[Tensor | None] = [None] * len(self.concepts)  # [B, N_image] each, kept across calls and steps

    def controls(self, step: int) -> Controls:
        """The controls of sampling step `step`; generate calls it at each step: `generate(controls=method.controls, extra=groups)`.
        The condition bias at log λ (warmup_scale while held back), plus the mask's extraction in mode 'conceptrol'."""
        warm = reference_held_back(step, self.steps, self.warmup, self.end)
        self.log_lambda = math.log(self.warmup_scale if warm else self.condition_scale)
        controls = Controls(bias=[AttentionBias(self.bias, kind="joint")], after_forward=[self.count_calls], steps=self.steps)
        if self.mode == "ominicontrol":
            return controls
        blocks = self.extract_at()  # none in a forward that holds no period-th call (a period longer than the model)
        records = [RecordAttention(kind="joint", layers=blocks, queries="img", tokens="txt", mean_heads=False, sink=self.extract)] if blocks else []
        return replace(controls, record=records)

    def extract_at(self) -> list[str]:
        """The blocks that extract the mask in the coming forward: "code" counts block calls across
        forwards (call c extracts when c % period == phase), "paper" is the concept block."""
        if self.extraction == "paper":
            return [self.extraction_block]
        period, phase = self.extraction_calls
        return [layer for i, layer in enumerate(self.layers) if (self.calls_before + i) % period == phase]

    def count_calls(self, site: Site) -> None:  # after each forward: every block counts, as in the official code
        self.calls_before += len(self.layers)  # (not site.call: a step cache's call runs the first block only)

    def extract(self, site: Site, to_text: Tensor) -> None:  # after the softmax: image queries -> text keys [B, H, N, T]
        for i, concept in enumerate(self.concepts):
            share = to_text[..., concept.span] / to_text.sum(-1, keepdim=True)  # of the text attention
            mask = cond_rows(share.mean(dim=(1, 3)), site)  # heads and concept tokens: [B, N]
            self.log_masks[i] = (mask / mask.mean(-1, keepdim=True)).log()

    def bias(self, site: Site) -> dict:
        """The bias by token group for this block call."""
        lam, text = self.log_lambda, site.groups["txt"].stop
        image_tokens = site.groups["img"].stop - site.groups["img"].start
        blocks = {}
        for i, (concept, log_mask) in enumerate(zip(self.concepts, self.log_masks)):
            if log_mask is not None and site.layout is not None and tuple(log_mask.shape) != (site.layout.size, image_tokens):
                raise ValueError(f"this ConceptrolFlux holds a mask of {log_mask.shape[0]} rows x {log_mask.shape[1]} image tokens from an "
                                 f"earlier generation (it keeps its mask across generations, as the official object does), and this one "
                                 f"has {site.layout.size} x {image_tokens}: use a fresh ConceptrolFlux for another batch or size")
            g = concept.group
            if self.mode == "ominicontrol":
                blocks |= {("txt", g): lam, ("img", g): lam, (g, "txt"): lam, (g, "img"): lam}
                continue
            rows = torch.full((text, 1), BLOCKED)
            rows[checked_span(concept.span, f"FluxConcept {i}'s span", text)] = lam  # only the concept's own words see its reference
            image = lam if log_mask is None else lam + log_mask[:, None, :, None]
            blocks |= {("txt", g): rows, ("img", g): image, (g, "img"): lam}
            for other in self.concepts:  # references of different concepts do not see each other
                if other is not concept:
                    blocks[(g, other.group)] = BLOCKED
        return blocks

    def masks(self) -> list[Tensor | None]:
        """Each concept's latest mask Â [B, N_image] (mean 1), or None before the first extraction."""
        return [None if m is None else m.exp() for m in self.log_masks]


# ================================================================ from reference images and concept phrases


def default_concept_layer(unet) -> str:
    """The official concept layer of a UNet's layout: SDXL's (a UNet with SDXL's size and pooled-text
    embedding, `adm_in_channels`) or SD1.5's, which SD2.x and toy-sd share; else ask for one."""
    layer = SDXL_CONCEPT_LAYER if unet.config.adm_in_channels is not None else SD15_CONCEPT_LAYER
    layers = list(unet.attention_layers())
    if layer not in layers:
        raise ValueError(f"this UNet has no block {layer!r}, the official concept layer of its layout: pass concept_layer=, one of {layers}")
    return layer


def sd_concepts(
    pipe, adapter: IPAdapter, encoder, prompt: str, references: Sequence[tuple[Image.Image, str | None]], *, prompt_syntax: str = "plain",
    prompt_2: str | None = None,
) -> list[SDConcept]:
    """SDConcepts of (reference image, concept phrase) pairs for `prompt` on an SD pipeline: the phrase's
    token positions (CLIP, BOS at 0), and the reference's IP tokens with the empty image's for the
    unconditional rows of a CFG batch. A phrase that is not in the prompt raises, listing the prompt's
    words; a phrase None gives no span (for the adapter alone, `conceptrol=False`). `prompt_syntax` is the
    generation's: under "a1111" the phrase is plain words and its positions are those of the chunks'
    context (`token_span(..., syntax="a1111")`). On SDXL the phrase must sit at the same positions for both
    text encoders, the second reading `prompt_2` where the generation gives one (`same_for_every_encoder`)."""
    concepts = []
    for image, phrase in references:
        tokens, empty = reference_tokens(adapter, encoder, preprocess_clip(image, encoder.config.image_size))
        find = partial(token_span, phrase=phrase, syntax=prompt_syntax)  # (tokenizer, prompt) -> positions, for each encoder
        span = same_for_every_encoder(pipe.tokenizers, prompt, prompt_2, find, f"the phrase {phrase!r}") if phrase is not None else []
        concepts.append(SDConcept(span, tokens, empty))
    return concepts


def flux_concepts(
    pipe, lora, prompt: str, references: Sequence[tuple[Image.Image, str | None]], *, width: int, generator: torch.Generator | None = None
) -> tuple[list[TokenGroup], list[FluxConcept]]:
    """Condition token groups (OminiControl, `lora` on each) and FluxConcepts of (reference image,
    concept phrase) pairs for `prompt` on a FLUX pipeline drawing images `width` pixels wide.

    As the official pipeline: each reference is resized by PIL (bicubic, no crop) to CONDITION_SIZE,
    or to the model's default side where that is smaller, and its position ids sit right of the
    image, one image width from column 0 (`width // pipe.patch` tokens: `width // 16` on FLUX.1).
    One reference is the group "cond"; several are "cond0", "cond1", ..., each one reference width
    right of the one before. generator: sample the autoencoder's posterior (the official code draws
    it right after the initial noise, from the same seeded stream); None takes its mean."""
    groups, concepts = [], []
    size = min(CONDITION_SIZE, pipe.default_size)
    columns = width // pipe.patch  # the image's width in tokens (pipe.patch: the autoencoder's factor times the 2x2 patches)
    step = size // pipe.patch  # a reference's width in tokens (32 at 512 px)
    for i, (image, phrase) in enumerate(references):
        name = "cond" if len(references) == 1 else f"cond{i}"
        pixels = from_pil(image.convert("RGB").resize((size, size), Image.BICUBIC))  # rounded to 8 bits, as the official pipeline's
        groups.append(condition_group(pipe.vae, pixels, lora=lora, size=None, name=name, position_delta=(0, columns + i * step), generator=generator))
        span = token_span(pipe.t5_tokenizer, prompt, phrase, max_length=pipe.max_length) if phrase is not None else []
        concepts.append(FluxConcept(span, name))
    return groups, concepts
