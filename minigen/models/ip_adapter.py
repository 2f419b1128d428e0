"""IP-Adapter (Ye et al. 2023): a reference image as extra tokens of every cross-attention layer.

    image --CLIP vision tower--> features --image_proj--> T tokens [B, T, C]
    every cross-attention layer:  out = Attn(q, K_text, V_text) + scale · Attn(q, to_k_ip(tokens), to_v_ip(tokens))

the second attention with the layer's own query, its own keys and values (decoupled cross-attention),
summed before `to_out`. In minigen that sum is the `ExtraTokens` control; this module holds the
adapter's weights and says which layer each pair of projections belongs to.

Two image projections exist in the official files:

    ImageProjModel  (ip-adapter_sd15, ip-adapter_sdxl, ip-adapter_sdxl_vit-h): the tower's projected
                    pooled embedding (`image_embeds`, [B, D]) -> Linear -> T = 4 tokens -> LayerNorm
    Resampler       (ip-adapter-plus_*): the tower's penultimate hidden states ([B, 257, D]) -> a
                    Perceiver: 16 learned queries attend to the features (and to themselves), 4 layers

Module names follow the files' keys: `image_proj.*`, and `ip_adapter.{N}.to_k_ip / to_v_ip`, where N
is the position of the layer's attention processor in diffusers' `attn_processors` order: down blocks,
then up blocks, then the mid block (its registration order), each transformer block contributing its
self-attention (no weights, even N) and its cross-attention (odd N). `official_indices` is that rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from minigen.controls import ExtraTokens, SpatialMask


class ImageProjModel(nn.Module):
    """Pooled image embedding [B, D] -> `tokens` tokens [B, T, C]."""

    def __init__(self, clip_dim: int, cross_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(clip_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        return self.norm(self.proj(embeds).unflatten(-1, (self.tokens, -1)))  # [B, T, C]


class PerceiverAttention(nn.Module):
    """The latents (queries) attend to [features | latents]; no biases, the official scaling: q and k
    each times dim_head^-1/4, the softmax in float32."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        self.norm1 = nn.LayerNorm(dim)  # features
        self.norm2 = nn.LayerNorm(dim)  # latents
        self.to_q = nn.Linear(dim, dim_head * heads, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head * heads, bias=False)
        self.to_out = nn.Linear(dim_head * heads, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)  # [B, N, dim], [B, Q, dim]
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2) for t in (q, k, v))  # [B, h, L, d]
        scale = self.dim_head**-0.25
        weights = ((q * scale) @ (k * scale).transpose(-2, -1)).float().softmax(dim=-1).to(v.dtype)  # [B, h, Q, N + Q]
        return self.to_out((weights @ v).transpose(1, 2).flatten(2))  # [B, Q, dim]


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(), nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """Image features [B, N, embedding_dim] -> num_queries tokens [B, Q, output_dim]."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, embedding_dim: int, output_dim: int, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)]) for _ in range(depth))
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(self, features: Tensor) -> Tensor:
        x = self.proj_in(features)
        latents = self.latents.expand(features.shape[0], -1, -1)
        for attention, ff in self.layers:
            latents = attention(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class IPProjections(nn.Module):
    """One cross-attention layer's keys and values of the image tokens."""

    def __init__(self, cross_dim: int, width: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_dim, width, bias=False)
        self.to_v_ip = nn.Linear(cross_dim, width, bias=False)


def official_indices(layer_ids: Sequence[str]) -> dict[str, int]:
    """Each cross-attention layer id ("down.1.0.0", "mid.0.0", "up.1.2.0") -> its N in `ip_adapter.{N}`:
    diffusers orders down, up, mid; two processors per transformer block, cross-attention second."""
    order = {"down": 0, "up": 1, "mid": 2}
    ranked = sorted(layer_ids, key=lambda layer: order[layer.split(".")[0]])  # stable: keeps the UNet's order within each part
    return {layer: 2 * i + 1 for i, layer in enumerate(ranked)}


class IPAdapter(nn.Module):
    """An IP-Adapter for one UNet: `image_proj` (ImageProjModel or Resampler) and one IPProjections per
    cross-attention layer.

    layers: each cross-attention layer id of the UNet and its width (the layer's query width), in the
    UNet's order; cross_dim: the width of the image tokens (the UNet's text width).
    """

    def __init__(self, image_proj: ImageProjModel | Resampler, layers: Mapping[str, int], cross_dim: int):
        super().__init__()
        self.image_proj = image_proj
        self.index = official_indices(list(layers))
        self.ip_adapter = nn.ModuleDict({str(self.index[layer]): IPProjections(cross_dim, width) for layer, width in layers.items()})

    @property
    def plus(self) -> bool:
        """Whether it reads the tower's hidden states (Resampler) rather than its pooled embedding."""
        return isinstance(self.image_proj, Resampler)

    def tokens(self, features: Tensor) -> Tensor:
        """Image features -> the adapter's tokens [B, T, C]: `image_embeds` [B, D] for the base adapter,
        the penultimate hidden states [B, N, D] for Plus."""
        expected = 3 if self.plus else 2
        if features.dim() != expected:
            what = "hidden states [B, N, D] (hidden_states[-2])" if self.plus else "pooled image_embeds [B, D]"
            raise ValueError(f"this IP-Adapter reads the vision tower's {what}, got a tensor of shape {list(features.shape)}")
        return self.image_proj(features)

    def projections(self) -> dict[str, tuple[nn.Linear, nn.Linear]]:
        """{layer id: (to_k_ip, to_v_ip)}, as `ExtraTokens.projections` takes them."""
        return {layer: (self.ip_adapter[str(n)].to_k_ip, self.ip_adapter[str(n)].to_v_ip) for layer, n in self.index.items()}

    def extra_tokens(self, tokens: Tensor, scale: float = 1.0, gate: SpatialMask | None = None, uncond: Tensor | None = None) -> ExtraTokens:
        """The control that adds the image tokens to every cross-attention layer: `tokens` [B or 1, T, C], and
        `uncond` the empty image's for the unconditional rows under CFG (`reference_tokens` gives both);
        without `uncond`, `tokens` stacked like the denoiser's batch (under CFG: [unconditional | conditional])."""
        return ExtraTokens(tokens, self.projections(), scale, gate, uncond=uncond)


@torch.no_grad()
def reference_tokens(adapter: IPAdapter, encoder: nn.Module, pixels: Tensor) -> tuple[Tensor, Tensor]:
    """(tokens, unconditional tokens) [B, T, C] of references `pixels` [B, 3, S, S] (`preprocess_clip` at the
    tower's `config.image_size` S: 224 for the official towers, 64 for toy-sd's),
    as the official code makes them: Plus reads the tower's penultimate hidden states, of the images and
    of an all-zero input (zero after normalization, not a black image); the base adapter reads the
    projected pooled embedding, and zeros for the unconditional tokens. `encoder`: transformers'
    CLIPVisionModelWithProjection."""
    pixels = pixels.to(next(encoder.parameters()))
    if adapter.plus:
        features = encoder(pixels, output_hidden_states=True).hidden_states[-2]
        empty = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
    else:
        features = encoder(pixels).image_embeds
        empty = torch.zeros_like(features)
    return adapter.tokens(features), adapter.tokens(empty)
