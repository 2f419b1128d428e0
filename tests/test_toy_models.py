"""The shipped toy models (weights/toy-sd.safetensors, weights/toy-flux/): the official layouts,
loading through the real-file loaders, and measured floors of what they draw.

Floors are set below the figures measured with `python -m minigen.toy.evaluate` (weights/README.md)
so that they catch a broken model or loader, not sampling noise: the metric is the toy world's
`prompt_following` (the judge reads the image; objects with the stated attributes, extras penalised)
and the VAE's PSNR on held-out renders.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minigen.loading.detect import detect
from minigen.loading.files import read_state_dict
from minigen.loading.toy import TOY_FLUX, TOY_SD, WEIGHTS, toy_layout
from minigen.toy import captions, evaluate, world
from minigen.toy.judge import judge, judge_background
from minigen.toy.metrics import prompt_following

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_shipped_weights_fit_the_budget():
    total = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert total <= 50 * 2**20, f"weights/ holds {total / 2**20:.1f} MiB; the budget is 50 MB"


def test_toy_sd_is_one_file_in_the_sd15_layout():
    checkpoint = read_state_dict(TOY_SD)
    found = detect(checkpoint)
    assert (found.family, found.layout) == ("sd1", "single-file")
    prefixes = {key.split(".")[0] for key in checkpoint}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."))
               for k in checkpoint)  # fmt: skip


def test_toy_sd_loads_through_the_single_file_path(toy_sd):
    assert toy_sd.default_size == 64 and toy_sd.vae.config.downsample_factor == 4
    assert toy_sd.unet.config.context_dim == toy_sd.text_encoders[0].config.hidden_size
    paths = toy_sd.unet.attention_layers().values()
    assert any(p.startswith("input_blocks.1.") for p in paths) and any(p.startswith("input_blocks.3.") for p in paths)


def test_vae_reconstructs_heldout_renders(toy_sd):
    assert evaluate.reconstruction_psnr(toy_sd.vae, n=50) >= PSNR_FLOOR


PSNR_FLOOR = 30.0  # the target; measured on 200 held-out renders: toy-sd 32.2 dB, toy-flux 34.9 dB (its halves world)


def recall(judged, caption, attribute: str) -> float:
    """Share of the values of `attribute` ("color", "shape") a caption names that the judge found on
    some object of the image."""
    wanted = {m.attributes[attribute] for m in caption.mentions}
    return len(wanted & {getattr(o, attribute) for o in judged}) / len(wanted)


def smoke_sample(pipe, n: int = 24, layout: str = "anywhere") -> dict[str, float]:
    """Sample the first n held-out prompts of the model's world (25 steps, the model's default CFG) and
    judge the images: the mean colour and shape recall, background accuracy and prompt following, each
    metric also against another prompt's caption (prompt i + 7), the level an image unrelated to its
    prompt reaches."""
    from minigen.image import to_pil

    prompts = captions.heldout_prompts(n, layout=layout)
    images = to_pil(evaluate.generate(pipe, [c.text for _, c in prompts], steps=25))
    judged = [judge(image) for image in images]
    other = [prompts[(i + 7) % n][1] for i in range(n)]
    found = {"background": np.mean([judge_background(image) == scene.background for image, (scene, _) in zip(images, prompts)])}
    for name, attribute in (("colour", "color"), ("shape", "shape")):
        found[name] = np.mean([recall(j, c, attribute) for j, (_, c) in zip(judged, prompts)])
        found[f"{name} other"] = np.mean([recall(j, c, attribute) for j, c in zip(judged, other)])
    found["following"] = np.mean([prompt_following(j, c) for j, (_, c) in zip(judged, prompts)])
    found["following other"] = np.mean([prompt_following(j, c) for j, c in zip(judged, other)])
    return found


@pytest.mark.slow
def test_smoke_sample_follows_the_prompts_shapes_colours_and_background(toy_sd):
    """24 held-out prompts, 25 steps. The shipped toy-sd (run 7: strict prompt following 0.52 on 200
    prompts, weights/README.md) measured on these: prompt following 0.62 (0.0 against another prompt's
    caption), shape recall 0.94 (0.23 against another's), colour recall 0.89 (0.17), background 0.88
    (chance 1/6); the toy-sd shipped before it (run 5) 0.58, 0.85 (0.21), 0.83 (0.17), 0.88; toy world
    v2's model before its --shape-only continuations 0.56, 0.85 (0.25), 0.83 (0.24), 0.88.
    Each floor is well below its figure (the v1 model, which could not draw shapes, had shape recall 0.27
    and prompt following 0.09 here, and fails them)."""
    found = smoke_sample(toy_sd)
    assert found["following"] >= 0.3 and found["following"] > found["following other"], found
    assert found["shape"] >= 0.6 and found["shape"] >= found["shape other"] + 0.25, found
    assert found["colour"] >= 0.6 and found["colour"] >= found["colour other"] + 0.3, found
    assert found["background"] >= 0.5, found


@pytest.mark.slow
def test_toy_sd_draws_a_shape_named_alone(toy_sd):
    """"a heart on a grass background", each shape named by its word alone as a subject-driven prompt names
    its subject, seeds 0-3 (25 steps, CFG 7.5): the judged image holds that shape. Measured over seeds 0-7:
    61 of 64 with the shipped toy-sd (run 7), 52 of 64 with run 5 (both trained on with --shape-only 0.15),
    16 of 64 with toy world v2's model before them, whose captions always stated colour; the floor 0.5
    fails the latter."""
    assert shapes_named_alone(toy_sd) >= 0.5


def shapes_named_alone(pipe, seeds: int = 4) -> float:
    """The share of images of "a <shape> on a grass background", for each shape and seeds 0 to seeds - 1
    (25 steps, the model's CFG), in which the judge finds that shape."""
    from minigen.image import to_pil

    shapes = [shape for shape in world.SHAPES for _ in range(seeds)]
    prompts = [f"a {shape} on a grass background" for shape in world.SHAPES]
    images = [image for prompt in prompts for image in to_pil(evaluate.generate(pipe, [prompt] * seeds, steps=25, seed=0))]
    return float(np.mean([any(o.shape == shape for o in judge(image)) for image, shape in zip(images, shapes)]))


def test_sample_script_defaults_to_toy_sd(tmp_path):
    """`python scripts/sample.py --prompt ...` with no model draws the prompt with toy-sd, 64x64."""
    sys.path.insert(0, str(SCRIPTS))
    import sample

    prompt = "a large yellow star on a grass background"
    [out] = sample.main(["--prompt", prompt, "--seed", "3", "--out", str(tmp_path / "star.png")])
    image = Image.open(out)
    assert image.size == (64, 64) and "toy-sd" in image.info["parameters"]
    assert "yellow" in {o.color for o in judge(image)}
    with pytest.raises(FileExistsError, match="exists"):
        sample.main(["--prompt", prompt, "--out", str(out)])


def test_sample_script_draws_the_star_it_is_asked_for(tmp_path):
    """The toy world's acceptance check: the default model draws "a large blue star on a white background"
    as one blue star (judged; 16 of seeds 0-15 with the shipped toy-sd, with run 5 and with toy world v2's
    model before its --shape-only continuations, 5 of 16 with the first one)."""
    sys.path.insert(0, str(SCRIPTS))
    import sample

    stars = 0
    for seed in range(4):
        [out] = sample.main(["--prompt", "a large blue star on a white background", "--seed", str(seed), "--out", str(tmp_path / f"{seed}.png")])
        stars += [(o.shape, o.color) for o in judge(Image.open(out))] == [("star", "blue")]
    assert stars >= 3


def test_sample_script_applies_residuals_everywhere_or_with_lag(toy_sd, tmp_path):
    """--residuals changes the image, --lag changes it less than everywhere (the residual is scoped),
    and the script says what is wrong with --lag alone or a prompt without the identifier."""
    sys.path.insert(0, str(SCRIPTS))
    import sample

    from minigen.methods.residuals import Residuals

    residuals = Residuals(toy_sd.unet, identifier="sks", macro_class="star", init_scale=3.0, generator=torch.Generator().manual_seed(0))
    file = residuals.save(tmp_path / "star.safetensors", base="toy-sd")
    prompt = ["--prompt", "a sks star on a grass background", "--seed", "2", "--steps", "10"]

    def pixels(name, *extra):
        [out] = sample.main([*prompt, "--out", str(tmp_path / f"{name}.png"), *extra])
        return np.asarray(Image.open(out), np.float32) / 255, Image.open(out).info["parameters"]

    base, _ = pixels("base")
    everywhere, _ = pixels("everywhere", "--residuals", str(file))
    lag, parameters = pixels("lag", "--residuals", f"{file}:1.0", "--lag")
    assert 'Residuals: "star.safetensors:1.0"' in parameters and "Lag: quantile 0.5" in parameters
    assert 0 < np.abs(lag - base).mean() < np.abs(everywhere - base).mean()
    with pytest.raises(SystemExit, match="--lag applies Personalized Residuals locally"):
        sample.main([*prompt, "--lag", "--out", str(tmp_path / "x.png")])
    with pytest.warns(UserWarning, match="lacks the identifier 'sks'"):
        sample.main(["--prompt", "a star on sand", "--residuals", str(file), "--lag", "--steps", "2", "--out", str(tmp_path / "y.png")])


def circle_concept(toy_sd, tmp_path):
    """A "sks circle" residuals file (random, init scale 3, seed 0) and a reference image of a blue circle with
    orange stripes: (residuals, file, reference png)."""
    from minigen.methods.residuals import Residuals
    from minigen.toy import scenes
    from minigen.toy.pairs import reference_scene

    residuals = Residuals(toy_sd.unet, identifier="sks", macro_class="circle", init_scale=3.0, generator=torch.Generator().manual_seed(0))
    file = residuals.save(tmp_path / "circle.safetensors", base="toy-sd")
    reference = tmp_path / "reference.png"
    scenes.render(reference_scene(("circle", "blue", "striped", "orange"), np.random.default_rng(0))).image.save(reference)
    return residuals, file, reference


def test_sample_script_combines_residuals_with_lag_and_conceptrol(toy_sd, tmp_path):
    """--residuals --lag with --ip-adapter (once refused: "compose their Controls in code") draws the
    image of the API call with `combine(lag_controls(...), ConceptrolSD(...).controls)` (exact in
    uint8), which differs from each method alone."""
    sys.path.insert(0, str(SCRIPTS))
    import sample

    from minigen.controls import combine
    from minigen.loading.ip_adapter import load_ip_adapter
    from minigen.loading.auto import load_pipeline
    from minigen.methods.conceptrol import ConceptrolSD, default_concept_layer, sd_concepts
    from minigen.methods.residuals import Residuals, concept_tokens, lag_controls

    residuals, file, reference = circle_concept(toy_sd, tmp_path)
    prompt = "a sks circle on a grass background"
    run = ["--prompt", prompt, "--seed", "2", "--steps", "6"]
    adapter = ["--ip-adapter", "ip-adapter-plus_toy-sd", "--image", str(reference), "--concept", "circle"]

    def pixels(name, *extra):
        [out] = sample.main([*run, "--out", str(tmp_path / f"{name}.png"), *extra])
        return np.asarray(Image.open(out), np.int16)

    both = pixels("both", "--residuals", str(file), "--lag", *adapter)
    pipe = load_pipeline("toy-sd")
    adapter_model, encoder = load_ip_adapter("ip-adapter-plus_toy-sd", pipe.unet)
    conceptrol = ConceptrolSD(adapter_model.projections(), sd_concepts(pipe, adapter_model, encoder, prompt, [(Image.open(reference).convert("RGB"), "circle")]),
                              6, scale=1.0, warmup=0.2, concept_layer=default_concept_layer(pipe.unet))  # fmt: skip
    lag = lag_controls([(Residuals.load(file, pipe.unet), concept_tokens(pipe.tokenizers[0], prompt, residuals), 1.0)])
    api = pipe.generate(prompt, steps=6, seed=2, controls=combine(lag, conceptrol.controls), prompt_syntax="plain", progress=False)
    assert np.array_equal(both, (api[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16))
    for alone in (pixels("lag", "--residuals", str(file), "--lag"), pixels("conceptrol", *adapter)):
        assert np.abs(both - alone).mean() > 0.5


def test_sample_script_finds_lag_and_conceptrol_words_in_the_a1111_chunks(toy_sd, tmp_path):
    """--residuals --lag --ip-adapter --prompt-syntax a1111 (once refused): after BREAK, chunk 1 is [BOS, a, sks,
    circle, on, ...] at positions 77, 78, 79, 80, ..., so LAG records the attention to 79 and 80 and Conceptrol
    to 80 (hand-computed). The image is the API call's with those positions written by hand (exact in uint8),
    it differs from one that records chunk 0's "box" (3) instead, and the PNG records the a1111 syntax (the
    default, left out; these methods' own default, plain, is written)."""
    sys.path.insert(0, str(SCRIPTS))
    import sample

    from minigen.controls import combine
    from minigen.loading.ip_adapter import load_ip_adapter
    from minigen.methods.conceptrol import ConceptrolSD, SDConcept, default_concept_layer, sd_concepts
    from minigen.methods.residuals import Residuals, concept_tokens, lag_controls

    residuals, file, reference = circle_concept(toy_sd, tmp_path)
    prompt = "a blue box on sand BREAK a (sks circle:1.2) on a grass background"
    tokenizer = toy_sd.tokenizers[0]
    assert concept_tokens(tokenizer, prompt, residuals, syntax="a1111") == [79, 80]
    adapter_model, encoder = load_ip_adapter("ip-adapter-plus_toy-sd", toy_sd.unet)
    [concept] = sd_concepts(toy_sd, adapter_model, encoder, prompt, [(Image.open(reference).convert("RGB"), "circle")], prompt_syntax="a1111")
    assert list(concept.span) == [80]

    def api(lag_positions, concept_span):
        conceptrol = ConceptrolSD(adapter_model.projections(), [SDConcept(concept_span, concept.ip_tokens, concept.uncond_tokens)], 6,
                                  scale=1.0, warmup=0.2, concept_layer=default_concept_layer(toy_sd.unet))  # fmt: skip
        lag = lag_controls([(Residuals.load(file, toy_sd.unet), lag_positions, 1.0)])
        images = toy_sd.generate(prompt, steps=6, seed=2, controls=combine(lag, conceptrol.controls), prompt_syntax="a1111", progress=False)
        return (images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)

    run = ["--prompt", prompt, "--seed", "2", "--steps", "6", "--residuals", str(file), "--lag",
           "--ip-adapter", "ip-adapter-plus_toy-sd", "--image", str(reference), "--concept", "circle"]  # fmt: skip
    [out] = sample.main([*run, "--prompt-syntax", "a1111", "--out", str(tmp_path / "a1111.png")])
    expected = api([79, 80], [80])
    assert np.array_equal(np.asarray(Image.open(out), np.int16), expected)
    assert np.abs(api([3], [3]) - expected).mean() > 0.5
    assert "Prompt syntax" not in Image.open(out).info["parameters"]
    [plain] = sample.main([*run, "--out", str(tmp_path / "plain.png")])
    assert "Prompt syntax: plain" in Image.open(plain).info["parameters"]


@pytest.mark.slow
def test_shipped_toy_ip_adapter_carries_the_reference_into_the_image(tmp_path):
    """sample.py --ip-adapter ip-adapter-plus_toy-sd (weights/toy-sd-ip-adapter/, loaded by name with its
    tower): the reference of my_circle (a blue circle with orange stripes, alone on white or gray) and
    "a circle on a grass background", seeds 0-3. Metrics: the judge's concept preservation (the concept's
    shape, colour, pattern and pattern colour on the best object) and the images with a blue object (the
    reference's colour, which the prompt does not state). Measured with the shipped toy-sd (run 7) and its
    adapter: base model CP 0.375 (it draws circles, often striped) and a blue object in 1 of 4; adapter
    alone 0.75 and blue in 4 of 4; Conceptrol (the default) 0.625 and 4 of 4. (Run 5 and its adapter:
    0.375 and none blue, 0.625 and 4, 0.5625 and 4.)"""
    sys.path.insert(0, str(SCRIPTS))
    import sample

    from minigen.toy import scenes, world
    from minigen.toy.metrics import concept_preservation
    from minigen.toy.pairs import reference_scene

    circle = world.concept("my_circle")
    reference = tmp_path / "reference.png"
    look = (circle.shape, circle.color, circle.pattern, circle.pattern_color)
    scenes.render(reference_scene(look, np.random.default_rng(0))).image.save(reference)
    adapter = ["--ip-adapter", "ip-adapter-plus_toy-sd", "--image", str(reference)]

    def preservation(name, *extra):
        cp, blue = [], 0
        for seed in range(4):
            [out] = sample.main(["--prompt", "a circle on a grass background", "--seed", str(seed),
                                 "--out", str(tmp_path / f"{name}-{seed}.png"), *extra])  # fmt: skip
            judged = judge(Image.open(out))
            cp.append(concept_preservation(judged, circle))
            blue += any(o.color == circle.color for o in judged)
        return np.mean(cp), blue, Image.open(out).info["parameters"]

    base, base_blue, _ = preservation("base")
    alone, alone_blue, alone_parameters = preservation("alone", *adapter, "--no-conceptrol")
    conceptrol, conceptrol_blue, parameters = preservation("conceptrol", *adapter, "--concept", "circle")
    assert "IP-Adapter: ip-adapter-plus_toy-sd, Concepts: circle, References: reference.png" in parameters
    assert "Conceptrol: off" in alone_parameters and "Conceptrol" not in parameters
    assert base_blue <= 1 and alone_blue >= 3 and conceptrol_blue >= 3, (base_blue, alone_blue, conceptrol_blue)
    assert alone > base and conceptrol > base, (base, alone, conceptrol)


def test_toy_flux_is_in_the_bfl_and_diffusers_layouts_and_loads_through_them(toy_flux):
    found = detect(read_state_dict(TOY_FLUX / "flux1-toy.safetensors"))
    assert (found.family, found.layout) == ("flux-schnell", "bfl")
    assert detect(read_state_dict(TOY_FLUX / "ae.safetensors")).family == "flux-ae"
    assert detect(read_state_dict(TOY_FLUX / "text_encoder" / "model.safetensors")).family == "clip-text"
    assert detect(read_state_dict(TOY_FLUX / "text_encoder_2" / "model.safetensors")).family == "t5-text"
    assert (toy_flux.default_size, toy_flux.default_steps, toy_flux.max_length) == (64, 25, 48)
    assert toy_flux.vae.config.z_channels == 16 and toy_flux.vae.config.downsample_factor == 4
    assert (toy_layout("toy-flux"), toy_layout("toy-sd")) == ("halves", "anywhere")  # the worlds they learnt (weights/README.md)
    assert toy_layout("black-forest-labs/FLUX.1-dev") == toy_layout(TOY_FLUX / "ae.safetensors") == "anywhere"  # not toy models


def test_a_toy_flux_folder_loads_by_its_path_as_toy_flux_does(toy_flux, tmp_path):
    """A folder in weights/toy-flux's layout (what train_toy.py flux writes: its snapshots, its export)
    loads through load_pipeline by path, with the same weights as the name; a folder that lacks a file
    says which."""
    import shutil

    from minigen.loading.auto import load_pipeline

    copy = shutil.copytree(TOY_FLUX, tmp_path / "toy-flux-000875")
    loaded = load_pipeline(copy)
    assert all(torch.equal(a, b) for a, b in zip(loaded.transformer.state_dict().values(), toy_flux.transformer.state_dict().values()))
    (copy / "ae.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ae.safetensors"):
        load_pipeline(copy)


def test_toy_flux_from_its_bfl_files_loads_in_fp32_as_its_preset(toy_flux):
    """The transformer file with --ae / --text-encoders (a real FLUX file's defaults are bf16): fp32, the
    preset's weights, the same image."""
    from minigen.loading.auto import load_pipeline

    files = load_pipeline(TOY_FLUX / "flux1-toy.safetensors", ae=TOY_FLUX / "ae.safetensors", text_encoders=TOY_FLUX)
    assert next(files.transformer.parameters()).dtype == torch.float32
    images = [pipe.generate("a red star on grass", steps=2, seed=0, progress=False) for pipe in (files, toy_flux)]
    assert torch.equal(*images)


def test_toy_flux_vae_reconstructs_heldout_renders(toy_flux):
    assert evaluate.reconstruction_psnr(toy_flux.vae, n=50, layout="halves") >= PSNR_FLOOR  # measured 35.0 dB on these 50, 34.9 on 200


def test_toy_flux_smoke_sample_follows_the_prompts_shapes_colours_and_background(toy_flux):
    """24 held-out prompts of toy-flux's world (one or two objects on the canvas halves), 25 steps, true
    CFG 4. The shipped toy-flux (run 12: strict prompt following 0.205, shape 0.80 on 200 prompts,
    weights/README.md) measured on these: prompt following 0.27 (0.0 against another prompt's caption),
    shape recall 0.83 (0.10 against another's), colour recall 0.90 (0.08), background 0.79 (chance 1/6).
    The toy-flux shipped before it, which drew no shapes, had shape recall near chance and prompt
    following 0.009 on 200 prompts, and fails the shape floor."""
    found = smoke_sample(toy_flux, layout="halves")
    assert found["following"] >= 0.1 and found["following"] > found["following other"], found
    assert found["shape"] >= 0.5 and found["shape"] >= found["shape other"] + 0.25, found
    assert found["colour"] >= 0.6 and found["colour"] >= found["colour other"] + 0.3, found
    assert found["background"] >= 0.5, found


def test_toy_flux_draws_a_shape_named_alone(toy_flux):
    """As for toy-sd: over seeds 0-7 the shipped toy-flux drew the named shape in 60 of 64 images (every
    image one object); the floor 0.5 over seeds 0-3 fails a model that draws no shapes (chance 1/8)."""
    assert shapes_named_alone(toy_flux) >= 0.5


def test_sample_script_runs_toy_flux(tmp_path):
    sys.path.insert(0, str(SCRIPTS))
    import sample

    [out] = sample.main(["--model", "toy-flux", "--prompt", "a large red circle on a sky background", "--seed", "1",
                       "--out", str(tmp_path / "circle.png")])  # fmt: skip
    image = Image.open(out)
    assert image.size == (64, 64) and "toy-flux" in image.info["parameters"]
    assert judge_background(image) == "sky" or "red" in {o.color for o in judge(image)}


def test_saved_masks_have_one_column_per_step_with_a_second_order_sampler(tmp_path):
    """Heun calls the model twice in a step: --save-masks kept a column per call (4 for 3 steps)."""
    sys.path.insert(0, str(SCRIPTS))
    import sample

    from minigen.toy import scenes
    from minigen.toy.pairs import reference_scene

    reference = tmp_path / "reference.png"
    scenes.render(reference_scene(("circle", "blue", "striped", "orange"), np.random.default_rng(0))).image.save(reference)
    sample.main(["--prompt", "a circle on a grass background", "--steps", "3", "--sampler", "heun", "--ip-adapter", "ip-adapter-plus_toy-sd",
                 "--image", str(reference), "--concept", "circle", "--out", str(tmp_path / "c.png"), "--save-masks", str(tmp_path / "m.png")])  # fmt: skip
    assert Image.open(tmp_path / "m.png").size == (3 * 64, 64)  # one concept, three steps


def test_an_all_in_one_flux_checkpoint_gives_its_own_autoencoder(tmp_path):
    """ComfyUI's all-in-one FLUX files hold the autoencoder as vae.* (BFL names) beside the
    model.diffusion_model.* transformer: without ae= it is read from the file (it asked for ae.safetensors),
    the same weights as the separate file's, bit for bit."""
    from safetensors.torch import save_file

    from minigen.loading.files import read_metadata
    from minigen.loading.flux import load_flux

    transformer, ae = TOY_FLUX / "flux1-toy.safetensors", TOY_FLUX / "ae.safetensors"
    tensors = {f"model.diffusion_model.{k}": v for k, v in read_state_dict(transformer).items()}
    tensors |= {f"vae.{k}": v for k, v in read_state_dict(ae).items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "all-in-one.safetensors",
              metadata={**read_metadata(transformer), **read_metadata(ae)})  # fmt: skip
    ours = load_flux(tmp_path / "all-in-one.safetensors", text_encoders=TOY_FLUX, dtype=torch.float32).vae.state_dict()
    theirs = load_flux(transformer, ae=ae, text_encoders=TOY_FLUX, dtype=torch.float32).vae.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_shipped_toy_ip_adapter_is_detected_as_an_sd1_adapter():
    """Its text width (toy-sd's 64) is neither SD1.5's 768 nor SDXL's 2048: SD1.x-like, as toy-sd's UNet is."""
    found = detect(read_state_dict(WEIGHTS / "toy-sd-ip-adapter" / "ip-adapter-plus_toy-sd.safetensors"))
    assert (found.family, found.layout) == ("ip-adapter-plus-sd1", "ip-adapter")


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "'no-such-model' is not an existing file or folder, nor a hub id like 'owner/name'; "
                                   "the presets are toy-sd, toy-flux, sd15"),
    (["--n", "0"], "argument --n: 0 is not positive; give 1 or more"),
    (["--shape-only", "2"], "--shape-only 2.0: give a share in [0, 1]"),
])  # fmt: skip
def test_the_evaluate_command_prints_bad_input_on_one_line(argv, message, capsys):
    from minigen.cli import run

    assert run(evaluate.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_toy_flux_conceptrol_saves_its_mask_grid(tmp_path):
    """--omini --save-masks on toy-flux, whose tokens are 8 pixels wide (FLUX.1's 16): the grid has a
    column per step for its one concept, and the image is written too."""
    from conftest import load_sample_script
    from minigen.toy.scenes import render, sample_scene

    render(sample_scene(np.random.default_rng(1), layout=toy_layout("toy-flux"))).image.save(tmp_path / "ref.png")
    load_sample_script().main(["--model", "toy-flux", "--omini", str(WEIGHTS / "toy-flux-omini" / "subject_toy-flux.safetensors"),
                               "--image", str(tmp_path / "ref.png"), "--concept", "star", "--prompt", "a star on grass",
                               "--steps", "2", "--seed", "1", "--out", str(tmp_path / "c.png"), "--save-masks", str(tmp_path / "m.png")])  # fmt: skip
    assert Image.open(tmp_path / "c.png").size == (64, 64) and Image.open(tmp_path / "m.png").size == (2 * 64, 64)


def test_toy_flux_omini_warmup_that_leaves_no_step_at_the_condition_scale_is_refused(tmp_path, capsys):
    """--warmup 0.7 of 3 steps holds steps 0, 1 and 2 at the warmup scale (i / 3 < 0.7), so --ip-scale would
    change nothing (the images with --ip-scale 0.3 and 3 were byte-identical); refused before drawing."""
    from conftest import load_sample_script
    from minigen.toy.scenes import render, sample_scene

    render(sample_scene(np.random.default_rng(1), layout=toy_layout("toy-flux"))).image.save(tmp_path / "ref.png")
    code = load_sample_script().run(["--model", "toy-flux", "--omini", str(WEIGHTS / "toy-flux-omini" / "subject_toy-flux.safetensors"),
                                     "--image", str(tmp_path / "ref.png"), "--concept", "star", "--prompt", "a star on grass", "--steps", "3",
                                     "--warmup", "0.7", "--ip-scale", "3", "--seed", "1", "--out", str(tmp_path / "c.png")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--warmup 0.7 of 3 steps runs every step at the warmup scale 0.5, so --ip-scale would change nothing" in err
    assert not (tmp_path / "c.png").exists()
