"""Tests of minigen's AutoencoderKL (minigen/models/vae.py) and its key map (minigen/loading/keymaps_vae.py).

Reference for numerics: diffusers `AutoencoderKL` with the same tiny random weights, in fp32.
Reference for names and shapes: the key manifests of the official checkpoint files.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from minigen.loading.keymaps_vae import vae_from_diffusers, vae_to_diffusers
from minigen.models.vae import PRESETS, AutoencoderKL, VAEConfig

from conftest import TINY_FLUX_VAE, TINY_VAE, diffusers_vae, meta_tensors

TINY_CONFIGS = {
    # Two levels: the encoder's and the decoder's first block change width (nin_shortcut).
    "two-level-sd": VAEConfig(base_channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8),
    # FLUX-like: 16 latent channels, shift factor, no quant convs; four levels (8x).
    "tiny-flux": TINY_FLUX_VAE,
}

# diffusers <= 0.13 attention names, as in SD1.5's diffusers VAE.
LEGACY_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def to_legacy_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in sd.items():
        for new, old in LEGACY_ATTENTION_NAMES.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = tensor
    return renamed


def to_current_name(key: str) -> str:
    for new, old in LEGACY_ATTENTION_NAMES.items():
        key = key.replace(f".attentions.0.{old}.", f".attentions.0.{new}.")
    return key


def shapes_of(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in sd.items()}


@pytest.fixture(params=list(TINY_CONFIGS))
def pair(request):
    """(minigen model, diffusers model) with the same random weights, loaded through vae_from_diffusers."""
    config = TINY_CONFIGS[request.param]
    reference = diffusers_vae(config)
    model = AutoencoderKL(config).eval()
    model.load_state_dict(vae_from_diffusers(reference.state_dict()), strict=True)
    return model, reference


# ---------------------------------------------------------------- parity with diffusers


@torch.no_grad()
def test_encode_decode_match_diffusers(pair):
    """Encode (posterior mean) and decode against diffusers AutoencoderKL, fp32, max abs diff <= 1e-4.

    Compared in the unscaled latent space (posterior mean, std ~0.24 to 0.32 for these random
    weights; measured max abs diff ~6e-7) and in image space (decoded std ~0.32 to 0.39; measured
    max abs diff ~4e-6 to 8e-6), so the tolerance is not eased by the small scaling factors.
    """
    model, reference = pair
    config = model.config
    images = torch.rand(2, 3, 32, 48) * 2 - 1

    latents = model.encode(images)
    expected_mean = reference.encode(images).latent_dist.mean
    assert latents.shape == (2, config.z_channels, 32 // config.downsample_factor, 48 // config.downsample_factor)
    assert expected_mean.std() > 0.1
    unscaled = latents / config.scaling_factor + config.shift_factor
    torch.testing.assert_close(unscaled, expected_mean, rtol=0, atol=1e-4)

    decoded = model.decode(latents)
    expected_images = reference.decode(expected_mean).sample
    assert decoded.shape == images.shape
    assert expected_images.std() > 0.1
    torch.testing.assert_close(decoded, expected_images, rtol=0, atol=1e-4)


@torch.no_grad()
def test_encode_sample_matches_diffusers(pair):
    """With a generator, encode draws mean + std * noise exactly as diffusers' latent_dist.sample (atol 1e-4)."""
    model, reference = pair
    config = model.config
    images = torch.rand(1, 3, 32, 32) * 2 - 1

    sampled = model.encode(images, generator=torch.Generator().manual_seed(7))
    expected = reference.encode(images).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sampled / config.scaling_factor + config.shift_factor, expected, rtol=0, atol=1e-4)
    assert not torch.allclose(sampled, model.encode(images), atol=1e-3)  # a sample, not the mean


@torch.no_grad()
def test_legacy_attention_names_load_the_same_weights(pair):
    """SD1.5's diffusers VAE uses query/key/value/proj_attn; they must map to the same ldm tensors."""
    _, reference = pair
    current = vae_from_diffusers(reference.state_dict())
    legacy = vae_from_diffusers(to_legacy_names(reference.state_dict()))
    assert current.keys() == legacy.keys()
    assert all(torch.equal(current[key], legacy[key]) for key in current)


