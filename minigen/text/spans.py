"""Find where a phrase of the prompt sits in the token sequence a text encoder reads.

Attention-based controls (concept masks, token reweighting, cross-attention maps) address text
tokens by position. ``token_span`` returns those positions for a phrase. It works with the CLIP
tokenizers of SD1.x / SDXL (77 tokens, BOS first) and with FLUX's T5 tokenizer (512 or 256 tokens,
no BOS):

    CLIP, prompt "a photorealistic Cat, on a mat"
    tokens  <|startoftext|> a  photo realistic  cat  ,  on  a  mat <|endoftext|> ...
    index   0               1  2     3          4    5  6   7  8   9
    token_span(tok, prompt, "cat")             -> [4]
    token_span(tok, prompt, "photorealistic")  -> [2, 3]
    token_span(tok, prompt, "a", occurrence=1) -> [7]

    T5, prompt "A statue is reading the book"
    tokens  ▁A  ▁statue  ▁is  ▁reading  ▁the  ▁book  </s>  <pad> ...
    index   0   1        2    3         4     5      6     7
    token_span(t5_tok, prompt, "book")         -> [5]

Matching compares token ids, so it inherits the tokenizer's normalisation: CLIP lowercases and splits
punctuation off words, hence "Cat," in the prompt matches the phrase "cat"; T5 keeps case, so "Book"
does not match "book".

A match must cover whole words. The two vocabularies mark words differently:

- CLIP's BPE marks the *last* piece of each word with ``</w>``: a match starts right after a token
  ending in ``</w>`` (or after BOS or an added token such as a placeholder ``<sks>``), and it ends a
  word because the phrase's own last token carries ``</w>``. So "realistic" does not match the tail
  of "photorealistic".
- T5's sentencepiece marks the *first* piece of each word with ``▁``: a match starts at a token
  starting with ``▁`` (or right after an added token), and the token after it must not continue the
  word (it starts a new word, is a special token, or begins with punctuation). So "books" does not
  match "bookshelf" (``▁books h elf``). Sentencepiece glues leading punctuation to a word: in
  "(book)" the word piece is ``book`` without ``▁``, so pass "(book" to find it.

A loaded multi-vector textual-inversion word ``w`` is read as ``w w_1 ... w_{n-1}`` (the pipelines
write it out before encoding, `expand_textual_inversion`): the prompt and the phrase are written out
the same way here, so the positions are those the encoder reads and the word's span covers its vectors.

``syntax="a1111"`` finds the phrase in the prompt as ``generate(prompt_syntax="a1111")`` reads it
(minigen/text/weighting.py): brackets, weights and BREAK parsed away, each piece tokenized on its own,
the tokens packed into chunks framed as [BOS, 75 tokens, EOS] and concatenated. The phrase is plain
words; it matches the tokens in reading order under the same whole-word rules, the text that decides
them being the parsed pieces joined. A position is chunk·77 + 1 + the token's index in its chunk:

    CLIP, prompt "a (red:1.3) cat, BREAK a [dog]"
    chunk 0  <|startoftext|> a  red  cat  ,  <|endoftext|> ...   positions 0..76
    chunk 1  <|startoftext|> a  dog  <|endoftext|> ...            positions 77..153
    token_span(tok, prompt, "red cat", syntax="a1111")  -> [2, 3]
    token_span(tok, prompt, "dog", syntax="a1111")      -> [79]

A phrase across a chunk boundary (a full chunk, or a BREAK) keeps its tokens' positions, which then
skip the EOS, padding and BOS between them. Nothing is truncated. T5 has no a1111 syntax.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from minigen.loading.textual_inversion import expand_textual_inversion
from minigen.text.weighting import chunk_prompt

CLIP_WORD_END = "</w>"  # BPE suffix of a word's last piece
SENTENCEPIECE_WORD_START = "▁"  # sentencepiece prefix of a word's first piece (U+2581)
SYNTAXES = ("plain", "a1111")  # generate's prompt_syntax
A1111_PHRASE = "; in the a1111 syntax pass the words without brackets, weights or BREAK (a word split by a bracket is two words)"


def token_span(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    phrase: str,
    occurrence: int = 0,
    max_length: int | None = None,
    *,
    syntax: str = "plain",
) -> list[int]:
    """Positions of ``phrase``'s tokens in the padded token sequence of ``prompt``.

    CLIP: position 0 is BOS, so the prompt's first token is at 1. T5: there is no BOS, so it is at 0.
    ``occurrence`` picks which match when the phrase appears several times (0 = first).
    ``max_length`` is the sequence length the encoder reads; default ``tokenizer.model_max_length``
    (77 for CLIP; a loaded FLUX pipeline's T5 tokenizer holds the pipeline's ``max_length``: 512 dev,
    256 schnell; pass ``pipe.max_length`` when a pipeline reads another length than it was loaded with). Raises ValueError when the
    phrase is not in the prompt, when there are fewer matches than ``occurrence + 1``, or when the
    match lies past the tokens that survive truncation (the last position always holds EOS).

    ``syntax="a1111"`` reads the prompt as ``generate(prompt_syntax="a1111")`` does (module docstring): the
    positions are those of the chunks' concatenated context, any length is read (no ``max_length``), and the
    phrase is plain words, without brackets or weights. CLIP tokenizers only.
    """
    if isinstance(occurrence, bool) or not isinstance(occurrence, int) or occurrence < 0:
        raise ValueError(f"occurrence counts the phrase's matches from 0 (the first), got {occurrence!r}")
    last_readable = last_read_position(tokenizer, max_length, syntax=syntax)
    spans, phrase_ids, reading = _matches(tokenizer, prompt, phrase, syntax)
    if not spans:
        a1111 = syntax == "a1111"  # the words as parsed, each piece apart
        raise ValueError(
            f"Phrase {phrase!r} is not in prompt {prompt!r} (looked for token ids {phrase_ids} at word "
            "boundaries). Pass whole words copied from the prompt; surrounding punctuation does not matter "
            f"(case does for T5, not for CLIP){A1111_PHRASE if a1111 else ''}. The prompt's words: {(reading.text if a1111 else prompt).split()}"
        )
    if occurrence >= len(spans):
        raise ValueError(
            f"Phrase {phrase!r} occurs {len(spans)} time(s) in prompt {prompt!r}, so occurrence={occurrence} "
            f"does not exist; pass occurrence between 0 and {len(spans) - 1}."
        )
    span = spans[occurrence]
    if last_readable is not None and span[-1] > last_readable:
        raise ValueError(
            f"Phrase {phrase!r} sits at token positions {span[0]}..{span[-1]} of prompt {prompt!r}, but the "
            f"text encoder reads only positions {reading.first}..{last_readable}; the rest is truncated. Shorten the "
            "prompt or move the phrase earlier."
        )
    return span


def checked_span(span: Iterable[int] | torch.Tensor, what: str, length: int | None = None) -> list[int]:
    """A span of token positions, given as whole numbers or a 1-D integer tensor or NumPy array, as a list of ints,
    each in 0..length - 1 (0 or more while the text's `length` is not known); the errors call the span `what`.
    Positions count from the first token: -1 is refused, not read as the last."""
    if hasattr(span, "ndim"):  # a tensor or a NumPy array: its values, if it is 1-D
        positions = span.tolist() if span.ndim == 1 else None
    else:
        positions = list(span) if isinstance(span, Iterable) and not isinstance(span, str) else None
    if positions is None or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in positions):
        given = f"a {span.ndim}-D {span.dtype} {type(span).__name__}" if hasattr(span, "ndim") else repr(span)[:80]
        raise ValueError(f"{what} must be token positions, whole numbers or a 1-D integer tensor (token_span finds them), got {given}")
    positions = [int(i) for i in positions]
    if length is None and (bad := [i for i in positions if i < 0]):
        raise ValueError(f"{what} holds negative positions {bad}: positions count from the first token, 0 (-1 is not the last)")
    if length is not None and (bad := [i for i in positions if not 0 <= i < length]):
        raise ValueError(f"{what} holds positions {bad}, outside the prompt's {length} tokens: give positions in 0..{length - 1}")
    return positions


def token_spans(tokenizer: PreTrainedTokenizerBase, prompt: str, phrase: str, *, syntax: str = "plain") -> list[list[int]]:
    """`token_span` of every whole-word occurrence of `phrase` in `prompt`, in order, truncation aside
    (compare each span's last position with `last_read_position`); [] when it does not occur."""
    return _matches(tokenizer, prompt, phrase, syntax)[0]


def same_for_every_encoder(
    tokenizers: Sequence[PreTrainedTokenizerBase], prompt: str, prompt_2: str | None,
    positions_of: Callable[[PreTrainedTokenizerBase, str], list[int]], what: str,
) -> list[int]:
    """`positions_of(tokenizer, prompt)` for each of a pipeline's text encoders: its tokenizer and the prompt it
    reads (SDXL's second reads `prompt_2` where the generation gives one). They must agree: SDXL joins its two
    encoders' contexts channel by channel, so a position names one token only where both put it there. Even on
    one prompt they differ where diffusers' second tokenizer reads "!" as a token of its own
    (minigen/text/tokenizer.py)."""
    if prompt_2 is not None and len(tokenizers) < 2:
        raise ValueError("prompt_2 is what SDXL's second text encoder reads; this pipeline has one text encoder: drop prompt_2")
    prompts = [prompt, prompt if prompt_2 is None else prompt_2][: len(tokenizers)]
    found = [positions_of(tokenizer, text) for tokenizer, text in zip(tokenizers, prompts)]
    if any(other != found[0] for other in found[1:]):
        fix = "SDXL's second tokenizer reads '!' as a token of its own; write the prompt without '!'" if prompt_2 is None else \
            "prompt_2 names it elsewhere; write it at the same place in both prompts"  # fmt: skip
        raise ValueError(f"{what} sits at token positions {found[0]} for the first text encoder but at {found[1]} for the second: {fix}")
    return found[0]


def last_read_position(tokenizer: PreTrainedTokenizerBase, max_length: int | None = None, *, syntax: str = "plain") -> int | None:
    """The last position of a prompt's tokens that the text encoder reads: ``max_length - 2`` in the plain syntax
    (truncation keeps EOS at ``max_length - 1``; ``max_length`` defaults to ``tokenizer.model_max_length``), None
    in the a1111 syntax, which reads any length (a ``max_length`` given with it is refused)."""
    if _checked(syntax) == "a1111":
        if max_length is not None:
            raise ValueError(f"max_length={max_length} is where a plain prompt is cut; the a1111 syntax reads prompts of any length "
                             "in chunks of 77: drop max_length")
        return None
    return (tokenizer.model_max_length if max_length is None else max_length) - 2


def _checked(syntax: str) -> str:
    if syntax not in SYNTAXES:
        raise ValueError(f"prompt syntax must be 'plain' or 'a1111' (as generate's prompt_syntax), got {syntax!r}")
    return syntax


@dataclass(frozen=True)
class _Reading:
    """A prompt's tokens in reading order, framed for the word search: ``ids`` are BOS (CLIP) and EOS around the
    prompt's tokens, which start at index ``first`` (in the a1111 syntax one frame around every chunk's tokens,
    not what the encoder reads); ``tokens`` their strings; ``offsets`` each token's characters in ``text``, the
    text they come from (None from a slow tokenizer); ``positions``: where each of the prompt's tokens
    (``ids[first:-1]``) sits in the context the encoder gives."""

    text: str
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]] | None
    positions: list[int]
    first: int


