"""Personalized Residuals and LAG (minigen/methods/residuals.py) on tiny random UNets.

Exactness: scale 0 is the base model bit for bit. Equivalences (tolerance 1e-5, fp32; the only
difference is SDPA against the written-out attention that recording needs): LAG with a mask of all
ones is plain residual sampling, and merged weights are the residual path.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minigen.controls import BatchLayout, Site
from minigen.loading.lora_files import merge
from minigen.methods.residuals import (
    ConceptMask,
    Residuals,
    concept_tokens,
    lag_controls,
    proj_out_blocks,
)
from minigen.models.unet import UNet
from minigen.models.unet_config import PRESETS
from minigen.text.tokenizer import load_clip_tokenizer

from conftest import TINY_SDXL_UNET, TINY_UNET, TINY_VAE


def concept_mask(maps, layers, grid, layout=None, quantile=0.5):
    """LAG's mask for the blocks `layers` (maps: layer id -> this call's map), read as the proj_out after them reads it (its Site)."""
    return ConceptMask(maps, layers, quantile)(Site("proj_out", None, 0, None, layout, grid))


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(TINY_UNET).eval().requires_grad_(False)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 32, generator=g)


def residuals_for(unet, seed=0, **kw):
    return Residuals(unet, identifier="sks", macro_class="star", generator=torch.Generator().manual_seed(seed), **kw)


def test_full_size_sd15_has_the_papers_parameter_count():
    with torch.device("meta"):
        unet = UNet(PRESETS["sd15"])
    residuals = Residuals(unet, identifier="sks", macro_class="dog")
    print(f"SD1.5 residual parameters: {residuals.parameter_count():,}")
    assert len(residuals.targets) == 16
    assert residuals.parameter_count() == 1_239_040
    ranks = {t: d.shape[0] for t, d in zip(residuals.targets, residuals.down)}
    assert ranks["input_blocks.1.1.proj_out"] == 16 and ranks["middle_block.1.proj_out"] == 64


def test_sdxl_residuals_sit_on_linear_proj_outs():
    with torch.device("meta"):
        unet = UNet(PRESETS["sdxl"])
    residuals = Residuals(unet, identifier="sks", macro_class="dog")
    assert len(residuals.targets) == 11 and residuals.down[0].dim() == 2  # Linear factors [r, m]
    assert len(proj_out_blocks(unet)["middle_block.1.proj_out"]) == 10  # ten blocks localize one proj_out


def test_scale_zero_is_the_base_model_exactly(unet, inputs):
    base = unet(*inputs)
    assert torch.equal(unet(*inputs, controls=residuals_for(unet).controls(scale=0.0)), base)
    assert not torch.allclose(unet(*inputs, controls=residuals_for(unet).controls()), base, atol=1e-4)


def test_zero_init_starts_at_the_base_model(unet, inputs):
    base = unet(*inputs)
    assert torch.equal(unet(*inputs, controls=residuals_for(unet, init="zero").controls()), base)


def test_merged_weights_equal_the_residual_path(unet, inputs):
    residuals = residuals_for(unet, init_scale=0.5)
    expected = unet(*inputs, controls=residuals.controls(scale=0.7))
    merged = UNet(TINY_UNET).eval().requires_grad_(False)
    merged.load_state_dict(unet.state_dict())
    merge(merged, residuals.low_rank(scale=0.7))
    torch.testing.assert_close(merged(*inputs), expected, atol=1e-5, rtol=0)


def test_lag_with_an_all_ones_mask_is_plain_residual_sampling(unet, inputs):
    residuals = residuals_for(unet, init_scale=0.5)
    plain = unet(*inputs, controls=residuals.controls())
    everywhere = lag_controls([(residuals, [2, 3], 1.0)], quantile=0.0)  # threshold at the minimum
    torch.testing.assert_close(unet(*inputs, controls=everywhere), plain, atol=1e-5, rtol=0)


def test_lag_refuses_a_quantile_outside_0_1(unet):
    with pytest.raises(ValueError, match=r"quantile must be in \[0, 1\]"):
        lag_controls([(residuals_for(unet), [2, 3], 1.0)], quantile=1.5)


def test_lag_masks_half_of_each_block_and_scopes_the_residual(unet, inputs):
    residuals = residuals_for(unet, init_scale=0.5)
    controls = lag_controls([(residuals, [2, 3], 1.0)])
    lag = unet(*inputs, controls=controls)
    maps = controls.record[0].sink  # each layer's latest map, and nothing more
    assert not controls.record[0].maps and set(maps) == {b for blocks in residuals.blocks.values() for b in blocks}
    for target, blocks in residuals.blocks.items():
        side = int(maps[blocks[0]].shape[2] ** 0.5)  # square latents: an n x n token grid
        mask = concept_mask(maps, blocks, (side, side))
        assert mask.shape[0] == 2 and set(mask.unique().tolist()) == {0.0, 1.0}
        assert 0.45 <= mask.mean().item() <= 0.6  # binarized at the median
    base, plain = unet(*inputs), unet(*inputs, controls=residuals.controls())
    assert 0 < (lag - base).abs().mean() < (plain - base).abs().mean()


def test_concept_mask_follows_the_attention_and_cfg_rows_share_it():
    scores = torch.zeros(4, 1, 16, 1)
    scores[2, 0, :5], scores[3, 0, 10:] = 1.0, 1.0  # the conditional rows 2, 3 look at different places
    scores[:2] = torch.rand(2, 1, 16, 1)  # the unconditional rows look anywhere
    mask = concept_mask({"a": scores}, ["a"], (4, 4), BatchLayout.cfg(2)).flatten(1)
    assert torch.equal(mask[0], mask[2]) and torch.equal(mask[1], mask[3])
    assert mask[2, :5].all() and mask[3, 10:].all()


@pytest.mark.parametrize("quantile", [0.0, 0.3, 0.5, 0.9])
def test_concept_mask_cuts_where_torch_quantile_does(quantile):
    """The binarization (a k-th value) keeps exactly the positions at or above torch.quantile's value."""
    maps = {"a": torch.rand(3, 1, 64, 2, generator=torch.Generator().manual_seed(0))}
    scores = maps["a"].sum(-1)[:, 0]
    expected = (scores >= torch.quantile(scores, quantile, dim=1, keepdim=True)).float()
    assert torch.equal(concept_mask(maps, ["a"], (8, 8), quantile=quantile).flatten(1), expected)


