"""FLUX.1 Redux: the projector, the SigLIP tower, preprocessing, and loading the official files.

Oracles: diffusers' `ReduxImageEncoder` (pipelines/flux/modeling_flux.py) for the projector, and
transformers' `SiglipImageProcessorPil` + `SiglipModel` for the image -> features path (what
diffusers' FluxPriorReduxPipeline.encode_image runs). Coverage is checked on the official key
manifests (../shared/manifests) as meta tensors.
"""

import fnmatch
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from minigen.image import from_pil, preprocess_siglip
from minigen.loading.coverage import load_exact
from minigen.loading.detect import CheckpointError, detect
from minigen.loading.redux import (
    SIGLIP_NON_VISION_KEYS,
    build_siglip,
    load_redux,
    load_redux_projector,
    load_siglip,
    redux_config_from_keys,
    siglip_config_from_keys,
)
from minigen.models.redux import PRESETS, SIGLIP_PRESETS, ReduxImageEncoder, SiglipConfig, redux_tokens
from minigen.transformers_compat import file_layout, tower

from conftest import TINY_REDUX, TINY_SIGLIP, meta_tensors

TINY_SIZE = TINY_SIGLIP.image_size  # 56 px: 4 x 4 patches of 14


def tiny_siglip_model():
    """A random transformers SiglipModel (text + vision) of TINY_SIGLIP's vision shape: the oracle,
    and the source of a state dict in the hub file's layout (vision_model.*, text_model.*, logit_*)."""
    from transformers import SiglipModel
    from transformers import SiglipConfig as SiglipModelConfig  # text + vision, not minigen's SiglipConfig

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=64, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = SiglipModelConfig(text_config=text, vision_config=TINY_SIGLIP.to_transformers().to_dict())
    return SiglipModel(config).eval()


def sample_image(width: int = 90, height: int = 70, mode: str = "RGB") -> Image.Image:
    """Smooth gradients plus noise, not square: resizing has work to do on every axis."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / width, 255 * y / height, 128 + 60 * np.sin(x / 5.0)], axis=-1)
    rgb = rgb + np.random.default_rng(0).normal(0, 20, rgb.shape)
    image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    if mode == "RGBA":
        alpha = (255 * (x > width // 3)).astype(np.uint8)  # a transparent left third
        image.putalpha(Image.fromarray(alpha))
    return image


def siglip_processor(size: int):
    """The hub's preprocessor_config.json of google/siglip-so400m-patch14-384, at `size`."""
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": size, "width": size}, resample=3, image_mean=[0.5] * 3,
                                   image_std=[0.5] * 3, rescale_factor=1 / 255)


# --- numerics ---------------------------------------------------------------------------------------


