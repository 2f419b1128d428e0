"""The FLUX.1 transformer (dev, schnell), named like BFL's checkpoint keys, hosting token groups.

Module names are the keys of `flux1-dev.safetensors`, so the official file loads with
`load_state_dict(assign=True)` and no key map. Data flow, top to bottom:

    t, guidance, pooled ──► time_in + guidance_in + vector_in ──► vec   (one per modulation time)
    txt ──► txt_in ─┐
    img ──► img_in ─┼─► 19 double blocks: each group normed and projected by its stream's weights
    extra groups ───┘      (txt_* or img_*), one joint attention with RoPE, per-group MLP
                    ──► 38 single blocks: shared weights, parallel attention + MLP
                    ──► final_layer on the image tokens ──► velocity [B, N_img, 64]

Every group has its own modulation vector (its own timestep), its own optional LoRA and its own
position ids; the joint attention of every block takes the call's `Controls` (kind "joint", layer
ids "double_blocks.i" / "single_blocks.i"): a bias by token group ("txt", "img", the extra groups'
names), recorded probabilities, image rows fused across the batch, captured q/k/v. Every Linear
takes the controls' residuals. Without controls and extra groups it is BFL's forward, one SDPA per
block.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigen.attention import attention, merge_heads
from minigen.compile import call_block, reaches
from minigen.controls import Controls, Kind, check_low_rank
from minigen.models.flux_config import FluxConfig
from minigen.models.flux_tokens import TokenGroup, group_names, group_slices
from minigen.models.layers import Linear, name_layers, run, timestep_embedding
from minigen.step_cache import FirstBlockCache
from minigen.storage import compute_dtype

TIME_FACTOR = 1000.0  # FLUX takes t in [0, 1] and embeds 1000·t, like the SD timesteps


@dataclass
class Branch:
    """One token group inside the blocks: its hidden states and what modulates and adapts them."""

    x: Tensor  # [B, N, hidden]
    vec: Tensor  # [B, hidden]
    stream: str  # "txt" or "img"
    controls: Controls | None  # residuals that apply to this group's Linear layers


# ---------------------------------------------------------------- positions


def rope(ids: Tensor, axes_dim: Sequence[int], theta: int) -> tuple[Tensor, Tensor]:
    """Rotary angles of ids [B, L, n_axes] as (cos, sin), each [B, 1, L, head_dim / 2].

    Axis a gets axes_dim[a] / 2 frequencies θ^(-2i/axes_dim[a]); angles are formed in float64.
    """
    angles = []
    for axis, dim in enumerate(axes_dim):
        omega = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[..., axis].double().unsqueeze(-1) * omega)  # [B, L, dim / 2]
    angle = torch.cat(angles, dim=-1).unsqueeze(1)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) of x [B, H, L, D] by the angles of `pe`."""
    cos, sin = pe
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, H, L, D/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


# ---------------------------------------------------------------- small modules


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden)
        self.out_layer = Linear(hidden, hidden)

    def forward(self, x: Tensor, controls: Controls | None = None) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x, controls)), controls)


