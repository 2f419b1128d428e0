"""scripts/sample.py --aligngen FILE --image REF --concept WORD, on toy-flux with a random AlignGen file and
a tiny random Redux (SigLIP folder + projector file whose tokens are toy-flux's 64-wide T5 states).

References: the Python API called directly with the same files and seed (`load_aligngen`, `load_redux`,
`redux_tokens`, `prepare` with the settings the file records, `pipe.generate`), compared exactly on the
8-bit pixels the CLI writes (the same float image quantized the same way); bad input: exit status 2 and
one line on stderr, no traceback, naming the problem and the fix.
"""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import SiglipVisionModel

from minigen.image import from_pil, preprocess_siglip
from minigen.loading.aligngen import load_aligngen, save_aligngen
from minigen.loading.redux import load_redux
from minigen.methods.aligngen import AlignGen, AlignGenConfig, AlignGenSettings, centre_square, prepare
from minigen.models.flux import Flux
from minigen.models.redux import ReduxConfig, ReduxImageEncoder, redux_tokens

from conftest import TINY_FLUX, TINY_SIGLIP, load_sample_script

PROMPT = "a red star to the left of a blue circle on grass"
FAST = ["--model", "toy-flux", "--steps", "2", "--seed", "3", "--device", "cpu"]  # the API image is drawn on the CPU too
SETTINGS = AlignGenSettings(reference_size=64)  # what the file records, as train_aligngen's toy runs do


def random_aligngen(transformer, seed: int = 0) -> AlignGen:
    """An AlignGen whose every weight (the zero-initialized outputs and LoRA ups too) is drawn from N(0, 0.02²)."""
    aligngen = AlignGen(AlignGenConfig.for_transformer(transformer), transformer)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in aligngen.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return aligngen


@pytest.fixture(scope="module")
def sample():
    return load_sample_script()


@pytest.fixture(scope="module")
def files(tmp_path_factory, toy_flux):
    """The AlignGen file (with train_aligngen's record of its settings), a SigLIP folder, a Redux projector
    file, two reference PNGs, and an AlignGen file of another base model (the tiny FLUX of the tests)."""
    folder = tmp_path_factory.mktemp("aligngen")
    record = {"training": json.dumps({"method": asdict(SETTINGS), "batch": 4})}
    save_aligngen(random_aligngen(toy_flux.transformer), folder / "toy.safetensors", metadata=record)
    save_aligngen(AlignGen(AlignGenConfig.for_transformer(Flux(TINY_FLUX)), Flux(TINY_FLUX)), folder / "other.safetensors")

    torch.manual_seed(0)
    siglip = SiglipVisionModel(TINY_SIGLIP.to_transformers())
    (folder / "siglip").mkdir()
    (folder / "siglip" / "config.json").write_text(json.dumps(siglip.config.to_dict()))
    tensors = {(k if k.startswith("vision_model.") else f"vision_model.{k}"): v.contiguous() for k, v in siglip.state_dict().items()}
    save_file(tensors, folder / "siglip" / "model.safetensors")
    width = toy_flux.transformer.config.context_in_dim
    save_file(ReduxImageEncoder(ReduxConfig(siglip_dim=TINY_SIGLIP.hidden_size, hidden=96, txt_dim=width)).state_dict(), folder / "redux.safetensors")

    g = torch.Generator().manual_seed(1)
    for name, size in (("star.png", (48, 40)), ("circle.png", (40, 40))):
        Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()).save(folder / name)
    return folder


