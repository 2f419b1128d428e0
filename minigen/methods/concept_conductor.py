"""Concept Conductor (Yao et al. 2024): several custom concepts in one image, each from its own model.

Merging two personal LoRAs into one model mixes them: a dog takes the cat's fur, or one concept is
left out. Concept Conductor keeps one model per concept and lets them meet only inside the base
model's attention layers, in regions given by a layout:

    multipath      the base model (base prompt) and each custom model (its ED-LoRA and prompt) all
                   denoise the same latent z_t; only the base model's prediction drives the sampler.
    injection      every decoder attention output (self and cross, `fuse_kinds`) of the base model is
                   overwritten inside concept i's mask by custom model i's output at the same layer:
                       h <- M_i ⊙ h_i + (1 - M_i) ⊙ h            for i = 1..N in order, both CFG halves
                   (or its input or query, `fuse_features`, as the official params_merge allows)
    layout         while the layout forms (steps 0..60 of 200), z_t takes one gradient step towards
    alignment      the layout of a reference image: the keys (`guidance_features`) of the first decoder
                   self-attention of every path should match the reference's (its DDIM inversion at the
                   same t):
                       L = MSE(K_base, K_ref) + mean_i MSE(K_i, K_ref),     z_t <- z_t - 10 ∇_z L
    refinement     at steps 50, 55, ..., 80 the masks follow the generated shapes: K-means over the
                   self-attention of one decoder layer, the cluster closest to the previous mask
                   (conductor_masks.py).
    placement      optional (the paper's object placement): the concepts are drawn into an existing
                   image, kept outside a mask by replacing z there after every step (`place`).

How this file runs it. The official code deep-copies the UNet and merges one concept's LoRA into the
copy, for every concept at every step. Here all paths are rows of one batch, and each concept's LoRA
is a `LowRank` scoped to its rows, so one UNet call serves every path (`Rows` says which row is
what). A custom row reads its own layer-wise context at each cross-attention layer (ED-LoRA's 16
token embeddings, `Controls.contexts`); `FuseRows` does the injection; `CaptureFeatures` keeps the
guided features for the layout loss, and `stop_after` ends those forwards at the guided layer. Rows do not
interact except through `FuseRows`, so the batch computes exactly what the official sequential
passes compute (tests/test_concept_conductor.py checks both).

The loop is the official one: DDIM (eta 0 by default, SD's `set_alpha_to_one=False`) written on the
variance-preserving latent z_t, because the layout step changes z_t between the sampler's steps.

Everything is given as tensors, so any encoder, tokenizer or file format can feed it:

    concepts = [Concept(context=layerwise_cat, uncond=layerwise_empty_cat, low_rank=cat_lora, mask=cat_mask), ...]
    reference = invert_reference(unet, z0_ref, ref_context, steps=200, schedule=pipe.schedule)
    z0 = ConceptConductor(unet, schedule=pipe.schedule).sample(noise, base_context, base_uncond, concepts, reference)

Defaults are the official SD1.5 configuration (`ConductorSettings`); `ConductorSettings.sdxl()` has the
official SDXL numbers.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor
from tqdm.auto import tqdm

from minigen.controls import BatchLayout, CaptureFeatures, Controls, ControlsArg, FuseRows, LowRank, RecordAttention, combine, controls_at_step
from minigen.loading.files import write_atomically
from minigen.methods.conductor_masks import bounding_box, choose_mask, fusion_masks, kmeans, mask_candidates, masks_at
from minigen.methods.conductor_masks import masks_from_points as points_to_masks  # its name is the method's below
from minigen.models.unet import UNet
from minigen.sampling import DiscreteDenoiser, DiscreteSchedule, NonFiniteError, batch_randn, sample_ddim_inversion
from minigen.sampling.samplers import Generators
from minigen.trainer import fingerprint

Cluster = Callable[[Tensor, int], Tensor]  # (points [N, D], k) -> labels [N]


@dataclass(frozen=True)
class ConductorSettings:
    """Every switch of the method; the defaults are the official SD1.5 configuration."""

    steps: int = 200
    cfg: float = 7.5
    # layout alignment: steps 0..guidance_end inclusive, every guidance_interval-th
    guidance_layers: tuple[str, ...] = ("up.1.0.0",)  # their self-attention (diffusers up_blocks.1.attentions.0 attn1)
    guidance_features: tuple[str, ...] = ("k",)  # compared there (official params_guidance ["key"]): "x", "q", "k", "v", "out"
    guidance_end: int = 60
    guidance_interval: int = 1
    guidance_weight: float = 10.0
    custom_guidance_factor: float = 1.0  # weight of the mean over the custom paths' losses
    loss_mask: bool = False  # weigh the feature error by the sum of the layout masks (official use_loss_mask)
    # concept injection: None = every decoder ("up.") transformer block; at its self and/or cross attention
    # (the official processor_filter_merge '.*up_blocks.*' fuses both; '.*up_blocks.*attn1.*' is ("self",))
    fuse_layers: tuple[str, ...] | None = None
    fuse_kinds: tuple[str, ...] = ("self", "cross")
    fuse_features: tuple[str, ...] = ("out",)  # what is fused there (official params_merge ["feature_output"]): "x", "q", "out"
    # mask refinement: steps refine_start..refine_end inclusive, every refine_interval-th
    mask_layer: str = "up.2.2.0"  # its self-attention probabilities, averaged over heads
    refine_start: int = 50
    refine_end: int = 80
    refine_interval: int = 5
    overlap_threshold: float = 0.0  # a candidate needs this IoU with the previous mask, else its box
    rect_masks: bool = False  # refinement replaces each mask by its bounding box, no clustering (official rect_mask)
    kmeans_restarts: int = 100
    kmeans_seed: int = 123
    eta: float = 0.0  # DDIM's eta: > 0 adds fresh noise at each step, drawn from sample's generator

    @classmethod
    def sdxl(cls) -> ConductorSettings:
        """The official SDXL configuration (sample_sdxl_config.yaml)."""
        return cls(
            guidance_layers=("up.0.1.4",), guidance_end=50, guidance_weight=40.0, mask_layer="up.0.1.4",
            refine_start=60, overlap_threshold=0.7, kmeans_restarts=25,
        )

    @classmethod
    def for_unet(cls, unet: UNet, **changes) -> ConductorSettings:
        """The official settings of the UNet's family (SDXL's when it reads a vector y, else SD1.5's) with
        `changes`, and with layers this UNet has: the official ones where it has them, else the same places
        by rule: guidance at the first decoder transformer block, masks at the last block of the
        second-finest decoder level (toy-sd: "up.1.0.0" and "up.1.1.0")."""
        settings = replace(cls.sdxl() if unet.config.adm_in_channels is not None else cls(), **changes)
        layers = [layer for layer in unet.attention_sites() if layer.startswith("up.")]
        if not layers:
            raise ValueError("this UNet has no decoder attention layers: Concept Conductor injects and aligns there")
        levels = sorted({layer.split(".")[1] for layer in layers})
        if not set(settings.guidance_layers) <= set(layers) and "guidance_layers" not in changes:
            settings = replace(settings, guidance_layers=(layers[0],))
        if settings.mask_layer not in layers and "mask_layer" not in changes:
            settings = replace(settings, mask_layer=[l for l in layers if l.split(".")[1] == levels[-2 if len(levels) > 1 else -1]][-1])
        return settings

    def guides(self, step: int) -> bool:
        """Whether layout alignment runs at `step` (0 = the first): up to guidance_end, every guidance_interval-th."""
        return step <= self.guidance_end and step % self.guidance_interval == 0

    def refines(self, step: int) -> bool:
        """Whether the masks are refined after `step`: from refine_start to refine_end, every refine_interval-th."""
        return self.refine_start <= step <= self.refine_end and step % self.refine_interval == 0

    @property
    def refinement_runs(self) -> bool:
        """Whether any of the `steps` refines (the windows are step numbers, not shares: few steps may leave them out)."""
        return any(self.refines(step) for step in range(self.steps))


@dataclass
class Concept:
    """One custom path: what its model reads and where its concept goes.

    `context` and `uncond` are either one context [T, C] for every cross-attention layer or one per
    layer [L, T, C] in forward order (down, mid, up), as ED-LoRA's layer-wise embeddings give them
    (`minigen.loading.edlora.layerwise_prompt_embeddings`); the official uncond is "" encoded by the
    concept's own text encoder. `low_rank` is the concept's UNet LoRA with the merge weight as its
    scale (ED-LoRA: 0.7). `mask` [h, w] marks the concept in the layout, on the latent grid. SDXL also
    reads `y` and `y_uncond`, the pooled-text and size vectors [D] (see `sdxl_vector`).
    """

    context: Tensor
    uncond: Tensor
    low_rank: Sequence[LowRank]
    mask: Tensor
    y: Tensor | None = None
    y_uncond: Tensor | None = None


@dataclass
class Reference:
    """The layout reference: its prompt's context [T, C] (SDXL: and vector y [D]) and its DDIM
    inversion, timestep -> z_t [1, C, h, w]."""

    context: Tensor
    latents: Mapping[int, Tensor]
    y: Tensor | None = None


@dataclass(frozen=True)
class Rows:
    """Which batch row is which path: path 0 is the base, path i the i-th concept; `batch` images.

    A generation call stacks, path by path, the conditional then the unconditional rows of every image;
    a guidance call has the reference in row 0, then the conditional rows of every path.
    """

    paths: int
    batch: int

    def generation(self, path: int, uncond: bool, image: int) -> int:
        return (2 * path + uncond) * self.batch + image

    def guidance(self, path: int, image: int) -> int:
        return 1 + path * self.batch + image

    def layout(self) -> BatchLayout:
        """A generation call's rows as a `BatchLayout`: every path's conditional rows, each paired with its unconditional one."""
        images = [(path, image) for path in range(self.paths) for image in range(self.batch)]
        return BatchLayout(cond=tuple(self.generation(p, False, i) for p, i in images), uncond=tuple(self.generation(p, True, i) for p, i in images))


class ConceptConductor:
    """Concept Conductor on one SD UNet: `sample` runs the multipath DDIM loop of the base and each concept's
    path. `settings` default to SD1.5's official ones (`ConductorSettings.for_unet(unet)` gives those of the
    UNet's layout); `schedule` to SD1.5's (epsilon prediction: pass `pipe.schedule` for another model's betas
    or a v-prediction one); `cluster(points, k) -> labels` may replace the K-means."""

    def __init__(
        self,
        unet: UNet,
        settings: ConductorSettings = ConductorSettings(),
        schedule: DiscreteSchedule = DiscreteSchedule(),
        cluster: Cluster | None = None,
    ) -> None:
        sites = unet.attention_sites()
        if settings.mask_layer not in sites:
            raise ValueError(f"ConductorSettings.mask_layer={settings.mask_layer!r} is not an attention layer of this UNet; it has {list(sites)}. "
                             "ConductorSettings.for_unet(unet) gives the official settings of its layout (SD1.5's by default)")
        choices = {
            "guidance_layers": tuple(sites), "guidance_features": ("x", "q", "k", "v", "out"),
            "fuse_kinds": ("self", "cross"), "fuse_layers": tuple(sites), "fuse_features": ("x", "q", "out"),
        }  # fmt: skip
        official = {  # the official names, for an error that says where they went
            "guidance_features": " (the official params_guidance 'feature_input', 'query', 'key', 'value', 'feature_output'; its "
            "'attention_probs' adds no gradient: leave it out and scale guidance_weight, see docs/official_code.md)",
            "fuse_features": " (the official params_merge 'feature_input', 'query', 'feature_output'; it never merges the others)",
        }
        for name, allowed in choices.items():
            given = getattr(settings, name)
            if name == "fuse_layers" and given is None:  # every decoder layer
                continue
            if isinstance(given, str) or not given or not set(given) <= set(allowed):
                raise ValueError(f"ConductorSettings.{name} must be a non-empty tuple of {list(allowed)}{official.get(name, '')}, got {given!r}")
        for name in ("guidance_end", "refine_start", "refine_end"):  # step numbers (2.5 was a bare slice TypeError)
            if isinstance(getattr(settings, name), bool) or not isinstance(getattr(settings, name), numbers.Integral):
                raise ValueError(f"ConductorSettings.{name} must be a whole step number, got {getattr(settings, name)!r}")
        counts = ["steps"]  # whole numbers of 1 or more where they are used: an interval of 0 divides by zero
        counts += ["guidance_interval"] if settings.guidance_end >= 0 else []
        counts += ["refine_interval"] if settings.refine_start <= settings.refine_end else []
        counts += ["kmeans_restarts"] if cluster is None and not settings.rect_masks else []
        for name in counts:
            if not (isinstance(getattr(settings, name), numbers.Integral) and getattr(settings, name) >= 1):
                raise ValueError(f"ConductorSettings.{name} must be a whole number of 1 or more, got {getattr(settings, name)!r}")
        for name in ("cfg", "guidance_weight", "custom_guidance_factor"):
            if not math.isfinite(getattr(settings, name)):
                raise ValueError(f"ConductorSettings.{name} must be a finite number, got {getattr(settings, name)}")
        if not 0 <= settings.overlap_threshold <= 1:
            raise ValueError(f"ConductorSettings.overlap_threshold is an IoU in [0, 1] (0: no fallback to boxes), got {settings.overlap_threshold}")
        if not 0 <= settings.eta <= 1:
            raise ValueError(f"ConductorSettings.eta must be in [0, 1] (0: deterministic DDIM, the official default; 1: DDPM's noise), got {settings.eta}")
        self.unet, self.settings, self.schedule = unet, settings, schedule
        self.cross_layers = [layer for layer, kinds in sites.items() if "cross" in kinds]
        self.fuse_layers = settings.fuse_layers if settings.fuse_layers is not None else tuple(layer for layer in sites if layer.startswith("up."))
        self.cluster = cluster or (lambda points, k: kmeans(points, k, restarts=settings.kmeans_restarts, seed=settings.kmeans_seed))

    # -- the loop ------------------------------------------------------------------------------------

    def sample(
        self,
        noise: Tensor,
        context: Tensor,
        uncond: Tensor,
        concepts: Sequence[Concept],
        reference: Reference | None,
        *,
        y: Tensor | None = None,
        y_uncond: Tensor | None = None,
        init_latent: Tensor | None = None,
        init_mask: Tensor | None = None,
        generator: Generators = None,
        on_step: Callable[[int, Tensor, Mapping[tuple[int, int], Tensor]], None] | None = None,
        controls: ControlsArg = None,
        progress: bool = True,
    ) -> Tensor:
        """Denoise `noise` [B, C, h, w] (the starting z_T) with the base `context` / `uncond` [T, C] and
        the concepts; returns z_0 for the VAE. `reference` is needed while layout alignment runs
        (None is allowed when `guidance_end` < 0). SDXL also needs the vectors `y` and `y_uncond` [D]
        of the base path, of every concept and of the reference. `on_step(step, z, masks)` sees each
        step's result and the fusion masks by grid ({(h, w): [B, N, h, w] bool}) that the next step fuses
        with, e.g. to save them (at a refinement step: refined from this step's attention, as the official
        code applies them from the next step).

        Object placement (the official `init_image` / `init_mask`): the concepts are drawn into an
        existing image, whose latent `init_latent` [1 or B, C, h, w] (`vae.encode_images`) is kept
        outside `init_mask` [h, w] (1 where the concepts go, on the latent grid). After every step, z
        outside the mask is replaced by the image's latent noised with `noise` to the next timestep, and
        after the last by the latent itself (`place`).

        With `ConductorSettings.eta` > 0, each DDIM step adds fresh noise [B, C, h, w] from `generator` (one
        torch.Generator for the batch, the global CPU one if None, or one per image), drawn as the official
        scheduler draws it (in z's dtype); `noise` is not drawn from it, so draw it first from the same
        generator to reproduce an official run that was given a generator and no latents.

        `controls` are the caller's own, as `generate` takes them (one Controls, or a function of the step
        returning one): they join every generation call after the conductor's (not layout alignment's
        gradient calls), told the step, the run's steps and the call's rows (`Rows.layout()`: each path's
        conditional row paired with its unconditional one), e.g. to record attention maps of every path.

        A step whose latent holds a NaN or an Inf stops the run with `minigen.sampling.NonFiniteError`, which names
        the step and the likely causes (`check_step_finite`)."""
        s = self.settings
        self.check(noise, context, uncond, concepts, reference)
        self.check_vectors(y, y_uncond, concepts, reference)
        self.check_placement(noise, init_latent, init_mask)
        if generator is not None and s.eta == 0:
            raise ValueError("generator draws DDIM's fresh noise, which eta=0 adds none of: draw the starting noise from it (noise=), "
                             "or set ConductorSettings.eta > 0")
        if init_latent is not None:
            init_latent, init_mask = init_latent.to(noise), init_mask.to(noise)  # e.g. a VAE's float32 latent in a float64 run
        rows = Rows(1 + len(concepts), noise.shape[0])
        batch_layout = rows.layout()  # a generation call's, told to the caller's controls
        timesteps = [int(t) for t in self.schedule.timesteps(s.steps)]
        abar = self.schedule.alphas_cumprod().to(noise.device)
        grids = self.layer_grids(noise.shape[-2:])
        mask_grid = grids[s.mask_layer]
        reference_masks = torch.stack([c.mask for c in concepts]).to(noise.device, torch.float32)[None].expand(rows.batch, -1, -1, -1)
        fused = {grid: masks_at(reference_masks, grid) for grid in set(grids.values())}  # [B, N, h, w] per grid
        trackers = {"custom": masks_at(reference_masks, mask_grid), "base": masks_at(reference_masks, mask_grid)}
        generation = self.generation_inputs(rows, context, uncond, concepts)
        paths = [Concept(context, uncond, (), concepts[0].mask, y, y_uncond), *concepts]  # the base: a path without LoRA
        generation_y = self.vectors(rows, paths, rows.generation, halves=(False, True))  # SDXL's y per row, else None
        guidance_y = None
        if y is not None and reference is not None and s.guidance_end >= 0:  # the reference's row, then every path's conditional rows
            path_rows = self.vectors(rows, paths, lambda path, _, image: rows.guidance(path, image) - 1, halves=(False,))
            guidance_y = torch.cat([reference.y[None], path_rows])

        z = noise
        for step, t in enumerate(tqdm(timesteps, desc="Concept Conductor", disable=not progress)):
            callers = controls_at_step(controls, step, batch_layout, len(timesteps))
            if callers is not None and callers.contexts:
                raise ValueError(f"controls: contexts for {sorted(callers.contexts)}, but the conductor gives every cross-attention "
                                 "layer each path's context (Concept.context, and the base's context=): leave contexts out")
            if s.guides(step):
                z = self.align_layout(z, t, rows, context, concepts, reference, guidance_y)
            record = RecordAttention(layers={s.mask_layer}, kind="self", rows=self.cond_rows(rows)) if s.refines(step) else None
            with torch.no_grad():
                eps = self.guided_eps(z, t, rows, generation, fused, grids, record, generation_y, callers)
                if record is not None:
                    fused = self.refine(record.maps[s.mask_layer][0][:, 0], rows, trackers, fused, mask_grid)
                last = step + 1 == len(timesteps)
                t_prev = 0 if last else timesteps[step + 1]  # set_alpha_to_one=False
                fresh = batch_randn(z.shape, generator, z.dtype).to(z.device) if s.eta > 0 else None  # in z's dtype, as diffusers
                z = ddim_step(z, eps, abar[t], abar[t_prev], s.eta, fresh)
                if init_latent is not None:
                    z = place(z, init_latent, init_mask, noise, None if last else abar[t_prev])
                check_step_finite(z, step, len(timesteps), s, concepts)
            if on_step is not None:
                on_step(step, z, fused)
        return z

    def check(self, noise: Tensor, context: Tensor, uncond: Tensor, concepts: Sequence[Concept], reference: Reference | None) -> None:
        """Clear errors for inputs that do not fit each other or this UNet."""
        if not concepts:
            raise ValueError("Concept Conductor needs at least one Concept (one custom path)")
        channels = self.unet.config.in_channels
        if noise.dim() != 4 or noise.shape[1] != channels:
            raise ValueError(f"noise must be [B, {channels}, h, w] (this UNet reads {channels} latent channels), got shape {list(noise.shape)}")
        grid = tuple(noise.shape[-2:])
        grids = self.layer_grids(grid)
        check_context(self.unet, context, "the base context")
        check_context(self.unet, uncond, "the base uncond")
        if self.settings.guidance_end >= 0:
            if reference is None:
                raise ValueError("layout alignment needs the Reference (its inversion); or set guidance_end=-1 to turn it off")
            needed = [int(t) for t in self.schedule.timesteps(self.settings.steps)[: self.settings.guidance_end + 1]]
            self.check_reference(reference, needed, grid)
        for i, concept in enumerate(concepts):
            for name in ("context", "uncond"):
                tensor = getattr(concept, name)
                if tensor.dim() == 3 and tensor.shape[0] != len(self.cross_layers):
                    raise ValueError(
                        f"concept {i}'s {name} has {tensor.shape[0]} layer-wise contexts, but this UNet has "
                        f"{len(self.cross_layers)} cross-attention layers: the ED-LoRA was made for another base model"
                    )
                if tensor.dim() not in (2, 3) or tensor.shape[-1] != context.shape[-1]:
                    raise ValueError(f"concept {i}'s {name} must be [T, {context.shape[-1]}] or [L, T, {context.shape[-1]}], got {list(tensor.shape)}")
            self.check_mask(concept.mask, grid, f"concept {i}'s mask")
            for delta in concept.low_rank:
                if delta.rows is not None or delta.region is not None:
                    raise ValueError(f"concept {i}'s LowRank on {delta.target!r} is already scoped; give it unscoped, the conductor scopes it to its rows")
        lengths = {"the base context": context.shape[0], "the base uncond": uncond.shape[0]}
        lengths |= {f"concept {i}'s {name}": getattr(c, name).shape[-2] for i, c in enumerate(concepts) for name in ("context", "uncond")}
        if reference is not None and self.settings.guidance_end >= 0:
            lengths["the reference's context"] = reference.context.shape[-2]
        if len(set(lengths.values())) > 1:  # all paths run as rows of one batch
            raise ValueError(f"the contexts have different token counts ({', '.join(f'{k} {v}' for k, v in lengths.items())}): "
                             "encode every prompt to the same length (the plain syntax's 77, or the same number of chunks)")
        clusters = 2 * len(concepts) + 1  # refinement's largest K-means
        cells = math.prod(grids[self.settings.mask_layer])
        refines = self.settings.refinement_runs and not self.settings.rect_masks
        if refines and clusters > cells:
            raise ValueError(f"{len(concepts)} concepts need {clusters} clusters at refinement, more than the {cells} cells of "
                             f"{self.settings.mask_layer}'s grid: take fewer concepts, a larger image, or rect_masks=True")
        masks = torch.stack([concept.mask.float() > 0.5 for concept in concepts])  # where each is applied
        if (overlap := int((masks.sum(0) > 1).sum())) > 0:
            warnings.warn(
                f"the concept masks overlap on {overlap} latent pixels: there the later concept overwrites the earlier "
                "(the official order), and refinement keeps the overlap; draw disjoint masks to avoid it",
                stacklevel=3,
            )

    def check_reference(self, reference: Reference, timesteps: Sequence[int], grid: Sequence[int]) -> None:
        """The reference's context fits this UNet, and its inversion holds a latent [1, C, h, w] on the latent
        `grid` at each of `timesteps`."""
        check_context(self.unet, reference.context, "Reference.context")
        if missing := [t for t in timesteps if t not in reference.latents]:
            raise ValueError(f"the reference inversion has no latent for timesteps {missing[:5]}: invert with the same schedule and steps")
        for t in timesteps:
            check_latent(self.unet, reference.latents[t], f"Reference.latents[{t}]", "invert the reference's latent at the generation's size "
                         "(invert_reference)", grid)

    def check_mask(self, mask: Tensor, grid: tuple[int, int], name: str) -> None:
        """A concept's layout mask fits the latent grid, holds values in [0, 1], and marks a cell of every
        fused and refined layer's grid once resized (a few marked pixels can vanish on a coarser grid)."""
        if tuple(mask.shape) != tuple(grid):
            raise ValueError(f"{name} is {list(mask.shape)} but the latent grid is {list(grid)}: "
                             "give the layout masks at the latent size (the image size / 8)")
        mask = mask.float()
        finite = bool(torch.isfinite(mask).all())
        if not finite or mask.min() < 0 or mask.max() > 1:
            raise ValueError(f"{name} must hold values in [0, 1] (1: the concept's place), got {mask.min().item()} to "
                             f"{mask.max().item()}" + ("" if finite else " and NaN or infinite values"))
        if not bool((mask > 0.5).any()):  # masks are cut at 0.5 on every grid: the concept would be drawn nowhere
            raise ValueError(f"{name} marks no latent pixel (none above 0.5, where the masks are cut): mark where the concept goes with 1")
        grids = self.layer_grids(grid)
        for layer_grid in sorted({grids[layer] for layer in (*self.fuse_layers, self.settings.mask_layer)}):
            if not bool(masks_at(mask[None, None], layer_grid).any()):
                raise ValueError(f"{name} covers no cell of the {layer_grid[0]}x{layer_grid[1]} grid of the fused and "
                                 "refined layers once resized: it would be fused nowhere there; give it a larger region")

    @staticmethod
    def check_placement(noise: Tensor, init_latent: Tensor | None, init_mask: Tensor | None) -> None:
        """Object placement needs both the image's latent and the mask, each fitting the noise, and the mask marks some pixel."""
        if (init_latent is None) != (init_mask is None):
            raise ValueError("object placement needs both init_latent (the image's latent) and init_mask (where the concepts go); give both or neither")
        if init_latent is None:
            return
        b, c, h, w = noise.shape
        if init_latent.dim() != 4 or init_latent.shape[0] not in (1, b) or tuple(init_latent.shape[1:]) != (c, h, w):
            raise ValueError(f"init_latent must be [1 or {b}, {c}, {h}, {w}] like the noise (vae.encode_images of the image at the output size), got {list(init_latent.shape)}")
        ConceptConductor.check_init_mask(init_mask, (h, w))

    @staticmethod
    def check_init_mask(init_mask: Tensor, grid: tuple[int, int], name: str = "init_mask") -> None:
        """Object placement's mask fits the latent `grid`, is bool or float in [0, 1], and marks some pixel."""
        if tuple(init_mask.shape) != tuple(grid):
            raise ValueError(f"{name} is {list(init_mask.shape)} but the latent grid is {list(grid)}: give it at the latent size (the image size / 8)")
        if init_mask.dtype != torch.bool and (not init_mask.is_floating_point() or not bool(torch.isfinite(init_mask).all())
                                              or init_mask.min() < 0 or init_mask.max() > 1):  # fmt: skip
            raise ValueError(f"{name} must be bool or float in [0, 1] (1 where the concepts go), got {init_mask.dtype} in "
                             f"[{init_mask.min()}, {init_mask.max()}]: threshold an image mask first, e.g. mask > 127")
        if not bool(init_mask.any()):  # blended as a weight: any pixel above 0 is (partly) redrawn
            raise ValueError(f"{name} marks no pixel of the {grid[0]}x{grid[1]} latent grid: nothing would be redrawn, the image would come "
                             "back as it is; mark where the concepts go (a larger region, where a small one vanished when resized)")

    def masks_from_points(
        self,
        reference: Reference,
        points: Sequence[tuple[float, float]],
        image_size: tuple[int, int],
        latent: Sequence[int],
        *,
        k: int = 6,
        official_cell: int | None = None,
    ) -> Tensor:
        """Layout masks [n, h, w] on the latent grid from one point (x, y) per concept on the reference
        image of size (width, height), as the official point initialisation: the base UNet on the
        reference's inversion at the last refinement step, with the reference prompt; K-means with k
        clusters over its mask layer's self-attention; the cluster under each point. `official_cell`
        maps a point to its cell as the official code does (32 reproduces its SDXL cells, at half the
        coordinates: `conductor_masks.masks_from_points`)."""
        t = int(self.schedule.timesteps(self.settings.steps)[min(self.settings.refine_end, self.settings.steps - 1)])
        self.check_reference(reference, [t], latent)
        layer = self.settings.mask_layer
        record = RecordAttention(layers={layer}, kind="self")
        latent_z = reference.latents[t]
        with torch.no_grad():
            y = None if reference.y is None else reference.y[None]
            self.unet(latent_z, torch.full((1,), float(t), device=latent_z.device), reference.context[None].to(latent_z), y=y, controls=Controls(record=[record], stop_after=(layer, "self")))
        grid = self.layer_grids(latent)[layer]
        masks = points_to_masks(record.maps[layer][0][0, 0], grid, points, image_size, k=k, cluster=self.cluster, official_cell=official_cell)
        return masks_at(masks[None], tuple(latent))[0]

    def check_vectors(self, y: Tensor | None, y_uncond: Tensor | None, concepts: Sequence[Concept], reference: Reference | None) -> None:
        """SDXL needs every path's vectors (and the reference's while layout alignment runs); SD1.x none."""
        given = [y, y_uncond, *(c.y for c in concepts), *(c.y_uncond for c in concepts)]
        if reference is not None and self.settings.guidance_end >= 0:
            given.append(reference.y)
        if self.unet.config.adm_in_channels is None:
            if any(v is not None for v in given):
                raise ValueError("vectors y are SDXL's; this SD1.x/SD2.x UNet reads the contexts alone")
        elif any(v is None for v in given):
            raise ValueError(
                "this SDXL UNet needs the vector y [D] (pooled text + sizes, sdxl_vector) of every path: pass y= and "
                "y_uncond= to sample, Concept(y=..., y_uncond=...) for each concept, and Reference(y=...)"
            )

    # -- the paths as rows ---------------------------------------------------------------------------

    @staticmethod
    def vectors(rows: Rows, paths: Sequence[Concept], row: Callable[[int, bool, int], int], halves: Sequence[bool]) -> Tensor | None:
        """SDXL's y per row [B, D] for the rows `row(path, uncond, image)` of `halves`; None for SD1.x."""
        if paths[0].y is None:
            return None
        placed = {row(p, uncond, j): (path.y_uncond if uncond else path.y) for p, path in enumerate(paths) for uncond in halves for j in range(rows.batch)}
        return torch.stack([placed[r] for r in sorted(placed)])

    def contexts(self, per_row: Sequence[Tensor]) -> dict[str, Tensor]:
        """Each cross-attention layer's context [B, T, C], row by row, from per-row contexts [T, C] or [L, T, C]."""
        return {
            layer: torch.stack([c[index] if c.dim() == 3 else c for c in per_row])
            for index, layer in enumerate(self.cross_layers)
        }

    @staticmethod
    def scoped_low_rank(concepts: Sequence[Concept], rows_of: Callable[[int], Sequence[int]], size: int) -> list[LowRank]:
        """Each concept's LoRA on its own rows only (`rows_of(path)`), as row weights of a batch of `size`."""
        scoped = []
        for i, concept in enumerate(concepts):
            weights = torch.zeros(size)
            weights[list(rows_of(i + 1))] = 1.0
            scoped += [replace(delta, rows=weights.to(delta.up.device)) for delta in concept.low_rank]
        return scoped

    def generation_inputs(self, rows: Rows, context: Tensor, uncond: Tensor, concepts: Sequence[Concept]) -> Controls:
        """The step-independent part of a generation call: per-row contexts and per-row LoRAs."""
        per_row = [None] * (2 * rows.paths * rows.batch)
        for path in range(rows.paths):
            cond_context, uncond_context = (context, uncond) if path == 0 else (concepts[path - 1].context, concepts[path - 1].uncond)
            for image in range(rows.batch):
                per_row[rows.generation(path, False, image)] = cond_context
                per_row[rows.generation(path, True, image)] = uncond_context
        rows_of = lambda path: [rows.generation(path, u, j) for u in (False, True) for j in range(rows.batch)]  # noqa: E731
        return Controls(contexts=self.contexts(per_row), low_rank=self.scoped_low_rank(concepts, rows_of, len(per_row)))

    def cond_rows(self, rows: Rows) -> list[int]:
        """The conditional rows of a generation call, path by path (what refinement clusters)."""
        return [rows.generation(path, False, image) for path in range(rows.paths) for image in range(rows.batch)]

    def layer_grids(self, latent: Sequence[int]) -> dict[str, tuple[int, int]]:
        """Each attention layer's token grid for a latent of size `latent` (each downsample halves, rounding up)."""
        levels = len(self.unet.config.channel_mult)
        grids = {}
        for layer in self.unet.attention_sites():
            part, index = layer.split(".")[:2]
            level = {"down": int(index), "mid": levels - 1, "up": levels - 1 - int(index)}[part]
            h, w = latent
            for _ in range(level):
                h, w = (h + 1) // 2, (w + 1) // 2
            grids[layer] = (h, w)
        return grids

    # -- the three steps -----------------------------------------------------------------------------

    def guided_eps(
        self,
        z: Tensor,
        t: int,
        rows: Rows,
        generation: Controls,
        fused: Mapping[tuple[int, int], Tensor],
        grids: Mapping[str, tuple[int, int]],
        record: RecordAttention | None,
        y: Tensor | None = None,
        callers: Controls | None = None,
    ) -> Tensor:
        """One generation call: every path on z, the base's decoder attention fused with the concepts'
        outputs inside the masks; returns the base's classifier-free-guided noise prediction [B, C, h, w].
        `y` [rows, D]: SDXL's vectors, row by row; `callers`: the caller's controls of this step, after the conductor's."""
        fuse = []
        for grid in sorted({grids[layer] for layer in self.fuse_layers}):
            layers = {layer for layer in self.fuse_layers if grids[layer] == grid}
            for uncond in (False, True):
                for image in range(rows.batch):
                    sources = [
                        (rows.generation(i + 1, uncond, image), fused[grid][image, i][None].float())
                        for i in range(rows.paths - 1)
                    ]
                    target = rows.generation(0, uncond, image)
                    fuse += [
                        FuseRows(target, sources, layers=layers, kind=kind, feature=feature)
                        for kind in self.settings.fuse_kinds for feature in self.settings.fuse_features
                    ]  # fmt: skip
        controls = combine(replace(generation, fuse=fuse, record=[record] if record is not None else []), callers)
        x = z.repeat(2 * rows.paths, 1, 1, 1)
        out = self.unet(x, torch.full((x.shape[0],), float(t), device=x.device), None, y=y, controls=controls)
        cond, uncond = out[: rows.batch], out[rows.batch : 2 * rows.batch]  # the base path's rows
        return as_noise(uncond + self.settings.cfg * (cond - uncond), z, self.schedule.alphas_cumprod()[t], self.schedule.prediction_type)

    def align_layout(
        self, z: Tensor, t: int, rows: Rows, context: Tensor, concepts: Sequence[Concept], reference: Reference, y: Tensor | None = None
    ) -> Tensor:
        """One step of layout alignment: z - weight · ∇_z [MSE(K_base, K_ref) + factor · mean_i MSE(K_i, K_ref)]
        (K: the guided features, keys by default; several layers and features are averaged)."""
        z = z.detach()
        with torch.enable_grad():  # also inside a caller's no_grad
            features = self.layout_features(z, t, rows, context, concepts, reference, y)
            weights = None
            if self.settings.loss_mask:  # the layout masks at each guided grid, summed: 2 where they overlap
                grids = self.layer_grids(z.shape[-2:])
                masks = torch.stack([concept.mask for concept in concepts])[None]  # [1, N, h, w]
                weights = {layer: masks_at(masks, grids[layer]).float().sum(1).flatten(1)[..., None].to(z) for layer in features}  # [1, h·w, 1]
            (grad,) = torch.autograd.grad(self.layout_loss(features, rows, weights), z)
        return (z - self.settings.guidance_weight * grad).detach()

    def layout_features(
        self, z: Tensor, t: int, rows: Rows, context: Tensor, concepts: Sequence[Concept], reference: Reference, y: Tensor | None = None
    ) -> dict[str, dict[str, Tensor]]:
        """The guided layers' self-attention features by layer and name ("k": keys, as `guidance_features`),
        each [1 + paths·B, N, C]: of the reference (row 0, no gradient) and of every path's conditional rows
        on z (which then requires grad; call it with gradients enabled). `y` [1 + paths·B, D]: SDXL's vectors
        in the same rows. The forward stops after the last guided layer."""
        layers = self.settings.guidance_layers
        last = max(layers, key=list(self.unet.attention_sites()).index)
        z.requires_grad_(True)
        ref_latent = reference.latents[t].to(z)
        x = torch.cat([ref_latent, z.repeat(rows.paths, 1, 1, 1)])
        per_row = [reference.context] + [context if p == 0 else concepts[p - 1].context for p in range(rows.paths) for _ in range(rows.batch)]
        rows_of = lambda path: [rows.guidance(path, j) for j in range(rows.batch)]  # noqa: E731
        capture = CaptureFeatures(layers=set(layers), kind="self", what=self.settings.guidance_features)
        controls = Controls(
            contexts=self.contexts(per_row),
            low_rank=self.scoped_low_rank(concepts, rows_of, x.shape[0]),
            capture=[capture],
            stop_after=(last, "self"),
        )
        self.unet(x, torch.full((x.shape[0],), float(t), device=x.device), None, y=y, controls=controls)
        return capture.features

    def layout_loss(self, features: Mapping[str, Mapping[str, Tensor]], rows: Rows, weights: Mapping[str, Tensor] | None = None) -> Tensor:
        """Per layer and feature: Σ over images of the mean squared difference to the reference (times the
        layer's weight [1, N, 1] when given), per path; the base path's plus `custom_guidance_factor` times
        the mean of the concepts'. The mean over layers and features (the official loss over its
        processors_guidance and params_guidance)."""
        losses = []
        for layer, by_name in features.items():
            weight = 1.0 if weights is None else weights[layer]
            losses += [self.feature_loss(feature, rows, weight) for feature in by_name.values()]
        return torch.stack(losses).mean()

    def feature_loss(self, feature: Tensor, rows: Rows, weight: Tensor | float) -> Tensor:
        """One feature [1 + paths·B, N, C]: the base path's error plus `custom_guidance_factor` times the
        concepts' mean error, each Σ over images of the mean (weighted) squared difference to row 0."""
        reference = feature[:1].detach()
        per_path = [
            ((feature[rows.guidance(p, 0) : rows.guidance(p, 0) + rows.batch] - reference).pow(2) * weight).sum(0).mean()
            for p in range(rows.paths)
        ]
        return per_path[0] + self.settings.custom_guidance_factor * torch.stack(per_path[1:]).mean()

    def refine(
        self,
        attention: Tensor,
        rows: Rows,
        trackers: dict[str, Tensor],
        fused: Mapping[tuple[int, int], Tensor],
        grid: tuple[int, int],
    ) -> dict[tuple[int, int], Tensor]:
        """One mask refinement from the head-averaged self-attention [paths·B, N, N] of the conditional
        rows (path-major): each concept's custom and base trackers move to their best-matching cluster
        (updated in place), and the fusion masks at every grid become their union, keeping the previous
        mask where concepts collide."""
        n = rows.paths - 1
        ks = range(n + 1, 2 * n + 2)
        if self.settings.rect_masks:
            for tracker in trackers.values():
                tracker.copy_(torch.stack([torch.stack([bounding_box(m) for m in masks]) for masks in tracker]))
            return fusion_masks(trackers["custom"], trackers["base"], fused)
        for image in range(rows.batch):
            base_candidates = mask_candidates(attention[image], grid, ks, self.cluster)
            for i in range(n):
                custom_candidates = mask_candidates(attention[(i + 1) * rows.batch + image], grid, ks, self.cluster)
                for name, candidates in (("custom", custom_candidates), ("base", base_candidates)):
                    trackers[name][image, i] = choose_mask(candidates, trackers[name][image, i], self.settings.overlap_threshold)
        return fusion_masks(trackers["custom"], trackers["base"], fused)


