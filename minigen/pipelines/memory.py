"""Will a generation fit? An estimate of its peak memory, checked before the first step.

An image too large for the machine should fail at once with a number, not after minutes of
swapping or with the process killed. The estimate counts activations, not weights (they are loaded
already): a denoiser call holds about `DENOISER_FACTOR` tensors the size of one activation of its
widest stage (a UNet also a copy of its largest convolution weight, which CPU convolutions reorder),
the VAE decoder about `DECODE_FACTOR` tensors of one image's full-resolution features (`decode_images`
decodes one image at a time) plus `PIXEL_COPIES` values per pixel of every decoded image. A value
counts 4 bytes in fp32 but 3 in fp16/bf16 (`value_bytes`): norms, softmax and RoPE work in fp32 copies.
On the CPU the denoiser's and the decode's parts add up (memory the denoiser freed is not given back
before the decode); on CUDA the caching allocator reuses it, so the larger counts.

The factors come from peak RSS rises measured in fresh processes (CPU, one thread; toy-sd, toy-flux, a
FLUX of real width and the full-size SD1.5 UNet; 64 to 1024 px, batch 1 to 4, with and without CFG and
an IP-Adapter, fp32 and bf16): the worst of them set each factor, with a margin (from 256 px up
the peaks measured with them lay at 0.39 to 0.93 of the estimate on the CPU). The estimate stays
rough, and leaves out: attention maps that controls record (`RecordAttention` keeps steps x layers of
them), a tiled decode (the estimate is of a whole one), and the weights an offloaded model brings onto
the GPU. `max_memory` overrides the limit (`float("inf")` turns the check off).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from minigen.storage import compute_dtype

DENOISER_FACTOR = 44  # peaks of 25 to 42 first-stage activations (toy-sd with an IP-Adapter the most), rounded up
DECODE_FACTOR = 12  # one image's decode: 9 sufficed from 512 px on, 256 px needed 11 (SD's full-size VAE: 0.90 of 9)
PIXEL_COPIES = 80  # values per pixel of each decoded image: the rows, their concatenation, the [0, 1] images, and on the
#                    CPU what one row's decode leaves that the next does not reuse (4 images at 256 px rose 58 MiB over one)


class TooLargeError(ValueError):
    """A generation would need more memory than the device has available."""


def available_memory(device: torch.device) -> int | None:
    """Bytes free on `device`: CUDA's free memory and the blocks its caching allocator holds unused,
    or Linux's MemAvailable for the CPU; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def value_bytes(dtype: torch.dtype) -> int:
    """Bytes an activation value costs: its own, but 3 for fp16/bf16 (their fp32 temporaries)."""
    return max(dtype.itemsize, 3)


def unet_call_bytes(unet, rows: int, latent_height: int, latent_width: int) -> int:
    """Peak activation bytes of one UNet call on `rows` batch rows of latents latent_height x latent_width."""
    first_stage = unet.config.model_channels * unet.config.channel_mult[0] * latent_height * latent_width
    largest_conv = max((m.weight.numel() for m in unet.modules() if isinstance(m, nn.Conv2d)), default=0)
    return (DENOISER_FACTOR * rows * first_stage + 2 * largest_conv) * value_bytes(compute_dtype(unet.out[2]))


def flux_call_bytes(transformer, rows: int, tokens: int) -> int:
    """Peak activation bytes of one FLUX transformer call on `rows` batch rows of `tokens` image tokens."""
    return DENOISER_FACTOR * rows * tokens * transformer.config.hidden_size * value_bytes(compute_dtype(transformer.img_in))


def decode_bytes(vae, batch: int, width: int, height: int) -> int:
    """Peak bytes of decoding `batch` images of width x height: one image's features at a time, and the
    batch's pixels."""
    channels = vae.config.base_channels * vae.config.channel_mult[0]
    features = DECODE_FACTOR * channels * width * height * value_bytes(compute_dtype(vae.decoder.conv_in))
    return features + PIXEL_COPIES * batch * width * height * 4


def check_memory(denoiser: int, decoder: int, device: torch.device, max_memory: float | None, what: str) -> None:
    """Refuse a generation whose estimate (a denoiser call's and the decode's bytes) exceeds `max_memory`
    bytes (default: what `device` has free; `float("inf")` turns the check off)."""
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, (int, float)) or not max_memory > 0):
        raise ValueError(f"max_memory takes a number of bytes above 0 (float('inf') turns the check off), got {max_memory!r}")
    limit = available_memory(device) if max_memory is None else max_memory
    needed = denoiser + decoder if device.type == "cpu" else max(denoiser, decoder)
    if limit is None or math.isinf(limit) or needed <= limit:
        return
    advice = ("choose a smaller size, or draw latents (output='latents') and decode them in tiles, "
              "pipe.vae.decode_images(latents, tile_size=64)") if decoder > denoiser else "choose a smaller size or batch"
    raise TooLargeError(
        f"{what} needs about {amount(needed)} of memory (a rough estimate) but {amount(limit)} is "
        f"{'available' if max_memory is None else 'allowed'} on {device}; {advice}, or pass max_memory=float('inf') "
        "(sample.py, conduct.py, train_edlora.py: --no-memory-check) to try anyway"
    )


def amount(size: float) -> str:
    """Bytes in GiB, or in MiB below one GiB."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