def test_projector_matches_diffusers():
    """Reference: diffusers ReduxImageEncoder with the same random weights; fp32, max abs diff <= 1e-5."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder as DiffusersRedux

    config = TINY_REDUX
    ours = ReduxImageEncoder(config).eval()
    theirs = DiffusersRedux(redux_dim=config.siglip_dim, txt_in_features=config.txt_dim).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)  # the same key names: BFL's file loads into both

    features = torch.randn(2, 16, config.siglip_dim)
    with torch.no_grad():
        expected, got = theirs(features).image_embeds, ours(features)
    print(f"projector: max abs diff {(got - expected).abs().max():.2e}, output std {expected.std():.3f}")
    assert got.shape == (2, 16, config.txt_dim)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size, mode", [(TINY_SIZE, "RGB"), (384, "RGB"), (TINY_SIZE, "RGBA"), (TINY_SIZE, "L")])
def test_preprocess_matches_siglip_image_processor(size, mode):
    """Reference: transformers SiglipImageProcessorPil with the hub's settings; max abs diff <= 1e-5.
    Down- (90x70 -> 56) and upscaling (-> 384), alpha composited onto white, grey images made RGB."""
    images = [sample_image(mode="RGBA" if mode == "RGBA" else "RGB"), sample_image(40, 50)]
    if mode == "L":
        images = [image.convert("L") for image in images]
    expected = siglip_processor(size)(images=images, return_tensors="pt")["pixel_values"]
    got = preprocess_siglip(images, size=size)
    print(f"preprocess {size} {mode}: max abs diff {(got - expected).abs().max():.2e}, std {expected.std():.3f}")
    assert got.shape == (2, 3, size, size) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)


def test_tensor_preprocess_agrees_with_pil_up_to_8_bit_rounding():
    """A [0, 1] tensor goes through torch's antialiased bicubic, PIL's 8-bit bicubic's twin: the two
    paths differ by rounding to 8 bits: at most one 8-bit step (2/255 after scaling to [-1, 1]) here,
    asserted with room to 2 steps, and half a step on average."""
    image = sample_image(200, 150)
    got = preprocess_siglip(from_pil(image), size=TINY_SIZE)
    expected = preprocess_siglip([image], size=TINY_SIZE)
    diff = (got - expected).abs()
    print(f"tensor vs PIL path: max abs diff {diff.max():.4f} (2/255 = {2 / 255:.4f}), mean {diff.mean():.5f}")
    assert diff.max() <= 2 * 2 / 255
    assert diff.mean() <= 0.5 * 2 / 255


def test_image_to_tokens_matches_transformers_and_diffusers():
    """Reference: SiglipImageProcessorPil -> SiglipModel.vision_model(...).last_hidden_state ->
    diffusers ReduxImageEncoder, as FluxPriorReduxPipeline runs it; fp32, max abs diff <= 1e-4."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder as DiffusersRedux

    reference = tiny_siglip_model()
    siglip = build_siglip(TINY_SIGLIP, reference.state_dict())  # the whole SiglipModel's keys
    projector = ReduxImageEncoder(TINY_REDUX).eval()
    their_projector = DiffusersRedux(redux_dim=32, txt_in_features=32).eval()
    their_projector.load_state_dict(projector.state_dict())

    images = [sample_image(), sample_image(64, 64)]
    with torch.no_grad():
        pixel_values = siglip_processor(TINY_SIZE)(images=images, return_tensors="pt")["pixel_values"]
        expected = their_projector(reference.vision_model(pixel_values=pixel_values).last_hidden_state).image_embeds
        got = redux_tokens(siglip, projector, preprocess_siglip(images, size=TINY_SIZE))
    print(f"image -> tokens: max abs diff {(got - expected).abs().max():.2e}, output std {expected.std():.3f}")
    assert got.shape == (2, TINY_SIGLIP.num_patches, 32) == (2, 16, 32)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


# --- loading -----------------------------------------------------------------------------------------


