"""Will a generation fit? An estimate of its peak memory, checked before the first step.

An image too large for the machine should fail at once with a number, not after minutes of
swapping or with the process killed. The estimate counts activations, not weights (they are loaded
already): a denoiser call holds about `DENOISER_FACTOR` tensors the size of one activation of its
widest stage, and the VAE decoder about `DECODE_FACTOR` tensors of its full-resolution features.
Both factors were measured on the toy models (peak RSS over one call, 512 to 2048 px, CPU, fp32) and
rounded up; the estimate is rough (toy-sd at 1024 px, one thread: a decode's peak rise 0.97 GiB and a
whole one-step generation's 1.02 GiB, against 1.125 GiB estimated) and can be overridden with `max_memory`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from minigen.storage import compute_dtype

DENOISER_FACTOR = 24  # toy-sd, CFG batch of 2 at 1024 px: 817 MiB peak / 33.5 MiB of first-level activation
DECODE_FACTOR = 9  # toy-sd VAE decode at 1024 and 2048 px: 875 / 128 MiB and 3588 / 512 MiB; 8 fell short of a whole generation


class TooLargeError(ValueError):
    """A generation would need more memory than the device has available."""


def available_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: CUDA's free memory, or Linux's MemAvailable for the CPU; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def unet_call_bytes(unet, rows: int, latent_height: int, latent_width: int) -> int:
    """Peak activation bytes of one UNet call on `rows` batch rows of latents latent_height x latent_width."""
    first_stage = unet.config.model_channels * unet.config.channel_mult[0] * latent_height * latent_width
    return DENOISER_FACTOR * rows * first_stage * compute_dtype(unet.out[2]).itemsize


def decode_bytes(vae, width: int, height: int) -> int:
    """Peak activation bytes of decoding images of width x height (`decode_images` decodes one row at a time)."""
    channels = vae.config.base_channels * vae.config.channel_mult[0]
    return DECODE_FACTOR * channels * width * height * compute_dtype(vae.decoder.conv_in).itemsize


def check_memory(needed: int, device: torch.device, max_memory: float | None, what: str) -> None:
    """Refuse a generation whose estimate exceeds `max_memory` bytes (default: what `device` has free;
    `float("inf")` turns the check off)."""
    limit = available_memory(device) if max_memory is None else max_memory
    if limit is None or math.isinf(limit) or needed <= limit:
        return
    raise TooLargeError(
        f"{what} needs about {needed / 2**30:.1f} GiB of memory (a rough estimate) but {limit / 2**30:.1f} GiB "
        f"is {'available' if max_memory is None else 'allowed'} on {device}; choose a smaller size or batch, "
        "or pass max_memory=float('inf') (sample.py, conduct.py: --no-memory-check) to try anyway"
    )
