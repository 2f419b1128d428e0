"""The training objectives of the two model families, as plain functions of a batch.

    diffusion_loss   SD (DDPM):                x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε,   ‖ε̂(x_t, t, c) - ε‖²
                     (v-prediction models, SD2-768-v: ‖v̂ - (√ᾱ_t·ε - √(1-ᾱ_t)·x0)‖²)
    flow_loss        FLUX (rectified flow):     x_σ = (1-σ)·x0 + σ·ε,           ‖v̂(x_σ, σ, c) - (ε - x0)‖²

Both draw their noise and times from an explicit generator, so a seed reproduces a run, and both
take the call's `controls`, so a method trains through the same explicit arguments it samples with
(Personalized Residuals train their `LowRank` factors this way, with the base weights frozen).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from minigen.controls import Controls
from minigen.models.flux import Flux
from minigen.models.flux_tokens import TokenGroup, image_ids, pack_latents, text_ids
from minigen.models.unet import UNet
from minigen.sampling import DiscreteSchedule, shift_sigmas


def diffusion_loss(
    unet: UNet,
    schedule: DiscreteSchedule,
    latents: Tensor,
    context: Tensor | None,
    y: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    controls: Controls | None = None,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
) -> Tensor:
    """Mean squared error of the prediction at uniformly drawn integer timesteps: of the noise, or for a
    schedule with `prediction_type="v"` of the velocity v = √ᾱ_t·ε - √(1-ᾱ_t)·x0 (diffusers' get_velocity).

    latents: [B, C, h, w] scaled VAE latents; context: [B, T, C_ctx] text states (None when
    `controls.contexts` gives every cross-attention layer its own); y: SDXL's vector.
    snr_gamma: Min-SNR-γ weighting (Hang et al., 2023): each sample's error is weighted by
    min(SNR_t, γ) / SNR_t with SNR_t = ᾱ_t / (1 - ᾱ_t) (for v-prediction min(SNR_t, γ) / (SNR_t + 1)),
    which lowers the weight of the nearly clean steps and leaves the noisier ones, where layout and shape
    form, at 1. None: the plain mean.
    noise_offset: "offset noise", ε + offset · N(0, 1) per sample and channel [B, C, 1, 1], which
    lets a model learn to shift an image's mean brightness (ED-LoRA trains with 0.01).
    """
    b = latents.shape[0]
    t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(*latents.shape[:2], 1, 1, generator=generator).to(latents)
    abar = schedule.alphas_cumprod().to(latents)[t].view(b, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    prediction = unet(noisy, t.float(), context, y, controls=controls)
    v = schedule.prediction_type == "v"
    target = abar.sqrt() * noise - (1 - abar).sqrt() * latents if v else noise
    if snr_gamma is None:
        return F.mse_loss(prediction, target)
    snr = abar.flatten() / (1 - abar.flatten())
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)  # [B]
    return (per_sample * snr.clamp(max=snr_gamma) / (snr + 1 if v else snr)).mean()


def flow_loss(
    flux: Flux,
    latents: Tensor,
    txt: Tensor,
    y: Tensor,
    *,
    guidance: float | None = None,
    generator: torch.Generator | None = None,
    controls: Controls | None = None,
    extra: Sequence[TokenGroup] = (),
    shift: float = 1.0,
) -> Tensor:
    """Mean squared error of the predicted velocity at logit-normal times σ = sigmoid(N(0, 1)), moved
    towards noise by SD3's timestep shift when `shift` > 1 (`shift_sigmas`; 3 puts 14 % of the times
    above σ = 0.9, where the layout is decided, against 1.4 % unshifted).

    latents: [B, 16, h, w] scaled FLUX latents; txt: [B, T, context_in_dim]; y: [B, vec_in_dim].
    A guidance-distilled model is given `guidance` (OminiControl trains dev with 1); `extra` token
    groups join the sequence as at sampling (OminiControl's condition tokens, with their LoRA).
    """
    b, _, h, w = latents.shape
    sigma = shift_sigmas(torch.sigmoid(torch.randn(b, generator=generator)), shift).to(latents)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    s = sigma.view(b, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    g = None if guidance is None else torch.full((b,), float(guidance), device=latents.device)
    v = flux(
        pack_latents(noisy), image_ids(h // 2, w // 2).to(latents.device), txt, text_ids(txt.shape[1]).to(latents.device),
        sigma, y, g, extra=extra, controls=controls,
    )
    return F.mse_loss(v, pack_latents(noise - latents))
