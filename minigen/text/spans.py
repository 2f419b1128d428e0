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
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from minigen.loading.textual_inversion import expand_textual_inversion

CLIP_WORD_END = "</w>"  # BPE suffix of a word's last piece
SENTENCEPIECE_WORD_START = "▁"  # sentencepiece prefix of a word's first piece (U+2581)


def token_span(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    phrase: str,
    occurrence: int = 0,
    max_length: int | None = None,
) -> list[int]:
    """Positions of ``phrase``'s tokens in the padded token sequence of ``prompt``.

    CLIP: position 0 is BOS, so the prompt's first token is at 1. T5: there is no BOS, so it is at 0.
    ``occurrence`` picks which match when the phrase appears several times (0 = first).
    ``max_length`` is the sequence length the encoder reads; default ``tokenizer.model_max_length``
    (77 for CLIP; a loaded FLUX pipeline's T5 tokenizer holds the pipeline's ``max_length``: 512 dev,
    256 schnell; pass ``pipe.max_length`` when a pipeline reads another length than it was loaded with). Raises ValueError when the
    phrase is not in the prompt, when there are fewer matches than ``occurrence + 1``, or when the
    match lies past the tokens that survive truncation (the last position always holds EOS).
    """
    if isinstance(occurrence, bool) or not isinstance(occurrence, int) or occurrence < 0:
        raise ValueError(f"occurrence counts the phrase's matches from 0 (the first), got {occurrence!r}")
    spans, phrase_ids, first = _matches(tokenizer, prompt, phrase)
    if not spans:
        raise ValueError(
            f"Phrase {phrase!r} is not in prompt {prompt!r} (looked for token ids {phrase_ids} at word "
            "boundaries). Pass whole words copied from the prompt; surrounding punctuation does not matter "
            f"(case does for T5, not for CLIP). The prompt's words: {prompt.split()}"
        )
    if occurrence >= len(spans):
        raise ValueError(
            f"Phrase {phrase!r} occurs {len(spans)} time(s) in prompt {prompt!r}, so occurrence={occurrence} "
            f"does not exist; pass occurrence between 0 and {len(spans) - 1}."
        )
    span = spans[occurrence]
    max_length = tokenizer.model_max_length if max_length is None else max_length
    last_readable = max_length - 2  # truncation keeps EOS at position max_length - 1
    if span[-1] > last_readable:
        raise ValueError(
            f"Phrase {phrase!r} sits at token positions {span[0]}..{span[-1]} of prompt {prompt!r}, but the "
            f"text encoder reads only positions {first}..{last_readable}; the rest is truncated. Shorten the "
            "prompt or move the phrase earlier."
        )
    return span


def token_spans(tokenizer: PreTrainedTokenizerBase, prompt: str, phrase: str) -> list[list[int]]:
    """`token_span` of every whole-word occurrence of `phrase` in `prompt`, in order, truncation aside
    (compare each span's last position with what the encoder reads); [] when it does not occur."""
    return _matches(tokenizer, prompt, phrase)[0]


def _matches(tokenizer: PreTrainedTokenizerBase, prompt: str, phrase: str) -> tuple[list[list[int]], list[int], int]:
    """Every whole-word match of `phrase` in the token sequence of `prompt` (positions, untruncated),
    the phrase's token ids, and the prompt's first position (1 after a BOS, else 0). Multi-vector
    textual-inversion words are written out in both first, as the pipelines encode them."""
    written_prompt, written_phrase = expand_textual_inversion(tokenizer, [prompt, phrase])
    encoded = tokenizer(written_prompt, verbose=False, return_offsets_mapping=tokenizer.is_fast)
    prompt_ids = encoded.input_ids  # [BOS?, ..., EOS], not truncated
    phrase_ids = tokenizer(written_phrase, add_special_tokens=False).input_ids
    if not phrase_ids:
        raise ValueError(f"Phrase {phrase!r} has no tokens; pass a word or words of the prompt {prompt!r}.")

    tokens = tokenizer.convert_ids_to_tokens(prompt_ids)
    if tokenizer.is_fast:  # T5's <unk> stands for characters its vocabulary lacks: a letter ("dog狗") continues the word
        tokens = ["x" if t == tokenizer.unk_token and any(c.isalnum() for c in written_prompt[start:end]) else t
                  for t, (start, end) in zip(tokens, encoded.offset_mapping)]  # fmt: skip
    added = set(tokenizer.get_added_vocab())  # BOS, EOS, padding and placeholders: never inside a word
    first = 1 if tokenizer.bos_token_id is not None and prompt_ids[0] == tokenizer.bos_token_id else 0
    n = len(phrase_ids)
    offsets = encoded.offset_mapping if tokenizer.is_fast else None
    starts = [
        i
        for i in range(first, len(prompt_ids) - n)  # the last token is EOS, never part of a phrase
        if prompt_ids[i : i + n] == phrase_ids and _starts_word(tokens, i, added) and _ends_word(tokens, i + n, added)
        and (offsets is None or _apart(written_prompt, offsets, tokens, i, i + n, added))
    ]
    return [list(range(i, i + n)) for i in starts], phrase_ids, first


def _apart(text: str, offsets: list[tuple[int, int]], tokens: list[str], start: int, end: int, added: set[str]) -> bool:
    """Whether tokens[start:end] are not glued to a neighbouring token that ends (or begins) with a letter or
    digit where they begin (or end) in the text: CLIP gives every digit a word of its own, so its tokens
    alone would find "3" in "1930" and "k" in "4k". Offsets, not the raw text, decide, since the tokenizer's
    clean-up maps "&amp;" to "&". Added words (placeholders) and special tokens glue to nothing."""
    before, after = tokens[start - 1] if start else None, tokens[end] if end < len(tokens) else None
    glued_before = before is not None and before not in added and tokens[start] not in added and \
        offsets[start - 1][1] == offsets[start][0] and text[offsets[start][0] - 1].isalnum() and text[offsets[start][0]].isalnum()
    glued_after = after is not None and after not in added and tokens[end - 1] not in added and \
        offsets[end][0] == offsets[end - 1][1] and text[offsets[end][0]].isalnum() and text[offsets[end - 1][1] - 1].isalnum()
    return not glued_before and not glued_after


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