def as_noise(prediction: Tensor, z: Tensor, abar: Tensor, prediction_type: str) -> Tensor:
    """A UNet's prediction on the variance-preserving latent z_t as the noise ε that `ddim_step` takes:
    itself for an epsilon model; for a v-prediction one (SD2-768, v-pred fine-tunes)
    sqrt(abar)·v + sqrt(1 - abar)·z_t, as DDIMScheduler.step derives it. (Linear in the prediction,
    so guiding before or after the conversion is the same.)"""
    if prediction_type == "epsilon":
        return prediction
    return abar.sqrt() * prediction + (1 - abar).sqrt() * z


def ddim_step(z: Tensor, eps: Tensor, abar: Tensor, abar_prev: Tensor, eta: float = 0.0, fresh: Tensor | None = None) -> Tensor:
    """DDIM on the variance-preserving latent: predict z_0, then re-noise it to the previous level; with
    eta > 0 part of that noise is `fresh` (standard normals like z), with standard deviation

        std = eta · sqrt((1 - abar_prev) / (1 - abar) · (1 - abar / abar_prev))     (DDIMScheduler.step)
    """
    z0 = (z - (1 - abar).sqrt() * eps) / abar.sqrt()
    std = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
    z_prev = abar_prev.sqrt() * z0 + (1 - abar_prev - std**2).sqrt() * eps
    if eta == 0:
        return z_prev
    if fresh is None:
        raise ValueError("ddim_step with eta > 0 adds fresh noise: pass fresh, standard normals shaped like z")
    return z_prev + std * fresh


