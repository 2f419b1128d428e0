"""scripts/evaluate_conceptrol.py, the toy DreamBench, with an untrained toy adapter (seconds, 2 steps):
the prompts name the concept by its class word at its own tokens; the gating is wired right (Conceptrol
at IP scale 0 is the base model, a fixed gate of ones is the adapter alone, of zeros the base model);
the oracle's mask is the concept's object; the script writes its table and raw scores, refuses to
overwrite them, and refuses bad inputs with a message that says what to give."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
import torch

from minigen.text.spans import token_span
from minigen.toy import captions, scenes, world
from minigen.toy.captions import recontext_prompts
from minigen.toy.judge import judge
from minigen.trainer import fingerprint

from conftest import load_script

STEPS = 2


@pytest.fixture(scope="module")
def script():
    return load_script("evaluate_conceptrol")


def _export(script, folder, base_fingerprint):
    """An untrained toy IP-Adapter-Plus and tower (train_toy_adapters' initialisation), written as training writes them."""
    trainer = load_script("train_toy_adapters")
    pipe = script.load_sd(script.TOY_SD, dtype=torch.float32)
    encoder, adapter = trainer.toy_ip_adapter(pipe, seed=0)
    base = fingerprint(pipe.unet, pipe.vae, *pipe.text_encoders) if base_fingerprint is None else base_fingerprint
    return trainer.export_ip_adapter(encoder, adapter, folder, info={"base": base})


@pytest.fixture(scope="module")
def adapter_file(script, tmp_path_factory):
    return _export(script, tmp_path_factory.mktemp("adapter"), None)


@pytest.fixture(scope="module")
def loaded(script, adapter_file):
    """((pipe, adapter, encoder, base fingerprint), args) as the script loads them."""
    args = script.parse(["--adapter", str(adapter_file), "--out", "unused/never-written.md"])
    return script.load(args), args


def test_prompts_are_evaluate_residuals_class_only_prompts_with_the_concept_at_its_own_tokens(script, loaded):
    (pipe, adapter, encoder, _), _ = loaded
    concept = world.concept("my_heart")
    named = recontext_prompts(concept, 6)  # evaluate_residuals' "a sks heart ..." prompts
    cases = script.concept_cases(pipe, adapter, encoder, concept, 6, seed=3)
    assert [c.caption.text for c in cases] == [c.text.replace("sks ", "") for _, c in named]
    assert [c.seed for c in cases] == [3, 4, 5, 6, 7, 8] and all(len(c.reference) == 2 and c.reference[0].shape[0] == 1 for c in cases)  # (tokens, empty)
    tokenizer = pipe.tokenizers[0]
    for case in cases:
        [mention] = [m for m in case.caption.mentions if m.concept is not None]
        assert mention.attributes == {"shape": "heart"}  # PF asks the concept for its class word alone
        ids = tokenizer(case.caption.text).input_ids
        assert tokenizer.decode([ids[i] for i in case.span]).strip() == "heart"
    # prompt 2 holds another heart before the concept: the span is the concept's own, the second "heart"
    text = cases[2].caption.text
    assert text.count("heart") == 2 and cases[2].span == token_span(tokenizer, text, "heart", occurrence=1)


def test_without_identifier_keeps_the_class_word_with_a_fitting_article():
    concept = world.concept("my_star")
    _, named = captions.concept_prompt(concept, "sks", 0, n_objects=2, level=3)  # "a sks object ..."
    plain = captions.without_identifier(named)
    assert "an object" in plain.text and "sks" not in plain.text
    assert all(plain.text[w.start : w.end] == w.text for w in plain.words()) and plain.mentions == named.mentions
    with pytest.raises(ValueError, match="no class word"):
        captions.without_identifier(captions.concept_prompt(concept, "sks", 0, level=None)[1])


def test_gating_is_wired_right(script, loaded):
    """Independent checks of what each condition puts into the UNet, on one prompt with other objects."""
    (pipe, adapter, encoder, _), args = loaded
    case = script.concept_cases(pipe, adapter, encoder, world.concept("my_star"), 2, seed=0)[1]
    projections = adapter.projections()

    def draw(condition, oracle=None):
        return script.draw(pipe, case, condition, projections, STEPS, oracle)

    base, alone = draw(script.BASE), draw(script.ADAPTER)
    conceptrol = script.Condition("conceptrol", scale=1.0, warmup=0.0, mask=args.concept_layer)
    assert (alone - base).abs().max() > 1e-2  # the adapter acts
    for mask in (args.concept_layer, script.PER_LAYER):  # IP scale 0: records only, the base model's image
        assert (draw(script.Condition("conceptrol", scale=0.0, warmup=0.0, mask=mask)) - base).abs().max() <= 1e-5, mask
    gated = draw(conceptrol)
    assert (gated - base).abs().max() > 1e-3 and (gated - alone).abs().max() > 1e-3  # some of the branch, not all of it
    oracle = script.Condition("oracle", warmup=0.0)
    assert torch.equal(draw(oracle, torch.ones(1, 1, 64, 64)), alone)
    assert torch.equal(draw(oracle, torch.zeros(1, 1, 64, 64)), base)


def test_oracle_mask_is_the_concepts_object(script):
    concept = world.concept("my_circle")
    checked = 0
    for scene, _ in recontext_prompts(concept, 6, identifier=None):
        rendering = scenes.render(scene)
        mask = script.concept_object_mask(judge(rendering.image), concept)[0, 0].numpy() > 0
        truth = rendering.masks[0]  # object 0 is the concept
        assert (mask & truth).sum() / (mask | truth).sum() > 0.8
        checked += len(scene.objects) > 1
    assert checked >= 3
    assert script.concept_object_mask([], concept).sum() == 0


def test_recontext_prompts_in_the_halves_world_alternate_one_and_two_objects_on_the_halves():
    """toy-flux's DreamBench prompts: the concept alone, then beside one other object, each on a slot of
    `scenes.LAYOUTS["halves"]`; the "anywhere" prompts keep their 1, 2, 3 cycle."""
    concept, slots = world.concept("my_star"), set(scenes.LAYOUTS["halves"])
    halves = recontext_prompts(concept, 6, identifier=None, layout="halves")
    assert [len(scene.objects) for scene, _ in halves] == [1, 2, 1, 2, 1, 2]
    assert all((o.x, o.y) in slots for scene, _ in halves for o in scene.objects)
    assert all((o.shape, o.color, o.pattern, o.pattern_color) == (concept.shape, concept.color, concept.pattern, concept.pattern_color)
               for o in (scene.objects[0] for scene, _ in halves))  # fmt: skip
    assert [len(scene.objects) for scene, _ in recontext_prompts(concept, 6, identifier=None)] == [1, 2, 3, 1, 2, 3]


def test_a_grown_oracle_mask_covers_every_pixel_within_the_distance(script):
    """The oracle grown by d pixels: exactly the pixels within d (Chebyshev distance) of the object's,
    recomputed here from the distance to the nearest object pixel."""
    concept = world.concept("my_star")
    scene, _ = recontext_prompts(concept, 1, identifier=None)[0]
    found = judge(scenes.render(scene).image)
    tight = script.concept_object_mask(found, concept)[0, 0].numpy() > 0
    ys, xs = np.nonzero(tight)
    grid_y, grid_x = np.mgrid[0:64, 0:64]
    distance = np.min(np.maximum(abs(grid_y[..., None] - ys), abs(grid_x[..., None] - xs)), axis=-1)
    for d in (4, 8):
        grown = script.concept_object_mask(found, concept, d)[0, 0].numpy()
        assert set(np.unique(grown)) == {0.0, 1.0} and np.array_equal(grown > 0, distance <= d)


def test_writes_the_table_and_raw_scores_and_refuses_to_overwrite(script, adapter_file, tmp_path, capsys):
    out = tmp_path / "bench.md"
    flags = ["--adapter", str(adapter_file), "--concept", "my_star", "--prompts", "2", "--steps", str(STEPS), "--out", str(out)]
    results = script.main([*flags, "--ablations"])
    table, raw = out.read_text(), json.loads(out.with_suffix(".json").read_text())
    for row in ("| base model (no adapter) |", "| adapter alone |", "| Conceptrol |", "## Ablation: IP scale", "## Ablation: warmup",
                "## Ablation: mask source", "| per-layer masks", "| low-AUC block down.0.0.0 |", "| oracle:", "| my_star |",
                "Conceptrol - adapter alone, paired", "Regenerate: `python scripts/evaluate_conceptrol.py --adapter"):  # fmt: skip
        assert row in table, row
    assert raw["summary"] == json.loads(json.dumps(results["summary"]))
    assert len(raw["conditions"]) == 20  # 3 main + 4 scales x 2 + 4 warmups + 5 mask sources
    assert len(raw["images"]) == 20 * 2 and {r["condition"] for r in raw["images"]} == set(raw["conditions"])
    assert all(0 <= r[k] <= 1 for r in raw["images"] for k in ("cp", "pf", "cp_pf", "leakage"))
    assert raw["settings"]["generations"] == 40 and not list(tmp_path.glob("*.partial"))
    grid, tradeoff = Image.open(tmp_path / "bench.png"), Image.open(tmp_path / "bench_tradeoff.png")
    assert grid.size == (4 + 4 * (96 + 4), 14 + 2 * (14 + 96 + 4) + 4)  # reference + 3 conditions; my_star's 2 prompts
    assert tradeoff.size == (760, 480) and len(np.unique(np.asarray(tradeoff).reshape(-1, 3), axis=0)) > 2  # points and lines, not a blank canvas

    with pytest.raises(SystemExit, match="already written; pass --force"):
        script.main(flags)
    script.main([*flags, "--force"])
    assert len(json.loads(out.with_suffix(".json").read_text())["images"]) == 3 * 2
    assert (tmp_path / "bench.png").exists() and not (tmp_path / "bench_tradeoff.png").exists()  # no ablations, no plot of them


def test_a_killed_run_resumes_where_it_stopped_and_reports_what_an_uninterrupted_run_does(script, adapter_file, tmp_path, monkeypatch):
    """Killed in its second case (of two), the run leaves its first in the journal; the same command
    draws only the second and writes the records and grid of a run never killed. A journal of other
    settings is refused naming what differs; --force starts afresh."""
    flags = ["--adapter", str(adapter_file), "--concept", "my_star", "--prompts", "2", "--steps", str(STEPS)]
    whole = script.main([*flags, "--out", str(tmp_path / "whole.md")])
    out = tmp_path / "bench.md"
    drawn, kills, draw_case = [], [1], script.draw_case

    def killed_in_the_second_case(pipe, case, *rest):
        drawn.append(case.index)
        if case.index == 1 and kills:
            kills.pop()
            raise KeyboardInterrupt
        return draw_case(pipe, case, *rest)

    monkeypatch.setattr(script, "draw_case", killed_in_the_second_case)
    with pytest.raises(KeyboardInterrupt):
        script.main([*flags, "--out", str(out)])
    journal = tmp_path / "bench.journal.jsonl"
    assert [line.get("key") for line in map(json.loads, journal.read_text().splitlines())] == [None, "my_star/0"] and not out.exists()
    with pytest.raises(ValueError, match=r"bench.journal.jsonl holds the finished part of a killed run of other settings \(steps differ\)"):
        script.main([*flags[:-1], "3", "--out", str(out)])
    resumed = script.main([*flags, "--out", str(out)])
    assert drawn == [0, 1, 1]  # the first case read back, not drawn again
    assert resumed["images"] == whole["images"] and resumed["summary"] == whole["summary"] and not journal.exists()
    assert np.array_equal(np.asarray(Image.open(out.with_suffix(".png"))), np.asarray(Image.open(tmp_path / "whole.png")))

    kills.append(1)
    with pytest.raises(KeyboardInterrupt):
        script.main([*flags, "--force", "--out", str(out)])
    script.main([*flags[:-1], "3", "--force", "--out", str(out)])  # other settings: --force starts afresh
    assert drawn == [0, 1, 1, 0, 1, 0, 1] and json.loads(out.with_suffix(".json").read_text())["settings"]["steps"] == 3


@pytest.mark.parametrize("flags, message", [
    (["--adapter", "missing.safetensors"], "--adapter missing.safetensors: not a file"),
    (["--concept", "my_dragon"], "Unknown personal concept 'my_dragon'"),
    (["--concepts", "11"], "the toy world has 10 personal concepts"),
    (["--concepts", "2", "--concept", "my_star"], "--concept and --concepts both choose the concepts; give one of them"),
    (["--prompts", "0"], "argument --prompts: 0 is not positive; give 1 or more"),
    (["--out", "bench.txt"], "give a .md file"),
    (["--image-encoder", "no/such/folder"], "--image-encoder no/such/folder: not found"),
])  # fmt: skip
def test_bad_command_lines_are_refused_before_any_work(script, adapter_file, tmp_path, flags, message):
    argv = ["--adapter", str(adapter_file), "--out", str(tmp_path / "bench.md"), *flags]
    with pytest.raises(SystemExit, match=message):
        script.main(argv)
    assert not any(tmp_path.iterdir())


def test_an_adapter_of_another_base_and_an_unknown_block_are_refused(script, adapter_file, tmp_path):
    other = _export(script, tmp_path / "other", base_fingerprint="0" * 16)
    with pytest.raises(ValueError, match="trained on another toy-sd"):
        script.main(["--adapter", str(other), "--out", str(tmp_path / "a.md")])
    with pytest.raises(ValueError, match="--concept-layer up.9.0.0: not an attention block"):
        script.main(["--adapter", str(adapter_file), "--concept-layer", "up.9.0.0", "--out", str(tmp_path / "b.md")])
    assert not list(tmp_path.glob("*.md"))


def test_the_shipped_toy_adapter_is_the_default(script, tmp_path):
    from minigen.loading.toy import toy_ip_adapter_files

    args, shipped = script.parse(["--out", str(tmp_path / "bench.md")]), toy_ip_adapter_files()
    assert (args.adapter, args.image_encoder) == (shipped["adapter"], shipped["image_encoder"])
    assert script.as_reported(args.adapter) == "weights/toy-sd-ip-adapter/ip-adapter-plus_toy-sd.safetensors (shipped)"
    assert script.as_reported(tmp_path / "a.safetensors") == str(tmp_path / "a.safetensors")


# ---- toy-flux: OminiControl's subject LoRA -----------------------------------------------------------
def _export_subject_lora(folder, base_fingerprint=None):
    """A toy subject LoRA as train_toy_adapters.py flux writes it, with every up factor drawn (not 0), so
    that the condition tokens take another path than the base weights."""
    from minigen.loading.toy import TOY_FLUX, toy_flux_folder_files
    from minigen.loading.flux import load_flux

    trainer = load_script("train_toy_adapters")
    pipe = load_flux(**toy_flux_folder_files(TOY_FLUX), dtype=torch.float32)
    lora = trainer.SubjectLoRA(pipe.transformer, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for up in lora.up:
            up.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    base = base_fingerprint or trainer.fingerprint(pipe.transformer, pipe.vae, pipe.t5, pipe.clip)
    return trainer.export_subject_lora(lora, folder, info={"base": base})


@pytest.fixture(scope="module")
def subject_lora_file(tmp_path_factory):
    return _export_subject_lora(tmp_path_factory.mktemp("omini"))


def test_toy_flux_cases_name_the_concept_in_t5_tokens_and_each_condition_draws_what_it_says(script, subject_lora_file, tmp_path):
    """On toy-flux the span is the class word's own T5 tokens and the reference toy-flux's 8x8 condition
    group; the adapter alone changes the base model's image, and Conceptrol changes it again (its bias keeps
    the other words from the condition)."""
    args = script.parse(["--model", "toy-flux", "--adapter", str(subject_lora_file), "--out", str(tmp_path / "x.md")])
    pipe, lora, encoder, _ = script.load(args)
    assert encoder is None and args.concept_layer is None
    cases = script.concept_cases(pipe, lora, None, world.concept("my_heart"), 3, seed=0)
    for case in cases:
        ids = pipe.t5_tokenizer(case.caption.text).input_ids
        assert pipe.t5_tokenizer.decode([ids[i] for i in case.span]).strip() == "heart"
        assert case.reference.name == "cond" and case.reference.tokens.shape == (1, 64, 64)
    text = cases[2].caption.text  # another heart before the concept: the concept's own occurrence
    assert cases[2].span == token_span(pipe.t5_tokenizer, text, "heart", occurrence=1, max_length=pipe.max_length)

    def draw(condition):
        return script.draw(pipe, cases[1], condition, None, STEPS)

    base, alone, conceptrol = draw(script.BASE), draw(script.ADAPTER), draw(script.Condition("conceptrol"))
    assert (alone - base).abs().max() > 1e-2 and (conceptrol - alone).abs().max() > 1e-3
    groups = script.conditions(None, script.LOW_AUC_LAYER, ablations=False)
    assert list(groups) == ["main"] and groups["main"]["Conceptrol"] == script.Condition("conceptrol", warmup=script.FLUX_WARMUP)


def test_toy_flux_table_and_bad_input(script, subject_lora_file, tmp_path):
    out = tmp_path / "flux.md"
    flags = ["--model", "toy-flux", "--adapter", str(subject_lora_file), "--concept", "my_star", "--prompts", "2", "--steps", str(STEPS)]
    script.main([*flags, "--out", str(out)])
    table, raw = out.read_text(), json.loads(out.with_suffix(".json").read_text())
    assert table.startswith("# The toy DreamBench: Conceptrol on toy-flux (1 concepts x 2 prompts, 2 steps, CFG 4)")
    assert "OminiControl subject LoRA" in table and "| Conceptrol |" in table and "--model toy-flux" in table
    assert len(raw["conditions"]) == 3 and len(raw["images"]) == 3 * 2 and raw["settings"]["image_encoder"] is None
    for bad, message in ((["--ablations"], "--ablations: toy-sd's IP-Adapter settings"),
                         (["--base", "weights"], "--base weights: not a toy-flux folder")):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            script.main([*flags, *bad, "--out", str(tmp_path / "bad.md")])
    other = _export_subject_lora(tmp_path / "other", base_fingerprint="0" * 16)
    with pytest.raises(ValueError, match="trained on another toy-flux"):
        script.main(["--model", "toy-flux", "--adapter", str(other), "--out", str(tmp_path / "c.md")])
    assert not (tmp_path / "bad.md").exists() and not (tmp_path / "c.md").exists()


def test_the_shipped_subject_lora_is_toy_fluxs_default_and_fits_the_shipped_toy_flux(script, tmp_path):
    from minigen.loading.toy import TOY_SUBJECT_LORA

    args = script.parse(["--model", "toy-flux", "--out", str(tmp_path / "bench.md")])
    assert args.adapter == TOY_SUBJECT_LORA and args.image_encoder is None and args.out == tmp_path / "bench.md"
    assert script.as_reported(args.adapter) == "weights/toy-flux-omini/subject_toy-flux.safetensors (shipped)"
    _, lora, _, _ = script.load(args)  # trained on the shipped toy-flux: its fingerprint matches
    assert len(lora) == 3 * (2 + 4) and {r.down.shape[0] for r in lora} == {16}
