"""scripts/train_toy_adapters.py: the toy world's reference -> target pairs hold the reference's object and
never a personal concept or a held-out pair; training moves the adapter and its vision tower alone (sd),
the subject LoRA alone (flux); the written files load through the official loaders (IP-Adapter,
OminiControl's LoRA) and give the trained tokens or residuals; a stopped run resumes exactly; bad
command lines are refused before any work."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from minigen.image import from_pil, preprocess_clip
from minigen.loading.files import read_state_dict
from minigen.loading.ip_adapter import load_clip_vision, load_ip_adapter
from minigen.loading.lora_flux import read_flux_lora
from minigen.methods.conceptrol import ConceptrolFlux, ConceptrolSD, default_concept_layer, flux_concepts, sd_concepts
from minigen.methods.ominicontrol import condition_group
from minigen.models.ip_adapter import reference_tokens
from minigen.toy import judge, scenes, world
from minigen.toy.pairs import REFERENCE_BACKGROUNDS, pair_caption, render_pairs, sample_pair
from minigen.trainer import TrainConfig

from conftest import load_sample_script, load_script

SEED = 1


@pytest.fixture(scope="module")
def script():
    return load_script("train_toy_adapters")


def _look(obj) -> tuple:
    """What a reference must carry over: shape, colour, pattern, pattern colour (not size or placement)."""
    return (obj.shape, obj.color, obj.pattern, obj.pattern_color)


def test_pairs_hold_the_reference_object_exactly():
    """The cached pixels are the renders of the pairs' scenes; the reference is one object, large and
    centred on a neutral background, with the look of exactly one target object, which the caption
    names by its shape word; the judge, reading pixels alone, finds the reference's look in the target."""
    n = 24
    data = render_pairs(n, SEED)
    for i in range(n):
        pair = sample_pair(np.random.default_rng([SEED, i]))
        for scene, pixels in ((pair.reference, data.references[i]), (pair.target, data.targets[i])):
            assert np.array_equal(pixels.permute(1, 2, 0).numpy(), np.asarray(scenes.render(scene).image)), i
        [alone] = pair.reference.objects
        assert (alone.size, alone.x, alone.y) == ("large", 32.0, 32.0) and pair.reference.background in REFERENCE_BACKGROUNDS
        same = [j for j, obj in enumerate(pair.target.objects) if _look(obj) == _look(alone)]
        assert same == [pair.index] and 1 <= len(pair.target.objects) <= 3, i
        assert all(f"a {alone.shape}" in caption for caption in data.captions[i]), data.captions[i]
        [seen] = judge.judge(data.references[i].permute(1, 2, 0).numpy())
        assert _look(seen) == _look(alone) and _look(seen) in [_look(o) for o in judge.judge(data.targets[i].permute(1, 2, 0).numpy())], i


def test_pairs_are_reproducible_prefix_consistent_and_worker_independent():
    small, large, parallel = render_pairs(3, SEED), render_pairs(5, SEED), render_pairs(5, SEED, workers=2)
    assert torch.equal(small.references, large.references[:3]) and torch.equal(small.targets, large.targets[:3])
    assert small.captions == large.captions[:3] and len(small.captions[0]) == 2
    assert torch.equal(parallel.references, large.references) and torch.equal(parallel.targets, large.targets)
    assert parallel.captions == large.captions


def test_halves_pairs_place_targets_on_the_halves_and_keep_the_reference_centred():
    """In toy-flux's world the targets hold one or two objects, each centred on a canvas half; the
    reference still shows the look alone at the canvas centre; worker parts give the same pairs."""
    slots = set(scenes.LAYOUTS["halves"])
    data, parallel = render_pairs(16, SEED, layout="halves"), render_pairs(16, SEED, workers=2, layout="halves")
    assert torch.equal(parallel.targets, data.targets) and parallel.captions == data.captions
    for i in range(16):
        pair = sample_pair(np.random.default_rng([SEED, i]), "halves")
        assert np.array_equal(data.targets[i].permute(1, 2, 0).numpy(), np.asarray(scenes.render(pair.target).image)), i
        assert 1 <= len(pair.target.objects) <= 2 and all((o.x, o.y) in slots for o in pair.target.objects), pair.target
        [alone] = pair.reference.objects
        assert (alone.x, alone.y) == (32.0, 32.0) and _look(alone) == _look(pair.target.objects[pair.index])


