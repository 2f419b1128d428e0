"""Metrics on toy-world images, shared by every later experiment.

    prompt_following(judge(image), caption)     share of asked-for objects present, extras penalised
    prompt_following_with_relations(...)        the same, but 0 when a stated spatial relation fails
    attribute_report(image, caption)            one image's per-attribute counts; attribute_table: their rates
    concept_preservation(judge(image), concept) how much of a personal concept's look came out
    leakage(judge(image), concept, caption)     how much of that look spread to the other objects
    mask_auc(attention_map, mask)               does a map single out an object's pixels (ROC AUC)
    outside_change(image_a, image_b, mask)      how much an edit changed pixels outside a mask

The first five take the judge's objects (`judge.judge`), or an image, which they judge first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from . import captions, scenes, world
from .captions import Caption
from .judge import JudgedObject, judge, judge_background

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


# ---- Stated relations and the per-attribute table -----------------------------------------------------
Pairing = tuple[int | None, ...]  # asked-for object i -> index of its judged object, or None
Relation = tuple[tuple[int, ...], str, tuple[int, ...]]  # (asked-for objects of a, relation, those of b)


def stated_relations(spec: scenes.Scene | Caption) -> list[Relation]:
    """The spatial relations ``spec`` states, their objects indexing `expected_objects` (spec).

    A caption states its `Caption.relations` ("mention a <relation> mention b"); a scene states none.
    """
    if isinstance(spec, scenes.Scene):
        return []
    slots, start = [], 0
    for mention in spec.mentions:
        slots.append(tuple(range(start, start + len(mention.objects))))
        start += len(mention.objects)
    return [(slots[a], relation, slots[b]) for a, relation, b in spec.relations]


def stated_background(spec: scenes.Scene | Caption) -> str | None:
    """The background ``spec`` asks for: a scene's own, the one a caption's background phrase names, or
    None for a caption without one."""
    if isinstance(spec, scenes.Scene):
        return spec.background
    names = {phrase: name for name, phrases in world.BACKGROUND_PHRASES.items() for phrase in phrases}
    return next((names[piece.text] for piece in spec.pieces if piece.role == "background"), None)


def _pairings(options: list[list[int]]) -> Iterator[Pairing]:
    """Every way to give each asked-for object i one of ``options[i]`` (judged objects), each judged object
    at most once, or none. Prompts ask for at most three objects, so listing them all is cheap."""
    if not options:
        yield ()
        return
    for rest in _pairings(options[:-1]):
        yield (*rest, None)
        for j in options[-1]:
            if j not in rest:
                yield (*rest, j)


def _size(pairing: Pairing) -> int:
    return sum(j is not None for j in pairing)


def _holding(relations: list[Relation], found: list[JudgedObject], pairing: Pairing) -> int:
    """How many ``relations`` hold under ``pairing``: all objects of both sides are paired, and each judged
    object paired with side a lies in the relation to each one paired with side b (`captions.holds` on the
    judged centres x, y)."""

    def holds(a: tuple[int, ...], relation: str, b: tuple[int, ...]) -> bool:
        if any(pairing[i] is None for i in (*a, *b)):
            return False
        return all(captions.holds(relation, found[pairing[i]], found[pairing[k]]) for i in a for k in b)

    return sum(holds(*relation) for relation in relations)


def prompt_following_with_relations(judged: Judged, spec: scenes.Scene | Caption) -> float:
    """`prompt_following`, or 0 when a stated spatial relation fails.

    The strict score matches asked-for objects with judged objects that have all their stated
    attributes, as many as possible (a maximum matching). A stated relation "a <relation> b"
    (`stated_relations`) holds under a matching when every object of a and of b is matched and each
    judged object matched with a lies in the relation to each one matched with b (`captions.holds` on
    the judged centres). Score = the strict score when some maximum matching keeps every stated
    relation, else 0: where equal objects make several maximum matchings, no arbitrary choice among
    them fails a relation. Without stated relations (a scene states none) it is the strict score.
    """
    found, wanted = _objects(judged), expected_objects(spec)
    relations = stated_relations(spec)
    matchings = list(_pairings([[j for j, f in enumerate(found) if _matches(f, w)] for w in wanted]))
    most = max(_size(m) for m in matchings)
    kept = any(_holding(relations, found, m) == len(relations) for m in matchings if _size(m) == most)
    return prompt_following(found, spec) if kept else 0.0


def _agreements(found: list[JudgedObject], wanted: list[dict[str, str]], pairing: Pairing) -> dict[str, int]:
    """Per attribute of `LOOK`: the asked-for objects that state it and whose paired judged object has it."""
    return {
        key: sum(j is not None and key in w and getattr(found[j], key) == w[key] for w, j in zip(wanted, pairing))
        for key in LOOK
    }


def attribute_report(judged: Judged, spec: scenes.Scene | Caption, background: str | None = None) -> dict[str, float]:
    """What one image gets right of ``spec``, as numbers that add up over images (`attribute_table`).

    Each asked-for object (`expected_objects`) is paired with a distinct judged object so that the
    most stated attributes agree; among equally good pairings, the one that keeps the most stated
    relations, then the most shapes, colours, sizes, patterns and pattern colours, in that order.
    Asked-for objects beyond the judged ones stay unpaired and agree on nothing. ``background`` is
    the judged background (`judge.judge_background`), read from ``judged`` when that is an image;
    without it the background is not scored. Keys:

        objects                          asked-for objects
        shape, color, size, pattern, pattern_color
                                         paired objects that agree on it
        shape_asked, color_asked, ...    asked-for objects that state it
        exact_count                      1 when the judge found as many objects as asked, else 0
        extra, missing                   judged objects beyond the asked count; asked-for objects beyond the judged
        background, background_asked     1 when the judged background is the stated one; 1 when it is scored
        relations, relations_asked       stated relations that hold among the paired objects; stated relations
        prompt_following, prompt_following_with_relations
                                         the image's two scores
    """
    found, wanted = _objects(judged), expected_objects(spec)
    if background is None and isinstance(judged, (Image.Image, np.ndarray)):
        background = judge_background(judged)
    relations = stated_relations(spec)

    def rank(pairing: Pairing) -> tuple[int, ...]:
        agree = _agreements(found, wanted, pairing)
        return (sum(agree.values()), _holding(relations, found, pairing), *agree.values())

    best = max(_pairings([list(range(len(found)))] * len(wanted)), key=rank)
    stated = stated_background(spec)
    scored = stated is not None and background is not None
    return {
        "objects": len(wanted),
        **_agreements(found, wanted, best),
        **{f"{key}_asked": sum(key in w for w in wanted) for key in LOOK},
        "exact_count": int(len(found) == len(wanted)),
        "extra": max(len(found) - len(wanted), 0),
        "missing": max(len(wanted) - len(found), 0),
        "background": int(scored and background == stated),
        "background_asked": int(scored),
        "relations": _holding(relations, found, best),
        "relations_asked": len(relations),
        "prompt_following": prompt_following(found, spec),
        "prompt_following_with_relations": prompt_following_with_relations(found, spec),
    }


def _share(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def attribute_table(reports: Sequence[dict[str, float]]) -> dict:
    """The per-attribute table of many images, from their `attribute_report`s. Rows, None where nothing
    applies:

        prompt_following                 mean strict score over the images
        prompt_following_by_objects      {count: the same over the images that ask for that many objects}
        shape, color, size, pattern, pattern_color
                                         share of the asked-for objects stating it that got it right
        exact_count                      share of images with as many judged objects as asked
        extra_objects, missing_objects   share of images with more, fewer judged objects than asked
        background                       share of the images stating a background that show it
        relations                        share of the stated relations that hold
        prompt_following_with_relations  mean relation-aware score over the images
    """
    if not reports:
        raise ValueError("attribute_table needs the report of at least one image.")
    if odd := next((i for i, r in enumerate(reports) if set(r) != set(reports[0])), None):
        raise ValueError(f"report {odd} has other keys than report 0 ({sorted(set(reports[odd]) ^ set(reports[0]))} differ): give "
                         "attribute_report's dicts as they come")
    total = {key: sum(r[key] for r in reports) for key in reports[0]}

    def mean(values: list[float]) -> float:
        return float(np.mean(values))

    return {
        "prompt_following": mean([r["prompt_following"] for r in reports]),
        "prompt_following_by_objects": {
            n: mean([r["prompt_following"] for r in reports if r["objects"] == n])
            for n in sorted({r["objects"] for r in reports})
        },
        **{key: _share(total[key], total[f"{key}_asked"]) for key in LOOK},
        "exact_count": mean([r["exact_count"] for r in reports]),
        "extra_objects": mean([r["extra"] > 0 for r in reports]),
        "missing_objects": mean([r["missing"] > 0 for r in reports]),
        "background": _share(total["background"], total["background_asked"]),
        "relations": _share(total["relations"], total["relations_asked"]),
        "prompt_following_with_relations": mean([r["prompt_following_with_relations"] for r in reports]),
    }


# ---- Personal concepts --------------------------------------------------------------------------------
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
    values, target = _as_array(attention_map).astype(np.float64), _as_array(mask).astype(bool)
    if not np.isfinite(values).all():
        raise ValueError("mask_auc needs a finite map: this one holds NaN or Inf (ranked, a NaN would count as the highest score)")
    while values.ndim > 2 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 2 or target.ndim != 2:
        raise ValueError(f"mask_auc needs a 2-D map and mask, got shapes {values.shape} and {target.shape}.")
    positives = int(target.sum())
    negatives = target.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("mask_auc needs a mask with pixels both inside and outside; this one is all one value.")
    if values.shape != target.shape:
        resized = Image.fromarray(values.astype(np.float32)).resize(target.shape[::-1], Image.Resampling.BILINEAR)  # PIL's "F"
        values = np.asarray(resized)
    ranks = _ranks(values.ravel())
    u = ranks[target.ravel()].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def _as_float_image(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """[H, W, 3] float in 0..1 from a PIL image, an HWC array (uint8, or float in 0..1) or a [1, 3, H, W]
    or [3, H, W] tensor in 0..1; anything else (a batch, 0..255 floats, [-1, 1] tensors, NaN) is refused."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        if image.ndim == 4 and image.shape[0] != 1:
            raise ValueError(f"one image at a time: got a batch of {image.shape[0]} ([B, 3, H, W]); pass image[k : k + 1]")
        array = image.detach().float().cpu()
        array = (array[0] if array.ndim == 4 else array).permute(1, 2, 0).numpy()
    else:
        array = np.asarray(image)
        array = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError("images are compared in 0..1: got values outside it or non-finite (0..255 floats: divide by 255; "
                         "[-1, 1] decodes: (x + 1) / 2)")
    return array


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
