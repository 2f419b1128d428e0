"""Concept Conductor's masks: where each concept goes, found again in the model's self-attention.

Why clustering self-attention finds objects
-------------------------------------------
A self-attention layer of the decoder holds, for every query pixel p of its h×w token grid, a row
A[p] of N = h·w probabilities: how much p looks at every other pixel. A pixel on the dog looks mostly
at the dog, a pixel of sky mostly at the sky, so the rows of one object are alike and the rows of two
objects differ. Taking each row as a point of R^N and grouping close points (K-means) therefore splits
the grid into regions that follow the objects the model is drawing, with no text and no training:

    attention  A       [N, N]    row p = where pixel p looks (head-averaged softmax, rows sum to 1)
    labels     K-means(A, k)  [N] -> a label map [h, w]; each label's pixels are one candidate mask

K-means (Lloyd's algorithm) alternates two steps until the centres stop moving: give each point to
its nearest centre, then move each centre to the mean of its points. Each round lowers the inertia
Σ_p ||A[p] - centre(p)||², but the result depends on the initial centres, so it is restarted from
many random starts and the labelling of least inertia is kept.

How Concept Conductor uses it (official code, SD1.5 defaults; notes §4)
----------------------------------------------------------------------
Each concept i has a fusion mask M_i (where its custom model's attention outputs replace the base
model's) and two trackers, custom_i and base_i, all initialised to the reference mask. At the
refinement steps 50, 55, ..., 80 (of 200), for every image:

    candidates   the clusters of K-means with k = N+1, ..., 2N+1 (N concepts), all pooled, in order
                 of k and then of label (N = 2: 3 + 4 + 5 = 12 masks)                 mask_candidates
    custom_i  <- the candidate of best IoU with custom_i, clustering custom model i's attention
    base_i    <- the same on the base model's attention, against base_i                  choose_mask
                 (when the best IoU is below the threshold, the bounding box of the tracker instead;
                 the SD1.5 threshold is 0, so a zero IoU everywhere takes candidate 0; SDXL's is 0.7)

The official code clusters the base model's attention again for every concept; K-means being
deterministic, clustering it once per image gives the same candidates.

The trackers live on the clustering grid (32×32 at 512 px). The official code stores every mask at
each decoder grid by resizing it (bilinear with antialiasing, then > 0.5; `masks_at`), and then,
grid by grid (`fusion_masks`), merges the two resized trackers (`merge_trackers`):

    C_i = custom_i ∪ base_i                  the concept's new region
    O   = [Σ_i C_i > 1]                      pixels that two or more concepts claim
    M_i = M_i(old) where O, else C_i         a collision keeps every concept's previous mask

The order matters: the trackers are resized first and merged at each grid, so the overlap is decided
on each grid's own pixels. Masks can also start from one point per concept (`masks_from_points`):
K-means with k = 6 on the reference image's self-attention, and the cluster under each point.

K-means, as the official torch_kmeans 0.2.0 does it
---------------------------------------------------
`kmeans` follows torch_kmeans' `KMeans(init_method="rnd", num_init=restarts, max_iter, tol, seed)`
step by step, so that on the CPU it returns the same labels bit for bit (tested when torch_kmeans is
installed):

    starts     for each restart, k distinct points drawn uniformly: `torch.multinomial` without
               replacement on a generator seeded afresh at every call (seed 123). The generator is on
               the CPU here on every device (torch_kmeans uses the points' device, so its GPU runs
               start elsewhere and no CPU implementation can match them).
    assign     the nearest centre by `pairwise_distance` = ||x - c + 1e-6||₂, the first on ties
    update     each centre to the mean of its points; a centre left with no point goes to the origin
    converged  when, for every restart at once, the centres moved by less than `tol` on average
               (mean over the k centres of ||c_new - c_old||₂), tested after the update
    result     the points assigned to the final centres, in the restart of least inertia (the first
               on ties)

Distances are computed fast (||c||² - 2 x·c, one matrix product for all restarts); the few points
whose two nearest centres are closer than the rounding error of that formula are measured again
exactly as torch_kmeans does, so the choice is the same. Likewise the inertia is estimated fast and
summed exactly only for the restarts that could be the least. The means use the same batched product
as torch_kmeans, so they round the same way. (This assumes IEEE float32 matrix products, PyTorch's
default; TF32 products would void the rounding bounds, though not the clustering.)

A caller wanting another clustering passes `cluster(points [P, D], k) -> labels [P]` (integers in
0..k-1, checked) wherever `cluster=` is accepted.

All functions are pure: tensors in, tensors out, no state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from minigen.controls import resize_mask

Cluster = Callable[[Tensor, int], Tensor]  # (points [P, D], k) -> labels [P], integers in 0..k-1

PAIRWISE_EPS = 1e-6  # torch's pairwise_distance measures ||x - c + eps||


# ---------------------------------------------------------------- K-means


def kmeans(points: Tensor, k: int, *, restarts: int = 100, seed: int = 123, max_iter: int = 100, tol: float = 1e-4) -> Tensor:
    """Labels [P] (int64, 0..k-1) of K-means on `points` [P, D] (Euclidean): the best of `restarts` runs of
    Lloyd's algorithm by inertia, started from random distinct points drawn from `seed`. For float32 (or
    float64) points, the same labels as torch_kmeans 0.2.0 `KMeans(n_clusters=k, num_init=restarts,
    max_iter, tol, seed)` on the CPU; half-precision points are clustered in float32."""
    x = _check_points(points, k)  # [P, D]
    if restarts < 1 or max_iter < 1 or tol < 0:
        raise ValueError(f"kmeans needs restarts >= 1, max_iter >= 1 and tol >= 0; got {restarts}, {max_iter}, {tol}")
    centres = _random_starts(x, k, restarts, seed)  # [R, k, D]
    for _ in range(max_iter):
        moved = _means(x, _nearest(x, centres), k)  # [R, k, D]
        shift = torch.norm(moved - centres, p=2, dim=-1).mean(-1)  # [R]
        centres = moved
        if (shift < tol).all():
            break
    labels = _nearest(x, centres)  # [R, P]
    return labels[_least_inertia(x, centres, labels)]


def _check_points(points: Tensor, k: int) -> Tensor:
    """The points as a floating tensor [P, D] (at least float32), after checking the shape and k."""
    if points.dim() != 2:
        raise ValueError(f"kmeans takes points [P, D], got shape {list(points.shape)}")
    count = points.shape[0]
    if not 1 <= k <= count:
        raise ValueError(f"kmeans: k = {k} clusters for {count} points; k must be in 1..{count}")
    x = points.detach().to(torch.promote_types(points.dtype, torch.float32))
    if not torch.isfinite(x).all():
        raise ValueError("kmeans: the points contain NaN or infinite values")
    return x


def _random_starts(x: Tensor, k: int, restarts: int, seed: int) -> Tensor:
    """Initial centres [R, k, D]: for each restart, k distinct points drawn uniformly (torch_kmeans' "rnd")."""
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.full((restarts, x.shape[0]), 1 / x.shape[0], dtype=x.dtype)
    picks = torch.multinomial(uniform, k, replacement=False, generator=generator)  # [R, k]
    return x[picks.to(x.device)]  # [R, k, D]


def _nearest(x: Tensor, centres: Tensor) -> Tensor:
    """The nearest centre [R, P] of every point in every restart, by ||x - c + eps||₂ (first on ties)."""
    restarts, k, _ = centres.shape
    if k == 1:
        return torch.zeros(restarts, x.shape[0], dtype=torch.long, device=x.device)
    # ||x - c + e||² = (||x||² + 2e·Σx + D·e²) + (||c||² - 2e·Σc - 2 x·c): the first part is the same for every centre
    x_sq, c_sq = x.pow(2).sum(-1), centres.pow(2).sum(-1)  # [P], [R, k]
    scores = (c_sq - 2 * PAIRWISE_EPS * centres.sum(-1))[:, None, :] - 2 * _products(x, centres)  # [R, P, k]
    best = scores.topk(2, dim=-1, largest=False)  # the two smallest, ascending
    labels = best.indices[..., 0].clone()
    doubtful = best.values[..., 1] - best.values[..., 0] <= _rounding_bound(x_sq, c_sq, x.shape[1])  # [R, P]
    restart, point = doubtful.nonzero(as_tuple=True)
    if len(point):
        labels[restart, point] = _exact_distances(x[point], centres[restart]).argmin(-1)
    return labels


def _products(x: Tensor, centres: Tensor) -> Tensor:
    """Dot products x·c [R, P, k] of every point with every centre of every restart (one matrix product)."""
    restarts, k, dim = centres.shape
    return (x @ centres.reshape(-1, dim).T).view(-1, restarts, k).transpose(0, 1)


def _rounding_bound(x_sq: Tensor, c_sq: Tensor, terms: int) -> Tensor:
    """[R, P]: twice a bound on how far rounding can move the difference of two squared distances from a
    point (squared norm x_sq [P]) to two centres of a restart (squared norms c_sq [R, k]), summed over
    the fast formula and the direct sum of squares torch_kmeans computes: each is a float sum of about
    `terms` products, off by at most γ = terms·u times the sum of their sizes, ≤ 2(||x||² + ||c||²)."""
    gamma = (terms + 8) * torch.finfo(x_sq.dtype).eps / 2
    return 16 * gamma * (x_sq[None, :] + c_sq.amax(-1)[:, None])


def _exact_distances(x: Tensor, centres: Tensor) -> Tensor:
    """Distances [m, k] from points x [m, D] to their restart's centres [m, k, D], computed as torch_kmeans
    does (pairwise_distance over pairs laid out as rows)."""
    m, k, dim = centres.shape
    rows = x[:, None, :].expand(m, k, dim).reshape(-1, dim)
    return F.pairwise_distance(rows, centres.reshape(-1, dim), p=2, eps=PAIRWISE_EPS).view(m, k)


def _means(x: Tensor, labels: Tensor, k: int) -> Tensor:
    """Centres [R, k, D]: the mean of each cluster's points; an empty cluster's centre is the origin.
    The product is the batched one torch_kmeans forms (weights [R, k, P] times the points broadcast to
    [R, P, D]), which rounds as it does; one [R·k, P] x [P, D] product can round differently."""
    members = F.one_hot(labels, k).to(x.dtype).transpose(1, 2)  # [R, k, P]
    weights = members / members.sum(-1, keepdim=True).clamp(min=1)  # rows of 1/size
    return weights @ x.expand(labels.shape[0], -1, -1)


def _least_inertia(x: Tensor, centres: Tensor, labels: Tensor) -> Tensor:
    """The restart (index) of least inertia Σ_p ||x_p - centre(p)||², the first on ties, with the inertia
    rounded as torch_kmeans rounds it. A fast estimate rules out the restarts that cannot be least; the
    others are summed exactly, a restart at a time ([P, D] in memory, not [R, P, D])."""
    x_sq, c_sq = x.pow(2).sum(-1), centres.pow(2).sum(-1)  # [P], [R, k]
    own = _products(x, centres).gather(2, labels[..., None])[..., 0]  # x_p · centre(p)  [R, P]
    estimate = (x_sq + c_sq.gather(1, labels) - 2 * own).sum(-1)  # [R]
    slack = _rounding_bound(x_sq, c_sq, x.shape[1] + x.shape[0]).sum(-1)  # [R]
    plausible = (estimate - slack <= (estimate + slack).min()).nonzero()[:, 0]
    exact = torch.stack([torch.norm(x - centres[r][labels[r]], p=2, dim=-1) ** 2 for r in plausible]).sum(-1)
    return plausible[exact.argmin()]


def _check_labels(labels: Tensor, count: int, k: int) -> Tensor:
    """A clustering's labels, checked: [count] integers in 0..k-1."""
    if labels.shape != (count,) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"a clustering must return integer labels [{count}], got {labels.dtype} {list(labels.shape)}")
    if count and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"a clustering into k = {k} clusters returned labels outside 0..{k - 1}")
    return labels


