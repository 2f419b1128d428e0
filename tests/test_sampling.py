"""Schedules, denoisers and samplers of minigen.sampling, checked against diffusers' schedulers.

Parity tests drive diffusers (the reference) and minigen with the same deterministic toy network
(`ToyNet`: a fixed random 1x1 channel mix of its input plus a function of t) for 10 steps (LCM: 1, 4, 10)
from the same initial noise [2, 4, 8, 8], stochastic samplers with the same fresh noise, and compare final
latents in fp32: max abs diff <= 1e-4 (measured <= 1.6e-5, the largest for DPM++ 2M SDE with Karras sigmas).
Reference final latents have std 0.66-1.23 (eps) and 0.25-0.41 (v); the initial noise is standard normal,
scaled by up to 14.65. The samplers added for A1111's menu are also checked on a random diffusers UNet.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
import types

import pytest
import torch
from conftest import load_sample_script, tiny_diffusers_unet

diffusers = pytest.importorskip("diffusers")

from minigen.image import A1111_SAMPLERS, a1111_sampler  # noqa: E402
from minigen.sampling import (  # noqa: E402
    SAMPLERS,
    ClassifierFreeGuidance,
    DiscreteDenoiser,
    DiscreteSchedule,
    brownian_increments,
    karras_sigmas,
    lcm_sigmas,
    sample_ddim,
    sample_ddim_inversion,
    sample_dpm_2,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_sde,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lcm,
    sample_unipc,
)
from minigen.sampling.flow import FlowSchedule  # noqa: E402

CONFIGS = {
    "sd15": "runwayml/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
SHAPE = (2, 4, 8, 8)
STEPS = 10
TOL = 1e-4
KDPM2_NUMPY_WARNING = "ignore:__array_wrap__ must accept context:DeprecationWarning"  # diffusers' KDPM2, numpy 2


class ToyNet:
    """A deterministic stand-in for a UNet: out = W x_in + sin(t / 150) * b (+ context per channel)."""

    def __init__(self, channels: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weight = 0.9 * torch.eye(channels) + 0.2 * torch.randn(channels, channels, generator=g)
        self.bias = torch.randn(channels, generator=g)
        self.batch_sizes: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None, step: int | None = None) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        out = torch.einsum("oc,bchw->bohw", self.weight, x)
        out = out + torch.sin(t / 150).view(-1, 1, 1, 1) * self.bias.view(1, -1, 1, 1)
        if context is not None:
            out = out + context.view(*context.shape, 1, 1)
        return out


def load_config(shared_hf, name: str, prediction: str) -> dict:
    config = json.loads((shared_hf / CONFIGS[name] / "scheduler" / "scheduler_config.json").read_text())
    return {**config, "prediction_type": prediction}


def run_diffusers(scheduler, net, noise, *, steps=STEPS, timesteps=None, **step_kwargs) -> torch.Tensor:
    """The denoising loop of a diffusers pipeline, without CFG."""
    if timesteps is None:
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    return denoising_loop(scheduler, net, noise, **step_kwargs)


def denoising_loop(scheduler, net, noise, **step_kwargs) -> torch.Tensor:
    """run_diffusers after set_timesteps: for a scheduler whose state is set up in between."""
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = net(scheduler.scale_model_input(x, t), t.float().expand(x.shape[0]))
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


def assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    diff = (ours - reference).abs().max().item()
    assert diff <= TOL, f"max abs diff {diff:.2e} > {TOL} (reference std {reference.std():.3f})"


def vp_scale(sigma: torch.Tensor) -> float:
    """sqrt(sigma^2 + 1): DDIM, DPM-Solver and Euler-"leading" start from noise times this."""
    return math.sqrt(sigma.item() ** 2 + 1)


# -- schedules ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_official_configs_read_as_the_sd_schedule(shared_hf, name):
    """SD1.5's and SDXL's scheduler_config.json are both the default DiscreteSchedule (leading, offset 1)."""
    config = load_config(shared_hf, name, "epsilon")
    assert DiscreteSchedule.from_diffusers_config(config) == DiscreteSchedule()


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 4, 10, 20, 25, 48, 50, 96, 100])
def test_timesteps_and_sigmas_match_diffusers(spacing, n):
    """Timesteps equal EulerDiscreteScheduler's and DDIMScheduler's (atol 1e-4, float vs int); sigmas equal
    Euler's at integer timesteps (rtol 5e-5: diffusers multiplies alphas_cumprod up in float32, 1.3e-5 off
    at t = 0, where we use float64). Euler interpolates sigma linearly between training steps where
    we interpolate log-sigma: at fractional "linspace" timesteps the two differ by < 0.1% relative."""
    schedule = DiscreteSchedule(timestep_spacing=spacing)
    kwargs = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    euler = diffusers.EulerDiscreteScheduler(timestep_spacing=spacing, **kwargs)
    euler.set_timesteps(n)
    torch.testing.assert_close(schedule.timesteps(n), euler.timesteps.double(), atol=1e-4, rtol=0)
    if spacing != "linspace":  # DDIM rounds "linspace" timesteps to integers, Euler does not
        ddim = diffusers.DDIMScheduler(timestep_spacing=spacing, **kwargs)
        ddim.set_timesteps(n)
        assert schedule.timesteps(n).long().tolist() == ddim.timesteps.tolist()

    ours, theirs = schedule.sigmas(n), euler.sigmas
    integer = schedule.timesteps(n) == schedule.timesteps(n).round()
    torch.testing.assert_close(ours[:-1][integer], theirs[:-1][integer], rtol=5e-5, atol=0)
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=0)


@pytest.mark.parametrize("beta_schedule, beta_start, beta_end", [("scaled_linear", 0.00085, 0.012), ("linear", 0.0001, 0.02)])
def test_float32_precision_is_diffusers_schedule_exactly(beta_schedule, beta_start, beta_end):
    """Reference: diffusers' DDIMScheduler and EulerDiscreteScheduler. precision="float32" gives their
    alphas_cumprod bit for bit and their sigmas to float32 rounding (relative 2e-7); the float64 default
    differs from them by more (the exact schedule: abar ~0.999 in float32 costs sigma ~1e-5 near t = 0)."""
    kw = dict(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end)
    ddim = diffusers.DDIMScheduler(**kw)
    euler = diffusers.EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1, **kw)
    euler.set_timesteps(20)
    relative = {}
    for precision in ("float32", "float64"):
        schedule = DiscreteSchedule(precision=precision, **kw)
        relative[precision] = float(((schedule.sigmas(20) - euler.sigmas)[:-1].abs() / euler.sigmas[:-1]).max())
    assert torch.equal(DiscreteSchedule(precision="float32", **kw).alphas_cumprod().float(), ddim.alphas_cumprod)
    assert relative["float32"] < 2e-7 < 1e-6 < relative["float64"]
    with pytest.raises(ValueError, match="precision"):
        DiscreteSchedule(precision="float16")


def test_trailing_keeps_n_steps_where_numpy_arange_overshoots():
    """np.arange(1000, 0, -1000/61) has 62 entries (diffusers then visits t = -1); we keep exactly n:
    diffusers' first 61 trailing timesteps (DDIMScheduler, timestep_spacing="trailing"), each equal."""
    timesteps = DiscreteSchedule(timestep_spacing="trailing").timesteps(61)
    ddim = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
    ddim.set_timesteps(61)
    assert len(ddim.timesteps) == 62 and ddim.timesteps[-1] == -1
    assert timesteps.tolist() == ddim.timesteps[:61].tolist()


