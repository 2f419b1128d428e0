"""Tokens of FLUX's joint sequence: latent packing, position ids, token groups and group biases.

FLUX attends over one sequence made of groups of tokens. The two that every call has are the text
(T5 states) and the image (the noisy latent, cut into 2x2 patches). Methods add more groups: the
condition image of OminiControl, Redux tokens, AlignGen's reference. The joint order is

    [ text | image | extra group 1 | extra group 2 | ... ]

Each group carries its own position ids: (axis, row, col) per token, which RoPE turns into
rotations (text ids are all zero, so text has no position). Rows and columns are in packed-token
units, i.e. latent pixels / 2.

    pack_latents    [B, 16, H, W]  ->  [B, H/2 · W/2, 64]    channel order (c, dy, dx)
    image_ids       (h, w)         ->  [1, h·w, 3]           (0, row, col), optionally shifted

Controls address the groups by name: "txt", "img", and each extra group's `name` (by default
"extra0", "extra1", ... in joint order), e.g. a bias `{("img", "cond"): log_mask}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from minigen.controls import LowRank

Stream = Literal["txt", "img"]


@dataclass
class TokenGroup:
    """An extra group of tokens in FLUX's joint attention.

    tokens: [B, N, C] model inputs before embedding: packed latents (C = in_channels, stream "img")
            or text-encoder states (C = context_in_dim, stream "txt").
    ids: [B or 1, N, 3] position ids.
    stream: which weights embed and process the group in the double blocks: `img_in`, `img_*`
            (like the image) or `txt_in`, `txt_*` (like the text). Single blocks share weights.
    timestep: [B] or float in [0, 1]: the group's own modulation time (OminiControl feeds its
              condition tokens t = 0); None takes the call's timestep.
    lora: residuals applied to this group's tokens only (targets are module paths such as
          "double_blocks.0.img_attn.qkv", of layers the group runs through: `Flux.group_layers`),
          on top of the call's own `controls.low_rank`.
    name: how controls address the group (AttentionBias by token group); "" gives "extra<i>".
    """

    tokens: Tensor
    ids: Tensor
    stream: Stream = "img"
    timestep: Tensor | float | None = None
    lora: Sequence[LowRank] = ()
    name: str = ""

    def __post_init__(self):
        if self.stream not in ("img", "txt"):
            raise ValueError(f"TokenGroup: stream is 'img' or 'txt' (which weights embed the group), got {self.stream!r}")
        if isinstance(self.timestep, (int, float)) and not 0 <= self.timestep <= 1:
            raise ValueError(f"TokenGroup: timestep is a flow time in [0, 1] (OminiControl's condition: 0), got {self.timestep}")


def pack_latents(latents: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, (H/2)·(W/2), C·4]: 2x2 patches, channel-major within each token."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """[B, (H/2)·(W/2), C·4] -> [B, C, H, W], the inverse of `pack_latents` (H, W in latent pixels)."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, offset: tuple[int, int] = (0, 0), axis: int = 0) -> Tensor:
    """[1, h·w, 3] ids (axis, row + dy, col + dx) of an h×w token grid, row-major like `pack_latents`.

    OminiControl places its subject condition beside the image by shifting the columns
    (offset=(0, w)); FLUX Kontext marks reference images with axis=1.
    """
    rows = torch.arange(height, dtype=torch.float32).view(-1, 1).expand(height, width) + offset[0]
    cols = torch.arange(width, dtype=torch.float32).view(1, -1).expand(height, width) + offset[1]
    axes = torch.full((height, width), float(axis))
    return torch.stack([axes, rows, cols], dim=-1).view(1, height * width, 3)


def text_ids(length: int) -> Tensor:
    """[1, length, 3] zeros: text tokens get no rotation."""
    return torch.zeros(1, length, 3)


def group_slices(sizes: Sequence[int]) -> list[slice]:
    """Where each group lies in the joint sequence, given the group sizes in joint order."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(start, start + size) for start, size in zip(starts, sizes)]


def group_names(extra: Sequence[TokenGroup]) -> list[str]:
    """The names of the extra groups, in joint order: their own, or "extra<i>"; unique, and not "txt"/"img"."""
    names = [group.name or f"extra{i}" for i, group in enumerate(extra)]
    if len(set(names)) != len(names) or {"txt", "img"} & set(names):
        raise ValueError(f"token group names must be unique and not 'txt' or 'img'; got {names}")
    return names
