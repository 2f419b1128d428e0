"""Textual-inversion embeddings: new prompt words whose input token embeddings were learned.

A file holds n vectors per text encoder. Loading it gives the word n tokens in each tokenizer,
``word``, ``word_1``, ..., ``word_{n-1}`` (diffusers' names), and appends their vectors as new rows
of each text encoder's token table. A prompt names the word once; ``expand_textual_inversion``
writes out its n tokens, which the pipelines do before any encoding (plain or weighted):

    word = load_textual_inversion(pipe.text_encoders, pipe.tokenizers, "embeddings/charturner.pt", allow_pickle=True)
    pipe.generate("charturner, a knight")  # reads "charturner charturner_1 ... charturner_14, a knight"
    expand_textual_inversion(pipe.tokenizers[0], "charturner, a knight")  # that text, to encode it yourself

Files (every one read by ``minigen.loading.files.read_state_dict``: pickles only with ``allow_pickle``):

    A1111 .pt             {"string_to_param": {"*": [n, C]}, "name": ...}  (a pickle)
    A1111 .safetensors    {"emb_params": [n, C]}
    diffusers             learned_embeds.safetensors / .bin: {word: [C] or [n, C]}
    SDXL                  {"clip_l": [n, 768], "clip_g": [n, 1280]}: one set per text encoder

The word is ``token`` if given, else a diffusers file's key (the word it was trained as), else the
file's stem (A1111's rule: ``EasyNegative.safetensors`` is the word ``EasyNegative``; A1111 ignores a
.pt's stored "name", diffusers reads it). The tokenizer matches added words regardless of case.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from minigen.loading.coverage import non_finite
from minigen.loading.detect import CheckpointError
from minigen.loading.files import read_state_dict
from minigen.transformers_compat import tower

MAX_VECTORS = 75  # one 77-token chunk holds 75 prompt tokens
WIDTHS = {  # token embedding width -> the text encoder it belongs to
    768: "CLIP-L: SD1.x, or SDXL's clip_l",
    1024: "OpenCLIP-H: SD2.x",
    1280: "OpenCLIP-bigG: SDXL's clip_g",
}
SYNTAX = "()[]:\\"  # characters the weighted-prompt parser would take out of a word


@dataclass(frozen=True)
class Embedding:
    name: str  # a diffusers file's key, else the file's stem
    vectors: tuple[Tensor, ...]  # one [n, C] per text encoder: (the one encoder's,) or (clip_l, clip_g)


def is_embedding(keys: Iterable[str]) -> bool:
    """Whether a file's tensor names are an embedding's in the formats above, a diffusers file aside (any name is its word)."""
    keys = list(keys)
    return bool(keys) and all(key in ("emb_params", "clip_l", "clip_g") or key.startswith("string_to_param.") for key in keys)


def read_textual_inversion(path: str | Path, *, allow_pickle: bool = False) -> Embedding:
    """The vectors of an embedding file in any of the formats above, checked (2-D, finite, n <= 75)."""
    state = read_state_dict(path, allow_pickle=allow_pickle)
    stem, keys = Path(path).stem, sorted(state)
    params = [key for key in keys if key.startswith("string_to_param.")]
    if {"clip_l", "clip_g"} <= state.keys():
        name, vectors = stem, (state["clip_l"], state["clip_g"])
    elif state.keys() == {"clip_l"}:  # SDXL's format holding CLIP-L's vectors alone: an SD1.x embedding
        name, vectors = stem, (state["clip_l"],)
    elif "clip_g" in state:
        raise CheckpointError(f"{path} holds clip_g without clip_l: an SDXL embedding needs the vectors of both text encoders")
    elif "emb_params" in state:
        name, vectors = stem, (state["emb_params"],)
    elif len(params) == 1:
        name, vectors = stem, (state[params[0]],)
    elif len(state) == 1 and not params:
        name, vectors = keys[0], (state[keys[0]],)
    else:
        raise CheckpointError(
            f"{path} is not a textual-inversion embedding: expected string_to_param (A1111 .pt), emb_params, "
            f"clip_l and clip_g (SDXL), or a single {{word: vectors}} (diffusers); it holds {keys[:6]}"
        )
    vectors = tuple(v[None] if v.dim() == 1 else v for v in vectors)  # a diffusers [C] is one vector
    for v in vectors:
        if v.dim() != 2 or not v.is_floating_point() or not 1 <= len(v) <= MAX_VECTORS:
            shape = f"{v.dtype} {list(v.shape)}"
            raise CheckpointError(f"{path}: embedding vectors must be a float [n, C] with 1 <= n <= {MAX_VECTORS}, got {shape}")
    if non_finite({str(i): v for i, v in enumerate(vectors)}):
        raise CheckpointError(f"{path}: the embedding holds NaN or infinite values")
    if len({len(v) for v in vectors}) > 1:
        raise CheckpointError(f"{path}: clip_l has {len(vectors[0])} vectors but clip_g {len(vectors[1])}; they must match")
    return Embedding(name, vectors)


def load_textual_inversion(
    text_encoders: Sequence[nn.Module],
    tokenizers: Sequence,
    path: str | Path,
    token: str | None = None,
    *,
    allow_pickle: bool = False,
) -> str:
    """Add the embedding of `path` to the tokenizers and text encoders (in place); return its word.

    `text_encoders` and `tokenizers` are the pipeline's: [CLIP-L] (SD1.x) or [CLIP-L, bigG] (SDXL).
    Refused before anything changes: a file for other text encoders (an SD1.5 embedding on SDXL, an
    SD2 one on SD1.5, an SDXL one on SD1.5), a token any tokenizer already has (a word loaded before, or
    one of CLIP's vocabulary entries as they are), a word that would read as one word's vectors with a
    loaded one (`w` and `w_1`), a word with the prompt syntax characters ()[]:\\ in it. A whole word of
    CLIP's vocabulary (an entry "realism</w>") is taken over, as A1111 takes it for an embedding file named
    "realism": every "realism" of a prompt then reads the embedding. A pickle without `allow_pickle` is a
    PermissionError.
    """
    if len(text_encoders) != len(tokenizers):
        raise ValueError(f"got {len(text_encoders)} text encoders but {len(tokenizers)} tokenizers")
    embedding = read_textual_inversion(path, allow_pickle=allow_pickle)
    word = embedding.name if token is None else token
    if not word.strip() or any(c in SYNTAX for c in word):
        raise ValueError(f"{word!r} cannot be a prompt word: it must be non-empty without any of {SYNTAX}; pass token=")
    tables = [tower(encoder, "text_model").embeddings.token_embedding for encoder in text_encoders]
    file_widths = [v.shape[1] for v in embedding.vectors]
    model_widths = [table.embedding_dim for table in tables]
    if file_widths != model_widths:
        described = lambda widths: " + ".join(f"{w} ({WIDTHS.get(w, 'unknown')})" for w in widths)  # noqa: E731
        raise CheckpointError(
            f"{path}: the embedding is for text encoders {described(file_widths)}, but this model's are "
            f"{described(model_widths)}. Use an embedding trained for this model's family."
        )
    names = [word] + [f"{word}_{i}" for i in range(1, len(embedding.vectors[0]))]
    for tokenizer in tokenizers:
        vocabulary = {entry.lower() for entry in tokenizer.get_vocab()}  # added words match in any case
        if taken := [name for name in names if name.lower() in vocabulary]:
            raise ValueError(
                f"{taken[0]!r} is already a token of the tokenizer (loaded before, or a word of CLIP's "
                f"vocabulary): pass token= another word for {path} (sample.py --embedding: rename the file, its name is the word)"
            )
        # `expand_textual_inversion` reads w, w_1, w_2, ... as one word's vectors: two words named so would merge
        added = {t.content.lower() for t in tokenizer.added_tokens_decoder.values() if not t.special}
        stem = re.fullmatch(r"(.+)_\d+", word.lower())
        if clash := [entry for entry in added if (stem and entry == stem.group(1)) or re.fullmatch(rf"{re.escape(word.lower())}_\d+", entry)]:
            raise ValueError(f"{word!r} and the loaded {clash[0]!r} would read as one word's vectors (w, w_1, ...): pass token= "
                             f"another word for {path} (sample.py --embedding: rename the file)")
    for encoder, tokenizer, table, vectors in zip(text_encoders, tokenizers, tables, embedding.vectors):
        tokenizer.add_tokens(names)
        _set_rows(encoder, table, tokenizer.convert_tokens_to_ids(names), vectors)
    return word


def expand_textual_inversion(tokenizer, prompts: str | list[str]) -> str | list[str]:
    """`prompts` with each multi-vector word ``w`` written out as ``w w_1 ... w_{n-1}``, in any case,
    as diffusers' ``maybe_convert_prompt`` does (the pipelines do it for you), to the prompt text before
    encoding; a longer added word wins over a shorter one it starts with (the tokenizer's rule), ``w_1``
    stays, a word written out already is left as it is, and a word with spaces matches any run of spaces."""
    added = [t.content for t in tokenizer.added_tokens_decoder.values() if not t.special]
    expansions = {}
    for word in added:
        n = 1
        while f"{word}_{n}" in added:
            n += 1
        if n > 1:
            expansions[word.lower()] = " ".join([word] + [f"{word}_{i}" for i in range(1, n)])
    if not expansions:
        return prompts

    def alternative(word: str) -> str:  # any run of spaces where the word has one, as the tokenizer matches it;
        spaced = r"\s+".join(re.escape(part) for part in word.split())  # a word written out already stays as it is
        return spaced + (rf"(?!\s+{re.escape(word)}_1)" if word.lower() in expansions else "")

    pattern = re.compile("|".join(alternative(w) for w in sorted(added, key=len, reverse=True)), re.IGNORECASE)
    expand = lambda text: pattern.sub(lambda m: expansions.get(" ".join(m.group(0).lower().split()), m.group(0)), text)  # noqa: E731
    return expand(prompts) if isinstance(prompts, str) else [expand(p) for p in prompts]


def _set_rows(encoder: nn.Module, table: nn.Embedding, ids: list[int], vectors: Tensor) -> None:
    """Rows `ids` of the token table := `vectors` [n, C], the table grown (new rows zero) to hold them."""
    rows = max(table.num_embeddings, max(ids) + 1)
    if rows > table.num_embeddings:
        old = table.weight
        grown = torch.zeros(rows, old.shape[1], dtype=old.dtype, device=old.device)
        grown[: len(old)] = old.detach()
        table.weight = nn.Parameter(grown, requires_grad=old.requires_grad)
        table.num_embeddings = encoder.config.vocab_size = rows
    with torch.no_grad():
        table.weight[ids] = vectors.to(table.weight)
