"""scripts/analyze_attention.py: which tokens it reads for an object, and how it ranks layers."""

from __future__ import annotations

import sys
from pathlib import Path

from minigen.text.spans import token_span
from minigen.text.tokenizer import load_clip_tokenizer
from minigen.toy import captions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import analyze_attention  # noqa: E402


def test_shape_words_pick_each_mentions_own_occurrence():
    """Two mentions with the same noun: the second mention's tokens are the second occurrence."""
    tokenizer = load_clip_tokenizer()
    for seed in range(400):
        _, caption = captions.sample_captioned(seed)
        words = [w for w in caption.words() if w.role == "shape"]
        if len(words) >= 2 and words[0].text == words[-1].text:
            break
    else:
        raise AssertionError("no caption with a repeated shape word in 400 seeds")
    spans = []
    for m in range(len(caption.mentions)):
        phrase, occurrence = analyze_attention.shape_words(caption, m)
        spans.append(token_span(tokenizer, caption.text, phrase, occurrence))
    assert len({tuple(s) for s in spans}) == len(spans)  # every mention reads its own tokens
    ids = tokenizer(caption.text).input_ids
    for m, span in enumerate(spans):
        shape = [w.text for w in caption.mention_words(m) if w.role == "shape"]
        assert tokenizer.decode([ids[i] for i in span]).strip() == " ".join(shape)


def test_table_ranks_layers_by_their_second_half():
    auc = {"early": [0.9, 0.9, 0.5, 0.5], "late": [0.5, 0.5, 0.8, 0.9]}
    lines = analyze_attention.table(auc, "m", 3, 4).splitlines()
    rows = [line for line in lines if line.startswith("| early") or line.startswith("| late")]
    assert rows[0].startswith("| late | 0.675 | 0.850 | 0.900 |") and rows[1].startswith("| early | 0.700 | 0.500 |")
