"""scripts/sample.py's image to image, inpainting, prompt syntax, embeddings, VAE and model hash, on toy-sd.

References: the API call with the same inputs (`generate(image=, mask=, strength=, prompt_syntax=)`,
compared exactly: the CLI reads the PNG the test wrote, so both see the same uint8 pixels), hashlib's
sha256 for the model hash, and the input pixels themselves outside an inpainting mask (exact, beyond
the 4-pixel blur's reach).
"""

import hashlib

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from minigen.image import from_pil
from minigen.loading.toy import toy_files

from conftest import load_sample_script

FAST = ["--steps", "4", "--seed", "3"]


@pytest.fixture(scope="module")
def sample():
    return load_sample_script()


@pytest.fixture(scope="module")
def base(tmp_path_factory, toy_sd):
    """A 64x64 toy-sd image as a PNG, and a mask PNG whose left 24 columns are white (redrawn)."""
    folder = tmp_path_factory.mktemp("start")
    image = toy_sd.generate("a red star on grass", steps=4, seed=1, progress=False)
    path = folder / "base.png"
    Image.fromarray((image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 24, 64))
    mask.save(folder / "mask.png")
    return path, folder / "mask.png"


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_cli_image_to_image_is_the_api_call(sample, toy_sd, base, tmp_path):
    out = sample.main(["--prompt", "a blue box on sand", "--image", str(base[0]), "--strength", "0.5", *FAST, "--out", str(tmp_path / "a.png")])[0]
    api = toy_sd.generate("a blue box on sand", image=from_pil(Image.open(base[0])), strength=0.5, steps=4, seed=3, progress=False)
    assert np.array_equal(pixels(out), (api[0].permute(1, 2, 0).numpy() * 255).round().astype(int))
    assert "Denoising strength: 0.5" in Image.open(out).info["parameters"]


def test_cli_inpainting_keeps_the_pixels_outside_the_mask(sample, base, tmp_path):
    """Exactly the input's pixels from 12 px (3 blur radii) past the mask's edge; the masked part redrawn."""
    out = sample.main(["--prompt", "a blue box on sand", "--image", str(base[0]), "--mask", str(base[1]), *FAST, "--out", str(tmp_path / "b.png")])[0]
    before, after = pixels(base[0]), pixels(out)
    assert np.array_equal(after[:, 36:], before[:, 36:])
    assert np.abs(after[:, :20] - before[:, :20]).mean() > 5
    assert "Denoising strength: 1.0, Mask blur: 4" in Image.open(out).info["parameters"]


