"""Attention as free functions: the fast SDPA path, and the written-out path that records probabilities.

Both take split heads `[B, heads, N, d]`, as SDPA does (FLUX's joint attention holds them so for
RoPE; the UNet splits with `split_heads`), and return `[B, N, heads·d]`, as the output projection
reads it. A bias is None (the fastest kernel), a tensor broadcastable to `[B, heads, N, M]`, or a
function `rows(start, stop)` giving the bias of query rows start:stop: the attention then runs a
block of query rows at a time, so a bias over a long joint sequence never exists whole.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from minigen.controls import RecordAttention

BiasRows = Callable[[int, int], Tensor]  # (start, stop) -> bias of query rows start:stop, [.., stop - start, M]
BIAS_BLOCK = 2**24  # bias entries per block of query rows: 64 MB of fp32 whatever the sequence length


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, N, heads·d] -> [B, heads, N, d]"""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, heads, N, d] -> [B, N, heads·d]"""
    return x.transpose(1, 2).flatten(2)


def row_blocks(n_queries: int, n_keys: int, chunk: int | None = None, first: int = 0) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive blocks of query rows first, ..., n_queries - 1, `chunk` rows each
    (default: BIAS_BLOCK entries)."""
    chunk = chunk or max(1, BIAS_BLOCK // n_keys)
    for start in range(first, n_queries, chunk):
        yield start, min(start + chunk, n_queries)


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | BiasRows | None = None) -> Tensor:
    """softmax(q·kᵀ/√d + bias)·v with PyTorch's fused SDPA kernels.

    q: [B, heads, N, d], k and v: [B, heads, M, d] -> [B, N, heads·d]. Leave `bias` None when unused:
    any mask moves SDPA off its fastest kernel.
    """
    if trains_faster_in_fp32(q, k, v):
        with torch.autocast("cpu", enabled=False):  # CPU autocast would cast SDPA's inputs back to bf16
            return attention(q.float(), k.float(), v.float(), float_bias(bias)).to(q.dtype)
    if not callable(bias):
        return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for start, stop in row_blocks(q.shape[2], k.shape[2]):
        out[:, :, start:stop] = F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=bias(start, stop))
    return merge_heads(out)


