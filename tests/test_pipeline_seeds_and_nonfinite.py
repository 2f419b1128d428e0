"""Per-image noise and non-finite values, on the shipped toy models (64 px, fp32).

Per-image noise: image k of a batch generated with `seed` draws its starting noise and every step's fresh
noise from its own CPU generator seeded `seed + k`, so it equals the single run with `seed + k`. Tolerance:
max abs diff <= 1e-3 on the [0, 1] images (a batch of 3 and a batch of 1 may round the network's matmuls
differently in the last bits, and 4 steps carry it on; measured 2e-4 with toy-sd and euler_ancestral; the
noise itself is identical, and a wrongly seeded image differs by more than 0.05).

Non-finite values: a NaN in the weights stops sampling at step 1 with NonFiniteError; a NaN argument is
refused before any step with a ValueError naming it.
"""

import copy
import dataclasses

import pytest
import torch

from minigen.sampling import NonFiniteError

PROMPTS = ["a large yellow star on grass", "a small red circle on a sky background", "a blue square on sand"]
SEED, TOLERANCE = 10, 1e-3


def assert_batch_is_single_runs(generate):
    batch = generate(PROMPTS, SEED)
    singles = torch.cat([generate(prompt, SEED + k) for k, prompt in enumerate(PROMPTS)])
    assert batch.shape == singles.shape == (3, 3, 64, 64)
    assert (batch - singles).abs().max() <= TOLERANCE
    assert (batch[0] - batch[1]).abs().max() > 0.05  # the images do differ: not a trivial equality


@pytest.mark.parametrize("sampler", ["euler_ancestral", "euler"])
def test_sd_batch_image_k_is_the_single_run_with_seed_plus_k(toy_sd, sampler):
    def generate(prompt, seed):
        return toy_sd.generate(prompt, steps=4, cfg=5.0, sampler=sampler, seed=seed, progress=False)

    assert_batch_is_single_runs(generate)


def test_flux_batch_image_k_is_the_single_run_with_seed_plus_k(toy_flux):
    def generate(prompt, seed):
        return toy_flux.generate(prompt, width=64, height=64, steps=3, seed=seed, progress=False)

    assert_batch_is_single_runs(generate)


def test_sd_nan_weight_raises_at_step_1(toy_sd):
    unet = copy.deepcopy(toy_sd.unet)
    unet.out[2].weight.data[0, 0, 0, 0] = float("nan")
    pipe = dataclasses.replace(toy_sd, unet=unet)
    with pytest.raises(NonFiniteError, match=r"step 1 of 3 .*fp16 overflow.*LoRA or residual scale"):
        pipe.generate(PROMPTS[0], steps=3, progress=False)


def test_flux_nan_weight_raises_at_step_1(toy_flux):
    transformer = copy.deepcopy(toy_flux.transformer)
    transformer.img_in.weight.data[0, 0] = float("nan")
    pipe = dataclasses.replace(toy_flux, transformer=transformer)
    with pytest.raises(NonFiniteError, match=r"step 1 of 2 .*fp16 overflow"):
        pipe.generate(PROMPTS[0], width=64, height=64, steps=2, progress=False)


def test_nan_arguments_are_refused_before_any_step(toy_sd, toy_flux):
    steps = []
    record = dict(callback=lambda info: steps.append(info["i"]), progress=False)
    with pytest.raises(ValueError, match="cfg must be a finite number, got nan") as error:
        toy_sd.generate(PROMPTS[0], steps=2, cfg=float("nan"), **record)
    assert not isinstance(error.value, NonFiniteError)
    with pytest.raises(ValueError, match="true_cfg must be a finite number, got inf"):
        toy_flux.generate(PROMPTS[0], width=64, height=64, steps=2, true_cfg=float("inf"), **record)
    with pytest.raises(ValueError, match="guidance must be a finite number, got nan"):  # checked first, even on schnell
        toy_flux.generate(PROMPTS[0], width=64, height=64, steps=2, guidance=float("nan"), **record)
    assert steps == []


@pytest.mark.parametrize("sampler, options, message", [
    ("ddim", {"eta": float("inf")}, r"sampler_options\['eta'\] must be a finite number of 0 or more, got inf"),
    ("euler_ancestral", {"eta": float("nan")}, r"sampler_options\['eta'\] must be a finite number of 0 or more, got nan"),
    ("dpmpp_2m_sde", {"s_noise": float("inf")}, r"sampler_options\['s_noise'\]"),
    ("dpmpp_sde", {"s_noise": -1.0}, r"sampler_options\['s_noise'\] must be a finite number of 0 or more, got -1.0"),
    ("lcm", {"timestep_scaling": float("nan")}, r"sampler_options\['timestep_scaling'\]"),
])  # fmt: skip
def test_non_finite_sampler_options_are_refused_before_any_step(toy_sd, sampler, options, message):
    """An eta of Inf made the last step's fresh noise Inf * 0: a NaN image and no error (ddim, 3 steps);
    a NaN eta or s_noise stopped later with a NonFiniteError that blamed fp16 and LoRA scales."""
    steps = []
    with pytest.raises(ValueError, match=message) as error:
        toy_sd.generate(PROMPTS[0], steps=3, sampler=sampler, sampler_options=options, callback=lambda info: steps.append(info["i"]), progress=False)
    assert not isinstance(error.value, NonFiniteError) and steps == []


def test_ancestral_step_refuses_an_eta_that_is_not_a_finite_amount():
    from minigen.sampling.samplers import ancestral_step

    for eta in (float("inf"), float("nan"), -0.5):
        with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
            ancestral_step(torch.tensor(1.0), torch.tensor(0.0), eta)
