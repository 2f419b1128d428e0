"""scripts/analyze_attention.py: which tokens it reads for an object, and how it ranks layers."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from minigen.text.spans import token_span
from minigen.text.tokenizer import load_clip_tokenizer
from minigen.toy import captions, scenes

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
    lines = analyze_attention.table(auc, "m", 3, 4, 2, "scripts/analyze_attention.py --model m --prompts 3 --steps 4").splitlines()
    assert "Command: `python scripts/analyze_attention.py --model m --prompts 3 --steps 4`." in lines[2]  # as run (dropped --steps before)
    rows = [line for line in lines if line.startswith("| early") or line.startswith("| late")]
    assert rows[0].startswith("| late | 0.675 | 0.850 | 0.900 |") and rows[1].startswith("| early | 0.700 | 0.500 |")


def test_targets_tie_mentions_to_judged_objects_by_look_or_by_colour_alone():
    """On clean held-out renders the judge reads the truth, so both ways of matching must return the
    single-object mentions with their true masks (IoU > 0.8); by colour alone, only the mentions whose
    colour no other mention shares."""
    checked = {"look": 0, "color": 0}
    for scene, caption in captions.heldout_prompts(12):
        rendering = scenes.render(scene)
        for match in ("look", "color"):
            keys = analyze_attention.MATCHES[match]
            asked = [tuple(m.attributes[k] for k in keys) for m in caption.mentions]
            expected = {m for m, mention in enumerate(caption.mentions) if len(mention.objects) == 1 and asked.count(asked[m]) == 1}
            picked = analyze_attention.targets(caption, rendering.image, match)
            assert {m for m, _ in picked} == expected
            for m, mask in picked:
                truth = rendering.masks[caption.mentions[m].objects[0]]
                assert (mask & truth).sum() / (mask | truth).sum() > 0.8
                checked[match] += 1
    assert checked["look"] >= 10 and checked["color"] >= 10


def test_an_earlier_run_in_out_is_refused_before_any_work(tmp_path, monkeypatch):
    """The plots and table of an earlier run in --out are kept unless --force (nothing loaded before that)."""
    import pytest

    monkeypatch.setattr(analyze_attention, "load_pipeline", lambda *a, **k: pytest.fail("the model loads only after the checks"))
    (tmp_path / "attention_auc_toy-sd.md").write_text("an earlier table\n")
    with pytest.raises(SystemExit, match=re.escape("holds attention_auc_toy-sd.md already; give another --out, or pass --force")):
        analyze_attention.main(["--model", "toy-sd", "--out", str(tmp_path)])
    assert (tmp_path / "attention_auc_toy-sd.md").read_text() == "an earlier table\n"
    (tmp_path / "file").write_text("x")  # an --out under a file was found after all the generation
    with pytest.raises(NotADirectoryError, match="--out .*file/out: .*file is a file, so nothing can be written under it"):
        analyze_attention.main(["--model", "toy-sd", "--out", str(tmp_path / "file" / "out")])
    with pytest.raises(NotADirectoryError, match="--out .*file is a file, and --out names a folder"):
        analyze_attention.main(["--model", "toy-sd", "--out", str(tmp_path / "file")])  # found after all the generation
    assert (tmp_path / "file").read_text() == "x"


def test_flux_without_guidance_records_the_prompts_own_rows(toy_flux, monkeypatch):
    """At true_cfg 1 (the official FLUX models) the batch holds the prompts alone: their rows are 0..n-1
    (rows n..2n-1 were asked for, past the batch)."""
    monkeypatch.setattr(toy_flux, "default_cfg", 1.0)
    _, record = analyze_attention.record_and_generate(toy_flux, ["a red star", "a blue moon"], steps=1, seed=0)
    maps = next(iter(record.maps.values()))
    assert maps[0].shape[0] == 2
    assert analyze_attention.prompt_rows(2, 4.0) == [2, 3] and analyze_attention.prompt_rows(2, 1.0) == [0, 1]
