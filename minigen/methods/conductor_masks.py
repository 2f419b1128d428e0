"""Concept Conductor's masks: where each concept goes, found again in the model's self-attention.

A self-attention layer of the decoder knows the objects of the image it is drawing: the attention row
of a pixel on the dog is large on the dog's other pixels and small elsewhere. Rows of one object look
alike, so clustering the rows (K-means, each row a point of dimension N = h·w) splits the grid into
objects and background. Concept Conductor uses this to let its masks follow the generated shapes:

    at steps 50, 55, ..., 80 (of 200), for each image and each concept i:
        candidates  the clusters of K-means with k = N+1, ..., 2N+1 (N concepts), pooled
        custom_i    the candidate with the best IoU to custom_i's previous mask (on path i's attention)
        base_i      the same on the base path's attention, against base_i's previous mask
        (if the best IoU is below a threshold, the previous mask's bounding box instead)
    and at every grid the fusion mask of concept i becomes custom_i ∪ base_i, except where two
    concepts' unions overlap: there every concept keeps its previous fusion mask.

Masks live on several grids (one per decoder resolution). The official code keeps each at every grid
by resizing the clustering grid's mask (bilinear with antialiasing, then > 0.5), and merges the two
trackers grid by grid (`fusion_masks`).

K-means here is Lloyd's algorithm with random distinct points as the initial centres, restarted
`restarts` times (all restarts at once, as one batched tensor computation), keeping the restart of
least inertia; it is deterministic from its seed on every machine. The official code uses the
torch_kmeans package with seed 123 on the device's generator, so exact labels are not reproducible
across implementations (nor between its own CPU and GPU runs): a caller that needs given labels passes
its own `cluster(points, k) -> labels`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Cluster = Callable[[Tensor, int], Tensor]  # (points [P, D], k) -> labels [P] in 0..k-1


def kmeans(points: Tensor, k: int, *, restarts: int = 100, seed: int = 123, max_iter: int = 100, tol: float = 1e-4) -> Tensor:
    """Labels [P] of K-means on `points` [P, D] (Euclidean), the best of `restarts` runs by inertia."""
    if points.dim() != 2:
        raise ValueError(f"kmeans takes points [P, D], got shape {list(points.shape)}")
    count = points.shape[0]
    if not 1 <= k <= count:
        raise ValueError(f"kmeans: k = {k} clusters for {count} points; k must be in 1..{count}")
    x = points.detach().float()  # [P, D]
    generator = torch.Generator().manual_seed(seed)
    starts = torch.stack([torch.randperm(count, generator=generator)[:k] for _ in range(restarts)])  # [R, k]
    centres = x[starts.to(x.device)]  # [R, k, D]
    squared = x.pow(2).sum(-1)  # [P]
    for _ in range(max_iter):
        distances = squared[None, :, None] - 2 * x @ centres.transpose(1, 2) + centres.pow(2).sum(-1)[:, None, :]  # [R, P, k]
        members = F.one_hot(distances.argmin(-1), k).to(x)  # [R, P, k]
        sizes = members.sum(1)  # [R, k]
        means = members.transpose(1, 2) @ x / sizes.clamp(min=1)[..., None]  # [R, k, D]
        moved = torch.where(sizes[..., None] > 0, means, centres)  # an empty cluster keeps its centre
        shift = (moved - centres).norm(dim=-1).max()
        centres = moved
        if shift <= tol:
            break
    distances = squared[None, :, None] - 2 * x @ centres.transpose(1, 2) + centres.pow(2).sum(-1)[:, None, :]
    nearest, labels = distances.min(-1)  # [R, P]
    best = nearest.clamp(min=0).sum(-1).argmin()  # the restart of least inertia
    return labels[best]


def mask_candidates(attention: Tensor, grid: tuple[int, int], ks: Sequence[int], cluster: Cluster = kmeans) -> Tensor:
    """Every cluster of the attention rows for each k in `ks`, as masks [Σk, h, w] bool, k by k.

    `attention` [N, N] holds one row per query pixel of the h×w `grid` (N = h·w)."""
    h, w = grid
    if attention.shape != (h * w, h * w):
        raise ValueError(f"attention must be [{h * w}, {h * w}] for a {h}x{w} grid, got {list(attention.shape)}")
    candidates = []
    for k in ks:
        labels = cluster(attention, k).view(h, w)
        candidates += [labels == label for label in range(k)]
    return torch.stack(candidates)


def iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of two bool masks (0 when both are empty)."""
    union = (a | b).sum()
    return (a & b).sum() / union.clamp(min=1)


def bounding_box(mask: Tensor) -> Tensor:
    """The filled rectangle around a bool mask [h, w] (empty for an empty mask)."""
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    box = torch.zeros_like(mask)
    if len(rows):
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    return box


def choose_mask(candidates: Tensor, previous: Tensor, threshold: float) -> Tensor:
    """The candidate [n, h, w] with the best IoU to `previous` [h, w] if that IoU reaches `threshold`,
    else the bounding box of `previous`. Ties go to the first candidate (so with threshold 0 and no
    overlap at all, candidate 0, as the official code)."""
    previous = previous.bool()
    scores = torch.stack([iou(candidate, previous) for candidate in candidates])
    best = int(scores.argmax())
    return candidates[best] if scores[best] >= threshold else bounding_box(previous)


def masks_at(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Masks [B, n, H, W] at another grid as the official code stores them: bilinear (antialiased when
    shrinking), then > 0.5; bool [B, n, h, w]."""
    masks = masks.float()
    if tuple(masks.shape[-2:]) != tuple(size):
        masks = F.interpolate(masks, size=size, mode="bilinear", antialias=True, align_corners=False)
    return masks > 0.5


def fusion_masks(custom: Tensor, base: Tensor, previous: Mapping[tuple[int, int], Tensor]) -> dict[tuple[int, int], Tensor]:
    """The fusion masks after a refinement, at every grid of `previous` ({(h, w): [B, n, h, w] bool}):
    the union of the custom and base trackers [B, n, h', w'] resized to the grid, except where the unions
    of two or more concepts overlap, which keep their previous masks."""
    fused = {}
    for grid, old in previous.items():
        union = masks_at(custom, grid) | masks_at(base, grid)  # [B, n, h, w]
        overlap = union.sum(1, keepdim=True) > 1
        fused[grid] = torch.where(overlap, old.bool(), union)
    return fused


def masks_from_points(
    attention: Tensor, grid: tuple[int, int], points: Sequence[tuple[float, float]], image_size: tuple[int, int], *, k: int = 6, cluster: Cluster = kmeans
) -> Tensor:
    """Initial masks [n, h, w] bool from one point (x, y) per concept on the reference image of size
    (width, height): K-means with k clusters over the reference's self-attention [N, N] at `grid`, and
    for each point the cluster it falls in. (The official code divides the points by 64, right only for
    512-pixel SD1.5 images; here they are scaled by the real image size.)"""
    h, w = grid
    width, height = image_size
    labels = cluster(attention, k).view(h, w)
    masks = []
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"the point ({x}, {y}) is outside the {width}x{height} reference image")
        masks.append(labels == labels[int(y * h / height), int(x * w / width)])
    return torch.stack(masks)
