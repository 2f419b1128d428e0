"""scripts/evaluate_residuals.py: the baseline's size, where it looks for the concept, and the paired interval."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minigen.methods.residuals import Residuals
from minigen.models.unet import UNet
from minigen.toy import scenes, world

from conftest import TINY_UNET

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import evaluate_residuals  # noqa: E402


def test_concept_masks_cover_the_concept_and_not_the_other_objects():
    """On clean recontextualization renders (truth known): IoU with the concept's true mask > 0.8, and
    under 5 % of any other object's pixels."""
    checked = 0
    for concept in world.CONCEPTS[:5]:
        for scene, _ in evaluate_residuals.recontext_prompts(concept, 3):
            rendering = scenes.render(scene)
            mask, truth = evaluate_residuals.concept_masks(rendering.image, concept), rendering.masks[0]
            assert (mask & truth).sum() / (mask | truth).sum() > 0.8
            for other in rendering.masks[1:]:
                assert (mask & other).sum() <= 0.05 * other.sum()
            checked += len(rendering.masks) > 1
    assert checked >= 5


def test_attention_lora_is_the_larger_baseline_and_starts_at_the_base_model():
    unet = UNet(TINY_UNET).eval().requires_grad_(False)
    lora = evaluate_residuals.AttentionLoRA(unet, 8, torch.Generator().manual_seed(0))
    residuals = Residuals(unet, identifier="sks", macro_class="star")
    assert len(lora.targets) == 8 * len(unet.attention_layers())  # q, k, v, out of attn1 and attn2
    assert lora.parameter_count() > residuals.parameter_count()
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, unet.config.context_dim)
    assert torch.equal(unet(x, t, context, controls=lora.controls()), unet(x, t, context))  # up factors start at zero


def test_attention_lora_trains_through_train_residuals_on_toy_sd(tmp_path):
    """The evaluation trains its baseline with the residuals' own loop: it must run and move the factors."""
    from dataclasses import replace

    from minigen.loading.auto import load_pipeline
    from minigen.methods.residuals import TRAINING, train_residuals
    from minigen.toy.data import concept_references

    pipe = load_pipeline("toy-sd")
    lora = evaluate_residuals.AttentionLoRA(pipe.unet, 4, torch.Generator().manual_seed(0))
    losses = train_residuals(pipe, lora, concept_references("my_star", 4), "a sks star", replace(TRAINING, steps=2, batch=2), tmp_path)
    assert len(losses) == 2 and all(p.abs().sum() > 0 for p in lora.up)  # every up factor left zero: each layer trains


def test_an_existing_out_is_refused_before_any_work(tmp_path):
    """--out names a file already there: the script stops at once with the fix (--force), the file unchanged."""
    out = tmp_path / "table.md"
    out.write_text("an earlier table\n")
    with pytest.raises(FileExistsError, match=re.escape("table.md exists; choose another output path or allow overwriting (--force)")):
        evaluate_residuals.main(["--out", str(out), "--work", str(tmp_path / "work")])
    assert out.read_text() == "an earlier table\n" and not (tmp_path / "work").exists()
    with pytest.raises(IsADirectoryError, match="is a folder; give a file path inside it"):  # was found after all the work
        evaluate_residuals.main(["--out", str(tmp_path), "--work", str(tmp_path / "work"), "--force"])


def test_a_rerun_resumes_the_trained_factors_and_says_so(tmp_path, toy_sd, monkeypatch):
    """Rerun on the same work folder, the trainings resume from their checkpoints: no training time is
    reported (it was the time to load a checkpoint, near 0 s), and the drawings are the first run's."""
    from dataclasses import replace

    monkeypatch.setattr(evaluate_residuals, "TRAINING", replace(evaluate_residuals.TRAINING, steps=2, batch=1))
    runs = [evaluate_residuals.evaluate_concept(toy_sd, world.CONCEPTS[0], 1, 2, tmp_path, seed=0) for _ in range(2)]
    assert all(t["steps"] == 2 and t["seconds"] > 0 for t in runs[0]["train_seconds"].values())
    assert [t["steps"] for t in runs[1]["train_seconds"].values()] == [0, 0]
    assert [evaluate_residuals.duration(t) for t in runs[1]["train_seconds"].values()] == ["resumed", "resumed"]
    assert evaluate_residuals.duration({"seconds": 3.0, "steps": 1}) == "3.0 for the last 1 of 2 steps (resumed)"
    assert evaluate_residuals.duration({"seconds": 3.0, "steps": 2}) == "3.0"
    for condition, images in runs[0]["images"].items():
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, runs[1]["images"][condition])), condition


def test_a_killed_run_goes_on_with_the_concepts_it_had_not_finished(tmp_path, monkeypatch, capsys):
    """Killed in its second concept, the run keeps the first in the journal: the same command evaluates
    only the second, and its table's rows are an uninterrupted run's (the training times aside)."""
    from dataclasses import replace

    monkeypatch.setattr(evaluate_residuals, "TRAINING", replace(evaluate_residuals.TRAINING, steps=2, batch=1))
    flags = ["--concepts", "2", "--prompts", "1", "--lora-rank", "2"]
    evaluate_residuals.main([*flags, "--work", str(tmp_path / "whole")])
    whole = capsys.readouterr().out
    evaluated, evaluate_concept = [], evaluate_residuals.evaluate_concept

    def killed_in_the_second(pipe, concept, *rest):
        evaluated.append(concept.name)
        if len(evaluated) == 2:
            raise KeyboardInterrupt
        return evaluate_concept(pipe, concept, *rest)

    monkeypatch.setattr(evaluate_residuals, "evaluate_concept", killed_in_the_second)
    with pytest.raises(KeyboardInterrupt):
        evaluate_residuals.main([*flags, "--work", str(tmp_path / "killed")])
    monkeypatch.setattr(evaluate_residuals, "evaluate_concept", lambda pipe, concept, *rest: evaluated.append(concept.name) or evaluate_concept(pipe, concept, *rest))
    capsys.readouterr()
    evaluate_residuals.main([*flags, "--work", str(tmp_path / "killed")])
    resumed = capsys.readouterr().out
    names = [c.name for c in world.CONCEPTS[:2]]
    assert evaluated == [names[0], names[1], names[1]]
    rows = lambda text: [line for line in text.splitlines() if line.startswith(("| ", "- "))]  # noqa: E731
    assert rows(resumed) == rows(whole) and not list((tmp_path / "killed").rglob("journal.jsonl"))
