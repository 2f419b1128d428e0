r"""Long and weighted prompts, read as AUTOMATIC1111's webui reads them (SD1.x, SDXL).

Syntax (``parse_prompt_attention``):

    (word)         weight x 1.1             nesting multiplies: ((word)) x 1.21
    [word]         weight / 1.1
    (word:1.3)     weight x 1.3             (spaces allowed around the number)
    \( \) \[ \] \\ the literal character; a backslash before anything else vanishes
    BREAK          ends the chunk here (the word itself, in capitals)

A1111's other syntax, which changes the prompt during sampling or combines prompts (``a AND b``,
``[from:to:when]``, ``[to:when]``, ``[from::when]``, ``[a|b]``), is refused (``refuse_scheduling``)
rather than read as plain text.

An unclosed ``(`` or ``[`` weighs everything after it; a ``)`` or ``]`` with nothing open, and a
``:1.3)`` with no ``(`` open, are plain text. Adjacent pieces of equal weight are merged.

Encoding (``encode_sd1_weighted``, ``encode_sdxl_weighted``):

    prompt  -parse->  [(text, weight)]  -tokenize each piece->  token ids, each with its piece's weight
            -chunks of 75 tokens->  k x [BOS, <=75 tokens, EOS, padding]                  ids [k, 77]
            -CLIP, one chunk at a time->  z [B, 77, C] per chunk
            -z *= weight; z *= mean(z before) / mean(z after)->  concatenated     context [B, 77 k, C]

A chunk ends after 75 tokens, but if a comma lies within its last 20 tokens the chunk ends after
that comma and the words after it move to the next chunk (A1111's "comma padding backtrack" 20).
A multi-vector textual-inversion word (tokens ``w``, ``w_1``, ...) is never split between chunks.
Padding is the tokenizer's own: EOS for CLIP-L, 0 ("!") for SDXL's OpenCLIP-bigG, as ``tokenize``.
``chunk_prompt`` does the parsing, tokenizing and packing once, for the encoders and for whoever needs to
know where a token went: chunk k's token j sits at position k·77 + 1 + j of the context
(``ChunkedPrompt.positions``; ``minigen.text.spans`` finds a phrase's positions so).

A prompt without weights that fits 75 tokens gives exactly ``encode_sd1`` / ``encode_sdxl``.
Where minigen differs from A1111: the mean is restored per prompt (A1111 takes it over the whole
batch of chunk i, which is the same for one prompt or one prompt repeated, its usual batch), and a
BREAK inside brackets still breaks (A1111 multiplies its marker into a negative-weight word "BREAK").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import Tensor

from minigen.transformers_compat import tower

from .encoders import check_clip_skip

CHUNK = 75  # prompt tokens per chunk; BOS and EOS make the 77 positions CLIP reads
COMMA_BACKTRACK = 20  # a comma within the last 20 tokens of a full chunk ends the chunk
BREAK = ("BREAK", -1.0)  # the piece parse_prompt_attention gives for the keyword (A1111's marker)
ROUND, SQUARE = 1.1, 1 / 1.1  # ( ) and [ ] multiply by these

_SYNTAX = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\])?            # \( \) \[ \] \\, or a lone backslash (which vanishes)
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)      # ":1.3)" closes a ( with weight 1.3
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """[(text, weight)] of a prompt in A1111's syntax (module docstring); BREAK gives ``BREAK``.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []  # [text, weight]; weight None marks a BREAK, which no bracket weighs
    opened: dict[str, list[int]] = {"(": [], "[": []}  # where each open bracket's range begins

    def weigh(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for match in _SYNTAX.finditer(text):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            pieces.append([match.group("escaped") or "", 1.0])
        elif match.group("open"):
            opened[token].append(len(pieces))
        elif weight is not None and opened["("]:
            try:
                factor = float(weight)
            except ValueError:
                raise ValueError(f"weight {weight!r} in {match.group(0)!r} of prompt {text!r} is not a number") from None
            weigh(opened["("].pop(), factor)
        elif token == ")" and opened["("]:
            weigh(opened["("].pop(), ROUND)
        elif token == "]" and opened["["]:
            weigh(opened["["].pop(), SQUARE)
        else:  # text, or a bracket with nothing open
            for i, part in enumerate(_BREAK.split(token)):
                pieces += [["BREAK", None], [part, 1.0]] if i else [[part, 1.0]]
    for start in opened["("]:  # brackets left open weigh to the end, round ones first
        weigh(start, ROUND)
    for start in opened["["]:
        weigh(start, SQUARE)

    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and piece[1] is not None and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [BREAK if weight is None else (text, weight) for text, weight in merged]


# A1111's prompt editing [from:to:when] / [to:when] / [from::when] and alternation [a|b], in text whose escaped
# characters are blanked out; AND (in capitals) combines prompts (its composable diffusion).
_SCHEDULED = re.compile(r"\[[^\[\]]*:\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*\]|\[[^\[\]]*\|[^\[\]]*\]")  # a number has a digit
_AND = re.compile(r"\bAND\b")


def refuse_scheduling(prompt: str) -> None:
    """Refuse A1111 syntax that minigen does not run (prompt editing, alternation, AND): read as plain text it
    would change the prompt's meaning without a word."""
    text = re.sub(r"\\.", "  ", prompt)  # an escaped bracket, colon or bar is text
    if found := _SCHEDULED.search(text) or _AND.search(text):
        raise ValueError(f"{found.group(0)!r} in prompt {prompt!r}: A1111's prompt editing, alternation and AND change the prompt "
                         "during sampling or combine prompts, which minigen does not run; write the prompt without it "
                         "(escape a literal bracket as \\[ or write 'and' in lower case)")


@dataclass(frozen=True)
class ChunkedPrompt:
    """A prompt read in A1111's syntax: its tokens in reading order and the chunks they are packed into.

    ``text`` is what the tokens come from: the parsed pieces' texts (without brackets, weights and
    escapes) joined by spaces, as each piece is tokenized on its own: a word split by a bracket,
    "(red)dish", is read as two, "red dish". Token t has id ``ids[t]``, weight ``weights[t]`` and the
    characters ``text[offsets[t][0]:offsets[t][1]]`` (``offsets`` is None from a slow tokenizer, which
    gives none). ``chunks[k]`` lists the tokens of chunk k, in order: at most 75, fewer before a BREAK,
    a comma backtrack or a multi-vector word moved whole, and none between two BREAKs.
    """

    text: str
    ids: list[int]
    weights: list[float]
    offsets: list[tuple[int, int]] | None
    chunks: list[list[int]]

    def positions(self) -> list[int]:
        """Each token's position in the context, the chunks framed and concatenated (``encode_sd1_weighted``):
        chunk k's token j sits at k·77 + 1 + j, after that chunk's BOS."""
        return [k * (CHUNK + 2) + 1 + j for k, chunk in enumerate(self.chunks) for j in range(len(chunk))]


def chunk_prompt(tokenizer, prompt: str) -> ChunkedPrompt:
    """Parse `prompt` (``parse_prompt_attention``), tokenize each piece on its own and pack the tokens into
    chunks of 75 as A1111 does (module docstring: a chunk ends at a BREAK, or when full, then at its last comma
    if that lies within its last 20 tokens; a multi-vector textual-inversion word moves whole to the next
    chunk). A1111's scheduling syntax is refused (``refuse_scheduling``), and so is a tokenizer without
    CLIP's BPE (T5's)."""
    refuse_scheduling(prompt)
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    if comma == tokenizer.unk_token_id:
        raise ValueError(f"A1111's prompt syntax reads prompts with CLIP's BPE tokenizer (words ending in </w>, chunks ending at "
                         f"\",</w>\"); {type(tokenizer).__name__} has none of its tokens (T5's reads prompts in the plain syntax only)")
    pieces = parse_prompt_attention(prompt)
    texts = [text for text, weight in pieces if (text, weight) != BREAK]
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False, return_offsets_mapping=tokenizer.is_fast)
    offsets = None
    if tokenizer.is_fast:  # each piece's offsets moved to where it starts in the text, pieces one space apart
        starts = accumulate((len(text) + 1 for text in texts), initial=0)
        offsets = [(start + a, start + b) for start, piece in zip(starts, encoded.offset_mapping) for a, b in piece]
    piece_ids = iter(encoded.input_ids)
    per_piece = [None if piece == BREAK else next(piece_ids) for piece in pieces]  # None: a BREAK
    weights = [weight for (_, weight), ids in zip(pieces, per_piece) if ids is not None for _ in ids]
    chunks = _packed(per_piece, comma, _embedding_groups(tokenizer))
    return ChunkedPrompt(" ".join(texts), [i for ids in per_piece if ids is not None for i in ids], weights, offsets, chunks)


