"""Scenes of the toy world: sample them from a seed, render them with exact per-object masks.

    scene = sample_scene(7)                   # from a seed: background + 1-3 ObjectSpecs, deterministic
    image, masks, boxes = render(scene)       # 64x64 RGB PIL image, bool [64, 64] masks, (x0, y0, x1, y1)

Geometry. Each shape is a polygon (the ring: a polygon with a hole) in unit coordinates whose
unrotated bounding box is centred on 0 with its longer side 2. An object places it at (x, y) with
that side = `extent` canvas pixels, turned by `rotation` degrees (clockwise, image y points down).
Canvas coordinates are those of the 64x64 image, whatever size is rendered.

Rendering draws at 4x resolution with hard edges and averages 4x4 blocks, which gives exact
anti-aliasing by area; an object's mask holds the pixels it covers by at least half. Objects never
overlap: their bounding boxes keep a gap of `GAP` pixels, so every mask is fully visible and no two
objects touch even after blurring.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from . import world

CANVAS = 64  # the coordinate system of scenes, in pixels
SUPERSAMPLE = 4  # render at 4x and average down
EDGE = 2.0  # objects keep this distance from the image border
GAP = 4.0  # and this distance between each other's bounding boxes
PATTERN_WEIGHTS = {"plain": 0.4, "striped": 0.2, "dotted": 0.2, "checkered": 0.2}  # how often the sampler draws each
OBJECT_COUNT_WEIGHTS = {1: 0.3, 2: 0.4, 3: 0.3}
# Where objects may lie: "anywhere" (toy-sd's world), or "halves", the world re-scoped for toy-flux
# (weights/README.md): each object centred on the left or the right half of the canvas, so at most two.
LAYOUTS: dict[str, tuple[tuple[float, float], ...] | None] = {"anywhere": None, "halves": ((17.0, 32.0), (47.0, 32.0))}
MAX_REFERENCES = 64  # reference renders of one concept (train_residuals.py and train_edlora.py --references)
REPEAT_PROBABILITY = 0.25  # a scene of two or more repeats one look, so captions can count


@dataclass(frozen=True)
class ObjectSpec:
    """One object: its look (shape, color, size, pattern) and its placement on the 64x64 canvas."""

    shape: str
    color: str
    size: str
    pattern: str = "plain"
    pattern_color: str | None = None  # None exactly when the pattern is plain
    x: float = 32.0  # centre of the unrotated bounding box
    y: float = 32.0
    extent: float = 26.0  # longer side of the unrotated bounding box
    rotation: float = 0.0  # degrees, clockwise

    def __post_init__(self) -> None:
        checks = [
            (self.shape in world.SHAPES, f"shape {self.shape!r} is not one of {world.SHAPES}"),
            (self.color in world.COLORS, f"color {self.color!r} is not one of {tuple(world.COLORS)}"),
            (self.size in world.SIZES, f"size {self.size!r} is not one of {tuple(world.SIZES)}"),
            (self.pattern in world.PATTERNS, f"pattern {self.pattern!r} is not one of {world.PATTERNS}"),
            (
                (self.pattern == "plain") == (self.pattern_color is None),
                "pattern_color must be None for a plain object and a colour otherwise",
            ),
            (
                self.pattern_color in (None, *world.COLORS) and self.pattern_color != self.color,
                f"pattern_color {self.pattern_color!r} must be one of {tuple(world.COLORS)}, not the body colour",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"Invalid ObjectSpec: {message}.")

    @property
    def look(self) -> tuple[str, str, str, str, str | None]:
        """(shape, color, size, pattern, pattern_color): everything but the placement."""
        return (self.shape, self.color, self.size, self.pattern, self.pattern_color)


@dataclass(frozen=True)
class Scene:
    """A background and its objects. ``split`` says which vocabulary the captions may use."""

    background: str
    objects: tuple[ObjectSpec, ...]
    split: str = "train"

    def __post_init__(self) -> None:
        if self.background not in world.BACKGROUNDS:
            raise ValueError(f"Unknown background {self.background!r}; choose one of {tuple(world.BACKGROUNDS)}.")
        if self.split not in ("train", "heldout"):
            raise ValueError(f"Unknown split {self.split!r}; choose 'train' or 'heldout'.")


class Rendering(NamedTuple):
    image: Image.Image  # RGB, size x size
    masks: list[np.ndarray]  # per object, bool [size, size]
    boxes: list[tuple[int, int, int, int]]  # per object, (x0, y0, x1, y1) of its mask, end exclusive


# ---- Geometry ------------------------------------------------------------------------------------
def _normalised(points: np.ndarray) -> np.ndarray:
    """Shift a polygon's bounding box to be centred on 0 and scale its longer side to 2."""
    low, high = points.min(0), points.max(0)
    return (points - (low + high) / 2) * (2 / (high - low).max())


