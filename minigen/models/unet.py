"""The Stable Diffusion UNet (SD1.x, SD2.x, SDXL), named like the official checkpoints.

Module names are the ldm/sgm keys after `model.diffusion_model.`, so an official single file
loads with `load_state_dict(assign=True)` and no key map: `input_blocks.1.1.transformer_blocks.0.attn2.to_k`
is the same string in the file and in this code.

Data flow, top to bottom:

    t ──► timestep_embedding ─► time_embed (+ label_emb(y) for SDXL) ─► emb
    x ──► input_blocks (ResBlock [+ SpatialTransformer] | Downsample) ──► skips
      ──► middle_block (ResBlock, SpatialTransformer, ResBlock)
      ──► output_blocks (cat skip, ResBlock [+ SpatialTransformer] [+ Upsample]) ──► out

`controls` (see minigen/controls.py) is passed to every block and applied at named sites.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigen.attention import attention, split_heads
from minigen.compile import call_block
from minigen.controls import Controls, Kind, tokens_mask
from minigen.models.layers import Conv2d, Linear, name_layers, run, timestep_embedding
from minigen.models.unet_config import UNetConfig
from minigen.step_cache import DeepCache
from minigen.storage import compute_dtype


class Attention(nn.Module):
    """Multi-head attention; `kind` "self" attends to x, "cross" to the text context.

    With controls, the sites run in this order: (g) the layer's own context, (e) row fusion of the
    input (read by the query only), q/k/v, (e) of the query, (b) biases and (a) records (one softmax),
    (c) extra token groups, to_out, (e) of the output, (f) captured features, (h) the stop of the
    forward, when this is its `stop_after` layer.
    """

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, layer_id: str, kind: Kind):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.layer_id, self.kind = heads, layer_id, kind
        self.to_q = Linear(query_dim, inner, bias=False)
        self.to_k = Linear(context_dim, inner, bias=False)
        self.to_v = Linear(context_dim, inner, bias=False)
        self.to_out = nn.ModuleList([Linear(inner, query_dim), nn.Dropout(0.0)])

    def forward(self, x: Tensor, context: Tensor | None, controls: Controls | None = None) -> Tensor:
        # x: [B, N, C]; context: [B, T, C_ctx] for cross-attention
        site = controls.enter(self.layer_id, self.kind) if controls is not None else None
        ctl = controls.at(self.layer_id, self.kind) if controls is not None else None
        if ctl is not None and ctl.context is not None:  # (g) this layer's own text context
            context = ctl.own_context(x, site)
        source = x if self.kind == "self" else context
        query_input = x if ctl is None else ctl.fused(x, "x", site)  # (e) keys and values read x unfused
        q, k, v = self.to_q(query_input, controls), self.to_k(source, controls), self.to_v(source, controls)
        if ctl is None:  # the plain path: one fused SDPA call
            return self.project(attention(*(split_heads(t, self.heads) for t in (q, k, v))), controls)

        q = ctl.fused(q, "q", site)  # (e)
        qh, kh, vh = (split_heads(t, self.heads) for t in (q, k, v))

        out = ctl.attend(qh, kh, vh, site)  # (b) biases, (a) records
        for group in ctl.extra_tokens:  # (c) decoupled attention to an extra token group
            to_k, to_v = group.projections[self.layer_id]
            tokens = group.rows(site, q.shape[0])
            k_extra, v_extra = (projected(projection, tokens, x.dtype).to(q.dtype) for projection in (to_k, to_v))
            extra = attention(qh, split_heads(k_extra, self.heads), split_heads(v_extra, self.heads))
            gate = group.gate(site) if callable(group.gate) else group.gate
            if gate is not None:  # no gate, or a gate function with none for this call
                extra = extra * tokens_mask(gate, site.grid, group.resize).to(extra)
            out = out + group.scale * extra
        out = ctl.fused(self.project(out, controls), "out", site)  # (e)
        ctl.keep_features(x, q, k, v, out)  # (f) with autograd intact
        if ctl.stop:  # (h) the blocks above skip the rest, and the UNet returns None
            controls.stop()
        return out

    def project(self, out: Tensor, controls: Controls | None) -> Tensor:
        """to_out: the output Linear (and the checkpoint's dropout slot)."""
        return self.to_out[1](self.to_out[0](out, controls))


def projected(projection, tokens: Tensor, dtype: torch.dtype) -> Tensor:
    """An extra token group's key or value projection, run in its own compute dtype (an IP-Adapter kept
    in fp16 beside a UNet that computes in fp32); a function without layers gets the tokens in `dtype`."""
    if isinstance(projection, nn.Module) and any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in projection.modules()):
        dtype = compute_dtype(projection)
    return projection(tokens.to(dtype))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def forward(self, x: Tensor, controls: Controls | None = None) -> Tensor:
        x, gate = self.proj(x, controls).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), Linear(dim * mult, dim)])

    def forward(self, x: Tensor, controls: Controls | None = None) -> Tensor:
        return self.net[2](self.net[1](self.net[0](x, controls)), controls)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and a GEGLU feed-forward, each pre-normed and residual."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, layer_id: str):
        super().__init__()
        self.attn1 = Attention(dim, dim, heads, head_dim, layer_id, "self")
        self.attn2 = Attention(dim, context_dim, heads, head_dim, layer_id, "cross")
        self.sites = ((layer_id, "self"), (layer_id, "cross"))  # its attention layers, in the order it runs them
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor, controls: Controls | None = None) -> Tensor:
        x = x + self.attn1(self.norm1(x), None, controls)
        x = x + self.attn2(self.norm2(x), context, controls)
        return x + self.ff(self.norm3(x), controls)


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in, `depth` transformer blocks over the h·w tokens, proj_out, residual."""

    def __init__(self, channels: int, depth: int, config: UNetConfig, layer_id: str):
        super().__init__()
        heads, head_dim = config.heads(channels)
        self.use_linear = config.use_linear_proj
        self.norm = nn.GroupNorm(config.norm_groups, channels, eps=1e-6)
        proj = Linear if self.use_linear else lambda i, o: Conv2d(i, o, 1)
        self.proj_in = proj(channels, heads * head_dim)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(heads * head_dim, heads, head_dim, config.context_dim, f"{layer_id}.{k}")
            for k in range(depth)
        )
        self.proj_out = proj(heads * head_dim, channels)

    def forward(self, x: Tensor, context: Tensor, controls: Controls | None = None) -> Tensor:
        _, _, h, w = x.shape
        if controls is not None:
            controls.enter_grid((h, w))
        residual = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x, controls)
        x = x.flatten(2).transpose(1, 2)  # [B, C, h, w] -> [B, h·w, C]
        if self.use_linear:
            x = self.proj_in(x, controls)
        for block in self.transformer_blocks:
            x = call_block(block, x, context, controls=controls)  # compiled when compile_blocks compiled it
            if controls is not None and controls.stopped:
                return x  # (h) an early stop: nobody reads this
        if self.use_linear:
            x = self.proj_out(x, controls)
        x = x.transpose(1, 2).unflatten(2, (h, w))
        if not self.use_linear:
            x = self.proj_out(x, controls)
        return x + residual


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the time embedding, GroupNorm-SiLU-conv, plus the skip.

    The nn.Sequential containers keep the checkpoint's indices (`in_layers.2` is the conv); `run`
    applies their layers one by one so that the convs receive the controls.
    """

    sites = ()  # no attention layers

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Dropout(0.0), Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = Conv2d(channels, out_channels, 1) if channels != out_channels else None

    def forward(self, x: Tensor, emb: Tensor, controls: Controls | None = None) -> Tensor:
        h = run(self.in_layers, x, controls)
        h = h + run(self.emb_layers, emb, controls)[:, :, None, None]
        h = run(self.out_layers, h, controls)
        skip = x if self.skip_connection is None else self.skip_connection(x, controls)
        return skip + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, controls: Controls | None = None) -> Tensor:
        return self.op(x, controls)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int], controls: Controls | None = None) -> Tensor:
        # `size` is the next skip's size, so odd latent sizes come back exactly.
        return self.conv(F.interpolate(x, size=size, mode="nearest"), controls)