def test_karras_sigmas_match_diffusers_dpm_solver():
    """karras_sigmas over the training range equal DPMSolverMultistepScheduler(use_karras_sigmas) sigmas."""
    schedule = DiscreteSchedule()
    dpm = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True
    )
    dpm.set_timesteps(STEPS)
    torch.testing.assert_close(karras_sigmas(STEPS, schedule.sigma_min, schedule.sigma_max), dpm.sigmas)
    assert schedule.sigma_min == pytest.approx(0.029168, rel=1e-4)
    assert schedule.sigma_max == pytest.approx(14.614642, rel=1e-6)


@pytest.mark.parametrize(
    "make_sigmas",
    [
        *(lambda n, s=s: DiscreteSchedule(timestep_spacing=s).sigmas(n) for s in ["leading", "trailing", "linspace"]),
        lambda n: DiscreteSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02).sigmas(n),
        lambda n: karras_sigmas(n, 0.0292, 14.6146),
    ],
    ids=["leading", "trailing", "linspace", "linear-betas", "karras"],
)
@pytest.mark.parametrize("n", [1, 2, 10, 37, 999])
def test_sigmas_decrease_and_end_in_zero(make_sigmas, n):
    sigmas = make_sigmas(n)
    assert sigmas.shape == (n + 1,) and sigmas.dtype == torch.float32
    assert sigmas[-1] == 0
    assert (sigmas.diff() < 0).all()


def test_sigma_to_t_is_exact_on_training_steps_and_inverts_t_to_sigma():
    schedule = DiscreteSchedule(timestep_spacing="trailing")
    sigmas = schedule.sigmas(50)[:-1]
    assert torch.equal(schedule.sigma_to_t(sigmas), schedule.timesteps(50).float())
    t = torch.tensor([0.0, 0.25, 17.5, 500.3, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(t).float()), t.float(), atol=2e-3, rtol=0)


