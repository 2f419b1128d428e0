"""Attention as free functions: the fast SDPA path, and the written-out path that records probabilities.

`attention` takes and returns `[B, N, heads·d]`, as the projections produce them, and splits the
heads itself so that callers read like the math. `attention_with_probs` works on split heads
`[B, heads, N, d]`, as SDPA does, because FLUX's joint attention already holds them so for RoPE.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from minigen.controls import RecordAttention


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


def attention_with_probs(
    q: Tensor, k: Tensor, v: Tensor, records: Sequence[RecordAttention], *, bias: Tensor | None = None, chunk: int = 1024
) -> tuple[Tensor, list[Tensor]]:
    """Attention written out, returning the output and, for each record, the probabilities it keeps.

    q: [B, heads, N, d], k and v: [B or 1, heads, M, d], bias: broadcastable to [B, heads, N, M] or None.
    Returns out [B, heads, N, d] and, per record, [rows, heads or 1, queries, columns] of its selected
    batch rows, query positions and key columns (see `RecordAttention`). The output and the records
    come from one softmax, so recording costs no second attention. Queries go in chunks of `chunk`:
    memory stays at B·heads·chunk·M however long the sequence is.
    """
    device = q.device
    rows = [None if r.rows is None else torch.as_tensor(r.rows, device=device) for r in records]
    columns = [None if r.tokens is None else torch.as_tensor(r.tokens, device=device) for r in records]
    queries = [None if r.queries is None else torch.as_tensor(r.queries, device=device) for r in records]
    k_scaled = k * q.shape[-1] ** -0.5  # 1/√d on the keys: with few keys (cross-attention) far cheaper than on the logits
    outs, kept = [], [[] for _ in records]
    for start in range(0, q.shape[2], chunk):
        logits = (q[:, :, start : start + chunk] @ k_scaled.transpose(-1, -2)).float()  # [B, heads, chunk, M]
        if bias is not None:
            logits = logits + (bias[..., start : start + chunk, :] if bias.shape[-2] > 1 else bias).float()
        probs = logits.softmax(dim=-1)
        outs.append(probs.to(v.dtype) @ v)
        for record, pieces, r, c, n in zip(records, kept, rows, columns, queries):
            p = probs if r is None else probs.index_select(0, r)
            if n is not None:
                p = p.index_select(2, n[(n >= start) & (n < start + chunk)] - start)
            if c is not None:
                p = p.index_select(3, c)
            pieces.append(p.mean(dim=1, keepdim=True) if record.mean_heads else p)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out, [pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2) for pieces in kept]