def test_cli_reads_a_grey_coloured_or_transparent_mask_as_a1111_does(sample, base, tmp_path):
    """The mask was drawn from its red channel at 0.5 but pasted back through its grey level as it is: a
    grey mask (178) left the redrawn part 30 % original, a red one 70 %. As A1111 reads a mask: its grey
    level (or a transparent layer's alpha), 128 or more redrawn; the same binary mask for both steps."""
    white = sample.main(["--prompt", "a blue box on sand", "--image", str(base[0]), "--mask", str(base[1]), *FAST, "--out", str(tmp_path / "w.png")])[0]
    binary = np.asarray(Image.open(base[1]))
    masks = {"grey": Image.fromarray(np.where(binary > 0, 178, 40).astype(np.uint8)),
             "layer": Image.fromarray(np.stack([np.full_like(binary, 90)] * 3 + [binary], -1), "RGBA")}  # fmt: skip
    for name, mask in masks.items():
        mask.save(tmp_path / f"{name}.png")
        out = sample.main(["--prompt", "a blue box on sand", "--image", str(base[0]), "--mask", str(tmp_path / f"{name}.png"), *FAST,
                           "--out", str(tmp_path / f"{name}-out.png")])[0]  # fmt: skip
        assert np.array_equal(pixels(out), pixels(white)), name
    from minigen.image import read_mask

    levels = np.array([[0, 127, 128, 129, 255]], np.uint8)  # A1111: alpha above 128, a grey level rounded at 0.5
    Image.fromarray(np.dstack([levels] * 4), "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(levels).save(tmp_path / "levels.png")
    assert np.asarray(read_mask(tmp_path / "alpha.png")).tolist() == [[0, 0, 0, 255, 255]]
    assert np.asarray(read_mask(tmp_path / "levels.png")).tolist() == [[0, 0, 255, 255, 255]]
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = binary  # grey level 76 where red: nothing to redraw, as a green one
    Image.fromarray(red).save(tmp_path / "red.png")
    with pytest.raises(ValueError, match="marks nothing to repaint"):
        sample.main(["--prompt", "a blue box on sand", "--image", str(base[0]), "--mask", str(tmp_path / "red.png"), *FAST])


def test_cli_a1111_syntax_by_default_and_plain_on_request(sample, toy_sd, tmp_path):
    args = ["--prompt", "a (red:1.4) star on grass", *FAST]
    weighted = sample.main([*args, "--out", str(tmp_path / "w.png")])[0]
    plain = sample.main([*args, "--prompt-syntax", "plain", "--out", str(tmp_path / "p.png")])[0]
    api = toy_sd.generate("a (red:1.4) star on grass", steps=4, seed=3, prompt_syntax="a1111", progress=False)
    assert np.array_equal(pixels(weighted), (api[0].permute(1, 2, 0).numpy() * 255).round().astype(int))
    assert not np.array_equal(pixels(weighted), pixels(plain))
    assert "Prompt syntax: plain" in Image.open(plain).info["parameters"]


def test_cli_embedding_model_hash_and_vae(sample, tmp_path):
    """A textual-inversion word changes the image and is recorded; a model given as a file gets A1111's
    hash (sha256[:10]) and its name; --vae is recorded by name."""
    width = 64  # toy-sd's CLIP width
    embedding = tmp_path / "shiny.safetensors"
    safetensors.torch.save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(0))}, embedding)
    model = toy_files("toy-sd")["source"]
    common = ["--model", str(model), *FAST]
    plain = sample.main([*common, "--prompt", "a red star on grass", "--out", str(tmp_path / "p.png")])[0]
    shiny = sample.main([*common, "--prompt", "a shiny star on grass", "--embedding", str(embedding), "--out", str(tmp_path / "s.png")])[0]
    assert not np.array_equal(pixels(plain), pixels(shiny))
    info = Image.open(shiny).info["parameters"]
    digest = hashlib.sha256(open(model, "rb").read()).hexdigest()[:10]
    assert f"Model hash: {digest}, Model: {model.stem}" in info and "Embeddings: shiny.safetensors" in info


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--strength", "0.5"], "--strength needs --image"),
        (["--mask", "m.png"], "--mask needs --image"),
        (["--image", "a.png", "--image", "b.png"], "2 --image without a reference adapter"),
        (["--image", "missing.png"], "--image missing.png does not exist"),
        (["--strength", "1.5"], "argument --strength: 1.5 is outside [0, 1]"),
        (["--prompt-2", "a cat", "--prompt-syntax", "a1111"], "--prompt-2 read the prompt in the plain syntax"),
    ],
)
def test_cli_refuses_start_options_that_cannot_apply(sample, capsys, extra, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sample.run(["--prompt", "a star", *FAST, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_offload_and_weights_dtype(sample, tmp_path, capsys):
    """--offload block's model (its mechanics on the CPU: load_model called as main calls it for a GPU) draws
    the plain image exactly, and main refuses --offload with --device cpu, where it would only copy;
    --weights-dtype fp16 draws the image of a toy-sd whose UNet holds fp16-rounded weights (reference: the
    weights rounded by hand, fp32 compute, <= 1 level of 255); --verbose prints the peak memory."""
    from minigen.loading.auto import load_pipeline
    from minigen.storage import StoredLinear

    args = ["--prompt", "a red star on grass", *FAST]
    offloaded = sample.load_model(sample.parse_args([*args, "--offload", "block"]), "cpu")
    assert any(isinstance(m, StoredLinear) and m.offload is not None for m in offloaded.unet.modules())
    plain = load_pipeline("toy-sd").generate("a red star on grass", steps=4, seed=3, prompt_syntax="a1111", progress=False)
    moved = offloaded.generate("a red star on grass", steps=4, seed=3, prompt_syntax="a1111", progress=False)
    assert torch.equal(plain, moved)
    with pytest.raises(SystemExit, match="--offload block copies weights .* drop --offload"):
        sample.main([*args, "--offload", "block", "--device", "cpu", "--out", str(tmp_path / "o.png")])
    with pytest.raises(SystemExit, match="--offload model and --compile: compiling and offloading do not combine"):
        sample.main([*args, "--offload", "model", "--compile", "--out", str(tmp_path / "o.png")])
    assert not (tmp_path / "o.png").exists()
    stored = sample.main([*args, "--weights-dtype", "fp16", "--verbose", "--out", str(tmp_path / "s.png")])[0]
    assert "peak memory:" in capsys.readouterr().out
    rounded = load_pipeline("toy-sd")
    with torch.no_grad():
        for module in rounded.unet.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.weight.copy_(module.weight.half().float())
    expected = rounded.generate("a red star on grass", steps=4, seed=3, prompt_syntax="a1111", progress=False)
    assert np.abs(pixels(stored) - (expected[0].permute(1, 2, 0).numpy() * 255).round()).max() <= 1
    assert 'Dtype: "fp32, weights fp16"' in Image.open(stored).info["parameters"]


def test_cli_step_caches_reach_the_pipelines(sample, toy_sd, toy_flux, tmp_path):
    """--deep-cache 2 (SD) and --first-block-cache 0.5 (FLUX) draw the API's cached images exactly and record
    the setting; each is refused on the other family."""
    sd = sample.main(["--prompt", "a red star on grass", *FAST, "--deep-cache", "2", "--out", str(tmp_path / "d.png")])[0]
    api = toy_sd.generate("a red star on grass", steps=4, seed=3, deep_cache=2, prompt_syntax="a1111", progress=False)
    assert np.array_equal(pixels(sd), (api[0].permute(1, 2, 0).numpy() * 255).round().astype(int))
    assert "Deep cache: 2" in Image.open(sd).info["parameters"]
    flux = sample.main(["--model", "toy-flux", "--prompt", "a red star on grass", *FAST, "--first-block-cache", "0.5", "--out", str(tmp_path / "f.png")])[0]
    api = toy_flux.generate("a red star on grass", steps=4, seed=3, first_block_cache=0.5, progress=False)
    assert np.array_equal(pixels(flux), (api[0].permute(1, 2, 0).numpy() * 255).round().astype(int))
    with pytest.raises(SystemExit, match="--first-block-cache is FLUX's"):
        sample.main(["--prompt", "a star", *FAST, "--first-block-cache", "0.1"])


def test_cli_t5_tokens_set_flux_text_length(sample, toy_flux, tmp_path):
    """--t5-tokens 64 draws the API's image with the prompt padded to 64 tokens (not toy-flux's own 48:
    FLUX reads the padding) and records it; SD models and more than 512 tokens are refused."""
    from dataclasses import replace

    out = sample.main(["--model", "toy-flux", "--prompt", "a red star on grass", *FAST, "--t5-tokens", "64", "--out", str(tmp_path / "t.png")])[0]
    api = replace(toy_flux, max_length=64).generate("a red star on grass", steps=4, seed=3, progress=False)
    own = toy_flux.generate("a red star on grass", steps=4, seed=3, progress=False)
    assert np.array_equal(pixels(out), (api[0].permute(1, 2, 0).numpy() * 255).round().astype(int))
    assert (api - own).abs().max() > 1e-3 and toy_flux.max_length == 48
    assert "T5 tokens: 64" in Image.open(out).info["parameters"]
    with pytest.raises(SystemExit, match="--t5-tokens is FLUX's"):
        sample.main(["--prompt", "a star", *FAST, "--t5-tokens", "64"])
    with pytest.raises(SystemExit, match="at most 512"):
        sample.main(["--model", "toy-flux", "--prompt", "a star", *FAST, "--t5-tokens", "513"])


@pytest.mark.parametrize("name", ["toy-sd", "toy-flux"])
def test_cli_toy_model_by_name_records_its_files_hash(sample, tmp_path, name):
    """A toy model named by its preset records A1111's hash of its shipped file (toy-flux: the
    transformer's), as the file itself would, under the preset's name."""
    [out] = sample.main(["--model", name, "--prompt", "a red star on grass", "--steps", "1", "--seed", "0", "--out", str(tmp_path / "t.png")])
    digest = hashlib.sha256(open(toy_files(name)["source"], "rb").read()).hexdigest()[:10]
    assert f"Model hash: {digest}, Model: {name}," in Image.open(out).info["parameters"]


def test_allow_pickle_keeps_a_safetensors_loras_metadata(sample, tmp_path):
    """--allow-pickle (for a .ckpt model, say) read every LoRA into a plain dict, dropping the metadata where a
    diffusers file keeps its lora_alpha (r 2, alpha 8: scale 4): the image was the LoRA's at scale 1, up to
    167 levels off. Only pickled files are read first now, so both runs draw the image of the scaled LoRA,
    and the same tensors without their metadata draw another."""
    from diffusers import StableDiffusionPipeline

    from minigen.loading.auto import load_pipeline
    from minigen.loading.files import read_state_dict
    from minigen.loading.keymaps_unet import unet_to_diffusers

    unet = load_pipeline("toy-sd").unet
    paths = [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(("attn2.to_k", "attn2.to_v"))]
    tagged = {f"{p}.weight": torch.tensor(i) for i, p in enumerate(paths)}
    names = {paths[int(i)]: k.removesuffix(".weight") for k, i in unet_to_diffusers(tagged, unet.config).items()}
    g = torch.Generator().manual_seed(0)
    layers = {}
    for path, name in names.items():
        weight = unet.get_submodule(path).weight
        layers[f"{name}.lora_A.weight"] = torch.randn(2, weight.shape[1], generator=g) * 0.3
        layers[f"{name}.lora_B.weight"] = torch.randn(weight.shape[0], 2, generator=g) * 0.3
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata={"r": 2, "lora_alpha": 8})
    lora, unscaled = tmp_path / "pytorch_lora_weights.safetensors", tmp_path / "unscaled.safetensors"
    safetensors.torch.save_file(read_state_dict(lora), unscaled)  # the same tensors, without the metadata

    def draw(name, file, *extra):
        return pixels(sample.main(["--prompt", "a red star on grass", *FAST, "--lora", f"{file}:1", *extra, "--out", str(tmp_path / name)])[0])

    scaled = draw("a.png", lora)
    assert np.array_equal(scaled, draw("b.png", lora, "--allow-pickle"))
    assert np.abs(scaled - draw("c.png", unscaled)).max() > 10
