"""Tiled VAE encoding (`AutoencoderKL.encode(images, tile_size=..., tile_overlap=...)`), the mirror of tiled decoding.

Tiling is an approximation: group norms and the mid attention see one tile instead of the whole
image. Metric: relative L2 error ||tiled - full|| / ||full|| of the latent means, tiny random VAEs
(SD- and FLUX-shaped), a 224x288 image (28x36 latents), 20-latent tiles overlapping by 8, seed 0:

    uniform noise image (stationary, as the tiled-decode test's random latents)   0.062 (SD), 0.091 (FLUX)   bound 0.15
    toy-world mosaic (4x5 scenes cropped; tiles differ in content)               0.19  (SD), 0.28  (FLUX)   bound 0.40

(for comparison, tiled decoding of random latents: 0.066 and 0.079, tests/test_vae.py). Random weights
are far less local than trained ones; on the mosaic the error is mostly the per-tile group-norm
statistics. Exact properties: an image that fits in one tile is encoded whole (identical); latents
covered by one tile only are that tile's encoding (<= 1e-6, the weight division's rounding).
"""

import pytest
import torch

from minigen.models.vae import AutoencoderKL
from minigen.toy.data import render_dataset

from conftest import TINY_FLUX_VAE, TINY_VAE

CONFIGS = pytest.mark.parametrize("config", [TINY_VAE, TINY_FLUX_VAE], ids=["tiny-sd", "tiny-flux"])


def relative_error(tiled, full):
    return ((tiled - full).norm() / full.norm()).item()


def toy_mosaic() -> torch.Tensor:
    """[1, 3, 224, 288] in [-1, 1]: 4x5 toy-world scenes side by side, cropped."""
    scenes = render_dataset(20, seed=3).images_as_float(slice(0, 20))
    return scenes.view(4, 5, 3, 64, 64).permute(2, 0, 3, 1, 4).reshape(1, 3, 256, 320)[:, :, :224, :288]


@CONFIGS
@torch.no_grad()
def test_tiled_encode_stays_close_to_full_encode(config):
    vae = AutoencoderKL(config).eval()
    noise = torch.rand(1, 3, 224, 288, generator=torch.Generator().manual_seed(5)) * 2 - 1
    for images, bound in [(noise, 0.15), (toy_mosaic(), 0.40)]:
        full = vae.encode(images)
        tiled = vae.encode(images, tile_size=20, tile_overlap=8)
        assert tiled.shape == full.shape == (1, config.z_channels, 28, 36)
        assert full.std() > 0.02
        assert relative_error(tiled, full) < bound


@CONFIGS
@torch.no_grad()
def test_latents_covered_by_one_tile_are_that_tiles_encoding(config):
    """Tiles start every tile_size - overlap = 12 latents, the last one flush with the edge: rows at
    0 and 8 (of 28), columns at 0, 12 and 16 (of 36). Latents [0:8, 0:12] see the first tile only."""
    vae = AutoencoderKL(config).eval()
    images = toy_mosaic()
    tiled = vae.encode(images, tile_size=20, tile_overlap=8)
    first = vae.encode(images[:, :, :160, :160])  # the first tile: 20 latents = 160 pixels
    torch.testing.assert_close(tiled[..., :8, :12], first[..., :8, :12], rtol=0, atol=1e-6)
    assert relative_error(tiled[..., :8, 12:20], first[..., :8, 12:20]) > 1e-3  # past it, the second tile is blended in
    assert relative_error(tiled[..., 8:20, :12], first[..., 8:20, :12]) > 1e-3


@CONFIGS
@torch.no_grad()
def test_an_image_within_one_tile_is_encoded_exactly(config):
    vae = AutoencoderKL(config).eval()
    images = toy_mosaic()[:, :, :160, :96]
    assert torch.equal(vae.encode(images, tile_size=20, tile_overlap=8), vae.encode(images))  # 20x12 latents < 20
    assert torch.equal(vae.encode(images, tile_size=20), vae.encode(images))  # the default overlap, 16
    square = toy_mosaic()[:, :, :160, :160]  # exactly one tile
    assert torch.equal(vae.encode(square, tile_size=20, tile_overlap=8), vae.encode(square))


@torch.no_grad()
def test_tiled_encode_samples_with_the_generator():
    """With a generator, the blended posterior is sampled once over the whole latent: the same seed gives
    the same latents, and the sample differs from the mean by the posterior's spread."""
    vae = AutoencoderKL(TINY_VAE).eval()
    images = toy_mosaic()
    mean = vae.encode(images, tile_size=20, tile_overlap=8)
    first = vae.encode(images, torch.Generator().manual_seed(1), tile_size=20, tile_overlap=8)
    again = vae.encode(images, torch.Generator().manual_seed(1), tile_size=20, tile_overlap=8)
    assert torch.equal(first, again) and not torch.equal(first, mean)


def test_tiled_encode_rejects_bad_overlap():
    vae = AutoencoderKL(TINY_VAE)
    with pytest.raises(ValueError, match=r"encode: tile_size=16 and tile_overlap=20 must be whole numbers of latent pixels with 0 < tile_overlap < tile_size"):
        vae.encode(torch.zeros(1, 3, 64, 64), tile_size=16, tile_overlap=20)


@torch.no_grad()
def test_low_precision_vaes_tile_from_float32_latents_and_images():
    """`generate(output="latents")` returns float32 latents; the advice for a decode too large for memory is
    `vae.decode_images(latents, tile_size=64)`. On a bf16 VAE (and one whose weights are stored in fp16)
    the raw `encode` / `decode` cast their input to the compute dtype (they raised 'Input type (float) and
    bias type (c10::BFloat16) should be the same'), and `encode_images` / `decode_images` tile as the raw
    ones do: identical to them, bar the [0, 1] mapping (images are cast, then mapped to [-1, 1])."""
    from minigen.storage import store_weights

    latents = torch.randn(1, TINY_VAE.z_channels, 24, 24, generator=torch.Generator().manual_seed(0))
    images = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    for vae in (AutoencoderKL(TINY_VAE).to(torch.bfloat16).eval(), store_weights(AutoencoderKL(TINY_VAE).eval(), torch.float16, torch.float32)):
        dtype = vae.decoder.conv_in.bias.dtype  # the compute dtype
        raw = vae.decode(latents, tile_size=16, tile_overlap=4)
        assert raw.dtype == dtype and torch.isfinite(raw).all()
        assert torch.equal(vae.decode_images(latents, tile_size=16, tile_overlap=4), ((raw.float() + 1) / 2).clamp(0, 1))
        assert not torch.equal(vae.decode_images(latents, tile_size=16, tile_overlap=4), vae.decode_images(latents))
        encoded = vae.encode(images.to(dtype) * 2 - 1, tile_size=8, tile_overlap=2)
        assert torch.equal(vae.encode_images(images, tile_size=8, tile_overlap=2), encoded.float())
