"""Driving the pipelines with tensors: prompt embeddings, starting latents, latents out, and the step
index and batch layout that reach the controls. On the shipped toy models (64 px, fp32): what a
method or an outside check needs, with no tokenizer or encoder in the loop.

Exactness: the same embeddings and noise give the same latents bit for bit (the same arithmetic).
"""

import pytest
import torch

from minigen.controls import BatchLayout, Controls, RecordAttention

PROMPT = "a large yellow star on grass"


def test_sd_takes_embeddings_and_latents_and_returns_latents(toy_sd):
    pipe = toy_sd
    cond, uncond = pipe.encode_prompt([PROMPT], 64, 64), pipe.encode_prompt([""], 64, 64)
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    settings = dict(steps=3, cfg=5.0, progress=False)
    from_text = pipe.generate(PROMPT, seed=3, output="latents", **settings)
    from_tensors = pipe.generate(prompt_embeds=cond.context, negative_prompt_embeds=uncond.context, latents=noise,
                                 output="latents", **settings)  # fmt: skip
    assert from_text.shape == (1, 4, 16, 16) and torch.equal(from_text, from_tensors)
    images = pipe.generate(prompt_embeds=cond.context, negative_prompt_embeds=uncond.context, latents=noise, **settings)
    assert torch.equal(images, pipe.vae.decode_images(from_tensors))
    with pytest.raises(ValueError, match="either a prompt or prompt_embeds"):
        pipe.generate(PROMPT, prompt_embeds=cond.context, **settings)
    with pytest.raises(ValueError, match="pooled embeddings are SDXL's"):
        pipe.generate(prompt_embeds=cond.context, pooled_prompt_embeds=torch.zeros(1, 8), **settings)
    with pytest.raises(ValueError, match="pooled_prompt_embeds goes with prompt_embeds: without them the pooled embedding is encoded"):
        pipe.generate(PROMPT, pooled_prompt_embeds=torch.zeros(1, 8), **settings)  # was not read
    for wrong in (cond.context[0], cond.context[..., :-1]):  # a 2-D tensor was read as 64 text positions
        with pytest.raises(ValueError, match=rf"prompt embeddings must be \[B, T, {cond.context.shape[-1]}\] \(this UNet's text width"):
            pipe.generate(prompt_embeds=wrong, **settings)
    with pytest.raises(ValueError, match=r"negative_prompt_embeds has 1 rows for 2 prompt rows; give one per prompt \(one for all: .expand\(2, -1, -1\)\)"):
        pipe.generate(prompt_embeds=cond.context.expand(2, -1, -1), negative_prompt_embeds=uncond.context, **settings)  # was an SDPA error


def test_flux_takes_embeddings_and_latents_and_returns_latents(toy_flux):
    pipe = toy_flux
    cond, negative = pipe.encode_prompt([PROMPT]), pipe.encode_prompt([""])
    side = 64 // pipe.vae.config.downsample_factor  # toy-flux's autoencoder downsamples by 4
    noise = torch.randn(1, pipe.vae.config.z_channels, side, side, generator=torch.Generator().manual_seed(4))
    settings = dict(steps=3, true_cfg=4.0, progress=False)
    from_text = pipe.generate(PROMPT, seed=4, output="latents", **settings)
    from_tensors = pipe.generate(prompt_embeds=cond.txt, pooled_prompt_embeds=cond.y, negative_prompt_embeds=negative.txt,
                                 negative_pooled_prompt_embeds=negative.y, latents=noise, output="latents", **settings)  # fmt: skip
    assert torch.equal(from_text, from_tensors)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        pipe.generate(prompt_embeds=cond.txt, **settings)
    # given beside what replaces them, these were not read (the image was the same without them)
    with pytest.raises(ValueError, match="give the negative as text .negative. or as negative_prompt_embeds, not both"):
        pipe.generate(PROMPT, negative="blurry", negative_prompt_embeds=negative.txt, negative_pooled_prompt_embeds=negative.y, **settings)
    with pytest.raises(ValueError, match="^pooled_prompt_embeds goes with prompt_embeds"):
        pipe.generate(PROMPT, pooled_prompt_embeds=cond.y, **settings)
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds goes with negative_prompt_embeds: .* from the negative's text"):
        pipe.generate(PROMPT, negative="blurry", negative_pooled_prompt_embeds=negative.y, **settings)
    with pytest.raises(ValueError, match=r"prompt_embeds must be \[B, T, \d+\] \(T5\) and pooled_prompt_embeds \[B, \d+\]"):
        pipe.generate(prompt_embeds=cond.txt[0], pooled_prompt_embeds=cond.y, **settings)
    for redux in (cond.txt[0], torch.zeros(1, 5, 7)):  # a 2-D one was sliced by its width
        with pytest.raises(ValueError, match=r"redux must be image tokens \[1, R, \d+\]"):
            pipe.generate(PROMPT, redux=redux, **settings)
    with pytest.raises(ValueError, match=r"latents of shape \[1, 16, 8, 8\] do not fit this call"):
        pipe.generate(PROMPT, latents=noise[..., :8, :8], **settings)
    with pytest.raises(ValueError, match=r"negative_prompt_embeds has 2 rows for 1 prompt rows; give one per prompt"):
        pipe.generate(prompt_embeds=cond.txt, pooled_prompt_embeds=cond.y, negative_prompt_embeds=negative.txt.expand(2, -1, -1),
                      negative_pooled_prompt_embeds=negative.y.expand(2, -1), **settings)  # fmt: skip
    short = cond.txt[:, :-1]  # embeddings of another length than the negative encoded here (max_length)
    with pytest.raises(ValueError, match="the negative prompt's text has .* positions but the prompt's .*; pass negative_prompt_embeds"):
        pipe.generate(prompt_embeds=short, pooled_prompt_embeds=cond.y, **settings)


