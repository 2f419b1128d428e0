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

    EulerDiscrete, EulerAncestral, Heun, KDPM2, DPMSolverSDE, spacing "leading"   x = noise * sqrt(sigmas[0]**2 + 1)
    the same with "linspace" or "trailing"                                        x = noise * sigmas[0]
    DDIM, DPMSolverMultistep, UniPCMultistep, LCM (any spacing, Karras too)       x = noise * sqrt(sigmas[0]**2 + 1)

(DDIM, DPM-Solver, UniPC and LCM work on the variance-preserving latent x / sqrt(sigma^2 + 1) and start it at
`noise`; the two forms agree once sigma reaches 0.) With the matching scale and the same timesteps, each sampler
reproduces a diffusers scheduler, the stochastic ones given the same noise (a generator in the same state, or a
`noise_sampler` replaying diffusers' draws):

    sample_euler             EulerDiscreteScheduler
    sample_euler_ancestral   EulerAncestralDiscreteScheduler
    sample_heun              HeunDiscreteScheduler
    sample_dpm_2             KDPM2DiscreteScheduler
    sample_ddim              DDIMScheduler (eta as its step's eta)
    sample_dpmpp_2m          DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)
    sample_dpmpp_2m_sde      DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)
    sample_dpmpp_sde         DPMSolverSDEScheduler (its noise comes from torchsde's BrownianTree: see the sampler)
    sample_unipc             UniPCMultistepScheduler (solver_order=2, solver_type "bh2" or "bh1")
    sample_lcm               LCMScheduler (with `lcm_sigmas`, its own choice of timesteps)

Where the schedulers' timesteps differ from `DiscreteSchedule.sigmas` and `karras_sigmas`:
- DPM-Solver and UniPC with `use_karras_sigmas` give the network rounded timesteps (use
  `DiscreteDenoiser(..., round_timesteps=True)` with `karras_sigmas`); KDPM2 rounds those of its Karras sigmas but
  not those of its midpoints; Heun and DPMSolverSDE round none.
- Euler, Heun, KDPM2 and DPMSolverSDE with `use_karras_sigmas` span the sigmas of their spacing's first and last
  timesteps: spacing "linspace" gives the training range that `karras_sigmas(n, schedule.sigma_min, schedule.sigma_max)`
  spans (as k-diffusion and A1111 do); SD's own "leading" spacing a narrower one. DPM-Solver and UniPC span the
  training range with any spacing.
- DPMSolverMultistep's and UniPC's own "leading" and "linspace" divide the range by n + 1, a rule of those classes
  only ("trailing" agrees; DPMSolverMultistep also accepts our timesteps).
- DDIM with `set_alpha_to_one=False` stops short of sigma = 0 (see `sample_ddim`).

`SAMPLERS` (minigen.sampling) names the samplers for generation; `sample_ddim_inversion` runs the other way and is
called directly. The SDE samplers and LCM live in samplers_sde.py.
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
def sample_heun(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: Generators = None,
) -> Tensor:
    """Heun's method on the probability-flow ODE (Karras et al. 2022, Alg. 1): second order.

    An Euler step gives a trial point x' at sigma_next; the step actually taken uses the mean of the slopes at x
    and at x', d = (x - D(x, sigma)) / sigma and d' = (x' - D(x', sigma_next)) / sigma_next (the trapezoidal
    rule). The last step onto sigma = 0, where the slope is undefined, stays an Euler step: n steps cost 2n - 1
    network evaluations.
    """
    _check_sigmas(sigmas, "sample_heun", descending=True)
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch(sigma, x), step=i, **extra_args)
        _report(callback, x, i, sigma, sigma_next, denoised)
        d = (x - denoised) / sigma
        x_trial = x + (sigma_next - sigma) * d
        if sigma_next == 0:
            x = x_trial
        else:
            denoised_trial = model(x_trial, _batch(sigma_next, x), step=i, **extra_args)
            d_trial = (x_trial - denoised_trial) / sigma_next
            x = x + (sigma_next - sigma) * (d + d_trial) / 2
    return x