class RMSNorm(nn.Module):
    """x / rms(x) · scale over the last dim, computed in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        rrms = torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        return (x.float() * rrms).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, head_dim: int):
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


@dataclass
class ModulationOut:
    """One adaptive layer norm's parameters, each [B, 1, dim]: x <- (1 + scale)·LN(x) + shift, and
    the residual branch it feeds is multiplied by gate."""

    shift: Tensor
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    """vec -> one ModulationOut (single blocks), or two (double blocks: attention, then MLP)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor, controls: Controls | None = None) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec), controls)[:, None, :].chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def modulate(x: Tensor, mod: ModulationOut) -> Tensor:
    """(1 + scale) · LayerNorm(x) + shift, with a LayerNorm without weights (eps 1e-6)."""
    return (1 + mod.scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + mod.shift


def split_qkv(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3·heads·D] -> q, k, v, each [B, heads, L, D]."""
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


# ---------------------------------------------------------------- joint attention


def joint_attention(
    qs: list[Tensor], ks: list[Tensor], vs: list[Tensor], pe: tuple[Tensor, Tensor], layer_id: str, controls: Controls | None
) -> list[Tensor]:
    """Attention over the concatenated groups; returns each group's output [B, N_g, heads·D].

    q/k/v per group are [B, heads, N_g, D]. With controls (kind "joint"), in this order: (b) biases,
    by token group, and (a) records from one softmax; (e) row fusion of the image tokens; (f) features.
    """
    sizes = [q.shape[2] for q in qs]
    q, k, v = (xs[0] if len(xs) == 1 else torch.cat(xs, dim=2) for xs in (qs, ks, vs))
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    site = controls.enter(layer_id, "joint") if controls is not None else None
    ctl = controls.at(layer_id, "joint") if controls is not None else None
    if ctl is None:
        out = attention(q, k, v)
    else:
        out = ctl.attend(q, k, v, site)
        if ctl.fuse:
            image = site.groups["img"]
            fused = ctl.fused(out[:, image], "out", site)
            out = torch.cat([out[:, : image.start], fused, out[:, image.stop :]], dim=1)
        ctl.keep_features(None, merge_heads(q), merge_heads(k), merge_heads(v), out)
    return list(out.split(sizes, dim=1))


# ---------------------------------------------------------------- blocks


class SelfAttention(nn.Module):
    """The projections of one stream in a double block: fused qkv, q/k RMSNorm, output proj."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // heads)
        self.proj = Linear(dim, dim)


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    """Linear -> GELU(tanh) -> Linear; keys `*_mlp.0` and `*_mlp.2` as in BFL's files."""
    return nn.Sequential(Linear(dim, hidden), nn.GELU(approximate="tanh"), Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Text-like and image-like groups keep separate weights; all groups meet in one attention."""

    def __init__(self, config: FluxConfig, layer_id: str):
        super().__init__()
        dim, heads = config.hidden_size, config.num_heads
        self.layer_id = layer_id
        self.sites = ((layer_id, "joint"),)  # its attention layer
        self.img_mod = Modulation(dim, double=True)
        self.img_attn = SelfAttention(dim, heads, config.qkv_bias)
        self.img_mlp = feed_forward(dim, config.mlp_hidden)
        self.txt_mod = Modulation(dim, double=True)
        self.txt_attn = SelfAttention(dim, heads, config.qkv_bias)
        self.txt_mlp = feed_forward(dim, config.mlp_hidden)

    def forward(self, branches: list[Branch], pe: tuple[Tensor, Tensor], controls: Controls | None = None) -> list[Branch]:
        qs, ks, vs, mods = [], [], [], []
        for br in branches:
            mod1, mod2 = getattr(self, f"{br.stream}_mod")(br.vec, br.controls)
            attn = getattr(self, f"{br.stream}_attn")
            q, k, v = split_qkv(attn.qkv(modulate(br.x, mod1), br.controls), attn.heads)
            q, k = attn.norm(q, k, v)
            qs.append(q), ks.append(k), vs.append(v), mods.append((mod1, mod2))

        outs = joint_attention(qs, ks, vs, pe, self.layer_id, controls)

        for br, out, (mod1, mod2) in zip(branches, outs, mods):
            attn, mlp = getattr(self, f"{br.stream}_attn"), getattr(self, f"{br.stream}_mlp")
            x = br.x + mod1.gate * attn.proj(out, br.controls)
            br.x = x + mod2.gate * run(mlp, modulate(x, mod2), br.controls)
        return branches


class SingleStreamBlock(nn.Module):
    """One weight set for all groups: linear1 gives q, k, v and the MLP input in parallel."""

    def __init__(self, config: FluxConfig, layer_id: str):
        super().__init__()
        dim, self.heads = config.hidden_size, config.num_heads
        self.layer_id = layer_id
        self.sites = ((layer_id, "joint"),)  # its attention layer
        self.split = (3 * dim, config.mlp_hidden)
        self.linear1 = Linear(dim, 3 * dim + config.mlp_hidden)
        self.linear2 = Linear(dim + config.mlp_hidden, dim)
        self.norm = QKNorm(dim // self.heads)
        self.modulation = Modulation(dim, double=False)

    def forward(self, branches: list[Branch], pe: tuple[Tensor, Tensor], controls: Controls | None = None) -> list[Branch]:
        qs, ks, vs, mlps, mods = [], [], [], [], []
        for br in branches:
            mod, _ = self.modulation(br.vec, br.controls)
            qkv, mlp = self.linear1(modulate(br.x, mod), br.controls).split(self.split, dim=-1)
            q, k, v = split_qkv(qkv, self.heads)
            q, k = self.norm(q, k, v)
            qs.append(q), ks.append(k), vs.append(v), mlps.append(mlp), mods.append(mod)

        outs = joint_attention(qs, ks, vs, pe, self.layer_id, controls)

        for br, out, mlp, mod in zip(branches, outs, mlps, mods):
            br.x = br.x + mod.gate * self.linear2(torch.cat([out, F.gelu(mlp, approximate="tanh")], dim=-1), br.controls)
        return branches


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor, controls: Controls | None = None) -> Tensor:
        shift, scale = run(self.adaLN_modulation, vec, controls)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * F.layer_norm(x, x.shape[-1:], eps=1e-6) + shift, controls)


# ---------------------------------------------------------------- the model


class Flux(nn.Module):
    def __init__(self, config: FluxConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.img_in = Linear(config.in_channels, dim)
        self.txt_in = Linear(config.context_in_dim, dim)
        self.time_in = MLPEmbedder(256, dim)
        self.vector_in = MLPEmbedder(config.vec_in_dim, dim)
        self.guidance_in = MLPEmbedder(256, dim) if config.guidance_embed else None
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(config, f"double_blocks.{i}") for i in range(config.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(config, f"single_blocks.{i}") for i in range(config.depth_single_blocks)
        )
        self.final_layer = LastLayer(dim, config.out_channels)
        name_layers(self)

    def attention_layers(self) -> list[str]:
        """Ids of the joint-attention layers, in call order (for `RecordAttention(kind="joint")`)."""
        return [block.layer_id for block in (*self.double_blocks, *self.single_blocks)]

    def attention_sites(self) -> dict[str, tuple[Kind, ...]]:
        """Each attention layer id and its kinds (one "joint" per block), in the order a forward runs them."""
        return {layer: ("joint",) for layer in self.attention_layers()}

    def modulation_vector(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None, controls: Controls | None = None) -> Tensor:
        """vec [B, hidden] = time_in(emb(1000 t)) [+ guidance_in(emb(1000 g))] + vector_in(pooled)."""
        vec = self.time_in(timestep_embedding(timesteps * TIME_FACTOR, 256).to(y), controls)
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance * TIME_FACTOR, 256).to(y), controls)
        return vec + self.vector_in(y, controls)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        extra: Sequence[TokenGroup] = (),
        controls: Controls | None = None,
        cache: FirstBlockCache | None = None,
    ) -> Tensor:
        """Velocity for the image tokens.

        img: [B, N, in_channels] packed latents, img_ids [B or 1, N, 3] (rows and columns from 0);
        txt: [B, T, context_in_dim], txt_ids [B or 1, T, 3]; timesteps: [B] in [0, 1] (σ); y: [B,
        vec_in_dim] pooled CLIP; guidance: [B] (dev only); extra: more token groups, appended after the
        image in that order. Returns [B, N, out_channels].

        cache: a `FirstBlockCache` kept across the steps of one generation (minigen/step_cache.py):
        when the first double block's change to the image tokens is close to the one of the last fully
        computed call, the other blocks are skipped and their cached contribution added instead (their
        controls then do not run either).

        img, txt and y of another float dtype are cast to the one the layers compute in (`compute_dtype`),
        and the velocity comes back in img's dtype.
        """
        if self.guidance_in is not None and guidance is None:
            raise ValueError("this FLUX model is guidance-distilled (dev): pass guidance, e.g. torch.full([B], 3.5)")
        if self.guidance_in is None and guidance is not None:
            raise ValueError("this FLUX model has no guidance embedding (schnell): pass guidance=None")
        given, dtype = img.dtype, compute_dtype(self.img_in)
        img, txt, y = img.to(dtype), txt.to(dtype), y.to(dtype)
        batch = img.shape[0]
        names = group_names(extra)
        if controls is None and any(group.lora for group in extra):
            controls = Controls()  # carries the groups' residuals
        if controls is not None:
            sizes = [txt.shape[1], img.shape[1], *(group.tokens.shape[1] for group in extra)]
            grid = (int(img_ids[0, :, 1].max()) + 1, int(img_ids[0, :, 2].max()) + 1)
            controls.begin(self, batch, grid=grid, groups=dict(zip(["txt", "img", *names], group_slices(sizes))))
        vec = self.modulation_vector(timesteps, y, guidance, controls)
        branches = [Branch(self.txt_in(txt, controls), vec, "txt", controls), Branch(self.img_in(img, controls), vec, "img", controls)]
        branches += [self.group_branch(group, batch, vec, timesteps, y, guidance, controls) for group in extra]

        ids = torch.cat([i.to(img.device).expand(batch, -1, -1) for i in (txt_ids, img_ids, *(g.ids for g in extra))], dim=1)
        pe = rope(ids, self.config.axes_dim, self.config.theta)

        image = branches[1].x  # the image tokens entering the first block
        branches = run_block(self.double_blocks[0], branches, pe, controls)
        first = branches[1].x
        change = None if cache is None else first - image  # what the first block added
        if cache is not None and cache.can_skip(change):
            img = first + cache.rest_residual  # what the other blocks added at the last computed call
        else:
            img = self.after_first_block(branches, pe, controls)
            if cache is not None:
                cache.store(change, img - first)
        out = self.final_layer(img, vec, controls)
        if controls is not None:
            controls.end()
        return out.to(given)

    def group_branch(self, group: TokenGroup, batch: int, vec: Tensor, timesteps: Tensor, y: Tensor, guidance: Tensor | None,
                     controls: Controls | None) -> Branch:  # fmt: skip
        """An extra token group as a branch: embedded by its stream's input layer, modulated by `vec` or by its
        own timestep's vector, under the call's controls and the group's own low-rank residuals."""
        rows = {"tokens": group.tokens.shape[0], "ids": group.ids.shape[0], "timestep": 1 if group.timestep is None else torch.as_tensor(group.timestep).numel()}
        if bad := {name: n for name, n in rows.items() if n not in (1, batch)}:
            raise ValueError(f"token group {group.name!r} has {bad} rows for a batch of {batch}: give 1 row (shared by every "
                             f"row) or {batch} (under true CFG the batch is the negative rows, then the prompt rows)")
        if group.lora:
            layers = {path: m for path, m in self.named_modules() if isinstance(m, Linear)}
            check_low_rank(group.lora, layers, regions=False, model="Flux")
            runs_through = self.group_layers(group)
            if missed := [delta.target for delta in group.lora if delta.target not in runs_through]:
                alone = "" if group.timestep is not None else ", modulated by the call's vector"
                raise ValueError(f"token group {group.name or 'extra'!r} ({group.stream} stream{alone}) never runs through "
                                 f"{missed[:3]}{' and more' if len(missed) > 3 else ''}, so its LoRA there would do nothing: keep the "
                                 "residuals of layers it runs through, [d for d in lora if d.target in transformer.group_layers(group)]")
            controls = controls.with_low_rank(group.lora)
        if group.timestep is not None:
            vec = self.modulation_vector(torch.as_tensor(group.timestep, dtype=timesteps.dtype, device=vec.device).expand(batch), y, guidance, controls)
        embed = self.txt_in if group.stream == "txt" else self.img_in
        tokens = group.tokens.to(vec.device, compute_dtype(self.img_in)).expand(batch, -1, -1)  # a group given once serves every row
        return Branch(embed(tokens, controls), vec, group.stream, controls)

    def group_layers(self, group: TokenGroup) -> set[str]:
        """The module paths of the Linear layers a token group's tokens run through: its stream's embedder
        and double-block layers, the single blocks, and the modulation embedders only when the group has
        a timestep of its own (else it shares the call's vector); never the other stream's layers nor
        the final layer, which reads the image alone."""
        other = "txt" if group.stream == "img" else "img"
        elsewhere = re.compile(rf"final_layer\.|{other}_in$|double_blocks\.\d+\.{other}_")
        shared = ("time_in.", "vector_in.", "guidance_in.") if group.timestep is None else ()
        return {path for path, m in self.named_modules()
                if isinstance(m, Linear) and not elsewhere.match(path) and not path.startswith(shared)}  # fmt: skip

    def after_first_block(self, branches: list[Branch], pe: tuple[Tensor, Tensor], controls: Controls | None) -> Tensor:
        """The image tokens [B, N, hidden] after the double blocks but the first, and the single blocks."""
        for block in self.double_blocks[1:]:
            branches = run_block(block, branches, pe, controls)
        text_length, image_length = branches[0].x.shape[1], branches[1].x.shape[1]
        branches = merge_runs(branches)  # single blocks share weights: like BFL, run one stream where we can
        for block in self.single_blocks:
            branches = run_block(block, branches, pe, controls)
        x = branches[0].x if len(branches) == 1 else torch.cat([br.x for br in branches], dim=1)
        return x[:, text_length : text_length + image_length]


def run_block(block: nn.Module, branches: list[Branch], pe: tuple[Tensor, Tensor], controls: Controls | None) -> list[Branch]:
    """One double or single block, compiled when `compile_blocks` compiled it and no control reaches it
    (minigen/compile.py). Controls reach a block through its joint attention (`controls`) and through
    each group's Linear layers (`Branch.controls`): the block then runs eagerly with them."""
    given = {id(c): c for c in (controls, *(br.controls for br in branches)) if c is not None}.values()
    if not given:
        return block(branches, pe)
    if any(reaches(c, block) for c in given):
        return block.forward(branches, pe, controls)
    plain = call_block(block, [replace(br, controls=None) for br in branches], pe, controls=controls)
    return [replace(out, controls=br.controls) for out, br in zip(plain, branches)]


def merge_runs(branches: list[Branch]) -> list[Branch]:
    """Concatenate neighbouring groups that share a modulation vector and controls (text and image
    in a plain call), so a single block projects them in one matmul, as BFL's single stream does."""
    runs: list[list[Branch]] = []
    for br in branches:
        if runs and runs[-1][0].vec is br.vec and runs[-1][0].controls is br.controls:
            runs[-1].append(br)
        else:
            runs.append([br])
    return [Branch(torch.cat([b.x for b in run], dim=1), run[0].vec, run[0].stream, run[0].controls) for run in runs]
