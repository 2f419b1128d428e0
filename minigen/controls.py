"""Controls: everything a personalization method does to a denoiser call, as one explicit argument.

A `Controls` object is passed to `UNet.forward(..., controls=...)` (or `Flux.forward`) and travels
down to every attention layer and every Linear/Conv layer. Nothing is patched, hooked or stored
globally: a method builds a `Controls` for a call, and the blocks apply it at named sites.

Attention layers are addressed by an id in the papers' (diffusers') naming and a kind. The UNet's
transformer blocks are `"up.1.0.0"` = `up_blocks.1.attentions.0.transformer_blocks.0`, each with a
`"self"` (attn1) and a `"cross"` (attn2) layer; FLUX has one `"joint"` attention per block,
`"double_blocks.i"` / `"single_blocks.i"`. `model.attention_sites()` lists them. Linear and Conv
layers are addressed by their module path, the checkpoint key without `.weight`
(`"output_blocks.3.1.proj_out"`, `"double_blocks.0.img_attn.qkv"`).

The controls, each a small dataclass, applied in this order inside an attention layer:

    (g) contexts         a cross-attention layer's own text context (P+, layer-wise tokens)     UNet
    (e) FuseRows "x"     blend the layer's input across batch rows with masks (the query reads it) UNet
        ... q, k, v projected (LowRank applies to every Linear/Conv as it runs) ...
    (e) FuseRows "q"     the same on the query                                                  UNet
    (b) AttentionBias    add a bias (float) or keep-mask (bool) to the logits; on FLUX per token group
    (a) RecordAttention  keep (or hand to a function) the softmax probabilities of chosen rows/columns,
                         with autograd intact
    (c) ExtraTokens      decoupled attention to an extra token group (IP-Adapter), gated     UNet
        ... output projection (to_out; on FLUX the groups' projections follow the fusion) ...
    (e) FuseRows "out"   blend the layer's image-token output across batch rows with masks (injection)
    (f) CaptureFeatures  keep x/q/k/v/out of chosen layers with autograd intact
    (h) stop_after       end the forward after this layer: the model returns None      UNet
    (d) LowRank          a low-rank residual B·A on a named Linear/Conv (or a slice of its outputs),
                         scoped per row and region

Within a forward, attention layers run in the order `model.attention_sites()` lists them (UNet:
down, mid, up; self before cross in each block; FLUX: double blocks, then single blocks).

Callables (a bias, a gate, a region, a record's sink) receive a `Site`: the layer, its kind, the
sampling step (and the run's number of steps), the index of this attention call in the forward, the token grid, the batch layout
(which rows are conditional), FLUX's token groups, and what this layer recorded in this call. A
stateful method keeps its state in its own object and passes bound methods as these callables:
they are called at the sites above in execution order, and `after_forward` at the end.

Every control is checked against the model on first use (`check`): an unknown layer id, module
path or kind is a `ValueError` naming the closest valid ones, never a control that does nothing.

Spatial masks (gates, regions, fusion masks) are image-like `[B or 1, 1, H, W]` at any resolution;
each layer resizes them to its token grid (`resize`: "bilinear" (antialiased), "area" or
"nearest"). A mask already in the per-token form `[B or 1, N, 1]` is used as is (N = h·w).
"""

from __future__ import annotations

import difflib
import numbers
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigen.attention import BiasRows, attention, attention_with_probs

Kind = Literal["self", "cross", "joint"]  # "joint": FLUX's attention over all token groups
Resize = Literal["bilinear", "area", "nearest"]
GroupBias = Mapping[tuple[str, str], "float | Tensor"]  # (query group, key group) -> bias block


@dataclass(frozen=True)
class BatchLayout:
    """What each row of a denoiser batch is: rows conditioned on the prompt, and under
    classifier-free guidance the unconditional rows, `uncond[j]` pairing with `cond[j]`.
    minigen's CFG stacks [uncond rows | cond rows] (`BatchLayout.cfg`)."""

    cond: tuple[int, ...]
    uncond: tuple[int, ...] = ()

    @classmethod
    def cfg(cls, n: int) -> BatchLayout:
        return cls(cond=tuple(range(n, 2 * n)), uncond=tuple(range(n)))

    @classmethod
    def plain(cls, n: int) -> BatchLayout:
        return cls(cond=tuple(range(n)))

    @property
    def size(self) -> int:
        return len(self.cond) + len(self.uncond)

    def cond_rows(self) -> list[int]:
        """For each row, the conditional row of its image (itself for a conditional row)."""
        rows = list(range(self.size))
        for u, c in zip(self.uncond, self.cond):
            rows[u] = c
        return rows


@dataclass
class Site:
    """Where a control's callable runs: given to bias, gate, region and sink functions."""

    layer: str  # attention layer id ("up.1.0.0", "double_blocks.18"), or a module path (LowRank region)
    kind: Kind | None  # None for a Linear/Conv layer
    call: int  # attention calls before this one in the current forward (0 = the first)
    step: int | None  # the sampling step, when the caller (a pipeline) gave it
    layout: BatchLayout | None  # the batch's rows, when the caller gave it
    grid: tuple[int, int] | None  # (h, w) of the image tokens at this layer
    groups: Mapping[str, slice] | None = None  # FLUX: where each token group lies in the joint sequence
    steps: int | None = None  # the sampling run's number of steps, when the caller gave it
    recorded: dict[int, Tensor] = field(default_factory=dict)  # id(record) -> probabilities of this call

    def probs(self, record: RecordAttention) -> Tensor:
        """What `record` kept at this layer in this call (after the softmax, before the extra tokens)."""
        if id(record) not in self.recorded:
            if record.kind == self.kind and (record.layers is None or self.layer in record.layers):
                raise ValueError(f"this RecordAttention has not recorded layer {self.layer!r} ({self.kind}) yet in this call: it keeps "
                                 "the softmax, which runs after the layer's biases; read it from a later callable (a gate, a sink) or layer")
            raise ValueError(f"this RecordAttention does not record layer {self.layer!r} ({self.kind}) in this call")
        return self.recorded[id(record)]


SpatialMask = Tensor | Callable[[Site], Tensor]


# ---------------------------------------------------------------- the controls