def _regular(n: int, radius: float = 1.0, start: float = -math.pi / 2) -> np.ndarray:
    angles = start + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], 1)


@cache
def outline(shape: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(outer polygon [N, 2], hole polygon [M, 2] or None) of ``shape`` in unit coordinates (y down)."""
    hole = None
    if shape == "circle":
        outer = _regular(96)
    elif shape == "ring":
        outer, hole = _regular(96), _regular(96, radius=0.35)
    elif shape == "square":
        outer = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    elif shape == "triangle":
        outer = np.array([[0, -1], [1, 1], [-1, 1]], float)
    elif shape == "diamond":
        outer = np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], float)
    elif shape == "star":  # five points; the inner corners at 0.55 of the outer radius keep the arms wide
        tips, inner = _regular(5), _regular(5, radius=0.55, start=-math.pi / 2 + math.pi / 5)
        outer = _normalised(np.stack([tips, inner], 1).reshape(10, 2))
    elif shape == "heart":  # the classic parametric heart, point down
        t = np.linspace(0, 2 * math.pi, 120, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        outer = _normalised(np.stack([x, y], 1))
    elif shape == "cross":  # a plus sign with arms 0.36 wide (of 1)
        a = 0.36
        outer = np.array(
            [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]]
        )
    else:
        raise ValueError(f"Unknown shape {shape!r}; choose one of {world.SHAPES}.")
    return outer, hole


def place(points: np.ndarray, x: float, y: float, extent: float, rotation: float) -> np.ndarray:
    """Unit-coordinate points -> canvas coordinates: scale to ``extent``, turn by ``rotation``, move to (x, y)."""
    c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    turned = points @ np.array([[c, s], [-s, c]])  # row vectors: p @ R^T, R = [[c, -s], [s, c]]
    return turned * (extent / 2) + np.array([x, y])


def bounding_box(obj: ObjectSpec) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the placed, turned outline in canvas coordinates."""
    points = place(outline(obj.shape)[0], obj.x, obj.y, obj.extent, obj.rotation)
    return (*points.min(0), *points.max(0))


# ---- Drawing -------------------------------------------------------------------------------------
def _crop_box(obj: ObjectSpec, scale: float, side: int) -> tuple[int, int, int, int]:
    """Integer pixel box (x0, y0, x1, y1) that holds the object at ``scale``, clipped to the image."""
    x0, y0, x1, y1 = bounding_box(obj)
    return (
        max(0, math.floor(x0 * scale) - 1),
        max(0, math.floor(y0 * scale) - 1),
        min(side, math.ceil(x1 * scale) + 2),
        min(side, math.ceil(y1 * scale) + 2),
    )


def _shape_mask(
    shape: str, x: float, y: float, extent: float, rotation: float, scale: float, box: tuple[int, int, int, int]
) -> np.ndarray:
    """Hard-edged bool mask of a placed shape inside ``box`` of an image with ``scale`` pixels per canvas unit."""
    mask = Image.new("L", (box[2] - box[0], box[3] - box[1]), 0)
    draw = ImageDraw.Draw(mask)
    outer, hole = outline(shape)
    args = (x * scale - box[0], y * scale - box[1], extent * scale, rotation)
    draw.polygon([tuple(p) for p in place(outer, *args)], fill=255)
    if hole is not None:
        draw.polygon([tuple(p) for p in place(hole, *args)], fill=0)
    return np.asarray(mask) > 0


def coverage(
    shape: str, x: float, y: float, extent: float, rotation: float, box: tuple[int, int, int, int]
) -> np.ndarray:
    """Float [h, w] in [0, 1]: the share of each canvas pixel of ``box`` = (x0, y0, x1, y1) that the shape covers."""
    fine = tuple(v * SUPERSAMPLE for v in box)
    mask = _shape_mask(shape, x, y, extent, rotation, SUPERSAMPLE, fine)  # type: ignore[arg-type]
    h, w = box[3] - box[1], box[2] - box[0]
    return mask.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean((1, 3))


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels whose whole (2 radius + 1)^2 square neighbourhood lies in ``mask`` (outside counts as empty)."""
    width = 2 * radius + 1
    for axis in (0, 1):
        padded = np.pad(mask, [(radius + 1, radius) if a == axis else (0, 0) for a in (0, 1)])
        counts = np.cumsum(padded, axis=axis, dtype=np.int32)
        upper = counts.take(range(width, counts.shape[axis]), axis=axis)
        lower = counts.take(range(0, counts.shape[axis] - width), axis=axis)
        mask = (upper - lower) == width
    return mask


def pattern_at(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bool: where ``pattern`` puts the second colour at object-frame points (u, v) (canvas pixels from the centre).

    u runs along the object's width, v along its height. Two stripes flank v = 0, a dot sits on the
    centre, four checks meet at it.
    """
    if pattern == "striped":
        return np.abs(np.mod(v, world.STRIPE_PERIOD) - world.STRIPE_PERIOD / 2) < world.STRIPE_WIDTH / 2 + 0 * u
    if pattern == "dotted":
        p = world.DOT_PERIOD
        du, dv = np.mod(u + p / 2, p) - p / 2, np.mod(v + p / 2, p) - p / 2
        return du**2 + dv**2 < world.DOT_RADIUS**2
    if pattern == "checkered":
        return (np.floor(u / world.CHECK_CELL) + np.floor(v / world.CHECK_CELL)) % 2 == 1
    if pattern == "plain":
        return np.zeros(np.broadcast(u, v).shape, bool)
    raise ValueError(f"Unknown pattern {pattern!r}; choose one of {world.PATTERNS}.")


def pattern_mask(obj: ObjectSpec, scale: float, box: tuple[int, int, int, int]) -> np.ndarray:
    """Bool mask over ``box``: where the second colour goes, before clipping to the object's interior."""
    dx = (np.arange(box[0], box[2]) + 0.5)[None, :] / scale - obj.x  # pixel centres in canvas units
    dy = (np.arange(box[1], box[3]) + 0.5)[:, None] / scale - obj.y
    c, s = math.cos(math.radians(obj.rotation)), math.sin(math.radians(obj.rotation))
    return pattern_at(obj.pattern, c * dx + s * dy, -s * dx + c * dy)


def render(scene: Scene, size: int = 64) -> Rendering:
    """Draw ``scene`` as a size x size RGB image with its per-object masks and boxes."""
    if size < 16:
        raise ValueError(f"render size must be at least 16 pixels, got {size}; the toy world is drawn for 64.")
    side, scale = size * SUPERSAMPLE, size * SUPERSAMPLE / CANVAS
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = world.BACKGROUNDS[scene.background]
    rim = round(world.PATTERN_RIM * scale)
    masks, boxes = [], []
    for obj in scene.objects:
        box = _crop_box(obj, scale, side)
        body = _shape_mask(obj.shape, obj.x, obj.y, obj.extent, obj.rotation, scale, box)
        region = canvas[box[1] : box[3], box[0] : box[2]]  # a view: writes go to the canvas
        region[body] = world.COLORS[obj.color]
        if obj.pattern != "plain":
            region[erode(body, rim) & pattern_mask(obj, scale, box)] = world.COLORS[obj.pattern_color]
        full = np.zeros((side, side), bool)
        full[box[1] : box[3], box[0] : box[2]] = body
        mask = full.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean((1, 3)) >= 0.5
        ys, xs = np.nonzero(mask)
        masks.append(mask)
        boxes.append((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    pixels = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean((1, 3))  # area average = anti-aliasing
    return Rendering(Image.fromarray(np.round(pixels).astype(np.uint8)), masks, boxes)


# ---- Sampling ------------------------------------------------------------------------------------
def _rng(rng: int | np.random.Generator) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _sample_look(rng: np.random.Generator, heldout_pair: bool = False) -> tuple[str, str, str, str | None]:
    """(shape, color, pattern, pattern_color): a training look (no held-out pair, no concept look), or
    with ``heldout_pair`` a look whose color x shape pair is held out of training."""
    pairs = sorted(world.HELDOUT_PAIRS)
    while True:
        if heldout_pair:
            color, shape = pairs[rng.integers(len(pairs))]
        else:
            shape, color = str(rng.choice(world.SHAPES)), str(rng.choice(list(world.COLORS)))
        pattern = str(rng.choice(list(PATTERN_WEIGHTS), p=list(PATTERN_WEIGHTS.values())))
        second = None if pattern == "plain" else str(rng.choice([c for c in world.COLORS if c != color]))
        if world.is_base_look(color, shape, pattern, second, "heldout" if heldout_pair else "train"):
            return shape, color, pattern, second


def _overlaps(box: tuple[float, ...], others: list[tuple[float, ...]]) -> bool:
    return any(
        box[0] < o[2] + GAP and o[0] < box[2] + GAP and box[1] < o[3] + GAP and o[1] < box[3] + GAP for o in others
    )


def _placed(rng: np.random.Generator, look: tuple, size: str, rotation_range: float) -> ObjectSpec:
    """The look at a random extent and rotation, centred on the canvas (placement comes later)."""
    low, high = world.SIZES[size]
    shape, color, pattern, second = look
    rotation = float(rng.uniform(-rotation_range, rotation_range))
    return ObjectSpec(shape, color, size, pattern, second, extent=float(rng.uniform(low, high)), rotation=rotation)


def _slots(layout: str) -> tuple[tuple[float, float], ...] | None:
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; choose one of {tuple(LAYOUTS)}.")
    return LAYOUTS[layout]


def max_objects(layout: str = "anywhere") -> int:
    """How many objects a scene of ``layout`` holds at most."""
    slots = _slots(layout)
    return max(OBJECT_COUNT_WEIGHTS) if slots is None else len(slots)


def _inside(box: tuple[float, ...]) -> bool:
    return box[0] >= EDGE and box[1] >= EDGE and box[2] <= CANVAS - EDGE and box[3] <= CANVAS - EDGE


def _arrange(rng: np.random.Generator, objects: list[ObjectSpec], layout: str = "anywhere", tries: int = 200) -> tuple[ObjectSpec, ...] | None:
    """Non-overlapping positions inside the canvas, or None when they do not fit: random ones, or for
    a layout of slots, a random slot for each object (which fits or not as it is drawn)."""
    slots = _slots(layout)
    if slots is not None:
        chosen = [slots[k] for k in rng.permutation(len(slots))[: len(objects)]]
        moved = [dataclasses.replace(obj, x=x, y=y) for obj, (x, y) in zip(objects, chosen)]
        boxes = [bounding_box(obj) for obj in moved]
        fits = all(_inside(box) and not _overlaps(box, boxes[:i]) for i, box in enumerate(boxes))
        return tuple(moved) if fits else None
    placed: list[ObjectSpec] = []
    boxes: list[tuple[float, ...]] = []
    for obj in objects:
        x0, y0, x1, y1 = bounding_box(obj)  # obj is centred at (32, 32)
        for _ in range(tries):
            dx = rng.uniform(EDGE - x0, CANVAS - EDGE - x1)
            dy = rng.uniform(EDGE - y0, CANVAS - EDGE - y1)
            box = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
            if not _overlaps(box, boxes):
                placed.append(dataclasses.replace(obj, x=obj.x + dx, y=obj.y + dy))
                boxes.append(box)
                break
        else:
            return None
    return tuple(placed)


def _check_count(n_objects: int, layout: str) -> None:
    if not 1 <= n_objects <= max_objects(layout):
        raise ValueError(f"n_objects must be from 1 to {max_objects(layout)} in layout {layout!r}, got {n_objects}.")


def sample_scene(
    rng: int | np.random.Generator, split: str = "train", n_objects: int | None = None, layout: str = "anywhere"
) -> Scene:
    """A random scene, deterministic for a seed (or drawn from a numpy Generator).

    ``split="train"`` never draws a held-out color x shape pair; ``split="heldout"`` puts at least one
    in every scene. Neither draws a personal concept's look. ``n_objects`` (1-3; 1-2 in the "halves"
    layout) defaults to a random count; scenes of two or more sometimes repeat a look
    (`REPEAT_PROBABILITY`), so captions can count ("two red circles"). ``layout``: where objects may
    lie (`LAYOUTS`); a scene whose objects do not fit is drawn again, looks and sizes included.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"Unknown split {split!r}; choose 'train' or 'heldout'.")
    if n_objects is not None:
        _check_count(n_objects, layout)
    rng = _rng(rng)
    background = str(rng.choice(list(world.BACKGROUNDS)))
    counts = {k: w for k, w in OBJECT_COUNT_WEIGHTS.items() if k <= max_objects(layout)}
    count = n_objects or int(rng.choice(list(counts), p=np.array(list(counts.values())) / sum(counts.values())))
    while True:
        looks = [_sample_look(rng) for _ in range(count)]
        sizes = [str(rng.choice(list(world.SIZES))) for _ in range(count)]
        if split == "heldout":
            looks[0] = _sample_look(rng, heldout_pair=True)
        if count >= 2 and rng.random() < REPEAT_PROBABILITY:
            looks[-1], sizes[-1] = looks[0], sizes[0]
        order = rng.permutation(count)
        objects = [_placed(rng, looks[i], sizes[i], world.ROTATION_RANGE) for i in order]
        arranged = _arrange(rng, objects, layout)
        if arranged is not None:
            return Scene(background, arranged, split)


def concept_scene(
    concept: world.PersonalConcept, rng: int | np.random.Generator, n_objects: int = 1, layout: str = "anywhere"
) -> Scene:
    """A scene with a personal concept as object 0 (random size and pose) and ``n_objects - 1`` base objects.

    Object 0 is the only one of the concept's look and size. A personal concept's look is never a base look;
    a random look given as a concept (AlignGen's toy pairs) may be, and the others are then drawn again, since
    a caption would count it ("two small pink squares").
    """
    _check_count(n_objects, layout)
    rng = _rng(rng)
    background = str(rng.choice(list(world.BACKGROUNDS)))
    look = (concept.shape, concept.color, concept.pattern, concept.pattern_color)
    while True:
        looks = [look] + [_sample_look(rng) for _ in range(n_objects - 1)]
        sizes = [str(rng.choice(list(world.SIZES))) for _ in range(n_objects)]
        arranged = _arrange(rng, [_placed(rng, lk, sz, world.ROTATION_RANGE) for lk, sz in zip(looks, sizes)], layout)
        if arranged is not None and (look, sizes[0]) not in list(zip(looks, sizes))[1:]:
            return Scene(background, arranged, "train")


def reference_scenes(concept: world.PersonalConcept, n: int = 6, seed: int = 0, layout: str = "anywhere") -> list[Scene]:
    """``n`` single-object scenes of a personal concept in varied poses, sizes and backgrounds.

    Deterministic for (concept, n, seed, layout); the backgrounds cycle so that any 6 consecutive
    references show all six, and the sizes alternate.
    """
    if not 1 <= n <= MAX_REFERENCES:
        raise ValueError(f"n must be between 1 and {MAX_REFERENCES} reference images, got {n}.")
    rng = np.random.default_rng([seed, zlib.crc32(concept.name.encode())])
    backgrounds = list(world.BACKGROUNDS)
    offset = int(rng.integers(len(backgrounds)))
    look = (concept.shape, concept.color, concept.pattern, concept.pattern_color)
    scenes = []
    for i in range(n):
        arranged = None
        while arranged is None:  # one object always fits somewhere; at a slot, a pose may not
            arranged = _arrange(rng, [_placed(rng, look, ("large", "small")[i % 2], world.ROTATION_RANGE)], layout)
        scenes.append(Scene(backgrounds[(offset + i) % len(backgrounds)], arranged, "train"))
    return scenes


def reference_images(
    concept: world.PersonalConcept, n: int = 6, size: int = 64, seed: int = 0, layout: str = "anywhere"
) -> list[Rendering]:
    """Renderings of `reference_scenes` (one object each, so ``masks[0]`` is the concept)."""
    return [render(scene, size) for scene in reference_scenes(concept, n, seed, layout)]
