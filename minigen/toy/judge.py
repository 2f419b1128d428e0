"""The judge: read a toy-world image back into objects, from its pixels alone.

    objects = judge(image)      # [JudgedObject(shape="star", color="red", size="large", pattern="striped", ...)]

Every step is a plain measurement against the world's known palettes and geometry, so a wrong
answer can be traced to the step that made it:

1. Background. The median colour of the 2-pixel image border, snapped to the nearest palette
   background. Their difference is a global colour shift, which is subtracted from the image.
   An image noisier than `NOISE_TOLERANCE` (measured on the border) is first smoothed.
2. Objects. Pixels further than `FOREGROUND_DISTANCE` from the background form 8-connected
   components; specks under `MIN_AREA` pixels are noise (so is a component that step 3 finds
   covered on fewer than `MIN_AREA` pixels). Scenes keep objects 4 px apart, so one component is
   one object.
3. Colours by unmixing. Every pixel of an object is a mixture: of the body colour and the background
   at the anti-aliased or blurred edge, of the body and the pattern colour at a pattern edge. The
   body colour is the palette colour whose mixtures with the background explain the pixels best
   (pattern pixels count as capped outliers); the pattern colour is the one that, added as a third
   corner of the mixing triangle, explains them best (`fit_colors` says what happens when blur has
   mixed a pattern beyond that). Unmixing gives each pixel its coverage (body + pattern weight) and
   its pattern share.
4. Shape, size, pose by synthesis. The coverage map's sum and centroid do not change under blur.
   Each outline of `scenes.outline` is scaled to that area, centred on that centroid, turned by
   -12..12 degrees and drawn anti-aliased; the highest soft IoU with the coverage wins. The fitted
   extent gives the size (small below `SIZE_THRESHOLD`).
5. Pattern by folding. If the pattern colour lowers the residual enough (`MIN_PATTERN_EVIDENCE`),
   the pattern-share map is turned into the object's frame and folded onto one period of each
   pattern (stripes 7 px, dots 6 px, checks 8 px); the ideal period at its best phase correlates
   best for the true pattern. Otherwise, or when nothing correlates, the object is plain.

`validate_judge` measures accuracy on fresh renders, clean and degraded the way generated images
are (`degrade.DEGRADATIONS`: blur, noise, colour shift, JPEG, down-and-up scaling, all combined):

    python -m minigen.toy.judge --validate --n 1000
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageFilter

from minigen.cli import Parser, positive_int, run

from . import scenes, world
from .degrade import DEGRADATIONS, degrade

CANVAS = scenes.CANVAS
ANGLES = tuple(float(a) for a in range(-12, 13, 3))  # rotations tried, degrees
ROUND_SHAPES = ("circle", "ring")  # a rotation does not change them
SIZE_THRESHOLD = (world.SIZES["small"][1] + world.SIZES["large"][0]) / 2  # fitted extent, pixels

# Thresholds, set by looking at renders of validation seed 0 (RGB distances on the 0-255 scale).
NOISE_TOLERANCE = 12.0  # noisier images (sigma) are smoothed first
FOREGROUND_DISTANCE = 32.0  # a pixel this far from the background colour belongs to some object
MIN_AREA = 20  # components or coverage masks smaller than this (pixels) are noise
RESIDUAL_CAP = 40.0  # a pixel further than this from every mixture counts as this far (outliers)
SWITCH_RATIO = 0.5  # a colour pair without the lone best colour must halve the residual to win
MIN_PATTERN_EVIDENCE = 150.0  # a second colour must lower the mean squared residual this much
MIN_PATTERN_CORRELATION = 0.2  # a weaker fit of every pattern means plain

COLOR_NAMES = tuple(world.COLORS)
PALETTE = np.array(list(world.COLORS.values()), np.float32)  # [10, 3]


@dataclass(frozen=True, eq=False)  # eq=False: the mask array has no single truth value
class JudgedObject:
    """One object read from an image. ``x, y, extent, rotation`` are the fitted outline's placement."""

    shape: str
    color: str
    size: str
    pattern: str
    pattern_color: str | None
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), end exclusive
    mask: np.ndarray  # bool [64, 64]
    x: float
    y: float
    extent: float
    rotation: float
    shape_fit: float  # soft IoU of the winning outline, 0..1
    pattern_evidence: float  # drop of the mean squared colour residual (RGB^2) that a second colour brings
    pattern_fit: float  # correlation of the winning pattern, 0 when plain

    @property
    def look(self) -> tuple[str, str, str, str, str | None]:
        """(shape, color, size, pattern, pattern_color), as `ObjectSpec.look`."""
        return (self.shape, self.color, self.size, self.pattern, self.pattern_color)