@dataclass(eq=False)
class RecordAttention:
    """(a) Record softmax attention probabilities.

    For each selected layer, every call appends a tensor `[rows, heads, queries, cols]` (heads averaged to
    1 when `mean_heads`) to `maps[layer_id]`, or, when `sink` is given, hands it to `sink(site, probs)`
    instead (nothing is kept). Only the selected batch rows, query positions and key columns are kept;
    queries go in chunks, so the full `[B, heads, N, K]` matrix is never held at once. Index tensors on
    the model's device spare converting a list at every layer of every step. On FLUX, `queries` and
    `tokens` may name a token group ("txt", "img", an extra group's name): its positions at each call.
    When every record of a layer keeps some queries, only their rows are written out; SDPA gives the output.
    """

    layers: Collection[str] | None = None  # None: every layer of this kind
    kind: Kind = "cross"
    tokens: Sequence[int] | Tensor | str | None = None  # key columns to keep; None: all keys
    rows: Sequence[int] | Tensor | None = None  # batch rows to keep; None: all rows
    queries: Sequence[int] | Tensor | str | None = None  # query positions to keep; None: all queries
    mean_heads: bool = True
    sink: Callable[[Site, Tensor], None] | None = None
    maps: dict[str, list[Tensor]] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("tokens", "rows", "queries"):
            index = getattr(self, name)
            if index is None or (isinstance(index, str) and name != "rows"):
                continue
            if isinstance(index, Tensor):
                fits = not index.is_floating_point() and index.dtype != torch.bool and index.dim() <= 1 and index.numel() > 0
            else:
                fits = isinstance(index, Sequence) and len(index) > 0 and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in index)
            if not fits:
                raise ValueError(f"RecordAttention: {name} takes positions, a non-empty list or 1-D integer tensor (None: all), got "
                                 f"{index!r:.60}" + ("; for a bool mask pass mask.nonzero().flatten()" if getattr(index, "dtype", None) == torch.bool else ""))

    def keep(self, site: Site, probs: Tensor) -> None:
        if self.sink is not None:
            self.sink(site, probs)
        else:
            self.maps.setdefault(site.layer, []).append(probs)


@dataclass(eq=False)
class AttentionBias:
    """(b) Added to the attention logits of the selected layers before the softmax.

    `bias` is one of
    - a tensor broadcastable to `[B, heads, N, K]`: a float bias, or a bool keep-mask (True = attend);
    - on FLUX, a mapping by token group, `{(query group, key group): value}` with groups "txt", "img"
      and the extra groups' names; a value is a number (0, log λ, -inf), a bool (a keep-mask: False
      blocks the block) or a tensor broadcastable to
      the `[B, heads, N_query_group, N_key_group]` block (float, or a bool keep-mask), e.g. `[N_q, 1]` per query or `[1, N_k]` per
      key. It is built a block of query rows at a time, so no L×L tensor exists at real sizes;
    - a function of the `Site` returning either (or None for no bias at this call).

    A query that attends to no key (every key blocked) is refused: at construction for a fixed tensor,
    at the call for a function's tensor or a sum of tensors (SDPA would give it zeros, the written-out
    softmax NaN). A bias by token group is not checked so (its blocks are built row by row as the
    attention runs): blocking a query group from every key group is the caller's to avoid.
    """

    bias: Tensor | GroupBias | Callable[[Site], Tensor | GroupBias | None]
    layers: Collection[str] | None = None
    kind: Kind = "cross"

    def __post_init__(self):
        if isinstance(self.bias, (int, float)):
            raise TypeError(f"AttentionBias: bias={self.bias!r} is a number; give a tensor (torch.tensor({self.bias!r}) adds it to "
                            "every logit) or, on FLUX, a mapping {(query group, key group): number}")
        if isinstance(self.bias, Tensor) and self.bias.dim() < 2:  # [K] or a scalar: the attention kernels want [..., N, K]
            self.bias = self.bias.reshape(*([1] * (2 - self.bias.dim())), *self.bias.shape)
        if isinstance(self.bias, Tensor) and not self.bias.is_meta:
            blocked = ~self.bias if self.bias.dtype == torch.bool else torch.isneginf(self.bias)
            if bool(blocked.all(-1).any()):  # softmax over no key: NaN written out, zeros from SDPA
                raise ValueError("AttentionBias: some query attends to no key (a keep-mask row all False, or a bias row all -inf); "
                                 "keep at least one key per query")


@dataclass(eq=False)
class ExtraTokens:
    """(c) Decoupled cross-attention to an extra token group, added to the text attention.

        out = Attn(q, K_text, V_text) + scale * gate ⊙ Attn(q, to_k(tokens), to_v(tokens))

    `projections` maps each cross-attention layer id to its own (to_k, to_v) modules, and so also
    selects the layers (IP-Adapter has one pair per layer). The gate is a spatial mask (Conceptrol's
    concept mask), a function of the `Site` returning one (or None: no gating at that call), or None
    for no gating.

    `tokens` are every row's, stacked like the batch; or, with `uncond` (IP-Adapter's tokens of an empty
    image), the conditional rows', and the call's batch layout places each: the unconditional rows under
    classifier-free guidance take `uncond`, and a call without guidance has no row that reads it.
    """

    tokens: Tensor  # [B or 1, M, C_tokens]: each row's, or with `uncond` each conditional row's
    projections: Mapping[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]]
    scale: float = 1.0
    gate: SpatialMask | None = None
    resize: Resize = "bilinear"
    uncond: Tensor | None = None  # [B or 1, M, C_tokens]: each unconditional row's

    def __post_init__(self):
        if self.uncond is None:
            return
        if (self.uncond.shape[1:], self.uncond.dtype, self.uncond.device) != (self.tokens.shape[1:], self.tokens.dtype, self.tokens.device):
            raise ValueError(f"ExtraTokens: uncond {list(self.uncond.shape)} {self.uncond.dtype} on {self.uncond.device} must have the "
                             f"tokens' shape {list(self.tokens.shape)} but for its rows, their dtype {self.tokens.dtype} and device "
                             f"{self.tokens.device} (the same adapter's tokens of the empty image)")

    def rows(self, site: Site, batch: int) -> Tensor:
        """The tokens of each of the `batch` rows at this call, [batch, M, C_tokens]."""
        if self.uncond is None:
            if self.tokens.shape[0] not in (1, batch):
                raise ValueError(f"ExtraTokens at {site.layer!r}: its tokens have {self.tokens.shape[0]} rows for a batch of {batch}; "
                                 f"give 1 row (shared by every row) or {batch} (under CFG the unconditional rows first), or pass uncond=")
            return self.tokens.expand(batch, -1, -1)
        if site.layout is None:
            raise ValueError("ExtraTokens(uncond=) places its tokens by the batch layout, which this call was not given: call the "
                             "model with controls.at_step(step, layout) (pipelines do)")
        if site.layout.size != batch:  # a model checks it at begin; a layer called alone, here
            raise ValueError(f"ExtraTokens(uncond=) places its tokens by the batch layout {site.layout} ({site.layout.size} rows), "
                             f"and this call's batch has {batch}: give the call's layout")
        by_row: list[Tensor | None] = [None] * batch
        placed = (("tokens", self.tokens, site.layout.cond, "conditional"), ("uncond", self.uncond, site.layout.uncond, "unconditional"))
        for name, tokens, rows, kind in placed:
            if rows and tokens.shape[0] not in (1, len(rows)):
                raise ValueError(f"ExtraTokens at {site.layer!r}: {name} has {tokens.shape[0]} rows for the batch's {len(rows)} {kind} "
                                 f"rows; give 1 row (shared by all of them) or {len(rows)}")
            for j, row in enumerate(rows):
                by_row[row] = tokens[j if tokens.shape[0] > 1 else 0]
        return torch.stack(by_row)


