"""Teaching a text encoder to read the toy language before the denoiser learns from it.

A toy model's text encoder, trained by the diffusion loss alone, learns to read captions late and
poorly (weights/README.md). Here it is taught first, directly: from its output at the last token of
a mention ("a large red star with blue dots"), linear heads must tell that mention's shape, colour,
size, pattern and pattern colour; from its output at the end token (CLIP's end-of-text, T5's
``</s>``), the number of objects, the background and the stated relation. CLIP's attention is
causal, so the last token is the first that has seen the whole mention; T5's is bidirectional, and
the same positions serve it (every token has seen the whole caption there, and the position says
which mention to tell). The end token is also what FLUX reads of CLIP: its pooled vector. Each head
is one linear layer: the facts must be linearly readable from the features the denoiser reads, and
bound to their own mention (the last token of "a red star" must say "red", not the colour of the
other object).

    batch = reading_batch(captions, tokenizer)        # CLIP: ids [B, 77] and labels per head [B, 77]
    batch = reading_batch(captions, t5_tokenizer, 48) # T5 (toy-flux): ids [B, 48], no BOS
    heads = ReadingHeads(width=64)
    loss, accuracy = heads.loss(encoder(batch.ids).last_hidden_state, batch.labels)

Labels are -100 where a fact is not stated (size and pattern colour are often left out; a token
of no mention has no mention facts), and cross-entropy ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from minigen.text.tokenizer import MAX_LENGTH

from . import world
from .captions import Caption

IGNORE = -100
NO_RELATION = "none"
# What each head tells, and its classes (label = index in the tuple).
MENTION_FACTS: dict[str, tuple[str, ...]] = {
    "shape": world.SHAPES,
    "color": tuple(world.COLORS),
    "size": tuple(world.SIZES),
    "pattern": world.PATTERNS,
    "pattern_color": tuple(world.COLORS),
}
SCENE_FACTS: dict[str, tuple[str, ...]] = {
    "count": ("1", "2", "3"),
    "background": tuple(world.BACKGROUNDS),
    "relation": (NO_RELATION, *world.RELATIONS),
}


@dataclass
class ReadingBatch:
    ids: Tensor  # [B, L] token ids: CLIP's BOS, caption, EOS, padding; T5's caption, </s>, padding
    labels: dict[str, Tensor]  # head -> [B, L] class index, or IGNORE


def caption_tokens(caption: Caption, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], dict[int, int]]:
    """The caption's token ids (with the tokenizer's special tokens) and the position of each mention's last token.

    A mention's last token is the last token of the caption cut after the mention's last word (less
    its end token): both tokenizers split at spaces and punctuation, so the tokens of the cut caption
    begin those of the whole one (a ValueError says when they do not). Tokenizing word by word would
    not do for T5: sentencepiece starts every text it is given with a word, so a comma tokenized alone
    is "▁" "," while in the caption, right after its word, it is "," (the tests check the ids against
    the whole caption's, for both tokenizers).
    """
    ids = tokenizer(caption.text)["input_ids"]
    ends = {}
    for mention in range(len(caption.mentions)):
        cut = caption.mention_words(mention)[-1].end
        prefix = tokenizer(caption.text[:cut])["input_ids"][:-1]  # without the end token
        if ids[: len(prefix)] != prefix:
            raise ValueError(f"the tokens of {caption.text[:cut]!r} do not begin those of {caption.text!r}: a token spans the cut")
        ends[mention] = len(prefix) - 1
    return ids, ends


def reading_batch(captions: list[Caption], tokenizer: PreTrainedTokenizerBase, max_length: int = MAX_LENGTH) -> ReadingBatch:
    """Token ids and the labels of every head for a list of captions (each fits in `max_length` tokens:
    77 for CLIP, toy-flux's 48 for its T5)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(captions), max_length), pad, dtype=torch.long)
    labels = {name: torch.full((len(captions), max_length), IGNORE, dtype=torch.long) for name in (*MENTION_FACTS, *SCENE_FACTS)}
    for row, caption in enumerate(captions):
        tokens, ends = caption_tokens(caption, tokenizer)
        if len(tokens) > max_length:
            raise ValueError(f"caption of {len(tokens)} tokens does not fit in {max_length}: {caption.text!r}")
        ids[row, : len(tokens)] = torch.tensor(tokens)
        for mention, position in ends.items():
            stated = caption.mentions[mention].attributes
            for name, classes in MENTION_FACTS.items():
                if name in stated and stated[name] in classes:
                    labels[name][row, position] = classes.index(stated[name])
        end = len(tokens) - 1  # the end token
        scene = {"count": str(sum(len(m.objects) for m in caption.mentions)),
                 "background": _stated_background(caption),
                 "relation": caption.relations[0][1] if caption.relations else NO_RELATION}  # fmt: skip
        for name, value in scene.items():
            if value is not None:
                labels[name][row, end] = SCENE_FACTS[name].index(value)
    return ReadingBatch(ids, labels)


def _stated_background(caption: Caption) -> str | None:
    """The background a caption names, or None when it names none."""
    phrase = " ".join(w.text for w in caption.words() if w.role == "background")
    if not phrase:
        return None
    return next(name for name, phrases in world.BACKGROUND_PHRASES.items() if phrase in phrases)


class ReadingHeads(nn.Module):
    """One linear classifier per fact, on the encoder's per-token features."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(width, len(classes)) for name, classes in {**MENTION_FACTS, **SCENE_FACTS}.items()})

    def loss(self, features: Tensor, labels: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Mean cross-entropy over the heads (each over its labelled tokens), and each head's accuracy."""
        losses, accuracy = [], {}
        for name, head in self.heads.items():
            target = labels[name].to(features.device)
            keep = target != IGNORE
            if not keep.any():
                continue
            logits = head(features[keep].float())
            losses.append(F.cross_entropy(logits, target[keep]))
            accuracy[name] = (logits.argmax(-1) == target[keep]).float().mean().item()
        return torch.stack(losses).mean(), accuracy
