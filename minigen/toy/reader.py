"""Teaching a text encoder to read the toy language before the denoiser learns from it.

A toy model's CLIP-style encoder, trained by the diffusion loss alone, learns to read captions late
and poorly (weights/README.md). Here it is taught first, directly: from its output at the last token
of a mention ("a large red star with blue dots"), linear heads must tell that mention's shape,
colour, size, pattern and pattern colour; from its output at the end-of-text token, the number of
objects, the background and the stated relation. CLIP's attention is causal, so the last token is
the first that has seen the whole mention. Each head is one linear layer: the facts must be
linearly readable from the features cross-attention reads, and bound to their own mention (the
last token of "a red star" must say "red", not the colour of the other object).

    batch = reading_batch(captions, tokenizer)        # ids [B, 77] and labels per head [B, 77]
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
    ids: Tensor  # [B, 77] token ids (BOS, caption, EOS, padding)
    labels: dict[str, Tensor]  # head -> [B, 77] class index, or IGNORE


def caption_tokens(caption: Caption, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int | None]]:
    """The caption's token ids (without BOS/EOS) and, per token, the mention its word belongs to.

    Words are tokenized one at a time; CLIP's pre-tokenizer splits at spaces anyway, so the ids equal
    those of the whole caption (checked by the tests).
    """
    ids, mentions = [], []
    for word in caption.words():
        pieces = tokenizer(word.text, add_special_tokens=False)["input_ids"]
        ids += pieces
        mentions += [word.mention] * len(pieces)
    return ids, mentions


def reading_batch(captions: list[Caption], tokenizer: PreTrainedTokenizerBase) -> ReadingBatch:
    """Token ids and the labels of every head for a list of captions (each fits in 77 tokens)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = torch.full((len(captions), MAX_LENGTH), pad, dtype=torch.long)
    labels = {name: torch.full((len(captions), MAX_LENGTH), IGNORE, dtype=torch.long) for name in (*MENTION_FACTS, *SCENE_FACTS)}
    for row, caption in enumerate(captions):
        tokens, mentions = caption_tokens(caption, tokenizer)
        if len(tokens) + 2 > MAX_LENGTH:
            raise ValueError(f"caption of {len(tokens)} tokens does not fit in {MAX_LENGTH}: {caption.text!r}")
        ids[row, : len(tokens) + 2] = torch.tensor([bos, *tokens, eos])
        last = {mention: position for position, mention in enumerate(mentions, start=1) if mention is not None}
        for mention, position in last.items():
            stated = caption.mentions[mention].attributes
            for name, classes in MENTION_FACTS.items():
                if name in stated and stated[name] in classes:
                    labels[name][row, position] = classes.index(stated[name])
        end = len(tokens) + 1
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