def test_schedule_rejects_bad_input_with_clear_messages():
    with pytest.raises(ValueError, match="timestep_spacing must be one of 'leading', 'trailing', 'linspace'"):
        DiscreteSchedule(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DiscreteSchedule(prediction_type="v_prediction")
    for steps in (0, 1.5, True):  # 1.5 spaced 1.5 steps (sigmas neither of 1 nor of 2 steps)
        with pytest.raises(ValueError, match=r"number of steps must be a whole number, 1..1000 \(num_train_timesteps\); got"):
            DiscreteSchedule().timesteps(steps)
    with pytest.raises(ValueError, match="reaches timestep 1000 > 999.*timestep_spacing='trailing'"):
        DiscreteSchedule().timesteps(1000)
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        DiscreteSchedule.from_diffusers_config({"prediction_type": "sample"})
    with pytest.raises(ValueError, match="rescale_betas_zero_snr is not supported"):
        DiscreteSchedule.from_diffusers_config({"rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
        karras_sigmas(10, 15.0, 1.0)
    for timesteps, shown in (("999", "'999'"), ([[999]], r"\[\[999\]\]"), ([999, None], r"\[999, None\]")):  # a bare TypeError; [[999]] shown as [999.0]
        with pytest.raises(ValueError, match=rf"timesteps must be strictly decreasing numbers in 0..999, .*; got {shown}$"):
            DiscreteSchedule().sigmas_at(timesteps)
    for shift in (float("nan"), float("inf")):  # gave NaN sigmas
        with pytest.raises(ValueError, match=rf"shift must be > 0 \(1 leaves the sigmas unchanged\), got {shift}"):
            FlowSchedule(dynamic=False, shift=shift).sigmas(3, 100)


# -- denoisers ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_denoiser_recovers_x0_from_an_oracle_network(prediction):
    """A network that returns the true eps (or v) for the scaled input makes D(x, sigma) equal x0."""
    schedule = DiscreteSchedule(prediction_type=prediction)
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    sigma = schedule.sigmas(STEPS)[[0, 6]]  # one sigma per sample, [2]
    s = sigma.view(-1, 1, 1, 1)
    x = x0 + s * eps

    def oracle(x_in, t, step=None):
        torch.testing.assert_close(x_in, x / (s**2 + 1).sqrt())
        assert t.tolist() == [901.0, 301.0]
        abar = 1 / (s**2 + 1)
        return eps if prediction == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * x0

    torch.testing.assert_close(DiscreteDenoiser(oracle, schedule)(x, sigma), x0, atol=1e-5, rtol=0)


def test_denoiser_rounds_timesteps_on_request():
    """sigma = 3 lies between training steps; round_timesteps=True gives the network the nearest integer t."""
    seen = []

    def net(x_in, t, step=None):
        seen.append(t)
        return x_in

    schedule, x, sigma = DiscreteSchedule(), torch.randn(SHAPE), torch.tensor(3.0)
    DiscreteDenoiser(net, schedule)(x, sigma)
    DiscreteDenoiser(net, schedule, round_timesteps=True)(x, sigma)
    exact, rounded = seen
    assert exact[0] != exact[0].round()
    assert torch.equal(rounded, exact.round())


def test_a_denoiser_over_a_network_stopped_early_says_so():
    """A UNet under Controls.stop_after returns None: the denoiser's formula failed on None * Tensor."""
    schedule, x, sigma = DiscreteSchedule(), torch.randn(SHAPE), torch.tensor(3.0)
    with pytest.raises(ValueError, match="the network returned None .*stop_after"):
        DiscreteDenoiser(lambda x_in, t, step=None: None, schedule)(x, sigma)


def test_cfg_runs_uncond_then_cond_in_one_batch():
    """Result is D(uncond) + cfg * (D(cond) - D(uncond)); extra args reach the network stacked, as given."""
    net, schedule = ToyNet(), DiscreteSchedule()
    denoiser = DiscreteDenoiser(net, schedule)
    x, sigma = torch.randn(SHAPE), torch.tensor(3.0)
    uncond_ctx, cond_ctx = torch.zeros(2, 4), torch.randn(2, 4)

    guided = ClassifierFreeGuidance(denoiser, cfg_scale=7.5)(x, sigma, context=torch.cat([uncond_ctx, cond_ctx]))
    assert net.batch_sizes == [4]

    uncond = denoiser(x, sigma, context=uncond_ctx)
    cond = denoiser(x, sigma, context=cond_ctx)
    torch.testing.assert_close(guided, uncond + 7.5 * (cond - uncond))


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_cfg_rescale_matches_diffusers_rescale_noise_cfg(prediction):
    """CFG rescale 0.7 on the denoised values against diffusers' rescale_noise_cfg on the network's outputs
    (eps or v; guidance_rescale in StableDiffusionPipeline), converted to x0 with the denoiser's own formula
    (fp32, atol 1e-5); rescale 0 is plain CFG, and 0.7 moves it."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    net, schedule = ToyNet(), DiscreteSchedule(prediction_type=prediction)
    denoiser = DiscreteDenoiser(net, schedule)
    x, sigma = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)), torch.tensor([3.0, 0.4])
    context = torch.cat([torch.zeros(2, 4), torch.randn(2, 4, generator=torch.Generator().manual_seed(4))])
    s = sigma.view(-1, 1, 1, 1)
    t = schedule.sigma_to_t(sigma)
    x_in = x / (s**2 + 1).sqrt()
    out_uncond, out_cond = net(x_in, t, context[:2]), net(x_in, t, context[2:])
    out = rescale_noise_cfg(out_uncond + 7.5 * (out_cond - out_uncond), out_cond, guidance_rescale=0.7)
    expected = x - s * out if prediction == "epsilon" else x / (s**2 + 1) - s / (s**2 + 1).sqrt() * out

    rescaled = ClassifierFreeGuidance(denoiser, 7.5, rescale=0.7, prediction_type=prediction)(x, sigma, context=context)
    torch.testing.assert_close(rescaled, expected, atol=1e-5, rtol=0)
    plain = ClassifierFreeGuidance(denoiser, 7.5, rescale=0.0, prediction_type=prediction)(x, sigma, context=context)
    torch.testing.assert_close(plain, ClassifierFreeGuidance(denoiser, 7.5)(x, sigma, context=context), atol=0, rtol=0)
    assert (rescaled - plain).abs().max() > 0.1
    with pytest.raises(ValueError, match=r"the CFG rescale must be in \[0, 1\]"):
        ClassifierFreeGuidance(denoiser, 7.5, rescale=1.5, prediction_type=prediction)
    with pytest.raises(ValueError, match="give prediction_type 'epsilon' or 'v'"):
        ClassifierFreeGuidance(denoiser, 7.5, rescale=0.7)


def test_cfg_rescale_leaves_a_flat_prediction_finite():
    """A network that predicts the same value everywhere (u_cfg flat: std 0) is left as plain CFG gives
    it, where diffusers' formula divides 0 by 0."""
    denoiser = DiscreteDenoiser(lambda x, t, context=None, step=None: torch.zeros_like(x), DiscreteSchedule())
    x, sigma = torch.zeros(SHAPE), torch.tensor(3.0)
    rescaled = ClassifierFreeGuidance(denoiser, 7.5, rescale=0.7, prediction_type="epsilon")(x, sigma)
    assert torch.equal(rescaled, ClassifierFreeGuidance(denoiser, 7.5)(x, sigma))


def test_denoiser_rejects_sigma_of_wrong_shape():
    with pytest.raises(ValueError, match=r"sigma must be a scalar or have shape \[batch\] = \[2\], got shape \[3\]"):
        DiscreteDenoiser(ToyNet(), DiscreteSchedule())(torch.randn(SHAPE), torch.ones(3))


# -- samplers: parity with diffusers -----------------------------------------------------------------------


@pytest.fixture(params=["sd15", "sdxl"])
def config_name(request):
    return request.param


@pytest.fixture(params=["epsilon", "v_prediction"])
def prediction(request):
    return request.param


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_matches_diffusers(shared_hf, config_name, prediction, set_alpha_to_one):
    """sample_ddim (eta 0) vs DDIMScheduler from the official config: max abs diff <= 1e-4.

    With set_alpha_to_one=False (the configs' value) diffusers stops at sigma_min instead of 0 and returns the
    variance-preserving latent there; we end the sigmas there too and rescale."""
    config = load_config(shared_hf, config_name, prediction)
    schedule = DiscreteSchedule.from_diffusers_config(config)
    net, noise = ToyNet(), torch.randn(SHAPE)
    reference = run_diffusers(
        diffusers.DDIMScheduler.from_config(config, set_alpha_to_one=set_alpha_to_one), net, noise
    )

    sigmas = schedule.sigmas(STEPS)
    if not set_alpha_to_one:
        sigmas[-1] = schedule.sigma_min
    x = sample_ddim(DiscreteDenoiser(net, schedule), noise * vp_scale(sigmas[0]), sigmas, disable=True)
    assert_close(x / vp_scale(sigmas[-1]), reference)


def test_ddim_with_eta_matches_diffusers(shared_hf, config_name, prediction):
    """sample_ddim(eta=0.7) vs DDIMScheduler.step(eta=0.7), both drawing from CPU generators seeded alike."""
    config = load_config(shared_hf, config_name, prediction)
    schedule = DiscreteSchedule.from_diffusers_config(config)
    net, noise = ToyNet(), torch.randn(SHAPE)
    scheduler = diffusers.DDIMScheduler.from_config(config)
    reference = run_diffusers(scheduler, net, noise, eta=0.7, generator=torch.Generator().manual_seed(1))

    sigmas = schedule.sigmas(STEPS)
    sigmas[-1] = schedule.sigma_min  # set_alpha_to_one=False, see test_ddim_matches_diffusers
    x = sample_ddim(
        DiscreteDenoiser(net, schedule),
        noise * vp_scale(sigmas[0]),
        sigmas,
        eta=0.7,
        generator=torch.Generator().manual_seed(1),
        disable=True,
    )
    assert_close(x / vp_scale(sigmas[-1]), reference)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_matches_diffusers(shared_hf, config_name, prediction, spacing):
    """sample_euler vs EulerDiscreteScheduler, with the starting-noise scale of the samplers.py table."""
    config = {**load_config(shared_hf, config_name, prediction), "timestep_spacing": spacing}
    schedule = DiscreteSchedule.from_diffusers_config(config)
    net, noise = ToyNet(), torch.randn(SHAPE)
    reference = run_diffusers(diffusers.EulerDiscreteScheduler.from_config(config), net, noise)

    sigmas = schedule.sigmas(STEPS)
    scale = vp_scale(sigmas[0]) if spacing == "leading" else sigmas[0]
    x = sample_euler(DiscreteDenoiser(net, schedule), noise * scale, sigmas, disable=True)
    assert_close(x, reference)


def test_euler_ancestral_matches_diffusers(shared_hf, config_name, prediction):
    """sample_euler_ancestral vs EulerAncestralDiscreteScheduler: once with a generator seeded like diffusers',
    once with a noise_sampler that replays the noise diffusers draws."""
    config = load_config(shared_hf, config_name, prediction)
    schedule = DiscreteSchedule.from_diffusers_config(config)
    net, noise = ToyNet(), torch.randn(SHAPE)
    scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(config, timestep_spacing="leading")
    reference = run_diffusers(scheduler, net, noise, generator=torch.Generator().manual_seed(2))

    sigmas = schedule.sigmas(STEPS)
    denoiser, x_T = DiscreteDenoiser(net, schedule), noise * vp_scale(sigmas[0])
    x = sample_euler_ancestral(denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(2), disable=True)
    assert_close(x, reference)

    replay = torch.Generator().manual_seed(2)
    noises = [torch.randn(SHAPE, generator=replay) for _ in range(STEPS)]
    x = sample_euler_ancestral(denoiser, x_T, sigmas, noise_sampler=lambda s, s_next: noises.pop(0), disable=True)
    assert_close(x, reference)
    assert len(noises) == 1  # no fresh noise on the last step onto sigma = 0


@pytest.mark.parametrize("karras", [False, True], ids=["config-timesteps", "karras"])
def test_dpmpp_2m_matches_diffusers(shared_hf, config_name, prediction, karras):
    """sample_dpmpp_2m vs DPMSolverMultistepScheduler(dpmsolver++, order 2).

    Without Karras sigmas diffusers is given our timesteps: its own "leading"/"linspace" divide by n + 1, a
    rule of that class only. With Karras sigmas it rounds the network's timesteps (round_timesteps=True)."""
    config = load_config(shared_hf, config_name, prediction)
    schedule = DiscreteSchedule.from_diffusers_config(config)
    net, noise = ToyNet(), torch.randn(SHAPE)
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras
    )
    if karras:
        reference = run_diffusers(scheduler, net, noise)
        sigmas = karras_sigmas(STEPS, schedule.sigma_min, schedule.sigma_max)
    else:
        reference = run_diffusers(scheduler, net, noise, timesteps=schedule.timesteps(STEPS).long().tolist())
        sigmas = schedule.sigmas(STEPS)
    denoiser = DiscreteDenoiser(net, schedule, round_timesteps=karras)
    x = sample_dpmpp_2m(denoiser, noise * vp_scale(sigmas[0]), sigmas, disable=True)
    assert_close(x, reference)


# -- samplers: properties ----------------------------------------------------------------------------------


def test_ddim_is_euler_and_euler_ancestral_in_other_words():
    """DDIM with eta 0 equals Euler; with eta 1 it equals Euler ancestral given the same noise (atol 1e-5)."""
    schedule = DiscreteSchedule()
    denoiser, sigmas = DiscreteDenoiser(ToyNet(), schedule), schedule.sigmas(STEPS)
    x_T = torch.randn(SHAPE) * sigmas[0]
    run = dict(disable=True)
    torch.testing.assert_close(sample_ddim(denoiser, x_T, sigmas, **run), sample_euler(denoiser, x_T, sigmas, **run))
    torch.testing.assert_close(
        sample_ddim(denoiser, x_T, sigmas, eta=1.0, generator=torch.Generator().manual_seed(3), **run),
        sample_euler_ancestral(denoiser, x_T, sigmas, generator=torch.Generator().manual_seed(3), **run),
        atol=1e-5,
        rtol=0,
    )


class UnitGaussianNet:
    """The exact eps- or v-predictor, as a network of (x_in, t), for latents x0 ~ N(0, 1).

    For such data the ideal denoiser is D(x, sigma) = x / (sigma^2 + 1), hence eps = sigma / sqrt(sigma^2 + 1)
    * x_in, and v = 0 (by symmetry the network cannot tell signal from noise)."""

    def __init__(self, schedule: DiscreteSchedule) -> None:
        self.schedule = schedule

    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, step: int | None = None) -> torch.Tensor:
        if self.schedule.prediction_type == "v":
            return torch.zeros_like(x_in)
        sigma = self.schedule.t_to_sigma(t).float().view(-1, 1, 1, 1)
        return sigma / (sigma**2 + 1).sqrt() * x_in


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddim_inversion_then_sampling_reconstructs_the_clean_latent(prediction):
    """Invert a clean latent x0 ~ N(0, 1) of UnitGaussianNet over 50 steps and sample back with sample_ddim:
    max abs error < 5e-3, rms error < 1.5e-3 (measured 2.8e-3 and 8e-4). The error is second order: 10 steps
    leave a 15x larger one. The inverted latent has std close to sigma_max."""
    schedule = DiscreteSchedule(prediction_type=prediction)
    denoiser = DiscreteDenoiser(UnitGaussianNet(schedule), schedule)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))

    def round_trip(n):
        sigmas = schedule.sigmas(n)
        x_T = sample_ddim_inversion(denoiser, x0, sigmas.flip(0), disable=True)
        assert 0.8 * sigmas[0] < x_T.std() < 1.25 * sigmas[0]
        return sample_ddim(denoiser, x_T, sigmas, disable=True) - x0

    error = round_trip(50)
    assert error.abs().max() < 5e-3
    assert error.pow(2).mean().sqrt() < 1.5e-3
    assert round_trip(10).abs().max() > 15 * error.abs().max()


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_inversion_matches_diffusers(shared_hf, set_alpha_to_one):
    """sample_ddim_inversion vs DDIMInverseScheduler (SD1.5 config, epsilon, ToyNet, 10 steps): max abs
    diff <= 1e-4 after rescaling to diffusers' variance-preserving latent; set_alpha_to_one=False starts the
    inversion at sigma_min instead of 0."""
    config = load_config(shared_hf, "sd15", "epsilon")
    schedule = DiscreteSchedule.from_diffusers_config(config)
    net, x0 = ToyNet(), torch.randn(SHAPE)
    inverse = diffusers.DDIMInverseScheduler.from_config(config, set_alpha_to_one=set_alpha_to_one)
    inverse.set_timesteps(STEPS)
    reference = x0
    for t in inverse.timesteps:
        reference = inverse.step(net(reference, t.float().expand(SHAPE[0])), t, reference).prev_sample

    sigmas = schedule.sigmas(STEPS).flip(0)
    if not set_alpha_to_one:
        sigmas[0] = schedule.sigma_min
    x = sample_ddim_inversion(DiscreteDenoiser(net, schedule), x0 * vp_scale(sigmas[0]), sigmas, disable=True)
    assert_close(x / vp_scale(sigmas[-1]), reference)