# ---------------------------------------------------------------- candidates and matching


def _check_attention(attention: Tensor, grid: tuple[int, int]) -> None:
    h, w = grid
    if attention.shape != (h * w, h * w):
        raise ValueError(f"attention must be [{h * w}, {h * w}] for a {h}x{w} grid, got {list(attention.shape)}")


def cluster_map(attention: Tensor, grid: tuple[int, int], k: int, cluster: Cluster = kmeans) -> Tensor:
    """The label map [h, w] of `cluster` into k groups of the attention rows [N, N] of an h×w grid."""
    _check_attention(attention, grid)
    return _check_labels(cluster(attention, k), attention.shape[0], k).view(grid)


def mask_candidates(attention: Tensor, grid: tuple[int, int], ks: Sequence[int], cluster: Cluster = kmeans) -> Tensor:
    """Every cluster of the attention rows [N, N] of an h×w grid (N = h·w) for each k in `ks`, as bool
    masks [Σk, h, w], in order of k and then of label (as the official code pools them)."""
    if not len(ks):
        raise ValueError("mask_candidates needs at least one number of clusters in ks")
    candidates = []
    for k in ks:
        labels = cluster_map(attention, grid, k, cluster)  # [h, w]
        candidates.append(labels == torch.arange(k, device=labels.device)[:, None, None])  # [k, h, w]
    return torch.cat(candidates)


def iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of bool masks over their last two dims, broadcasting the leading ones
    (a [n, h, w] and b [h, w] give [n]); 0 where both are empty."""
    a, b = a.bool(), b.bool()
    intersection = (a & b).sum((-2, -1))
    union = (a | b).sum((-2, -1))
    return intersection / union.clamp(min=1)


def bounding_box(mask: Tensor) -> Tensor:
    """The filled rectangle [h, w] bool around a mask [h, w] (empty for an empty mask)."""
    if mask.dim() != 2:
        raise ValueError(f"bounding_box takes one mask [h, w], got shape {list(mask.shape)}")
    mask = mask.bool()
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    box = torch.zeros_like(mask)
    if len(rows):
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    return box


def choose_mask(candidates: Tensor, previous: Tensor, threshold: float) -> Tensor:
    """The candidate [n, h, w] of best IoU with the `previous` mask [h, w] when that IoU reaches
    `threshold`, else the bounding box of `previous` (official). Ties go to the first candidate, so with
    threshold 0 and no overlap at all the answer is candidate 0, as in the official code."""
    if candidates.dim() != 3 or not len(candidates) or candidates.shape[-2:] != previous.shape:
        raise ValueError(f"choose_mask takes candidates [n >= 1, h, w] and a previous mask [h, w]; got {list(candidates.shape)} and {list(previous.shape)}")
    scores = iou(candidates, previous)  # [n]
    best = int(scores.argmax())
    return candidates[best].bool() if scores[best] >= threshold else bounding_box(previous)


# ---------------------------------------------------------------- per-resolution masks and the merge


def masks_at(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Masks [B, n, H, W] (bool or float) on an h×w grid as the official code stores them: bilinear,
    antialiased, align_corners=False, then > 0.5; bool [B, n, h, w]."""
    if masks.dim() != 4:
        raise ValueError(f"masks_at takes masks [B, n, H, W], got shape {list(masks.shape)}")
    return resize_mask(masks.float(), tuple(size), "bilinear") > 0.5


