"""Whole text-to-image runs against diffusers' pipelines, on tiny random models.

Reference: diffusers StableDiffusionPipeline / StableDiffusionXLPipeline with the matching scheduler,
saved with `save_pretrained` and loaded by minigen through its own diffusers-folder path (and, for
SD1, through the official single-file layout). Same prompt, negative prompt, starting noise and
generator; 10 steps, CFG 7.5, 64x64 px, fp32. Tolerance: max abs difference <= 1e-4 on images in
[0, 1] (pixel std about 0.1-0.3).
"""


import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTokenizer  # noqa: E402

from minigen.image import to_pil  # noqa: E402
from minigen.loading.auto import load_pipeline  # noqa: E402
from minigen.loading.detect import CheckpointError  # noqa: E402
from minigen.loading.files import config_metadata, read_state_dict  # noqa: E402
from minigen.loading.sd import METADATA_UNET_CONFIG, load_sd  # noqa: E402
from minigen.pipelines.sd import SizeConditioning  # noqa: E402
from minigen.transformers_compat import file_layout  # noqa: E402

from conftest import TINY_VAE, diffusers_vae, load_sample_script, tiny_clip  # noqa: E402

PROMPT, NEGATIVE, SEED = "a large red star to the left of a small blue circle", "blurry", 7
TOL = 1e-4

# minigen (sampler, karras) -> diffusers scheduler class and options. Two diffusers conventions are
# set explicitly: DDIM's last step goes to sigma 0 (set_alpha_to_one=True; the SD config stops at
# sigma_min), and DPM-Solver gets the "leading" timesteps every other scheduler uses (its own
# "leading" rule divides by n + 1).
LEADING_10 = list(range(901, 0, -100))
SCHEDULERS = {
    ("euler", False): (EulerDiscreteScheduler, {}, {}),
    ("euler_ancestral", False): (EulerAncestralDiscreteScheduler, {}, {}),
    ("ddim", False): (DDIMScheduler, {"set_alpha_to_one": True}, {}),
    ("dpmpp_2m", False): (DPMSolverMultistepScheduler, {}, {"timesteps": LEADING_10}),
    ("dpmpp_2m", True): (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}, {}),
}


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory, shared_hf):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=64, attention_head_dim=4,
        norm_num_groups=8, sample_size=8,
    )
    vae, text = diffusers_vae(TINY_VAE), tiny_clip(64, heads=1)
    for p in unet.parameters():
        p.data += torch.randn_like(p) * 0.05
    tokenizer = CLIPTokenizer.from_pretrained(shared_hf / "runwayml/stable-diffusion-v1-5/tokenizer")
    scheduler = DDIMScheduler.from_pretrained(shared_hf / "runwayml/stable-diffusion-v1-5/scheduler")
    pipe = StableDiffusionPipeline(vae, text, tokenizer, unet, scheduler, None, None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("sd1")
    pipe.save_pretrained(folder)
    return folder, pipe


def reference_images(pipe, scheduler_class, options, noise, **kwargs):
    # keyword overrides: diffusers drops config keys listed in `_use_default_values` when switching class;
    # Karras sigmas off unless asked (an earlier call's use_karras_sigmas stays in the shared pipe's config)
    config = {**pipe.scheduler.config, "use_karras_sigmas": False}
    pipe.scheduler = scheduler_class.from_config(config, timestep_spacing="leading", steps_offset=1, **options)
    out = pipe(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5, latents=noise,
        generator=torch.Generator().manual_seed(SEED), output_type="pt", **kwargs,
    )
    return out.images


@pytest.mark.parametrize("sampler,karras", list(SCHEDULERS))
def test_sd1_text_to_image_matches_diffusers(sd1_folder, sampler, karras):
    folder, pipe = sd1_folder
    ours = load_sd(folder)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(123))
    scheduler_class, options, call = SCHEDULERS[(sampler, karras)]
    expected = reference_images(pipe, scheduler_class, options, noise, height=64, width=64, **call)
    images = ours.generate(PROMPT, NEGATIVE, width=64, height=64, steps=10, cfg=7.5, sampler=sampler,
                           karras=karras, seed=SEED, latents=noise, progress=False)
    assert expected.std() > 0.01  # a real image, not a constant
    assert (images - expected).abs().max() <= TOL


@pytest.mark.parametrize("sampler, scheduler_class", [("euler", EulerDiscreteScheduler), ("heun", HeunDiscreteScheduler)])
def test_karras_sigmas_with_samplers_whose_schedulers_do_not_round_timesteps(sd1_folder, sampler, scheduler_class):
    """Euler and Heun with Karras sigmas give the network the sigmas' own timesteps, unrounded (only DPM-Solver
    and UniPC round them): diffusers' schedulers with use_karras_sigmas and "linspace" spacing (whose Karras
    range is the training range, as minigen's) within 1e-4, their start scaled to minigen's."""
    folder, pipe = sd1_folder
    ours = load_sd(folder)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(123))
    pipe.scheduler = scheduler_class.from_config({**pipe.scheduler.config}, timestep_spacing="linspace", steps_offset=0, use_karras_sigmas=True)
    sigma_max = ours.schedule.sigma_max
    expected = pipe(  # linspace starts at noise * sigma_max, minigen at noise * sqrt(sigma_max^2 + 1)
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5, latents=noise * (sigma_max**2 + 1) ** 0.5 / sigma_max,
        output_type="pt", height=64, width=64,
    ).images
    images = ours.generate(PROMPT, NEGATIVE, width=64, height=64, steps=10, cfg=7.5, sampler=sampler, karras=True, latents=noise, progress=False)
    assert (images - expected).abs().max() <= TOL


