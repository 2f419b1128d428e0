"""Concept Conductor's mask functions on hand-made inputs whose answers are known exactly."""

import pytest
import torch
import torch.nn.functional as F

from minigen.methods.conductor_masks import (
    bounding_box,
    choose_mask,
    fusion_masks,
    iou,
    kmeans,
    mask_candidates,
    masks_at,
    masks_from_points,
)


def blobs(sizes=(30, 20, 10), dim=8, spread=0.05, seed=0):
    """Points around len(sizes) far-apart centres, and their true labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[: len(sizes)] * 10
    labels = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def same_partition(a, b):
    """Equal up to a renaming of the labels."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_recovers_separated_clusters_and_is_deterministic():
    """Three separated blobs: the labels equal the truth up to renaming; the same seed gives the same labels."""
    points, truth = blobs()
    labels = kmeans(points, 3, restarts=10, seed=123)
    assert same_partition(labels, truth)
    assert torch.equal(labels, kmeans(points, 3, restarts=10, seed=123))


def test_kmeans_keeps_the_restart_of_least_inertia():
    """With one restart some seeds fall into a local optimum (two centres in one blob); with 20 restarts
    the result has the inertia of the true partition."""
    points, truth = blobs(sizes=(20, 20, 20, 20), spread=0.5)

    def inertia(labels):
        return sum(((points[labels == c] - points[labels == c].mean(0)) ** 2).sum() for c in labels.unique())

    single = [inertia(kmeans(points, 4, restarts=1, seed=s)) for s in range(20)]
    assert max(single) > inertia(truth) * 2  # some single runs are bad
    assert inertia(kmeans(points, 4, restarts=20, seed=0)) <= inertia(truth) + 1e-3


def test_kmeans_refuses_more_clusters_than_points():
    with pytest.raises(ValueError, match="k = 5 clusters for 4 points"):
        kmeans(torch.randn(4, 2), 5)


def test_candidates_are_the_clusters_of_every_k_pooled():
    """A 4x4 grid whose attention rows are block-structured (left and right halves): Σk candidates, each
    one cluster, and the k = 2 pair is exactly the two halves."""
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    group = left.flatten()
    attention = (group[:, None] == group[None, :]).float() + 0.01 * torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    candidates = mask_candidates(attention, (4, 4), ks=(2, 3), cluster=lambda p, k: kmeans(p, k, restarts=5))
    assert candidates.shape == (5, 4, 4)
    assert candidates[:2].sum(0).eq(1).all() and candidates[2:].sum(0).eq(1).all()  # each k partitions the grid
    assert {tuple(c.flatten().tolist()) for c in candidates[:2]} == {tuple(left.flatten().tolist()), tuple((~left).flatten().tolist())}


def test_choose_mask_best_iou_threshold_and_box():
    """IoU picks the closest candidate; below the threshold the previous mask's bounding box is returned."""
    previous = torch.zeros(6, 6, dtype=torch.bool)
    previous[1:3, 1:4] = True
    previous[2, 1] = False  # not a rectangle
    near = previous.clone()
    near[2, 1] = True
    far = torch.zeros(6, 6, dtype=torch.bool)
    far[4:, 4:] = True
    candidates = torch.stack([far, near])
    assert abs(iou(near, previous).item() - 5 / 6) < 1e-6
    assert torch.equal(choose_mask(candidates, previous, 0.0), near)
    box = bounding_box(previous)
    assert box.sum() == 6 and box[1:3, 1:4].all()
    assert torch.equal(choose_mask(candidates, previous, 0.9), box)
    assert torch.equal(choose_mask(torch.stack([far, far]), previous, 0.0), far)  # no overlap at all: candidate 0


def test_masks_at_is_antialiased_bilinear_then_half():
    masks = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    expected = F.interpolate(masks.float(), size=(4, 4), mode="bilinear", antialias=True, align_corners=False) > 0.5
    assert torch.equal(masks_at(masks, (4, 4)), expected)
    assert torch.equal(masks_at(masks, (16, 16)), masks)


def test_fusion_masks_union_and_overlap_keeps_the_previous():
    """Two concepts on a 4x4 grid: concept 0's trackers claim columns 0-1 (custom) and 1 (base), concept
    1's claim columns 1-3: column 1 is claimed twice, so there both keep their previous masks."""
    custom = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    base = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    custom[0, 0, :, 0:2] = True
    base[0, 0, :, 1] = True
    custom[0, 1, :, 2:4] = True
    base[0, 1, :, 1] = True
    previous = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    previous[0, 0, :, 1] = True  # column 1 belonged to concept 0
    fused = fusion_masks(custom, base, {(4, 4): previous})[(4, 4)]
    expected = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    expected[0, 0, :, 0:2] = True  # column 0 new, column 1 kept from before
    expected[0, 1, :, 2:4] = True  # columns 2-3 new, column 1 kept (not concept 1's before)
    assert torch.equal(fused, expected)


def test_masks_from_points_pick_the_cluster_under_each_point():
    """Attention of a 4x4 grid in two blocks (left, right): a point in the left half of a 64x64 image
    gets the left block, one in the right half the right block."""
    group = torch.arange(16) % 4 >= 2  # right half
    attention = (group[:, None] == group[None, :]).float()
    masks = masks_from_points(attention, (4, 4), [(5, 30), (60, 3)], (64, 64), k=2, cluster=lambda p, k: kmeans(p, k, restarts=3))
    assert torch.equal(masks[0], ~group.view(4, 4)) and torch.equal(masks[1], group.view(4, 4))
    with pytest.raises(ValueError, match="outside the 64x64 reference image"):
        masks_from_points(attention, (4, 4), [(70, 3)], (64, 64), k=2)