def redux_args(files):
    return ["--redux", str(files / "redux.safetensors"), "--siglip", str(files / "siglip")]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def api_image(pipe, files, words, references):
    """The Python API's image: the file, the Redux tokens of each reference, `prepare`, `generate` (toy-flux's
    defaults: true CFG 4 with the empty negative prompt), as 8-bit pixels."""
    aligngen = load_aligngen(files / "toy.safetensors", pipe.transformer)
    siglip, projector = load_redux(files / "redux.safetensors", files / "siglip", dtype=torch.float32)
    seen = [centre_square(from_pil(Image.open(files / r).convert("RGB"))) for r in references]  # as the file was trained (star.png is 48x40)
    redux = [redux_tokens(siglip, projector, preprocess_siglip(image, size=TINY_SIGLIP.image_size)) for image in seen]
    inputs = prepare(pipe, aligngen, PROMPT, words, [files / r for r in references], redux, SETTINGS)
    images = pipe.generate(**inputs.generate_kwargs(), steps=2, seed=3, progress=False)
    return (images[0].permute(1, 2, 0).numpy() * 255).round().astype(int)


def run_cli(sample, files, out, *pairs):
    return sample.main([*FAST, "--prompt", PROMPT, "--aligngen", str(files / "toy.safetensors"), *redux_args(files), *pairs, "--out", str(out)])[0]


def test_cli_aligngen_is_the_api_call(sample, toy_flux, files, tmp_path):
    """One subject: the CLI's PNG is the API's image pixel for pixel, not toy-flux's image without AlignGen;
    the PNG names the file, concept and reference."""
    out = run_cli(sample, files, tmp_path / "one.png", "--image", str(files / "star.png"), "--concept", "star")
    assert np.array_equal(pixels(out), api_image(toy_flux, files, ["star"], ["star.png"]))
    plain = toy_flux.generate(PROMPT, steps=2, seed=3, progress=False)
    assert np.abs(pixels(out) - (plain[0].permute(1, 2, 0).numpy() * 255).round().astype(int)).max() > 0
    info = Image.open(out).info
    assert "AlignGen: toy.safetensors, Concepts: star, References: star.png" in info["parameters"]
    assert json.loads(info["minigen"])["concepts"] == "star"


def test_cli_aligngen_two_subjects_are_the_api_call_and_differ_from_one(sample, toy_flux, files, tmp_path):
    """Two --image/--concept pairs, in order: the API's two-subject image, not the one-subject image."""
    two = ["--image", str(files / "star.png"), "--concept", "star", "--image", str(files / "circle.png"), "--concept", "circle"]
    out = run_cli(sample, files, tmp_path / "two.png", *two)
    expected = api_image(toy_flux, files, ["star", "circle"], ["star.png", "circle.png"])
    assert np.array_equal(pixels(out), expected)
    assert np.abs(expected - api_image(toy_flux, files, ["star"], ["star.png"])).max() > 0
    assert "Concepts: \"star, circle\", References: \"star.png, circle.png\"" in Image.open(out).info["parameters"]