def test_options_that_do_not_apply_are_refused(sd1_folder):
    """A negative (text or embeddings) at cfg=1, Karras sigmas for LCM and a sampler option the sampler does not
    take are refused by name (a list of empty negatives is no negative, as ""); a noise_sampler replaces the
    seeded generators instead of clashing with them."""
    ours = load_sd(sd1_folder[0])
    one = dict(width=64, height=64, steps=2, progress=False)
    with pytest.raises(ValueError, match="negative is read by classifier-free guidance, which cfg=1 turns off"):
        ours.generate(PROMPT, NEGATIVE, cfg=1.0, **one)
    plain = ours.generate([PROMPT, PROMPT], cfg=1.0, output="latents", **one)
    assert torch.equal(ours.generate([PROMPT, PROMPT], ["", ""], cfg=1.0, output="latents", **one), plain)  # was refused as unread
    with pytest.raises(ValueError, match="negative_prompt_embeds is read by classifier-free guidance"):
        ours.generate(prompt_embeds=torch.zeros(1, 77, 64), negative_prompt_embeds=torch.zeros(1, 77, 64), cfg=1.0, **one)
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds is read by classifier-free guidance"):
        ours.generate(prompt_embeds=torch.zeros(1, 77, 64), negative_pooled_prompt_embeds=torch.zeros(1, 64), cfg=1.0, **one)
    with pytest.raises(ValueError, match="LCM visits the timesteps it was distilled on, not Karras sigmas: drop karras=True"):
        ours.generate(PROMPT, sampler="lcm", karras=True, **one)
    with pytest.raises(ValueError, match=r"sampler_options \['eta'\]: not options of the euler sampler, which takes none"):
        ours.generate(PROMPT, sampler="euler", sampler_options={"eta": 0.5}, **one)
    for seed in (1.5, torch.Generator(), True):  # a float was a RuntimeError in manual_seed, a generator a TypeError on '+'
        with pytest.raises(TypeError, match="seed takes a whole number, got .*pass latents= drawn with it"):
            ours.generate(PROMPT, seed=seed, **one)
    for seed in (2**32 - 1, -1):  # seeds alias past 2^32 (5 and 5 + 2^32 drew the same image), -1 as 2^32 - 1
        with pytest.raises(ValueError, match=rf"seed {seed}: image k draws with seed \+ k, which must stay within 0 .. 2\^32 - 1"):
            ours.generate([PROMPT, PROMPT], seed=seed, **one)
    for karras in (False, True):  # Karras' spacing made sigmas of 1.5 steps
        with pytest.raises(ValueError, match=r"number of steps must be a whole number, at least 1; got 1.5"):
            ours.generate(PROMPT, karras=karras, **{**one, "steps": 1.5})
    latents, replay = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9)), torch.Generator().manual_seed(3)
    drawn = []

    def noise_sampler(sigma, sigma_next):  # the draws seed 3's generator gives the sampler when the latents are given
        drawn.append(torch.randn(1, 4, 8, 8, generator=replay))
        return drawn[-1]

    ancestral = dict(one, sampler="euler_ancestral", latents=latents)
    replayed = ours.generate(PROMPT, sampler_options={"noise_sampler": noise_sampler}, **ancestral)
    assert len(drawn) == 1 and torch.equal(replayed, ours.generate(PROMPT, seed=3, **ancestral))  # the last step adds no noise


TOY_EMBEDS = torch.zeros(1, 77, 64)  # toy-sd's text width
WRONG_ARGUMENTS = [  # each was read as nothing, or passed the checks and failed in the first step (TypeError, AttributeError)
    ({"prompt_embeds": TOY_EMBEDS, "cfg": 1.0, "clip_skip": 1}, ValueError, "^clip_skip acts on text the pipeline encodes, and with prompt_embeds"),
    ({"prompt_embeds": TOY_EMBEDS, "cfg": 1.0, "prompt_syntax": "a1111"}, ValueError, "^prompt_syntax acts on text the pipeline encodes"),
    ({"prompt_embeds": TOY_EMBEDS, "negative_prompt_embeds": TOY_EMBEDS, "clip_skip": 1}, ValueError, "^clip_skip acts on text"),
    ({"prompt_embeds": TOY_EMBEDS, "negative_prompt_embeds": TOY_EMBEDS[..., :32]}, ValueError,
     r"^negative_prompt_embeds: prompt embeddings must be \[B, T, 64\]"),
    ({"cfg": None}, TypeError, "cfg takes a number, got None: cfg=1 turns classifier-free guidance off"),
    ({"cfg": "7"}, TypeError, "cfg takes a number, got '7'"),
    ({"cfg": True}, TypeError, "cfg takes a number, got True"),
    ({"cfg": 3.0, "cfg_rescale": None}, TypeError, "cfg_rescale takes a number, got None: cfg_rescale=0 turns the rescale off"),
    ({"image": torch.rand(1, 3, 64, 64), "strength": "0.5"}, ValueError, r"strength must be a number in \[0, 1\] .*got '0.5'"),
    ({"sampler": "ddim", "sampler_options": {"eta": None}}, TypeError, r"sampler_options\['eta'\] takes a number \(an amount of noise\), got None"),
    ({"sampler": "ddim", "sampler_options": {"eta": "0.5"}}, TypeError, r"sampler_options\['eta'\] takes a number"),
    ({"sampler": "lcm", "sampler_options": {"schedule": "x"}}, TypeError, r"sampler_options\['schedule'\] takes a DiscreteSchedule"),
    ({"prompt": 123}, ValueError, "prompt is a string or a non-empty list of strings, got 123"),
    ({"timesteps": "999", "steps": None}, ValueError, "timesteps must be strictly decreasing numbers in 0..999, .*; got '999'"),
    ({"image": np.zeros((1, 3, 64, 64), np.float32)}, TypeError, r"image takes a torch tensor, got ndarray: give a torch tensor \(torch.from_numpy"),
    ({"image": torch.rand(1, 3, 64, 64), "mask": np.ones((1, 1, 64, 64), np.float32)}, TypeError, "mask takes a torch tensor"),
    ({"latents": np.zeros((1, 4, 16, 16), np.float32)}, TypeError, "latents takes a torch tensor"),
    ({"prompt_embeds": np.zeros((1, 77, 64), np.float32), "cfg": 1.0}, TypeError, "prompt_embeds takes a torch tensor"),
]