def test_lag_under_cfg_masks_both_halves_from_the_conditional_row(unet, inputs):
    """Under the CFG layout the unconditional row 0 takes the masks of the conditional row 1: row 1 comes out as
    in LAG where every row reads its own attention (up to 1e-6), row 0 does not, and both rows' masks are equal."""
    residuals = residuals_for(unet, init_scale=0.5)
    controls = lag_controls([(residuals, [2, 3], 1.0)]).at_step(0, BatchLayout.cfg(1))
    shared = unet(*inputs, controls=controls)
    own = unet(*inputs, controls=lag_controls([(residuals, [2, 3], 1.0)]))
    torch.testing.assert_close(shared[1], own[1], atol=1e-6, rtol=0)
    assert (shared[0] - own[0]).abs().max() > 1e-4
    for blocks in residuals.blocks.values():
        side = int(controls.record[0].sink[blocks[0]].shape[2] ** 0.5)
        mask = concept_mask(controls.record[0].sink, blocks, (side, side), BatchLayout.cfg(1))
        assert torch.equal(mask[0], mask[1])


def test_several_concepts_compose(unet, inputs):
    first, second = residuals_for(unet, 0, init_scale=0.5), residuals_for(unet, 1, init_scale=0.5)
    both = unet(*inputs, controls=lag_controls([(first, [2], 1.0), (second, [4], 0.5)], quantile=0.0))
    merged = UNet(TINY_UNET).eval().requires_grad_(False)
    merged.load_state_dict(unet.state_dict())
    merge(merged, first.low_rank(1.0) + second.low_rank(0.5))
    torch.testing.assert_close(both, merged(*inputs), atol=1e-5, rtol=0)


