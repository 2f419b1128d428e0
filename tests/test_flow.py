"""Flow matching (minigen.sampling.flow) checked against diffusers' FlowMatchEulerDiscreteScheduler.

The reference is diffusers 0.42 driven as FluxPipeline drives it: `set_timesteps(sigmas=np.linspace(1, 1/n,
n), mu=calculate_shift(image_seq_len))`, then for each t in `timesteps` (= sigma * 1000) the network gets
t / 1000 and `scheduler.step(v, t, x)` moves x. Sigmas agree to 1e-6 (measured <= 1.2e-7, 2 float32 ulps,
and 0 for a fixed shift). Sampling loops run a deterministic toy velocity network (`ToyVelocityNet`, a fixed
random mix of the features plus a function of sigma) on packed FLUX-like latents [2, 32, 16] from standard
normal noise and compare final latents in fp32: max abs diff <= 1e-5 (measured <= 7.2e-7 without guidance,
<= 2.9e-6 with guidance 3.5); the reference outputs have std 0.73-0.85 (2.79 with guidance).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402

from minigen.sampling import (  # noqa: E402
    ClassifierFreeGuidance,
    FlowDenoiser,
    flow_sigmas,
    flux_shift,
    sample_euler,
    shift_sigmas,
)

SHAPE = (2, 32, 16)  # [B, image tokens, features], like packed FLUX latents
TOL = 1e-5
FLUX_DEV = dict(
    use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15
)


class ToyVelocityNet:
    """A deterministic stand-in for the FLUX transformer: v = W x + sin(3 sigma) * b (+ context per feature)."""

    def __init__(self, features: int = SHAPE[-1], seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.weight = 0.9 * torch.eye(features) + 0.2 * torch.randn(features, features, generator=g)
        self.bias = torch.randn(features, generator=g)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor | None = None, step: int | None = None) -> torch.Tensor:
        v = x @ self.weight.T + torch.sin(3 * sigma).view(-1, 1, 1) * self.bias
        if context is not None:
            v = v + context.view(-1, 1, x.shape[-1])
        return v


def diffusers_scheduler(steps: int, image_seq_len: int = 4096, **config) -> diffusers.FlowMatchEulerDiscreteScheduler:
    """FlowMatchEulerDiscreteScheduler with the timesteps FluxPipeline sets for `steps` and `image_seq_len`."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(image_seq_len) if config.get("use_dynamic_shifting") else None
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler


def run_diffusers(scheduler, velocity, noise: torch.Tensor) -> torch.Tensor:
    """FluxPipeline's denoising loop: `velocity(x, t / 1000)` at each timestep, then scheduler.step."""
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(velocity(x, t.expand(x.shape[0]) / 1000), t, x).prev_sample
    return x


def assert_close(ours: torch.Tensor, reference: torch.Tensor, tol: float = TOL) -> None:
    diff = (ours - reference).abs().max().item()
    assert diff <= tol, f"max abs diff {diff:.2e} > {tol} (reference std {reference.std():.3f})"


def noise() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


# -- schedules ---------------------------------------------------------------------------------------------


def test_flux_shift_is_e_to_the_mu_of_diffusers_calculate_shift():
    """mu is 0.5 at 256 tokens, 1.15 at 4096 and keeps rising past it (not clamped): 1.838 at 8160."""
    for seq in [1, 256, 1024, 4096, 8160]:
        assert flux_shift(seq) == pytest.approx(math.exp(calculate_shift(seq)), rel=1e-12)
    assert math.log(flux_shift(256)) == pytest.approx(0.5)
    assert math.log(flux_shift(4096)) == pytest.approx(1.15)
    assert math.log(flux_shift(8160)) == pytest.approx(1.8379167, rel=1e-7)


@pytest.mark.parametrize("steps, image_seq_len", [(4, 256), (28, 4096), (50, 1024), (28, 8160)])
def test_flow_sigmas_match_flux_pipeline_with_dynamic_shifting(steps, image_seq_len):
    """FLUX.1-dev: flow_sigmas(n, flux_shift(seq)) vs the scheduler's sigmas, atol 1e-6 (measured <= 1.2e-7)."""
    reference = diffusers_scheduler(steps, image_seq_len, **FLUX_DEV).sigmas
    ours = flow_sigmas(steps, flux_shift(image_seq_len))
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shift", [1.0, 3.0], ids=["schnell", "sd3"])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_flow_sigmas_match_fixed_shift_configs(steps, shift):
    """FLUX.1-schnell (shift 1) and SD3 (shift 3), both without dynamic shifting and given FluxPipeline's
    sigmas: atol 1e-6 (measured 0, bit-identical)."""
    reference = diffusers_scheduler(steps, use_dynamic_shifting=False, shift=shift).sigmas
    torch.testing.assert_close(flow_sigmas(steps, shift), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["FLUX.1-dev", "FLUX.1-schnell"])