@pytest.mark.parametrize("name", [*SAMPLERS, "ddim_inversion"])
def test_every_sampler_shares_the_signature_and_reports_each_step(name):
    schedule = DiscreteSchedule()
    sigmas = schedule.sigmas(4)
    if name == "ddim_inversion":
        sigmas = sigmas.flip(0)
    seen = []
    x = SAMPLERS.get(name, sample_ddim_inversion)(
        DiscreteDenoiser(ToyNet(), schedule),
        torch.randn(SHAPE),
        sigmas,
        extra_args={"context": torch.ones(2, 4)},
        callback=seen.append,
        disable=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert x.shape == SHAPE and torch.isfinite(x).all()
    assert [step["i"] for step in seen] == [0, 1, 2, 3]
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_next", "denoised"}
    assert seen[1]["sigma"] == sigmas[1] and seen[1]["sigma_next"] == sigmas[2]


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "lcm"])
def test_stochastic_samplers_are_reproducible_from_a_generator(name):
    schedule = DiscreteSchedule()
    denoiser, sigmas = DiscreteDenoiser(ToyNet(), schedule), schedule.sigmas(STEPS)
    x_T = torch.randn(SHAPE) * sigmas[0]

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return SAMPLERS[name](denoiser, x_T, sigmas, generator=generator, disable=True)

    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))


