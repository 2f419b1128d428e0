"""Training data of the toy models: rendered scenes and their captions as tensors.

    data = render_dataset(20_000, seed=0)       # ToyData(images [N, 3, 64, 64] uint8, captions N x K)
    x = data.images_as_float(index)             # [B, 3, 64, 64] in [-1, 1], the VAE's input range
    refs = concept_references("my_star", 6)     # [6, 3, 64, 64] in [0, 1]: a personal concept's references

Scene i of a dataset comes from the seed sequence [seed, i], so a dataset is the same on every
machine and any prefix of a larger dataset is the smaller one. Each scene gets ``captions_per_scene``
independent captions (different phrasings of the same ground truth), drawn from [seed, i, k].
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from . import captions, scenes, world


PART = 500  # scenes rendered at a time (a step of the progress bar)


@dataclass
class ToyData:
    images: Tensor  # [N, 3, 64, 64] uint8
    captions: list[list[str]]  # N lists of captions_per_scene strings

    def __len__(self) -> int:
        return self.images.shape[0]

    def images_as_float(self, index: Tensor | slice) -> Tensor:
        """[B, 3, 64, 64] in [-1, 1]."""
        return self.images[index].float() / 127.5 - 1.0


def render_dataset(
    n: int, seed: int = 0, split: str = "train", captions_per_scene: int = 2, workers: int = 1, shape_only: float = 0.0,
    shape_only_captions: float = 0.0, layout: str = "anywhere", progress: bool = False,
) -> ToyData:
    """``n`` rendered scenes of ``split`` and ``layout`` (`scenes.LAYOUTS`) with ``captions_per_scene``
    captions each (``shape_only``, ``shape_only_captions``: the shares of mentions and of whole captions
    named by shape words alone, `captions.caption`); progress: a bar of the scenes rendered (on stderr).

    The scenes are rendered in contiguous parts of about `PART`, in ``workers`` processes when there are
    at least two scenes for each; every scene depends on its seed alone, so the dataset is the same for any
    number of workers."""
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if 1 < workers <= n // 2 else None
    count = max(math.ceil(n / PART), workers if pool else 1)
    bounds = [n * k // count for k in range(count + 1)]
    same = ([x] * count for x in (seed, split, captions_per_scene, shape_only, shape_only_captions, layout))
    parts = []
    with pool or nullcontext(), tqdm(total=n, desc="rendering the scenes", unit="scene", disable=not progress) as bar:
        for part in (pool.map if pool else map)(_render_part, bounds[:-1], bounds[1:], *same):
            parts.append(part)
            bar.update(len(part))
    return ToyData(torch.cat([part.images for part in parts]), [texts for part in parts for texts in part.captions])


def _render_part(
    start: int, stop: int, seed: int, split: str, captions_per_scene: int, shape_only: float = 0.0,
    shape_only_captions: float = 0.0, layout: str = "anywhere",
) -> ToyData:
    """Scenes start, ..., stop - 1 of `render_dataset(n, seed, split, captions_per_scene, ...)` with the same shares."""
    images = torch.empty(stop - start, 3, scenes.CANVAS, scenes.CANVAS, dtype=torch.uint8)
    texts = []
    for row, i in enumerate(range(start, stop)):
        scene = scenes.sample_scene(np.random.default_rng([seed, i]), split, layout=layout)
        images[row] = torch.from_numpy(np.array(scenes.render(scene).image)).permute(2, 0, 1)
        rngs = [np.random.default_rng([seed, i, k]) for k in range(captions_per_scene)]
        texts.append([captions.caption(scene, rng, shape_only, shape_only_captions).text for rng in rngs])
    return ToyData(images, texts)


def concept_references(name: str, n: int = 6, layout: str = "anywhere") -> Tensor:
    """The reference renders of personal concept ``name`` (`scenes.reference_images`), [n, 3, 64, 64] in [0, 1]."""
    renders = scenes.reference_images(world.concept(name), n=n, layout=layout)
    return torch.stack([torch.from_numpy(np.array(r.image, np.float32) / 255).permute(2, 0, 1) for r in renders])