@dataclass(eq=False)
class LowRank:
    """(d) A low-rank residual on one Linear or Conv2d layer: y = W·x + b + scale · up(down(x)).

    `down` is `[r, in]` (Linear) or `[r, in, kh, kw]` (Conv2d, applied with the layer's stride and
    padding); `up` is `[out, r]` or `[out, r, 1, 1]`. `outputs = (start, stop)` adds the residual to
    that slice of the output features only (a LoRA on `to_q` inside FLUX's fused `qkv`), and `up` then
    has stop - start rows. `rows` weights the residual per batch row (`[B]`), and `region` restricts it
    in space (UNet layers: a mask, or a function of the `Site` evaluated when the layer runs).
    """

    target: str
    down: Tensor
    up: Tensor
    scale: float = 1.0
    rows: Tensor | None = None
    region: SpatialMask | None = None
    outputs: tuple[int, int] | None = None
    resize: Resize = "bilinear"

    def weight(self, out_features: int | None = None) -> Tensor:
        """The dense ΔW this residual adds, shaped like the target's weight (for merging); a residual
        on an output slice needs the layer's `out_features` and is zero outside the slice."""
        up = self.up.flatten(1)
        delta = self.scale * (up @ self.down if self.down.dim() == 2 else torch.einsum("or,rikl->oikl", up, self.down))
        if self.outputs is None:
            return delta
        if out_features is None:
            raise ValueError(f"the LowRank on {self.target!r} covers outputs {self.outputs}: pass the layer's out_features")
        full = delta.new_zeros(out_features, *delta.shape[1:])
        full[self.outputs[0] : self.outputs[1]] = delta
        return full


@dataclass(eq=False)
class FuseRows:
    """(e) Blend a layer's image tokens across batch rows: for each (row, mask) in order,

        h[target] <- mask ⊙ h[row] + (1 - mask) ⊙ h[target]

    where h is the layer's `feature`. UNet: "out" the output after `to_out` (Concept Conductor's
    injection), "q" the query after `to_q`, "x" the attention's input, which only the query then reads
    (keys and values read the unblended input, as the official Concept Conductor merges "feature_input").
    FLUX (kind "joint"): "out" only, the image tokens of the joint attention's output, before the output
    projection.
    """

    target: int
    sources: Sequence[tuple[int, Tensor]]  # (source row, mask [1, H, W], [1, 1, H, W] or per token [1, N, 1])
    layers: Collection[str] | None = None
    kind: Kind = "self"
    resize: Resize = "bilinear"
    feature: Literal["x", "q", "out"] = "out"

    def __post_init__(self):
        if not self.sources:
            raise ValueError(f"FuseRows into row {self.target}: no (row, mask) sources, so it would blend nothing; give at least one")


@dataclass(eq=False)
class CaptureFeatures:
    """(f) Keep attention features of the selected layers, with autograd intact.

    Each call stores `features[layer_id][name]` for name in `what` ("q", "k", "v", "out"; on the UNet
    also "x", the attention's input), as `[B, N, C]` tensors straight from the computation graph (not
    detached). With FuseRows at the same layer, "x" is the input before any fusion, "q" and "out" the
    values after the fusions at their sites.
    """

    layers: Collection[str] | None = None
    kind: Kind = "self"
    what: Collection[str] = ("k",)
    features: dict[str, dict[str, Tensor]] = field(default_factory=dict)


@dataclass
class _Forward:
    """The state of one forward pass: what the model gave `begin`, and the attention calls so far."""

    calls: int = 0
    stopped: bool = False  # the `stop_after` layer has run
    grid: tuple[int, int] | None = None
    groups: Mapping[str, slice] | None = None