@pytest.mark.parametrize("arguments, error, message", WRONG_ARGUMENTS)
def test_arguments_that_cannot_be_read_are_refused_by_name(toy_sd, arguments, error, message):
    call = {"prompt": None if "prompt_embeds" in arguments else PROMPT, "steps": 2, "progress": False, **arguments}
    with pytest.raises(error, match=message):
        toy_sd.generate(**call)


def test_one_element_tensors_read_as_their_numbers(toy_sd):
    """cfg, cfg_rescale, strength and a sampler's eta given as torch.tensor(x) give the image of x (the type
    checks added for text and None refused them: a regression)."""
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    given = {"cfg": 5.0, "cfg_rescale": 0.5, "strength": 0.5, "sampler": "euler_ancestral", "image": image, "sampler_options": {"eta": 0.5}}
    as_tensors = {**given, "cfg": torch.tensor(5.0), "cfg_rescale": torch.tensor(0.5), "strength": torch.tensor(0.5),
                  "sampler_options": {"eta": torch.tensor(0.5)}}  # fmt: skip
    call = {"prompt": PROMPT, "steps": 4, "seed": 1, "progress": False, "output": "latents"}
    assert torch.equal(toy_sd.generate(**call, **given), toy_sd.generate(**call, **as_tensors))


AYS_SD15 = [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]  # Align Your Steps, SD1.5 (diffusers' AysSchedules)


@pytest.mark.parametrize(
    "sampler, scheduler_class",
    [("euler", EulerDiscreteScheduler), ("heun", HeunDiscreteScheduler), ("dpmpp_2m", DPMSolverMultistepScheduler), ("lcm", LCMScheduler)],
)
def test_sd1_custom_timesteps_match_diffusers(sd1_folder, sampler, scheduler_class):
    """generate(timesteps=Align Your Steps) against the pipeline's timesteps= with the same sampler (LCM's
    fresh noise from the same seed); it is not the default schedule of 10 steps; a rising list, NaN, a
    disagreeing steps and Karras sigmas are refused by name."""
    folder, pipe = sd1_folder
    ours = load_sd(folder)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(123))
    expected = reference_images(pipe, scheduler_class, {}, noise, height=64, width=64, timesteps=AYS_SD15)
    kwargs = dict(width=64, height=64, cfg=7.5, sampler=sampler, seed=SEED, latents=noise, progress=False)
    images = ours.generate(PROMPT, NEGATIVE, timesteps=AYS_SD15, **kwargs)
    assert (images - expected).abs().max() <= TOL
    assert (images - ours.generate(PROMPT, NEGATIVE, steps=10, **kwargs)).abs().max() > 100 * TOL
    for bad in ([24, 999], [999, float("nan")]):
        with pytest.raises(ValueError, match=r"timesteps must be strictly decreasing numbers in 0..999"):
            ours.generate(PROMPT, timesteps=bad, **kwargs)
    with pytest.raises(ValueError, match="timesteps lists 10 steps but steps=30: drop steps"):
        ours.generate(PROMPT, timesteps=AYS_SD15, steps=30, **kwargs)
    with pytest.raises(ValueError, match="timesteps is a schedule of its own: drop karras=True"):
        ours.generate(PROMPT, timesteps=AYS_SD15, karras=True, **kwargs)


def test_sd1_cfg_rescale_matches_diffusers_guidance_rescale(sd1_folder):
    """cfg_rescale=0.7 against StableDiffusionPipeline(guidance_rescale=0.7), Euler; and it changes the image."""
    folder, pipe = sd1_folder
    ours = load_sd(folder)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(123))
    expected = reference_images(pipe, EulerDiscreteScheduler, {}, noise, height=64, width=64, guidance_rescale=0.7)
    kwargs = dict(width=64, height=64, steps=10, cfg=7.5, seed=SEED, latents=noise, progress=False)
    images = ours.generate(PROMPT, NEGATIVE, cfg_rescale=0.7, **kwargs)
    assert (images - expected).abs().max() <= TOL
    assert (images - ours.generate(PROMPT, NEGATIVE, **kwargs)).abs().max() > 100 * TOL
    with pytest.raises(ValueError, match="cfg_rescale acts on classifier-free guidance, which is off at cfg=1"):
        ours.generate(PROMPT, cfg_rescale=0.7, **{**kwargs, "cfg": 1.0})


def test_sd1_single_file_layout_loads_the_same_pipeline(sd1_folder, tmp_path):
    folder, _ = sd1_folder
    from_folder = load_sd(folder)
    text_encoder = from_folder.text_encoders[0]
    checkpoint = {
        **{f"model.diffusion_model.{k}": v for k, v in from_folder.unet.state_dict().items()},
        **{f"first_stage_model.{k}": v for k, v in from_folder.vae.state_dict().items()},
        **{f"cond_stage_model.transformer.{k}": v for k, v in file_layout(text_encoder.state_dict(), text_encoder, "text_model").items()},
    }
    # A tiny UNet's head count cannot be read off its weights: the file states its config.
    metadata = config_metadata({METADATA_UNET_CONFIG: from_folder.unet.config})
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, tmp_path / "tiny-sd1.safetensors", metadata)
    from_file = load_sd(tmp_path / "tiny-sd1.safetensors")
    from_file.schedule = from_folder.schedule
    kwargs = dict(width=64, height=64, steps=4, seed=1, progress=False)
    assert torch.equal(from_file.generate(PROMPT, **kwargs), from_folder.generate(PROMPT, **kwargs))


