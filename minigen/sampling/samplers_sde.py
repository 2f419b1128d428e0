"""Stochastic samplers that add fresh noise at every step: DPM-Solver++ for the diffusion SDE, and LCM.

They share the signature, the generators and the `noise_sampler` option of samplers.py (read its docstring
first). The SDE samplers solve the reverse-time SDE instead of the probability-flow ODE: each step forgets part
of x and replaces it by fresh noise, which corrects errors of earlier steps (and gives different images for
different noise). `eta` scales how much: 0 gives back the ODE solver, 1 the reverse SDE. LCM jumps to its
estimate of x0 at every step and noises it afresh to the next level.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from tqdm.auto import trange

from .denoisers import Denoiser
from .samplers import (
    Callback,
    Generators,
    NoiseSampler,
    _batch,
    _check_sigmas,
    _noise_sampler,
    _report,
    ancestral_step,
    batch_randn,
)
from .schedules import DiscreteSchedule


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(2M) for the reverse SDE (the SDE form of Lu et al. 2022, "DPM-Solver++", arXiv:2211.01095).

    In lambda = -log(sigma) with step h, the first-order step integrates the linear part of the SDE exactly:

        x_next = (sigma_next / sigma) * e^(-eta h) * x + (1 - e^(-(1 + eta) h)) * D
                 + sigma_next * sqrt(1 - e^(-2 eta h)) * z

    (eta = 0 is the DPM-Solver++ ODE step, eta = 1 the reverse SDE). Second order comes from the previous step's
    D: the difference (D - D_prev) / r, r = h_prev / h, is added with weight (1 - e^(-(1 + eta) h)) / 2
    ("midpoint", the default of diffusers) or 1 - (1 - e^(-(1 + eta) h)) / ((1 + eta) h) ("heun"). The first
    step is first order; the last, onto sigma = 0, returns D. eta = 0 with "midpoint" is `sample_dpmpp_2m`.
    `s_noise` scales the drawn noise z; one z per step onto sigma > 0, whatever eta.
    """
    _check_sigmas(sigmas, "sample_dpmpp_2m_sde", descending=True)
    if not eta >= 0 or eta == float("inf"):  # NaN too
        raise ValueError(f"eta must be a finite number >= 0 (0: the ODE solver, 1: the reverse SDE), got {eta}")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    extra_args = extra_args or {}
    noise_sampler = _noise_sampler(x, generator, noise_sampler)
    old_denoised = h_prev = None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch(sigma, x), step=i, **extra_args)
        _report(callback, x, i, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()  # step size in lambda = -log(sigma)
            decay = -torch.expm1(-(1 + eta) * h)  # 1 - e^(-(1 + eta) h), the weight of D
            x = (sigma_next / sigma) * torch.exp(-eta * h) * x + decay * denoised
            if old_denoised is not None:
                slope = (denoised - old_denoised) / (h_prev / h)
                if solver_type == "midpoint":
                    x = x + 0.5 * decay * slope
                else:
                    x = x + (decay / (-(1 + eta) * h) + 1) * slope
            noise = noise_sampler(sigma, sigma_next)
            x = x + noise * s_noise * sigma_next * (-torch.expm1(-2 * eta * h)).sqrt()
            h_prev = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: Generators = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(2S) made stochastic (k-diffusion's "DPM++ SDE"): two ancestral half-steps per step.

    Each step from sigma to sigma_next goes through sigma_mid = sqrt(sigma * sigma_next), halfway in lambda:

        x_mid  = ancestral DPM-Solver++(1) step from x to sigma_mid with D = D(x, sigma)
        x_next = ancestral DPM-Solver++(1) step from x (again) to sigma_next with D(x_mid, sigma_mid)

    where the ancestral step to s' takes the ODE step down to s_down (`ancestral_step(s, s', eta)`),
    x' = (s_down / s) * x + (1 - s_down / s) * D, and adds s_up * z. Using the midpoint's D for the whole step
    makes it second order (DPM-Solver-2 with r = 1/2, Lu et al. 2022). The last step onto sigma = 0 is an Euler
    step and returns D. Two network evaluations per step, 2n - 1 in all. `eta` scales the fresh noise as in
    `ancestral_step` (0: the ODE solver DPM-Solver++(2S)), `s_noise` the drawn noise itself.

    Noise: the two z of a step must be increments of one Brownian motion W over the noise level, z_mid from
    sigma to sigma_mid and z_next from sigma to sigma_next, so z_next contains z_mid (correlation
    sqrt((sigma - sigma_mid) / (sigma - sigma_next))). diffusers and k-diffusion query a torchsde BrownianTree
    seeded from a number. Here the increments over [sigma_mid, sigma] and [sigma_next, sigma_mid] are drawn
    from `generator` (two standard normals per step, per row with one generator per row; `brownian_increments`):
    z_mid and z_next have exactly the joint law of the tree's answers, without torchsde, but not its values
    for a given seed. A `noise_sampler(sigma, sigma_next)` is called twice per step, (sigma, sigma_mid) then
    (sigma, sigma_next), as diffusers and k-diffusion call theirs: given the same noise, this sampler gives
    diffusers' result. Their BrownianTree sampler itself, passed here, gives it only to about 1e-3: the tree
    answers differently at times a float32 rounding apart, and our sigmas and midpoints are not bitwise theirs.
    """
    _check_sigmas(sigmas, "sample_dpmpp_sde", descending=True)
    extra_args = extra_args or {}
    if noise_sampler is not None and generator is not None:
        raise ValueError("pass either generator or noise_sampler, not both")
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch(sigma, x), step=i, **extra_args)
        _report(callback, x, i, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        sigma_mid = (sigma * sigma_next).sqrt()
        if noise_sampler is None:
            noise_mid, noise_next = brownian_increments(x, generator, sigma, sigma_mid, sigma_next)
        else:
            noise_mid, noise_next = noise_sampler(sigma, sigma_mid), noise_sampler(sigma, sigma_next)
        x_mid = _ancestral_dpm_solver_step(x, sigma, sigma_mid, denoised, noise_mid * s_noise, eta)
        denoised_mid = model(x_mid, _batch(sigma_mid, x), step=i, **extra_args)
        x = _ancestral_dpm_solver_step(x, sigma, sigma_next, denoised_mid, noise_next * s_noise, eta)
    return x


@torch.no_grad()
def sample_lcm(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: Generators = None,
    noise_sampler: NoiseSampler | None = None,
    schedule: DiscreteSchedule | None = None,
    timestep_scaling: float = 10.0,
) -> Tensor:
    """Multistep sampling of a Latent Consistency Model (Luo et al. 2023, Alg. 3; Song et al. 2023, Alg. 1).

    A consistency model maps a noisy latent straight to the clean one. LCM builds it from the network's x0
    estimate D with the boundary-condition scalings of consistency models, which make f the identity at t = 0:

        f = c_skip * x_vp + c_out * D,   c_skip = s^2 / ((k t)^2 + s^2),   c_out = k t / sqrt((k t)^2 + s^2)

    with x_vp = x / sqrt(sigma^2 + 1) the latent the network sees, t the training timestep of sigma, s = 0.5
    (sigma_data) and k = `timestep_scaling`. Each step jumps to f and, unless sigma_next = 0, noises it afresh:
    x_next = f + sigma_next * z. Meant for LCM-distilled weights (or an LCM-LoRA) at their timesteps,
    `lcm_sigmas(schedule, n)`; `schedule` (default: SD's, which all LCM releases use) maps sigma to t.
    """
    _check_sigmas(sigmas, "sample_lcm", descending=True)
    extra_args = extra_args or {}
    schedule = schedule or DiscreteSchedule()
    noise_sampler = _noise_sampler(x, generator, noise_sampler)
    sigma_data = 0.5
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch(sigma, x), step=i, **extra_args)
        _report(callback, x, i, sigma, sigma_next, denoised)
        scaled_t = timestep_scaling * schedule.sigma_to_t(sigma)
        c_skip = sigma_data**2 / (scaled_t**2 + sigma_data**2)
        c_out = scaled_t / (scaled_t**2 + sigma_data**2).sqrt()
        x = c_skip * x / (sigma**2 + 1).sqrt() + c_out * denoised
        if sigma_next > 0:
            x = x + sigma_next * noise_sampler(sigma, sigma_next)
    return x


def brownian_increments(
    x: Tensor, generator: Generators, sigma: Tensor, sigma_mid: Tensor, sigma_next: Tensor
) -> tuple[Tensor, Tensor]:
    """Standard normals z_mid, z_next like x: W's increments from sigma to sigma_mid and to sigma_next, normalised.

    For a Brownian motion W over the noise level and sigma > sigma_mid > sigma_next, draw the independent
    increments a = sqrt(sigma - sigma_mid) * u and b = sqrt(sigma_mid - sigma_next) * v (u, v from `generator`);
    then z_mid = a / sqrt(sigma - sigma_mid) = u and z_next = (a + b) / sqrt(sigma - sigma_next).
    """
    u = batch_randn(x.shape, generator).to(x)  # [B, ...]
    v = batch_randn(x.shape, generator).to(x)
    near, far = sigma - sigma_mid, sigma_mid - sigma_next
    return u, (near.sqrt() * u + far.sqrt() * v) / (near + far).sqrt()


def _ancestral_dpm_solver_step(
    x: Tensor, sigma: Tensor, sigma_to: Tensor, denoised: Tensor, noise: Tensor, eta: float
) -> Tensor:
    """The DPM-Solver++(1) step from sigma down to sigma_down, then noise * sigma_up (ancestral_step's split)."""
    sigma_down, sigma_up = ancestral_step(sigma, sigma_to, eta)
    ratio = sigma_down / sigma
    return ratio * x + (1 - ratio) * denoised + noise * sigma_up