def test_no_personal_concept_or_heldout_pair_in_training_pairs():
    heldout_phrases = {phrase for phrases in world.HELDOUT_RELATION_PHRASES.values() for phrase in phrases}
    for i in range(1500):
        pair = sample_pair(np.random.default_rng([SEED, i]))
        assert pair.target.split == pair.reference.split == "train"
        for obj in (*pair.reference.objects, *pair.target.objects):
            assert (obj.color, obj.shape) not in world.HELDOUT_PAIRS, (i, obj)
            assert (obj.color, obj.pattern, obj.pattern_color) not in world.CONCEPT_LOOKS, (i, obj)
        if i < 200:
            caption = pair_caption(pair, np.random.default_rng([SEED, i, 0]))
            assert not any(phrase in caption for phrase in heldout_phrases), caption


def test_image_and_caption_dropout_follow_the_official_rates(script):
    image, text = script.dropped(200_000, torch.Generator().manual_seed(0))
    for rate, expected in ((image.float().mean(), 0.10), (text.float().mean(), 0.10), ((image & text).float().mean(), 0.05)):
        assert abs(rate.item() - expected) < 0.003


def test_training_moves_the_adapter_and_its_tower_alone_and_the_files_load_like_the_official_ones(script, toy_sd, tmp_path):
    pipe = toy_sd
    frozen = {name: {k: v.clone() for k, v in module.state_dict().items()} for name, module in
              (("unet", pipe.unet), ("vae", pipe.vae), ("text", pipe.text_encoders[0]))}  # fmt: skip
    pairs = render_pairs(12, SEED)
    latents = script.pair_latents(pipe.vae, pairs, "anywhere", torch.device("cpu"), cache=tmp_path)
    stage = TrainConfig(steps=3, batch=4, lr=1e-3, seed=21, warmup=1)
    start = [{k: v.clone() for k, v in module.state_dict().items()} for module in script.toy_ip_adapter(pipe, stage.seed)]
    encoder, adapter = script.train_ip_adapter(pipe, pairs, latents, stage, tmp_path / "work", run={})

    for name, module in (("unet", pipe.unet), ("vae", pipe.vae), ("text", pipe.text_encoders[0])):
        assert all(torch.equal(v, frozen[name][k]) for k, v in module.state_dict().items()), name
    assert all(not torch.equal(v, start[1][k]) for k, v in adapter.state_dict().items())  # every adapter tensor learnt
    moved = {k for k, v in encoder.state_dict().items() if not torch.equal(v, start[0][k])}
    unread = ("vision_model.encoder.layers.2.", "vision_model.post_layernorm.", "visual_projection.")  # after hidden_states[-2]
    assert moved == {k for k, v in encoder.state_dict().items() if v.is_floating_point() and not k.startswith(unread)}

    file = script.export_ip_adapter(encoder, adapter, tmp_path / "out", info={})
    assert file.name == "ip-adapter-plus_toy-sd.safetensors"
    assert {k.split(".")[0] for k in read_state_dict(file)} == {"image_proj", "ip_adapter"}
    loaded, tower = load_ip_adapter(file, pipe.unet, image_encoder=tmp_path / "out" / "image_encoder")
    reference = sample_pair(np.random.default_rng([SEED, 0])).reference  # pair 0 of `pairs`
    image, shape = scenes.render(reference).image, reference.objects[0].shape
    pixels = preprocess_clip(image, tower.config.image_size)
    assert (script.clip_input(pairs.references[:1]) - pixels).abs().max() <= 1e-6  # training sees what sampling gives
    for got, expected in zip(reference_tokens(loaded, tower, pixels), reference_tokens(adapter, encoder, pixels)):
        assert torch.equal(got, expected)
    assert load_clip_vision(tmp_path / "out" / "image_encoder").config.image_size == 64

    # the sampler's path: Conceptrol over the loaded adapter, the reference's object named by its shape word
    prompt = f"a {shape} on grass"
    method = ConceptrolSD(loaded.projections(), sd_concepts(pipe, loaded, tower, prompt, [(image, shape)]), steps=2,
                          concept_layer=default_concept_layer(pipe.unet))
    assert pipe.generate(prompt, steps=2, controls=method.controls, progress=False).shape == (1, 3, 64, 64)