def merge_trackers(previous: Tensor, custom: Tensor, base: Tensor) -> Tensor:
    """The fusion masks after a refinement, on one grid: each concept's union of its custom and base
    trackers, except at pixels two or more concepts claim, which keep the previous fusion masks.
    All [..., n, h, w] with the concepts on dim -3; bool out."""
    if not previous.shape == custom.shape == base.shape or previous.dim() < 3:
        raise ValueError(f"merge_trackers takes three [..., n, h, w] masks of one shape; got {list(previous.shape)}, {list(custom.shape)}, {list(base.shape)}")
    claimed = custom.bool() | base.bool()  # C_i
    overlap = claimed.sum(-3, keepdim=True) > 1  # O
    return torch.where(overlap, previous.bool(), claimed)


def fusion_masks(custom: Tensor, base: Tensor, previous: Mapping[tuple[int, int], Tensor]) -> dict[tuple[int, int], Tensor]:
    """The fusion masks after a refinement at every grid of `previous` ({(h, w): [B, n, h, w]}), as the
    official code computes them: each tracker [B, n, h', w'] (at the clustering grid) resized to the
    grid first (`masks_at`), then merged there (`merge_trackers`)."""
    return {grid: merge_trackers(old, masks_at(custom, grid), masks_at(base, grid)) for grid, old in previous.items()}