def test_a_folder_of_pickled_bin_weights_loads_with_allow_pickle(sd1_folder, tmp_path):
    """A diffusers folder saved before safetensors (diffusion_pytorch_model.bin, pytorch_model.bin): without
    allow_pickle the error says so (it advised variant='fp16'), with it the same weights load, bit for bit
    (allow_pickle never reached the folder's components)."""
    _, pipe = sd1_folder
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    text = tmp_path / "text_encoder" / "model.safetensors"  # transformers writes safetensors whatever it is asked
    if text.exists():
        torch.save(read_state_dict(text), text.with_name("pytorch_model.bin"))
        text.unlink()
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file() and not list(tmp_path.glob("*/*.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"the pickled .bin there is read with allow_pickle=True \(sample.py --allow-pickle\)"):
        load_sd(tmp_path)
    pickled, safe = load_sd(tmp_path, allow_pickle=True), load_sd(sd1_folder[0])
    for name in ("unet", "vae"):
        ours, theirs = getattr(pickled, name).state_dict(), getattr(safe, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    ours, theirs = pickled.text_encoders[0].state_dict(), safe.text_encoders[0].state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory, shared_hf):
    hf = shared_hf / "stabilityai/stable-diffusion-xl-base-1.0"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=128, attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), norm_num_groups=8, sample_size=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 48,
    )
    for p in unet.parameters():
        p.data += torch.randn_like(p) * 0.05
    pipe = StableDiffusionXLPipeline(
        diffusers_vae(TINY_VAE), tiny_clip(64, heads=1), tiny_clip(64, heads=1, projection=True),
        CLIPTokenizer.from_pretrained(hf / "tokenizer"), CLIPTokenizer.from_pretrained(hf / "tokenizer_2"),
        unet, EulerDiscreteScheduler.from_pretrained(hf / "scheduler"),
    )
    folder = tmp_path_factory.mktemp("sdxl")
    pipe.save_pretrained(folder)
    return folder, pipe


def test_sdxl_text_to_image_matches_diffusers(sdxl_folder):
    folder, pipe = sdxl_folder
    ours = load_sd(folder)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for negative in (NEGATIVE, ""):  # minigen's "" is diffusers' None: SDXL's zero negative embeddings
        expected = pipe(
            PROMPT, negative_prompt=negative or None, num_inference_steps=10, guidance_scale=5.0, latents=noise,
            height=64, width=64, output_type="pt",
        ).images
        images = ours.generate(PROMPT, negative, width=64, height=64, steps=10, cfg=5.0, latents=noise, progress=False)
        assert expected.std() > 0.01
        assert (images - expected).abs().max() <= TOL


def test_sdxl_size_conditioning_matches_diffusers(sdxl_folder, sd1_folder):
    """SizeConditioning (original size, crop, target size) for the prompt and the negative against
    diffusers' original_size, crops_coords_top_left, target_size and their negative_* (tolerance as
    above); it changes the image; SD1 refuses it, and cfg=1 a negative one."""
    folder, pipe = sdxl_folder
    ours = load_sd(folder)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = pipe(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=5.0, latents=noise, height=64, width=64, output_type="pt",
        original_size=(256, 192), crops_coords_top_left=(16, 8), target_size=(96, 64),
        negative_original_size=(32, 48), negative_crops_coords_top_left=(4, 0), negative_target_size=(64, 64),
    ).images
    kwargs = dict(width=64, height=64, steps=10, cfg=5.0, latents=noise, progress=False)
    images = ours.generate(
        PROMPT, NEGATIVE, size_conditioning=SizeConditioning((256, 192), (16, 8), (96, 64)),
        negative_size_conditioning=SizeConditioning((32, 48), (4, 0), (64, 64)), **kwargs,
    )
    assert (images - expected).abs().max() <= TOL
    assert (images - ours.generate(PROMPT, NEGATIVE, **kwargs)).abs().max() > 100 * TOL
    with pytest.raises(ValueError, match="size_conditioning is SDXL's micro-conditioning"):
        load_sd(sd1_folder[0]).generate(PROMPT, size_conditioning=SizeConditioning((256, 256)), **kwargs)
    with pytest.raises(ValueError, match="negative_size_conditioning conditions the negative prompt, which cfg=1 does not read"):
        ours.generate(PROMPT, negative_size_conditioning=SizeConditioning((32, 32)), **{**kwargs, "cfg": 1.0})
    with pytest.raises(ValueError, match=r"SizeConditioning.crop_top_left must be two integers >= 0"):
        SizeConditioning(crop_top_left=(-1, 0))