def test_file_round_trip_and_a_file_for_another_base_is_refused(unet, inputs, tmp_path):
    residuals = residuals_for(unet, init_scale=0.5)
    path = residuals.save(tmp_path / "star.safetensors", base="tiny-sd", steps=150)
    loaded = Residuals.load(path, unet)
    assert (loaded.identifier, loaded.macro_class, loaded.info["steps"], loaded.info["base"]) == ("sks", "star", 150, "tiny-sd")
    assert torch.equal(unet(*inputs, controls=loaded.controls()), unet(*inputs, controls=residuals.controls()))

    with pytest.raises(ValueError, match="holds residuals for base model 'tiny-sd'.*Load it with the base model"):
        Residuals.load(path, UNet(TINY_SDXL_UNET))
    other_rank = residuals_for(unet, rank_ratio=0.2).save(tmp_path / "rank.safetensors", base="tiny-sd")
    tensors = load_file(other_rank)
    with safe_open(other_rank, "pt") as f:
        metadata = f.metadata()
    save_file(tensors, tmp_path / "relabelled.safetensors", {**metadata, "minigen.residuals": metadata["minigen.residuals"].replace("0.2", "0.05")})
    with pytest.raises(ValueError, match="mis-shaped"):
        Residuals.load(tmp_path / "relabelled.safetensors", unet)


def test_a_pickled_residuals_file_is_refused_as_not_safetensors(unet, tmp_path):
    """Residuals live in a .safetensors file's metadata (identifier, class, rank ratio): a pickle has none. It was refused
    as an untrusted pickle, which told sample.py's user to pass the --allow-pickle they had already passed."""
    path = tmp_path / "star.bin"
    torch.save(load_file(residuals_for(unet).save(tmp_path / "star.safetensors", base="tiny-sd")), path)
    with pytest.raises(ValueError, match=r"star.bin: Personalized Residuals are .safetensors files.*trusted \(--allow-pickle\) or not"):
        Residuals.load(path, unet)


def test_concept_tokens_find_identifier_and_class_and_warn_without_the_identifier(unet):
    tokenizer = load_clip_tokenizer()
    residuals = residuals_for(unet)
    assert concept_tokens(tokenizer, "a sks star on grass", residuals) == [2, 3]
    with pytest.warns(UserWarning, match="lacks the identifier 'sks'"):
        assert concept_tokens(tokenizer, "a star on grass", residuals) == [2]
    with pytest.raises(ValueError, match="neither the identifier 'sks' nor the class word 'star'"):
        concept_tokens(tokenizer, "a circle on grass", residuals)


def test_concept_tokens_are_the_class_word_that_goes_with_the_identifier(unet):
    """Each word was taken at its first occurrence: in "a blue star left of a sks star" the blue star's
    word with "sks" (19 of evaluate_residuals' 400 prompts put the class word before the concept's), only
    the first of two concepts, and a concept word cut by truncation read as missing. Reference: the
    prompt's token positions counted by hand (BOS at 0)."""
    tokenizer = load_clip_tokenizer()
    residuals = residuals_for(unet)
    assert concept_tokens(tokenizer, "a blue star left of a sks star", residuals) == [7, 8]
    assert concept_tokens(tokenizer, "a sks star and a sks star", residuals) == [2, 3, 6, 7]
    with pytest.warns(UserWarning, match="the class word 'star' does not follow the identifier 'sks'"):
        assert concept_tokens(tokenizer, "a sks stars on grass", residuals) == [2]
    with pytest.raises(ValueError, match=r"sit at token positions \[76, 77\], past the 75 the text encoder reads"):
        concept_tokens(tokenizer, "a " * 75 + "sks star", residuals)


