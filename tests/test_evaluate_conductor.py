"""scripts/evaluate_conductor.py: its layouts, its scoring of an image, and its refusals."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from minigen.toy import scenes, world

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import evaluate_conductor  # noqa: E402


def painted(concepts, scene: scenes.Scene) -> scenes.Rendering:
    """The layout with each plain object replaced by its concept's look, in place."""
    objects = tuple(dataclasses.replace(o, color=c.color, pattern=c.pattern, pattern_color=c.pattern_color) for o, c in zip(scene.objects, concepts))
    return scenes.render(scenes.Scene(scene.background, objects))


@pytest.mark.parametrize("pair", [("my_heart", "my_heart_2"), ("my_star", "my_circle")])
def test_a_layout_painted_with_the_concepts_scores_as_perfect(pair):
    """Metric: the scores of the script on images whose truth is known. The concepts drawn exactly where
    the layout puts them: nothing omitted, every trait preserved, nothing leaked, the layout's masks
    (IoU > 0.8), and the base prompt followed. Two concepts of one shape swapped: the matching follows
    their looks, so CP stays and the layout falls."""
    concepts = [world.concept(name) for name in pair]
    scene, rendering = evaluate_conductor.layout((concepts[0].shape, concepts[1].shape), "sand", seed=3)
    assert [o.shape for o in scene.objects] == [c.shape for c in concepts]
    base = scenes.Scene("sand", tuple(scenes.ObjectSpec(c.shape, c.color, "large", c.pattern, c.pattern_color) for c in concepts))
    good = evaluate_conductor.score(painted(concepts, scene).image, rendering, concepts, base)
    assert good["omission"] == 0.0 and good["cp"] == 1.0 and good["leakage"] == 0.0 and good["pf"] == 1.0
    assert good["layout"] > 0.8
    if concepts[0].shape == concepts[1].shape:
        swapped = evaluate_conductor.score(painted(concepts[::-1], scene).image, rendering, concepts, base)
        assert swapped["cp"] == 1.0 and swapped["layout"] < 0.2


def test_the_same_concept_twice_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="name two different concepts"):
        evaluate_conductor.main(["--pair", "my_heart", "my_heart", "--work", str(tmp_path / "work")])
    assert not (tmp_path / "work").exists()


def test_cached_edloras_of_another_base_model_are_refused(tmp_path):
    """The cache is named by the model file's stem, and train_toy.py exports every toy-sd as
    <work>/toy-sd.safetensors: ED-LoRAs trained on another toy-sd of that name were used without a word.
    Their recorded base fingerprint is now checked against the model's."""
    import torch
    from safetensors.torch import save_file

    work = tmp_path / "work"
    work.mkdir()
    for name in ("my_heart", "my_heart_2"):
        save_file({"x": torch.zeros(1)}, work / f"{name}-toy-sd-5steps.safetensors", metadata={"base_fingerprint": "0123456789abcdef"})
    with pytest.raises(SystemExit, match=r"my_heart-toy-sd-5steps.safetensors was trained on another base model \(fingerprint 0123456789abcdef"):
        evaluate_conductor.main(["--model", "toy-sd", "--train-steps", "5", "--work", str(work)])


@pytest.mark.slow  # trains two 2-step ED-LoRAs and draws 5 layouts: about a minute
def test_a_killed_run_resumes_and_force_leaves_no_earlier_images(tmp_path, monkeypatch):
    """A run killed in its second layout keeps the first in <work>/journal.jsonl; the same command draws
    only the second and reports what an uninterrupted run does. --force starts afresh: an earlier run's
    images of layouts it does not draw are removed (they sat beside the new results)."""
    import json

    flags = ["--train-steps", "2", "--steps", "2", "--work", str(tmp_path)]
    whole = evaluate_conductor.main([*flags, "--layouts", "2"])
    scored, kills, score = [], [], evaluate_conductor.score

    def killed_in_the_second_layout(image, rendering, *rest):
        scored.append(rendering)
        if kills and len(scored) == 5:  # the first method of layout 1
            kills.pop()
            raise KeyboardInterrupt
        return score(image, rendering, *rest)

    monkeypatch.setattr(evaluate_conductor, "score", killed_in_the_second_layout)
    kills.append(1)
    with pytest.raises(KeyboardInterrupt):
        evaluate_conductor.main([*flags, "--layouts", "2", "--force"])
    assert len(list(tmp_path.glob("layout0-*.png"))) == 4  # the first run's layout 1 went at the fresh start; its first image is drawn again
    assert [p.name for p in tmp_path.glob("layout1-*.png")] == ["layout1-naive.png"]
    scored.clear()
    assert evaluate_conductor.main([*flags, "--layouts", "2", "--force"]) == whole and len(scored) == 4  # layout 1 only
    assert not (tmp_path / "journal.jsonl").exists() and len(list(tmp_path.glob("layout1-*.png"))) == 4

    evaluate_conductor.main([*flags, "--layouts", "1", "--force"])
    assert not list(tmp_path.glob("layout1-*.png")) and len(json.loads((tmp_path / "results.json").read_text())["per_layout"]["naive"]) == 1