def test_sdxl_second_prompts_match_diffusers(sdxl_folder, sd1_folder):
    """prompt_2 / negative_2 (what OpenCLIP bigG reads) against diffusers' prompt_2 / negative_prompt_2
    (tolerance as above), for a batch of two prompts; they change the image; SD1 and the A1111 syntax
    refuse them, and cfg=1 a negative one."""
    folder, pipe = sdxl_folder
    ours = load_sd(folder)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    prompts, seconds = [PROMPT, "a green box on sand"], ["a watercolour", "an oil painting"]
    expected = pipe(
        prompts, prompt_2=seconds, negative_prompt=[NEGATIVE] * 2, negative_prompt_2=["ugly"] * 2, num_inference_steps=10,
        guidance_scale=5.0, latents=noise, height=64, width=64, output_type="pt",
    ).images
    kwargs = dict(width=64, height=64, steps=10, cfg=5.0, latents=noise, progress=False)
    images = ours.generate(prompts, NEGATIVE, prompt_2=seconds, negative_2="ugly", **kwargs)
    assert (images - expected).abs().max() <= TOL
    negatives, negatives_2 = [NEGATIVE, "dark"], ["ugly", "flat"]  # one per image, as diffusers' lists
    expected = pipe(
        prompts, prompt_2=seconds, negative_prompt=negatives, negative_prompt_2=negatives_2, num_inference_steps=10,
        guidance_scale=5.0, latents=noise, height=64, width=64, output_type="pt",
    ).images
    assert (ours.generate(prompts, negatives, prompt_2=seconds, negative_2=negatives_2, **kwargs) - expected).abs().max() <= TOL
    assert (images - ours.generate(prompts, NEGATIVE, **kwargs)).abs().max() > 100 * TOL
    one = dict(kwargs, latents=noise[:1])
    assert torch.equal(ours.generate(PROMPT, NEGATIVE, prompt_2="", negative_2="", **one), ours.generate(PROMPT, NEGATIVE, **one))  # "": the first, as diffusers
    with pytest.raises(ValueError, match="prompt_2 and negative_2 are for SDXL's second text encoder; SD1.x/SD2.x has one: drop them"):
        load_sd(sd1_folder[0]).generate(PROMPT, prompt_2="x", **one)
    with pytest.raises(ValueError, match="read in the plain prompt syntax: pass prompt_syntax='plain'"):
        ours.generate(PROMPT, prompt_2="x", prompt_syntax="a1111", **one)
    for wrong in (["x"], []):  # [] was dropped without a word
        with pytest.raises(ValueError, match=r"prompt_2 is a string \('' for none\), or a list of 2 strings \(one per image\)"):
            ours.generate(prompts, prompt_2=wrong, **kwargs)
    # a string for every prompt, as negative_2 (it was refused: "a string for a string")
    assert torch.equal(ours.generate(prompts, prompt_2="x", **kwargs), ours.generate(prompts, prompt_2=["x", "x"], **kwargs))
    for name in ("negative", "negative_2"):
        with pytest.raises(ValueError, match=f"{name} is read by classifier-free guidance, which cfg=1 turns off"):
            ours.generate(PROMPT, **{name: "x"}, **{**one, "cfg": 1.0})
        with pytest.raises(ValueError, match=rf"{name} is a string \('' for none\), or a list of 1 strings \(one per image\)"):
            ours.generate(PROMPT, **{name: ["x", "y"]}, **one)
    embeds = dict(prompt_embeds=torch.zeros(1, 77, 128), pooled_prompt_embeds=torch.zeros(1, 64),
                  negative_prompt_embeds=torch.zeros(1, 77, 128), negative_pooled_prompt_embeds=torch.zeros(1, 64))
    with pytest.raises(ValueError, match="give the negative as text .* or as negative_prompt_embeds, not both"):
        ours.generate(negative_2="ugly", **embeds, **one)


def test_sample_script_second_prompts_and_sizes_reach_the_pipeline_and_the_metadata(sdxl_folder, sd1_folder, tmp_path):
    """--prompt-2 / --negative-2 and --original-size / --crop-top-left / --target-size draw what generate(prompt_2=,
    negative_2=, size_conditioning=) draws (in the plain syntax, which the second prompts select) and are
    written; an SD1 model and --prompt-syntax a1111 refuse them by name."""
    from PIL import Image

    sample = load_sample_script()
    argv = ["--prompt", PROMPT, "--negative", NEGATIVE, "--width", "64", "--height", "64", "--steps", "2", "--seed", "3"]
    seconds = ["--prompt-2", "a watercolour", "--negative-2", "ugly"]
    sizes = ["--original-size", "192x256", "--crop-top-left", "16,8", "--target-size", "64x96"]
    sample.main(["--model", str(sdxl_folder[0]), *argv, *seconds, *sizes, "--out", str(tmp_path / "xl.png")])
    with Image.open(tmp_path / "xl.png") as image:
        written = image.text["parameters"]
        assert "Prompt 2: a watercolour" in written and "Negative 2: ugly" in written
        assert "Original size: 192x256" in written and 'Crop top left: "16,8"' in written and "Target size: 64x96" in written
        drawn = torch.from_numpy(np.array(image, dtype=np.float32))
    expected = load_pipeline(str(sdxl_folder[0])).generate(
        PROMPT, NEGATIVE, prompt_2="a watercolour", negative_2="ugly", size_conditioning=SizeConditioning((256, 192), (16, 8), (96, 64)),
        width=64, height=64, steps=2, seed=3, progress=False,
    )
    assert torch.equal(drawn, torch.from_numpy(np.array(to_pil(expected)[0], dtype=np.float32)))
    with pytest.raises(SystemExit, match="--prompt-2 and --negative-2 are for SDXL's second text encoder; this SD1.x/SD2.x model has one"):
        sample.main(["--model", str(sd1_folder[0]), *argv, *seconds, "--out", str(tmp_path / "sd1.png")])
    with pytest.raises(SystemExit, match="--original-size, --crop-top-left and --target-size are SDXL's micro-conditioning; this SD1"):
        sample.main(["--model", str(sd1_folder[0]), *argv, *sizes, "--out", str(tmp_path / "sd1-sizes.png")])
    with pytest.raises(SystemExit, match="--prompt-2, --negative-2 read the prompt in the plain syntax; drop --prompt-syntax a1111"):
        sample.main(["--model", str(sdxl_folder[0]), *argv, *seconds, "--prompt-syntax", "a1111", "--out", str(tmp_path / "a.png")])


def test_sizes_not_divisible_by_the_latent_factor_are_rejected(sd1_folder):
    pipe = load_sd(sd1_folder[0])
    with pytest.raises(ValueError, match=r"multiples of 8 .* got 60x64; try 56x64"):
        pipe.generate(PROMPT, width=60, height=64, steps=1, progress=False)


def test_unknown_sampler_is_rejected(sd1_folder):
    pipe = load_sd(sd1_folder[0])
    with pytest.raises(ValueError, match="unknown sampler 'heunn'; choose one of euler"):
        pipe.generate(PROMPT, width=64, height=64, steps=1, sampler="heunn", progress=False)


