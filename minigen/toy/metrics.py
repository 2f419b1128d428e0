"""Metrics on toy-world images, shared by every later experiment.

    prompt_following(judge(image), caption)     share of asked-for objects present, extras penalised
    concept_preservation(judge(image), concept) how much of a personal concept's look came out
    leakage(judge(image), concept, caption)     how much of that look spread to the other objects
    mask_auc(attention_map, mask)               does a map single out an object's pixels (ROC AUC)
    outside_change(image_a, image_b, mask)      how much an edit changed pixels outside a mask

The first three take the judge's objects (`judge.judge`), or an image, which they judge first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from . import scenes, world
from .captions import Caption
from .judge import JudgedObject, judge

Judged = Sequence[JudgedObject] | Image.Image | np.ndarray
LOOK = ("shape", "color", "size", "pattern", "pattern_color")
CONCEPT_TRAITS = ("shape", "color", "pattern", "pattern_color")


def _objects(judged: Judged) -> list[JudgedObject]:
    return judge(judged) if isinstance(judged, (Image.Image, np.ndarray)) else list(judged)


def expected_objects(spec: scenes.Scene | Caption) -> list[dict[str, str]]:
    """One dict of required attributes per object that ``spec`` asks for.

    A scene asks for every object's full look; a caption for what its words state (`Mention.attributes`),
    once per counted object.
    """
    if isinstance(spec, scenes.Scene):
        return [{k: v for k, v in zip(LOOK, obj.look) if v is not None} for obj in spec.objects]
    if isinstance(spec, Caption):
        return [dict(m.attributes) for m in spec.mentions for _ in m.objects]
    raise TypeError(f"Expected a Scene or a Caption, got {type(spec).__name__}.")


def _matches(found: JudgedObject, wanted: dict[str, str]) -> bool:
    return all(getattr(found, key) == value for key, value in wanted.items())


def _max_matching(edges: list[list[int]], n_right: int) -> int:
    """Size of a maximum bipartite matching; ``edges[i]`` lists the right nodes left node i may take."""
    owner = [-1] * n_right

    def augment(i: int, seen: set[int]) -> bool:  # Kuhn's augmenting paths
        for j in edges[i]:
            if j not in seen:
                seen.add(j)
                if owner[j] < 0 or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return sum(augment(i, set()) for i in range(len(edges)))


def prompt_following(judged: Judged, spec: scenes.Scene | Caption) -> float:
    """Share of the asked-for objects found with all their stated attributes, with no extra objects.

    Each asked-for object may be matched by one judged object that has all its stated attributes
    (a maximum matching). Score = matched / max(asked, judged): a missing or wrong object and an
    extra object each cost one unit. 1.0 when nothing is asked and nothing is there.
    """
    found, wanted = _objects(judged), expected_objects(spec)
    if not found and not wanted:
        return 1.0
    edges = [[j for j, f in enumerate(found) if _matches(f, w)] for w in wanted]
    return _max_matching(edges, len(found)) / max(len(wanted), len(found))


def concept_score(found: JudgedObject, concept: world.PersonalConcept) -> float:
    """The share of the concept's shape, colour, pattern and pattern colour that one judged object has."""
    return float(np.mean([getattr(found, t) == getattr(concept, t) for t in CONCEPT_TRAITS]))


def concept_preservation(judged: Judged, concept: world.PersonalConcept) -> float:
    """How much of the concept's look the image shows, in [0, 1].

    For each judged object, the share of the concept's shape, colour, pattern and pattern colour it
    has; the best object's share (0 with no object). 1 = the concept is reproduced in all four.
    """
    found = _objects(judged)
    return max((concept_score(f, concept) for f in found), default=0.0)


