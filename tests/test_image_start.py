"""Image to image and inpainting (minigen/sampling/image_start.py) against diffusers' pipelines, and
what they promise on the toy models.

Parity reference: diffusers StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline (with a
4-channel UNet, which blends latents, and a 9-channel one, which reads the mask and the masked image)
and FluxImg2ImgPipeline, on tiny random models, Euler, fp32. diffusers draws the image's latent from
the VAE posterior with the call's generator, then the noise; the tiny VAEs here are given a posterior
std of e^-15 (the posterior's log-variance output pinned at -30), so that sample is the mean minigen
uses, and the noise minigen gets is the generator's second draw. Tolerance: max abs difference
<= 1e-4 on images in [0, 1].
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    UNet2DConditionModel,
)
from transformers import AutoTokenizer, CLIPTokenizer  # noqa: E402

from minigen.loading.flux import load_flux  # noqa: E402
from minigen.loading.sd import load_sd  # noqa: E402
from minigen.sampling import start_index  # noqa: E402
from minigen.text.t5 import build_t5_encoder  # noqa: E402

from conftest import TINY_FLUX, TINY_FLUX_VAE, TINY_T5, TINY_VAE, diffusers_vae, tiny_clip, tiny_diffusers_flux  # noqa: E402

PROMPT, NEGATIVE, SEED, STEPS = "a large red star to the left of a small blue circle", "blurry", 5, 10
TOL = 1e-4


def pin_posterior(vae):
    """Make the VAE's posterior (nearly) deterministic: log-variance -30 everywhere, std e^-15."""
    conv = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out  # the last layer of the moments
    z = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[z:] = 0
        conv.bias[z:] = -30
    return vae


def second_draw(shape, seed):
    """The noise diffusers draws after the posterior sample of a batch-one image of `shape` latents."""
    generator = torch.Generator().manual_seed(seed)
    torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator)


def reference_image(size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, 8, 8, generator=generator), size=size, mode="bilinear", align_corners=False)


def square_mask(size=64):
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : 3 * size // 4, size // 8 : size // 2] = 1
    return mask


