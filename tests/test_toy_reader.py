"""The reader's supervision (minigen/toy/reader.py): token ids and labels checked against the caption's
own structure, found independently with the tokenizer and `token_span`, for toy-sd's CLIP tokenizer
(BOS, 77 tokens) and toy-flux's T5 tokenizer (the shipped sentencepiece model: no BOS, 48 tokens)."""

import numpy as np
import pytest
import torch

from minigen.loading.toy import TOY_FLUX
from minigen.text.spans import token_span
from minigen.text.t5 import load_t5_tokenizer
from minigen.text.tokenizer import load_clip_tokenizer, tokenize
from minigen.toy import world
from minigen.toy.captions import heldout_prompts, sample_captioned
from minigen.toy.reader import IGNORE, MENTION_FACTS, SCENE_FACTS, ReadingHeads, reading_batch

TOKENIZER = load_clip_tokenizer()
TOKENIZERS = {"clip": (TOKENIZER, 77), "t5": (load_t5_tokenizer(TOY_FLUX / "tokenizer_2"), 48)}


@pytest.mark.parametrize("encoder", sorted(TOKENIZERS))
def test_ids_are_the_tokenizers_ids_of_the_whole_caption(encoder):
    """Commas included: right after its word a comma is T5's "," in the caption, but "▁" "," tokenized alone."""
    tokenizer, length = TOKENIZERS[encoder]
    captions = [sample_captioned(np.random.default_rng([5, i]))[1] for i in range(100)] + [c for _, c in heldout_prompts(50)]
    assert sum("," in c.text for c in captions) >= 10
    batch = reading_batch(captions, tokenizer, length)
    assert torch.equal(batch.ids, tokenize(tokenizer, [c.text for c in captions], length))


@pytest.mark.parametrize("encoder", sorted(TOKENIZERS))
def test_each_mention_is_labelled_at_its_last_token_and_the_scene_at_the_end_token(encoder):
    """There and nowhere else."""
    tokenizer, length = TOKENIZERS[encoder]
    for i in range(40):
        caption = sample_captioned(np.random.default_rng([6, i]))[1]
        batch = reading_batch([caption], tokenizer, length)
        ends = set()
        for m, mention in enumerate(caption.mentions):
            words = caption.mention_words(m)
            # the mention's last word, found by its text in the caption (the occurrence counts earlier equal words)
            earlier = sum(1 for w in caption.words() if w.text == words[-1].text and w.start < words[-1].start)
            position = token_span(tokenizer, caption.text, words[-1].text, occurrence=earlier, max_length=length)[-1]
            ends.add(position)
            for name, classes in MENTION_FACTS.items():
                stated = mention.attributes.get(name)
                assert batch.labels[name][0, position] == (classes.index(stated) if stated else IGNORE)
        end = int((batch.ids[0] == tokenizer.eos_token_id).nonzero()[0])  # CLIP's <|endoftext|>, T5's </s>
        count = sum(len(m.objects) for m in caption.mentions)
        assert batch.labels["count"][0, end] == SCENE_FACTS["count"].index(str(count))
        relation = caption.relations[0][1] if caption.relations else "none"
        assert batch.labels["relation"][0, end] == SCENE_FACTS["relation"].index(relation)
        said = [name for name, phrases in world.BACKGROUND_PHRASES.items() if any(caption.text.endswith(p) for p in phrases)]
        assert batch.labels["background"][0, end] == (SCENE_FACTS["background"].index(said[0]) if said else IGNORE)
        labelled = {name: set((labels[0] != IGNORE).nonzero().flatten().tolist()) for name, labels in batch.labels.items()}
        assert labelled["shape"] == ends and all(labelled[name] <= ends for name in MENTION_FACTS)
        assert labelled["count"] == {end} and all(labelled[name] <= {end} for name in SCENE_FACTS)
        assert sum(bool(positions) for positions in labelled.values()) >= 5  # shape, colour, pattern, count, relation at least


def test_heads_learn_to_read_the_labels_of_a_fixed_feature():
    """Sanity of the loss: features that encode the labels are read back at accuracy 1 after fitting."""
    torch.manual_seed(0)
    captions = [sample_captioned(np.random.default_rng([8, i]))[1] for i in range(64)]
    batch = reading_batch(captions, TOKENIZER)
    # a feature per token that is a one-hot code of every label (what a perfect encoder could say)
    codes = [torch.nn.functional.one_hot(labels.clamp(min=0), len(classes)) * (labels != IGNORE)[..., None]
             for labels, classes in zip(batch.labels.values(), {**MENTION_FACTS, **SCENE_FACTS}.values())]  # fmt: skip
    features = torch.cat(codes, dim=-1).float()
    heads = ReadingHeads(features.shape[-1])
    optimizer = torch.optim.Adam(heads.parameters(), lr=0.1)
    for _ in range(100):
        loss, accuracy = heads.loss(features, batch.labels)
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    assert min(accuracy.values()) == 1.0