@dataclass(eq=False)
class Controls:
    """All controls of one denoiser call; every field is a collection applied in the order given.

    A Controls is checked against a model and sorted by layer at its first use, and reads its
    controls' layer choices from then on as they were. Its lists are kept as tuples and its fields are
    not set again: to change what applies where, build a new one (`dataclasses.replace`; steps that
    differ: pass `generate` a function of the step returning each step's Controls). An entry listed
    twice is refused (it would apply twice).

    `step` and `layout` say which sampling step this call is and what its batch rows are; pipelines
    set them (`at_step`), and callables read them from their `Site`. `steps` is the number of steps of
    the sampling run. Controls made for one layout or run length (a method whose warmup counts the
    run's steps) say so in `layout` or `steps`, and a pipeline whose call differs refuses them.

    `stop_after` ends the forward once that attention layer has run (its captures and records kept):
    the model skips every later block and returns None. A loss on an early layer's features (Concept
    Conductor's layout alignment) then costs the network up to that layer, forward and backward.
    """

    record: Sequence[RecordAttention] = ()
    bias: Sequence[AttentionBias] = ()
    extra_tokens: Sequence[ExtraTokens] = ()
    low_rank: Sequence[LowRank] = ()
    fuse: Sequence[FuseRows] = ()
    capture: Sequence[CaptureFeatures] = ()
    contexts: Mapping[str, Tensor] = field(default_factory=dict)  # (g) cross layer id -> [B, T, C], rows as the batch's
    stop_after: tuple[str, Kind] | None = None  # (h) (layer id, kind): skip everything after it
    after_forward: Sequence[Callable[[Site], None]] = ()
    step: int | None = None
    layout: BatchLayout | None = None
    steps: int | None = None

    def __post_init__(self):
        kinds = {"record": RecordAttention, "bias": AttentionBias, "extra_tokens": ExtraTokens, "low_rank": LowRank,
                 "fuse": FuseRows, "capture": CaptureFeatures}  # fmt: skip
        for name, kind in kinds.items():
            entries = getattr(self, name)
            if not isinstance(entries, (list, tuple)) or not all(isinstance(entry, kind) for entry in entries):
                hint = f"; write {name}=[...] for one" if isinstance(entries, kind) else ""
                raise TypeError(f"Controls: {name} takes a list of {kind.__name__}, got {type(entries).__name__} {entries!r:.80}{hint}")
            if len({id(entry) for entry in entries}) < len(entries):
                raise ValueError(f"Controls: the same {kind.__name__} is in {name} twice (given to two parts of combine, or to "
                                 "controls.low_rank and a token group's lora), so it would apply twice; give it once")
            setattr(self, name, tuple(entries))  # as given: an entry appended later would go unchecked
        if not isinstance(self.contexts, Mapping):
            raise TypeError(f"Controls: contexts takes a mapping {{cross layer id: [B, T, C] tensor}}, got {type(self.contexts).__name__}")
        self.contexts = ReadOnlyDict(self.contexts)  # a copy: a layer added later would go unchecked
        self.after_forward = tuple(self.after_forward)
        if self.stop_after is not None:  # given as a list, it must still compare equal to (layer, kind)
            self.stop_after = tuple(self.stop_after)
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) or self.steps < 0):
            raise ValueError(f"Controls: steps is the number of sampling steps the controls were made for, a whole number; got {self.steps!r}")
        self._low_rank_by_target: dict[str, list[LowRank]] = {}
        for delta in self.low_rank:
            self._low_rank_by_target.setdefault(delta.target, []).append(delta)
        self._checked: weakref.WeakSet = weakref.WeakSet()  # models these controls were checked against
        self._views: dict[tuple[str, str], LayerControls | None] = {}
        self._forward = _Forward()

    def __setattr__(self, name: str, value) -> None:
        if name in CONTROLS_FIELDS and hasattr(self, "_forward"):  # after __post_init__: checked and sorted already
            raise AttributeError(f"Controls.{name} is set when the controls are built; build new ones: "
                                 f"dataclasses.replace(controls, {name}=...)")
        super().__setattr__(name, value)

    def at_step(self, step: int | None, layout: BatchLayout | None, steps: int | None = None) -> Controls:
        """These controls for one sampling step of a run of `steps` steps and a batch layout (what was
        checked stays checked). A layout or run length these controls were made for must be the call's."""
        if None not in (self.layout, layout) and self.layout != layout:
            raise ValueError(f"these controls were made for the batch layout {self.layout}, and this call's is {layout}: build them "
                             "for the call's batch (its size, and whether classifier-free guidance stacks unconditional rows)")
        if None not in (self.steps, steps) and self.steps != steps:
            raise ValueError(f"these controls were made for a run of {self.steps} sampling steps, and this run takes {steps}: build "
                             f"them with steps={steps}")
        return self._derive(step=step, layout=layout if self.layout is None else self.layout, steps=steps if self.steps is None else self.steps)

    def with_low_rank(self, extra: Sequence[LowRank]) -> Controls:
        """These controls with more residuals, sharing this forward's state (FLUX token groups)."""
        derived = self._derive(low_rank=(*self.low_rank, *extra))
        derived._forward = self._forward
        return derived

    def _derive(self, **changes) -> Controls:
        derived = replace(self, **changes)
        derived._checked, derived._views = self._checked, self._views
        return derived

    # ---- used by the models ------------------------------------------------------------------

    def begin(self, model: nn.Module, batch: int, *, grid: tuple[int, int] | None = None, groups: Mapping[str, slice] | None = None) -> None:
        """Start a forward of `model` on `batch` rows: check every control against it (once per model)
        and reset the per-forward state (the attention call counter)."""
        if self.layout is not None and self.layout.size != batch:
            raise ValueError(f"these controls say the batch layout {self.layout} ({self.layout.size} rows), and the model is called "
                             f"with {batch} rows: give the call's layout (BatchLayout.plain(n), or .cfg(n) for [uncond | cond])")
        if model not in self._checked:
            check(self, model)
            self._checked.add(model)
        self._forward = _Forward(grid=grid, groups=groups)

    @property
    def stopped(self) -> bool:
        """Whether this forward has passed its `stop_after` layer (the model then returns None)."""
        return self._forward.stopped

    def stop(self) -> None:
        """Called by the `stop_after` layer: the blocks after it are skipped."""
        self._forward.stopped = True

    def end(self) -> None:
        """The end of a forward (a stopped one too): the `after_forward` functions run, in order."""
        for finish in self.after_forward:
            finish(self._site("", None))

    def enter_grid(self, grid: tuple[int, int]) -> None:
        """The token grid of the UNet transformer that runs next (its layers' masks resize to it)."""
        self._forward.grid = grid

    def enter(self, layer: str, kind: Kind) -> Site:
        """The site of the attention layer that runs now, counted as the forward's next attention call
        (every attention layer enters, with or without controls of its own)."""
        site = self._site(layer, kind)
        self._forward.calls += 1
        return site

    def _site(self, layer: str, kind: Kind | None) -> Site:
        f = self._forward
        return Site(layer, kind, f.calls, self.step, self.layout, f.grid, f.groups, self.steps)

    def at(self, layer: str, kind: Kind) -> LayerControls | None:
        """The controls that apply to one attention layer, or None when none do (the fast path)."""
        key = (layer, kind)
        if key not in self._views:

            def pick(entries):
                return [e for e in entries if e.kind == kind and (e.layers is None or layer in e.layers)]

            view = LayerControls(
                layer=layer,
                kind=kind,
                record=pick(self.record),
                bias=pick(self.bias),
                extra_tokens=[e for e in self.extra_tokens if kind == "cross" and layer in e.projections],
                fuse=pick(self.fuse),
                capture=pick(self.capture),
                context=self.contexts.get(layer) if kind == "cross" else None,
                stop=self.stop_after == (layer, kind),
            )
            self._views[key] = view if view.active() else None
        return self._views[key]

    def add_low_rank(self, target: str, x: Tensor, y: Tensor, layer: nn.Module) -> Tensor:
        """y plus the residuals registered for `target`; `layer` supplies conv stride/padding."""
        for delta in self._low_rank_by_target.get(target, ()):
            down, up = delta.down.to(x), delta.up.to(x)  # fp32 factors on an fp16/bf16 model, CPU factors beside a GPU one
            if x.dim() == 4:  # Conv2d: [B, C, H, W]; a 1x1 conv's down may be given as [r, in]
                down = down if down.dim() == 4 else down[:, :, None, None]
                r = F.conv2d(x, down, stride=layer.stride, padding=layer.padding)
                r = F.conv2d(r, up.view(up.shape[0], -1, 1, 1))
            else:  # Linear: [B, N, C] or [B, C]
                r = F.linear(F.linear(x, down), up.flatten(1))
            factor = delta.scale  # a number; with rows or a region, a small tensor broadcast over r
            if delta.rows is not None:
                factor = factor * delta.rows.to(r).view(-1, *([1] * (r.dim() - 1)))
            if delta.region is not None:
                factor = factor * self._region(delta, r)
            if delta.outputs is None:
                y = y + r * factor
            else:  # the slice of the output features: channels of a conv ([B, C, H, W]), the last axis of a linear
                (start, stop), axis = delta.outputs, 1 if y.dim() == 4 else -1
                head, middle, tail = y.split([start, stop - start, y.shape[axis] - stop], dim=axis)
                y = torch.cat([head, middle + r * factor, tail], dim=axis)
        return y

    def _region(self, delta: LowRank, r: Tensor) -> Tensor:
        """The region of `delta` broadcastable to its residual r ([B, C, h, w] or [B, N, C])."""
        site = self._site(delta.target, None)
        if r.dim() == 4:
            site.grid = tuple(r.shape[-2:])
        elif r.dim() != 3 or site.grid is None:
            raise ValueError(f"the LowRank on {delta.target!r} has a region, but the layer has no token grid")
        mask = delta.region(site) if callable(delta.region) else delta.region
        mask = tokens_mask(mask, site.grid, delta.resize).to(r)  # [B, N, 1]
        return mask.transpose(1, 2).unflatten(2, site.grid) if r.dim() == 4 else mask


