"""Find where a phrase of the prompt sits in the 77-token sequence the text encoder reads.

Attention-based controls (concept masks, token reweighting, cross-attention maps) address text
tokens by position. ``token_span`` returns those positions for a phrase, e.g. with the CLIP tokenizer:

    prompt "a photorealistic Cat, on a mat"
    tokens  <|startoftext|> a  photo realistic  cat  ,  on  a  mat <|endoftext|> ...
    index   0               1  2     3          4    5  6   7  8   9
    token_span(tok, prompt, "cat")            -> [4]
    token_span(tok, prompt, "photorealistic") -> [2, 3]
    token_span(tok, prompt, "a", occurrence=1) -> [7]

Matching compares token ids, so it inherits the tokenizer's normalisation: CLIP lowercases and splits
punctuation off words, hence "Cat," in the prompt matches the phrase "cat". A match must also start at
a word boundary: BPE marks the last piece of each word with ``</w>``, so "realistic" (one token,
``realistic</w>``) does not match the tail of "photorealistic".
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from .tokenizer import MAX_LENGTH


def token_span(tokenizer: PreTrainedTokenizerBase, prompt: str, phrase: str, occurrence: int = 0) -> list[int]:
    """Positions of ``phrase``'s tokens in the padded 77-token sequence of ``prompt`` (CLIP tokenizers).

    Position 0 is BOS, so the prompt's first token is at 1. ``occurrence`` picks which match when the
    phrase appears several times (0 = first). Raises ValueError when the phrase is not in the prompt,
    when there are fewer matches than ``occurrence + 1``, or when the match lies past the 75 prompt
    tokens that survive truncation.
    """
    prompt_ids = tokenizer(prompt, verbose=False).input_ids  # [BOS, ..., EOS], not truncated
    phrase_ids = tokenizer(phrase, add_special_tokens=False).input_ids
    if not phrase_ids:
        raise ValueError(f"Phrase {phrase!r} has no tokens; pass a word or words of the prompt {prompt!r}.")

    tokens = tokenizer.convert_ids_to_tokens(prompt_ids)
    added = tokenizer.get_added_vocab()  # BOS, EOS and placeholders such as "<sks>": never inside a word
    starts = [
        i
        for i in range(1, len(prompt_ids) - len(phrase_ids))
        if prompt_ids[i : i + len(phrase_ids)] == phrase_ids
        and (tokens[i - 1].endswith("</w>") or tokens[i - 1] in added)  # a new word begins at i
    ]
    if not starts:
        raise ValueError(
            f"Phrase {phrase!r} is not in prompt {prompt!r} (looked for token ids {phrase_ids} at word "
            "boundaries). Pass whole words copied from the prompt; case and surrounding punctuation do not matter."
        )
    if occurrence >= len(starts):
        raise ValueError(
            f"Phrase {phrase!r} occurs {len(starts)} time(s) in prompt {prompt!r}, so occurrence={occurrence} "
            f"does not exist; pass occurrence between 0 and {len(starts) - 1}."
        )
    span = list(range(starts[occurrence], starts[occurrence] + len(phrase_ids)))
    last_readable = MAX_LENGTH - 2  # position 76 holds EOS after truncation
    if span[-1] > last_readable:
        raise ValueError(
            f"Phrase {phrase!r} sits at token positions {span[0]}..{span[-1]} of prompt {prompt!r}, but the "
            f"text encoder reads only positions 1..{last_readable}; the rest is truncated. Shorten the prompt "
            "or move the phrase earlier."
        )
    return span

