"""Noise schedules, denoiser wrappers and k-diffusion-style samplers for the SD family and flow matching (FLUX)."""

from .denoisers import ClassifierFreeGuidance, Denoiser, DiscreteDenoiser, FiniteCheck, NonFiniteError
from .flow import FlowDenoiser, flow_sigmas, flux_shift, shift_sigmas
from .samplers import (
    SAMPLERS,
    batch_randn,
    sample_ddim,
    sample_ddim_inversion,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
)
from .schedules import DiscreteSchedule, karras_sigmas

__all__ = [
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "Denoiser",
    "DiscreteDenoiser",
    "DiscreteSchedule",
    "FiniteCheck",
    "FlowDenoiser",
    "NonFiniteError",
    "batch_randn",
    "flow_sigmas",
    "flux_shift",
    "karras_sigmas",
    "sample_ddim",
    "sample_ddim_inversion",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "shift_sigmas",
]