def test_sample_script_writes_a_png_with_its_settings_and_never_overwrites(sd1_folder, tmp_path):
    from PIL import Image

    sample = load_sample_script()
    out = tmp_path / "image.png"
    argv = ["--model", str(sd1_folder[0]), "--prompt", PROMPT, "--width", "64", "--height", "64",
            "--steps", "2", "--seed", "3", "--out", str(out)]
    sample.main(argv)
    image = Image.open(out)
    assert image.size == (64, 64)
    assert image.text["parameters"].startswith(PROMPT + "\nSteps: 2, Sampler: Euler, CFG scale: 7.5, Seed: 3")
    with pytest.raises(FileExistsError, match="exists; choose another output path or allow overwriting"):
        sample.main(argv)
    sample.main(argv + ["--overwrite"])


def test_sample_script_clip_skip_reaches_the_encoder_and_the_metadata(sd1_folder, tmp_path):
    """--clip-skip 2 (A1111's count) generates what the pipeline gives with clip_skip=1 (diffusers' count),
    something else than the default, and writes "Clip skip: 2"."""
    from PIL import Image

    sample = load_sample_script()
    argv = ["--model", str(sd1_folder[0]), "--prompt", PROMPT, "--width", "64", "--height", "64", "--steps", "2", "--seed", "3"]
    sample.main([*argv, "--clip-skip", "2", "--out", str(tmp_path / "skip.png")])
    sample.main([*argv, "--out", str(tmp_path / "plain.png")])
    with Image.open(tmp_path / "skip.png") as image:
        assert "Clip skip: 2" in image.text["parameters"]
        skipped = torch.from_numpy(np.array(image, dtype=np.float32))
    with Image.open(tmp_path / "plain.png") as image:
        assert "Clip skip" not in image.text["parameters"]
        plain = torch.from_numpy(np.array(image, dtype=np.float32))
    pipe = load_pipeline(str(sd1_folder[0]))
    expected = pipe.generate(PROMPT, width=64, height=64, steps=2, seed=3, clip_skip=1, progress=False)
    expected = torch.from_numpy(np.array(to_pil(expected)[0], dtype=np.float32))
    assert torch.equal(skipped, expected) and not torch.equal(skipped, plain)


def test_sample_script_cfg_rescale_reaches_the_pipeline_and_the_metadata(sd1_folder, tmp_path):
    """--cfg-rescale 0.7 draws what generate(cfg_rescale=0.7) draws and writes "Cfg rescale: 0.7"; outside
    [0, 1], or with --cfg 1, it is refused by name."""
    from PIL import Image

    sample = load_sample_script()
    argv = ["--model", str(sd1_folder[0]), "--prompt", PROMPT, "--width", "64", "--height", "64", "--steps", "2", "--seed", "3"]
    sample.main([*argv, "--cfg-rescale", "0.7", "--out", str(tmp_path / "rescaled.png")])
    with Image.open(tmp_path / "rescaled.png") as image:
        assert "Cfg rescale: 0.7" in image.text["parameters"]
        rescaled = torch.from_numpy(np.array(image, dtype=np.float32))
    expected = load_pipeline(str(sd1_folder[0])).generate(PROMPT, width=64, height=64, steps=2, seed=3, cfg_rescale=0.7, progress=False)
    assert torch.equal(rescaled, torch.from_numpy(np.array(to_pil(expected)[0], dtype=np.float32)))
    with pytest.raises(SystemExit, match="--cfg-rescale 1.5 is not between 0 and 1"):
        sample.main([*argv, "--cfg-rescale", "1.5", "--out", str(tmp_path / "bad.png")])
    with pytest.raises(SystemExit, match="--cfg-rescale acts on classifier-free guidance, which --cfg 1 turns off"):
        sample.main([*argv, "--cfg", "1", "--cfg-rescale", "0.5", "--out", str(tmp_path / "off.png")])


def test_sample_script_timesteps_reach_the_pipeline_and_the_metadata(sd1_folder, tmp_path):
    """--timesteps draws what generate(timesteps=) draws and writes them; a --steps that disagrees,
    --karras, and a list that is not decreasing are refused by name."""
    from PIL import Image

    sample = load_sample_script()
    argv = ["--model", str(sd1_folder[0]), "--prompt", PROMPT, "--width", "64", "--height", "64", "--seed", "3"]
    sample.main([*argv, "--timesteps", "999,645,24", "--out", str(tmp_path / "ays.png")])
    with Image.open(tmp_path / "ays.png") as image:
        assert 'Steps: 3,' in image.text["parameters"] and 'Timesteps: "999,645,24"' in image.text["parameters"]
        drawn = torch.from_numpy(np.array(image, dtype=np.float32))
    expected = load_pipeline(str(sd1_folder[0])).generate(PROMPT, width=64, height=64, seed=3, timesteps=[999, 645, 24], progress=False)
    assert torch.equal(drawn, torch.from_numpy(np.array(to_pil(expected)[0], dtype=np.float32)))
    with pytest.raises(SystemExit, match="--timesteps lists 3 steps but --steps says 5; drop --steps"):
        sample.main([*argv, "--timesteps", "999,645,24", "--steps", "5", "--out", str(tmp_path / "a.png")])
    with pytest.raises(SystemExit, match="--timesteps is a schedule of its own; drop --karras"):
        sample.main([*argv, "--timesteps", "999,645,24", "--karras", "--out", str(tmp_path / "b.png")])
    with pytest.raises(SystemExit, match="--timesteps: timesteps must be strictly decreasing"):
        sample.main([*argv, "--timesteps", "24,999", "--out", str(tmp_path / "c.png")])


