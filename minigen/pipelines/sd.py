"""Text to image with the SD family: prompt -> conditioning -> sampler over the UNet -> VAE decode.

    pipe = load_sd("sd15")                       # or a hub id, a single file, a diffusers folder
    images = pipe.generate("a red star on grass", steps=25, cfg=7.5, seed=1)   # [B, 3, H, W] in [0, 1]

    images = pipe.generate("a red star on sand", image=photo, strength=0.6)     # image to image
    images = pipe.generate("a blue box", image=photo, mask=mask)                # inpainting (mask 1 = repaint)

The loop itself is `minigen.sampling`: this class only wires the parts, so every step is visible.
Per-call controls (minigen/controls.py) reach the UNet through `controls=`, either one `Controls`
for every step or a function `step -> Controls | None` that builds them step by step; each step's
controls are told the step index and the batch layout (under CFG: [uncond rows | cond rows]).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from minigen.controls import BatchLayout, ControlsArg, controls_at_step
from minigen.models.unet import UNet, sdxl_vector
from minigen.models.vae import AutoencoderKL
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
    whole,
)
from minigen.pipelines.memory import check_memory, decode_bytes, unet_call_bytes
from minigen.sampling import (
    SAMPLERS,
    ClassifierFreeGuidance,
    DiscreteDenoiser,
    DiscreteSchedule,
    batch_randn,
    check_steps,
    karras_sigmas,
    lcm_sigmas,
    noised_ve,
)
from minigen.storage import compute_device
from minigen.step_cache import DeepCache
from minigen.loading.textual_inversion import expand_textual_inversion
from minigen.text.encoders import encode_sd1, encode_sdxl, sdxl_time_ids
from minigen.text.weighting import chunk_count, encode_sd1_weighted, encode_sdxl_weighted

PromptSyntax = Literal["plain", "a1111"]


# The samplers whose diffusers schedulers give the network rounded timesteps with Karras sigmas
# (DPMSolverMultistep, UniPC); Euler, Heun, DPM++ SDE do not, KDPM2 only at its main sigmas.
ROUNDED_WITH_KARRAS = ("dpmpp_2m", "dpmpp_2m_sde", "unipc")
SAMPLER_ARGUMENTS = {"model", "x", "sigmas", "extra_args", "callback", "disable", "generator"}  # what generate passes


NOISE_OPTIONS = ("eta", "s_noise", "timestep_scaling")  # amounts: finite and not negative


def sampler_keywords(sampler: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` checked against the sampler's own keyword options (e.g. eta, s_noise, noise_sampler); a
    number among them must be finite (an eta of Inf made the last step's noise Inf * 0, a NaN image), an
    amount of noise (`NOISE_OPTIONS`) a number and not negative, and LCM's schedule a `DiscreteSchedule`."""
    parameters = inspect.signature(SAMPLERS[sampler]).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        own = sorted({p.name for p in parameters if p.kind is not p.VAR_POSITIONAL} - SAMPLER_ARGUMENTS)
        if unknown := sorted(set(options) - set(own)):
            raise ValueError(f"sampler_options {unknown}: not options of the {sampler} sampler, which takes {own or 'none'}")
    options = {name: number(value) for name, value in options.items()}  # a one-element tensor: its value
    for name, value in options.items():
        if name in NOISE_OPTIONS and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise TypeError(f"sampler_options[{name!r}] takes a number (an amount of noise), got {value!r:.40}")
        if name == "schedule" and not isinstance(value, DiscreteSchedule):
            raise TypeError(f"sampler_options['schedule'] takes a DiscreteSchedule (LCM's map from sigma to timestep; left out: the model's), "
                            f"got {value!r:.40}")
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            if not math.isfinite(value) or (name in NOISE_OPTIONS and value < 0):
                raise ValueError(f"sampler_options[{name!r}] must be a finite number{' of 0 or more' if name in NOISE_OPTIONS else ''}, got {value}")
    return options


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's size and crop micro-conditioning (diffusers' original_size, crops_coords_top_left,
    target_size): draw as if from an image of `original` (height, width) pixels, cropped at
    `crop_top_left` (top, left) and framed as `target` (height, width). None: the output size; the
    default is a centred, uncropped image of the output size."""

    original: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    target: tuple[int, int] | None = None

    def __post_init__(self):
        for name, minimum in (("original", 1), ("crop_top_left", 0), ("target", 1)):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Sequence) or len(value) != 2 or not all(whole(v) and v >= minimum for v in value)):
                raise ValueError(f"SizeConditioning.{name} must be two integers >= {minimum} (height, width; crop: top, left), got {value!r}")

    def time_ids(self, height: int, width: int) -> Tensor:
        """[6] for an output of height x width pixels: (original h, w, crop top, left, target h, w)."""
        return sdxl_time_ids(self.original or (height, width), self.crop_top_left, self.target or (height, width))


@dataclass
class Conditioning:
    """What the UNet reads besides the latent: the text context and, for SDXL, the vector y."""

    context: Tensor  # [B, 77, C]; [B, 77 k, C] for k chunks of a long prompt
    y: Tensor | None = None  # [B, adm_in_channels] (SDXL)

    @staticmethod
    def stack(first: Conditioning, second: Conditioning) -> Conditioning:
        """Rows of `first` then rows of `second` (the CFG layout: uncond, then cond)."""
        y = None if first.y is None else torch.cat([first.y, second.y])
        return Conditioning(torch.cat([first.context, second.context]), y)


@dataclass
class StableDiffusion:
    unet: UNet
    vae: AutoencoderKL
    text_encoders: list[nn.Module]  # [CLIP-L] for SD1.x; [CLIP-L, OpenCLIP-bigG] for SDXL
    tokenizers: list
    schedule: DiscreteSchedule = field(default_factory=DiscreteSchedule)
    default_size: int = 512  # pixels; SDXL 1024
    # SDXL: an empty negative prompt is zero embeddings, not the encoding of "" (sgm's code, SDXL base's
    # model_index.json; diffusers' force_zeros_for_empty_prompt, which a fine-tune's folder may set false)
    force_zeros_for_empty_prompt: bool = True

    @property
    def is_sdxl(self) -> bool:
        return self.unet.config.adm_in_channels is not None

    @property
    def is_inpainting(self) -> bool:
        """An inpainting UNet (SD1.5 and SDXL inpainting: 9 input channels) also reads the mask and the
        masked image's latent: [latent | mask | masked image latent] along channels."""
        return self.unet.config.in_channels == 2 * self.vae.config.z_channels + 1

    @torch.no_grad()
    def encode_prompt(
        self, prompts: list[str], height: int, width: int, *, clip_skip: int = 0,
        syntax: PromptSyntax = "plain", min_chunks: int = 1, sizes: SizeConditioning = SizeConditioning(),
        prompts_2: list[str] | None = None,
    ) -> Conditioning:  # fmt: skip
        """Text conditioning of `prompts` for an image of height x width pixels (SDXL: with `sizes`);
        `clip_skip` skips final text-encoder layers (see `encode_sd1`, `encode_sdxl`); SDXL's `prompts_2`,
        one per prompt, is what its second encoder (OpenCLIP bigG) reads instead, in the "plain" syntax.

        syntax "plain" reads the prompt as diffusers does (77 tokens, longer ones cut); "a1111" as
        AUTOMATIC1111 does: `(word:1.3)`, `(word)`, `[word]` weights, BREAK, and any length in chunks of
        75 tokens, at least `min_chunks` of them (minigen/text/weighting.py). Either way a word of a
        loaded textual-inversion embedding is written out to all its vectors first."""
        prompts = expand_textual_inversion(self.tokenizers[0], list(prompts))
        encoders = [x for pair in zip(self.text_encoders, self.tokenizers) for x in pair]
        if syntax not in ("plain", "a1111"):
            raise ValueError(f"prompt syntax must be 'plain' or 'a1111', got {syntax!r}")
        if prompts_2 is not None:
            if not self.is_sdxl:
                raise ValueError("prompt_2 and negative_2 are for SDXL's second text encoder; SD1.x/SD2.x has one: drop them (encode_prompt: prompts_2)")
            if syntax != "plain":
                raise ValueError("prompt_2 and negative_2 are read in the plain prompt syntax: pass prompt_syntax='plain'")
            prompts_2 = expand_textual_inversion(self.tokenizers[1], list(prompts_2))
        if not self.is_sdxl:
            if syntax == "a1111":
                return Conditioning(encode_sd1_weighted(*encoders, prompts, clip_skip, min_chunks))
            return Conditioning(encode_sd1(*encoders, prompts, clip_skip))
        if syntax == "plain":
            context, pooled = encode_sdxl(*encoders, prompts, clip_skip, prompts_2)
        else:
            context, pooled = encode_sdxl_weighted(*encoders, prompts, clip_skip, min_chunks=min_chunks)
        time_ids = sizes.time_ids(height, width).expand(len(prompts), 6)
        size_embed_dim = (self.unet.config.adm_in_channels - pooled.shape[-1]) // 6
        return Conditioning(context, sdxl_vector(pooled, time_ids, size_embed_dim))

    def chunk_count(self, prompts: list[str]) -> int:
        """The 77-token chunks the longest of `prompts` takes in the "a1111" syntax (over every tokenizer)."""
        prompts = expand_textual_inversion(self.tokenizers[0], list(prompts))
        return max(chunk_count(tokenizer, prompts) for tokenizer in self.tokenizers)

    def pooled_width(self, pooled: Tensor | None = None) -> int:
        """The width of SDXL's pooled text embeddings: the second text encoder's projection (1280). A pipeline
        without text encoders takes that of the pooled embeddings given, `pooled` [B, width]: the UNet does not
        record it (its vector, adm_in_channels wide, is the pooled embeddings and 6 size embeddings of any one width)."""
        if self.text_encoders:
            return self.text_encoders[-1].config.projection_dim
        return pooled.shape[-1] if pooled.dim() else 0  # 0-d: refused by `conditioning`

    def conditioning(
        self, embeds: Tensor, pooled: Tensor | None, height: int, width: int, sizes: SizeConditioning = SizeConditioning(), prefix: str = ""
    ) -> Conditioning:
        """Conditioning from precomputed text embeddings [B, 77, C] (SDXL: and pooled [B, 1280], with `sizes`);
        the errors name them `prefix`prompt_embeds and `prefix`pooled_prompt_embeds ("negative_": the negative's)."""
        text_width = self.unet.config.context_dim
        if embeds.dim() != 3 or embeds.shape[-1] != text_width or 0 in embeds.shape:
            raise ValueError(f"{prefix}prompt_embeds: prompt embeddings must be [B, T, {text_width}] (this UNet's text width; B and T at least 1), "
                             f"got {list(embeds.shape)}")
        if not self.is_sdxl:
            if pooled is not None:
                raise ValueError(f"{prefix}pooled_prompt_embeds: pooled embeddings are SDXL's; an SD1.x UNet reads the text embeddings alone: drop it")
            return Conditioning(embeds)
        if pooled is None:
            raise ValueError(f"SDXL needs the pooled text embeddings too: pass {prefix}pooled_prompt_embeds with {prefix}prompt_embeds")
        pooled_width, vector = self.pooled_width(pooled), self.unet.config.adm_in_channels
        if tuple(pooled.shape) != (len(embeds), pooled_width) or not 0 < pooled_width < vector or (vector - pooled_width) % 6:
            shown, rule = ((pooled_width, "as wide as the second text encoder's projection") if self.text_encoders else
                           ("width", f"{vector} - 6 k wide: this UNet's vector of {vector} is them and 6 size embeddings of one width; 1280 for SDXL"))
            raise ValueError(f"{prefix}pooled_prompt_embeds: pooled embeddings must be [{len(embeds)}, {shown}] (one row per row of their "
                             f"text embeddings, {rule}), got {list(pooled.shape)}")
        time_ids = sizes.time_ids(height, width).expand(len(embeds), 6)
        return Conditioning(embeds, sdxl_vector(pooled, time_ids, (vector - pooled_width) // 6))

    def denoiser(
        self, controls: ControlsArg, layout: BatchLayout, round_timesteps: bool, cache: DeepCache | None = None, steps: int | None = None
    ) -> DiscreteDenoiser:
        """The UNet as a k-diffusion denoiser D(x, sigma), given each step's controls, step and batch layout, and
        the run's length in steps (and a DeepCache kept across the steps); `round_timesteps` as diffusers'
        DPM-Solver with Karras sigmas."""

        def net(
            x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None, concat: Tensor | None = None, *, step: int | None = None
        ) -> Tensor:
            step_controls = controls_at_step(controls, step, layout, steps)
            if concat is not None:  # an inpainting UNet's mask and masked image latent
                x = torch.cat([x, concat.to(x)], dim=1)
            return self.unet(x, t, context, y, controls=step_controls, cache=cache)  # computes in its dtype, returns x's

        return DiscreteDenoiser(net, self.schedule, round_timesteps=round_timesteps)

    def sigmas(self, steps: int | None, timesteps: Sequence[float] | None, sampler: str, karras: bool) -> Tensor:
        """The sampler's sigmas, [n + 1] ending in 0: of `timesteps`, else of `steps` (default 25) steps, by
        LCM's distilled timesteps, Karras' spacing or the schedule's own."""
        if timesteps is None:
            steps = 25 if steps is None else steps
            check_steps(steps)  # the schedule's own spacing also keeps them within its training timesteps
            if sampler == "lcm":  # LCM visits the timesteps it was distilled on (LCMScheduler's choice)
                if karras:
                    raise ValueError("LCM visits the timesteps it was distilled on, not Karras sigmas: drop karras=True")
                return lcm_sigmas(self.schedule, steps)
            return karras_sigmas(steps, self.schedule.sigma_min, self.schedule.sigma_max) if karras else self.schedule.sigmas(steps)
        if karras:
            raise ValueError("timesteps is a schedule of its own: drop karras=True")
        sigmas = self.schedule.sigmas_at(timesteps)
        if steps is not None and steps != len(sigmas) - 1:
            raise ValueError(f"timesteps lists {len(sigmas) - 1} steps but steps={steps}: drop steps")
        return sigmas

    @torch.no_grad()
    def generate(
        self,
        prompt: str | list[str] | None = None,
        negative: str | list[str] = "",
        *,
        prompt_2: str | list[str] | None = None,
        negative_2: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        pooled_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        timesteps: Sequence[float] | None = None,
        cfg: float = 7.5,
        cfg_rescale: float = 0.0,
        size_conditioning: SizeConditioning = SizeConditioning(),
        negative_size_conditioning: SizeConditioning | None = None,
        sampler: str = "euler",
        karras: bool = False,
        sampler_options: dict[str, Any] | None = None,
        clip_skip: int = 0,
        prompt_syntax: PromptSyntax = "plain",
        seed: int = 0,
        controls: ControlsArg = None,
        callback: Callable[[dict], None] | None = None,
        progress: bool = True,
        max_memory: float | None = None,
        latents: Tensor | None = None,
        output: Literal["images", "latents"] = "images",
        image: Tensor | None = None,
        mask: Tensor | None = None,
        strength: float | None = None,
        deep_cache: int | DeepCache | None = None,
    ) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] for one prompt or a list (one image each), or with
        `output="latents"` the final latents [B, C, H/f, W/f] before decoding.

        `image` [1 or B, 3, H, W] in [0, 1] starts the sampling from that image (image to image; width
        and height default to its size) at `strength` (default 0.75: the last 75% of the steps run;
        0 returns the image, 1 is text to image with the same noise). With `mask` [1 or B, 1, H, W]
        (1 = repaint, 0 = keep; binarized at 0.5) only the masked part is repainted (default strength
        1): a plain UNet by masked latent blending, the kept part staying the image's latent exactly
        (minigen/sampling/image_start.py); an inpainting UNet (`is_inpainting`) by reading the mask and
        the masked image, as it was trained to, without blending (diffusers' choice). An inpainting
        UNet without an image reads a fully masked grey image, as A1111 gives it in text to image.

        Instead of prompts, `prompt_embeds` [B, 77, C] (SDXL: with `pooled_prompt_embeds` [B, 1280]) and,
        under CFG, `negative_prompt_embeds` (and `negative_pooled_prompt_embeds`) may be given; without
        them the negative prompt is encoded (on SDXL an empty one is zeros, see below): `clip_skip` and
        `prompt_syntax` then act on the negative alone (encode the prompt with them: `encode_prompt`), and
        a call that encodes no text refuses them. `latents` [B, C, H/f, W/f] is the starting noise (unit
        variance, as diffusers takes it); by default image k's is drawn from a CPU generator seeded with
        `seed + k`, which also draws its fresh noise in stochastic samplers, so image k of a batch is the
        image of a single run with `seed + k`, on every device. A step giving NaN or Inf raises
        `minigen.sampling.NonFiniteError`. A call whose estimated peak memory exceeds `max_memory` bytes
        (default: what the device has free) raises `TooLargeError` before the first step
        (minigen/pipelines/memory.py). The sampler gives each step's index to the
        `controls` (one `Controls`, or a function step -> Controls), with the batch layout of the call.
        `steps` (default 25) sets the schedule's steps; `timesteps` (strictly decreasing training
        timesteps, e.g. Align Your Steps' [999, 850, 736, 645, 545, 455, 343, 233, 124, 24] for SD1.5;
        diffusers' `timesteps=`, fractional ones interpolated in log sigma) replaces it: the sampler
        visits those, then sigma 0, and `steps`, if given, must be their count.
        `cfg` other than 1 guides, D_negative + cfg·(D_prompt - D_negative), at any scale as A1111 and
        ComfyUI do: 0 draws the negative prompt's image, between 0 and 1 a blend of the two (diffusers
        runs no guidance at cfg <= 1, so its image there is the prompt's alone).
        `cfg_rescale` (0 to 1, off by default; diffusers' `guidance_rescale`, Lin et al. 2023 §3.4, 0.7 in
        the paper) pulls the guided prediction's standard deviation back towards the conditional one's,
        against the over-exposure of high CFG scales (`ClassifierFreeGuidance`).
        SDXL's second text encoder (OpenCLIP bigG) reads `prompt_2` and `negative_2` where given (and
        not empty), else the prompt and the negative (diffusers' prompt_2 and negative_prompt_2; plain
        syntax only). With `negative_2` an empty negative is encoded rather than zeroed: diffusers'
        negative_prompt="" (with negative_prompt=None diffusers zeroes it and drops negative_prompt_2).
        SDXL reads `size_conditioning` (`SizeConditioning`: the original size, crop and target size it
        draws as if from; default the output size, uncropped) and, for the negative prompt,
        `negative_size_conditioning` (default the same; diffusers' negative_original_size etc., which
        diffusers reads only when both negative_original_size and negative_target_size are given).
        `sampler_options` are the sampler's own keyword options, e.g. {"eta": 0.5} for ddim,
        euler_ancestral and the SDE samplers (a `noise_sampler` there replaces the seeded generators).
        `negative` (and `negative_2`) is one text for every image or a list of one per image; a list is
        encoded as given (on SDXL an empty negative in a list is encoded, not zeroed, as in diffusers). `clip_skip` skips final text-encoder layers for the prompt
        and the negative, as A1111 does (diffusers' count: 1 = the penultimate layer, A1111's "Clip skip:
        2"; diffusers skips them for the prompt only); on SDXL, which reads the penultimate layer already
        and where A1111 leaves Clip skip out, 1 skips one more layer of both encoders, as diffusers' does.
        An empty negative on SDXL is zeros when `force_zeros_for_empty_prompt` (a folder's model_index.json).
        `deep_cache` (an interval, e.g. 3; off by default) runs the whole UNet at every interval-th
        denoiser call and only its shallow path between (DeepCache, minigen/step_cache.py); a `DeepCache`
        given instead is reset here and counts the full and shallow calls. Between full calls the deep
        part's output is the last full call's, made under that call's controls: controls on deep layers
        act at the full calls only (a record there keeps a map per full call), so a control that changes
        from step to step reaches them only at the full steps.
        `prompt_syntax="a1111"` reads weights and prompts of any length as A1111 does (`encode_prompt`);
        every prompt and negative of the call then gets the same number of chunks, the longest's, as A1111
        pads a batch (so image k of a batch whose prompts differ in length may differ from its single run).
        """
        check_tensors(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                      negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, latents=latents, image=image, mask=mask)  # fmt: skip
        width, height = output_size(image, width, height, self.default_size)
        factor = self.vae.config.downsample_factor
        check_size(width, height, factor, "the VAE's latent factor")
        if cfg is None:
            raise TypeError("cfg takes a number, got None: cfg=1 turns classifier-free guidance off (default 7.5)")
        if cfg_rescale is None:
            raise TypeError("cfg_rescale takes a number, got None: cfg_rescale=0 turns the rescale off (the default)")
        check_finite(cfg=cfg, cfg_rescale=cfg_rescale)
        cfg, cfg_rescale = number(cfg), number(cfg_rescale)  # a one-element tensor: its value, on every device
        if cfg_rescale and cfg == 1.0:
            raise ValueError("cfg_rescale acts on classifier-free guidance, which is off at cfg=1: use cfg > 1 or cfg_rescale=0")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        options = sampler_keywords(sampler, sampler_options or {})
        if sampler == "lcm":  # LCM maps sigma to t by the model's schedule (unless the options say otherwise)
            options = {"schedule": self.schedule} | options
        check_output(output)
        sigmas = self.sigmas(steps, timesteps, sampler, karras)
        guided = cfg != 1.0

        # the text: the prompts' rows, under CFG after the negatives' ([uncond | cond])
        cond, batch = self.call_conditioning(
            height, width, guided, prompt=prompt, negative=negative, prompt_2=prompt_2, negative_2=negative_2, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, size_conditioning=size_conditioning,
            negative_size_conditioning=negative_size_conditioning, clip_skip=clip_skip, prompt_syntax=prompt_syntax,
        )  # fmt: skip
        layout = BatchLayout.cfg(batch) if guided else BatchLayout.plain(batch)

        # the start: memory checked before any tensor of the images' size, then the image's latent and the noise
        generators = row_generators(seed, batch)
        shape = (batch, self.vae.config.z_channels, height // factor, width // factor)
        device = compute_device(self.unet.out[2])
        denoiser = unet_call_bytes(self.unet, layout.size, shape[2], shape[3])
        decoder = decode_bytes(self.vae, batch, width, height) if output == "images" else 0
        check_memory(denoiser, decoder, device, max_memory, f"{batch} image(s) of {width}x{height}")
        start = ImageStart.of(self.vae, device, image, mask, strength, batch, width, height, len(sigmas) - 1, inpainting=self.is_inpainting)
        noise = (batch_randn(shape, generators) if latents is None else check_latents(latents, shape)).to(device, torch.float32)
        sigmas = sigmas[start.first :].to(device)

        # the denoiser: the UNet under this call's controls (and DeepCache), then guidance
        cache = deep_cache if deep_cache is None or isinstance(deep_cache, DeepCache) else DeepCache(deep_cache)
        if cache is not None:
            cache.reset()  # one generation: nothing cached from another
        model = self.denoiser(controls, layout, karras and sampler in ROUNDED_WITH_KARRAS, cache, steps=len(sigmas) - 1)
        if guided:
            model = ClassifierFreeGuidance(model, cfg, cfg_rescale, self.schedule.prediction_type)
        extra = {"context": cond.context.to(device)}
        if cond.y is not None:
            extra["y"] = cond.y.to(device)
        if start.concat is not None:
            extra["concat"] = start.concat.to(device).repeat(layout.size // batch, 1, 1, 1)  # under CFG: both halves

        # sampling: text to image starts from x_T = noise in sigma form (variance preserving, minigen/sampling/samplers.py)
        x = start.sample(
            SAMPLERS[sampler], model, noise, sigmas, pure=noise * (sigmas[0] ** 2 + 1).sqrt(), noised=noised_ve, extra_args=extra,
            callback=callback, disable=not progress, generator=None if "noise_sampler" in options else generators, **options,
        )  # fmt: skip
        return x if output == "latents" else self.vae.decode_images(x)

    def call_conditioning(
        self, height: int, width: int, guided: bool, *, prompt: str | list[str] | None, negative: str | list[str], prompt_2: str | list[str] | None,
        negative_2: str | list[str] | None, prompt_embeds: Tensor | None, negative_prompt_embeds: Tensor | None, pooled_prompt_embeds: Tensor | None,
        negative_pooled_prompt_embeds: Tensor | None, size_conditioning: SizeConditioning, negative_size_conditioning: SizeConditioning | None,
        clip_skip: int, prompt_syntax: PromptSyntax,
    ) -> tuple[Conditioning, int]:  # fmt: skip
        """The conditioning of a `generate` call (its arguments, as documented there) and its number of images B:
        the prompts' B rows, and when `guided` (CFG) the negatives' B rows before them."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give either a prompt or prompt_embeds (not both)")
        prompt_2, negative_2 = (None if text == "" else text for text in (prompt_2, negative_2))  # "" reads the first prompt, as diffusers
        if not guided:
            refuse_unread_negatives("classifier-free guidance", "cfg", negative=negative, negative_2=negative_2,
                                    negative_prompt_embeds=negative_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
        if negative_prompt_embeds is not None and not (no_text(negative) and no_text(negative_2)):
            raise ValueError("give the negative as text (negative, negative_2) or as negative_prompt_embeds, not both")
        refuse_lone_pooled(prompt_embeds, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds)
        for name, sizes in (("size_conditioning", size_conditioning), ("negative_size_conditioning", negative_size_conditioning)):
            if sizes is not None and not isinstance(sizes, SizeConditioning):
                raise TypeError(f"{name} takes a SizeConditioning(original=(h, w), crop_top_left=(top, left), target=(h, w)), got {sizes!r:.60}")
        negative_sizes = size_conditioning if negative_size_conditioning is None else negative_size_conditioning
        if not self.is_sdxl and (size_conditioning, negative_sizes) != (SizeConditioning(), SizeConditioning()):
            raise ValueError("size_conditioning is SDXL's micro-conditioning; an SD1.x/SD2.x UNet reads no sizes")
        if negative_size_conditioning is not None and not guided:
            raise ValueError("negative_size_conditioning conditions the negative prompt, which cfg=1 does not read: use cfg > 1 or drop it")
        zero_negative = self.is_sdxl and self.force_zeros_for_empty_prompt and no_text(negative) and negative_2 is None  # SDXL's zeros, see below
        encodes = prompt_embeds is None or (guided and negative_prompt_embeds is None and not zero_negative)  # the prompt or the negative
        if encodes and not self.text_encoders:
            prefix = "" if prompt_embeds is None else "negative_"
            names = f"{prefix}prompt_embeds and {prefix}pooled_prompt_embeds" if self.is_sdxl else f"{prefix}prompt_embeds"
            raise ValueError(f"this pipeline has no text encoders to encode the {'negative ' * bool(prefix)}prompt: pass {names}")
        if not encodes and (clip_skip, prompt_syntax) != (0, "plain"):
            raise ValueError(f"{'clip_skip' if clip_skip != 0 else 'prompt_syntax'} acts on text the pipeline encodes, and with prompt_embeds this "
                             "call encodes none: encode the prompt with it, encode_prompt(prompts, height, width, clip_skip=, syntax=), or drop it")

        text = {"clip_skip": clip_skip, "syntax": prompt_syntax}
        if prompt_embeds is None:
            prompts = prompt_list(prompt)
            negatives = per_row(negative, len(prompts), "negative")
            chunks = self.chunk_count([*prompts, *negatives]) if prompt_syntax == "a1111" else 1
            prompts_2 = None if prompt_2 is None else per_row(prompt_2, len(prompts), "prompt_2")  # a string for every prompt, as negative_2
            cond = self.encode_prompt(prompts, height, width, **text, min_chunks=chunks, sizes=size_conditioning, prompts_2=prompts_2)
        else:
            if prompt_2 is not None:
                raise ValueError("prompt_2 is a prompt to encode; with prompt_embeds, encode both prompts yourself (encode_sdxl's prompts_2)")
            cond = self.conditioning(prompt_embeds, pooled_prompt_embeds, height, width, size_conditioning)
            negatives = per_row(negative, len(prompt_embeds), "negative")
            chunks = cond.context.shape[1] // 77
        batch = len(cond.context)
        negatives_2 = None if negative_2 is None else per_row(negative_2, batch, "negative_2")
        if not guided:
            return cond, batch

        if negative_prompt_embeds is not None:
            uncond = self.conditioning(negative_prompt_embeds, negative_pooled_prompt_embeds, height, width, negative_sizes, "negative_")
            if len(uncond.context) != batch:
                raise ValueError(f"negative_prompt_embeds has {len(uncond.context)} rows for {batch} prompt rows; give one per prompt "
                                 f"(one for all: .expand({batch}, -1, -1))")
            if uncond.context.shape[1] != cond.context.shape[1]:
                raise ValueError(f"negative_prompt_embeds has {uncond.context.shape[1]} positions but the prompt's {cond.context.shape[1]}: "
                                 "encode both to the same number of 77-token chunks (encode_sd1_weighted's min_chunks)")
        elif zero_negative:
            # SDXL base reads zeros for an empty negative (sgm; diffusers' force_zeros_for_empty_prompt): as long as the prompt's
            pooled = cond.context.new_zeros(batch, self.pooled_width(pooled_prompt_embeds))
            uncond = self.conditioning(torch.zeros_like(cond.context), pooled, height, width, negative_sizes)
        else:
            uncond = self.encode_prompt(negatives, height, width, **text, min_chunks=chunks, sizes=negative_sizes, prompts_2=negatives_2)
            if uncond.context.shape[1] != cond.context.shape[1]:
                raise ValueError(
                    f"the negative prompt takes {uncond.context.shape[1] // 77} chunks of 77 tokens but the prompt "
                    f"embeddings have {cond.context.shape[1]} positions; pass negative_prompt_embeds of the same length"
                )
        return Conditioning.stack(uncond, cond), batch