CONTROLS_FIELDS = frozenset(f.name for f in fields(Controls))


class ReadOnlyDict(Mapping):
    """A copy of a mapping that cannot be changed (Controls.contexts), yet copies and pickles as a dict does."""

    def __init__(self, items: Mapping = ()):
        self._items = dict(items)

    def __getitem__(self, key):
        return self._items[key]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return repr(self._items)

    def __reversed__(self):
        return reversed(self._items)

    def __or__(self, other: Mapping) -> dict:
        return self._items | dict(other)

    def __ror__(self, other: Mapping) -> dict:
        return dict(other) | self._items

    def copy(self) -> dict:
        """A dict of the same items, to change."""
        return dict(self._items)


@dataclass
class LayerControls:
    """The controls selected for one attention layer."""

    layer: str
    kind: Kind
    record: list[RecordAttention]
    bias: list[AttentionBias]
    extra_tokens: list[ExtraTokens]
    fuse: list[FuseRows]
    capture: list[CaptureFeatures]
    context: Tensor | None
    stop: bool = False  # (h) the forward ends after this layer

    def active(self) -> bool:
        return bool(self.record or self.bias or self.extra_tokens or self.fuse or self.capture or self.stop) or (
            self.context is not None
        )

    def attend(self, q: Tensor, k: Tensor, v: Tensor, site: Site) -> Tensor:
        """(b) and (a): this layer's attention with its biases, and its records kept from the same
        softmax. q: [B, heads, N, d], k and v: [B, heads, M, d] -> [B, N, heads·d]."""
        bias = self.logit_bias(site, q, k.shape[2])
        if not self.record:
            return attention(q, k, v, bias)
        records = [in_positions(record, site) for record in self.record]
        try:
            out, maps = attention_with_probs(q, k, v, records, bias=bias)
        except (IndexError, RuntimeError):  # checked only here: no cost (nor GPU sync) on the calls that work
            check_within_call(records, site, {"rows": q.shape[0], "queries": q.shape[2], "tokens": k.shape[2]})
            raise
        site.recorded.update((id(record), probs) for record, probs in zip(self.record, maps))
        for record, probs in zip(self.record, maps):
            record.keep(site, probs)
        return out

    def logit_bias(self, site: Site, q: Tensor, n_keys: int) -> Tensor | BiasRows | None:
        """The sum of this layer's biases at this call: a tensor, rows of a bias by token group, or None."""
        dense, by_group, from_function = None, [], []  # from_function: whether each summed tensor came from a function
        for entry in self.bias:
            value = entry.bias(site) if callable(entry.bias) else entry.bias
            if value is None:
                continue
            if isinstance(value, Mapping):
                if value:  # an empty mapping biases nothing: the layer keeps SDPA's path
                    by_group.append(value)
                continue
            if not isinstance(value, Tensor):
                raise TypeError(f"AttentionBias at {self.layer!r}: its function returned {type(value).__name__}; "
                                "return a tensor, a mapping by token group (FLUX) or None")
            self.check_shape(value, q, n_keys)
            if value.dtype == torch.bool:  # a keep-mask: 0 where True, -inf where False
                value = torch.zeros(value.shape, device=value.device).masked_fill(~value, float("-inf"))
            from_function.append(callable(entry.bias))
            dense = value if dense is None else dense + value
        # one fixed tensor was checked at construction; a function's tensor, or a sum, is checked here
        if dense is not None and from_function != [False] and bool(torch.isneginf(dense).all(-1).any()):
            raise ValueError(f"AttentionBias at {self.layer!r} ({self.kind}), step {site.step}: some query attends to no key "
                             "(every key blocked by the biases of this call); keep at least one key per query")
        dense = None if dense is None else dense.to(q)
        if not by_group:
            return dense
        if site.groups is None:
            raise ValueError(f"AttentionBias at {self.layer!r}: a bias by token group applies to FLUX's joint attention; give a tensor here")
        return group_bias_rows(by_group, site.groups, dense, q, n_keys)

    def check_shape(self, bias: Tensor, q: Tensor, n_keys: int) -> None:
        """A dense bias broadcasts to this call's logits [B, heads, N, K] (a wrong N was cut short)."""
        logits = (q.shape[0], q.shape[1], q.shape[2], n_keys)
        if not fits_logits(bias, logits):
            raise ValueError(f"AttentionBias at {self.layer!r} ({self.kind}): a bias of shape {list(bias.shape)} does not broadcast to this "
                             f"call's logits [B, heads, N, K] = {list(logits)} (N: the layer's queries, K: its keys; rows or heads need "
                             "all 4 axes, [B, 1, N, K]: a 3-D bias would broadcast its first axis over the heads); a function of the Site "
                             "can build it from site.grid")

    def own_context(self, x: Tensor, site: Site) -> Tensor:
        """(g) this layer's context in x's dtype, as the pipeline's own context, its rows checked against x's batch."""
        rows, batch = self.context.shape[0], x.shape[0]
        cfg = site.layout is not None and bool(site.layout.uncond)
        if rows != batch and (rows != 1 or cfg):
            why = ("; under classifier-free guidance the unconditional rows come first, and one row would give both halves "
                   "the same text and cancel the guidance") if cfg else ", or 1 shared by every row"
            raise ValueError(f"contexts at {self.layer!r}: {rows} rows for a batch of {batch}; give {batch} rows in the batch's order{why}")
        return self.context.to(x.dtype)

    def fused(self, h: Tensor, feature: str, site: Site) -> Tensor:
        """(e) h [B, N, C] after this layer's FuseRows of `feature` ("x", "q" or "out"), in order."""
        for fuse in self.fuse:
            if fuse.feature == feature:
                h = fuse_rows(h, fuse, site.grid)
        return h

    def keep_features(self, x: Tensor | None, q: Tensor, k: Tensor, v: Tensor, out: Tensor) -> None:
        """(f) the input x, q, k, v, out [B, N, C] (heads merged) into each CaptureFeatures of this layer
        (x None where the model has no single input to give: FLUX's joint attention)."""
        named = {"x": x, "q": q, "k": k, "v": v, "out": out}
        for capture in self.capture:
            capture.features[self.layer] = {name: named[name] for name in capture.what}


