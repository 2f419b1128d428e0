"""First Block Cache for FLUX (minigen/step_cache.py): threshold 0 is the uncached run exactly; a large
threshold skips blocks (counted by recording every block's attention, independently of the cache's
own counts) and changes the output; under classifier-free guidance each row keeps its own residuals
and the batch skips only when every row may.
"""

from dataclasses import replace

import pytest
import torch
from conftest import TINY_FLUX

from minigen.controls import Controls, RecordAttention
from minigen.models.flux import Flux
from minigen.models.flux_tokens import image_ids, text_ids
from minigen.step_cache import FirstBlockCache

H, W, TXT = 3, 4, 5
BLOCKS = TINY_FLUX.depth + TINY_FLUX.depth_single_blocks


@pytest.fixture(scope="module")
def model() -> Flux:
    torch.manual_seed(0)
    flux = Flux(replace(TINY_FLUX, guidance_embed=False)).eval()
    for p in flux.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return flux


def inputs(batch: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(img_ids=image_ids(H, W), txt=torch.randn(batch, TXT, 32, generator=g), txt_ids=text_ids(TXT),
                y=torch.randn(batch, 24, generator=g))  # fmt: skip


@torch.no_grad()
def sample(model: Flux, cache: FirstBlockCache | None, steps: int = 8, batch: int = 1, record: RecordAttention | None = None):
    """Euler steps of the flow from noise, as the pipeline takes them; returns the final latent tokens."""
    x = torch.randn(batch, H * W, 64, generator=torch.Generator().manual_seed(1))
    sigmas = torch.linspace(1, 0, steps + 1)
    for i in range(steps):
        controls = Controls(record=[record]) if record is not None else None
        v = model(x, timesteps=sigmas[i].expand(batch), **inputs(batch), controls=controls, cache=cache)
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def test_threshold_zero_is_the_uncached_run_exactly(model):
    cache = FirstBlockCache(threshold=0.0)
    assert torch.equal(sample(model, cache), sample(model, None))
    assert (cache.computed, cache.skipped) == (8, 0)


def test_a_large_threshold_skips_blocks_and_changes_the_output(model):
    record, cache = RecordAttention(kind="joint"), FirstBlockCache(threshold=1e9)
    cached = sample(model, cache, record=record)
    evaluations = sum(len(maps) for maps in record.maps.values())  # one map per block that ran
    assert (cache.computed, cache.skipped) == (1, 7)  # the first step has nothing to compare with
    assert evaluations == BLOCKS + 7 * 1  # then only double_blocks.0 runs
    assert len(record.maps["double_blocks.0"]) == 8 and len(record.maps["single_blocks.1"]) == 1
    assert cache.saved_fraction(BLOCKS) == pytest.approx(7 * (BLOCKS - 1) / (8 * BLOCKS))
    assert (cached - sample(model, None)).abs().max() > 1e-3


def test_a_skipped_call_adds_each_rows_own_cached_residual(model):
    """Two CFG-like rows with different inputs: a call repeating the cached one exactly may skip, and each
    row then gets its own full output back (one residual for both rows would mix them)."""
    x, t = torch.randn(2, H * W, 64), torch.tensor([0.5, 0.5])
    cache = FirstBlockCache(threshold=0.01)
    with torch.no_grad():
        full = model(x, timesteps=t, **inputs(2), cache=cache)
        again = model(x, timesteps=t, **inputs(2), cache=cache)
    assert (cache.computed, cache.skipped) == (1, 1)
    assert (again - full).abs().max() <= 1e-6  # first block's output + the rest's residual, row by row
    assert (full[0] - full[1]).abs().max() > 1e-2


def test_the_batch_skips_only_when_every_row_may(model):
    """The unconditional row repeats the cached call, the conditional row moves: no skip."""
    x, t = torch.randn(2, H * W, 64), torch.tensor([0.5, 0.5])
    moved = x.clone()
    moved[1] += 0.5 * torch.randn_like(moved[1])
    cache = FirstBlockCache(threshold=0.05)
    with torch.no_grad():
        model(x, timesteps=t, **inputs(2), cache=cache)
        before = cache.first_residual
        model(moved, timesteps=t, **inputs(2), cache=cache)
    assert (cache.computed, cache.skipped) == (2, 0)
    after = cache.first_residual  # the metric written out here: mean |r - r_last| / mean |r_last| per row
    unconditional, conditional = ((after[i] - before[i]).abs().mean() / before[i].abs().mean() for i in range(2))
    assert unconditional <= 1e-6 < 0.05 < conditional
    assert cache.changes[-1] == pytest.approx(float(conditional), rel=1e-5)  # the batch's figure is its largest row's


@torch.no_grad()
def test_cfg_rows_sampled_with_the_cache_match_each_row_sampled_alone(model):
    """A 2-row batch sampled with a cache that skips (threshold 1e9: every step after the first) gives each
    row what that row gives sampled alone with the same cache setting: each row is completed with its own
    cached residual (atol 1e-5: batched and single matmuls round differently)."""
    g = torch.Generator().manual_seed(5)
    x0, txt, y = torch.randn(2, H * W, 64, generator=g), torch.randn(2, TXT, 32, generator=g), torch.randn(2, 24, generator=g)

    def run(rows: slice) -> tuple[torch.Tensor, FirstBlockCache]:
        cache, x, sigmas = FirstBlockCache(threshold=1e9), x0[rows], torch.linspace(1, 0, 7)
        for i in range(6):
            v = model(x, timesteps=sigmas[i].expand(len(x)), img_ids=image_ids(H, W), txt=txt[rows], txt_ids=text_ids(TXT), y=y[rows], cache=cache)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        return x, cache

    both, cache = run(slice(0, 2))
    assert (cache.computed, cache.skipped) == (1, 5)
    for i in range(2):
        alone, _ = run(slice(i, i + 1))
        torch.testing.assert_close(both[i : i + 1], alone, rtol=0, atol=1e-5)
    assert (both[0] - both[1]).abs().max() > 1e-2  # the rows differ: a shared residual would show


def test_threshold_must_be_a_number_at_least_zero():
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold"):
            FirstBlockCache(bad)


@pytest.fixture(scope="module")
def toy_flux():
    from minigen.loading.auto import load_pipeline

    return load_pipeline("toy-flux")


def test_pipeline_option_off_by_default_and_reset_per_generation(toy_flux):
    """generate(first_block_cache=...): 0 is the plain image exactly; a cache object given twice is reset
    each time, so the second generation is the first one again; under toy-flux's CFG (4) both halves
    run in one batch."""
    prompt, kw = "a red star on grass", dict(steps=6, seed=3, progress=False)
    plain = toy_flux.generate(prompt, **kw)
    assert torch.equal(toy_flux.generate(prompt, first_block_cache=0.0, **kw), plain)
    cache = FirstBlockCache(threshold=1e9)
    first = toy_flux.generate(prompt, first_block_cache=cache, **kw)
    counts = (cache.computed, cache.skipped)
    second = toy_flux.generate(prompt, first_block_cache=cache, **kw)
    assert counts == (cache.computed, cache.skipped) == (1, 5)
    assert torch.equal(first, second)
    assert cache.first_residual.shape[0] == 2  # [uncond | cond]
    assert (first - plain).abs().mean() > 1e-3


# ---------------------------------------------------------------- DeepCache (UNet)


@pytest.fixture(scope="module")
def unet():
    from conftest import TINY_UNET

    from minigen.models.unet import UNet

    torch.manual_seed(0)
    return UNet(TINY_UNET).eval()


def unet_steps(unet, cache, steps: int = 6, record: RecordAttention | None = None):
    """`steps` calls on slowly moving latents, two rows (CFG-like); the outputs."""
    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    outs = []
    with torch.no_grad():
        for k in range(steps):
            controls = Controls(record=[record]) if record is not None else None
            outs.append(unet(x * (1 - 0.05 * k), torch.full((2,), 900.0 - 100 * k), context, controls=controls, cache=cache))
    return outs


def test_deep_cache_interval_one_is_the_uncached_run_exactly(unet):
    from minigen.step_cache import DeepCache

    cache = DeepCache(interval=1)
    assert all(torch.equal(a, b) for a, b in zip(unet_steps(unet, cache), unet_steps(unet, None)))
    assert (cache.computed, cache.skipped) == (6, 0)


def test_deep_cache_runs_the_shallow_path_between_full_calls(unet):
    """interval 3: calls 0 and 3 full, the others on the shallow path: the first input conv and the last
    output stage, whose transformer (up.1.2.0) is then the only attention that runs (counted by records)."""
    from minigen.step_cache import DeepCache

    record, cache = RecordAttention(kind="self"), DeepCache(interval=3)
    cached = unet_steps(unet, cache, record=record)
    assert (cache.computed, cache.skipped) == (2, 4)
    layers = len(unet.attention_layers())
    assert sum(len(maps) for maps in record.maps.values()) == 2 * layers + 4
    assert len(record.maps["up.1.2.0"]) == 6 and len(record.maps["mid.0.0"]) == 2
    plain = unet_steps(unet, None, record=RecordAttention(kind="self"))  # recording attention as the cached run does
    assert torch.equal(cached[0], plain[0]) and torch.equal(cached[3], plain[3])
    assert (cached[1] - plain[1]).abs().max() > 1e-3


@torch.no_grad()
def test_a_shallow_call_is_the_last_stage_on_the_cached_feature_and_the_new_input(unet):
    """Reference written out here, stage by stage: the full call's feature entering the last output stage
    (input stages, middle, the other output stages at t_a), then, at the next call, that stage on it
    joined with the first input stage of the new latents at t_b, and the output conv (atol 1e-5)."""
    from minigen.models.layers import timestep_embedding
    from minigen.step_cache import DeepCache

    g = torch.Generator().manual_seed(4)
    x_a, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    x_b, t_a, t_b = 0.9 * x_a + 0.1 * torch.randn(2, 4, 16, 16, generator=g), torch.tensor([800.0, 800.0]), torch.tensor([700.0, 700.0])
    cache = DeepCache(interval=2)
    full, shallow = unet(x_a, t_a, context, cache=cache), unet(x_b, t_b, context, cache=cache)
    assert (cache.computed, cache.skipped) == (1, 1)

    def emb(t):
        return unet.time_embed(timestep_embedding(t, unet.config.model_channels))

    h, skips = x_a, []
    for stage in unet.input_blocks:
        h = stage(h, emb(t_a), context, None)
        skips.append(h)
    h = unet.middle_block(h, emb(t_a), context, None)
    for stage in unet.output_blocks[:-1]:
        h = stage(torch.cat([h, skips.pop()], dim=1), emb(t_a), context, None, upsample_to=skips[-1].shape[-2:])
    first = unet.input_blocks[0](x_b, emb(t_b), context, None)
    expected = unet.out(unet.output_blocks[-1](torch.cat([h, first], dim=1), emb(t_b), context, None))
    torch.testing.assert_close(shallow, expected, rtol=0, atol=1e-5)
    assert (shallow - full).abs().max() > 1e-2  # not the last output again


def test_deep_cache_branch_spans_the_output_stages(unet):
    """The deepest branch (the last output stage index) still caches and skips, the middle block alone;
    one past it would never fill the cache: refused by name."""
    from minigen.step_cache import DeepCache

    last = len(unet.output_blocks) - 1
    cache = DeepCache(interval=2, branch=last)
    unet_steps(unet, cache, steps=2)
    assert (cache.computed, cache.skipped) == (1, 1)
    with pytest.raises(ValueError, match=f"DeepCache branch {last + 1}: .* so the branch is 0..{last}"):
        unet_steps(unet, DeepCache(branch=last + 1), steps=1)


def test_a_forward_to_stop_early_is_refused_a_cache(unet):
    """stop_after ends a forward at one layer, which a shallow DeepCache call may skip (it would then run
    on and return a full output): the two together are refused, and nothing is cached."""
    from minigen.step_cache import DeepCache

    g = torch.Generator().manual_seed(3)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 7, 32, generator=g)
    cache = DeepCache(interval=2)
    with torch.no_grad(), pytest.raises(ValueError, match="stop_after ends a forward at one layer, which a DeepCache call may skip"):
        unet(x, t, context, controls=Controls(stop_after=("up.1.1.0", "self")), cache=cache)
    assert cache.deep is None and cache.computed == 0