# ---- 1. Pixels and background -------------------------------------------------------------------------
def as_pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """Float32 [64, 64, 3] in 0..255 from a PIL image or an [H, W, 3] array (uint8, or float in 0..1)."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"Expected an [H, W, 3] RGB array, got shape {image.shape}; pass a PIL image or HWC array")
        array = image.astype(np.float32) * (255.0 if image.dtype.kind == "f" else 1.0)
        image = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (CANVAS, CANVAS):
        image = image.resize((CANVAS, CANVAS), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32)


def estimate_background(pixels: np.ndarray) -> tuple[str, np.ndarray]:
    """(name of the nearest palette background, observed colour [3]): median of the 2-pixel border."""
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])  # fmt: skip
    observed = np.median(border, axis=0)
    names = list(world.BACKGROUNDS)
    distances = np.linalg.norm(np.array(list(world.BACKGROUNDS.values())) - observed, axis=1)
    return names[int(distances.argmin())], observed


def noise_level(pixels: np.ndarray) -> float:
    """Standard deviation of pixel noise (0-255 scale), from neighbour differences along the image border.

    The border is background, so neighbours differ only by noise: the median absolute difference
    times 1.4826 / sqrt(2) estimates sigma, and the median ignores the few objects that touch it.
    """
    rows = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # [4 * 64, 3]
    differences = np.abs(np.diff(rows, axis=0))
    return float(np.median(differences) * 1.4826 / math.sqrt(2))


# ---- 2. Connected components ---------------------------------------------------------------------------
def _spread(seeds: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Grow ``seeds`` through 8-neighbours inside ``region`` until nothing changes (flood fill)."""
    grown = seeds & region
    while True:
        padded = np.pad(grown, 1)
        neighbours = np.zeros_like(grown)
        for dy in range(3):
            for dx in range(3):
                neighbours |= padded[dy : dy + grown.shape[0], dx : dx + grown.shape[1]]
        new = neighbours & region
        if np.array_equal(new, grown):
            return grown
        grown = new