def test_sample_script_reads_lora_scales(tmp_path):
    sample = load_sample_script()
    assert sample.lora_argument("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert sample.lora_argument("style.safetensors") == ("style.safetensors", 1.0)
    (tmp_path / "style:2").write_bytes(b"")
    assert sample.lora_argument(str(tmp_path / "style:2")) == (str(tmp_path / "style:2"), 1.0)  # a file of that name, whole


def test_sample_script_merges_a_lora_before_keeping_weights_in_fp8(sd1_folder, tmp_path):
    """`--weights-dtype fp8 --lora`: the LoRA was merged into the fp8 weights, where a ΔW of 2 % of W is
    mostly rounded away (the image moved half as much); it is merged into the fp32 weights first, then stored:
    the image is generate's after merge -> store_weights, and differs from the image without the LoRA."""
    from PIL import Image

    from minigen.loading.lora_files import merge, read_lora
    from minigen.storage import WEIGHTS_DTYPES, compute_dtype, store_weights

    if "fp8" not in WEIGHTS_DTYPES:
        pytest.skip("this torch has no float8_e4m3fn")
    unet = load_pipeline(str(sd1_folder[0])).unet
    g, lora = torch.Generator().manual_seed(0), {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear):
            a = (0.02 * module.weight.std().item() / 2**0.5) ** 0.5  # rank 2: ΔW of std 2 % of W's
            lora[f"lora_unet_{name.replace('.', '_')}.lora_down.weight"] = torch.randn(2, module.in_features, generator=g) * a
            lora[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"] = torch.randn(module.out_features, 2, generator=g) * a
    save_file(lora, str(tmp_path / "small.safetensors"))
    sample = load_sample_script()
    argv = ["--model", str(sd1_folder[0]), "--prompt", PROMPT, "--width", "64", "--height", "64", "--seed", "3", "--weights-dtype", "fp8"]
    sample.main([*argv, "--lora", str(tmp_path / "small.safetensors"), "--out", str(tmp_path / "lora.png")])
    sample.main([*argv, "--out", str(tmp_path / "plain.png")])
    drawn, plain = (np.array(Image.open(tmp_path / name), dtype=np.float32) for name in ("lora.png", "plain.png"))
    pipe = load_pipeline(str(sd1_folder[0]))
    merge(pipe.unet, read_lora(tmp_path / "small.safetensors", unet=pipe.unet).unet)
    store_weights(pipe.unet, WEIGHTS_DTYPES["fp8"], compute_dtype(pipe.unet))
    expected = np.array(to_pil(pipe.generate(PROMPT, width=64, height=64, seed=3, progress=False))[0], dtype=np.float32)
    assert np.array_equal(drawn, expected) and np.abs(drawn - plain).mean() > 0.5  # 0.79 levels; merged in fp8, 0.35


def test_sdxl_in_float16_keeps_its_vae_in_float32(sdxl_folder, sd1_folder):
    """SDXL's official VAE overflows in float16 (diffusers' force_upcast): it is loaded in float32 beside a
    float16 UNet and decodes float16 latents; SD1's VAE follows the dtype asked for."""
    sdxl, sd1 = load_sd(sdxl_folder[0], dtype=torch.float16), load_sd(sd1_folder[0], dtype=torch.float16)
    assert next(sdxl.unet.parameters()).dtype == torch.float16 and next(sdxl.vae.parameters()).dtype == torch.float32
    assert next(sd1.vae.parameters()).dtype == torch.float16
    images = sdxl.vae.decode_images(torch.zeros(1, 4, 8, 8, dtype=torch.float16))
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_a_folder_with_a_schedule_out_of_bounds_is_refused_at_load(sd1_folder, tmp_path):
    import shutil

    folder = shutil.copytree(sd1_folder[0], tmp_path / "edited")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "beta_end": 1.5}))
    with pytest.raises(CheckpointError, match=r"edited: beta_start .* and beta_end 1.5: a DDPM schedule needs"):
        load_sd(folder)


def test_sdxl_folder_that_encodes_an_empty_negative_is_read(sdxl_folder, tmp_path):
    """model_index.json's force_zeros_for_empty_prompt false: diffusers encodes "" for no negative, within
    1e-4 here; minigen zeroed it whatever the folder said (0.45 off)."""
    folder, pipe = sdxl_folder
    edited = shutil.copytree(folder, tmp_path / "encodes-empty")
    index = json.loads((edited / "model_index.json").read_text())
    (edited / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    theirs = StableDiffusionXLPipeline.from_pretrained(edited)
    assert theirs.config.force_zeros_for_empty_prompt is False
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = theirs(PROMPT, num_inference_steps=10, guidance_scale=5.0, latents=noise, height=64, width=64, output_type="pt").images
    ours = load_sd(edited)
    images = ours.generate(PROMPT, width=64, height=64, steps=10, cfg=5.0, latents=noise, progress=False)
    assert not ours.force_zeros_for_empty_prompt and (images - expected).abs().max() <= 1e-4
    assert (images - load_sd(folder).generate(PROMPT, width=64, height=64, steps=10, cfg=5.0, latents=noise, progress=False)).abs().max() > 0.05


def test_sdxl_prompt_embeds_of_two_chunks_without_a_negative_guide_against_zeros(sdxl_folder):
    """Prompt embeddings of 154 positions (two 77-token chunks) under CFG with no negative: diffusers guides
    against zeros of the same shape (force_zeros_for_empty_prompt), within TOL; minigen refused them
    (the negative's 77 positions did not match)."""
    folder, pipe = sdxl_folder
    ours = load_sd(folder)
    generator = torch.Generator().manual_seed(7)
    embeds, pooled = torch.randn(1, 154, 128, generator=generator), torch.randn(1, 64, generator=generator)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=4, guidance_scale=5.0, latents=noise,
                    height=64, width=64, output_type="pt").images  # fmt: skip
    images = ours.generate(prompt_embeds=embeds, pooled_prompt_embeds=pooled, width=64, height=64, steps=4, cfg=5.0, latents=noise, progress=False)
    assert expected.std() > 0.01 and (images - expected).abs().max() <= TOL
    for no_negative in ("", [""]):  # [""] (one empty negative per row) is no negative too: it encoded "", 0.4 away
        drawn = ours.generate(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative=no_negative, width=64, height=64, steps=4, cfg=5.0,
                              latents=noise, progress=False)  # fmt: skip
        assert torch.equal(drawn, images)


