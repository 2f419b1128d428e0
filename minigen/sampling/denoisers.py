"""Denoisers: turn a noise- or velocity-predicting network into D(x, sigma) ~ x0.

k-diffusion samplers talk to one kind of model only, a denoiser that maps a noisy latent x = x0 + sigma * eps
(the variance-exploding form, see schedules.py) to its estimate of x0. The SD UNets were trained on the
variance-preserving latent x_t = x / sqrt(sigma^2 + 1) at an integer timestep t, and predict either the noise
eps or the velocity v = sqrt(abar) * eps - sqrt(1 - abar) * x0. The wrapper converts both ways:

    x_in = c_in * x,  c_in = 1 / sqrt(sigma^2 + 1)        input the network was trained on
    t    = schedule.sigma_to_t(sigma)                      interpolated in log-sigma, exact on training steps
    eps:  D = x - sigma * net(x_in, t)
    v:    D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * net(x_in, t)

Classifier-free guidance is a second wrapper around any denoiser; `FiniteCheck`, a third, stops a run at the
first step whose output holds a NaN or an Inf (raising `NonFiniteError`) instead of decoding a black image.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from .schedules import DiscreteSchedule, PredictionType


class Denoiser(Protocol):
    """What every sampler calls: model(x, sigma, step=i, **extra_args) -> denoised x0, with sigma of shape [B]
    and i the index of the sampling step (None outside a sampler)."""

    def __call__(self, x: Tensor, sigma: Tensor, *, step: int | None = None, **extra_args: Any) -> Tensor: ...


class DiscreteDenoiser:
    """k-diffusion denoiser around a network `net(x_in, t, step=i, **extra) -> eps or v` trained on `schedule`.

    `round_timesteps=True` rounds t to the nearest integer before calling the network, as diffusers'
    DPMSolverMultistepScheduler does with Karras sigmas (and A1111 calls "quantize"). The sigma used in the
    update is not rounded, so this is only a different time input to the network.
    """

    def __init__(
        self, net: Callable[..., Tensor], schedule: DiscreteSchedule, *, round_timesteps: bool = False
    ) -> None:
        self.net = net
        self.schedule = schedule
        self.round_timesteps = round_timesteps

    def __call__(self, x: Tensor, sigma: Tensor, *, step: int | None = None, **extra_args: Any) -> Tensor:
        sigma = per_sample_sigma(sigma, x)  # [B]
        t = self.schedule.sigma_to_t(sigma)  # [B] float32
        if self.round_timesteps:
            t = t.round()
        s = sigma.to(x.dtype).view(-1, *[1] * (x.ndim - 1))  # [B, 1, ..., 1]
        out = self.net(x / (s**2 + 1).sqrt(), t, step=step, **extra_args)
        if out is None:
            raise ValueError("the network returned None (its Controls.stop_after ended the forward early); a denoiser "
                             "needs the full prediction: call the model itself for the features up to that layer")
        if self.schedule.prediction_type == "epsilon":
            return x - s * out
        return x / (s**2 + 1) - s / (s**2 + 1).sqrt() * out


class ClassifierFreeGuidance:
    """D_cfg(x, sigma) = D_uncond + cfg_scale * (D_cond - D_uncond), both halves in one batch.

    The wrapped denoiser is called once on [x, x] (uncond rows first, then cond rows) and sigma repeated the
    same way. `extra_args` go to it untouched, so they must already be stacked in that order, e.g.
    `context=torch.cat([uncond_embeddings, cond_embeddings])` for a batch of B latents gives 2B rows.

    `rescale` r > 0 (Lin et al. 2023, §3.4; diffusers' `guidance_rescale`) pulls the guided prediction's
    standard deviation back towards the conditional one's, in the network's output space. Written on
    u = D - k·x, which is that output times a factor per image (k = 1 for eps: u = -sigma·eps;
    k = 1 / (sigma² + 1) for v: u = -sigma / sqrt(sigma² + 1)·v), so the factor cancels:

        u_cfg <- u_cfg · (r · std(u_cond) / std(u_cfg) + 1 - r)        std over each image's values
    """

    def __init__(self, denoiser: Denoiser, cfg_scale: float, rescale: float = 0.0, prediction_type: PredictionType | None = None) -> None:
        if not 0 <= rescale <= 1:
            raise ValueError(f"the CFG rescale must be in [0, 1] (0: off; diffusers' guidance_rescale, 0.7 in the paper), got {rescale}")
        if rescale and prediction_type not in ("epsilon", "v"):
            raise ValueError(f"the CFG rescale works in the network's output space: give prediction_type 'epsilon' or 'v' "
                             f"(the schedule's, schedule.prediction_type), got {prediction_type!r}")
        self.denoiser = denoiser
        self.cfg_scale = cfg_scale
        self.rescale = rescale
        self.prediction_type = prediction_type

    def __call__(self, x: Tensor, sigma: Tensor, *, step: int | None = None, **extra_args: Any) -> Tensor:
        sigma = per_sample_sigma(sigma, x)
        uncond, cond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), step=step, **extra_args).chunk(2)
        guided = uncond + self.cfg_scale * (cond - uncond)
        if self.rescale == 0:
            return guided
        s = sigma.to(x.dtype).view(-1, *[1] * (x.ndim - 1))  # [B, 1, ..., 1]
        k = 1 if self.prediction_type == "epsilon" else 1 / (s**2 + 1)
        dims = list(range(1, x.ndim))
        u_cond, u_guided = cond - k * x, guided - k * x
        spread = u_guided.std(dim=dims, keepdim=True)
        ratio = torch.where(spread > 0, u_cond.std(dim=dims, keepdim=True) / spread, 1.0)  # nothing to rescale where u_cfg is flat
        return k * x + (self.rescale * ratio + 1 - self.rescale) * u_guided


class NonFiniteError(ValueError):
    """A sampling step produced NaN or Inf values; the message names the step and the likely causes."""


class FiniteCheck:
    """Wraps a denoiser and raises NonFiniteError when its output at step i holds a NaN or an Inf.

    One `torch.isfinite(denoised).all()` per call. Checking the denoised value suffices: a non-finite x
    (or weight, or guidance scale) shows up in it at once. `steps` is the number of steps, N in "step i of N".
    """

    def __init__(self, denoiser: Denoiser, steps: int) -> None:
        self.denoiser = denoiser
        self.steps = steps

    def __call__(self, x: Tensor, sigma: Tensor, *, step: int | None = None, **extra_args: Any) -> Tensor:
        denoised = self.denoiser(x, sigma, step=step, **extra_args)
        if not torch.isfinite(denoised).all():
            where = "a step" if step is None else f"step {step + 1} of {self.steps}"
            raise NonFiniteError(
                f"sampling stopped: {where} produced non-finite values (NaN or Inf). Likely causes: fp16 overflow"
                " (load the model in fp32 or bf16); a LoRA or residual scale too large or not finite; non-finite"
                " weights in a loaded file; a non-finite cfg or guidance; non-finite starting latents"
            )
        return denoised


def per_sample_sigma(sigma: Tensor | float, x: Tensor) -> Tensor:
    """Sigma as a [B] tensor on x's device, from a scalar, a 0-dim tensor or a [B] tensor."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if sigma.ndim == 0:
        return sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(
            f"sigma must be a scalar or have shape [batch] = [{x.shape[0]}], got shape {list(sigma.shape)}"
        )
    return sigma