def test_subject_lora_trains_alone_on_the_condition_tokens_and_its_file_reads_as_omini_subject_512(script, toy_flux, tmp_path):
    """flux: 3 steps move every LoRA factor and nothing of toy-flux; the file has omini/subject_512's keys
    (diffusers names, lora_A / lora_B, rank 16, no alpha) and `read_flux_lora` gives back the trained
    residuals on the q and k rows of the fused projections; the condition tokens training sees are the ones
    `condition_group` makes from the rendered reference at sampling; the sampler's path runs on the file."""
    pipe = toy_flux
    frozen = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pairs = render_pairs(12, SEED)
    latents = script.pair_latents(pipe.vae, pairs, "anywhere", torch.device("cpu"), cache=tmp_path)
    references = script.pair_latents(pipe.vae, pairs, "anywhere", torch.device("cpu"), cache=tmp_path, which="references")
    assert references.shape == latents.shape == (12, 16, 16, 16)
    stage = TrainConfig(steps=3, batch=4, lr=1e-3, seed=23, warmup=1)
    lora = script.train_subject_lora(pipe, pairs, latents, references, stage, tmp_path / "work", run={})
    assert all(torch.equal(v, frozen[k]) for k, v in pipe.transformer.state_dict().items())
    # every factor pair learnt (up starts at 0) but one: the last block's condition queries only make
    # condition outputs, which the model drops after it, so its to_q gets no gradient
    last_q = f"single_transformer_blocks.{pipe.transformer.config.depth_single_blocks - 1}.attn.to_q"
    assert [name for name, up in zip(lora.places, lora.up) if not up.abs().sum() > 0] == [last_q]

    file = script.export_subject_lora(lora, tmp_path / "out", info={})
    tensors = read_state_dict(file)
    depth, single = pipe.transformer.config.depth, pipe.transformer.config.depth_single_blocks
    assert len(tensors) == 2 * 3 * (depth + single)
    assert "transformer.transformer_blocks.0.attn.to_k.lora_A.weight" in tensors
    assert "transformer.single_transformer_blocks.0.norm.linear.lora_B.weight" in tensors
    assert {v.shape[0] for k, v in tensors.items() if k.endswith("lora_A.weight")} == {16}
    hidden = pipe.transformer.config.hidden_size
    read = {(r.target, r.outputs): r for r in read_flux_lora(file, pipe.transformer)}
    for trained in lora.low_rank():
        got = read[(trained.target, trained.outputs)]
        assert torch.equal(got.down, trained.down) and torch.equal(got.up, trained.up) and got.scale == 1.0
    assert read[("double_blocks.0.img_attn.qkv", (hidden, 2 * hidden))].up.shape == (hidden, 16)  # to_k: rows [h, 2h)

    reference = sample_pair(np.random.default_rng([SEED, 0])).reference  # pair 0 of `pairs`
    image = scenes.render(reference).image
    at_sampling = condition_group(pipe.vae, from_pil(image), size=None)
    in_training = script.condition_tokens(references[:1], lora)
    assert torch.allclose(in_training.tokens, at_sampling.tokens, atol=1e-5) and torch.equal(in_training.ids, at_sampling.ids)

    shape = reference.objects[0].shape
    prompt = f"a {shape} on grass"
    extra, concepts = flux_concepts(pipe, read_flux_lora(file, pipe.transformer), prompt, [(image, shape)], width=64)
    assert extra[0].tokens.shape == (1, 64, 64) and extra[0].ids[0, 0].tolist() == [0.0, 0.0, 8.0]  # toy-flux: 64 px, 8 tokens wide
    method = ConceptrolFlux(pipe.transformer.attention_layers(), concepts, steps=2)
    assert pipe.generate(prompt, steps=2, extra=extra, controls=method.controls, progress=False).shape == (1, 3, 64, 64)


def test_flux_command_writes_a_subject_lora_that_sample_py_takes_with_omini(script, tmp_path, monkeypatch):
    """`train_toy_adapters.py flux` end to end on 12 pairs, 2 steps, then `sample.py --model toy-flux --omini
    FILE --image REF --concept WORD`: the LoRA file is read and the reference's condition group used (the
    image differs from the plain one), and the PNG records the adapter."""
    from PIL import Image

    monkeypatch.setattr(script, "PAIRS", 12)
    script.main(["flux", "--work", str(tmp_path / "omini"), "--steps", "2", "--batch", "2"])
    file = tmp_path / "omini" / "subject_toy-flux.safetensors"
    assert json.loads(safe_open(str(file), "pt").metadata()["minigen.toy"])["model"] == "subject_toy-flux"
    sample = load_sample_script()
    reference = tmp_path / "reference.png"
    scenes.render(sample_pair(np.random.default_rng([SEED, 0])).reference).image.save(reference)
    prompt = ["--model", "toy-flux", "--prompt", "a star on grass", "--seed", "1", "--steps", "3"]
    [plain] = sample.main([*prompt, "--out", str(tmp_path / "plain.png")])
    [omini] = sample.main([*prompt, "--omini", str(file), "--image", str(reference), "--concept", "star", "--out", str(tmp_path / "omini.png")])
    assert "subject_toy-flux.safetensors" in Image.open(omini).info["parameters"]
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(omini)))


