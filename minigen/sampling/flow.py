"""Flow matching (rectified flow) in k-diffusion's terms: the sigmas and the denoiser of FLUX.

FLUX (like SD3) is trained on straight lines between a clean latent x0 and Gaussian noise,

    x_sigma = (1 - sigma) * x0 + sigma * noise,        sigma in [0, 1],

and its network predicts the velocity along the line, v = d x_sigma / d sigma = noise - x0. One velocity at
a known (x, sigma) gives both ends of the line: x0 = x - sigma * v and noise = x + (1 - sigma) * v.

Sampling with the samplers of samplers.py. They need a denoiser D(x, sigma) ~ x0 and decreasing sigmas:

- `FlowDenoiser` returns D = x - sigma * v. The ODE those samplers integrate, dx/dsigma = (x - D) / sigma,
  is then dx/dsigma = v, the flow itself, so `sample_euler`'s step x + (sigma_next - sigma) * (x - D) / sigma
  is the flow Euler step x + (sigma_next - sigma) * v of BFL's `denoise` and diffusers'
  FlowMatchEulerDiscreteScheduler. `sample_ddim` with eta 0 is the same step. The other samplers are
  derived for the SD family's latent x = x0 + sigma * eps: the fresh noise of `sample_euler_ancestral` and
  `sample_ddim` (eta > 0) and the rescaling of `sample_ddim_inversion` are wrong for flow, and
  `sample_dpmpp_2m`, though it solves the same ODE, is not diffusers' flow DPM-Solver (which steps in
  log((1 - sigma) / sigma)) and is not checked against it.
- `flow_sigmas(n, shift)` gives the n + 1 sigmas, from 1 down to 0; `FlowSchedule` says which shift a model
  takes (fixed, or by the image's token count), as a diffusers folder's scheduler config says it.

Starting noise. sigma_max = 1 and x_1 = noise: a sampler starts from the noise itself, not from
noise * sqrt(sigma^2 + 1) as some SD samplers do. Starting part-way from an image (img2img) at sigma means
x = (1 - sigma) * x0 + sigma * noise, not x0 + sigma * noise.

Classifier-free guidance. `ClassifierFreeGuidance` (denoisers.py) works unchanged on a `FlowDenoiser`:
both halves share x and sigma and D is affine in v, so

    D_u + w * (D_c - D_u) = x - sigma * (v_u + w * (v_c - v_u)),

guidance on x0 is guidance on the velocity (SD3's CFG, diffusers' `true_cfg_scale` for FLUX). The
"guidance" of FLUX.1-dev is something else: a number the guidance-distilled network takes as an input, to
pass through `extra_args` like any other conditioning.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from .denoisers import per_sample_sigma


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """The timestep shift of SD3 (Esser et al. 2024, eq. 23): sigma' = s * sigma / (1 + (s - 1) * sigma).

    It keeps 0 and 1 fixed and, for s > 1, pushes every sigma in between towards 1, so more of the steps are
    spent at high noise, where the global layout of the image is decided; s = 1 changes nothing. In terms of
    the signal-to-noise ratio, (1 - sigma') / sigma' = ((1 - sigma) / sigma) / s. BFL writes the same
    function as e^mu / (e^mu + 1 / sigma - 1) with s = e^mu. Computed in the dtype of `sigmas`.
    """
    if not 0 < shift < math.inf:  # NaN too
        raise ValueError(f"shift must be > 0 (1 leaves the sigmas unchanged), got {shift}")
    if sigmas.numel() and not (sigmas.min() >= 0 and sigmas.max() <= 1):
        raise ValueError(
            f"flow sigmas must lie in [0, 1], got values in [{sigmas.min().item():.4g}, {sigmas.max().item():.4g}];"
            " sigmas of a DiscreteSchedule (SD family) are not flow sigmas"
        )
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The shift FLUX.1-dev uses for an image of `image_seq_len` tokens: s = e^mu, mu linear in the token count.

    mu runs through (base_seq_len, base_shift) and (max_seq_len, max_shift), the defaults of BFL's
    `get_schedule` and of the FLUX.1-dev scheduler config. Like there it is not clamped, so images beyond
    4096 tokens get a larger shift. A token is a 2x2 patch of the 1/8-scale latent: a 1024x1024 image has
    64 * 64 = 4096 tokens (s = e^1.15 = 3.16), a 512x512 one 1024 tokens (s = e^0.63 = 1.88).
    """
    if image_seq_len < 1:
        raise ValueError(f"image_seq_len must be the number of image tokens (>= 1), got {image_seq_len}")
    if max_seq_len == base_seq_len:
        raise ValueError(f"max_seq_len and base_seq_len must differ to define a line, both are {max_seq_len}")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    intercept = base_shift - slope * base_seq_len
    return math.exp(slope * image_seq_len + intercept)


@dataclass(frozen=True)
class FlowSchedule:
    """How a flow-matching model shifts its sigmas: by `flux_shift` of the image's token count with these
    fields (`dynamic`: FLUX.1-dev, whose defaults these are), or by the fixed `shift` (FLUX.1-schnell: 1)."""

    dynamic: bool = True
    shift: float = 1.0
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096

    def sigmas(self, steps: int, image_seq_len: int) -> Tensor:
        """The [steps + 1] sigmas of an image of `image_seq_len` tokens."""
        if not self.dynamic:
            return flow_sigmas(steps, self.shift)
        return flow_sigmas(steps, flux_shift(image_seq_len, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift))

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> FlowSchedule:
        """A diffusers `FlowMatchEulerDiscreteScheduler` config (scheduler_config.json, parsed). Its options that
        change the sigmas otherwise (Karras, exponential or beta sigmas, a terminal shift, ...) are refused, as
        is another scheduler class: the config says how the model was meant to be sampled."""
        kind = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if kind != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"scheduler {kind!r}: minigen's FLUX pipeline samples with the sigmas of FlowMatchEulerDiscreteScheduler")
        unread = {name: config[name] for name, plain in FLOW_OPTIONS_NOT_READ.items() if config.get(name, plain) != plain}
        if unread:
            raise ValueError(f"scheduler options {unread}: minigen's flow sigmas do not take them (the official FLUX.1 configs "
                             "leave them out); remove them from scheduler_config.json to sample as FLUX.1 does")
        dynamic = config.get("use_dynamic_shifting", False)
        if not isinstance(dynamic, bool):
            raise ValueError(f"scheduler config: use_dynamic_shifting must be true or false, got {dynamic!r}")
        names = {"base_shift": "base_shift", "max_shift": "max_shift", "base_seq_len": "base_image_seq_len", "max_seq_len": "max_image_seq_len"}
        read = {"shift": "shift", **names} if dynamic else {"shift": "shift"}  # a fixed shift leaves the others unread (null allowed)
        values = {field: config.get(key, getattr(cls, field)) for field, key in read.items()}
        if bad := [read[f] for f, v in values.items() if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v)]:
            raise ValueError(f"scheduler config: {', '.join(bad)} must be {'a number' if len(bad) == 1 else 'numbers'}, got {[config.get(k) for k in bad]}")
        schedule = cls(dynamic=dynamic, **values)
        if schedule.shift <= 0 or schedule.base_seq_len == schedule.max_seq_len:
            raise ValueError(f"scheduler config: shift {schedule.shift} must be > 0, and base_image_seq_len and max_image_seq_len must differ")
        return schedule