def test_arguments_of_the_wrong_kind_are_named(toy_sd, toy_flux):
    """Each was a bare error from deep inside (randn's TypeError, a slice index, torch.cat, a reshape) or
    read as something else (True as a DeepCache interval of 1 that caches nothing, 2.9 as 2, True as a
    FirstBlockCache threshold of 1 and a strength of 1, occurrence=-1 as the last match)."""
    from minigen.pipelines.sd import SizeConditioning
    from minigen.text.spans import token_span

    one = dict(steps=2, progress=False)
    for size, error, message in (({"height": 64.0}, TypeError, "width and height take whole numbers of pixels"),
                                 ({"width": 3}, ValueError, r"multiples of 4 .*got 3x64; try 4x64")):  # fmt: skip (was "try 0x64")
        with pytest.raises(error, match=message):
            toy_sd.generate(PROMPT, **size, **one)
    with pytest.raises(TypeError, match=r"clip_skip takes a whole number of layers .*got 1.5"):
        toy_sd.generate(PROMPT, clip_skip=1.5, **one)
    with pytest.raises(ValueError, match=r"B and T at least 1\), got \[0, 77, 64\]"):
        toy_sd.generate(prompt_embeds=torch.zeros(0, 77, 64), **one)
    cond = toy_sd.encode_prompt([PROMPT], 64, 64)
    with pytest.raises(ValueError, match="negative_prompt_embeds has 154 positions but the prompt's 77"):
        toy_sd.generate(prompt_embeds=cond.context, negative_prompt_embeds=cond.context.repeat(1, 2, 1), **one)
    for interval in (True, 2.9):
        with pytest.raises(ValueError, match="DeepCache: interval must be a whole number >= 1"):
            toy_sd.generate(PROMPT, deep_cache=interval, **one)
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
        toy_sd.generate(PROMPT, image=torch.rand(1, 3, 64, 64), strength=True, **one)
    for value in ((float("nan"), 64), (True, 64)):
        with pytest.raises(ValueError, match="SizeConditioning.original must be two integers >= 1"):
            SizeConditioning(original=value)
    with pytest.raises(ValueError, match="FirstBlockCache: threshold must be a finite number >= 0, got True"):
        toy_flux.generate(PROMPT, first_block_cache=True, **one)
    flux = toy_flux.encode_prompt([PROMPT])
    with pytest.raises(ValueError, match=r"prompt_embeds must be \[B, T, \d+\] \(T5\)"):
        toy_flux.generate(prompt_embeds=flux.txt[:, :0], pooled_prompt_embeds=flux.y, **one)
    for occurrence in (-1, -3):
        with pytest.raises(ValueError, match="occurrence counts the phrase's matches from 0"):
            token_span(toy_sd.tokenizers[0], PROMPT, "star", occurrence=occurrence)