@pytest.mark.parametrize("name", ["euler_ancestral", "ddim", "dpmpp_2m_sde", "dpmpp_sde", "lcm"])
def test_one_generator_per_row_makes_each_row_its_own_single_run(name):
    """generator=[g_0, ..., g_{B-1}]: row k's fresh noise comes from g_k alone, so row k equals a batch of one
    run with g_k (atol 1e-6: ToyNet is row-wise, only the noise source could differ). A list of the wrong
    length is refused."""
    schedule = DiscreteSchedule()
    denoiser, sigmas = DiscreteDenoiser(ToyNet(), schedule), schedule.sigmas(STEPS)
    x_T = torch.randn(SHAPE) * sigmas[0]
    options = dict(eta=1.0) if name == "ddim" else {}

    def run(x, seeds):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return SAMPLERS[name](denoiser, x, sigmas, generator=generators, disable=True, **options)

    seeds = [7 + k for k in range(SHAPE[0])]
    batch = run(x_T, seeds)
    singles = torch.cat([run(x_T[k : k + 1], [seed]) for k, seed in enumerate(seeds)])
    torch.testing.assert_close(batch, singles, atol=1e-6, rtol=0)
    one = SAMPLERS[name](denoiser, x_T[:1], sigmas, generator=torch.Generator().manual_seed(7), disable=True, **options)
    assert torch.equal(one, singles[:1])  # a list of one generator is that generator
    with pytest.raises(ValueError, match="one generator per batch row: got 1 generators for a batch of 2"):
        run(x_T, seeds[:1])


def test_samplers_reject_bad_input_with_clear_messages():
    schedule = DiscreteSchedule()
    denoiser, sigmas, x = DiscreteDenoiser(ToyNet(), schedule), schedule.sigmas(4), torch.randn(SHAPE)
    with pytest.raises(ValueError, match="strictly decreasing sigmas.*use sample_ddim_inversion"):
        sample_euler(denoiser, x, sigmas.flip(0), disable=True)
    with pytest.raises(ValueError, match=r"strictly increasing sigmas.*schedule.sigmas\(n\).flip\(0\)"):
        sample_ddim_inversion(denoiser, x, sigmas, disable=True)
    with pytest.raises(ValueError, match="1-D tensor of at least 2 sigmas"):
        sample_dpmpp_2m(denoiser, x, sigmas[:1], disable=True)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        sample_ddim(denoiser, x, sigmas, eta=-0.5, disable=True)
    with pytest.raises(ValueError, match="either generator or noise_sampler, not both"):
        sample_euler_ancestral(
            denoiser, x, sigmas, generator=torch.Generator(), noise_sampler=lambda s, t: x, disable=True
        )
    with pytest.raises(TypeError, match="eta"):
        sample_euler(denoiser, x, sigmas, eta=0.5, disable=True)


def test_schedule_is_a_frozen_dataclass():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DiscreteSchedule().steps_offset = 0


# -- the samplers of A1111's menu: parity with diffusers ---------------------------------------------------
#
# Each *_pair function runs one sampler and its diffusers scheduler on the same network and starting noise
# (and the same fresh noise) and returns (ours, reference); the parity tests run them on ToyNet for both
# prediction types, test_samplers_match_diffusers_on_a_tiny_unet on a random diffusers UNet.


def euler_like(config: dict, kind: str):
    """Scheduler options, our schedule, sigmas and starting-noise scale for Heun, KDPM2 and DPMSolverSDE.

    `kind` is a spacing ("leading", "trailing") or "karras": those classes span Karras sigmas over their spacing's
    first and last timestep, which is the training range with "linspace"."""
    spacing = "linspace" if kind == "karras" else kind
    schedule = DiscreteSchedule.from_diffusers_config({**config, "timestep_spacing": spacing})
    options = dict(timestep_spacing=spacing, use_karras_sigmas=kind == "karras")
    if kind == "karras":
        sigmas = karras_sigmas(STEPS, schedule.sigma_min, schedule.sigma_max)
        return options, schedule, sigmas, sigmas[0]
    sigmas = schedule.sigmas(STEPS)
    return options, schedule, sigmas, vp_scale(sigmas[0]) if kind == "leading" else sigmas[0]