def test_resume_is_exact(script, tmp_path, monkeypatch):
    """4 steps in one go == a run stopped during step 4, after its step-2 checkpoint, then run again by
    the same command: the same files, bit for bit."""
    monkeypatch.setattr(script, "PAIRS", 12)
    flags = ["--steps", "4", "--batch", "2", "--save-every", "2"]
    script.main(["sd", "--work", str(tmp_path / "a"), *flags])

    loss, calls = script.diffusion_loss, []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return loss(*args, **kwargs)

    monkeypatch.setattr(script, "diffusion_loss", stopping)
    with pytest.raises(KeyboardInterrupt):
        script.main(["sd", "--work", str(tmp_path / "b"), *flags])
    monkeypatch.setattr(script, "diffusion_loss", loss)
    script.main(["sd", "--work", str(tmp_path / "b"), *flags])
    logged = (tmp_path / "b" / "ip-adapter-loss.tsv").read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in logged] == [1, 2, 3, 4]
    for name in ("ip-adapter-plus_toy-sd.safetensors", "image_encoder/model.safetensors"):
        straight, resumed = read_state_dict(tmp_path / "a" / name), read_state_dict(tmp_path / "b" / name)
        assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight), name
    with pytest.raises(SystemExit, match="the default --out\\) holds ip-adapter-plus_toy-sd.safetensors already"):  # never replaced unasked
        script.main(["sd", "--work", str(tmp_path / "b"), *flags])
    (tmp_path / "c" / "image_encoder").mkdir(parents=True)  # a tower folder of the user's own was replaced silently
    with pytest.raises(SystemExit, match="--out .* holds image_encoder already; give another --out, or pass --overwrite"):
        script.main(["sd", "--work", str(tmp_path / "b"), "--out", str(tmp_path / "c"), *flags])
    with pytest.raises(ValueError, match="another run"):  # the same work folder with another recipe
        script.main(["sd", "--work", str(tmp_path / "b"), *flags[:-2], "--lr", "1e-3", "--overwrite"])


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "argument --steps: 0 is not positive; give 1 or more"),
    (["--batch", "-2"], "argument --batch: -2 is negative; give 1 or more"),
    (["--save-every", "0"], "argument --save-every: 0 is not positive; give 1 or more"),
    (["--threads", "0"], "argument --threads: 0 is not positive; give 1 or more"),
    (["--lr", "nan"], "argument --lr: nan is not a finite number above 0"),
    (["--lr=-1e-3"], "argument --lr: -1e-3 is not a finite number above 0"),
    (["--base", "missing.safetensors"], "--base missing.safetensors: not a file"),
    (["flux", "--base", "weights"], "--base weights: not a toy-flux folder"),
])  # fmt: skip
def test_bad_values_are_refused_before_any_work(script, tmp_path, flags, message):
    model, flags = (flags[0], flags[1:]) if flags[0] == "flux" else ("sd", flags)
    with pytest.raises(SystemExit, match=re.escape(message)):
        script.main([model, "--work", str(tmp_path / "work"), *flags])
    assert not any(tmp_path.iterdir())


def test_an_adapter_already_in_out_is_refused_before_any_work(script, tmp_path):
    """--out holding the adapter file of an earlier run: refused at the start unless --overwrite."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / script.SUBJECT_FILE).write_bytes(b"an earlier adapter")
    with pytest.raises(SystemExit, match=re.escape(f"holds {script.SUBJECT_FILE} already; give another --out, or pass --overwrite")):
        script.main(["flux", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "work").exists()


def test_a_file_given_for_a_folder_is_refused_before_any_work(script, tmp_path):
    """--work and --out are folders: a file there was taken for an output to replace and found only when the
    adapter was written, after the training."""
    file = tmp_path / "file"
    file.write_text("not a folder")
    for flags, flag in ((["--work", str(file)], "--work"), (["--work", str(tmp_path / "work"), "--out", str(file)], "--out")):
        with pytest.raises(NotADirectoryError, match=f"{flag} .*file is a file, and {flag} names a folder"):
            script.parse(["flux", *flags])
    assert file.read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [file]
