"""Samplers in k-diffusion style: free functions with one shared signature.

    sample_<name>(model, x, sigmas, *, extra_args=None, callback=None, disable=None, generator=None, **options)

- `model(x, sigma, step=i, **extra_args)` returns the denoised x0 (see denoisers.py); sigma has shape [B] and
  `step` is the index i of the step being taken (both calls of a two-evaluation step get the same i).
- `x` is the starting latent at noise level sigmas[0] in the variance-exploding form x = x0 + sigma * eps,
  and `sigmas` is the schedule to walk, e.g. `DiscreteSchedule().sigmas(n)` or `karras_sigmas(...)`.
- `callback`, if given, receives {"x", "i", "sigma", "sigma_next", "denoised"} before step i updates x.
- `disable=True` hides the tqdm bar (None lets tqdm decide, as in k-diffusion).
- Stochastic samplers draw fresh noise from `generator`, on the generator's device (CPU by default, then
  moved to x's device, so a seed gives the same noise on every machine), or from a
  `noise_sampler(sigma, sigma_next)` option returning a tensor like x. `generator` is either one
  torch.Generator for the whole batch (the global CPU one if None), or a sequence of B generators, one per
  batch row: row k's noise then comes from generator[k] alone, so image k of a batch is the image a batch
  of one gets from generator[k] (the pipelines seed generator k with seed + k, as AUTOMATIC1111 does).
  Deterministic samplers accept `generator` and ignore it, so every sampler can be called the same way
  through `SAMPLERS`.
- All samplers run under torch.no_grad() and return the latent at sigmas[-1] (x0 when that is 0).

Starting noise. Mathematically x = noise * sigmas[0]. To get exactly what a diffusers pipeline gets from the
same `noise`, scale it as that scheduler's `init_noise_sigma` does:

    EulerDiscrete, EulerAncestral with spacing "leading"       x = noise * sqrt(sigmas[0]**2 + 1)
    EulerDiscrete, EulerAncestral with "linspace", "trailing"  x = noise * sigmas[0]
    DDIM, DPMSolverMultistep (any spacing, Karras too)         x = noise * sqrt(sigmas[0]**2 + 1)

(DDIM and DPM-Solver work on the variance-preserving latent x / sqrt(sigma^2 + 1) and start it at `noise`;
the two forms agree once sigma reaches 0.) With the matching scale and the same timesteps, `sample_euler`,
`sample_euler_ancestral`, `sample_ddim` and `sample_dpmpp_2m` reproduce EulerDiscreteScheduler,
EulerAncestralDiscreteScheduler, DDIMScheduler and DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
solver_order=2), the stochastic ones given a generator in the same state. Two details: DPM-Solver with
`use_karras_sigmas` gives the network rounded timesteps (use `DiscreteDenoiser(..., round_timesteps=True)`
with `karras_sigmas`), and DDIM with `set_alpha_to_one=False` stops short of sigma = 0 (see `sample_ddim`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm.auto import trange

from .denoisers import Denoiser

Callback = Callable[[dict[str, Any]], None]
NoiseSampler = Callable[[Tensor, Tensor], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per batch row


@torch.no_grad()
def sample_euler(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: Generators = None,
) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022)."""
    _check_sigmas(sigmas, "sample_euler", descending=True)
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch(sigma, x), step=i, **extra_args)
        _report(callback, x, i, sigma, sigma_next, denoised)
        d = (x - denoised) / sigma  # the slope, which is also the predicted noise eps
        x = x + (sigma_next - sigma) * d
    return x