@pytest.mark.parametrize("cfg", [1.0, 5.0])
def test_controls_get_the_samplers_step_and_the_batch_layout(toy_sd, cfg):
    """A per-step controls function is called with 0, 1, 2 (the steps the callback reports); each call's
    sites see that step and the layout of its rows ([uncond | cond] under CFG)."""
    asked, seen, reported = [], [], []

    def controls(step):
        asked.append(step)
        record = RecordAttention(layers={"mid.0.0"}, sink=lambda site, probs: seen.append((site.step, site.layout, probs.shape[0])))
        return Controls(record=[record])

    toy_sd.generate(PROMPT, steps=3, cfg=cfg, seed=0, controls=controls, callback=lambda info: reported.append(info["i"]), progress=False)
    layout = BatchLayout.cfg(1) if cfg != 1.0 else BatchLayout.plain(1)
    assert asked == reported == [0, 1, 2]
    assert seen == [(step, layout, layout.size) for step in range(3)]


def test_a1111_prompt_syntax_in_generate(toy_sd):
    """prompt_syntax="a1111": a plain short prompt gives the plain image exactly; a weighted one the image of
    its weighted embeddings (encode_sd1_weighted, checked against A1111's formula in test_prompt_weighting);
    a long prompt and a short negative are encoded to the same chunk count (the UNet reads 154 positions)."""
    from minigen.text.weighting import encode_sd1_weighted

    options = dict(steps=3, seed=2, progress=False)
    plain = toy_sd.generate("a red star on grass", "blurry", **options)
    assert torch.equal(toy_sd.generate("a red star on grass", "blurry", prompt_syntax="a1111", **options), plain)
    weighted = toy_sd.generate("a (red:1.4) star on grass", "blurry", prompt_syntax="a1111", **options)
    embeds = encode_sd1_weighted(toy_sd.text_encoders[0], toy_sd.tokenizers[0], ["a (red:1.4) star on grass"])
    assert torch.equal(weighted, toy_sd.generate(prompt_embeds=embeds, negative="blurry", prompt_syntax="a1111", **options))
    assert not torch.equal(weighted, plain)
    long_prompt = ", ".join(["a red star on grass"] * 20)  # about 120 tokens: 2 chunks
    assert toy_sd.chunk_count([long_prompt]) == 2
    seen = []
    record = RecordAttention(layers=["mid.0.0"], sink=lambda site, probs: seen.append(probs.shape[-1]))
    toy_sd.generate(long_prompt, "blurry", prompt_syntax="a1111", controls=Controls(record=[record]), **options)
    assert set(seen) == {154}
    with pytest.raises(ValueError, match="prompt syntax must be 'plain' or 'a1111'"):
        toy_sd.generate("a star", prompt_syntax="comfy", **options)


def test_lcm_maps_sigma_to_t_by_the_models_own_schedule(toy_sd, monkeypatch):
    """sample_lcm's c_skip and c_out read t from a schedule; the pipeline passes its own (it used SD's
    default even for a model with another), and sampler_options still override it."""
    from dataclasses import replace

    import minigen.pipelines.sd as sd
    from minigen.sampling import DiscreteSchedule

    seen = []
    lcm = sd.SAMPLERS["lcm"]
    monkeypatch.setitem(sd.SAMPLERS, "lcm", lambda *a, schedule=None, **kw: seen.append(schedule) or lcm(*a, schedule=schedule, **kw))
    pipe = replace(toy_sd, schedule=DiscreteSchedule(beta_end=0.02))
    pipe.generate("a red star", steps=2, cfg=1.0, sampler="lcm", progress=False)
    other = DiscreteSchedule()
    pipe.generate("a red star", steps=2, cfg=1.0, sampler="lcm", sampler_options={"schedule": other}, progress=False)
    assert seen[0] is pipe.schedule and seen[1] is other


@pytest.mark.parametrize("model", ["toy_sd", "toy_flux"])
def test_an_empty_or_non_text_prompt_list_is_named(model, request):
    """[] was an IndexError inside the tokenizer (SD) or a transformers error (FLUX)."""
    pipe = request.getfixturevalue(model)
    for prompt in ([], [1], ("a star", None)):
        with pytest.raises(ValueError, match="prompt is a string or a non-empty list of strings"):
            pipe.generate(prompt, steps=1, progress=False)