def sd_folder(tmp_path, shared_hf, in_channels):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=in_channels, block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8, sample_size=8,
    )
    for p in unet.parameters():
        p.data += torch.randn_like(p) * 0.05
    repo = shared_hf / "runwayml/stable-diffusion-v1-5"
    scheduler = EulerDiscreteScheduler.from_pretrained(repo / "scheduler", timestep_spacing="leading", steps_offset=1)
    parts = dict(vae=pin_posterior(diffusers_vae(TINY_VAE)), text_encoder=tiny_clip(64, heads=1),
                 tokenizer=CLIPTokenizer.from_pretrained(repo / "tokenizer"), unet=unet, scheduler=scheduler,
                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    folder = tmp_path / f"sd{in_channels}"
    StableDiffusionImg2ImgPipeline(**parts).save_pretrained(folder)
    return parts, load_sd(folder)


@pytest.fixture(scope="module")
def sd4(tmp_path_factory, shared_hf):
    return sd_folder(tmp_path_factory.mktemp("i2i"), shared_hf, 4)


def run_ours(pipe, **kwargs):
    return pipe.generate(PROMPT, NEGATIVE, steps=STEPS, cfg=7.5, seed=SEED, progress=False, **kwargs)


def test_img2img_matches_diffusers(sd4):
    """strength 0.6, Euler, CFG 7.5: StableDiffusionImg2ImgPipeline's image within 1e-4."""
    parts, ours = sd4
    image = reference_image()
    reference = StableDiffusionImg2ImgPipeline(**parts)(
        PROMPT, image=image, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
        generator=torch.Generator().manual_seed(SEED), output_type="pt",
    ).images
    images = run_ours(ours, image=image, strength=0.6, latents=second_draw((1, 4, 8, 8), SEED))
    assert (images - image).abs().mean() > 0.01  # it did change the image
    assert (images - reference).abs().max() <= TOL


@pytest.mark.parametrize("strength", [0.7, 1.0])
def test_inpainting_by_latent_blending_matches_diffusers(sd4, strength):
    """A 4-channel UNet: StableDiffusionInpaintPipeline (which blends after each step) within 1e-4, part-way
    and from pure noise (strength 1, where its first step sees the noise alone)."""
    parts, ours = sd4
    image, mask = reference_image(), square_mask()
    reference = StableDiffusionInpaintPipeline(**parts)(
        PROMPT, image=image, mask_image=mask, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
        guidance_scale=7.5, generator=torch.Generator().manual_seed(SEED), output_type="pt", height=64, width=64,
    ).images
    images = run_ours(ours, image=image, mask=mask, strength=strength, latents=second_draw((1, 4, 8, 8), SEED))
    assert (images - reference).abs().max() <= TOL


def test_nine_channel_inpainting_unet_matches_diffusers(tmp_path, shared_hf):
    """A 9-channel inpainting UNet at strength 1 reads [latent | mask | masked image latent]:
    StableDiffusionInpaintPipeline within 1e-4 (no blending on either side)."""
    parts, ours = sd_folder(tmp_path, shared_hf, 9)
    assert ours.is_inpainting and ours.unet.config.in_channels == 9
    image, mask = reference_image(seed=1), square_mask()
    noise = second_draw((1, 4, 8, 8), SEED)
    reference = StableDiffusionInpaintPipeline(**parts)(
        PROMPT, image=image, mask_image=mask, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
        latents=noise, generator=torch.Generator().manual_seed(SEED), output_type="pt", height=64, width=64,
    ).images
    images = run_ours(ours, image=image, mask=mask, latents=noise)
    assert (images - reference).abs().max() <= TOL
    text_to_image = run_ours(ours, latents=noise)  # a fully masked grey image: differs from the inpainting
    assert (text_to_image - images).abs().mean() > 0.01


def test_one_image_for_a_batch_is_encoded_once(tmp_path, shared_hf):
    """An image (and mask) given once for three prompts is encoded once, not once per row (an inpainting
    UNet also encodes the masked image once): the encoder sees [1] rows; each row still starts from it."""
    _, ours = sd_folder(tmp_path, shared_hf, 9)
    rows = []
    handle = ours.vae.encoder.register_forward_pre_hook(lambda module, inputs: rows.append(inputs[0].shape[0]))
    try:
        images = ours.generate([PROMPT] * 3, steps=2, seed=SEED, progress=False, image=reference_image(seed=1), mask=square_mask())
    finally:
        handle.remove()
    assert rows == [1, 1] and images.shape[0] == 3
    single = ours.generate(PROMPT, steps=2, seed=SEED + 2, progress=False, image=reference_image(seed=1), mask=square_mask())
    assert (images[2:] - single).abs().max() <= TOL


def test_flux_img2img_matches_diffusers(tmp_path, shared_hf):
    """FLUX.1-dev layout, strength 0.6, 4 steps: FluxImg2ImgPipeline within 1e-4 (3 steps run, where SD's
    count would run 2)."""
    repo = shared_hf / "black-forest-labs/FLUX.1-dev"
    torch.manual_seed(0)
    parts = dict(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(repo / "scheduler"), vae=pin_posterior(diffusers_vae(TINY_FLUX_VAE)),
        text_encoder=tiny_clip(TINY_FLUX.vec_in_dim, heads=2), tokenizer=CLIPTokenizer.from_pretrained(repo / "tokenizer"),
        text_encoder_2=build_t5_encoder(TINY_T5), tokenizer_2=AutoTokenizer.from_pretrained(repo / "tokenizer_2"),
        transformer=tiny_diffusers_flux(dataclasses.replace(TINY_FLUX, guidance_embed=True)),
    )  # fmt: skip
    pipe = FluxImg2ImgPipeline(**parts)
    pipe.save_pretrained(tmp_path / "flux")
    ours = load_flux(tmp_path / "flux", dtype=torch.float32)
    image = reference_image()
    with torch.no_grad():
        reference = pipe(
            PROMPT, image=image, strength=0.6, height=64, width=64, num_inference_steps=4, guidance_scale=3.5,
            generator=torch.Generator().manual_seed(SEED), output_type="pt", max_sequence_length=512,
        ).images
    images = ours.generate(PROMPT, steps=4, guidance=3.5, image=image, strength=0.6, latents=second_draw((1, 16, 8, 8), SEED), progress=False)
    assert (images - image).abs().mean() > 0.01
    assert (images - reference).abs().max() <= TOL


# --- what the options promise, on the shipped toy models -----------------------------------------------


@pytest.mark.parametrize("model", ["toy_sd", "toy_flux"])
def test_strength_zero_returns_the_image_and_one_the_text_to_image(model, request):
    """Exactly (0 difference): strength 0 gives the VAE round trip of the image, strength 1 the
    text-to-image image of the same seed."""
    pipe = request.getfixturevalue(model)
    base = pipe.generate("a red star on grass", steps=6, seed=1, progress=False)
    round_trip = pipe.vae.decode_images(pipe.vae.encode_images(base))
    assert torch.equal(pipe.generate("a blue box", steps=6, seed=2, image=base, strength=0.0, progress=False), round_trip)
    assert torch.equal(pipe.generate("a red star on grass", steps=6, seed=1, image=base, strength=1.0, progress=False), base)


def test_sampler_options_are_checked_when_no_step_runs(toy_sd):
    """A mistyped sampler option is refused even at strength 0, where no step reads it (it was accepted
    there and refused at any other strength)."""
    image = torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"sampler_options \['eta'\]: not options of the euler sampler"):
        toy_sd.generate("a red star", steps=4, image=image, strength=0.0, sampler_options={"eta": 0.5}, progress=False)