# FlowMatchEulerDiscreteScheduler's options that minigen does not read, with the value that changes nothing.
FLOW_OPTIONS_NOT_READ = {"num_train_timesteps": 1000, "shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                         "use_beta_sigmas": False, "invert_sigmas": False, "stochastic_sampling": False, "time_shift_type": "exponential"}  # fmt: skip
FLUX_DEV_SCHEDULE, FLUX_SCHNELL_SCHEDULE = FlowSchedule(), FlowSchedule(dynamic=False)  # BFL's get_schedule(shift=True / False)


def flow_sigmas(steps: int, shift: float = 1.0) -> Tensor:
    """Sigmas for `steps` flow-matching steps: 1, 1 - 1/n, ..., 1/n, shifted, then 0. [steps + 1] float32.

    The shift is 1 for FLUX.1-schnell, `flux_shift(image_seq_len)` for FLUX.1-dev and 3 for SD3. This is
    the schedule of BFL's `get_schedule` and of diffusers' FluxPipeline, which hands
    FlowMatchEulerDiscreteScheduler `sigmas = np.linspace(1, 1/n, n)` (float64); the scheduler casts them to
    float32 and shifts in float32, as done here. The result is bit-identical for a fixed shift and within
    2 float32 ulps (1.2e-7) with dynamic shifting, where diffusers rounds BFL's form of the same function.

    diffusers' StableDiffusion3Pipeline passes no sigmas; the scheduler then spaces sigmas linearly from 1
    down to the shifted sigma of training step 1 (0.003 for shift 3) and shifts them again, a different
    schedule from this one.
    """
    if steps < 1:
        raise ValueError(f"number of steps must be >= 1, got {steps}")
    linear = torch.from_numpy(np.linspace(1.0, 1.0 / steps, steps)).float()
    sigmas = shift_sigmas(linear, shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


class FlowDenoiser:
    """k-diffusion denoiser around a velocity network `net(x, sigma, step=i, **extra) -> v`: D(x, sigma) = x - sigma * v.

    The network sees the latent as is (no input scaling) and sigma itself as its timestep, a [B] tensor in
    [0, 1] in the dtype of the schedule (float32); FLUX multiplies it by 1000 inside its timestep embedding.

    With this D, `sample_euler` computes d = (x - D) / sigma = v and takes the flow Euler step
    x + (sigma_next - sigma) * v (see the module docstring). The only difference from stepping with v
    directly is float rounding in x - (x - sigma * v), about one ulp of x divided by sigma per step: over a
    FLUX schedule this stays below 1e-5 (tests/test_flow.py).
    """

    def __init__(self, net: Callable[..., Tensor]) -> None:
        self.net = net

    def __call__(self, x: Tensor, sigma: Tensor, *, step: int | None = None, **extra_args: Any) -> Tensor:
        sigma = per_sample_sigma(sigma, x)  # [B]
        v = self.net(x, sigma, step=step, **extra_args)
        s = sigma.to(x.dtype).view(-1, *[1] * (x.ndim - 1))  # [B, 1, ..., 1]
        return x - s * v