def _packed(per_piece: list[list[int] | None], comma: int, groups: dict[int, list[int]]) -> list[list[int]]:
    """How the pieces' token ids (None for a BREAK) pack into chunks (``chunk_prompt``): each chunk a list of
    token indices, the pieces' tokens counted in order. `groups`: the multi-vector words (``_embedding_groups``)."""
    chunks: list[list[int]] = []
    chunk: list[int] = []  # the chunk being filled: at most 75 token indices
    last_comma = -1  # its index in the chunk, -1: none yet
    first = 0  # the index of the piece's first token

    def end_chunk() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk)
        chunk, last_comma = [], -1

    for piece_ids in per_piece:
        if piece_ids is None:
            end_chunk()
            continue
        i = 0
        while i < len(piece_ids):
            if piece_ids[i] == comma:
                last_comma = len(chunk)
            elif len(chunk) == CHUNK and last_comma >= CHUNK - COMMA_BACKTRACK:  # full: end it at the comma
                chunk, moved = chunk[: last_comma + 1], chunk[last_comma + 1 :]
                end_chunk()
                chunk = moved
            if len(chunk) == CHUNK:
                end_chunk()
            group = groups.get(piece_ids[i], [piece_ids[i]])  # one id, or the ids of a multi-vector embedding
            n = len(group) if piece_ids[i : i + len(group)] == group else 1
            if len(chunk) + n > CHUNK:
                end_chunk()
            chunk, i = chunk + list(range(first + i, first + i + n)), i + n
        first += len(piece_ids)
    if chunk or not chunks:
        end_chunk()
    return chunks