def test_settings_a_file_could_not_hold_are_refused_and_loading_draws_nothing_global(unet, tmp_path):
    """rank_ratio 0 or 1.5 trained and saved a file Residuals.load refuses; init_scale NaN gave NaN factors;
    loading drew its throw-away factors from torch's global stream (the next torch.randn changed)."""
    for changes, message in (({"rank_ratio": 0.0}, "rank_ratio is a share"), ({"rank_ratio": 1.5}, "rank_ratio is a share"),
                             ({"init_scale": float("nan")}, "init_scale must be a finite number")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            residuals_for(unet, **changes)
    path = residuals_for(unet).save(tmp_path / "star.safetensors", base="tiny-sd")
    torch.manual_seed(0)
    expected = torch.randn(3)
    torch.manual_seed(0)
    Residuals.load(path, unet)
    assert torch.equal(torch.randn(3), expected)


def test_residuals_train_with_the_base_frozen(unet, inputs):
    """A few Adam steps on the diffusion loss move the factors and leave the UNet's weights alone."""
    from minigen.sampling import DiscreteSchedule
    from minigen.objectives import diffusion_loss

    before = {k: v.clone() for k, v in unet.state_dict().items()}
    residuals = residuals_for(unet)
    start = [p.detach().clone() for p in residuals.parameters()]
    optimizer = torch.optim.Adam(residuals.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    latents, _, context = inputs
    for _ in range(5):
        loss = diffusion_loss(unet, DiscreteSchedule(), latents, context, generator=g, controls=residuals.controls())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert all(not torch.equal(p, q) for p, q in zip(residuals.parameters(), start))


def tiny_sdxl_pipeline():
    """A random SDXL-topology pipeline: tiny UNet with Linear proj_outs, two CLIP encoders, tiny VAE."""
    from minigen.models.vae import AutoencoderKL
    from minigen.pipelines.sd import StableDiffusion
    from minigen.text.encoders import TextEncoderConfig, build_text_encoder
    from minigen.text.tokenizer import OPEN_CLIP_PAD

    torch.manual_seed(0)
    te1 = build_text_encoder(TextEncoderConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, hidden_act="quick_gelu"))
    te2 = build_text_encoder(TextEncoderConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, hidden_act="gelu", projection_dim=32))
    tokenizers = [load_clip_tokenizer(), load_clip_tokenizer(pad_token=OPEN_CLIP_PAD)]
    unet = UNet(TINY_SDXL_UNET).eval().requires_grad_(False)
    vae = AutoencoderKL(TINY_VAE).eval().requires_grad_(False)
    return StableDiffusion(unet, vae, [te1.requires_grad_(False), te2.requires_grad_(False)], tokenizers, default_size=64)


def test_training_and_lag_sampling_work_on_sdxl(tmp_path):
    """On the SDXL topology (Linear proj_outs, the vector y): train_residuals fits through the
    pipeline's own conditioning, and LAG sampling runs with the learnt file."""
    from minigen.methods.residuals import TRAINING, train_residuals

    pipe = tiny_sdxl_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    residuals = residuals_for(pipe.unet)
    start = [p.detach().clone() for p in residuals.parameters()]
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    losses = train_residuals(pipe, residuals, images, "a photo of a sks star", replace(TRAINING, steps=3, batch=2), tmp_path / "work")
    assert len(losses) == 3 and all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert all(not torch.equal(p, q) for p, q in zip(residuals.parameters(), start))

    loaded = Residuals.load(residuals.save(tmp_path / "star.safetensors", base="tiny-sdxl"), pipe.unet)
    prompt = "a sks star on grass"
    tokens = concept_tokens(pipe.tokenizers[0], prompt, loaded)
    base = pipe.generate(prompt, steps=2, cfg=5.0, seed=1, progress=False)
    lag = pipe.generate(prompt, steps=2, cfg=5.0, seed=1, progress=False, controls=lag_controls([(loaded, tokens, 1.0)]))
    assert lag.shape == base.shape and not torch.equal(lag, base)