@torch.no_grad()
def sample_dpm_2(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: Generators = None,
) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022, Alg. 1 with r = 1/2), Karras et al.'s "DPM2": the midpoint method.

    In the variance-exploding form the ODE is dx/dsigma = eps(x, sigma), and DPM-Solver-2 for the noise
    prediction is the midpoint rule with the midpoint halfway in log sigma, sigma_mid = sqrt(sigma * sigma_next):
    an Euler step to sigma_mid, then the whole step from x with the slope found there,
    x_next = x + (sigma_next - sigma) * (x_mid - D(x_mid, sigma_mid)) / sigma_mid. The last step onto sigma = 0
    is an Euler step: n steps cost 2n - 1 network evaluations.
    """
    _check_sigmas(sigmas, "sample_dpm_2", descending=True)
    extra_args = extra_args or {}
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch(sigma, x), step=i, **extra_args)
        _report(callback, x, i, sigma, sigma_next, denoised)
        d = (x - denoised) / sigma
        if sigma_next == 0:
            x = x + (sigma_next - sigma) * d
        else:
            sigma_mid = (sigma * sigma_next).sqrt()  # halfway in log sigma
            x_mid = x + (sigma_mid - sigma) * d
            denoised_mid = model(x_mid, _batch(sigma_mid, x), step=i, **extra_args)
            x = x + (sigma_next - sigma) * (x_mid - denoised_mid) / sigma_mid
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


@torch.no_grad()
def sample_unipc(
    model: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    disable: bool | None = None,
    generator: Generators = None,
    variant: str = "bh2",
) -> Tensor:
    """UniPC (Zhao et al. 2023): a second-order multistep predictor (UniP-2) and a free corrector (UniC).

    In lambda = -log(sigma), with h = lambda_next - lambda and B = e^-h - 1 ("bh2") or -h ("bh1"), every update
    is a first-order step from x with the denoised value D plus a weighted sum R of differences of D values:

        x_next = (sigma_next / sigma) * x + (1 - sigma_next / sigma) * D - B * R

    - UniP-2 predicts x_next with R = (D - D_prev) / (2 r), r = h_prev / h: the DPM-Solver++(2M) step for "bh2".
    - UniC corrects: once the network has evaluated D_next at the predicted x_next, the step that led there is
      redone from the same x with R built from D_next too (the weights solve UniPC's order conditions), raising
      the order by one without another evaluation. The network never sees the corrected point; the next step
      starts from it.
    The first step is first order, and so is the last (onto sigma = 0 that returns D). With `variant` "bh2" (the
    default of diffusers) UniC-1 is the trapezoidal rule on D; the authors advise "bh1" for unconditional sampling
    in fewer than 10 steps.
    """
    _check_sigmas(sigmas, "sample_unipc", descending=True)
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2' (UniPC's B(h) = -h or e^-h - 1), got {variant!r}")
    extra_args = extra_args or {}
    lambdas = -sigmas.log()  # [n + 1], the last is inf
    x_last = denoised_last = denoised_before = None  # the step before: its start, its D, and the D before that
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, _batch(sigma, x), step=i, **extra_args)
        _report(callback, x, i, sigma, sigma_next, denoised)
        if i > 0:  # UniC: redo the last step, from lambda[i - 1] to lambda[i], with this step's D
            h = lambdas[i] - lambdas[i - 1]
            B, b1, b2 = _unipc_weights(h, variant)
            if i == 1:  # after a first-order step: UniC-1
                residual = 0.5 * (denoised - denoised_last)
            else:  # UniC-2: weights (rho_1, rho_2) solve [[1, 1], [r, 1]] rho = [b1, b2]
                r = (lambdas[i - 2] - lambdas[i - 1]) / h
                rho_1 = (b1 - b2) / (1 - r)
                rho_2 = b1 - rho_1
                residual = rho_1 * (denoised_before - denoised_last) / r + rho_2 * (denoised - denoised_last)
            x = _unipc_step(x_last, sigmas[i - 1], sigma, denoised_last, B * residual)
        if i == 0 or i == len(sigmas) - 2:  # UniP-1, the DDIM step: onto sigma = 0 it gives D
            x_next = _unipc_step(x, sigma, sigma_next, denoised)
        else:  # UniP-2
            h = lambdas[i + 1] - lambdas[i]
            B, _, _ = _unipc_weights(h, variant)
            r = (lambdas[i - 1] - lambdas[i]) / h
            x_next = _unipc_step(x, sigma, sigma_next, denoised, B * 0.5 * (denoised_last - denoised) / r)
        x_last, denoised_before, denoised_last = x, denoised_last, denoised
        x = x_next
    return x


def _unipc_weights(h: Tensor, variant: str) -> tuple[Tensor, Tensor, Tensor]:
    """B(h) and the right-hand sides b1, b2 of UniPC's order conditions for a step of h in lambda.

    With k = -h (the data-prediction form): b_p = p! * phi_p / B, where phi_1 = (e^k - 1 - k) / k and
    phi_2 = (e^k - 1 - k - k^2 / 2) / k^2, computed as phi_2 = phi_1 / k - 1/2.
    """
    k = -h
    B = torch.expm1(k) if variant == "bh2" else k
    phi_1 = torch.expm1(k) / k - 1
    phi_2 = phi_1 / k - 0.5
    return B, phi_1 / B, 2 * phi_2 / B


def _unipc_step(
    x: Tensor, sigma: Tensor, sigma_next: Tensor, denoised: Tensor, correction: Tensor | float = 0.0
) -> Tensor:
    """The first-order (DDIM) step from sigma to sigma_next with denoised value D, less B * R (`correction`)."""
    ratio = sigma_next / sigma
    return ratio * x + (1 - ratio) * denoised - correction


def ancestral_step(sigma: Tensor, sigma_next: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Split the way from sigma to sigma_next into a deterministic part down to sigma_down and fresh noise.

    sigma_up = eta * sigma_next * sqrt(1 - sigma_next^2 / sigma^2) (capped at sigma_next) is the standard
    deviation of the DDPM posterior for eta = 1, and sigma_down = sqrt(sigma_next^2 - sigma_up^2).
    """
    if not eta >= 0 or eta == float("inf"):  # NaN too
        raise ValueError(f"eta must be a finite number >= 0 (0: deterministic, 1: DDPM amount of fresh noise), got {eta}")
    sigma_up = torch.minimum(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def batch_randn(shape: Sequence[int], generator: Generators = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normals of `shape` [B, ...] in `dtype` (float32 by default), on the generator's device
    (CPU for None). The dtype changes the numbers drawn, not only their precision: diffusers draws in
    its model's dtype.

    One generator (or None: the global CPU one) draws the whole batch at once; a sequence of B generators
    draws row k from generator[k], so each row is what that generator alone gives a batch of one.
    """
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    if len(generator) != shape[0]:
        raise ValueError(f"one generator per batch row: got {len(generator)} generators for a batch of {shape[0]}")
    row = (1, *shape[1:])
    return torch.cat([torch.randn(row, generator=g, device=g.device, dtype=dtype) for g in generator])


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