class Stage(nn.ModuleList):
    """One numbered position of the UNet (`input_blocks.4`), feeding each layer what it needs."""

    def forward(self, x, emb, context, controls=None, upsample_to=None):
        for layer in self:
            if controls is not None and controls.stopped:  # (h) past the stop_after layer
                break
            if isinstance(layer, ResBlock):
                x = call_block(layer, x, emb, controls=controls)  # compiled when compile_blocks compiled it
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, controls)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_to, controls)
            else:
                x = layer(x, controls)
        return x


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch, emb = c.model_channels, 4 * c.model_channels
        self.time_embed = nn.Sequential(Linear(ch, emb), nn.SiLU(), Linear(emb, emb))
        if c.adm_in_channels is not None:
            self.label_emb = nn.Sequential(nn.Sequential(Linear(c.adm_in_channels, emb), nn.SiLU(), Linear(emb, emb)))

        self.input_blocks = nn.ModuleList([Stage([Conv2d(c.in_channels, ch, 3, padding=1)])])
        skips = [ch]
        for level, mult in enumerate(c.channel_mult):
            for j in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb, mult * c.model_channels, c.norm_groups)]
                ch = mult * c.model_channels
                if c.transformer_depth[level]:
                    layers.append(SpatialTransformer(ch, c.transformer_depth[level], c, f"down.{level}.{j}"))
                self.input_blocks.append(Stage(layers))
                skips.append(ch)
            if level != len(c.channel_mult) - 1:
                self.input_blocks.append(Stage([Downsample(ch)]))
                skips.append(ch)

        middle: list[nn.Module] = [ResBlock(ch, emb, ch, c.norm_groups)]
        if c.transformer_depth_middle:
            middle.append(SpatialTransformer(ch, c.transformer_depth_middle, c, "mid.0"))
        self.middle_block = Stage([*middle, ResBlock(ch, emb, ch, c.norm_groups)])

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            up = len(c.channel_mult) - 1 - level  # diffusers' up_blocks index
            for j in range(c.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb, mult * c.model_channels, c.norm_groups)]
                ch = mult * c.model_channels
                if c.transformer_depth[level]:
                    layers.append(SpatialTransformer(ch, c.transformer_depth[level], c, f"up.{up}.{j}"))
                if level and j == c.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Stage(layers))

        self.out = nn.Sequential(nn.GroupNorm(c.norm_groups, ch), nn.SiLU(), Conv2d(ch, c.out_channels, 3, padding=1))
        name_layers(self)
        # each transformer block's id -> its module path, fixed from here on (a control checks its layers against them)
        self.block_paths = {m.layer_id: name.removesuffix(".attn1") for name, m in self.named_modules() if name.endswith("attn1")}

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        context: Tensor,
        y: Tensor | None = None,
        controls: Controls | None = None,
        cache: DeepCache | None = None,
    ) -> Tensor:
        """Predict noise (or v) for latents x [B, C, H, W] at timesteps t [B] given context [B, T, C_ctx].

        y is SDXL's vector conditioning [B, adm_in_channels] (see `sdxl_vector`). With
        `controls.stop_after`, the forward ends after that layer and returns None. `cache`, kept across
        the steps of one generation, runs only the shallow stages at the calls it skips, on the deep
        feature of its last full call (minigen/step_cache.py; the skipped stages' controls do not run).
        Inputs of another float dtype are cast to the one the layers compute in (`compute_dtype`), and
        the prediction comes back in x's dtype.
        """
        if controls is not None:
            controls.begin(self, x.shape[0])
        given, dtype = x.dtype, compute_dtype(self.out[2])  # inputs in the layers' compute dtype, the prediction in x's
        x, context = x.to(dtype), None if context is None else context.to(dtype)
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        temb = timestep_embedding(t, self.config.model_channels).to(x.dtype)
        emb = run(self.time_embed, temb, controls)
        if self.config.adm_in_channels is not None:
            if y is None:
                raise ValueError("this UNet (SDXL-type) needs y, the pooled-text and size vector; see sdxl_vector()")
            emb = emb + run(self.label_emb[0], y.to(x.dtype), controls)

        if cache is not None and cache.branch >= len(self.output_blocks):  # else the cache would never fill, nor skip
            raise ValueError(f"DeepCache branch {cache.branch}: this UNet has {len(self.output_blocks)} output stages, so the "
                             f"branch is 0..{len(self.output_blocks) - 1} (0 skips the most)")
        if cache is not None and controls is not None and controls.stop_after is not None:  # a skipping call would not stop
            raise ValueError("stop_after ends a forward at one layer, which a DeepCache call may skip: run it without cache=")
        skips = []
        h = x
        shallow = cache is not None and cache.can_skip(x)
        for stage in self.input_blocks[: cache.branch + 1] if shallow else self.input_blocks:
            h = stage(h, emb, context, controls)
            skips.append(h)
        h = cache.deep if shallow else self.middle_block(h, emb, context, controls)
        first = len(self.output_blocks) - len(skips)  # 0, or the output stage where the shallow path rejoins
        for i, stage in enumerate(self.output_blocks[first:], start=first):
            if controls is not None and controls.stopped:  # (h) past the stop_after layer
                break
            if cache is not None and not shallow and i == len(self.output_blocks) - 1 - cache.branch:
                cache.store(x, h)  # the deep part's result, for the calls that skip it
            h = torch.cat([h, skips.pop()], dim=1)
            h = stage(h, emb, context, controls, upsample_to=skips[-1].shape[-2:] if skips else None)
        if controls is not None and controls.stopped:
            controls.end()
            return None
        out = run(self.out, h, controls)
        if controls is not None:
            controls.end()
        return out.to(given)

    def attention_layers(self) -> dict[str, str]:
        """Map each transformer block id (`"up.1.0.0"`) to its module path
        (`"output_blocks.3.1.transformer_blocks.0"`); each has a "self" and a "cross" layer."""
        return dict(self.block_paths)

    def attention_sites(self) -> dict[str, tuple[Kind, ...]]:
        """Each attention layer id and its kinds, in the order a forward runs them (self before cross)."""
        return {layer: ("self", "cross") for layer in self.attention_layers()}


def sdxl_vector(pooled: Tensor, time_ids: Tensor, embed_dim: int = 256) -> Tensor:
    """SDXL's `y`: the pooled text embedding followed by sinusoidal embeddings of the six size/crop
    numbers (original h, w, crop top, left, target h, w), each `embed_dim` wide."""
    b = pooled.shape[0]
    sizes = timestep_embedding(time_ids.reshape(-1).to(pooled.device), embed_dim).reshape(b, -1)
    return torch.cat([pooled, sizes.to(pooled.dtype)], dim=-1)