# ---------------------------------------------------------------- masks from points


def masks_from_points(
    attention: Tensor,
    grid: tuple[int, int],
    points: Sequence[tuple[float, float]],
    image_size: tuple[int, int],
    *,
    k: int = 6,
    cluster: Cluster = kmeans,
    official_cell: int | None = None,
) -> Tensor:
    """Initial masks [n, h, w] bool from one point (x, y) per concept, in pixels of the image of size
    `image_size` = (width, height): K-means with k clusters over that image's self-attention [N, N] on
    the h×w `grid`, and for each point the cluster it falls in.

    A point goes to the grid cell (floor(y·h/height), floor(x·w/width)). `official_cell` reproduces the
    official mapping instead: with the model's smallest grid of (height // cell, width // cell) cells
    (cell = 64 on SD1.5, 32 on SDXL) and factor = int(sqrt(h·w // that grid's size)), the cell is
    (y·factor // 64, x·factor // 64) for integer points. On SD1.5 at sizes that are multiples of 64 that
    is the same cell; on SDXL it halves both coordinates (the official `// 64` assumes SD1.5)."""
    labels = cluster_map(attention, grid, k, cluster)  # [h, w]
    cells = [_point_cell(point, grid, image_size, official_cell) for point in points]
    if not cells:
        raise ValueError("masks_from_points needs at least one point")
    return torch.stack([labels == labels[row, col] for row, col in cells])


def _point_cell(point: tuple[float, float], grid: tuple[int, int], image_size: tuple[int, int], official_cell: int | None) -> tuple[int, int]:
    """The (row, col) of the grid cell under a point (x, y) given in pixels of an image (width, height)."""
    x, y = point
    width, height = image_size
    h, w = grid
    if not (0 <= x < width and 0 <= y < height):
        raise ValueError(f"the point ({x}, {y}) is outside the {width}x{height} image")
    if official_cell is None:
        return int(y * h / height), int(x * w / width)
    smallest = (height // official_cell) * (width // official_cell)
    if smallest == 0:
        raise ValueError(f"a {width}x{height} image has no whole {official_cell}-pixel cell")
    factor = int(math.sqrt(h * w // smallest))
    row, col = math.floor(y) * factor // 64, math.floor(x) * factor // 64
    if not (row < h and col < w):
        raise ValueError(f"the official mapping puts ({x}, {y}) at cell ({row}, {col}), outside the {h}x{w} grid")
    return row, col
