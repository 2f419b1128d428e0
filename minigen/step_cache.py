"""Step caching: First Block Cache for FLUX (ParaAttention; diffusers' `FirstBlockCacheConfig`), and
DeepCache for the UNet (`DeepCache`, below).

Neighbouring sampling steps often change the transformer's output little. The first double block is
a cheap probe of how much changed: at each step the model runs it, and compares what it added to the
image tokens (its residual r) with the residual r_last of the last step that ran every block:

    change = mean |r - r_last| / mean |r_last|        (per batch row; the largest row decides)

Below `threshold`, the other 18 double and 38 single blocks are skipped and what they added at that
last full step (the cached "rest" residual) is added instead; otherwise every block runs and both
residuals are cached anew. Skipping is decided jointly for the batch, so the rows of classifier-free
guidance ([uncond | cond]) stay one batch; each row keeps its own residuals. Threshold 0 never
skips: the output is the uncached one exactly.

    cache = FirstBlockCache(threshold=0.1)
    v = flux(img, img_ids, txt, txt_ids, t, y, guidance, cache=cache)   # once per step
    pipe.generate(prompt, first_block_cache=0.1)                          # a fresh cache per generation

One cache serves one generation: `reset()` it (the pipeline does) before the next.

Measured (scripts/benchmark.py flux-cache and unet-cache, 2-core CPU; the README's speed table has
the figures of the models shipped now): on an earlier toy-flux (2026-12-04), 50 held-out prompts, 25 steps
with CFG 4, threshold 0.1 skipped 48% of the steps (40% of the block evaluations of its 6 blocks;
FLUX.1's 57 would save 47%), 1.48x per image, 1.8/255 mean pixel change (12/255 for the most changed
image); on the shipped toy-flux 43%, 1.40x, 0.44/255. Random full-width weights change 0.42-0.60 per step and never skip at 0.1,
so the default is toy-flux's, not FLUX.1-dev's (ParaAttention suggests 0.08-0.12 there). DeepCache
on toy-sd (30 prompts, CFG 7.5): interval 2 1.59x, 3.6/255; interval 3 2.07x, 10.6/255 (75/255 for
the most changed image): at 8x8 latents the deep part holds nearly all of the image. SD1.5's
branch-0 path is 6% of a 256 px call's FLOPs and runs 25x faster than a full call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

DEFAULT_THRESHOLD = 0.1  # the pipeline's and sample.py's default when the cache is asked for


@dataclass(eq=False)
class FirstBlockCache:
    """The residuals of the last fully computed step, and counts of computed and skipped calls."""

    threshold: float = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not (math.isfinite(self.threshold) and self.threshold >= 0):  # True was a threshold of 1
            raise ValueError(f"FirstBlockCache: threshold must be a finite number >= 0, got {self.threshold!r}")
        self.reset()

    def reset(self) -> None:
        """Forget the cached step (a new generation starts) and zero the counts."""
        self.first_residual: Tensor | None = None  # [B, N, hidden]: what the first block added, last full step
        self.rest_residual: Tensor | None = None  # [B, N, hidden]: what the other blocks added then
        self.computed = 0  # calls that ran every block
        self.skipped = 0  # calls that ran the first block only
        self.changes: list[float] = []  # each compared call's change (largest row), to choose a threshold

    def relative_change(self, first_residual: Tensor) -> Tensor:
        """[B]: mean |r - r_last| / mean |r_last| of each row, in float32."""
        dims = tuple(range(1, first_residual.dim()))
        last = self.first_residual.float()
        return (first_residual.float() - last).abs().mean(dims) / last.abs().mean(dims)

    def can_skip(self, first_residual: Tensor) -> bool:
        """Whether this call may skip the blocks after the first (counted as skipped when it may): a full
        step of this batch shape is cached and every row changed less than `threshold` since."""
        if self.first_residual is None or self.first_residual.shape != first_residual.shape:
            return False
        change = float(self.relative_change(first_residual).max())
        self.changes.append(change)
        if change < self.threshold:
            self.skipped += 1
            return True
        return False

    def store(self, first_residual: Tensor, rest_residual: Tensor) -> None:
        """The residuals of a call that ran every block."""
        self.first_residual, self.rest_residual = first_residual, rest_residual
        self.computed += 1

    def saved_fraction(self, blocks: int) -> float:
        """The fraction of block evaluations skipped so far, for a model of `blocks` blocks in all."""
        calls = self.computed + self.skipped
        return self.skipped * (blocks - 1) / (calls * blocks) if calls else 0.0


@dataclass(eq=False)
class DeepCache:
    """DeepCache for the SD UNet (Ma et al., CVPR 2024): the deep, low-resolution part of a UNet changes
    slowly across steps, its skip connections at full resolution carry the detail.

    Every `interval`-th call runs the whole UNet and keeps the feature that enters output stage
    `len(output_blocks) - 1 - branch` from below (the deep part's result); the calls between run only
    the shallow path, input stages `0..branch` and output stages `len - 1 - branch ..`, on that cached
    feature. branch 0 (the default) keeps the first conv and the last output stage: in SD1.5 at 512 px
    the shallow path is 8% of a call's FLOPs (22% at branch 1). Each batch row keeps its own feature,
    so CFG's rows stay apart. `interval` 1 computes every call: the uncached output exactly.

        unet(x, t, context, cache=cache)                     # once per step, one cache per generation
        pipe.generate(prompt, deep_cache=3)                  # a fresh cache per generation
    """

    interval: int = 3
    branch: int = 0

    def __post_init__(self) -> None:
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (self.interval, self.branch)) or self.interval < 1 or self.branch < 0:
            raise ValueError(f"DeepCache: interval must be a whole number >= 1 and branch one >= 0, got {self.interval!r} and {self.branch!r}")
        self.reset()

    def reset(self) -> None:
        """Forget the cached feature (a new generation starts) and zero the counts."""
        self.deep: Tensor | None = None  # [B, C, h, w]: what the deep part gave at the last full call
        self.input_shape: tuple[int, ...] | None = None  # the latent shape that call had
        self.computed = 0  # calls that ran the whole UNet
        self.skipped = 0  # calls that ran the shallow path only

    def can_skip(self, x: Tensor) -> bool:
        """Whether this call may run the shallow path only (counted as skipped when it may): a feature of
        this latent shape is cached and this is not an `interval`-th call."""
        calls = self.computed + self.skipped
        if self.deep is None or self.input_shape != tuple(x.shape) or calls % self.interval == 0:
            return False
        self.skipped += 1
        return True

    def store(self, x: Tensor, deep: Tensor) -> None:
        """The deep part's result of a call that ran the whole UNet on latents x."""
        self.deep, self.input_shape = deep, tuple(x.shape)
        self.computed += 1