def components(mask: np.ndarray, min_area: int = MIN_AREA) -> list[np.ndarray]:
    """The 8-connected components of ``mask`` with at least ``min_area`` pixels, largest first."""
    remaining, found = mask.copy(), []
    while remaining.any():
        seed = np.zeros_like(remaining)
        seed.flat[int(np.flatnonzero(remaining)[0])] = True
        part = _spread(seed, remaining)
        remaining &= ~part
        if part.sum() >= min_area:
            found.append(part)
    return sorted(found, key=lambda m: -int(m.sum()))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within a (2 radius + 1)^2 square of ``mask``."""
    padded = np.pad(mask, radius)  # outside the image counts as empty (erode's complement would not)
    return ~scenes.erode(~padded, radius)[radius:-radius, radius:-radius]


# ---- 3. Colours by unmixing ---------------------------------------------------------------------------
def unmix(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest points of triangles (0, a, b) to pixels: weights (w_a, w_b) and squared residuals.

    x [n, 3] are pixels minus the background, a and b [c, 3] are candidate colours minus the
    background. The triangle holds every mixture of background, a and b with non-negative weights
    summing to at most 1: anti-aliased and blurred edges (with the background) and pattern edges
    (between a and b). Returns three [c, n] arrays.
    """
    aa, bb, ab = (a * a).sum(1)[:, None], (b * b).sum(1)[:, None], (a * b).sum(1)[:, None]  # [c, 1]
    xa, xb = a @ x.T, b @ x.T  # [c, n]
    xx = (x * x).sum(1)[None]  # [1, n]

    def residual(wa: np.ndarray, wb: np.ndarray) -> np.ndarray:  # |x - wa a - wb b|^2
        return xx - 2 * (wa * xa + wb * xb) + wa**2 * aa + wb**2 * bb + 2 * wa * wb * ab

    det = np.maximum(aa * bb - ab**2, 1e-6)
    wa, wb = (bb * xa - ab * xb) / det, (aa * xb - ab * xa) / det  # unconstrained least squares
    inside = (wa >= 0) & (wb >= 0) & (wa + wb <= 1)
    candidates = [(wa, wb, np.where(inside, residual(wa, wb), np.inf))]  # or the nearest point of an edge:
    wa = np.clip(xa / np.maximum(aa, 1e-6), 0, 1)
    candidates.append((wa, 0 * wa, residual(wa, 0 * wa)))  # background - a
    wb = np.clip(xb / np.maximum(bb, 1e-6), 0, 1)
    candidates.append((0 * wb, wb, residual(0 * wb, wb)))  # background - b
    w = np.clip((xb - xa - ab + aa) / np.maximum(aa + bb - 2 * ab, 1e-6), 0, 1)
    candidates.append((1 - w, w, residual(1 - w, w)))  # a - b, the point a + w (b - a)
    stacked = np.stack([np.stack(c) for c in candidates])  # [4, 3, c, n]
    best = stacked[:, 2].argmin(0)  # [c, n]
    chosen = np.take_along_axis(stacked, best[None, None], 0)[0]  # [3, c, n]
    return chosen[0], chosen[1], np.maximum(chosen[2], 0)



def fit_colors(x: np.ndarray, background: np.ndarray) -> tuple[int, int, np.ndarray, np.ndarray, float]:
    """(body colour, second colour, body weights [n], second weights [n], evidence) of an object's pixels.

    ``x`` [n, 3] are the pixels minus ``background``; residuals are squared and capped at
    `RESIDUAL_CAP` so that a few stray pixels cannot dominate a sum.

    The body colour is first the palette colour that explains the pixels best alone (with its
    mixtures with the background): patterns cover less than half of an object, inside a rim of the
    body colour, so their pixels are the outliers. The second colour is its best partner in the
    triangle of `unmix`. When blur has mixed a pattern so much that a pair without that body colour
    fits far better (`SWITCH_RATIO`), that pair wins, and its colour with more total weight, which
    blur does not change, is the body. ``evidence`` is how much the pair lowers the mean squared
    residual (RGB units squared) over the object's inside (coverage above 75 %) compared with the
    body alone; below `MIN_PATTERN_EVIDENCE` the object is plain and the second colour is the body.
    """
    colors = PALETTE - background  # [10, 3]
    cap = RESIDUAL_CAP**2
    w_alone, _, single = unmix(x, colors, np.zeros_like(colors))  # the triangles collapse to segments
    body = int(np.minimum(single, cap).sum(1).argmin())
    first, second = np.triu_indices(len(colors), 1)
    w_first, w_second, pair = unmix(x, colors[first], colors[second])
    scores = np.minimum(pair, cap).sum(1)  # [45]
    with_body = np.flatnonzero((first == body) | (second == body))
    k = int(with_body[scores[with_body].argmin()])
    best = int(scores.argmin())
    if scores[best] < SWITCH_RATIO * scores[k]:
        k = best
        body = int(first[k]) if w_first[k].sum() >= w_second[k].sum() else int(second[k])
    w_body, w_other = (w_first[k], w_second[k]) if first[k] == body else (w_second[k], w_first[k])
    inside = (w_body + w_other) > 0.75
    gain = np.minimum(single[body], cap) - np.minimum(pair[k], cap)
    evidence = float(gain[inside].mean()) if inside.any() else 0.0
    if evidence < MIN_PATTERN_EVIDENCE:
        return body, body, w_alone[body], np.zeros(len(x)), evidence
    return body, int(first[k] + second[k] - body), w_body, w_other, evidence


