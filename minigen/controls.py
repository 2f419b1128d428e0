"""Controls: everything a personalization method does to a denoiser call, as one explicit argument.

A `Controls` object is passed to `UNet.forward(..., controls=...)` (or `Flux.forward`) and travels
down to every attention layer and every Linear/Conv layer. Nothing is patched, hooked or stored globally: a method
builds a `Controls` for a call, and the blocks apply it at named sites.

Attention layers are addressed by a stable id in the papers' (diffusers') naming, for example
`"up.1.0.0"` = `up_blocks.1.attentions.0.transformer_blocks.0`, and a kind, `"self"` (attn1) or
`"cross"` (attn2). `UNet.attention_layers()` lists them. FLUX has one joint attention per block,
kind `"joint"`, with ids `"double_blocks.i"` / `"single_blocks.i"` (`Flux.attention_layers()`); there
(a), (b) and (f) apply, and extra token groups take the place of (c). Linear and Conv layers are
addressed by their module path, the checkpoint key without `.weight` (`"output_blocks.3.1.proj_out"`).

The seven controls, each a small dataclass:

    (a) RecordAttention  record attention probabilities of chosen layers, rows, queries and key columns
    (b) AttentionBias    add a bias (float) or keep-mask (bool) to the attention logits
    (c) ExtraTokens      decoupled attention to an extra key/value token group (IP-Adapter), gated
    (d) LowRank          a low-rank residual B·A on a named Linear/Conv, scoped per row and region
    (e) FuseRows         blend a layer's output across batch rows with masks (concept injection)
    (f) CaptureFeatures  keep q/k/v/out of chosen layers with autograd intact (layout guidance)
    (g) contexts         a cross-attention layer's own text context (P+, layer-wise tokens)

Spatial inputs (gates, regions, fusion masks) are given as image-like masks `[B or 1, 1, H, W]`
at any resolution whose aspect matches the latent; each layer resizes them to its own token grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Kind = Literal["self", "cross", "joint"]  # "joint": FLUX's attention over all token groups
SpatialMask = Tensor | Callable[[], Tensor]


@dataclass
class RecordAttention:
    """(a) Record softmax attention probabilities.

    For each selected layer, every call appends a tensor `[rows, heads, queries, cols]` (heads averaged to
    1 when `mean_heads`) to `maps[layer_id]`. Only the selected batch rows and key columns are kept;
    queries are processed in chunks, so the full `[B, heads, N, K]` matrix is never held at once.
    Rows, columns and queries may be given as index tensors on the model's device, which spares
    converting a list at every layer of every step.
    """

    layers: Collection[str] | None = None  # None: every layer of this kind
    kind: Kind = "cross"
    tokens: Sequence[int] | Tensor | None = None  # key columns to keep; None: all keys
    rows: Sequence[int] | Tensor | None = None  # batch rows to keep; None: all rows
    queries: Sequence[int] | Tensor | None = None  # query positions to keep; None: all queries
    mean_heads: bool = True
    maps: dict[str, list[Tensor]] = field(default_factory=dict)


@dataclass
class AttentionBias:
    """(b) Added to the attention logits of the selected layers before the softmax.

    A float tensor is an additive bias, a bool tensor a keep-mask (True = attend), broadcastable
    to `[B, heads, N, K]`. A callable receives the layer's token count N and returns such a tensor,
    so a bias can be built per resolution.
    """

    bias: Tensor | Callable[[int], Tensor]
    layers: Collection[str] | None = None
    kind: Kind = "cross"


@dataclass
class ExtraTokens:
    """(c) Decoupled cross-attention to an extra token group, added to the text attention.

        out = Attn(q, K_text, V_text) + scale * gate ⊙ Attn(q, to_k(tokens), to_v(tokens))

    `projections` maps each cross-attention layer id to its own (to_k, to_v) modules, and so also
    selects the layers (IP-Adapter has one pair per layer). The gate is a spatial mask (Conceptrol's
    concept mask) or None for no gating.
    """

    tokens: Tensor  # [B, M, C_tokens]
    projections: Mapping[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]]
    scale: float = 1.0
    gate: SpatialMask | None = None


@dataclass
class LowRank:
    """(d) A low-rank residual on one Linear or Conv2d layer: y = W·x + b + scale · up(down(x)).

    `down` is `[r, in]` (Linear) or `[r, in, kh, kw]` (Conv2d, applied with the layer's stride and
    padding); `up` is `[out, r]` or `[out, r, 1, 1]`. `rows` weights the residual per batch row
    (`[B]`), and `region` restricts it in space (a mask, or a callable evaluated when the layer
    runs, e.g. from attention recorded earlier in the same call).
    """

    target: str
    down: Tensor
    up: Tensor
    scale: float = 1.0
    rows: Tensor | None = None
    region: SpatialMask | None = None

    def weight(self) -> Tensor:
        """The dense ΔW this residual adds, shaped like the target's weight (for merging)."""
        up = self.up.flatten(1)
        if self.down.dim() == 2:
            return self.scale * up @ self.down
        return self.scale * torch.einsum("or,rikl->oikl", up, self.down)


