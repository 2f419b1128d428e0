"""Schedules, denoisers and samplers of minigen.sampling, checked against diffusers' schedulers.

Parity tests drive diffusers (the reference) and minigen with the same deterministic toy network
(`ToyNet`: a fixed random 1x1 channel mix of its input plus a function of t) for 10 steps from the same
initial noise [2, 4, 8, 8], and compare final latents in fp32: max abs diff <= 1e-4 (measured <= 5.3e-6).
Reference final latents have std 0.66-1.23 (eps) and 0.25-0.41 (v); the initial noise is standard normal,
scaled by up to 14.65.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from minigen.sampling import (  # noqa: E402
    SAMPLERS,
    ClassifierFreeGuidance,
    DiscreteDenoiser,
    DiscreteSchedule,
    karras_sigmas,
    sample_ddim,
    sample_ddim_inversion,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
)

CONFIGS = {
    "sd15": "runwayml/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
SHAPE = (2, 4, 8, 8)
STEPS = 10
TOL = 1e-4


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


def run_diffusers(scheduler, net, noise, *, timesteps=None, **step_kwargs) -> torch.Tensor:
    """The denoising loop of a diffusers pipeline, without CFG."""
    if timesteps is None:
        scheduler.set_timesteps(STEPS)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
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


def test_trailing_keeps_n_steps_where_numpy_arange_overshoots():
    """np.arange(1000, 0, -1000/61) has 62 entries (diffusers then visits t = -1); we keep exactly n."""
    timesteps = DiscreteSchedule(timestep_spacing="trailing").timesteps(61)
    assert len(timesteps) == 61 and timesteps[0] == 999 and timesteps.min() >= 0


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
    with pytest.raises(ValueError, match="number of steps must be in 1..1000"):
        DiscreteSchedule().timesteps(0)
    with pytest.raises(ValueError, match="reaches timestep 1000 > 999.*timestep_spacing='trailing'"):
        DiscreteSchedule().timesteps(1000)
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        DiscreteSchedule.from_diffusers_config({"prediction_type": "sample"})
    with pytest.raises(ValueError, match="rescale_betas_zero_snr is not supported"):
        DiscreteSchedule.from_diffusers_config({"rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
        karras_sigmas(10, 15.0, 1.0)


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


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_sampler_shares_the_signature_and_reports_each_step(name):
    schedule = DiscreteSchedule()
    sigmas = schedule.sigmas(4)
    if name == "ddim_inversion":
        sigmas = sigmas.flip(0)
    seen = []
    x = SAMPLERS[name](
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


def test_stochastic_samplers_are_reproducible_from_a_generator():
    schedule = DiscreteSchedule()
    denoiser, sigmas = DiscreteDenoiser(ToyNet(), schedule), schedule.sigmas(STEPS)
    x_T = torch.randn(SHAPE) * sigmas[0]

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return sample_euler_ancestral(denoiser, x_T, sigmas, generator=generator, disable=True)

    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))


@pytest.mark.parametrize("name", ["euler_ancestral", "ddim"])
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
    with pytest.raises(ValueError, match="eta must be >= 0"):
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