def trains_faster_in_fp32(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether `attention` runs this bf16 call in fp32: on a CPU, when autograd will differentiate it,
    with small heads (d <= 32) and few keys (<= 256), as the toy models train.

    PyTorch's CPU flash-attention backward in bf16 pays a large fixed cost per batch·head and block of
    queries: at the toy models' sizes the call and its backward take 1.6-3.7x as long as in fp32 with
    both casts (torch 2.13, `scripts/benchmark.py attention-backward`), and toy-sd's training step 1.5x as long.
    Larger heads and longer sequences (SD's, FLUX's) are faster in bf16, and so is every forward alone.
    """
    return (
        q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q, k, v)) and q.shape[-1] <= 32 and k.shape[-2] <= 256
    )  # fmt: skip


def float_bias(bias: Tensor | BiasRows | None) -> Tensor | BiasRows | None:
    """An additive bias in fp32 (for fp32 attention); a boolean mask or None as it is."""
    if callable(bias):
        return lambda start, stop: float_bias(bias(start, stop))
    return bias.float() if bias is not None and bias.is_floating_point() else bias


def positions(selection: Sequence[int] | Tensor | range | None, device: torch.device, size: int, name: str) -> slice | Tensor | None:
    """A record's rows, queries or tokens (`name`) among `size`: a slice for a range of step 1 (a token
    group's positions: no index tensor, so no copy to the GPU and no read back per layer), else an
    index tensor on `device`. A range past the ends is refused, as an index is (a slice would clip it)."""
    if selection is None:
        return None
    if isinstance(selection, range) and selection.step == 1:
        if not 0 <= selection.start <= selection.stop <= size:
            raise ValueError(f"RecordAttention: {name}={selection} lies outside the {size} {name} of this call (0..{size - 1})")
        return slice(selection.start, selection.stop)
    return torch.as_tensor(selection, device=device)


def size(index: slice | Tensor) -> int:
    return index.stop - index.start if isinstance(index, slice) else index.numel()


def bounds(index: slice | Tensor) -> tuple[int, int]:
    """The first position and one past the last."""
    return (index.start, index.stop) if isinstance(index, slice) else (int(index.min()), int(index.max()) + 1)


def select(x: Tensor, dim: int, index: slice | Tensor) -> Tensor:
    return x[(slice(None),) * dim + (index,)] if isinstance(index, slice) else x.index_select(dim, index)


def attention_with_probs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    records: Sequence[RecordAttention],
    *,
    bias: Tensor | BiasRows | None = None,
    chunk: int = 1024,
) -> tuple[Tensor, list[Tensor]]:
    """Attention written out, returning the output and, for each record, the probabilities it keeps.

    q: [B, heads, N, d], k and v: [B or 1, heads, M, d]. Returns out [B, N, heads·d] and, per record,
    [rows, heads or 1, queries, columns] of its selected batch rows, query positions and key columns
    (see `RecordAttention`). The output and the records come from one softmax, so recording costs no
    second attention; but when every record keeps some queries only (FLUX's image rows of a joint
    sequence), SDPA gives the output and the softmax is written out for the rows from the first kept
    query to the last. Queries go in chunks of `chunk`: memory stays at B·heads·chunk·M however long
    the sequence is.
    """
    sizes = {"rows": q.shape[0], "tokens": k.shape[2], "queries": q.shape[2]}
    rows, columns, queries = ([positions(getattr(r, key), q.device, sizes[key], key) for r in records] for key in sizes)
    each_keeps_some_queries = all(n is not None and size(n) for n in queries)  # True without records: nothing to write out
    if each_keeps_some_queries:  # SDPA gives the output; the softmax is written out from the first kept query to the last
        first, last = min((bounds(n)[0] for n in queries), default=0), max((bounds(n)[1] for n in queries), default=0)
    else:
        first, last = 0, q.shape[2]
    k_scaled = k * q.shape[-1] ** -0.5  # 1/√d on the keys: with few keys (cross-attention) far cheaper than on the logits
    out = None if each_keeps_some_queries else q.new_empty(*q.shape[:-1], v.shape[-1])
    kept = [[] for _ in records]
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 logits in fp32; fp64 stays fp64
    for start, stop in row_blocks(last, k.shape[2], chunk, first):
        logits = (q[:, :, start:stop] @ k_scaled.transpose(-1, -2)).to(softmax_dtype)  # [B, heads, chunk, M]
        if callable(bias):
            logits = logits + bias(start, stop).to(softmax_dtype)
        elif bias is not None:
            logits = logits + (bias[..., start:stop, :] if bias.shape[-2] > 1 else bias).to(softmax_dtype)
        probs = logits.softmax(dim=-1)
        if out is not None:
            out[:, :, start:stop] = probs.to(v.dtype) @ v
        for record, pieces, r, c, n in zip(records, kept, rows, columns, queries):
            p = probs if r is None else select(probs, 0, r)
            if isinstance(n, slice):  # the chunk's part of a range of queries
                p = p[:, :, max(n.start, start) - start : max(min(n.stop, stop), start) - start]
            elif n is not None:
                p = p.index_select(2, n[(n >= start) & (n < stop)] - start)  # in chunk order; put back in n's order below
            if c is not None:
                p = select(p, 3, c)
            sliced = any(isinstance(index, slice) for index in (r, n, c))  # a view: kept, it would hold the whole chunk
            pieces.append(p.mean(dim=1, keepdim=True) if record.mean_heads else p.clone() if sliced else p)
    maps = [pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2) for pieces in kept]
    for i, n in enumerate(queries):
        if isinstance(n, Tensor) and maps[i].shape[2] != n.numel():  # positions outside [first, last) were not kept
            raise IndexError(f"a record's query positions lie outside this call's {q.shape[2]} queries")
        if isinstance(n, Tensor) and n.numel() > 1 and bool((n[1:] < n[:-1]).any()):  # unsorted: chunk order differs from n's
            order = torch.cat([torch.nonzero((n >= start) & (n < stop)).flatten() for start, stop in row_blocks(last, k.shape[2], chunk, first)])
            maps[i] = maps[i].index_select(2, order.argsort())  # row j of the map is query n[j], as given
    return (attention(q, k, v, bias) if out is None else merge_heads(out)), maps