def test_deep_cache_keeps_each_rows_feature(unet):
    """A shallow call repeating the full call's inputs gives each row its full output back."""
    from minigen.step_cache import DeepCache

    g = torch.Generator().manual_seed(3)
    x, t, context = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 7, 32, generator=g)
    cache = DeepCache(interval=2)
    with torch.no_grad():
        full, again = unet(x, t, context, cache=cache), unet(x, t, context, cache=cache)
    assert (cache.computed, cache.skipped) == (1, 1)
    assert (again - full).abs().max() <= 1e-6 and (full[0] - full[1]).abs().max() > 1e-2


def test_sd_pipeline_deep_cache_option(toy_sd):
    from minigen.step_cache import DeepCache

    prompt, kw = "a red star on grass", dict(steps=6, seed=3, progress=False)
    plain = toy_sd.generate(prompt, **kw)
    assert torch.equal(toy_sd.generate(prompt, deep_cache=1, **kw), plain)
    cache = DeepCache(interval=2)
    first = toy_sd.generate(prompt, deep_cache=cache, **kw)
    second = toy_sd.generate(prompt, deep_cache=cache, **kw)
    assert (cache.computed, cache.skipped) == (3, 3) and torch.equal(first, second)
    assert cache.deep.shape[0] == 2  # [uncond | cond]
    assert (first - plain).abs().mean() > 1e-3