@dataclass
class FuseRows:
    """(e) Blend a layer's output across batch rows: for each (row, mask) in order,

        out[target] <- mask ⊙ out[row] + (1 - mask) ⊙ out[target]

    applied after `to_out` of the selected attention layers (Concept Conductor's injection).
    """

    target: int
    sources: Sequence[tuple[int, Tensor]]  # (source row, mask [1, H, W] or [1, 1, H, W])
    layers: Collection[str] | None = None
    kind: Kind = "self"


@dataclass
class CaptureFeatures:
    """(f) Keep attention features of the selected layers, with autograd intact.

    Each call stores `features[layer_id][name]` for name in `what` ("q", "k", "v", "out"), as
    `[B, N, C]` tensors straight from the computation graph (not detached).
    """

    layers: Collection[str] | None = None
    kind: Kind = "self"
    what: Collection[str] = ("k",)
    features: dict[str, dict[str, Tensor]] = field(default_factory=dict)


@dataclass
class Controls:
    """All controls of one denoiser call; every field is a collection applied in the order given."""

    record: Sequence[RecordAttention] = ()
    bias: Sequence[AttentionBias] = ()
    extra_tokens: Sequence[ExtraTokens] = ()
    low_rank: Sequence[LowRank] = ()
    fuse: Sequence[FuseRows] = ()
    capture: Sequence[CaptureFeatures] = ()
    contexts: Mapping[str, Tensor] = field(default_factory=dict)  # (g) cross layer id -> [B, T, C]

    def __post_init__(self):
        self._low_rank_by_target: dict[str, list[LowRank]] = {}
        for delta in self.low_rank:
            self._low_rank_by_target.setdefault(delta.target, []).append(delta)

    def at(self, layer: str, kind: Kind) -> LayerControls | None:
        """The controls that apply to one attention layer, or None when none do (the fast path)."""

        def pick(entries):
            return [e for e in entries if e.kind == kind and (e.layers is None or layer in e.layers)]

        view = LayerControls(
            layer=layer,
            record=pick(self.record),
            bias=pick(self.bias),
            extra_tokens=[e for e in self.extra_tokens if kind == "cross" and layer in e.projections],
            fuse=pick(self.fuse),
            capture=pick(self.capture),
            context=self.contexts.get(layer) if kind == "cross" else None,
        )
        return view if view.active() else None

    def add_low_rank(self, target: str, x: Tensor, y: Tensor, layer: torch.nn.Module) -> Tensor:
        """y plus the residuals registered for `target`; `layer` supplies conv stride/padding."""
        for delta in self._low_rank_by_target.get(target, ()):
            if x.dim() == 4:  # Conv2d: [B, C, H, W]
                r = F.conv2d(x, delta.down, stride=layer.stride, padding=layer.padding)
                r = F.conv2d(r, delta.up.view(delta.up.shape[0], -1, 1, 1))
            else:  # Linear: [B, N, C] or [B, C]
                r = F.linear(F.linear(x, delta.down), delta.up.flatten(1))
            factor = delta.scale  # a number; with rows or a region, a small tensor broadcast over r
            if delta.rows is not None:
                factor = factor * delta.rows.to(r).view(-1, *([1] * (r.dim() - 1)))
            if delta.region is not None:
                factor = factor * _mask_like(delta.region, r)
            y = y + r * factor
        return y