def _matches(tokenizer: PreTrainedTokenizerBase, prompt: str, phrase: str, syntax: str) -> tuple[list[list[int]], list[int], _Reading]:
    """Every whole-word match of `phrase` in the tokens of `prompt` read in `syntax` (context positions,
    untruncated), the phrase's token ids, and the prompt's reading. Multi-vector textual-inversion words
    are written out in both first, as the pipelines encode them."""
    _checked(syntax)
    written_prompt, written_phrase = expand_textual_inversion(tokenizer, [prompt, phrase])
    encoded = tokenizer(written_phrase, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    phrase_ids = encoded.input_ids
    if not phrase_ids:
        raise ValueError(f"Phrase {phrase!r} has no tokens; pass a word or words of the prompt {prompt!r}.")
    reading = (_plain_reading if syntax == "plain" else _a1111_reading)(tokenizer, written_prompt)
    added = set(tokenizer.get_added_vocab())  # BOS, EOS, padding and placeholders: never inside a word
    ids, tokens, offsets, n = reading.ids, reading.tokens, reading.offsets, len(phrase_ids)
    if offsets is not None:  # where the phrase's own tokens touch in its text
        phrase_tokens = tokenizer.convert_ids_to_tokens(phrase_ids)
        joins = [_glued(written_phrase, encoded.offset_mapping, phrase_tokens, k, added) for k in range(n - 1)]
    starts = [
        i
        for i in range(reading.first, len(ids) - n)  # the last token is EOS, never part of a phrase
        if ids[i : i + n] == phrase_ids and _starts_word(tokens, i, added) and _ends_word(tokens, i + n, added)
        and (offsets is None or _same_words(reading.text, offsets, tokens, i, joins, added))
    ]
    return [reading.positions[i - reading.first : i - reading.first + n] for i in starts], phrase_ids, reading


def _plain_reading(tokenizer: PreTrainedTokenizerBase, prompt: str) -> _Reading:
    """`prompt` tokenized whole, as ``tokenize`` and T5's encoding read it (untruncated): position = index."""
    encoded = tokenizer(prompt, verbose=False, return_offsets_mapping=tokenizer.is_fast)
    ids = encoded.input_ids  # [BOS?, ..., EOS], not truncated
    tokens = tokenizer.convert_ids_to_tokens(ids)
    if tokenizer.is_fast:  # T5's <unk> stands for characters its vocabulary lacks: a letter ("dog狗") continues the word
        tokens = ["x" if t == tokenizer.unk_token and any(c.isalnum() for c in prompt[start:end]) else t
                  for t, (start, end) in zip(tokens, encoded.offset_mapping)]  # fmt: skip
    first = 1 if tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else 0
    offsets = encoded.offset_mapping if tokenizer.is_fast else None
    return _Reading(prompt, ids, tokens, offsets, list(range(first, len(ids) - 1)), first)


def _a1111_reading(tokenizer: PreTrainedTokenizerBase, prompt: str) -> _Reading:
    """`prompt` read in A1111's syntax (``chunk_prompt``): its tokens in reading order between one BOS and one
    EOS, each at its position in the chunks' context, with offsets in the parsed text."""
    chunked = chunk_prompt(tokenizer, prompt)
    ids = [tokenizer.bos_token_id, *chunked.ids, tokenizer.eos_token_id]
    end = len(chunked.text)
    offsets = None if chunked.offsets is None else [(0, 0), *chunked.offsets, (end, end)]  # BOS's, EOS's: added tokens, which glue to nothing
    return _Reading(chunked.text, ids, tokenizer.convert_ids_to_tokens(ids), offsets, chunked.positions(), 1)


def _same_words(text: str, offsets: list[tuple[int, int]], tokens: list[str], start: int, joins: list[bool], added: set[str]) -> bool:
    """Whether the tokens from `start` on are the phrase's words as written: glued to no neighbour outside them,
    and touching each other where the phrase's tokens touch (`joins`), not elsewhere. CLIP gives every digit a
    word of its own, so its tokens alone would find "3" in "1930", "k" in "4k" and "a 4k" in "a4k"."""
    end = start + len(joins) + 1
    inside = [_glued(text, offsets, tokens, k, added) for k in range(start, end - 1)]
    return not _glued(text, offsets, tokens, start - 1, added) and not _glued(text, offsets, tokens, end - 1, added) and inside == joins


def _glued(text: str, offsets: list[tuple[int, int]], tokens: list[str], k: int, added: set[str]) -> bool:
    """Whether tokens k and k + 1 touch in the text where a letter or digit meets a letter or digit (pieces of one
    word). Offsets, not the raw text, decide, since the tokenizer's clean-up maps "&amp;" to "&". Added words
    (placeholders) and special tokens glue to nothing."""
    if k < 0 or k + 1 >= len(tokens) or tokens[k] in added or tokens[k + 1] in added:
        return False
    (_, end), (start, _) = offsets[k], offsets[k + 1]
    return end == start and text[end - 1].isalnum() and text[start].isalnum()


def _starts_word(tokens: list[str], i: int, added: set[str]) -> bool:
    """True when a word begins at ``tokens[i]``."""
    if tokens[i].startswith(SENTENCEPIECE_WORD_START):
        return True
    return i > 0 and (tokens[i - 1].endswith(CLIP_WORD_END) or tokens[i - 1] in added)


def _ends_word(tokens: list[str], end: int, added: set[str]) -> bool:
    """True when the word of ``tokens[end - 1]`` does not continue into ``tokens[end]``."""
    last, following = tokens[end - 1], tokens[end]
    return (
        last.endswith(CLIP_WORD_END)
        or last in added
        or following in added
        or following.startswith(SENTENCEPIECE_WORD_START)
        or not following[0].isalnum()  # punctuation such as "," or "'s"
    )
