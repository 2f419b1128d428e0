"""Reference -> target pairs of the toy world: what the toy reference adapters learn from.

    pair = sample_pair(np.random.default_rng([1, 7]))    # Pair(reference: Scene, target: Scene, index)
    data = render_pairs(20_000, seed=1)                  # PairData(references, targets [N, 3, 64, 64] uint8, captions N x K)
    data = render_pairs(20_000, seed=1, layout="halves") # targets in toy-flux's world (`scenes.LAYOUTS`)

An image-prompt adapter (IP-Adapter, OminiControl's subject task) learns to put the object of one
image into another. A pair here is

    target     a training-split scene of one to three objects (one or two in the "halves" layout, where
               the base model learnt that world), with its captions
    reference  one of its objects alone: the same look (shape, colour, pattern, pattern colour),
               large, centred, turned a little, on a neutral background (white or gray)

so what the reference does not fix the target varies: the object's size, position, rotation and
background, and 0-2 other objects around it. The captions name the reference's object by its
shape word alone ("a star to the left of a small blue circle"), as a DreamBench prompt names its
subject by the class: the look has to come from the reference; the other objects are described
in full. The object is one whose look no other object of the target shares, so that a mention of
it alone exists (a repeated look is counted, "two red circles", and is not renamed).

Only the train split is drawn: no held-out colour x shape pair and no personal concept's look
appears in a pair (the personal concepts are the adapters' test subjects, `reference_scene` draws
their references the same way). Pair i comes from the seed sequence [seed, i] and its caption k
from [seed, i, k], so any prefix of a larger set is the smaller one, for any number of workers.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import captions, scenes, world

REFERENCE_BACKGROUNDS = ("white", "gray")  # neutral: no scene background is implied by the reference


@dataclass(frozen=True)
class Pair:
    reference: scenes.Scene  # one object
    target: scenes.Scene
    index: int  # the target object the reference shows


@dataclass
class PairData:
    references: Tensor  # [N, 3, 64, 64] uint8
    targets: Tensor  # [N, 3, 64, 64] uint8
    captions: list[list[str]]  # N lists of captions_per_pair strings

    def __len__(self) -> int:
        return self.targets.shape[0]


def reference_scene(look: tuple[str, str, str, str | None], rng: np.random.Generator) -> scenes.Scene:
    """A look (shape, color, pattern, pattern_color) alone: large, centred, turned by up to the world's
    rotation range, on white or gray. Takes a personal concept's look as well as a base one."""
    shape, color, pattern, pattern_color = look
    low, high = world.SIZES["large"]
    alone = scenes.ObjectSpec(
        shape, color, "large", pattern, pattern_color, x=scenes.CANVAS / 2, y=scenes.CANVAS / 2,
        extent=float(rng.uniform(low, high)), rotation=float(rng.uniform(-world.ROTATION_RANGE, world.ROTATION_RANGE)),
    )  # fmt: skip
    return scenes.Scene(str(rng.choice(REFERENCE_BACKGROUNDS)), (alone,), "train")


def sample_pair(rng: np.random.Generator, layout: str = "anywhere") -> Pair:
    """A training scene in ``layout``, one of its objects with a look no other object shares, and that
    object alone (centred whatever the layout: the reference shows the look, not a place)."""
    while True:
        target = scenes.sample_scene(rng, "train", layout=layout)
        looks = [obj.look for obj in target.objects]
        unique = [i for i, look in enumerate(looks) if looks.count(look) == 1]
        if unique:  # a scene of two objects sometimes repeats one look: it has none
            break
    index = unique[int(rng.integers(len(unique)))]
    obj = target.objects[index]
    return Pair(reference_scene((obj.shape, obj.color, obj.pattern, obj.pattern_color), rng), target, index)


def pair_caption(pair: Pair, rng: np.random.Generator) -> str:
    """A caption of the target that names the reference's object by its shape word alone."""
    text = captions.caption(pair.target, rng)
    mention = next(m for m, named in enumerate(text.mentions) if pair.index in named.objects)
    shape = pair.target.objects[pair.index].shape
    return captions.with_concept(text, mention, shape, level=None).text  # "a star" in place of "a large red star"


def render_pairs(n: int, seed: int, captions_per_pair: int = 2, workers: int = 1, layout: str = "anywhere") -> PairData:
    """`n` rendered pairs with `captions_per_pair` captions each, targets in ``layout``; workers > 1
    renders contiguous parts in that many processes (the same pairs for any number)."""
    if workers <= 1 or n < 2 * workers:
        return _render_part(0, n, seed, captions_per_pair, layout)
    bounds = [n * k // workers for k in range(workers + 1)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_render_part, bounds[:-1], bounds[1:], [seed] * workers, [captions_per_pair] * workers, [layout] * workers))
    return PairData(*(torch.cat([getattr(p, k) for p in parts]) for k in ("references", "targets")), [c for p in parts for c in p.captions])


def _render_part(start: int, stop: int, seed: int, captions_per_pair: int, layout: str) -> PairData:
    """Pairs start, ..., stop - 1 of `render_pairs(n, seed, captions_per_pair, layout=layout)`."""
    references, targets = (torch.empty(stop - start, 3, scenes.CANVAS, scenes.CANVAS, dtype=torch.uint8) for _ in range(2))
    texts = []
    for row, i in enumerate(range(start, stop)):
        pair = sample_pair(np.random.default_rng([seed, i]), layout)
        references[row], targets[row] = (_pixels(scene) for scene in (pair.reference, pair.target))
        texts.append([pair_caption(pair, np.random.default_rng([seed, i, k])) for k in range(captions_per_pair)])
    return PairData(references, targets, texts)


def _pixels(scene: scenes.Scene) -> Tensor:
    """The 64x64 render as [3, 64, 64] uint8."""
    return torch.from_numpy(np.array(scenes.render(scene).image)).permute(2, 0, 1)
