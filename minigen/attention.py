"""Attention as free functions: the fast SDPA path, and probabilities for recording.

Tensors are `[B, N, heads·d]` in and out, as the projections produce them; the head split is
done here so that callers read like the math.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, N, heads·d] -> [B, heads, N, d]"""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, heads, N, d] -> [B, N, heads·d]"""
    return x.transpose(1, 2).flatten(2)


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, bias: Tensor | None = None) -> Tensor:
    """softmax(q·kᵀ/√d + bias)·v over `heads` heads, with PyTorch's fused SDPA kernels.

    q: [B, N, C], k and v: [B, M, C], bias: broadcastable to [B, heads, N, M] or None.
    Leave `bias` None when unused: any mask forces SDPA off its fastest kernel.
    """
    out = F.scaled_dot_product_attention(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), bias)
    return merge_heads(out)


def attention_probs(
    q: Tensor,
    k: Tensor,
    heads: int,
    *,
    bias: Tensor | None = None,
    rows: Sequence[int] | None = None,
    queries: Sequence[int] | None = None,
    columns: Sequence[int] | None = None,
    mean_heads: bool = True,
    chunk: int = 1024,
) -> Tensor:
    """The softmax attention probabilities of the selected batch rows, queries and key columns.

    Returns [rows, heads or 1, queries, columns]. Queries go in chunks of `chunk`, so memory stays at
    rows·heads·chunk·M however long the sequence is; only the kept columns are concatenated.
    """
    if rows is not None:
        index = torch.as_tensor(rows, device=q.device)
        q, k = q[index], k[index] if k.shape[0] == q.shape[0] else k
        if bias is not None and bias.shape[0] > 1:
            bias = bias[index]
    if queries is not None:
        index = torch.as_tensor(queries, device=q.device)
        q = q[:, index]
        if bias is not None and bias.shape[-2] > 1:
            bias = bias[..., index, :]
    qh, kh = split_heads(q, heads), split_heads(k, heads)
    scale = qh.shape[-1] ** -0.5
    pieces = []
    for start in range(0, qh.shape[2], chunk):
        logits = (qh[:, :, start : start + chunk] @ kh.transpose(-1, -2)).float() * scale
        if bias is not None:
            logits = logits + (bias[..., start : start + chunk, :] if bias.shape[-2] > 1 else bias).float()
        probs = logits.softmax(dim=-1)
        if columns is not None:
            probs = probs[..., list(columns)]
        pieces.append(probs.mean(dim=1, keepdim=True) if mean_heads else probs)
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