# ---- 4. Shape by fitting outlines -----------------------------------------------------------------
@cache
def _outline_moments(shape: str) -> tuple[float, np.ndarray]:
    """(area, centroid [2]) of the shape (outline minus hole) in unit coordinates (shoelace formula)."""

    def moments(points: np.ndarray) -> tuple[float, np.ndarray]:
        x, y = points[:, 0], points[:, 1]
        cross = x * np.roll(y, -1) - np.roll(x, -1) * y
        area = cross.sum() / 2
        centroid = np.array([((x + np.roll(x, -1)) * cross).sum(), ((y + np.roll(y, -1)) * cross).sum()]) / (6 * area)
        return abs(float(area)), centroid

    outer, hole = scenes.outline(shape)
    area, centroid = moments(outer)
    if hole is not None:
        hole_area, hole_centroid = moments(hole)
        centroid = (area * centroid - hole_area * hole_centroid) / (area - hole_area)
        area -= hole_area
    return area, centroid


def _soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-6))


def fit_shape(alpha: np.ndarray, box: tuple[int, int, int, int]) -> tuple[str, float, float, float, float, float]:
    """(shape, x, y, extent, rotation, soft IoU) of the outline that best explains the coverage ``alpha``.

    ``alpha`` [h, w] is the object's estimated coverage over ``box`` of the canvas. Its sum (the
    area) and centroid survive blurring unchanged, so each outline is scaled to the area and centred
    on the centroid, then turned through `ANGLES`.
    """
    ys, xs = np.mgrid[box[1] : box[3], box[0] : box[2]] + 0.5
    area = float(alpha.sum())
    cx, cy = float((alpha * xs).sum() / area), float((alpha * ys).sum() / area)
    best = ("circle", cx, cy, 0.0, 0.0, -1.0)
    for shape in world.SHAPES:
        unit_area, unit_centroid = _outline_moments(shape)
        extent = 2 * math.sqrt(area / unit_area)
        for angle in (0.0,) if shape in ROUND_SHAPES else ANGLES:
            offset = scenes.place(unit_centroid[None], 0, 0, extent, angle)[0]  # centroid relative to centre
            x, y = cx - offset[0], cy - offset[1]
            score = _soft_iou(scenes.coverage(shape, x, y, extent, angle, box), alpha)
            if score > best[-1]:
                best = (shape, x, y, extent, angle, score)
    return best


# ---- 5. Pattern by folding onto one period --------------------------------------------------------
PATTERN_PERIODS = {"striped": world.STRIPE_PERIOD, "dotted": world.DOT_PERIOD, "checkered": 2 * world.CHECK_CELL}


@cache
def _shifted_periods(pattern: str) -> np.ndarray:
    """Float [P*P, P*P]: row k = the pattern's coverage of the P x P one-pixel bins of one period, at phase k.

    Bins are indexed (v, u) in the object's frame; a phase shifts the pattern by whole pixels.
    """
    period = int(PATTERN_PERIODS[pattern])
    fine = (np.arange(period * 8) + 0.5) / 8  # 8 x 8 samples per bin
    on = scenes.pattern_at(pattern, fine[None, :], fine[:, None])  # [v, u]
    base = on.reshape(period, 8, period, 8).mean((1, 3))
    return np.stack([np.roll(base, (a, b), (0, 1)).ravel() for a in range(period) for b in range(period)])


def _best_phase_correlation(u: np.ndarray, v: np.ndarray, t: np.ndarray, pattern: str) -> float:
    """Highest Pearson correlation, over whole-pixel phases, between t and the pattern at (u, v)."""
    period = int(PATTERN_PERIODS[pattern])
    bins = (np.floor(v).astype(int) % period) * period + np.floor(u).astype(int) % period
    sum_t = np.bincount(bins, t, period * period)  # [P*P]
    count = np.bincount(bins, None, period * period)
    templates = _shifted_periods(pattern)  # [phases, P*P]
    n, total = len(t), t.sum()
    sum_tm, sum_m, sum_mm = templates @ sum_t, templates @ count, (templates**2) @ count
    covariance = n * sum_tm - total * sum_m
    spread = (n * (t**2).sum() - total**2) * (n * sum_mm - sum_m**2)
    if spread.max() <= 1e-9 * n**4:  # t or the pattern is constant over these pixels
        return 0.0
    return float((covariance / np.sqrt(np.maximum(spread, 1e-9 * n**4))).max())