@torch.no_grad()
def sample_euler_ancestral(
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
    """Euler step down to sigma_down, then fresh noise of std sigma_up brings x back to sigma_next.

    `eta` scales the fresh noise (0 gives `sample_euler`, 1 the DDPM posterior's amount); `s_noise` scales
    the drawn noise itself.
    """
    _check_sigmas(sigmas, "sample_euler_ancestral", descending=True)
    extra_args = extra_args or {}
    noise_sampler = _noise_sampler(x, generator, noise_sampler)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch(sigma, x), step=i, **extra_args)
        _report(callback, x, i, sigma, sigma_next, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        d = (x - denoised) / sigma
        x = x + (sigma_down - sigma) * d
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_ddim(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: Generators = None,
    eta: float = 0.0,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DDIM (Song et al. 2020, eq. 12) written on sigmas: x0 plus the predicted noise at the next level.

    With eps = (x - x0) / sigma the DDIM update is x_next = x0 + sigma_down * eps + sigma_up * z, where
    sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2) is DDIM's sigma_t and
    sigma_down^2 + sigma_up^2 = sigma_next^2. This is algebraically the same as `sample_euler` (eta = 0) and
    `sample_euler_ancestral` (eta > 0); it is kept under its own name and in its own words.

    diffusers' DDIMScheduler with `set_alpha_to_one=False` (the SD1.5 config) ends at sigma_min, the sigma of
    t = 0, instead of 0. To reproduce it, replace the final 0 of `sigmas` by `schedule.sigma_min` and divide
    the result by sqrt(sigma_min^2 + 1).
    """
    _check_sigmas(sigmas, "sample_ddim", descending=True)
    extra_args = extra_args or {}
    noise_sampler = _noise_sampler(x, generator, noise_sampler)
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch(sigma, x), step=i, **extra_args)
        _report(callback, x, i, sigma, sigma_next, denoised)
        eps = (x - denoised) / sigma
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + sigma_down * eps
        if eta > 0 and sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * sigma_up
    return x


@torch.no_grad()
def sample_ddim_inversion(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: Generators = None,
) -> Tensor:
    """Deterministic DDIM run backwards: from a clean latent up to noise, for editing a real image.

    Convention: `sigmas` increase, from 0 (the clean latent `x`) to the noise level to reach, usually the
    sampling schedule reversed, `schedule.sigmas(n).flip(0)`. Step i moves x from sigmas[i] to sigmas[i+1]
    with the noise the network predicts *at the target level* for the input it would see now:

        x_vp = x / sqrt(sigmas[i]^2 + 1)                     the latent as the network sees it
        eps  = net(x_vp, t(sigmas[i+1]))                     (through `model`, so eps and v both work)
        x    = x + (sigmas[i+1] - sigmas[i]) * eps           (= x0_pred + sigmas[i+1] * eps)

    The sampling step from sigmas[i+1] back down to sigmas[i] uses the same t, so `sample_ddim` over
    `sigmas.flip(0)` returns to `x` up to how much x_vp moves within one step. That error is second order in
    the step size for unit-variance latents (what SD's latent scaling factor aims at), whose x_vp keeps unit
    variance at every noise level; it also avoids evaluating the network at sigma = 0.

    The result is the variance-exploding latent at sigmas[-1]: give it to the sampler as is, without scaling
    it like fresh noise. For eps-prediction this is diffusers' DDIMInverseScheduler (its output times
    sqrt(sigma^2 + 1)); for v-prediction diffusers converts v with the alphas of the current level where this
    uses those of the target level, the level the network was told.
    """
    _check_sigmas(sigmas, "sample_ddim_inversion", descending=False)
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_in = x * ((sigma_next**2 + 1) / (sigma**2 + 1)).sqrt()  # same network input x / sqrt(sigma^2 + 1)
        denoised = model(x_in, _batch(sigma_next, x), step=i, **extra_args)
        _report(callback, x, i, sigma, sigma_next, denoised)
        eps = (x_in - denoised) / sigma_next
        x = x + (sigma_next - sigma) * eps
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: Generators = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): a multistep second-order solver in lambda = -log(sigma).

    The first step, and the last step onto sigma = 0, are first order; in between, the denoised value is
    extrapolated linearly from this step's and the previous step's, weighted by r = h_prev / h.
    """
    _check_sigmas(sigmas, "sample_dpmpp_2m", descending=True)
    extra_args = extra_args or {}
    old_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch(sigma, x), step=i, **extra_args)
        _report(callback, x, i, sigma, sigma_next, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = sigma.log() - sigma_next.log()  # step size in lambda = -log(sigma)
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (sigmas[i - 1].log() - sigma.log()) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_next / sigma) * x - torch.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
    "ddim_inversion": sample_ddim_inversion,
}


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Split the way from sigma to sigma_next into a deterministic part down to sigma_down and fresh noise.

    sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2) (capped at sigma_next) is the standard
    deviation of the DDPM posterior for eta = 1, and sigma_down = sqrt(sigma_next^2 - sigma_up^2).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic, 1: DDPM amount of fresh noise), got {eta}")
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def batch_randn(shape: Sequence[int], generator: Generators = None) -> Tensor:
    """Standard normals of `shape` [B, ...] in float32, on the generator's device (CPU for None).

    One generator (or None: the global CPU one) draws the whole batch at once; a sequence of B generators
    draws row k from generator[k], so each row is what that generator alone gives a batch of one.
    """
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise ValueError(f"one generator per batch row: got {len(generator)} generators for a batch of {shape[0]}")
    row = (1, *shape[1:])
    return torch.cat([torch.randn(row, generator=g, device=g.device, dtype=torch.float32) for g in generator])


def _noise_sampler(x: Tensor, generator: Generators, noise_sampler: NoiseSampler | None) -> NoiseSampler:
    """The noise source of a stochastic sampler: a given noise_sampler, else standard normals from generator."""
    if noise_sampler is not None:
        if generator is not None:
            raise ValueError("pass either generator or noise_sampler, not both")
        return noise_sampler

    def draw(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        return batch_randn(x.shape, generator).to(x)

    return draw


def _batch(sigma: Tensor, x: Tensor) -> Tensor:
    """sigma repeated for each of the B latents, [B], kept in the schedule's dtype (float32) on x's device."""
    return sigma.to(x.device).expand(x.shape[0])


def _check_sigmas(sigmas: Tensor, sampler: str, *, descending: bool) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"{sampler} needs a 1-D tensor of at least 2 sigmas, got shape {list(sigmas.shape)}")
    steps = sigmas.diff()
    if descending and not (steps < 0).all():
        raise ValueError(
            f"{sampler} needs strictly decreasing sigmas (noise -> clean), got {sigmas.tolist()};"
            " for DDIM inversion use sample_ddim_inversion"
        )
    if not descending and not (steps > 0).all():
        raise ValueError(
            f"{sampler} needs strictly increasing sigmas (clean -> noise), got {sigmas.tolist()};"
            " pass the sampling schedule reversed, e.g. schedule.sigmas(n).flip(0)"
        )


def _report(
    callback: Callback | None, x: Tensor, i: int, sigma: Tensor, sigma_next: Tensor, denoised: Tensor
) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_next": sigma_next, "denoised": denoised})