def check_step_finite(z: Tensor, step: int, steps: int, settings: ConductorSettings, concepts: Sequence[Concept]) -> None:
    """Stop at the first step whose latent z holds a NaN or an Inf (one check per step), rather than run every
    step and decode a black image; the error names the step and the scales that likely overflowed."""
    if bool(torch.isfinite(z).all()):
        return
    lora_scale = max((abs(delta.scale) for concept in concepts for delta in concept.low_rank), default=0.0)
    scales = [f"cfg ({settings.cfg:g})"]
    scales += [f"a concept's LoRA scale (the ED-LoRA merge weight alpha; here up to {lora_scale:g})"] if lora_scale else []
    scales += [f"the layout alignment's guidance_weight ({settings.guidance_weight:g})"] if settings.guides(step) else []
    named = scales[0] if len(scales) == 1 else f"{', '.join(scales[:-1])} or {scales[-1]}"
    raise NonFiniteError(
        f"Concept Conductor stopped: step {step + 1} of {steps} produced non-finite values (NaN or Inf). Likely causes: "
        f"{named} too large; non-finite weights, contexts or noise; in an fp16 model, an overflow (load it in fp32 or bf16)"
    )


def place(z: Tensor, init_latent: Tensor, init_mask: Tensor, noise: Tensor, abar_next: Tensor | None) -> Tensor:
    """Object placement after a step (official): z inside `init_mask`, outside it the image's latent
    noised with the run's starting `noise` to the next level (scheduler.add_noise), or the latent itself
    when `abar_next` is None (after the last step)."""
    known = init_latent if abar_next is None else abar_next.sqrt() * init_latent + (1 - abar_next).sqrt() * noise
    return init_mask * z + (1 - init_mask) * known