def test_cli_aligngen_with_weights_kept_in_fp16(sample, toy_flux, files, tmp_path):
    """--weights-dtype fp16 (the transformer computes in fp32 from fp16 storage): the reference LoRA takes the
    compute dtype, not the stored weight's, and the image stays within a few levels of the API's fp32 one."""
    out = run_cli(sample, files, tmp_path / "fp16.png", "--image", str(files / "star.png"), "--concept", "star", "--weights-dtype", "fp16")
    difference = np.abs(pixels(out) - api_image(toy_flux, files, ["star"], ["star.png"]))
    assert difference.mean() < 1 and difference.max() <= 8, (difference.mean(), difference.max())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "toy-sd", "--prompt", PROMPT, "{aligngen}", "{star}"], "AlignGen runs on FLUX, and toy-sd is an SD model; give a FLUX model"),
        (["--prompt", "a red box on sand", "{aligngen}", "{star}"], "the concept word 'star' is not in the prompt 'a red box on sand': write it into the prompt"),
        (["--prompt", PROMPT, "{aligngen}", "--image", "{missing}", "--concept", "star"], "missing.png does not exist"),
        (["--prompt", PROMPT, "{aligngen}", "--image", "{broken}", "--concept", "star"], "broken.png: cannot be read as an image"),
        (["--prompt", PROMPT, "--aligngen", "{other}", "{star}"], "was trained for another base model (its base's FluxConfig has vec_in_dim 24, this model's 64"),
        (["--prompt", PROMPT, "{aligngen}", "{star}", "--concept", "circle"], "1 --image but 2 --concept: give one concept per image, in the same order"),
        (["--prompt", PROMPT, "{aligngen}", "{star}", "--image", "{circle}"], "2 --image but 1 --concept: give one concept per image"),
        (["--prompt", PROMPT, "{aligngen}", "{star}", "--omini", "x.safetensors"], "--aligngen and --omini are two reference adapters; give one"),
        (["--prompt", PROMPT, "{aligngen}", "{star}", "--ip-adapter", "x.safetensors"], "--aligngen and --ip-adapter are two reference adapters; give one"),
        (["--prompt", PROMPT, "--aligngen", "{missing}", "{star}"], "missing.png: no such file; give the .safetensors that scripts/train_aligngen.py wrote"),
        (["--prompt", PROMPT, "{aligngen}", "--image", "{star_png}"], "--aligngen: give each --image the concept word that names its subject in the prompt"),
        (["--prompt", PROMPT, "{aligngen}", "{star}", "--ip-scale", "2"], "--ip-scale: Conceptrol's options; --aligngen takes none of them"),
        (["--prompt", PROMPT, "--redux", "r.safetensors"], "--redux and --siglip give AlignGen the references' Redux tokens; they go with --aligngen"),
        (["--prompt", PROMPT, "--aligngen", "{toy}", "{star}"], "reads 64-wide T5 states, and black-forest-labs/FLUX.1-Redux-dev's tokens are 4096 wide"),
    ],
    ids=["sd-model", "concept-not-in-prompt", "missing-reference", "unreadable-reference", "another-base-model", "two-concepts-one-image",
         "one-concept-two-images", "with-omini", "with-ip-adapter", "missing-file", "no-concept", "conceptrol-option", "redux-alone",
         "toy-without-redux"],
)  # fmt: skip
def test_cli_aligngen_bad_input_is_one_line_and_exit_status_2(sample, files, tmp_path, capsys, argv, message):
    (tmp_path / "broken.png").write_text("not an image")
    fill = {"{aligngen}": ["--aligngen", str(files / "toy.safetensors"), *redux_args(files)], "{star}": ["--image", str(files / "star.png"), "--concept", "star"],
            "{missing}": [str(tmp_path / "missing.png")], "{broken}": [str(tmp_path / "broken.png")], "{other}": [str(files / "other.safetensors")],
            "{circle}": [str(files / "circle.png")], "{star_png}": [str(files / "star.png")], "{toy}": [str(files / "toy.safetensors")]}  # fmt: skip
    argv = [part for arg in argv for part in fill.get(arg, [arg])]
    model = [] if "--model" in argv else ["--model", "toy-flux"]
    assert sample.run([*model, *argv, "--steps", "1", "--seed", "1", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_training_pairs_read_redux_tokens_at_the_siglip_towers_size(files, toy_flux):
    """train_aligngen.py --pairs preprocessed every reference for SigLIP at 384 px whatever the tower read
    (a shape error in transformers on the tiny tower of 56 px); now at the tower's own size, as sample.py."""
    from conftest import load_script

    script = load_script("train_aligngen")
    siglip, projector = load_redux(files / "redux.safetensors", files / "siglip", dtype=torch.float32)
    entry = {"target": files / "circle.png", "reference": files / "star.png", "caption": "a {} on grass", "names": ["star"]}
    [pair] = script.manifest_pairs(toy_flux, [entry], (siglip, projector), size=32, reference_size=32, s_star=True)
    expected = redux_tokens(siglip, projector, preprocess_siglip(pair.reference[None], size=TINY_SIGLIP.image_size))[0]
    assert torch.equal(pair.redux, expected.float())