def fit_pattern(xs: np.ndarray, ys: np.ndarray, t: np.ndarray, centre: tuple[float, float]) -> tuple[str, float]:
    """(pattern, correlation) of the second-colour share ``t`` at pixel centres (xs, ys).

    The pixels are turned into the object's frame for each angle of `ANGLES` (about ``centre``) and
    folded onto one period of each pattern; the best correlation over angles and phases wins.
    """
    dx, dy = xs - centre[0], ys - centre[1]
    best, best_pattern = -1.0, "plain"
    for angle in ANGLES:
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        u, v = c * dx + s * dy, -s * dx + c * dy
        for pattern in PATTERN_PERIODS:
            score = _best_phase_correlation(u, v, t, pattern)
            if score > best:
                best, best_pattern = score, pattern
    return (best_pattern, best) if best >= MIN_PATTERN_CORRELATION else ("plain", best)


# ---- The judge --------------------------------------------------------------------------------------
def _judge_component(pixels: np.ndarray, background: np.ndarray, component: np.ndarray) -> JudgedObject | None:
    """Read one object: colours by unmixing, then shape, size and pattern (steps 3-5). None for a
    component that no palette colour covers by half on `MIN_AREA` pixels (noise, not an object)."""
    region = dilate(component, 2)  # with the faint blurred fringe, so the colour mass is complete
    ys, xs = np.nonzero(region)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    body, second, w_body, w_second, evidence = fit_colors(pixels[ys, xs] - background, background)
    mask = np.zeros(component.shape, bool)
    mask[ys, xs] = (w_body + w_second) >= 0.5
    if mask.sum() < MIN_AREA:
        return None
    alpha = np.zeros((box[3] - box[1], box[2] - box[0]), np.float32)
    alpha[ys - box[1], xs - box[0]] = w_body + w_second  # coverage estimate
    shape, x, y, extent, rotation, shape_fit = fit_shape(alpha, box)
    pattern, pattern_fit = "plain", 0.0
    inside = (w_body + w_second) > 0.75  # away from the background
    if second != body and inside.sum() >= 4:
        t = w_second[inside] / (w_body + w_second)[inside]  # 0 = body colour, 1 = second colour
        pattern, pattern_fit = fit_pattern(xs[inside] + 0.5, ys[inside] + 0.5, t, (x, y))
    mys, mxs = np.nonzero(mask)
    return JudgedObject(
        shape=shape,
        color=COLOR_NAMES[body],
        size="small" if extent < SIZE_THRESHOLD else "large",
        pattern=pattern,
        pattern_color=None if pattern == "plain" else COLOR_NAMES[second],
        box=(int(mxs.min()), int(mys.min()), int(mxs.max()) + 1, int(mys.max()) + 1),
        mask=mask,
        x=x,
        y=y,
        extent=extent,
        rotation=rotation,
        shape_fit=shape_fit,
        pattern_evidence=evidence,
        pattern_fit=pattern_fit,
    )


def judge(image: Image.Image | np.ndarray) -> list[JudgedObject]:
    """The objects of a toy-world image, largest first. Images of another size are resized to 64x64."""
    pixels = as_pixels(image)
    if noise_level(pixels) > NOISE_TOLERANCE:  # smoothing turns strong noise into blur, which unmixing handles
        pixels = np.asarray(Image.fromarray(pixels.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0)), np.float32)
    name, observed = estimate_background(pixels)
    background = np.array(world.BACKGROUNDS[name], np.float32)
    pixels = pixels - (observed - background)  # undo a global colour shift
    foreground = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE
    found = [_judge_component(pixels, background, part) for part in components(foreground)]
    return [obj for obj in found if obj is not None]


def judge_background(image: Image.Image | np.ndarray) -> str:
    """Name of the palette background nearest to the image border's median colour."""
    return estimate_background(as_pixels(image))[0]