@dataclass
class LayerControls:
    """The controls selected for one attention layer during one call."""

    layer: str
    record: list[RecordAttention]
    bias: list[AttentionBias]
    extra_tokens: list[ExtraTokens]
    fuse: list[FuseRows]
    capture: list[CaptureFeatures]
    context: Tensor | None

    def active(self) -> bool:
        return bool(self.record or self.bias or self.extra_tokens or self.fuse or self.capture) or (
            self.context is not None
        )

    def logit_bias(self, n_queries: int) -> Tensor | None:
        """Sum of the biases of this layer (bool keep-masks become 0 / -inf)."""
        total = None
        for entry in self.bias:
            b = entry.bias(n_queries) if callable(entry.bias) else entry.bias
            if b.dtype == torch.bool:
                b = torch.zeros(b.shape, device=b.device).masked_fill(~b, float("-inf"))
            total = b if total is None else total + b
        return total


# What a pipeline's `generate(controls=...)` takes: one Controls for every step, or a function
# (step index, sigma) -> Controls | None that builds them step by step.
ControlsArg = Controls | Callable[[int, float], Controls | None] | None


def controls_at_step(controls: ControlsArg, sigmas: Tensor, sigma: float) -> Controls | None:
    """The controls of the sampling step whose sigma (in the schedule `sigmas`) is nearest `sigma`."""
    if not callable(controls):
        return controls
    step = int((sigmas - sigma).abs().argmin())
    return controls(step, sigma)


def tokens_to_grid(mask: Tensor, n_tokens: int) -> tuple[int, int]:
    """The (h, w) token grid with `n_tokens` cells that a mask of size H×W was downsampled to.

    UNet levels halve with rounding up (stride-2 convs with padding 1), so h = ceil(H / 2^k).
    """
    height, width = mask.shape[-2:]
    for k in range(12):
        h, w = math.ceil(height / 2**k), math.ceil(width / 2**k)
        if h * w == n_tokens:
            return h, w
        if h * w < n_tokens:
            break
    raise ValueError(
        f"a spatial mask of size {height}x{width} does not match a layer with {n_tokens} tokens; "
        "give masks at the latent (or image) resolution of this call"
    )


def resize_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a `[B, 1, H, W]` (or `[1, H, W]`) mask to `size` with area averaging or bilinear."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    mode = "area" if mask.shape[-2] >= size[0] and mask.shape[-1] >= size[1] else "bilinear"
    return F.interpolate(mask.float(), size=size, mode=mode).to(mask.dtype)


def _mask_like(mask: SpatialMask, y: Tensor) -> Tensor:
    """A spatial mask broadcastable to a layer output `y` ([B, C, h, w] or [B, N, C])."""
    mask = mask() if callable(mask) else mask
    if y.dim() == 4:
        return resize_mask(mask, tuple(y.shape[-2:])).to(y)
    return tokens_mask(mask, y.shape[1]).to(y)


def tokens_mask(mask: Tensor, n_tokens: int) -> Tensor:
    """A spatial mask `[B, 1, H, W]` as per-token weights `[B, N, 1]` for a layer of N tokens."""
    if mask.dim() == 3 and mask.shape[-1] == 1:  # already [B, N, 1]
        return mask
    grid = tokens_to_grid(mask, n_tokens)
    return resize_mask(mask, grid).flatten(2).transpose(1, 2)