def prompt_chunks(tokenizer, prompt: str) -> tuple[Tensor, Tensor]:
    """Token ids [k, 77] and their weights [k, 77] of one prompt, in chunks of 75 (module docstring, ``chunk_prompt``).

    Each row is ``[BOS, tokens, EOS, padding]``; BOS, EOS and padding weigh 1.
    """
    chunked = chunk_prompt(tokenizer, prompt)
    rows = [_framed(tokenizer, [chunked.ids[t] for t in chunk], [chunked.weights[t] for t in chunk]) for chunk in chunked.chunks]
    return torch.tensor([ids for ids, _ in rows]), torch.tensor([weights for _, weights in rows])


def chunk_count(tokenizer, prompts: str | Sequence[str]) -> int:
    """How many 77-token chunks the longest of `prompts` takes (at least 1). Encode a prompt and its
    negative with ``min_chunks`` = the larger of their counts so that CFG can stack them (SDXL: the
    larger over both tokenizers; with textual inversion, count the expanded prompts)."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    return max(len(chunk_prompt(tokenizer, prompt).chunks) for prompt in prompts)


def encode_sd1_weighted(
    text_encoder, tokenizer, prompts: str | Sequence[str], clip_skip: int = 0, min_chunks: int = 1
) -> Tensor:
    """SD1.x context [B, 77 k, 768] of prompts of any length, with A1111's weights (module docstring).

    k: the chunks of the longest prompt, at least `min_chunks`; shorter prompts end in empty chunks
    (the encoding of ""). `clip_skip` as in ``encode_sd1``. Gradients flow.
    """
    ids, weights = _batch_chunks(tokenizer, prompts, min_chunks)  # [k, B, 77] each
    ids = ids.to(text_encoder.device)
    contexts = []
    for chunk_ids, chunk_weights in zip(ids, weights):
        if not clip_skip:
            z = text_encoder(chunk_ids).last_hidden_state  # [B, 77, C]
        else:
            hidden = text_encoder(chunk_ids, output_hidden_states=True).hidden_states
            check_clip_skip(clip_skip, len(hidden))
            z = tower(text_encoder, "text_model").final_layer_norm(hidden[-(clip_skip + 1)])
        contexts.append(emphasize(z, chunk_weights))
    return torch.cat(contexts, dim=1)  # [B, 77 k, C]


def encode_sdxl_weighted(
    text_encoder,
    tokenizer,
    text_encoder_2,
    tokenizer_2,
    prompts: str | Sequence[str],
    clip_skip: int = 0,
    min_chunks: int = 1,
) -> tuple[Tensor, Tensor]:
    """SDXL (context [B, 77 k, 768 + 1280], pooled [B, 1280]) of prompts of any length, with weights.

    Per chunk as ``encode_sdxl``: both encoders' penultimate layers (``clip_skip`` further back), each
    weighted and mean-restored on its own, concatenated along channels. pooled: bigG's at the EOS of
    the FIRST chunk, unweighted (A1111's choice). Each encoder reads its own tokenizer's chunks.
    """
    ids_1, weights_1 = _batch_chunks(tokenizer, prompts, min_chunks)  # [k, B, 77]
    ids_2, weights_2 = _batch_chunks(tokenizer_2, prompts, len(ids_1))
    if len(ids_2) > len(ids_1):  # the tokenizers may split a prompt apart ("!" is special in bigG's)
        ids_1, weights_1 = _batch_chunks(tokenizer, prompts, len(ids_2))
    ids_1, ids_2 = ids_1.to(text_encoder.device), ids_2.to(text_encoder_2.device)
    contexts = []
    for i in range(len(ids_1)):
        out_1 = text_encoder(ids_1[i], output_hidden_states=True)  # hidden_states: embeddings, then one per layer
        out_2 = text_encoder_2(ids_2[i], output_hidden_states=True)
        check_clip_skip(clip_skip, min(len(out_1.hidden_states), len(out_2.hidden_states)), reads=2)
        layer = -(clip_skip + 2)
        z_1 = emphasize(out_1.hidden_states[layer], weights_1[i])  # [B, 77, 768]
        z_2 = emphasize(out_2.hidden_states[layer], weights_2[i])  # [B, 77, 1280]
        contexts.append(torch.cat([z_1, z_2], dim=-1))
        if i == 0:
            eos_position = (ids_2[0] == tokenizer_2.eos_token_id).int().argmax(dim=1)  # [B]: first EOS of each row
            rows = torch.arange(len(eos_position), device=eos_position.device)
            pooled = text_encoder_2.text_projection(out_2.last_hidden_state[rows, eos_position])  # [B, 1280]
    return torch.cat(contexts, dim=1), pooled


def emphasize(z: Tensor, weights: Tensor) -> Tensor:
    """A1111's "Original" emphasis: z [B, 77, C] times each position's weight [B, 77], then rescaled
    so that each row keeps the mean it had (all weights 1: z unchanged, bit for bit)."""
    weights = weights.to(z)[..., None]  # [B, 77, 1]
    if (weights == 1).all():
        return z  # nothing weighted in this chunk (and no 0 / 0 where a row's mean is 0)
    before = z.mean(dim=(1, 2), keepdim=True)  # [B, 1, 1]
    z = z * weights
    return z * (before / z.mean(dim=(1, 2), keepdim=True))


def _framed(tokenizer, ids: list[int], weights: list[float]) -> tuple[list[int], list[float]]:
    """One chunk as CLIP reads it: [BOS, ids, EOS, padding] and weights 1 around the prompt's (77 each)."""
    padding = CHUNK - len(ids)
    framed = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding
    return framed, [1.0, *weights, 1.0] + [1.0] * padding


def _batch_chunks(tokenizer, prompts: str | Sequence[str], min_chunks: int) -> tuple[Tensor, Tensor]:
    """Ids and weights [k, B, 77] of a batch: chunk i of every prompt, empty chunks after a short one."""
    if min_chunks < 1:
        raise ValueError(f"min_chunks must be at least 1, got {min_chunks}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    per_prompt = [prompt_chunks(tokenizer, prompt) for prompt in prompts]  # ([k_b, 77], [k_b, 77])
    k = max([min_chunks, *(len(ids) for ids, _ in per_prompt)])
    empty_ids, empty_weights = (torch.tensor(row) for row in _framed(tokenizer, [], []))
    ids = [torch.cat([rows, empty_ids.expand(k - len(rows), -1)]) for rows, _ in per_prompt]
    weights = [torch.cat([rows, empty_weights.expand(k - len(rows), -1)]) for _, rows in per_prompt]
    return torch.stack(ids, dim=1), torch.stack(weights, dim=1)


def _embedding_groups(tokenizer) -> dict[int, list[int]]:
    """{id of w: ids of w, w_1, ..., w_{n-1}} for each multi-vector word the tokenizer was given
    (``minigen.loading.textual_inversion`` and diffusers name the vectors so)."""
    added = tokenizer.added_tokens_encoder  # token -> id
    groups = {}
    for token, first in added.items():
        n = 1
        while f"{token}_{n}" in added:
            n += 1
        if n > 1:
            groups[first] = [first] + [added[f"{token}_{i}"] for i in range(1, n)]
    return groups