def test_flow_sigmas_from_the_official_scheduler_configs(shared_hf, name):
    """How a pipeline reads the official config: dynamic shifting means flux_shift(seq), else config["shift"]."""
    config = json.loads((shared_hf / "black-forest-labs" / name / "scheduler" / "scheduler_config.json").read_text())
    shift = flux_shift(4096) if config.get("use_dynamic_shifting") else config["shift"]
    reference = diffusers_scheduler(28, 4096, **{k: v for k, v in config.items() if not k.startswith("_")}).sigmas
    torch.testing.assert_close(flow_sigmas(28, shift), reference, atol=1e-6, rtol=0)


def test_shift_is_bfl_time_shift_and_keeps_the_ends():
    """s * sigma / (1 + (s - 1) sigma) equals BFL's e^mu / (e^mu + 1/sigma - 1) for s = e^mu (float64, 1e-12);
    s = 1 is the identity, 0 and 1 stay fixed, and s > 1 raises every sigma in between."""
    sigmas = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    mu = 1.15
    bfl = math.exp(mu) / (math.exp(mu) + 1 / sigmas - 1)
    torch.testing.assert_close(shift_sigmas(sigmas, math.exp(mu)), bfl, atol=1e-12, rtol=0)
    assert torch.equal(shift_sigmas(sigmas, 1.0), sigmas)
    assert shift_sigmas(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]
    assert (shift_sigmas(sigmas, 3.0) > sigmas).all()
    assert (flow_sigmas(28, 3.0).diff() < 0).all() and flow_sigmas(28, 3.0)[0] == 1


def test_flow_rejects_bad_input_with_clear_messages():
    with pytest.raises(ValueError, match="number of steps must be >= 1, got 0"):
        flow_sigmas(0)
    with pytest.raises(ValueError, match=r"shift must be > 0 \(1 leaves the sigmas unchanged\), got -1"):
        flow_sigmas(4, shift=-1.0)
    with pytest.raises(ValueError, match=r"flow sigmas must lie in \[0, 1\].*DiscreteSchedule"):
        shift_sigmas(torch.tensor([14.6, 1.0, 0.0]), 3.0)
    with pytest.raises(ValueError, match="image_seq_len must be the number of image tokens"):
        flux_shift(0)


# -- the denoiser ------------------------------------------------------------------------------------------


def test_flow_denoiser_recovers_x0_from_an_oracle_network():
    """A network returning the true velocity noise - x0 makes D(x, sigma) = x0; it is given sigma itself."""
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    sigma = torch.tensor([0.9, 0.25])
    x = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * eps

    def oracle(x_in, t, context, step=None):
        assert torch.equal(x_in, x) and torch.equal(t, sigma) and context == "text"
        return eps - x0

    torch.testing.assert_close(FlowDenoiser(oracle)(x, sigma, context="text"), x0, atol=1e-6, rtol=0)


def test_euler_on_a_flow_denoiser_is_the_velocity_step():
    """One sample_euler step from sigma to sigma_next equals x + (sigma_next - sigma) * v, atol 1e-6."""
    net, x = ToyVelocityNet(), noise()
    for sigma, sigma_next in [(1.0, 0.75), (0.3, 0.1), (0.05, 0.0)]:
        sigmas = torch.tensor([sigma, sigma_next])
        direct = x + (sigmas[1] - sigmas[0]) * net(x, sigmas[0].expand(SHAPE[0]))
        torch.testing.assert_close(sample_euler(FlowDenoiser(net), x, sigmas, disable=True), direct, atol=1e-6, rtol=0)


# -- sampling: parity with diffusers -----------------------------------------------------------------------


@pytest.mark.parametrize("steps, image_seq_len", [(4, 4096), (28, 4096), (28, 8160)])
def test_euler_sampling_matches_flux_pipeline_loop(steps, image_seq_len):
    """sample_euler + FlowDenoiser from x = noise vs diffusers' step loop (FLUX.1-dev schedule): <= 1e-5."""
    net = ToyVelocityNet()
    reference = run_diffusers(diffusers_scheduler(steps, image_seq_len, **FLUX_DEV), net, noise())
    ours = sample_euler(FlowDenoiser(net), noise(), flow_sigmas(steps, flux_shift(image_seq_len)), disable=True)
    assert_close(ours, reference)