def leakage(judged: Judged, concept: world.PersonalConcept, spec: scenes.Scene | Caption | None = None) -> float:
    """How much of the concept's look appears on the other objects, in [0, 1].

    The concept is the object that preserves it best; every other judged object scores the share of
    the concept's traits (shape, colour, pattern, pattern colour) it shows, and leakage is their mean
    (0 with no other object). With ``spec``, traits that the prompt asks of some other object (a red
    circle beside a red concept) do not count as leaked.
    """
    found = _objects(judged)
    if len(found) < 2:
        return 0.0
    scores = [concept_score(f, concept) for f in found]
    others = [f for i, f in enumerate(found) if i != int(np.argmax(scores))]
    asked: dict[str, set] = {t: set() for t in CONCEPT_TRAITS}
    if spec is not None:
        concept_look = (concept.shape, concept.color, concept.pattern, concept.pattern_color)
        for wanted in _other_objects(spec, concept_look):
            for trait in CONCEPT_TRAITS:
                asked[trait].add(wanted.get(trait))
    traits = [t for t in CONCEPT_TRAITS if getattr(concept, t) not in asked[t]]
    if not traits:
        return 0.0
    return float(np.mean([np.mean([getattr(f, t) == getattr(concept, t) for t in traits]) for f in others]))


def _other_objects(spec: scenes.Scene | Caption, concept_look: tuple) -> list[dict[str, str]]:
    """The asked-for objects that are not the concept (by look in a scene, by identifier in a caption)."""
    if isinstance(spec, Caption):
        return [dict(m.attributes) for m in spec.mentions if m.concept is None for _ in m.objects]
    others = [o for o in spec.objects if (o.shape, o.color, o.pattern, o.pattern_color) != concept_look]
    return [{k: v for k, v in zip(LOOK, o.look)} for o in others]


# ---- Maps and pixels ----------------------------------------------------------------------------------
def _as_array(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values)


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``, ties sharing their average rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of the last member of each tie group
    return (last - (counts - 1) / 2)[inverse]


def mask_auc(attention_map: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> float:
    """ROC AUC of ``attention_map`` as a score for the pixels of a boolean ``mask``.

    The map ([h, w], leading size-1 dimensions allowed) is resized bilinearly to the mask's
    [H, W]. AUC = the probability that a random mask pixel scores higher than a random pixel outside
    (ties count half), computed from ranks (Mann-Whitney U). 1 = perfect, 0.5 = chance, 0 = inverted.
    """
    values, target = _as_array(attention_map).astype(np.float32), _as_array(mask).astype(bool)
    while values.ndim > 2 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 2 or target.ndim != 2:
        raise ValueError(f"mask_auc needs a 2-D map and mask, got shapes {values.shape} and {target.shape}.")
    positives = int(target.sum())
    negatives = target.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("mask_auc needs a mask with pixels both inside and outside; this one is all one value.")
    if values.shape != target.shape:
        resized = Image.fromarray(values).resize(target.shape[::-1], Image.Resampling.BILINEAR)
        values = np.asarray(resized)
    ranks = _ranks(values.ravel())
    u = ranks[target.ravel()].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def _as_float_image(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """[H, W, 3] float in 0..1 from a PIL image, an HWC array (uint8, or float in 0..1) or a [1, 3, H, W]
    or [3, H, W] tensor in 0..1."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        array = image.detach().float().cpu()
        array = array[0] if array.ndim == 4 else array
        return array.permute(1, 2, 0).numpy()
    array = np.asarray(image)
    return array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)


def outside_change(
    image_a: Image.Image | np.ndarray | torch.Tensor,
    image_b: Image.Image | np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
) -> float:
    """Mean absolute pixel change (0..1 scale, averaged over channels) outside a boolean ``mask``.

    Measures how much an edit meant for the masked object disturbed the rest of the image.
    """
    a, b, keep = _as_float_image(image_a), _as_float_image(image_b), ~_as_array(mask).astype(bool)
    if a.shape != b.shape or a.shape[:2] != keep.shape:
        raise ValueError(
            f"outside_change needs two images and a mask of one size, got {a.shape[:2]}, {b.shape[:2]} and "
            f"{keep.shape}; resize them to match first."
        )
    if not keep.any():
        raise ValueError("The mask covers the whole image, so nothing lies outside it.")
    return float(np.abs(a - b)[keep].mean())