def in_positions(record: RecordAttention, site: Site) -> RecordAttention:
    """`record` with a token group named in its `queries` or `tokens` replaced by the group's positions here."""
    named = {key: getattr(record, key) for key in ("queries", "tokens") if isinstance(getattr(record, key), str)}
    if not named:
        return record
    if site.groups is None:
        raise ValueError(f"RecordAttention {named}: token groups exist in FLUX's joint attention only; give positions at {site.layer}")
    for key, name in named.items():
        if name not in site.groups:
            raise ValueError(f"RecordAttention {key}={name!r}: no such token group at {site.layer}; the groups are {list(site.groups)}")
    return replace(record, **{key: range(site.groups[name].start, site.groups[name].stop) for key, name in named.items()})


def check_within_call(records: Sequence[RecordAttention], site: Site, sizes: Mapping[str, int]) -> None:
    """Every record's rows, queries and tokens lie within this call's batch rows, queries and keys."""
    for record in records:
        for name, size in sizes.items():
            index = None if getattr(record, name) is None else torch.as_tensor(getattr(record, name)).reshape(-1)
            if index is None or index.numel() == 0:
                continue
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= size:
                rows = " (under CFG the batch is [uncond | cond], two rows per image)" if name == "rows" else ""
                raise ValueError(f"RecordAttention at {site.layer!r}: its {name} hold index {low if low < 0 else high}, but this call "
                                 f"has {size} {'batch rows' if name == 'rows' else name}{rows}; give {name} within 0..{size - 1}")


def group_bias_rows(
    biases: Sequence[GroupBias], groups: Mapping[str, slice], dense: Tensor | None, q: Tensor, n_keys: int
) -> BiasRows:
    """Biases by (query group, key group), plus an optional dense one, as a function of query rows.

    Each `rows(start, stop)` call assembles only the [B or 1, heads or 1, stop - start, L] block it is
    asked for, so memory follows the block, not the joint sequence L.
    """
    blocks = []  # (query slice, key slice, value)
    for spec in biases:
        for (query_group, key_group), value in spec.items():
            for group in (query_group, key_group):
                if group not in groups:
                    raise ValueError(f"AttentionBias: no token group {group!r} in this call; the groups are {list(groups)}")
            rows, cols = groups[query_group], groups[key_group]
            if isinstance(value, bool):  # a keep-mask, as a bool tensor is: True attends (0), False blocks (-inf)
                value = 0.0 if value else float("-inf")
            if isinstance(value, Tensor):
                n_q, n_k = rows.stop - rows.start, cols.stop - cols.start
                block = (q.shape[0], q.shape[1], n_q, n_k)
                if value.dim() < 2 or not fits_logits(value, block):
                    raise ValueError(
                        f"AttentionBias block ({query_group!r}, {key_group!r}) has shape {list(value.shape)}; it must "
                        f"broadcast to [B, heads, {n_q}, {n_k}] = {list(block)} (e.g. [{n_q}, 1] per query, [1, {n_k}] per key; "
                        f"rows or heads need all 4 axes, [B, 1, {n_q}, {n_k}])"
                    )
                if value.dtype == torch.bool:  # a keep-mask, as in the dense form: 0 where True, -inf where False
                    value = torch.zeros(value.shape, dtype=q.dtype, device=q.device).masked_fill(~value.to(q.device), float("-inf"))
                value = value.to(q)
            blocks.append((rows, cols, value))
    tensors = [value for _, _, value in blocks if isinstance(value, Tensor)] + ([dense] if dense is not None else [])
    batch = max((t.shape[-4] for t in tensors if t.dim() >= 4), default=1)
    heads = max((t.shape[-3] for t in tensors if t.dim() >= 3), default=1)

    def rows(start: int, stop: int) -> Tensor:
        bias = q.new_zeros(batch, heads, stop - start, n_keys)
        if dense is not None:
            bias += dense[..., start:stop, :] if dense.shape[-2] > 1 else dense
        for query_rows, cols, value in blocks:
            first, last = max(start, query_rows.start), min(stop, query_rows.stop)
            if first >= last:
                continue
            if isinstance(value, Tensor) and value.shape[-2] > 1:
                value = value[..., first - query_rows.start : last - query_rows.start, :]
            bias[..., first - start : last - start, cols] += value
        return bias

    return rows


def fits_logits(bias: Tensor, logits: Sequence[int]) -> bool:
    """Whether `bias` broadcasts to attention logits of shape [B, heads, N, K], each axis 1 or in full.
    Three axes [X, N, K] are refused unless X is 1: X would broadcast over the heads, not the batch rows."""
    ambiguous = bias.dim() == 3 and bias.shape[0] > 1
    return bias.dim() <= 4 and not ambiguous and all(n in (1, full) for n, full in zip(reversed(bias.shape), reversed(logits)))


def fuse_rows(out: Tensor, fuse: FuseRows, grid: tuple[int, int]) -> Tensor:
    """(e) out [B, N, C] with out[target] <- m ⊙ out[row] + (1 - m) ⊙ out[target], for each (row, m) in order."""
    batch = out.shape[0]
    for row in (fuse.target, *(row for row, _ in fuse.sources)):
        if not -batch <= row < batch:
            raise ValueError(f"FuseRows: row {row} is outside this batch of {batch} rows")
    target = out[fuse.target]
    for row, mask in fuse.sources:
        mask = mask[None] if mask.dim() == 2 else mask  # [H, W]
        if mask.shape[0] != 1:
            raise ValueError(f"FuseRows: a mask of shape {list(mask.shape)}; give one mask, [1, H, W], [1, 1, H, W] or [1, N, 1]")
        m = tokens_mask(mask, grid, fuse.resize)[0].to(out)  # [N, 1]
        target = m * out[row] + (1 - m) * target
    rows = [target if i == fuse.target % batch else out[i] for i in range(batch)]
    return torch.stack(rows)


# ---------------------------------------------------------------- masks