def test_sdxl_without_text_encoders_generates_from_embeddings(sdxl_folder):
    """SDXL without text encoders (as a checker builds it from a UNet and a VAE) gives from embeddings the latents
    the same pipeline with its encoders gives, with negative embeddings and with its zero negative: both read the
    pooled width off the missing second encoder (IndexError). A pooled width this UNet's vector has no room for is refused."""
    ours = load_sd(sdxl_folder[0])
    bare = dataclasses.replace(ours, text_encoders=[], tokenizers=[])
    generator = torch.Generator().manual_seed(7)
    embeds = dict(prompt_embeds=torch.randn(1, 77, 128, generator=generator), pooled_prompt_embeds=torch.randn(1, 64, generator=generator))
    negatives = dict(negative_prompt_embeds=torch.randn(1, 77, 128, generator=generator),
                     negative_pooled_prompt_embeds=torch.randn(1, 64, generator=generator))  # fmt: skip
    call = dict(width=64, height=64, steps=2, cfg=5.0, latents=torch.randn(1, 4, 8, 8, generator=generator), output="latents", progress=False)
    for given in (negatives, {}):
        assert torch.equal(bare.generate(**embeds, **given, **call), ours.generate(**embeds, **given, **call))
    with pytest.raises(ValueError, match=re.escape("pooled embeddings must be [1, width] (one row per row of their text embeddings, 112 - 6 k wide")):
        bare.generate(prompt_embeds=embeds["prompt_embeds"], pooled_prompt_embeds=torch.zeros(1, 63), **call)


def test_text_to_encode_without_text_encoders_is_refused_by_name(sdxl_folder, toy_sd):
    """A pipeline without text encoders given text, or under CFG no negative embeddings, names the embeddings
    to pass (an IndexError on the missing tokenizer or encoder), the pooled ones too on SDXL."""
    call = dict(width=64, height=64, steps=1, progress=False)
    sd1 = dataclasses.replace(toy_sd, text_encoders=[], tokenizers=[])
    with pytest.raises(ValueError, match="^this pipeline has no text encoders to encode the negative prompt: pass negative_prompt_embeds$"):
        sd1.generate(prompt_embeds=TOY_EMBEDS, **call)
    with pytest.raises(ValueError, match="^this pipeline has no text encoders to encode the prompt: pass prompt_embeds$"):
        sd1.generate(PROMPT, cfg=1.0, prompt_syntax="a1111", **call)
    xl = dataclasses.replace(load_sd(sdxl_folder[0]), text_encoders=[], tokenizers=[], force_zeros_for_empty_prompt=False)
    with pytest.raises(ValueError, match="encode the negative prompt: pass negative_prompt_embeds and negative_pooled_prompt_embeds$"):
        xl.generate(prompt_embeds=torch.zeros(1, 77, 128), pooled_prompt_embeds=torch.zeros(1, 64), **call)
    with pytest.raises(ValueError, match="encode the prompt: pass prompt_embeds and pooled_prompt_embeds$"):
        xl.generate(PROMPT, **call)


def test_sdxl_inputs_that_cannot_apply_are_refused_by_name(sdxl_folder, tmp_path):
    """Pooled embeddings of another width were read (their size embeddings narrowed to fit) or failed in a
    bare torch.cat; negative=None failed in list(None); sizes given as a tuple in an AttributeError; a
    refiner folder without requires_aesthetics_score as a missing text_encoder/."""
    folder, _ = sdxl_folder
    ours = load_sd(folder)
    call = dict(width=64, height=64, steps=1, progress=False)
    context = torch.zeros(1, 77, 128)
    for pooled in (torch.zeros(1, 16), torch.zeros(2, 64), torch.zeros(1, 1, 64)):  # 16: size embeddings of 16 would fit
        with pytest.raises(ValueError, match=re.escape("pooled embeddings must be [1, 64] (one row per row") + f".* got {re.escape(str(list(pooled.shape)))}"):
            ours.generate(prompt_embeds=context, pooled_prompt_embeds=pooled, **call)
    with pytest.raises(ValueError, match=r"negative is a string \('' for none\), or a list of 1 strings \(one per image\); got None"):
        ours.generate(PROMPT, None, **call)
    for option in ("clip_skip", "prompt_syntax"):  # the negative is zeros, so no text is encoded: they were not read
        with pytest.raises(ValueError, match=f"^{option} acts on text the pipeline encodes, and with prompt_embeds this call encodes none"):
            ours.generate(prompt_embeds=context, pooled_prompt_embeds=torch.zeros(1, 64), **{option: 100 if option == "clip_skip" else "a1111"}, **call)
    with pytest.raises(TypeError, match=r"size_conditioning takes a SizeConditioning\(original=\(h, w\)"):
        ours.generate(PROMPT, size_conditioning=(1024, 1024), **call)
    with pytest.raises(ValueError, match=r"SizeConditioning.crop_top_left must be two integers >= 0"):
        SizeConditioning(crop_top_left=0)
    refiner = shutil.copytree(folder, tmp_path / "refiner")
    shutil.rmtree(refiner / "text_encoder")
    with pytest.raises(CheckpointError, match="holds the SDXL refiner"):
        load_sd(refiner)


def test_sample_script_refuses_a1111_clip_skip_on_sdxl(sdxl_folder, tmp_path):
    """A1111 leaves Clip skip out on SDXL: its PNG's "Clip skip: 2" replayed here skipped one more layer of
    both encoders (pixels up to 143 levels apart)."""
    sample = load_sample_script()
    with pytest.raises(SystemExit, match="--clip-skip 2: A1111's Clip skip, which A1111 leaves out on SDXL"):
        sample.main(["--model", str(sdxl_folder[0]), "--prompt", PROMPT, "--clip-skip", "2", "--out", str(tmp_path / "a.png")])
