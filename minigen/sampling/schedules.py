"""Noise schedules of the SD family, written as sigmas (k-diffusion's view).

SD1.x, SD2.x and SDXL were trained as discrete DDPMs. Training step t in 0..T-1 (T = 1000) noises a clean
latent x0 as

    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps,        abar_t = prod_{s <= t} (1 - beta_s)

Dividing by sqrt(abar_t) gives the "variance exploding" form that k-diffusion samplers work in:

    x = x0 + sigma_t * eps,                                   sigma_t = sqrt((1 - abar_t) / abar_t)

so a sampler only needs a decreasing list of sigmas, and the network only needs to know which t a sigma
belongs to. For the SD schedule ("scaled_linear", beta 0.00085..0.012) sigma runs from 0.0292 (t = 0) to
14.6146 (t = 999).

A sampling run visits n of the T training steps. diffusers offers three ways to choose them
(Table 2 of https://arxiv.org/abs/2305.08891), reproduced here exactly as DDIMScheduler and
EulerDiscreteScheduler compute them, e.g. for n = 10 and T = 1000:

    "leading"  (+ steps_offset 1, the SD1.5 and SDXL configs): 901, 801, ..., 101, 1
    "trailing":                                                 999, 899, ..., 199, 99
    "linspace":                                                 999, 888, ..., 111, 0  (fractional in general)

Every sigma schedule returned here is a float32 tensor of n + 1 decreasing sigmas whose last entry is 0.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

BetaSchedule = Literal["scaled_linear", "linear"]
PredictionType = Literal["epsilon", "v"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]
Precision = Literal["float64", "float32"]

_BETA_SCHEDULES = ("scaled_linear", "linear")
_PREDICTION_TYPES = ("epsilon", "v")
_SPACINGS = ("leading", "trailing", "linspace")
_PRECISIONS = ("float64", "float32")


@dataclass(frozen=True)
class DiscreteSchedule:
    """The discrete DDPM schedule a model was trained with, and how to pick n sampling steps from it.

    The defaults are the SD1.5 / SDXL scheduler configs. `prediction_type` says what the network outputs:
    the noise ("epsilon": SD1.x, SDXL, SD2-base) or the velocity ("v": SD2.x-768). `precision` is the
    arithmetic of the betas and their cumulative product: "float64" (the original SD code's, and the
    default) or "float32" (diffusers' schedulers, so the official method codes built on them: near t = 0
    their sigmas differ by ~1e-5 relative, abar being ~0.999 in float32; Concept Conductor's 999-step
    inversion then agrees with the official one ~50x more closely).
    """

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = "scaled_linear"
    num_train_timesteps: int = 1000
    prediction_type: PredictionType = "epsilon"
    timestep_spacing: TimestepSpacing = "leading"
    steps_offset: int = 1
    precision: Precision = "float64"

    def __post_init__(self) -> None:
        _check_choice("precision", self.precision, _PRECISIONS)
        _check_choice("beta_schedule", self.beta_schedule, _BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, _PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, _SPACINGS)
        betas = (self.beta_start, self.beta_end)
        if not all(isinstance(b, numbers.Real) and not isinstance(b, bool) and math.isfinite(b) for b in betas) or not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"beta_start {self.beta_start!r} and beta_end {self.beta_end!r}: a DDPM schedule needs numbers with "
                             "0 < beta_start < beta_end < 1 (SD's: 0.00085 and 0.012)")
        for name, value, least in (("num_train_timesteps", self.num_train_timesteps, 2), ("steps_offset", self.steps_offset, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{name} must be a whole number of at least {least}, got {value!r}")
        if self.steps_offset >= self.num_train_timesteps:
            raise ValueError(f"steps_offset {self.steps_offset} lies past the last timestep ({self.num_train_timesteps - 1})")

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> DiscreteSchedule:
        """Read a diffusers `scheduler_config.json` (already parsed into a dict).

        A config without `timestep_spacing` (SD1.5's, written before the option existed) means "leading":
        the default of the PNDM and DDIM classes it names, and what the original ldm code did. Beware that
        diffusers' Euler and DPM-Solver classes default to "linspace" when they load such a config.
        Sampler choices in a config (`use_karras_sigmas`, `set_alpha_to_one`, ...) are not part of the
        schedule: pick them when sampling (`karras_sigmas`, samplers.py).
        """
        kind = config.get("_class_name", "")
        if kind.startswith(("EDM", "FlowMatch")) or "beta_schedule" not in config and kind:
            raise ValueError(f"scheduler {kind!r} has no DDPM beta schedule; minigen's SD pipelines take the discrete "
                             "schedules of SD1.x, SD2.x and SDXL (beta_start, beta_end, beta_schedule)")
        if config.get("trained_betas") is not None:
            raise ValueError("trained_betas is not supported: use beta_schedule 'scaled_linear' or 'linear'")
        if config.get("rescale_betas_zero_snr"):
            raise ValueError("rescale_betas_zero_snr is not supported: its final sigma is infinite")
        prediction_type = {"epsilon": "epsilon", "v_prediction": "v"}.get(config.get("prediction_type", "epsilon"))
        if prediction_type is None:
            raise ValueError(
                f"prediction_type {config['prediction_type']!r} is not supported: expected 'epsilon' or 'v_prediction'"
            )
        return cls(
            beta_start=config.get("beta_start", 0.0001),
            beta_end=config.get("beta_end", 0.02),
            beta_schedule=config.get("beta_schedule", "linear"),
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            prediction_type=prediction_type,
            timestep_spacing=config.get("timestep_spacing", "leading"),
            steps_offset=config.get("steps_offset", 0),
        )

    # -- the training schedule -----------------------------------------------------------------------------

    def betas(self) -> Tensor:
        """Per-step noise variances beta_t, [T] float64 (computed in `precision`)."""
        return self._betas().double()

    def alphas_cumprod(self) -> Tensor:
        """abar_t = prod_{s <= t} (1 - beta_s), the signal fraction left at step t, [T] float64 (computed in `precision`)."""
        return torch.cumprod(1.0 - self._betas(), dim=0).double()

    def _betas(self) -> Tensor:
        """beta_t in `precision`'s dtype."""
        T, dtype = self.num_train_timesteps, getattr(torch, self.precision)
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, T, dtype=dtype)
        # "scaled_linear": linear in sqrt(beta), the schedule of the original SD code
        return torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=dtype) ** 2

    def train_sigmas(self) -> Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t) for every training step, increasing, [T] float64."""
        abar = self.alphas_cumprod()
        return ((1.0 - abar) / abar).sqrt()

    @property
    def sigma_min(self) -> float:
        """Sigma of the least noisy training step t = 0 (0.0292 for SD)."""
        return self.train_sigmas()[0].item()

    @property
    def sigma_max(self) -> float:
        """Sigma of the noisiest training step t = T - 1 (14.6146 for SD)."""
        return self.train_sigmas()[-1].item()

    # -- timestep <-> sigma ----------------------------------------------------------------------------------

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at (possibly fractional) timesteps t, interpolating log-sigma linearly between steps."""
        log_sigmas = self.train_sigmas().log()
        t = t.to(torch.float64).clamp(0, self.num_train_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - low
        return torch.exp((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Inverse of `t_to_sigma`: the (fractional) timestep of each sigma, float32 on sigma's device.

        Exact for the sigmas of training steps: the lookup table is the float32 log of the same float32
        sigmas a schedule holds, so such a sigma lands exactly on its integer t. Sigmas outside the
        training range are clamped to t = 0 or t = T - 1.
        """
        log_sigmas = self.train_sigmas().float().log().to(sigma.device)  # [T], increasing
        log_sigma = sigma.float().log()
        high = torch.searchsorted(log_sigmas, log_sigma).clamp(1, len(log_sigmas) - 1)
        low = high - 1
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        return low + w.clamp(0, 1)

    # -- choosing n sampling steps ---------------------------------------------------------------------------

    def timesteps(self, n: int) -> Tensor:
        """The n training timesteps a sampler visits, decreasing, [n] float64 (see the module docstring)."""
        T = self.num_train_timesteps
        check_steps(n, most=T)
        if self.timestep_spacing == "leading":
            t = torch.arange(n, dtype=torch.float64) * (T // n) + self.steps_offset
        elif self.timestep_spacing == "trailing":
            t = _trailing(T, n)
        else:  # "linspace"
            t = torch.linspace(0, T - 1, n, dtype=torch.float64)
        if t.max() > T - 1:
            raise ValueError(
                f"steps_offset {self.steps_offset} with {n} 'leading' steps reaches timestep {int(t.max())} > {T - 1}:"
                " use fewer steps, steps_offset=0, or timestep_spacing='trailing'"
            )
        return t.flip(0)

    def sigmas(self, n: int) -> Tensor:
        """Sigmas of `timesteps(n)` followed by a final 0, [n + 1] float32, decreasing."""
        return self.sigmas_at(self.timesteps(n))

    def sigmas_at(self, timesteps: Sequence[int] | Tensor) -> Tensor:
        """Sigmas of given training timesteps, strictly decreasing in 0..T-1 (a schedule of one's own, as
        diffusers' `timesteps=`: Align Your Steps' SD1.5 timesteps 999, 850, 736, 645, 545, 455, 343, 233,
        124, 24), followed by a final 0, [n + 1] float32."""
        T = self.num_train_timesteps
        try:
            t = torch.as_tensor(timesteps, dtype=torch.float64)
        except (TypeError, ValueError):  # text, None, lists of lists of another length: no numbers
            t = torch.empty(0)
        if t.dim() != 1 or len(t) == 0 or not bool(t.isfinite().all()) or bool((t[1:] >= t[:-1]).any()) or t.min() < 0 or t.max() > T - 1:
            raise ValueError(f"timesteps must be strictly decreasing numbers in 0..{T - 1}, e.g. [999, 850, ..., 24]; got {timesteps!r:.100}")
        return _append_zero(self.t_to_sigma(t))


def check_steps(steps, most: int | None = None) -> None:
    """A sampler's number of steps: a whole number from 1 (to `most`, the training timesteps), else a ValueError."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1 or (most is not None and steps > most):
        span = f"1..{most} (num_train_timesteps)" if most is not None else "at least 1"
        raise ValueError(f"the number of steps must be a whole number, {span}; got {steps!r}")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The schedule of Karras et al. 2022 (EDM, eq. 5): n sigmas evenly spaced in sigma^(1/rho), then 0.

    With sigma_min, sigma_max = schedule.sigma_min, schedule.sigma_max this is diffusers'
    `use_karras_sigmas=True`. Returns [n + 1] float32, decreasing.
    """
    if n < 1:
        raise ValueError(f"karras_sigmas needs n >= 1 steps, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras_sigmas needs 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def lcm_sigmas(schedule: DiscreteSchedule, n: int, original_steps: int = 50) -> Tensor:
    """The n steps LCMScheduler visits, as sigmas: some of the `original_steps` timesteps LCM was distilled on.

    Distillation used the timesteps k - 1, 2k - 1, ..., original_steps * k - 1 with k = T // original_steps
    (19, 39, ..., 999 for SD). Sampling walks them from the top and takes every (original_steps / n)-th, the
    index i * (original_steps / n) rounded down (computed in float64, as diffusers does): n = 4 gives 999, 759,
    499, 259. Returns [n + 1] float32, decreasing, ending in 0.
    """
    T = schedule.num_train_timesteps
    if not 1 <= original_steps <= T:
        raise ValueError(f"original_steps must be in 1..{T} (num_train_timesteps), got {original_steps}")
    if not 1 <= n <= original_steps:
        raise ValueError(f"LCM takes 1..{original_steps} steps (original_steps), got {n}")
    k = T // original_steps
    distilled = torch.arange(original_steps, 0, -1, dtype=torch.float64) * k - 1  # [original_steps], decreasing
    picked = (torch.arange(n, dtype=torch.float64) * (original_steps / n)).floor().long()
    return _append_zero(schedule.t_to_sigma(distilled[picked]))


def _trailing(T: int, n: int) -> Tensor:
    """diffusers' "trailing" steps, increasing: round(T/n, ..., T - T/n, T) - 1.

    Computed with numpy's arange, whose float steps decide the ties at .5 exactly as in diffusers. For some
    n (61, 103, ...) that arange yields one value too many (about 0); keeping the first n drops it.
    """
    return torch.from_numpy(np.round(np.arange(T, 0, -T / n))[:n] - 1).flip(0)


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