def test_training_resumes_its_own_run_and_refuses_a_checkpoint_of_another_base(tmp_path):
    """A work folder's checkpoint is resumed only by the run that wrote it: the same call goes on from
    it, while a base model with other weights (a retrained toy-sd, say) is refused by name."""
    from minigen.methods.residuals import TRAINING, train_residuals

    pipe = tiny_sdxl_pipeline()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompt, work = "a photo of a sks star", tmp_path / "work"
    train_residuals(pipe, residuals_for(pipe.unet), images, prompt, replace(TRAINING, steps=2, batch=2), work, save_every=1)
    more = train_residuals(pipe, residuals_for(pipe.unet), images, prompt, replace(TRAINING, steps=3, batch=2), work)
    assert len(more) == 1  # steps 1-2 came from the checkpoint
    trained = {}
    for ema in (0.0, 0.9):  # with an EMA the averaged weights are the result (they were computed, then dropped)
        residuals = residuals_for(pipe.unet)
        train_residuals(pipe, residuals, images, prompt, replace(TRAINING, steps=2, batch=2, ema=ema), tmp_path / f"ema{ema}")
        trained[ema] = [p.detach().clone() for p in residuals.parameters()]
    assert not any(torch.equal(a, b) for a, b in zip(trained[0.0], trained[0.9]))
    zero = residuals_for(pipe.unet)
    with torch.no_grad():
        for p in zero.parameters():
            p.zero_()  # another start (train_residuals.py --init zero): it resumed the random start's run, identical files
    with pytest.raises(ValueError, match="checkpoint of another run .*differs in initial"):
        train_residuals(pipe, zero, images, prompt, replace(TRAINING, steps=3, batch=2), work)
    with pytest.raises(ValueError, match=r"reference images must hold finite values in \[0, 1\] \(to_tensor's range, not 0-255 or \[-1, 1\]\), got [\d.]+ to 2\d\d"):
        train_residuals(pipe, residuals_for(pipe.unet), images * 255, prompt, replace(TRAINING, steps=3, batch=2), tmp_path / "bytes")
    with pytest.raises(ValueError, match=r"reference images must hold floats in \[0, 1\], got torch.uint8: divide 0-255 pixels by 255"):
        train_residuals(pipe, residuals_for(pipe.unet), images.to(torch.uint8), prompt, replace(TRAINING, steps=3, batch=2), tmp_path / "u8")

    with torch.no_grad():
        next(pipe.unet.parameters()).add_(1e-3)  # the "same" base model, retrained
    with pytest.raises(ValueError, match="checkpoint of another run .*differs in base"):
        train_residuals(pipe, residuals_for(pipe.unet), images, prompt, replace(TRAINING, steps=4, batch=2), work)
    with pytest.raises(ValueError, match="differs in base, prompt"):
        train_residuals(pipe, residuals_for(pipe.unet), images, "a photo of a sks heart", replace(TRAINING, steps=4, batch=2), work)