def resize_mask(mask: Tensor, size: tuple[int, int], mode: Resize = "bilinear") -> Tensor:
    """A `[B, 1, H, W]` (or `[B, H, W]`) mask resized to `size`: "bilinear" (antialiased when
    shrinking), "area" (averages when shrinking, repeats when growing) or "nearest" (picks the cell
    floor(i·H/h): an 8×8 mask read on a 4×4 grid keeps rows and columns 0, 2, 4, 6). A bool mask is
    resized as 0/1 and stays bool where the result is above 1/2 (a cell mostly inside)."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    if mask.dtype == torch.bool:
        return resize_mask(mask.float(), size, mode) > 0.5
    if mode == "nearest":
        return F.interpolate(mask, size=size, mode="nearest")
    wide = mask.to(torch.promote_types(mask.dtype, torch.float32))  # fp16/bf16 resized in fp32, fp64 in fp64
    if mode == "area":
        return F.interpolate(wide, size=size, mode="area" if mask.shape[-2] >= size[0] else "nearest").to(mask.dtype)
    if mode == "bilinear":
        return F.interpolate(wide, size=size, mode="bilinear", antialias=True).to(mask.dtype)
    raise ValueError(f"unknown resize mode {mode!r}; choose 'bilinear', 'area' or 'nearest'")


def tokens_mask(mask: Tensor, grid: tuple[int, int], mode: Resize = "bilinear") -> Tensor:
    """A spatial mask `[B, 1, H, W]` (or `[B, H, W]`) as per-token weights `[B, h·w, 1]` for an h×w
    token grid; a mask already per token, `[B, h·w, 1]`, is returned as is."""
    if grid is None:
        raise ValueError("the token grid of this layer is unknown: run it inside its model, or call controls.enter_grid((h, w)) first")
    n = grid[0] * grid[1]
    if mask.dim() == 3 and mask.shape[-1] == 1 and grid[1] != 1:  # per token: [B, N, 1]
        if mask.shape[1] != n:
            raise ValueError(
                f"a per-token mask [B, N, 1] must have N = {n} for this {grid[0]}x{grid[1]} grid, got N = {mask.shape[1]}; "
                "give the mask as an image [B, 1, H, W] to have it resized to every layer's grid"
            )
        return mask
    if mask.dim() not in (3, 4) or (mask.dim() == 4 and mask.shape[1] != 1):
        raise ValueError(
            f"a spatial mask must be [B, 1, H, W], [B, H, W] or per token [B, {n}, 1] for this {grid[0]}x{grid[1]} "
            f"grid; got shape {list(mask.shape)}"
        )
    return resize_mask(mask, grid, mode).flatten(2).transpose(1, 2)


# ---------------------------------------------------------------- checking controls against a model


def check(controls: Controls, model: nn.Module) -> None:
    """Raise a ValueError for any control that would not apply to `model`: an unknown layer id, module
    path or kind, a residual whose factors do not fit its layer. The model lists its attention sites
    (`attention_sites()`: layer id -> kinds) and its minigen Linear/Conv2d layers."""
    from minigen.models.layers import Conv2d, Linear  # the layer classes that read controls

    sites: dict[str, tuple[str, ...]] = model.attention_sites()
    kinds = sorted({kind for ks in sites.values() for kind in ks})
    name = type(model).__name__

    def check_layers(what: str, kind: str, layers: Collection[str] | None) -> None:
        if layers is not None and (isinstance(layers, str) or not isinstance(layers, Collection)):
            hint = f"; write [{layers!r}] for one layer" if isinstance(layers, str) else ""
            raise ValueError(f"{what}: layers must be a list or set of layer ids, got {type(layers).__name__} {layers!r}{hint}")
        if layers is not None and len(layers) == 0:
            raise ValueError(f"{what}: no layers are named, so it would apply nowhere; name at least one (layers=None "
                             f"selects every {kind} layer where a control takes it)")
        if kind not in kinds:
            hint = " (FLUX has one joint attention per block: use kind='joint')" if kinds == ["joint"] else ""
            raise ValueError(f"{what}: this {name} has no attention of kind {kind!r}; it has {kinds}{hint}")
        for layer in layers if layers is not None else ():
            if kind not in sites.get(layer, ()):
                valid = [lid for lid, ks in sites.items() if kind in ks]
                raise ValueError(f"{what}: {_unknown(layer, valid, f'{kind} attention layer of this {name}')}")

    for entry in controls.record:
        check_layers("RecordAttention", entry.kind, entry.layers)
    for entry in controls.bias:
        check_layers("AttentionBias", entry.kind, entry.layers)
    for entry in controls.fuse:
        check_layers("FuseRows", entry.kind, entry.layers)
        allowed = ("out",) if entry.kind == "joint" else ("x", "q", "out")
        if entry.feature not in allowed:
            raise ValueError(f"FuseRows: feature={entry.feature!r} is not one of {allowed} for kind {entry.kind!r}")
    for entry in controls.capture:
        check_layers("CaptureFeatures", entry.kind, entry.layers)
        allowed = ("q", "k", "v", "out") if entry.kind == "joint" else ("x", "q", "k", "v", "out")
        if isinstance(entry.what, str):
            raise ValueError(f"CaptureFeatures: what takes a list of names from {allowed}; write what=({entry.what!r},) for one")
        if unknown := set(entry.what) - set(allowed):
            raise ValueError(f"CaptureFeatures: what={sorted(unknown)} is not one of {allowed} for kind {entry.kind!r}")
        if not entry.what:
            raise ValueError(f"CaptureFeatures: what=() names no feature, so it would keep nothing; name some of {allowed}")
    no_cross = "; FLUX has no cross-attention: add tokens as a TokenGroup (Flux.forward's extra=)"
    for entry in controls.extra_tokens:
        if "cross" not in kinds:
            raise ValueError(f"ExtraTokens: this {name} has no cross-attention layers{no_cross}")
        check_layers("ExtraTokens.projections", "cross", list(entry.projections))
        meta = [layer for layer, pair in entry.projections.items() for f in pair
                if isinstance(f, nn.Module) and any(p.is_meta for p in f.parameters())]
        if entry.tokens.is_meta or meta:  # (uncond is on the tokens' device)
            where = f"its projections at {meta[:3]}" if meta else "its tokens"
            raise ValueError(f"ExtraTokens: {where} are on the meta device (shapes without values); load their weights first")
    if controls.contexts:
        if "cross" not in kinds:
            raise ValueError(f"contexts: this {name} has no cross-attention layers{no_cross}; txt= is its only text")
        check_layers("contexts", "cross", list(controls.contexts))
    if controls.stop_after is not None:
        if kinds == ["joint"]:
            raise ValueError(f"stop_after: this {name} does not stop early; stop_after applies to the UNet")
        layer, kind = controls.stop_after
        check_layers("stop_after", kind, [layer])
        check_before_stop(controls, sites)
    if controls.low_rank:
        layers = {path: m for path, m in model.named_modules() if isinstance(m, (Linear, Conv2d))}
        check_low_rank(controls.low_rank, layers, regions=kinds != ["joint"], model=name)


def check_before_stop(controls: Controls, sites: Mapping[str, tuple[str, ...]]) -> None:
    """Every record, bias, fusion and capture reaches each layer it names before the forward stops
    (`stop_after`), and one for every layer of its kind (layers=None) at least one layer. `sites` lists the
    layers in call order.
    What a method gives every layer of a model is not checked: residuals (a LoRA file), extra tokens and
    per-layer contexts (an adapter's, Concept Conductor's), whose later layers a stop leaves unread."""
    order = [(layer, kind) for layer, kinds in sites.items() for kind in kinds]
    runs = set(order[: order.index(controls.stop_after) + 1])
    for entry in (*controls.record, *controls.bias, *controls.fuse, *controls.capture):
        if entry.layers is None:
            late = [] if any(kind == entry.kind for _, kind in runs) else [f"every {entry.kind} layer"]
        else:
            late = sorted(layer for layer in entry.layers if (layer, entry.kind) not in runs)
        if late:
            raise ValueError(f"{type(entry).__name__} at {late[:3]}: the forward stops after {controls.stop_after} and never "
                             "reaches it, so it would do nothing there; name layers up to the stop, or stop later")


def check_low_rank(deltas: Sequence[LowRank], layers: Mapping[str, nn.Module], *, regions: bool, model: str) -> None:
    """Each residual targets one of `layers` (path -> Linear/Conv2d) with factors of fitting shapes."""
    for delta in deltas:
        layer = layers.get(delta.target)
        if layer is None:
            raise ValueError(f"LowRank: {_unknown(delta.target, list(layers), f'Linear/Conv2d module path of this {model}')}")
        if delta.down.is_meta or delta.up.is_meta:  # torch would compute with uninitialised memory, silently
            raise ValueError(f"LowRank on {delta.target!r}: its factors are on the meta device (shapes without values); "
                             "create or load them on the model's device")
        weight = layer.weight
        out = weight.shape[0]
        if delta.outputs is not None:
            start, stop = delta.outputs
            if not 0 <= start < stop <= out:
                raise ValueError(f"LowRank on {delta.target!r}: outputs {delta.outputs} is not a slice of its {out} outputs")
            out = stop - start
        down_ok = tuple(delta.down.shape[1:]) == tuple(weight.shape[1:]) or (
            weight.dim() == 4 and weight.shape[2:] == (1, 1) and tuple(delta.down.shape[1:]) == tuple(weight.shape[1:2])
        )
        if not down_ok or tuple(delta.up.flatten(1).shape) != (out, delta.down.shape[0]):
            raise ValueError(
                f"LowRank on {delta.target!r}: factors down {list(delta.down.shape)} and up {list(delta.up.shape)} do not fit "
                f"its weight {list(weight.shape)}" + (f" (outputs {delta.outputs})" if delta.outputs else "")
                + "; down must be [rank, in(, kh, kw)] and up [out, rank]"
            )
        if delta.region is not None and not regions:
            raise ValueError(
                f"LowRank on {delta.target!r}: regions apply to UNet layers; on FLUX, scope a residual to tokens by "
                "giving it to a TokenGroup (TokenGroup.lora) or to rows (rows=)"
            )


def _unknown(name: str, valid: Sequence[str], what: str) -> str:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"valid ones are e.g. {', '.join(map(repr, valid[:4]))}"
    return f"{name!r} is not a {what}; {hint}"


# What a pipeline's `generate(controls=...)` takes: one Controls for every step, or a function
# step index -> Controls | None that builds them step by step.
ControlsArg = Controls | Callable[[int], Controls | None] | None


def combine(*parts: ControlsArg) -> ControlsArg:
    """Several methods' controls as one `generate(controls=...)` argument (residuals with LAG beside
    Conceptrol, a bias of one's own beside a method's records).

    Each list field is the parts' lists in the order given, so at a shared site their controls run in
    that order; `contexts` are joined, a layer given by two parts refused; `after_forward` runs each
    part's functions in turn. Parts that are functions of the step (or None) make a function of the
    step that combines what each returns for it.
    """
    for part in parts:
        if part is not None and not isinstance(part, Controls) and not callable(part):
            raise TypeError(f"combine takes Controls, functions of the step returning them, or None; got {type(part).__name__}")
    given = [part for part in parts if part is not None]
    if any(not isinstance(part, Controls) for part in given):
        return lambda step: combine(*(part if isinstance(part, Controls) else part(step) for part in given))
    if len(given) < 2:
        return given[0] if given else None
    contexts: dict[str, Tensor] = {}
    for part in given:
        twice = sorted(set(contexts) & set(part.contexts))
        if twice:
            raise ValueError(f"combine: two parts give contexts for {twice}; a layer reads one context")
        contexts.update(part.contexts)
    single = {}
    for name in ("stop_after", "step", "layout", "steps"):
        values = {getattr(part, name) for part in given} - {None}
        if len(values) > 1:
            raise ValueError(f"combine: the parts set {name} to {sorted(map(repr, values))}; set it in one part at most")
        single[name] = values.pop() if values else None
    lists = ("record", "bias", "extra_tokens", "low_rank", "fuse", "capture", "after_forward")
    return Controls(**{name: [entry for part in given for entry in getattr(part, name)] for name in lists}, contexts=contexts, **single)


def controls_at_step(controls: ControlsArg, step: int | None, layout: BatchLayout, steps: int | None = None) -> Controls | None:
    """The controls of sampling step `step` (0 = the first) of `steps`, told the step, the run length and the batch layout."""
    if callable(controls) and step is None:
        raise ValueError("controls given as a function of the step need the step: call the denoiser from a sampler")
    step_controls = controls(step) if callable(controls) else controls
    if step_controls is not None and not isinstance(step_controls, Controls):
        given = "returned" if callable(controls) else "given"
        raise TypeError(f"controls: a Controls (or a function of the step returning one) was expected, {given} a "
                        f"{type(step_controls).__name__}; wrap single controls as Controls(record=[...], low_rank=[...])")
    if step_controls is not None and step_controls.stop_after is not None:
        raise ValueError("stop_after ends the forward early and the model returns None, so a sampler cannot step on it: "
                         "it serves losses on early features (call the model itself), not generation")
    return None if step_controls is None else step_controls.at_step(step, layout, steps)