def heun_pair(config, net, noise, kind="leading"):
    options, schedule, sigmas, scale = euler_like(config, kind)
    reference = run_diffusers(diffusers.HeunDiscreteScheduler.from_config(config, **options), net, noise)
    return sample_heun(DiscreteDenoiser(net, schedule), noise * scale, sigmas, disable=True), reference


def dpm_2_pair(config, net, noise, kind="leading"):
    """KDPM2 with Karras sigmas rounds the timesteps of its steps but not those of its midpoints."""
    options, schedule, sigmas, scale = euler_like(config, kind)
    reference = run_diffusers(diffusers.KDPM2DiscreteScheduler.from_config(config, **options), net, noise)
    exact, rounded = DiscreteDenoiser(net, schedule), DiscreteDenoiser(net, schedule, round_timesteps=True)
    steps = set(sigmas.tolist())

    def denoiser(x, sigma, step=None):
        return (rounded if kind == "karras" and sigma[0].item() in steps else exact)(x, sigma, step=step)

    return sample_dpm_2(denoiser, noise * scale, sigmas, disable=True), reference


def dpmpp_2m_sde_pair(config, net, noise, karras=False, solver_type="midpoint"):
    """Both draw the fresh noise from CPU generators seeded alike (diffusers draws one on the last step too,
    unused). Without Karras sigmas diffusers is given our timesteps, as in test_dpmpp_2m_matches_diffusers."""
    schedule = DiscreteSchedule.from_diffusers_config(config)
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="sde-dpmsolver++", solver_order=2, solver_type=solver_type, use_karras_sigmas=karras
    )
    if karras:
        sigmas = karras_sigmas(STEPS, schedule.sigma_min, schedule.sigma_max)
        reference = run_diffusers(scheduler, net, noise, generator=torch.Generator().manual_seed(3))
    else:
        sigmas = schedule.sigmas(STEPS)
        timesteps = schedule.timesteps(STEPS).long().tolist()
        reference = run_diffusers(scheduler, net, noise, timesteps=timesteps, generator=torch.Generator().manual_seed(3))
    x = sample_dpmpp_2m_sde(
        DiscreteDenoiser(net, schedule, round_timesteps=karras),
        noise * vp_scale(sigmas[0]),
        sigmas,
        solver_type=solver_type,
        generator=torch.Generator().manual_seed(3),
        disable=True,
    )
    return x, reference


def dpm_solver_sde_class():
    """diffusers' DPMSolverSDEScheduler. Its module imports torchsde for the BrownianTree noise sampler only,
    which these tests replace; where torchsde is not installed, a stand-in module lets the class load."""
    with pytest.MonkeyPatch.context() as patch:
        if importlib.util.find_spec("torchsde") is None:
            patch.setitem(sys.modules, "torchsde", types.ModuleType("torchsde"))
        return importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_sde").DPMSolverSDEScheduler


def dpmpp_sde_pair(config, net, noise, kind="leading"):
    """diffusers' noise_sampler is replaced by one that records its calls (sigma, sigma_next) and draws; ours
    replays the draws and checks that it asks for the same noise levels in the same order (rtol 1e-4: the
    schedulers' sigmas come from float32 alphas)."""
    options, schedule, sigmas, scale = euler_like(config, kind)
    scheduler = dpm_solver_sde_class().from_config(config, **options)
    scheduler.set_timesteps(STEPS)
    generator, draws = torch.Generator().manual_seed(4), []

    def record(sigma, sigma_next):
        draws.append((float(sigma), float(sigma_next), torch.randn(noise.shape, generator=generator)))
        return draws[-1][2]

    scheduler.noise_sampler = record
    reference = denoising_loop(scheduler, net, noise)
    assert len(draws) == 2 * (STEPS - 1)  # two per step, none onto sigma = 0
    replay = iter(draws)

    def replay_noise(sigma, sigma_next):
        expected_sigma, expected_sigma_next, noise = next(replay)
        assert float(sigma) == pytest.approx(expected_sigma, rel=1e-4)
        assert float(sigma_next) == pytest.approx(expected_sigma_next, rel=1e-4)
        return noise

    x = sample_dpmpp_sde(DiscreteDenoiser(net, schedule), noise * scale, sigmas, noise_sampler=replay_noise, disable=True)
    return x, reference


def unipc_pair(config, net, noise, karras=False, variant="bh2"):
    """UniPC's own "leading" divides by n + 1; its "trailing" is ours. diffusers' "bh1" onto sigma = 0 gives NaN
    (B(h) = -h is -inf there, times 0), so "bh1" is compared ending at sigma_min (final_sigmas_type)."""
    final = "zero" if variant == "bh2" else "sigma_min"
    scheduler = diffusers.UniPCMultistepScheduler.from_config(
        config, timestep_spacing="trailing", solver_type=variant, use_karras_sigmas=karras, final_sigmas_type=final
    )
    reference = run_diffusers(scheduler, net, noise)
    schedule = DiscreteSchedule.from_diffusers_config({**config, "timestep_spacing": "trailing"})
    sigmas = karras_sigmas(STEPS, schedule.sigma_min, schedule.sigma_max) if karras else schedule.sigmas(STEPS)
    if final == "sigma_min":
        sigmas[-1] = schedule.sigma_min
    denoiser = DiscreteDenoiser(net, schedule, round_timesteps=karras)
    x = sample_unipc(denoiser, noise * vp_scale(sigmas[0]), sigmas, variant=variant, disable=True)
    return x / vp_scale(sigmas[-1]), reference


def lcm_pair(config, net, noise, steps=4):
    schedule = DiscreteSchedule.from_diffusers_config(config)
    scheduler = diffusers.LCMScheduler.from_config(config)
    reference = run_diffusers(scheduler, net, noise, steps=steps, generator=torch.Generator().manual_seed(5))
    sigmas = lcm_sigmas(schedule, steps)
    x_T = noise * vp_scale(sigmas[0])
    x = sample_lcm(DiscreteDenoiser(net, schedule), x_T, sigmas, generator=torch.Generator().manual_seed(5), disable=True)
    return x, reference