def test_training_takes_the_captions_encoding_without_a_tokenizer(tmp_path):
    """train_residuals(context=, y=) trains as the prompt does, bit for bit, on a pipeline without tokenizers or
    text encoders (it called encode_prompt: an IndexError there). ED-LoRA training, which adds its words to
    the tokenizer, says it needs one (a bare IndexError too)."""
    from minigen.methods.edlora_training import EDLoRATraining
    from minigen.methods.residuals import TRAINING, train_residuals
    from minigen.models.vae import AutoencoderKL
    from minigen.pipelines.sd import StableDiffusion

    pipe = tiny_sdxl_pipeline()
    bare = replace(pipe, text_encoders=[], tokenizers=[])
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    prompt, config = "a photo of a sks star", replace(TRAINING, steps=2, batch=2)
    encoded = pipe.encode_prompt([prompt], 64, 64)
    from_prompt, from_tensors = residuals_for(pipe.unet), residuals_for(pipe.unet)
    losses = train_residuals(pipe, from_prompt, images, prompt, config, tmp_path / "prompt")
    assert train_residuals(bare, from_tensors, images, config=config, work=tmp_path / "tensors", context=encoded.context, y=encoded.y) == losses
    assert all(torch.equal(a, b) for a, b in zip(from_prompt.parameters(), from_tensors.parameters()))
    for given, message in (
        ({"prompt": prompt, "context": encoded.context, "y": encoded.y}, "give either prompt or its encoding context="),
        ({"prompt": prompt}, "this pipeline has no tokenizer to encode the prompt with: pass its encoding as context="),
        ({"context": encoded.context[0], "y": encoded.y}, r"context must be one caption's encoding \[1, T, 32\] .*got shape \[77, 32\]"),
        ({"context": encoded.context}, r"this SDXL UNet also reads the caption's vector y \[1, \d+\] .*got None: pass y="),
    ):
        with pytest.raises(ValueError, match=message):
            train_residuals(bare, residuals_for(pipe.unet), images, config=config, work=tmp_path / "refused", **given)
    assert not (tmp_path / "refused").exists()
    sd1 = StableDiffusion(UNet(TINY_UNET), AutoencoderKL(TINY_VAE), [], [], default_size=64)
    with pytest.raises(ValueError, match="ED-LoRA training adds its concept words to the CLIP tokenizer .*load the model with its tokenizer"):
        EDLoRATraining(sd1, ["<star1>"], ["star"])


def test_lag_positions_per_prompt_give_each_image_its_single_run(toy_sd):
    """A batch of prompts whose concept words sit at other positions ([2, 3] and [6, 7]): one list per
    prompt gives each image what its prompt gives alone (within 1e-4, batched float sums); one list for
    both masks the second image by the first prompt's words (moved by > 0.1). Metric: max abs latent diff."""
    residuals = Residuals(toy_sd.unet, identifier="sks", macro_class="star", init_scale=1.0, generator=torch.Generator().manual_seed(0))
    prompts = ["a sks star on grass", "a red box and a sks star"]
    tokens = [concept_tokens(toy_sd.tokenizers[0], prompt, residuals) for prompt in prompts]
    assert tokens == [[2, 3], [6, 7]]
    kw = dict(steps=3, width=32, height=32, progress=False, output="latents")
    both = toy_sd.generate(prompts, seed=1, controls=lag_controls([(residuals, tokens, 1.0)]), **kw)
    for i, prompt in enumerate(prompts):
        alone = toy_sd.generate(prompt, seed=1 + i, controls=lag_controls([(residuals, tokens[i], 1.0)]), **kw)
        assert (both[i] - alone[0]).abs().max() <= 1e-4
    shared = toy_sd.generate(prompts, seed=1, controls=lag_controls([(residuals, tokens[0], 1.0)]), **kw)
    assert (shared[1] - both[1]).abs().max() > 0.1
    with pytest.raises(ValueError, match="positions for 2 prompts, but this batch holds 3"):
        toy_sd.generate([*prompts, "a sks star"], seed=1, controls=lag_controls([(residuals, tokens, 1.0)]), **kw)
    for bad, message in (([], "got none"), ([[2], 3], "one list for all prompts or one per prompt"), ([2.5], "whole numbers")):
        with pytest.raises(ValueError, match=message):
            lag_controls([(residuals, bad, 1.0)])
    with pytest.raises(ValueError, match="at least one"):
        lag_controls([])


def test_controls_cannot_be_passed_as_a_step_function(toy_sd):
    """generate(controls=residuals.controls) called it with each step's index as the scale: scales 0, 1, 2, ...
    without an error (0.996 off the scale-1 image); the scale is now named."""
    residuals = Residuals(toy_sd.unet, identifier="sks", macro_class="star")
    with pytest.raises(TypeError, match=r"controls\(\) takes 1 positional argument but 2"):
        toy_sd.generate("a star", steps=2, controls=residuals.controls, progress=False)