def check_context(unet: UNet, context: Tensor, name: str) -> None:
    """`name` is one context [T, C] of this UNet's text width (unet.config.context_dim)."""
    width = unet.config.context_dim
    if context.dim() != 2 or context.shape[-1] != width:
        fix = "drop its batch dimension (context[0])" if context.dim() == 3 and len(context) == 1 else "encode it with this model's text encoder"
        raise ValueError(f"{name} must be one context [T, {width}] (this UNet's text width), got shape {list(context.shape)}: {fix}")


def check_latent(unet: UNet, latent: Tensor, name: str, fix: str, grid: Sequence[int] | None = None) -> None:
    """`name` is one latent [1, C, h, w] with this UNet's C channels (on `grid` = (h, w) where given); else `fix` says what to give."""
    channels = unet.config.in_channels
    h, w = ("h", "w") if grid is None else grid
    if latent.dim() != 4 or latent.shape[:2] != (1, channels) or (grid is not None and tuple(latent.shape[-2:]) != tuple(grid)):
        raise ValueError(f"{name} must be one latent [1, {channels}, {h}, {w}], got shape {list(latent.shape)}: {fix}")


# ---------------------------------------------------------------- the reference's inversion


def invert_reference(
    unet: UNet,
    latent: Tensor,
    context: Tensor,
    *,
    steps: int = 200,
    schedule: DiscreteSchedule = DiscreteSchedule(),
    inversion_steps: int = 999,
    cache: str | Path | None = None,
    y: Tensor | None = None,
    progress: bool = True,
) -> Reference:
    """The reference image's latent `latent` [1, C, h, w] (the VAE mean times the scaling factor)
    inverted by deterministic DDIM with the reference `context` [T, C] and no guidance, as the official
    code does: `inversion_steps` = 999 visits every timestep 1..999, so a latent exists for each of the
    sampling timesteps of `steps` steps (those are kept). SDXL also takes the reference's vector `y` [D].

    With `cache` (a folder) the result is stored under a hash of the latent, the context, the UNet's
    weights and the schedule, and read back on the next call with the same inputs. (The official cache
    key is the image and prompt only, so a changed model silently reused stale latents.)"""
    check_latent(unet, latent, "invert_reference's latent", "give the reference image's latent with its batch dimension (vae.encode_images)")
    check_context(unet, context, "invert_reference's context")
    keep = {int(t) for t in schedule.timesteps(steps)}
    path = None
    if cache is not None:
        settings = torch.frombuffer(bytearray(repr(schedule).encode()), dtype=torch.uint8)  # betas, prediction type, spacing, offset
        key = fingerprint(unet, latent, context, *([] if y is None else [y]), torch.tensor([steps, inversion_steps]), settings)
        path = Path(cache) / f"inversion-{key}.safetensors"
        if path.exists():
            stored = load_file(path)
            return Reference(context, {int(name[1:]): z.to(latent) for name, z in stored.items()}, y)
    ascending = schedule.timesteps(inversion_steps).flip(0)
    if int(ascending[0]) == 0:
        raise ValueError("invert_reference starts from z_0 at t = 0, so the inversion's timesteps must start above 0; this "
                         "schedule's first is 0: use timestep_spacing 'leading' with steps_offset=1, as SD1.5's and SDXL's schedules")
    sigmas = schedule.t_to_sigma(torch.cat([torch.zeros(1), ascending])).to(torch.promote_types(latent.dtype, torch.float32))
    levels = [0] + [int(t) for t in ascending]
    latents: dict[int, Tensor] = {}

    def keep_level(state: dict) -> None:
        level = levels[state["i"]]
        if level in keep:
            latents[level] = state["x"] / (state["sigma"] ** 2 + 1).sqrt()

    vector = None if y is None else y[None]
    denoiser = DiscreteDenoiser(lambda x, t, step=None: unet(x, t, context[None].to(x), y=vector), schedule)
    x0 = latent * (sigmas[0] ** 2 + 1).sqrt()  # z_0 sits at level t = 0, as the official inversion starts
    x = sample_ddim_inversion(denoiser, x0, sigmas.to(latent), callback=keep_level, disable=not progress)
    if levels[-1] in keep:
        latents[levels[-1]] = x / (sigmas[-1] ** 2 + 1).sqrt()
    if path is not None:
        data = save({f"t{t}": z.contiguous().cpu() for t, z in latents.items()})
        write_atomically(path, lambda file: file.write(data), overwrite=True)  # a cache: same key, same content
    return Reference(context, latents, y)