def check_pair(pair, shared_hf, prediction, **options) -> None:
    """Run `pair` on ToyNet with the SD1.5 config (SDXL's has the same schedule) and compare: <= 1e-4."""
    net, noise = ToyNet(), torch.randn(SHAPE)
    assert_close(*pair(load_config(shared_hf, "sd15", prediction), net, noise, **options))


@pytest.mark.parametrize("kind", ["leading", "trailing", "karras"])
def test_heun_matches_diffusers(shared_hf, prediction, kind):
    """sample_heun vs HeunDiscreteScheduler (max abs diff <= 1e-4, measured <= 1.9e-6)."""
    check_pair(heun_pair, shared_hf, prediction, kind=kind)


@pytest.mark.filterwarnings(KDPM2_NUMPY_WARNING)
@pytest.mark.parametrize("kind", ["leading", "trailing", "karras"])
def test_dpm_2_matches_diffusers(shared_hf, prediction, kind):
    """sample_dpm_2 vs KDPM2DiscreteScheduler (max abs diff <= 1e-4, measured <= 2.2e-6)."""
    check_pair(dpm_2_pair, shared_hf, prediction, kind=kind)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("karras", [False, True], ids=["timesteps", "karras"])
def test_dpmpp_2m_sde_matches_diffusers(shared_hf, prediction, karras, solver_type):
    """sample_dpmpp_2m_sde vs DPMSolverMultistepScheduler(sde-dpmsolver++, order 2), same generator seed
    (max abs diff <= 1e-4, measured <= 1.6e-5)."""
    check_pair(dpmpp_2m_sde_pair, shared_hf, prediction, karras=karras, solver_type=solver_type)


@pytest.mark.parametrize("kind", ["leading", "trailing", "karras"])
def test_dpmpp_sde_matches_diffusers_given_its_noise(shared_hf, prediction, kind):
    """sample_dpmpp_sde vs DPMSolverSDEScheduler with diffusers' draws replayed (max abs diff <= 1e-4,
    measured <= 5.3e-6)."""
    check_pair(dpmpp_sde_pair, shared_hf, prediction, kind=kind)


@pytest.mark.parametrize("karras, variant", [(False, "bh2"), (True, "bh2"), (False, "bh1")])
def test_unipc_matches_diffusers(shared_hf, prediction, karras, variant):
    """sample_unipc vs UniPCMultistepScheduler(solver_order=2) (max abs diff <= 1e-4, measured <= 2.9e-6)."""
    check_pair(unipc_pair, shared_hf, prediction, karras=karras, variant=variant)


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_lcm_matches_diffusers(shared_hf, prediction, steps):
    """sample_lcm on lcm_sigmas vs LCMScheduler, same generator seed (max abs diff <= 1e-4, measured <= 1.1e-5)."""
    check_pair(lcm_pair, shared_hf, prediction, steps=steps)


@pytest.mark.parametrize("original_steps, steps", [(50, n) for n in (1, 2, 3, 4, 6, 8, 10, 25, 50)] + [(30, 22), (30, 26)])
def test_lcm_sigmas_are_the_timesteps_of_lcm_scheduler(original_steps, steps):
    """Exactly LCMScheduler's timesteps; (30, 22) and (30, 26) are where its float index rounds down past an
    integer (15 -> 14)."""
    schedule = DiscreteSchedule()
    scheduler = diffusers.LCMScheduler(original_inference_steps=original_steps)
    scheduler.set_timesteps(steps)
    assert schedule.sigma_to_t(lcm_sigmas(schedule, steps, original_steps)[:-1]).tolist() == scheduler.timesteps.tolist()


class TinyUNet:
    """A network of (x_in, t) that is nonlinear in x: the exact noise predictor of N(0, 1) latents (see
    UnitGaussianNet) plus 0.3 times a random diffusers UNet (conftest's sd15-like) on a fixed random context.
    The UNet alone is so poor a denoiser that final latents reach +-100; with the exact part they stay O(1)."""

    def __init__(self) -> None:
        self.unet = tiny_diffusers_unet()
        self.context = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(6))
        self.schedule = DiscreteSchedule()

    @torch.no_grad()
    def __call__(self, x_in: torch.Tensor, t: torch.Tensor, step: int | None = None) -> torch.Tensor:
        sigma = self.schedule.t_to_sigma(t).float().view(-1, 1, 1, 1)
        residual = self.unet(x_in, t, encoder_hidden_states=self.context.expand(len(x_in), -1, -1)).sample
        return sigma / (sigma**2 + 1).sqrt() * x_in + 0.3 * residual


@pytest.fixture(scope="module")
def tiny_unet():
    return TinyUNet()


@pytest.mark.filterwarnings(KDPM2_NUMPY_WARNING)
@pytest.mark.parametrize("pair", [heun_pair, dpm_2_pair, dpmpp_2m_sde_pair, dpmpp_sde_pair, unipc_pair, lcm_pair])
def test_samplers_match_diffusers_on_a_tiny_unet(shared_hf, tiny_unet, pair):
    """Each pair above with TinyUNet for ToyNet: SD1.5 config, epsilon, latents [1, 4, 16, 16], the pair's
    defaults. Reference final latents have std 1.1-1.7; max abs diff <= 1e-4 (measured <= 8.1e-6)."""
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    ours, reference = pair(load_config(shared_hf, "sd15", "epsilon"), tiny_unet, noise)
    assert reference.std() > 0.5
    assert_close(ours, reference)


# -- the new samplers: properties --------------------------------------------------------------------------


def test_dpmpp_2m_sde_without_noise_is_dpmpp_2m():
    """eta = 0 turns the SDE solver into the ODE solver: equal to sample_dpmpp_2m (atol 1e-5)."""
    schedule = DiscreteSchedule()
    denoiser, sigmas = DiscreteDenoiser(ToyNet(), schedule), schedule.sigmas(STEPS)
    x_T = torch.randn(SHAPE) * sigmas[0]
    sde = sample_dpmpp_2m_sde(denoiser, x_T, sigmas, eta=0.0, generator=torch.Generator(), disable=True)
    torch.testing.assert_close(sde, sample_dpmpp_2m(denoiser, x_T, sigmas, disable=True), atol=1e-5, rtol=0)