def test_euler_sampling_matches_schnell_loop():
    """The same for FLUX.1-schnell: 4 unshifted steps."""
    net = ToyVelocityNet()
    reference = run_diffusers(diffusers_scheduler(4, use_dynamic_shifting=False, shift=1.0), net, noise())
    assert_close(sample_euler(FlowDenoiser(net), noise(), flow_sigmas(4), disable=True), reference)


# -- classifier-free guidance ------------------------------------------------------------------------------


def test_cfg_on_a_flow_denoiser_is_cfg_on_velocities():
    """ClassifierFreeGuidance(FlowDenoiser) = x - sigma * (v_u + w (v_c - v_u)) at one point (atol 1e-5), and
    a 28-step guided run equals diffusers' loop guiding the velocities (FluxPipeline's true CFG): <= 1e-5."""
    net, x, w = ToyVelocityNet(), noise(), 3.5
    uncond, cond = torch.zeros(2, SHAPE[-1]), torch.randn(2, SHAPE[-1], generator=torch.Generator().manual_seed(2))
    guided = ClassifierFreeGuidance(FlowDenoiser(net), w)
    context = torch.cat([uncond, cond])

    def guided_velocity(x, sigma):
        v_u, v_c = net(x, sigma, uncond), net(x, sigma, cond)
        return v_u + w * (v_c - v_u)

    sigma = torch.tensor(0.4)
    expected = x - sigma * guided_velocity(x, sigma.expand(SHAPE[0]))
    torch.testing.assert_close(guided(x, sigma, context=context), expected, atol=1e-5, rtol=0)

    reference = run_diffusers(diffusers_scheduler(28, 4096, **FLUX_DEV), guided_velocity, noise())
    sigmas = flow_sigmas(28, flux_shift(4096))
    ours = sample_euler(guided, noise(), sigmas, extra_args={"context": context}, disable=True)
    assert_close(ours, reference)


# -- sampling: the exact flow of Gaussian data ---------------------------------------------------------------


def test_euler_converges_to_the_exact_flow_of_gaussian_data():
    """For data x0 ~ N(0, a^2) the exact velocity is known in closed form and the flow ODE carries noise z at
    sigma = 1 to a * z at sigma = 0. Euler on flow_sigmas(n, 3) reaches it with first-order error: doubling
    the steps halves the max error (ratios measured 1.90-1.96; 0.27 at 20 steps, 0.071 at 80)."""
    a = 0.5

    def exact_velocity(x, sigma, step=None):
        s = sigma.view(-1, 1, 1)
        x0_mean = (1 - s) * a**2 * x / ((1 - s) ** 2 * a**2 + s**2)  # E[x0 | x_sigma = x]
        return (x - x0_mean) / s

    z = noise()

    def error(steps):
        x = sample_euler(FlowDenoiser(exact_velocity), z, flow_sigmas(steps, 3.0), disable=True)
        return (x - a * z).abs().max().item()

    errors = [error(n) for n in (20, 40, 80)]
    assert errors[-1] < 0.08
    for coarse, fine in zip(errors, errors[1:]):
        assert 1.8 < coarse / fine < 2.2


def test_a_flow_schedule_reads_what_its_mode_uses():
    """diffusers types base_shift and max_shift Optional: null beside a fixed shift is read (unused);
    under dynamic shifting every field must be a number."""
    from minigen.sampling.flow import FlowSchedule

    fixed = FlowSchedule.from_diffusers_config({"use_dynamic_shifting": False, "shift": 3.0, "base_shift": None, "max_shift": None})
    assert fixed == FlowSchedule(dynamic=False, shift=3.0)
    assert torch.equal(fixed.sigmas(4, 1024), flow_sigmas(4, 3.0))
    with pytest.raises(ValueError, match=r"base_shift must be a number, got \[None\]"):
        FlowSchedule.from_diffusers_config({"use_dynamic_shifting": True, "base_shift": None})
    with pytest.raises(ValueError, match="use_dynamic_shifting must be true or false, got 'yes'"):
        FlowSchedule.from_diffusers_config({"use_dynamic_shifting": "yes"})
