"""Noise schedules, denoiser wrappers and k-diffusion-style samplers for the SD family and flow matching (FLUX)."""

from typing import Callable

from torch import Tensor

from .denoisers import ClassifierFreeGuidance, Denoiser, DiscreteDenoiser, FiniteCheck, NonFiniteError
from .flow import FlowDenoiser, flow_sigmas, flux_shift, shift_sigmas
from .image_start import InpaintDenoiser, latent_mask, noised_flow, noised_ve, start_index
from .samplers import (
    batch_randn,
    sample_ddim,
    sample_ddim_inversion,
    sample_dpm_2,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_unipc,
)
from .samplers_sde import brownian_increments, sample_dpmpp_2m_sde, sample_dpmpp_sde, sample_lcm
from .schedules import DiscreteSchedule, check_steps, karras_sigmas, lcm_sigmas

# The samplers for generation, by the name pipelines and scripts/sample.py take. DDIM inversion walks the
# sigmas upwards, from an image to noise: it is called directly (sample_ddim_inversion), not listed here.
SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_sde": sample_dpmpp_sde,
    "ddim": sample_ddim,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
}

__all__ = [
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "Denoiser",
    "DiscreteDenoiser",
    "DiscreteSchedule",
    "FiniteCheck",
    "FlowDenoiser",
    "InpaintDenoiser",
    "NonFiniteError",
    "batch_randn",
    "brownian_increments",
    "check_steps",
    "flow_sigmas",
    "flux_shift",
    "karras_sigmas",
    "latent_mask",
    "lcm_sigmas",
    "noised_flow",
    "noised_ve",
    "sample_ddim",
    "sample_ddim_inversion",
    "sample_dpm_2",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sample_unipc",
    "shift_sigmas",
    "start_index",
]