def test_brownian_increments_have_the_law_of_one_brownian_path():
    """z_mid and z_next are standard normal with correlation sqrt((sigma - sigma_mid) / (sigma - sigma_next)),
    as two queries of one Brownian path; over 200k samples each moment is within 0.01."""
    sigma, sigma_mid, sigma_next = torch.tensor(3.0), torch.tensor(1.2), torch.tensor(0.5)
    x = torch.zeros(2, 100_000)
    z_mid, z_next = brownian_increments(x, torch.Generator().manual_seed(8), sigma, sigma_mid, sigma_next)
    assert z_mid.shape == z_next.shape == x.shape
    assert abs(z_mid.var() - 1) < 0.01 and abs(z_next.var() - 1) < 0.01
    assert abs((z_mid * z_next).mean() - ((sigma - sigma_mid) / (sigma - sigma_next)).sqrt()) < 0.01


def test_new_samplers_reject_bad_options_with_clear_messages():
    schedule = DiscreteSchedule()
    denoiser, sigmas, x = DiscreteDenoiser(ToyNet(), schedule), schedule.sigmas(4), torch.randn(SHAPE)
    with pytest.raises(ValueError, match="variant must be 'bh1' or 'bh2'"):
        sample_unipc(denoiser, x, sigmas, variant="bh3", disable=True)
    with pytest.raises(ValueError, match="solver_type must be 'midpoint' or 'heun'"):
        sample_dpmpp_2m_sde(denoiser, x, sigmas, solver_type="euler", disable=True)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        sample_dpmpp_2m_sde(denoiser, x, sigmas, eta=-1.0, disable=True)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        sample_dpmpp_sde(denoiser, x, sigmas, eta=-1.0, disable=True)
    with pytest.raises(ValueError, match="either generator or noise_sampler, not both"):
        sample_dpmpp_sde(denoiser, x, sigmas, generator=torch.Generator(), noise_sampler=lambda s, t: x, disable=True)
    with pytest.raises(ValueError, match="strictly decreasing sigmas"):
        sample_heun(denoiser, x, sigmas.flip(0), disable=True)
    with pytest.raises(ValueError, match="LCM takes 1..50 steps"):
        lcm_sigmas(schedule, 51)


# -- sampler names: A1111's words and the command line -----------------------------------------------------


@pytest.fixture(scope="module")
def sample_script():
    return load_sample_script()


@pytest.mark.parametrize(
    "given, sampler, karras",
    [
        ("DPM++ 2M Karras", "dpmpp_2m", True),
        ("dpm++ 2m sde karras", "dpmpp_2m_sde", True),
        ("DPM++ SDE Karras", "dpmpp_sde", True),
        ("DPM++ 2M SDE", "dpmpp_2m_sde", False),
        ("Heun", "heun", False),
        ("DPM2 Karras", "dpm_2", True),
        ("UniPC", "unipc", False),
        ("LCM", "lcm", False),
        ("Euler a", "euler_ancestral", False),
        ("euler  A", "euler_ancestral", False),
        ("DDIM", "ddim", False),
        ("dpmpp_2m karras", "dpmpp_2m", True),
        ("DPMPP_SDE", "dpmpp_sde", False),
    ],
)
def test_cli_takes_a1111_sampler_names_in_any_case(sample_script, given, sampler, karras):
    args = sample_script.parse_args(["--prompt", "p", "--sampler", given])
    assert (args.sampler, args.karras) == (sampler, karras)


def test_every_sampler_has_an_a1111_name_that_the_cli_reads_back(sample_script):
    """The PNG's `Sampler: DPM++ 2M SDE Karras` names the sampler, and --sampler takes that text back."""
    for name in SAMPLERS:
        assert name in A1111_SAMPLERS
        for karras in (False, True):
            words = a1111_sampler(name + (" karras" if karras else ""))
            args = sample_script.parse_args(["--prompt", "p", "--sampler", words])
            assert (args.sampler, args.karras) == (name, karras)
    assert a1111_sampler("dpmpp_2m_sde karras") == "DPM++ 2M SDE Karras"


def test_cli_eta_only_for_samplers_that_take_it(sample_script, capsys):
    """--eta reaches the samplers with an eta option; any other refuses it in one line (exit 2), as does a
    negative eta."""
    assert sample_script.ETA_SAMPLERS == ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "ddim"]
    assert sample_script.parse_args(["--prompt", "p", "--sampler", "DDIM", "--eta", "0.5"]).eta == 0.5
    assert sample_script.parse_args(["--prompt", "p"]).eta is None
    for argv in (["--sampler", "heun", "--eta", "0.5"], ["--sampler", "ddim", "--eta", "-1"]):
        assert sample_script.run(["--prompt", "p", *argv]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0] == (
        "error: --eta: the heun sampler takes no eta; only euler_ancestral, dpmpp_2m_sde, dpmpp_sde, ddim do (see --help)"
    )
    assert errors[1].startswith("error: argument --eta: -1 is not a finite number of 0 or more")


def test_ddim_inversion_is_not_a_sampler_for_generation(sample_script, capsys):
    """DDIM inversion walks from an image up to noise: an API function, not in SAMPLERS nor a --sampler."""
    assert "ddim_inversion" not in SAMPLERS
    assert sample_script.run(["--prompt", "p", "--sampler", "ddim_inversion"]) == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'ddim_inversion'" in error and len(error.splitlines()) == 1


@pytest.mark.parametrize("field, value, message", [
    ("beta_end", 1.5, r"beta_start 0.00085 and beta_end 1.5: a DDPM schedule needs numbers with 0 < beta_start < beta_end < 1"),
    ("beta_start", float("nan"), r"beta_start nan and beta_end 0.012"),
    ("beta_start", -0.1, r"beta_start -0.1 and beta_end"),
    ("beta_start", 0.02, r"beta_start 0.02 and beta_end 0.012"),  # reversed
    ("beta_end", "0.012", r"beta_end '0.012'"),
    ("steps_offset", -5, r"steps_offset must be a whole number of at least 0, got -5"),
    ("steps_offset", 2.5, r"steps_offset must be a whole number of at least 0, got 2.5"),
    ("num_train_timesteps", 1, r"num_train_timesteps must be a whole number of at least 2, got 1"),
])  # fmt: skip
def test_a_schedule_out_of_bounds_is_refused_when_read(field, value, message):
    """An edited scheduler_config.json loaded without a word, then failed in generate with a misleading
    NonFiniteError (beta_end 1.5: sigma_max Inf), a raw torch error (beta_start -0.1) or a timestep list the
    user never passed (steps_offset -5); 2.5 and reversed betas were accepted."""
    config = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "steps_offset": 1, field: value}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        DiscreteSchedule.from_diffusers_config(config)