@torch.no_grad()
def test_single_file_layout_agrees_with_diffusers_converter(pair):
    """minigen's state dict is the official single-file layout.

    diffusers' own ldm -> diffusers converter (convert_ldm_vae_checkpoint), fed minigen's state
    dict under the `first_stage_model.` prefix, must give back the diffusers model's state dict
    key for key and value for value. This checks vae_from_diffusers against an independent map.
    """
    model, reference = pair
    single_file = {f"first_stage_model.{key}": tensor for key, tensor in model.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(single_file, dict(reference.config))
    expected = reference.state_dict()
    assert converted.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(converted[key], tensor), key


def test_key_map_round_trip_is_exact(pair):
    """diffusers -> ldm -> diffusers and ldm -> diffusers -> ldm return identical keys and tensors."""
    model, reference = pair
    diffusers_sd = reference.state_dict()
    back = vae_to_diffusers(vae_from_diffusers(diffusers_sd))
    assert back.keys() == diffusers_sd.keys()
    assert all(torch.equal(back[key], diffusers_sd[key]) for key in diffusers_sd)
    assert all(back[key].shape == diffusers_sd[key].shape for key in diffusers_sd)

    ldm_sd = model.state_dict()
    back = vae_from_diffusers(vae_to_diffusers(ldm_sd))
    assert back.keys() == ldm_sd.keys()
    assert all(torch.equal(back[key], ldm_sd[key]) and back[key].shape == ldm_sd[key].shape for key in ldm_sd)


# ---------------------------------------------------------------- tiled decoding


@pytest.mark.parametrize("config", [TINY_VAE, TINY_FLUX_VAE], ids=["tiny-sd", "tiny-flux"])
@torch.no_grad()
def test_tiled_decode_stays_close_to_full_decode(config):
    """Tiled decode of a 28x36 latent (20-latent tiles, overlap 8) against the untiled decode.

    Metric: relative L2 error ||tiled - full|| / ||full|| < 0.15 (measured 0.066 and 0.079 with
    these random weights; decoded std ~0.37). Tiling is not exact because group norms and the mid
    attention see one tile at a time; real VAE weights are far more local than random ones.
    A single tile covering the whole latent must reproduce the untiled decode exactly.
    """
    model = AutoencoderKL(config).eval()
    latents = torch.randn(1, model.config.z_channels, 28, 36)
    full = model.decode(latents)

    tiled = model.decode(latents, tile_size=20, tile_overlap=8)
    assert tiled.shape == full.shape == (1, 3, 224, 288)
    assert full.std() > 0.1
    assert (tiled - full).norm() / full.norm() < 0.15

    assert torch.equal(model.decode(latents, tile_size=64, tile_overlap=8), full)
    assert torch.equal(model.decode(latents, tile_size=36, tile_overlap=8), full)  # exactly one tile


@pytest.mark.parametrize("tile_size, overlap", [(16, 20), (16, 0), (16.0, 8), (16, 8.5), (True, 8)])
def test_tiled_decode_and_encode_refuse_bad_tiles(tile_size, overlap):
    model = AutoencoderKL(TINY_VAE)
    message = rf"tile_size={tile_size!r} and tile_overlap={overlap!r} must be whole numbers of latent pixels with 0 < tile_overlap < tile_size"
    with pytest.raises(ValueError, match=r"decode: " + message.replace("(", r"\(").replace(".", r"\.")):
        model.decode(torch.zeros(1, 4, 8, 8), tile_size=tile_size, tile_overlap=overlap)
    with pytest.raises(ValueError, match=r"encode: "):
        model.encode(torch.zeros(1, 3, 64, 64), tile_size=tile_size, tile_overlap=overlap)


def test_decode_refuses_latents_of_another_shape():
    model = AutoencoderKL(TINY_VAE)
    for latents in (torch.zeros(4, 8, 8), torch.zeros(1, 3, 8, 8)):
        with pytest.raises(ValueError, match=r"decode: expected latents \[B, 4, h, w\], got shape"):
            model.decode(latents)


def test_tile_ramp_counts_exactly_in_bf16():
    """The cross-fade weights of a 2048-pixel tile in bf16 are the float32 ramp rounded once (bf16 counts
    integers exactly only to 256: an arange in bf16 made the ramp a staircase, off by up to 0.078)."""
    from minigen.models.vae import _ramp

    exact = _ramp(2048, 64, torch.zeros(0))
    assert torch.equal(_ramp(2048, 64, torch.zeros(0, dtype=torch.bfloat16)), exact.bfloat16())
    assert torch.equal(exact[:64], (torch.arange(64) + 0.5) / 64) and torch.equal(exact[64:-64], torch.ones(2048 - 128))


@torch.no_grad()
def test_non_finite_autoencoder_output_is_an_error_not_a_black_image():
    """An fp16 overflow in the decoder (imitated: one weight set to Inf) made NaN pixels, which the uint8
    cast turned into a black image without a word; decode_images and encode_images refuse them."""
    from minigen.sampling import NonFiniteError

    model = AutoencoderKL(TINY_VAE).eval()
    latents, images = torch.randn(2, 4, 8, 8), torch.rand(1, 3, 64, 64)
    assert torch.isfinite(model.decode_images(latents)).all() and torch.isfinite(model.encode_images(images)).all()
    model.decoder.conv_in.weight.data[0, 0, 0, 0] = float("inf")
    model.encoder.conv_in.weight.data[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"autoencoder's decode produced non-finite values .*pipe.vae.float\(\)"):
        model.decode_images(latents)
    with pytest.raises(NonFiniteError, match=r"autoencoder's encode produced non-finite values"):
        model.encode_images(images)


@torch.no_grad()
def test_image_helpers_go_row_by_row():
    """encode_images and decode_images run the autoencoder on one row at a time (memory does not grow with
    the batch), giving the batched call's values (<= 1e-5: batched convolutions round otherwise; 3.6e-6 measured)."""
    model = AutoencoderKL(TINY_VAE).eval()
    batches = []
    handles = [part.register_forward_pre_hook(lambda module, inputs: batches.append(inputs[0].shape[0])) for part in (model.encoder, model.decoder)]
    images = torch.rand(3, 3, 64, 64)
    latents = model.encode_images(images)
    decoded = model.decode_images(latents)
    for handle in handles:
        handle.remove()
    assert batches == [1] * 6
    torch.testing.assert_close(latents, model.encode(images * 2 - 1), rtol=0, atol=1e-5)
    torch.testing.assert_close(decoded, ((model.decode(latents) + 1) / 2).clamp(0, 1), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- input errors


def test_encode_rejects_sizes_not_divisible_by_8():
    model = AutoencoderKL(TINY_VAE)
    expected = r"image size 30x44 \(HxW\) is not divisible by 8.*crop the image to a multiple of 8, e\.g\. 24x40"
    with pytest.raises(ValueError, match=expected):
        model.encode(torch.zeros(1, 3, 30, 44))
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 3, H, W\], got \(3, 32, 32\)"):
        model.encode(torch.zeros(3, 32, 32))


# ---------------------------------------------------------------- official configs and key manifests


@pytest.mark.parametrize(
    "preset, folder",
    [
        ("sd", "runwayml/stable-diffusion-v1-5/vae"),
        ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0/vae"),
        ("flux", "black-forest-labs/FLUX.1-dev/vae"),
    ],
)
def test_presets_match_official_configs(preset, folder, shared_hf):
    official = json.loads((shared_hf / folder / "config.json").read_text())
    config = PRESETS[preset]
    assert [config.base_channels * m for m in config.channel_mult] == official["block_out_channels"]
    assert config.num_res_blocks == official["layers_per_block"]
    assert config.z_channels == official["latent_channels"]
    assert config.norm_groups == official["norm_num_groups"]
    assert config.scaling_factor == official.get("scaling_factor", 0.18215)  # diffusers' default
    assert config.shift_factor == (official.get("shift_factor") or 0.0)
    assert config.use_quant_conv == official.get("use_quant_conv", True)
    assert config.downsample_factor == 8


class OfficialVAE(NamedTuple):
    preset: str
    single_file: str  # manifest of the single-file checkpoint
    prefix: str  # of the VAE keys in that file
    diffusers_file: str  # manifest of the diffusers `vae/` folder


OFFICIAL_VAES = [
    OfficialVAE("sd", "sd15_v1-5-pruned-emaonly.json", "first_stage_model.", "diffusers_sd15_vae.json"),
    OfficialVAE("sdxl", "sdxl_sd_xl_base_1.0.json", "first_stage_model.", "diffusers_sdxl_vae.json"),
    OfficialVAE("flux", "ae.json", "", "diffusers_flux1_vae.json"),
]


def assert_loads_exactly(preset: str, sd: dict[str, torch.Tensor]) -> None:
    """Every key of `sd` is a parameter of the full-size preset with the same shape, and none is missing."""
    with torch.device("meta"):
        model = AutoencoderKL(PRESETS[preset])
    assert shapes_of(sd) == shapes_of(model.state_dict())
    model.load_state_dict(sd, strict=True, assign=True)


@pytest.mark.parametrize("official", OFFICIAL_VAES, ids=lambda o: o.single_file)
def test_official_single_files_load_with_full_coverage(official, manifest):
    vae = meta_tensors(manifest(official.single_file), official.prefix)
    assert len(vae) == (244 if official.preset == "flux" else 248)
    assert_loads_exactly(official.preset, vae)


@pytest.mark.parametrize("official", OFFICIAL_VAES, ids=lambda o: o.diffusers_file)
def test_official_diffusers_vaes_load_with_full_coverage(official, manifest):
    diffusers = meta_tensors(manifest(official.diffusers_file))
    assert_loads_exactly(official.preset, vae_from_diffusers(diffusers))


@pytest.mark.parametrize("official", OFFICIAL_VAES, ids=lambda o: o.preset)
def test_key_maps_on_official_manifests(official, manifest):
    """On the real key sets: exact round trips both ways, and the single file maps onto the diffusers file.

    SD1.5's diffusers file has the legacy attention names; vae_to_diffusers writes the current
    ones, so the comparison there is against the file's keys with the names modernized.
    """
    ldm = meta_tensors(manifest(official.single_file), official.prefix)
    diffusers = meta_tensors(manifest(official.diffusers_file))
    diffusers_current = {to_current_name(key): tensor for key, tensor in diffusers.items()}

    assert shapes_of(vae_from_diffusers(vae_to_diffusers(ldm))) == shapes_of(ldm)
    assert shapes_of(vae_to_diffusers(vae_from_diffusers(diffusers))) == shapes_of(diffusers_current)
    assert shapes_of(vae_to_diffusers(ldm)) == shapes_of(diffusers_current)
    assert shapes_of(vae_from_diffusers(diffusers)) == shapes_of(ldm)


@torch.no_grad()
def test_image_helpers_keep_a_float64_model_in_float64():
    """encode_images / decode_images give float32 from a float32 model and float64 from a float64 one (a
    float64 run is how the official-code comparisons remove rounding: it cast to float32 before). The
    float64 helpers equal the written-out 2x - 1, encode, decode, (y + 1) / 2 to 1e-12."""
    torch.manual_seed(0)
    model = AutoencoderKL(TINY_VAE).eval()
    images = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    assert model.encode_images(images).dtype == torch.float32
    wide = model.double()
    latents = wide.encode_images(images)
    assert latents.dtype == torch.float64
    torch.testing.assert_close(latents, wide.encode(images * 2 - 1), rtol=0, atol=1e-12)
    decoded = wide.decode_images(latents)
    assert decoded.dtype == torch.float64
    torch.testing.assert_close(decoded, ((wide.decode(latents) + 1) / 2).clamp(0, 1), rtol=0, atol=1e-12)


def test_encode_images_refuses_images_outside_0_1():
    """0-255 pixels (float or uint8) or NaN were encoded as given: latents far outside the model's range."""
    model = AutoencoderKL(TINY_VAE).eval()
    pixels = torch.rand(1, 3, 32, 32) * 255
    for images in (pixels, pixels.to(torch.uint8), torch.full((1, 3, 32, 32), float("nan"))):
        with pytest.raises(ValueError, match=r"encode_images takes float images in \[0, 1\] \(to_tensor's range, not 0-255\)"):
            model.encode_images(images)
