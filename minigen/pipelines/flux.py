"""Text to image with FLUX.1: prompt -> T5 + CLIP -> flow-matching Euler over the transformer -> VAE.

    pipe = load_flux("flux-dev")                 # or a diffusers folder, or BFL single files
    images = pipe.generate("a red star on grass", steps=28, guidance=3.5, seed=1)   # [B, 3, H, W] in [0, 1]

Rectified flow: x_σ = (1 - σ)·x0 + σ·noise, the transformer predicts the velocity noise - x0, and
sampling walks σ from 1 to 0 (minigen/sampling/flow.py). dev takes its guidance strength as an
input (one pass per step) and shifts the σ schedule by the image size; schnell has neither and
needs about 4 steps. `true_cfg` other than 1 adds classical classifier-free guidance with a negative
prompt (two passes per step), for either model.

Per-call controls (minigen/controls.py, kind "joint") and extra token groups
(minigen/models/flux_tokens.py) reach the transformer through `controls=` and `extra=`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from minigen.controls import BatchLayout, ControlsArg, controls_at_step
from minigen.models.flux import Flux
from minigen.models.flux_tokens import TokenGroup, image_ids, pack_latents, text_ids, unpack_latents
from minigen.models.vae import AutoencoderKL
from minigen.pipelines.memory import check_memory, decode_bytes, flux_call_bytes
from minigen.pipelines.arguments import (
    ImageStart,
    check_finite,
    check_latents,
    check_output,
    check_size,
    check_tensors,
    no_text,
    number,
    output_size,
    per_row,
    prompt_list,
    refuse_lone_pooled,
    refuse_unread_negatives,
    row_generators,
)
from minigen.sampling import (
    ClassifierFreeGuidance,
    FlowDenoiser,
    batch_randn,
    check_steps,
    noised_flow,
    sample_euler,
)
from minigen.sampling.flow import FLUX_DEV_SCHEDULE, FLUX_SCHNELL_SCHEDULE, FlowSchedule
from minigen.step_cache import FirstBlockCache
from minigen.storage import compute_device, compute_dtype
from minigen.text.t5 import MAX_LENGTH_DEV, encode_flux


@dataclass
class FluxConditioning:
    """What the transformer reads besides the latent: T5 tokens and the pooled CLIP vector."""

    txt: Tensor  # [B, T, 4096] (T5 tokens, then any Redux tokens)
    y: Tensor  # [B, 768]

    @staticmethod
    def stack(first: FluxConditioning, second: FluxConditioning) -> FluxConditioning:
        """Rows of `first` then rows of `second` (the CFG layout: negative, then positive)."""
        return FluxConditioning(torch.cat([first.txt, second.txt]), torch.cat([first.y, second.y]))


@dataclass
class FluxPipeline:
    transformer: Flux
    vae: AutoencoderKL  # the 16-channel FLUX autoencoder
    t5: nn.Module
    t5_tokenizer: object
    clip: nn.Module
    clip_tokenizer: object
    max_length: int = MAX_LENGTH_DEV  # T5 tokens: MAX_LENGTH_DEV (512) for dev, MAX_LENGTH_SCHNELL (256) for schnell
    default_size: int = 1024
    default_steps: int | None = None  # None: 28 for dev, 4 for schnell
    default_cfg: float = 1.0  # true CFG; the official models need none
    schedule: FlowSchedule | None = None  # None: FLUX.1-dev's shift by image size, or schnell's none (a folder's scheduler config)

    def __post_init__(self) -> None:
        if self.default_steps is None:
            self.default_steps = 28 if self.is_guidance_distilled else 4
        if self.schedule is None:
            self.schedule = FLUX_DEV_SCHEDULE if self.is_guidance_distilled else FLUX_SCHNELL_SCHEDULE

    @property
    def is_guidance_distilled(self) -> bool:
        """dev (and variants) take a guidance input and a resolution-dependent schedule shift."""
        return self.transformer.config.guidance_embed

    @property
    def patch(self) -> int:
        """Pixels per token side: the VAE's downsampling (8 for FLUX.1) times the 2x2 packing."""
        return 2 * self.vae.config.downsample_factor

    @property
    def default_guidance(self) -> float | None:
        return 3.5 if self.is_guidance_distilled else None

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> FluxConditioning:
        txt, y = encode_flux(self.t5, self.t5_tokenizer, self.clip, self.clip_tokenizer, prompts, self.max_length)
        return FluxConditioning(txt, y)

    def sigmas(self, steps: int, height: int, width: int) -> Tensor:
        """σ from 1 to 0 in `steps` steps, shifted as `schedule` says (dev: by the token count; schnell: not)."""
        return self.schedule.sigmas(steps, (height // self.patch) * (width // self.patch))

    def denoiser(
        self, controls: ControlsArg, layout: BatchLayout, extra: Sequence[TokenGroup] = (), cache: FirstBlockCache | None = None,
        steps: int | None = None,
    ) -> FlowDenoiser:
        """The transformer as a k-diffusion denoiser on latents [B, 16, h, w], given each step's controls, step
        and batch layout, and the run's length in steps (and a first-block cache kept across the steps)."""

        def net(x: Tensor, sigma: Tensor, txt: Tensor, y: Tensor, guidance: Tensor | None = None, *, step: int | None = None) -> Tensor:
            h, w = x.shape[-2:]
            v = self.transformer(  # computes in its dtype (σ given in it, as BFL's denoise does), returns x's
                pack_latents(x), image_ids(h // 2, w // 2).to(x.device), txt, text_ids(txt.shape[1]).to(x.device),
                sigma.to(compute_dtype(self.transformer.img_in)), y, guidance,
                extra=extra, controls=controls_at_step(controls, step, layout, steps), cache=cache,
            )
            return unpack_latents(v, h, w)

        return FlowDenoiser(net)

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str] | None = None,
        negative: str | list[str] = "",
        *,
        prompt_embeds: Tensor | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        true_cfg: float | None = None,
        seed: int = 0,
        redux: Tensor | None = None,
        extra: Sequence[TokenGroup] = (),
        controls: ControlsArg = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
        max_memory: float | None = None,
        latents: Tensor | None = None,
        output: Literal["images", "latents"] = "images",
        image: Tensor | None = None,
        mask: Tensor | None = None,
        strength: float | None = None,
        first_block_cache: float | FirstBlockCache | None = None,
    ) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] for one prompt or a list (one image each), or with
        `output="latents"` the final latents [B, 16, H/f, W/f] before decoding (f = the VAE's factor,
        vae.config.downsample_factor: 8 for FLUX.1, 4 for the toy models).

        steps: default 28 (dev) or 4 (schnell). guidance: dev's distilled guidance, default 3.5;
        schnell takes none. `true_cfg` other than 1 runs classifier-free guidance with the negative prompt at
        any scale (0 draws the negative's image; diffusers guides only above 1). Instead of prompts, `prompt_embeds` [B, T, 4096] (T5) with
        `pooled_prompt_embeds` [B, 768] (CLIP) may be given, and for true CFG the negative ones. redux:
        [B or 1, 729, 4096] tokens from `minigen.models.redux`, appended to the T5 tokens. `latents`
        [B, 16, H/f, W/f] is the starting noise at σ = 1; by default image k's comes from a CPU generator
        seeded with `seed + k` (for one image: `seed`, as in BFL's and diffusers' samplers), so image k of a
        batch is the image of a single run with `seed + k`. A step giving NaN or Inf raises
        `minigen.sampling.NonFiniteError`. A call whose estimated peak memory exceeds `max_memory` bytes
        (default: what the device has free) raises `TooLargeError` before the first step
        (minigen/pipelines/memory.py). The sampler gives each step's index to the
        `controls` (one `Controls`, or a function step -> Controls), with the batch layout of the call.

        `image`, `mask` and `strength` start from an image (image to image; with a mask, inpainting by
        masked latent blending), as in `StableDiffusion.generate`; the image is noised along the flow,
        (1 - σ) x0 + σ noise (minigen/sampling/image_start.py).

        `first_block_cache` (a threshold, e.g. 0.1; off by default) skips the transformer's blocks after
        the first at steps where the first block's change is within that relative distance of the last
        fully computed step's (minigen/step_cache.py); a `FirstBlockCache` given instead is reset here
        and counts the computed and skipped steps. It decides for the whole batch (a step is skipped
        when every row may skip it), so with it image k of a batch of different prompts may differ from
        its single run.
        """
        check_tensors(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                      negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, redux=redux, latents=latents, image=image, mask=mask)  # fmt: skip
        width, height = output_size(image, width, height, self.default_size)
        check_size(width, height, self.patch, "FLUX: the VAE's downsampling times 2x2 token patches")
        true_cfg = self.default_cfg if true_cfg is None else true_cfg  # 1 (none) for the official models, 4 for toy-flux
        check_finite(guidance=guidance, true_cfg=true_cfg)
        guidance, true_cfg = number(guidance), number(true_cfg)  # a one-element tensor: its value, on every device
        if self.is_guidance_distilled:
            guidance = self.default_guidance if guidance is None else guidance
        elif guidance is not None:
            raise ValueError(
                "this FLUX model (schnell) is not guidance-distilled and takes no guidance; drop guidance, "
                "or use true_cfg > 1 with a negative prompt for classifier-free guidance"
            )
        check_output(output)
        steps = self.default_steps if steps is None else steps
        check_steps(steps)
        guided = true_cfg != 1.0

        # the text (and Redux image tokens): the prompts' rows, under true CFG after the negatives' ([negative | positive])
        cond, batch = self.call_conditioning(guided, prompt=prompt, negative=negative, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                                             negative_prompt_embeds=negative_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                                             redux=redux)  # fmt: skip
        layout = BatchLayout.cfg(batch) if guided else BatchLayout.plain(batch)

        # the start: memory checked before any tensor of the images' size, then the noise and the image's latent
        factor = self.vae.config.downsample_factor
        shape = (batch, self.vae.config.z_channels, height // factor, width // factor)
        device = compute_device(self.transformer.img_in)
        tokens = shape[2] * shape[3] // 4 + cond.txt.shape[1] + sum(group.tokens.shape[1] for group in extra)
        denoiser = flux_call_bytes(self.transformer, layout.size, tokens)
        decoder = decode_bytes(self.vae, batch, width, height) if output == "images" else 0
        check_memory(denoiser, decoder, device, max_memory, f"{batch} image(s) of {width}x{height}")
        noise = (batch_randn(shape, row_generators(seed, batch)) if latents is None else check_latents(latents, shape)).to(device, torch.float32)
        start = ImageStart.of(self.vae, device, image, mask, strength, batch, width, height, steps, flow=True)
        sigmas = self.sigmas(steps, height, width)[start.first :].to(device)

        # the denoiser: the transformer under this call's controls, token groups (and first-block cache), then guidance
        cache = first_block_cache
        if cache is not None and not isinstance(cache, FirstBlockCache):
            cache = FirstBlockCache(cache)
        if cache is not None:
            cache.reset()  # one generation: nothing cached from another
        model = self.denoiser(controls, layout, extra, cache, steps=len(sigmas) - 1)
        if guided:
            model = ClassifierFreeGuidance(model, true_cfg)
        extra_args = {"txt": cond.txt.to(device), "y": cond.y.to(device)}
        if guidance is not None:
            extra_args["guidance"] = torch.full((layout.size,), float(guidance), device=device)

        # sampling: text to image starts from the noise itself (σ = 1)
        x = start.sample(sample_euler, model, noise, sigmas, pure=noise, noised=noised_flow, extra_args=extra_args, callback=callback,
                         disable=not progress)
        return x if output == "latents" else self.vae.decode_images(x)

    def call_conditioning(
        self, guided: bool, *, prompt: str | list[str] | None, negative: str | list[str], prompt_embeds: Tensor | None,
        pooled_prompt_embeds: Tensor | None, negative_prompt_embeds: Tensor | None, negative_pooled_prompt_embeds: Tensor | None,
        redux: Tensor | None,
    ) -> tuple[FluxConditioning, int]:  # fmt: skip
        """The conditioning of a `generate` call (its arguments, as documented there) and its number of images B:
        the prompts' B rows (with the Redux tokens), and when `guided` (true CFG) the negatives' B rows before them."""
        if not guided:
            refuse_unread_negatives("true classifier-free guidance", "true_cfg", negative=negative,
                                    negative_prompt_embeds=negative_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
        if negative_prompt_embeds is not None and not no_text(negative):
            raise ValueError("give the negative as text (negative) or as negative_prompt_embeds, not both")
        refuse_lone_pooled(prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds)

        cond = self.conditioning(prompt, prompt_embeds, pooled_prompt_embeds)
        batch = len(cond.txt)
        if redux is not None:
            if redux.dim() != 3 or len(redux) not in (1, batch) or redux.shape[-1] != cond.txt.shape[-1]:
                raise ValueError(f"redux must be image tokens [{'1' if batch == 1 else f'1 or {batch}'}, R, {cond.txt.shape[-1]}] (minigen.models.redux), "
                                 f"got {list(redux.shape)}")
            cond.txt = torch.cat([cond.txt, redux.to(cond.txt).expand(batch, -1, -1)], dim=1)
        if not guided:
            return cond, batch

        negatives = None if negative_prompt_embeds is not None else per_row(negative, batch, "negative")
        negative_cond = self.conditioning(negatives, negative_prompt_embeds, negative_pooled_prompt_embeds, "negative_")
        if len(negative_cond.txt) != batch:
            raise ValueError(f"negative_prompt_embeds has {len(negative_cond.txt)} rows for {batch} prompt rows; give one per "
                             f"prompt (one for all: .expand({batch}, -1, -1))")
        if redux is not None:  # the negative reads the same image tokens, so guidance targets the text
            negative_cond.txt = torch.cat([negative_cond.txt, cond.txt[:, -redux.shape[1] :]], dim=1)
        if negative_cond.txt.shape[1] != cond.txt.shape[1]:
            raise ValueError(f"the negative prompt's text has {negative_cond.txt.shape[1]} positions but the prompt's "
                             f"{cond.txt.shape[1]}; pass negative_prompt_embeds of the same length")
        return FluxConditioning.stack(negative_cond, cond), batch

    def conditioning(self, prompt: str | list[str] | None, embeds: Tensor | None, pooled: Tensor | None, prefix: str = "") -> FluxConditioning:
        """The prompts' conditioning, or the given embeddings' (T5 [B, T, 4096] and pooled CLIP [B, 768]); the errors
        name them `prefix`prompt_embeds and `prefix`pooled_prompt_embeds ("negative_": the negative's)."""
        if (prompt is None) == (embeds is None):
            raise ValueError("give either a prompt or prompt_embeds (not both)")
        if embeds is None:
            if any(part is None for part in (self.t5, self.t5_tokenizer, self.clip, self.clip_tokenizer)):
                raise ValueError(f"this pipeline has no text encoders to encode the {'negative ' * bool(prefix)}prompt: "
                                 f"pass {prefix}prompt_embeds and {prefix}pooled_prompt_embeds")
            return self.encode_prompt(prompt_list(prompt))
        if pooled is None:
            raise ValueError(f"FLUX reads the pooled CLIP embedding too: pass {prefix}pooled_prompt_embeds with {prefix}prompt_embeds")
        config = self.transformer.config
        if embeds.dim() != 3 or embeds.shape[-1] != config.context_in_dim or 0 in embeds.shape or pooled.shape != (len(embeds), config.vec_in_dim):
            raise ValueError(f"{prefix}prompt_embeds must be [B, T, {config.context_in_dim}] (T5) and {prefix}pooled_prompt_embeds "
                             f"[B, {config.vec_in_dim}] (CLIP), got {list(embeds.shape)} and {list(pooled.shape)}")
        return FluxConditioning(embeds, pooled)