def test_build_siglip_takes_vision_only_and_full_files_and_reports_bad_keys():
    full = tiny_siglip_model().state_dict()
    vision_only = {k: v for k, v in full.items() if k.startswith("vision_model.")}
    pixels = torch.rand(1, 3, TINY_SIZE, TINY_SIZE) * 2 - 1
    with torch.no_grad():
        a = build_siglip(TINY_SIGLIP, full)(pixel_values=pixels).last_hidden_state
        b = build_siglip(TINY_SIGLIP, vision_only)(pixel_values=pixels).last_hidden_state
    assert torch.equal(a, b)

    without_head = {k: v for k, v in vision_only.items() if k != "vision_model.head.probe"}
    with pytest.raises(CheckpointError, match=r"1 missing keys(.|\n)*head\.probe"):
        build_siglip(TINY_SIGLIP, without_head)
    stray = {**vision_only, "vision_model.extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"1 unexpected keys(.|\n)*extra\.weight"):
        build_siglip(TINY_SIGLIP, stray)


def test_redux_manifest_loads_with_every_key(manifest):
    """flux1-redux-dev.safetensors: 4 tensors, 64.5 M parameters, all used by the redux-dev preset."""
    weights = meta_tensors(manifest("flux1-redux-dev.json"))
    assert detect(weights).family == "flux-redux"
    assert redux_config_from_keys(weights) == PRESETS["redux-dev"]
    with torch.device("meta"):
        projector = ReduxImageEncoder(PRESETS["redux-dev"])
    load_exact(projector, weights)  # raises on any missing, unexpected or mis-shaped key
    assert sum(p.numel() for p in projector.parameters()) == 64_503_808


@pytest.mark.parametrize("name, family, ignored", [
    ("siglip-so400m-patch14-384_vision.json", "siglip-vision", 0),
    ("siglip-so400m-patch14-384_full.json", "siglip", 888 - 448),  # text tower + logit_scale + logit_bias
])
def test_siglip_manifests_load_with_every_vision_key(manifest, name, family, ignored):
    """Every vision_model.* key (the pooling head included) is used with its shape; only the text
    tower and the two logit scalars of the full file are dropped, on purpose."""
    weights = meta_tensors(manifest(name))
    assert detect(weights).family == family
    config = SIGLIP_PRESETS["siglip-so400m-patch14-384"]
    assert siglip_config_from_keys(weights) == config

    model = build_siglip(config, weights)
    dropped = [k for k in weights if any(fnmatch.fnmatchcase(k, p) for p in SIGLIP_NON_VISION_KEYS)]
    assert len(dropped) == ignored and not any(k.startswith("vision_model.") for k in dropped)
    used = {k: tuple(t.shape) for k, t in weights.items() if k not in dropped}
    assert {k: tuple(t.shape) for k, t in file_layout(model.state_dict(), model, "vision_model").items()} == used
    assert sum(p.numel() for p in model.parameters()) == 428_225_600  # the vision manifest's num_elements
    assert tower(model, "vision_model").embeddings.position_ids.shape == (1, 729)


def test_load_redux_from_files(tmp_path):
    """The hub layouts end to end: a SigLIP folder (config.json + model.safetensors of the whole
    SiglipModel) or a bare vision-tower file, and the BFL projector file. The bare file of a shape
    that is no preset's needs its number of heads, which the weights do not show."""
    reference = tiny_siglip_model()
    folder = tmp_path / "siglip"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(reference.config.to_dict()))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, folder / "model.safetensors")
    vision_file = tmp_path / "siglip_vision.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items() if k.startswith("vision_model.")}, vision_file)
    projector = ReduxImageEncoder(TINY_REDUX)
    redux_file = tmp_path / "flux1-redux-dev.safetensors"
    save_file(projector.state_dict(), redux_file)

    pixels = preprocess_siglip([sample_image()], size=TINY_SIZE)
    with torch.no_grad():
        expected = projector(reference.vision_model(pixel_values=pixels).last_hidden_state)
        for siglip_source, siglip_config in ((folder, None), (vision_file, {"num_heads": TINY_SIGLIP.num_heads})):
            siglip, loaded = load_redux(redux_file, siglip_source, siglip_config=siglip_config, dtype=torch.float32)
            assert SiglipConfig.from_transformers(siglip.config) == TINY_SIGLIP
            assert not any(p.requires_grad for p in [*siglip.parameters(), *loaded.parameters()])
            assert torch.equal(redux_tokens(siglip, loaded, pixels), expected)

    with pytest.raises(CheckpointError, match=r"matches no preset.*number of heads is not in the weights.*num_heads"):
        load_redux(redux_file, vision_file)
    siglip, loaded = load_redux(redux_file, folder)  # default dtype: bfloat16, as BFL runs Redux
    assert {p.dtype for p in [*siglip.parameters(), *loaded.parameters()]} == {torch.bfloat16}
    assert redux_tokens(siglip, loaded, pixels).dtype == torch.bfloat16


def test_wrong_files_are_named(manifest, tmp_path):
    """A FLUX VAE given as the Redux file, or files swapped, fail with what the file looks like."""
    vae_file = tmp_path / "ae.safetensors"
    vae = {key: torch.zeros(1) for key in manifest("ae.json")["tensors"]}
    vae["encoder.conv_out.weight"] = torch.zeros(32, 1, 1, 1)  # 2 x 16 latent channels: the FLUX VAE
    save_file(vae, vae_file)
    with pytest.raises(CheckpointError, match=r"ae\.safetensors is not a FLUX Redux projector file: .*looks like flux-ae"):
        load_redux_projector(vae_file)

    siglip_file = tmp_path / "siglip.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_siglip_model().state_dict().items()}, siglip_file)
    with pytest.raises(CheckpointError, match=r"not a FLUX Redux projector file: .*looks like siglip "):
        load_redux_projector(siglip_file)
    redux_file = tmp_path / "redux.safetensors"
    save_file(ReduxImageEncoder(TINY_REDUX).state_dict(), redux_file)
    with pytest.raises(CheckpointError, match=r"redux\.safetensors is not a SigLIP checkpoint: .*looks like flux-redux"):
        load_siglip(redux_file)


def test_tensor_input_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*x\[None\]"):
        preprocess_siglip(torch.rand(3, 56, 56))
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        preprocess_siglip(torch.rand(1, 3, 56, 56) * 2 - 1)