# ---- Validation on degraded renders -----------------------------------------------------------------
def validation_scene(index: int, seed: int) -> scenes.Scene:
    """The index-th validation scene: base scenes of both splits, and every tenth a personal concept."""
    if index % 10 == 9:
        concept = world.CONCEPTS[(index // 10) % len(world.CONCEPTS)]
        return scenes.reference_scenes(concept, 1, seed=seed * 100_003 + index)[0]
    return scenes.sample_scene(np.random.default_rng([seed, index]), split=("train", "heldout")[index % 2])


ATTRIBUTES = ("shape", "color", "size", "pattern")
TALLIES = (*ATTRIBUTES, "pattern_color", "found", "objects", "patterned", "extra")


def _tally(scene: scenes.Scene, masks: list[np.ndarray], judged: list[JudgedObject]) -> dict[str, int]:
    """Counts of one image: right attributes of the true objects, found objects, extra judged objects."""
    tally = dict.fromkeys(TALLIES, 0)
    used = set()
    for truth, truth_mask in zip(scene.objects, masks):
        tally["objects"] += 1
        tally["patterned"] += truth.pattern != "plain"
        ious = [(j.mask & truth_mask).sum() / (j.mask | truth_mask).sum() for j in judged]
        if not ious or max(ious) < 0.5:
            continue  # missed: wrong in every attribute
        match = int(np.argmax(ious))
        used.add(match)
        tally["found"] += 1
        for attribute in ATTRIBUTES:
            tally[attribute] += getattr(judged[match], attribute) == getattr(truth, attribute)
        if truth.pattern != "plain":
            tally["pattern_color"] += judged[match].pattern_color == truth.pattern_color
    tally["extra"] = len(judged) - len(used)
    return tally


def validate_judge(n: int = 1000, seed: int = 1, conditions: tuple[str, ...] = tuple(DEGRADATIONS)) -> dict:
    """Judge ``n`` fresh renders in each condition of `DEGRADATIONS`; accuracy per attribute.

    A true object counts as found when a judged object's mask overlaps it with IoU >= 0.5; a missed
    object counts as wrong in every attribute. Returns {condition: {"shape", "color", "size",
    "pattern": accuracy over all true objects, "pattern_color": accuracy over patterned objects,
    "found": share of objects found, "extra": unmatched judged objects per image, "objects": count}}.
    The thresholds of this module were set on seed 0; validate on other seeds.
    """
    totals = {condition: dict.fromkeys(TALLIES, 0) for condition in conditions}
    for index in range(n):
        scene = validation_scene(index, seed)
        rendering = scenes.render(scene)
        for condition in conditions:
            degraded = degrade(rendering.image, condition, np.random.default_rng([seed, index, 7]))
            for key, count in _tally(scene, rendering.masks, judge(degraded)).items():
                totals[condition][key] += count
    return {
        condition: {
            **{key: t[key] / t["objects"] for key in (*ATTRIBUTES, "found")},
            "pattern_color": t["pattern_color"] / max(t["patterned"], 1),
            "extra": t["extra"] / n,
            "objects": t["objects"],
        }
        for condition, t in totals.items()
    }


def main(argv=None) -> None:
    parser = Parser(description="Validate the toy-world judge on clean and degraded renders.")
    parser.add_argument("--validate", action="store_true", help="run the validation (the only action)")
    parser.add_argument("--n", type=positive_int, default=1000, help="renders per condition")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not args.validate:
        parser.error("nothing to do; pass --validate")
    start = time.perf_counter()
    results = validate_judge(args.n, args.seed)
    print(f"{'condition':12s} " + " ".join(f"{k:>13s}" for k in (*ATTRIBUTES, "pattern_color", "found", "extra")))
    for condition, row in results.items():
        values = [f"{row[k]:13.4f}" for k in (*ATTRIBUTES, "pattern_color", "found", "extra")]
        print(f"{condition:12s} " + " ".join(values))
    print(f"{args.n} renders per condition, seed {args.seed}, {time.perf_counter() - start:.0f} s")
    print(json.dumps(results))


if __name__ == "__main__":
    sys.exit(run(main))