@pytest.mark.parametrize("model,sampler", [("toy_sd", "euler"), ("toy_sd", "dpmpp_2m_sde"), ("toy_flux", None)])
def test_inpainting_keeps_the_unmasked_latent_and_repaints_the_masked(model, sampler, request):
    """Masked latent blending: outside the mask (here the image's left quarter) the final latent is
    the image's exactly (0 difference); inside, the image changes (mean abs > 0.05 on [0, 1]).

    Decoded pixels away from the mask still move a little: the decoder's group norms and mid
    attention see the whole latent. Bound (set above the measured 0.4x-1.2x): three latent cells or
    more from the mask, the mean abs change against the round trip is at most 2x the round trip's own
    mean abs error there. (sample.py pastes the original pixels back outside the mask.)"""
    pipe = request.getfixturevalue(model)
    base = reference_image()  # smooth random colours, unlike anything the model draws
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :16] = 1
    options = {"sampler": sampler} if sampler else {}
    latents = pipe.generate("a blue box on sand", steps=6, seed=3, image=base, mask=mask, output="latents", progress=False, **options)
    x0 = pipe.vae.encode_images(base)
    keep = F.interpolate(mask, size=x0.shape[-2:], mode="nearest") == 0
    assert torch.equal(torch.where(keep, latents, 0), torch.where(keep, x0, 0))
    images, round_trip = pipe.vae.decode_images(latents), pipe.vae.decode_images(x0)
    assert (images - base)[..., :16].abs().mean() > 0.05
    far = images[..., 16 + 3 * pipe.vae.config.downsample_factor :], round_trip[..., 16 + 3 * pipe.vae.config.downsample_factor :]
    vae_error = (far[1] - base[..., -far[1].shape[-1] :]).abs().mean()
    assert (far[0] - far[1]).abs().mean() <= 2 * vae_error


def test_start_index_counts_as_diffusers():
    assert [start_index(10, s) for s in (0.0, 0.25, 0.6, 0.99, 1.0)] == [10, 8, 4, 1, 0]
    assert [start_index(10, s, flow=True) for s in (0.0, 0.25, 0.6, 0.99, 1.0)] == [10, 7, 4, 0, 0]  # FLUX's int(n - n s)
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
        start_index(10, 1.5)
    with pytest.raises(ValueError, match=r"strength 0.05 of 10 steps runs no step \(int\(steps \* strength\) = 0\): give a strength of at least 0.1"):
        start_index(10, 0.05)  # diffusers refuses it too; the image came back untouched, labelled strength 0.05


def test_bad_image_inputs_are_refused(toy_sd):
    image = torch.rand(1, 3, 64, 64)
    with pytest.raises(ValueError, match="mask needs an image"):
        toy_sd.generate("a star", steps=2, mask=torch.ones(1, 1, 64, 64), progress=False)
    with pytest.raises(ValueError, match="strength needs an image"):
        toy_sd.generate("a star", steps=2, strength=0.5, progress=False)
    with pytest.raises(ValueError, match="image is 64x64 but the call makes 32x32"):
        toy_sd.generate("a star", steps=2, image=image, width=32, height=32, progress=False)
    with pytest.raises(ValueError, match=r"mask must be a tensor \[1, 1, H, W\] in \[0, 1\], got shape \[1, 3, 64, 64\]"):
        toy_sd.generate("a star", steps=2, image=image, mask=torch.ones(1, 3, 64, 64), progress=False)
    with pytest.raises(ValueError, match=r"finite values in \[0, 1\]"):
        toy_sd.generate("a star", steps=2, image=image * 2 - 1, progress=False)
    with pytest.raises(ValueError, match=r"this torch.uint8 tensor reaches 25[45]: from 0-255 pixels, give image.float\(\) / 255"):
        toy_sd.generate("a star", steps=2, image=(image * 255).to(torch.uint8), progress=False)
    with pytest.raises(ValueError, match=r"image must be a tensor \[1, 3, H, W\] in \[0, 1\], got shape \[3, 64, 64\]"):
        toy_sd.generate("a star", steps=1, image=image[0], progress=False)  # the image's fault first, not the strength's at 1 step
    half = torch.zeros(2, 1, 64, 64)
    half[0, :, :, :32] = 1  # row 0 repaints its left half, row 1 nothing: it came back as its image
    with pytest.raises(ValueError, match="the mask of a row marks nothing to repaint at the latent grid"):
        toy_sd.generate(["a star", "a box"], steps=2, image=image, mask=half, progress=False)
