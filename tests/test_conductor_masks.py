"""Concept Conductor's mask functions (conductor_masks) on inputs whose answers are known by hand or
by an independent computation; K-means also against torch_kmeans 0.2.0 when it is installed."""

import pytest
import torch
import torch.nn.functional as F

from minigen.methods.conductor_masks import (
    _means,
    bounding_box,
    choose_mask,
    cluster_map,
    fusion_masks,
    iou,
    kmeans,
    mask_candidates,
    masks_at,
    masks_from_points,
    merge_trackers,
)


def blobs(sizes=(30, 20, 10), dim=8, spread=0.05, seed=0):
    """Points around len(sizes) far-apart centres (10·e_i), and their true labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[: len(sizes)] * 10
    labels = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def same_partition(a, b):
    """Equal up to a renaming of the labels."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def inertia(points, labels):
    """Σ over clusters of the squared distances to the cluster's mean, computed directly."""
    return sum(((points[labels == c] - points[labels == c].mean(0)) ** 2).sum() for c in labels.unique())


def block_attention(groups, noise=0.0, seed=0):
    """Rows alike within a group: 1 between pixels of one group, 0 across, plus optional noise."""
    attention = (groups[:, None] == groups[None, :]).float()
    return attention + noise * torch.rand(attention.shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- K-means


def test_kmeans_recovers_separated_clusters_and_is_deterministic():
    """Three blobs 10 apart with spread 0.05: the labels equal the truth up to renaming; the same seed
    gives the same labels twice."""
    points, truth = blobs()
    labels = kmeans(points, 3, restarts=10, seed=123)
    assert labels.dtype == torch.long and labels.shape == truth.shape
    assert same_partition(labels, truth)
    assert torch.equal(labels, kmeans(points, 3, restarts=10, seed=123))


def test_kmeans_keeps_the_restart_of_least_inertia():
    """Four blobs, k = 4. Metric: inertia computed directly from the labels. With one restart some
    seeds end in a local optimum (two centres in one blob, inertia > 2x the truth's); with 20 restarts
    the result has the inertia of the true partition, the least there is."""
    points, truth = blobs(sizes=(20, 20, 20, 20), spread=0.5)
    single = [inertia(points, kmeans(points, 4, restarts=1, seed=s)) for s in range(20)]
    assert max(single) > inertia(points, truth) * 2
    assert inertia(points, kmeans(points, 4, restarts=20, seed=0)) <= inertia(points, truth) + 1e-3


def test_an_empty_cluster_moves_to_the_origin():
    """torch_kmeans' rule, kept for parity: a centre with no points becomes the zero vector; the others
    are their points' means (hand-computed)."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 10.0]])
    centres = _means(x, torch.tensor([[0, 0, 2]]), 3)
    assert torch.equal(centres[0], torch.tensor([[2.0, 3.0], [0.0, 0.0], [10.0, 10.0]]))


def test_kmeans_edges_and_bad_input():
    """k = 1 labels everything 0; k = P gives every point its own cluster; bad shapes and k raise."""
    points = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kmeans(points, 1, restarts=2), torch.zeros(5, dtype=torch.long))
    assert sorted(kmeans(points, 5, restarts=2).tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="k = 6 clusters for 5 points"):
        kmeans(points, 6)
    with pytest.raises(ValueError, match="k = 0 clusters"):
        kmeans(points, 0)
    with pytest.raises(ValueError, match=r"points \[P, D\]"):
        kmeans(points[None], 2)
    with pytest.raises(ValueError, match="restarts >= 1"):
        kmeans(points, 2, restarts=0)


def attention_like(side, regions, seed):
    """A self-attention-like matrix [side², side²]: softmax of feature similarities, the features of
    `regions` random discs plus noise (rows alike within a disc, with many near-ties at the borders)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    region = torch.zeros(side, side, dtype=torch.long)
    for i in range(1, regions):
        cy, cx = torch.randint(0, side, (2,), generator=g)
        radius = torch.randint(side // 6, side // 3, (1,), generator=g)
        region[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = i
    features = torch.randn(regions, 32, generator=g)[region.flatten()] + torch.randn(side * side, 32, generator=g)
    return torch.softmax(4 * features @ features.T / 32**0.5, -1)


def test_kmeans_matches_torch_kmeans():
    """Reference: torch_kmeans 0.2.0 `KMeans(n_clusters=k, num_init=R)` (init "rnd", seed 123, tol 1e-4,
    max_iter 100), the official code's clustering, on the CPU in fp32. Metric: labels equal exactly
    (same permutation), on attention-like and random softmax rows, k = 3, 4, 5."""
    torch_kmeans = pytest.importorskip("torch_kmeans")
    inputs = [attention_like(8, 4, seed=0), attention_like(16, 3, seed=1)]
    inputs.append(torch.softmax(3 * torch.randn(64, 64, generator=torch.Generator().manual_seed(2)), -1))
    for x in inputs:
        for k in (3, 4, 5):
            expected = torch_kmeans.KMeans(n_clusters=k, num_init=10, verbose=False)(x[None]).labels[0]
            assert torch.equal(kmeans(x, k, restarts=10, seed=123), expected), (x.shape, k)


# ---------------------------------------------------------------- candidates and matching


def test_candidates_are_the_clusters_of_every_k_pooled_in_order():
    """An injected clustering with known labels (pixel index mod k): Σk candidates, candidate j of k is
    exactly {labels == j}, in order of k then label."""
    calls = []

    def cluster(points, k):
        calls.append(k)
        return torch.arange(points.shape[0]) % k

    candidates = mask_candidates(torch.rand(16, 16), (4, 4), ks=(2, 3), cluster=cluster)
    assert calls == [2, 3] and candidates.shape == (5, 4, 4) and candidates.dtype == torch.bool
    expected = [(torch.arange(16) % k == j).view(4, 4) for k in (2, 3) for j in range(k)]
    assert all(torch.equal(c, e) for c, e in zip(candidates, expected))


def test_candidates_with_kmeans_split_block_attention():
    """A 4x4 grid whose attention rows are block-structured (left and right halves, plus noise 0.01):
    each k partitions the grid, and the k = 2 pair is exactly the two halves."""
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    attention = block_attention(left.flatten(), noise=0.01)
    candidates = mask_candidates(attention, (4, 4), ks=(2, 3), cluster=lambda p, k: kmeans(p, k, restarts=5))
    assert candidates[:2].sum(0).eq(1).all() and candidates[2:].sum(0).eq(1).all()
    assert {tuple(c.flatten().tolist()) for c in candidates[:2]} == {tuple(left.flatten().tolist()), tuple((~left).flatten().tolist())}


def test_a_bad_clustering_or_attention_is_refused():
    """Labels of the wrong shape or outside 0..k-1, or attention that does not fit the grid, raise."""
    with pytest.raises(ValueError, match="outside 0..1"):
        cluster_map(torch.rand(4, 4), (2, 2), 2, cluster=lambda p, k: torch.full((4,), 2))
    with pytest.raises(ValueError, match="integer labels"):
        cluster_map(torch.rand(4, 4), (2, 2), 2, cluster=lambda p, k: torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention must be \[4, 4\]"):
        mask_candidates(torch.rand(5, 5), (2, 2), ks=(2,))


def test_choose_mask_best_iou_threshold_box_and_zero_iou():
    """Hand-made 6x6 masks: IoU(near, previous) = 5/6 and IoU(far, previous) = 0, so the best candidate is
    `near`; with threshold 0.9 the previous mask's bounding box (2x3 = 6 pixels) comes back; when every
    IoU is 0 and the threshold is 0, candidate 0 (official: argmax of zeros)."""
    previous = torch.zeros(6, 6, dtype=torch.bool)
    previous[1:3, 1:4] = True
    previous[2, 1] = False  # 5 pixels, not a rectangle
    near = previous.clone()
    near[2, 1] = True
    far = torch.zeros(6, 6, dtype=torch.bool)
    far[4:, 4:] = True
    other = torch.zeros(6, 6, dtype=torch.bool)
    other[0, 5] = True
    candidates = torch.stack([far, near])
    assert torch.allclose(iou(candidates, previous), torch.tensor([0.0, 5 / 6]))
    assert torch.equal(choose_mask(candidates, previous, 0.0), near)
    box = bounding_box(previous)
    assert box.sum() == 6 and box[1:3, 1:4].all()
    assert torch.equal(choose_mask(candidates, previous, 0.9), box)
    assert torch.equal(choose_mask(torch.stack([far, other]), previous, 0.0), far)
    assert iou(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)) == 0  # both empty


# ---------------------------------------------------------------- resolutions and the merge


def test_masks_at_is_antialiased_bilinear_then_half():
    """Reference: F.interpolate(bilinear, antialias=True, align_corners=False) > 0.5 recomputed here,
    down (16 -> 4) and up (16 -> 32); the same grid returns the masks unchanged."""
    masks = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    for size in ((4, 4), (32, 32), (8, 4)):
        expected = F.interpolate(masks.float(), size=size, mode="bilinear", antialias=True, align_corners=False) > 0.5
        assert torch.equal(masks_at(masks, size), expected)
    assert torch.equal(masks_at(masks, (16, 16)), masks)
    with pytest.raises(ValueError, match=r"\[B, n, H, W\]"):
        masks_at(masks[0], (4, 4))


def test_merge_trackers_union_and_overlap_keeps_the_previous():
    """Two concepts on a 4x4 grid (by hand): concept 0's trackers claim columns 0-1 (custom) and 1
    (base), concept 1's claim columns 2-3 (custom) and 1 (base): column 1 is claimed by both, so there
    each keeps its previous mask (concept 0 had it, concept 1 did not)."""
    custom = torch.zeros(2, 4, 4, dtype=torch.bool)
    base = torch.zeros(2, 4, 4, dtype=torch.bool)
    custom[0, :, 0:2] = True
    base[0, :, 1] = True
    custom[1, :, 2:4] = True
    base[1, :, 1] = True
    previous = torch.zeros(2, 4, 4, dtype=torch.bool)
    previous[0, :, 1] = True
    previous[1, 0, 0] = True  # outside the overlap: replaced by the union
    expected = torch.zeros(2, 4, 4, dtype=torch.bool)
    expected[0, :, 0:2] = True
    expected[1, :, 2:4] = True
    assert torch.equal(merge_trackers(previous, custom, base), expected)
    assert torch.equal(merge_trackers(previous[None], custom[None], base[None]), expected[None])  # batched


def test_fusion_masks_resize_each_tracker_before_the_union():
    """The official order (notes §4.3): resize each tracker, then unite. Concept 0's custom tracker is
    column 0 and its base tracker column 1 of a 4x4 grid. On 2x2, output column 0 reads input columns
    0, 1, 2 with antialiased-bilinear weights 0.75, 0.75, 0.25 (÷ 1.75), so each one-column tracker
    gives 0.43 < 0.5 and vanishes: concept 0 gets nothing, where uniting first (0.86) would give it
    column 0. Concept 1 (columns 2-3 in both trackers) gets column 1. On 4x4 the union is kept as is."""
    custom = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    base = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    custom[0, 0, :, 0] = True
    base[0, 0, :, 1] = True
    custom[0, 1, :, 2:] = True
    base[0, 1, :, 2:] = True
    previous = {(2, 2): torch.ones(1, 2, 2, 2, dtype=torch.bool), (4, 4): torch.zeros(1, 2, 4, 4, dtype=torch.bool)}
    fused = fusion_masks(custom, base, previous)
    expected_2 = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    expected_2[0, 1, :, 1] = True
    assert torch.equal(fused[(2, 2)], expected_2)
    assert torch.equal(fused[(4, 4)], custom | base)


# ---------------------------------------------------------------- masks from points


def quadrant_attention():
    """A 4x4 grid in four 2x2 quadrants (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) and the
    block attention of those groups."""
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    quadrant = (rows // 2) * 2 + cols // 2
    return quadrant, block_attention(quadrant.flatten())


def test_masks_from_points_pick_the_cluster_under_each_point():
    """Quadrant attention on a 4x4 grid, 64x64 image: a point's mask is its quadrant (x = 5, y = 30 ->
    cell (1, 0), top-left; x = 60, y = 40 -> cell (2, 3), bottom-right)."""
    quadrant, attention = quadrant_attention()
    masks = masks_from_points(attention, (4, 4), [(5, 30), (60, 40)], (64, 64), k=4, cluster=lambda p, k: kmeans(p, k, restarts=5))
    assert torch.equal(masks[0], quadrant == 0) and torch.equal(masks[1], quadrant == 3)
    with pytest.raises(ValueError, match="outside the 64x64 image"):
        masks_from_points(attention, (4, 4), [(64, 3)], (64, 64), k=4)


def test_official_point_mapping():
    """The official cell is (y·factor // 64, x·factor // 64), factor = int(sqrt(h·w // (H//cell · W//cell))).
    A 4x4 grid on a 128x128 image, point (100, 100): with cell 64 (SD1.5) factor = 2 -> (3, 3), the same
    as floor(100·4/128) = 3; with cell 32 (SDXL) factor = 1 -> (1, 1): the top-left quadrant instead of
    the bottom-right."""
    quadrant, attention = quadrant_attention()
    cluster = lambda p, k: kmeans(p, k, restarts=5)  # noqa: E731
    correct = masks_from_points(attention, (4, 4), [(100, 100)], (128, 128), k=4, cluster=cluster)[0]
    sd15 = masks_from_points(attention, (4, 4), [(100, 100)], (128, 128), k=4, cluster=cluster, official_cell=64)[0]
    sdxl = masks_from_points(attention, (4, 4), [(100, 100)], (128, 128), k=4, cluster=cluster, official_cell=32)[0]
    assert torch.equal(correct, quadrant == 3) and torch.equal(sd15, quadrant == 3)
    assert torch.equal(sdxl, quadrant == 0)
