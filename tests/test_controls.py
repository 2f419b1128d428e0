"""The controls API on a tiny SD1.5-topology UNet: each control does what it says, and nothing else.

Tolerances: exact (==) where the arithmetic is the same, 1e-5 in fp32 where SDPA may pick another
kernel or a sum is reassociated (outputs have std ≈ 0.1-1).
"""

import copy
import dataclasses
import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_UNET

from minigen.attention import attention, attention_with_probs, merge_heads
from minigen.controls import (
    AttentionBias,
    BatchLayout,
    CaptureFeatures,
    Controls,
    ExtraTokens,
    FuseRows,
    LowRank,
    RecordAttention,
    combine,
    resize_mask,
    tokens_mask,
)
from minigen.models.unet import Attention, UNet
from minigen.models.unet_config import PRESETS

TOL = 1e-5


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(TINY_UNET).eval()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 7, 32, generator=g)


def run(unet, inputs, controls=None):
    with torch.no_grad():
        return unet(*inputs, controls=controls)


def random_low_rank(unet, target, rank=2, scale=1.0, **kw):
    weight = unet.get_submodule(target).weight
    g = torch.Generator().manual_seed(zlib.crc32(target.encode()))  # the same factors in every process (hash() is salted)
    down = torch.randn(rank, *weight.shape[1:], generator=g) * 0.3
    up = torch.randn(weight.shape[0], rank, generator=g) * 0.3
    return LowRank(target, down, up, scale, **kw)


TARGETS = [
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k",  # Linear
    "output_blocks.3.1.proj_out",  # 1x1 conv
    "middle_block.0.in_layers.2",  # 3x3 conv
    "input_blocks.3.0.op",  # strided conv
]


def test_layer_ids_follow_the_papers_naming(unet):
    layers = unet.attention_layers()
    assert layers["down.0.0.0"] == "input_blocks.1.1.transformer_blocks.0"
    assert layers["mid.0.0"] == "middle_block.1.transformer_blocks.0"
    assert layers["up.0.0.0"] == "output_blocks.0.1.transformer_blocks.0"
    assert layers["up.1.2.0"] == "output_blocks.5.1.transformer_blocks.0"


def test_sd15_layer_ids_match_ldm_positions():
    with torch.device("meta"):
        layers = UNet(PRESETS["sd15"]).attention_layers()
    # Conceptrol's SD1.5 concept layer: up_blocks.1.attentions.0 = output_blocks.3.1
    assert layers["up.1.0.0"] == "output_blocks.3.1.transformer_blocks.0"
    assert layers["down.2.1.0"] == "input_blocks.8.1.transformer_blocks.0"
    assert len(layers) == 16


def test_empty_controls_equal_plain_path(unet, inputs):
    assert torch.equal(run(unet, inputs), run(unet, inputs, Controls()))


def test_all_true_keep_mask_changes_nothing(unet, inputs):
    keep = Controls(bias=[AttentionBias(torch.ones(1, 1, 1, 7, dtype=torch.bool)), AttentionBias(torch.zeros(1, 1, 1, 1), kind="self")])
    assert (run(unet, inputs, keep) - run(unet, inputs)).abs().max() < TOL


def test_masked_out_keys_get_zero_probability_and_match_dropping_them():
    torch.manual_seed(0)
    layer = Attention(16, 8, heads=2, head_dim=8, layer_id="x", kind="cross").eval()
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 6, 8)
    keep = torch.tensor([True, True, False, True, False, True]).view(1, 1, 1, 6)
    rec = RecordAttention(kind="cross")
    with torch.no_grad():
        masked = layer(x, ctx, Controls(bias=[AttentionBias(keep)], record=[rec]))
        dropped = layer(x, ctx[:, keep.flatten()])
    assert (masked - dropped).abs().max() < TOL
    assert torch.all(rec.maps["x"][0][..., ~keep.flatten()] == 0)


def test_recorded_maps_sum_to_one_over_keys(unet, inputs):
    cross, selfs = RecordAttention(kind="cross"), RecordAttention(kind="self", layers={"up.1.0.0"}, rows=[1])
    run(unet, inputs, Controls(record=[cross, selfs]))
    assert set(cross.maps) == set(unet.attention_layers())
    for maps in cross.maps.values():
        assert maps[0].shape[:2] == (2, 1) and maps[0].shape[-1] == 7
        assert torch.allclose(maps[0].sum(-1), torch.ones(()), atol=1e-5)
    (self_map,) = selfs.maps["up.1.0.0"]
    assert self_map.shape == (1, 1, 256, 256)  # one row, heads averaged, 16x16 queries and keys
    assert torch.allclose(self_map.sum(-1), torch.ones(()), atol=1e-5)


def test_recording_chosen_columns_and_rows_equals_slicing_the_full_map(unet, inputs):
    full = RecordAttention(layers={"down.1.0.0"}, mean_heads=False)
    part = RecordAttention(layers={"down.1.0.0"}, tokens=[2, 3], rows=[1], mean_heads=False)
    out_plain = run(unet, inputs)
    out = run(unet, inputs, Controls(record=[full, part]))
    # recording writes the attention out instead of calling SDPA: the same result up to fp32 round-off
    assert (out - out_plain).abs().max() < TOL
    assert torch.allclose(part.maps["down.1.0.0"][0], full.maps["down.1.0.0"][0][1:2, ..., 2:4], atol=1e-6)


def test_attention_with_probs_equals_sdpa_and_the_softmax_it_records():
    """Reference: F.scaled_dot_product_attention for the output, softmax(q·kᵀ/√d + bias) for the maps,
    fp32, tolerance 1e-5; queries in chunks of 5 so a query selection spans chunk boundaries."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 8, generator=g) for n in (12, 7, 7))
    bias = torch.randn(3, 1, 12, 7, generator=g)
    keep_all = RecordAttention(mean_heads=False)
    keep_some = RecordAttention(rows=[2, 0], queries=[1, 4, 5, 11], tokens=[6, 3])
    out, (full, some) = attention_with_probs(q, k, v, [keep_all, keep_some], bias=bias, chunk=5)
    probs = (q @ k.transpose(-1, -2) / 8**0.5 + bias).softmax(-1)
    assert (out - merge_heads(F.scaled_dot_product_attention(q, k, v, bias))).abs().max() < TOL
    assert (full - probs).abs().max() < TOL
    expected = probs[[2, 0]][:, :, [1, 4, 5, 11]][..., [6, 3]].mean(1, keepdim=True)
    assert some.shape == (2, 1, 4, 2) and (some - expected).abs().max() < TOL


def test_recording_in_float64_stays_float64():
    """A float64 run (the official-code comparisons' way of removing rounding) records in float64: the
    output and the maps equal SDPA's and the softmax's to 1e-12 (the softmax went through float32 before,
    3e-6 off), and a float64 mask is resized in float64."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64) for n in (12, 7, 7))
    bias = torch.randn(2, 1, 12, 7, generator=g, dtype=torch.float64)
    out, (probs,) = attention_with_probs(q, k, v, [RecordAttention(mean_heads=False)], bias=bias, chunk=5)
    assert probs.dtype == torch.float64
    assert (probs - (q @ k.transpose(-1, -2) / 8**0.5 + bias).softmax(-1)).abs().max() < 1e-12
    assert (out - merge_heads(F.scaled_dot_product_attention(q, k, v, bias))).abs().max() < 1e-12
    mask = torch.rand(1, 1, 8, 8, generator=g, dtype=torch.float64)
    for mode in ("area", "bilinear"):
        expected = F.interpolate(mask, size=(5, 5), mode="area" if mode == "area" else "bilinear", antialias=mode == "bilinear")
        assert (resize_mask(mask, (5, 5), mode) - expected).abs().max() < 1e-12


def test_records_of_some_queries_write_out_only_their_rows(monkeypatch):
    """When every record keeps some queries, the output is SDPA's (checked by counting SDPA calls) and
    the softmax is written out only from the first kept query to the last: the records equal the same
    slices of the full softmax (fp32, 1e-5), and the logits of rows outside that span are never formed."""
    import minigen.attention

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g) for n in (12, 7, 7))
    bias = torch.randn(2, 1, 12, 7, generator=g)
    asked, sdpa_calls = [], []

    def rows(start, stop):
        asked.append((start, stop))
        return bias[:, :, start:stop]

    sdpa = minigen.attention.F.scaled_dot_product_attention
    monkeypatch.setattr(minigen.attention.F, "scaled_dot_product_attention", lambda *a, **kw: sdpa_calls.append(1) or sdpa(*a, **kw))
    a, b = RecordAttention(queries=[5, 3], tokens=[0, 6]), RecordAttention(queries=range(4, 9), mean_heads=False)
    out, (first, second) = attention_with_probs(q, k, v, [a, b], bias=rows, chunk=4)
    probs = (q @ k.transpose(-1, -2) / 8**0.5 + bias).softmax(-1)
    assert sdpa_calls and (out - merge_heads(sdpa(q, k, v, bias))).abs().max() < TOL
    assert (first - probs[:, :, [5, 3]][..., [0, 6]].mean(1, keepdim=True)).abs().max() < TOL
    assert (second - probs[:, :, 4:9]).abs().max() < TOL
    assert asked == [(3, 7), (7, 9), (0, 12)]  # rows 3..8 written out in chunks of 4, then SDPA's one block of all 12


def test_ranges_of_positions_are_sliced_without_reading_values_back(monkeypatch):
    """A token group's positions (ranges) were made index tensors on the device at every layer and read
    back (min, max, order, a boolean index per chunk): about 6 GPU syncs per layer per step on FLUX. Ranges
    are slices now: nothing is read back from a tensor. Reference: the softmax written out in full (1e-6),
    ranges partly inside, beyond and before the chunks of 4."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 12, 8, generator=g) for _ in range(3))
    probs = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1)
    records = [RecordAttention(rows=range(1, 3), queries=range(2, 11), tokens=range(1, 5), mean_heads=False),
               RecordAttention(queries=range(9, 12), mean_heads=False)]  # fmt: skip
    reads = []
    for name in ("__int__", "__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _name=name, _original=original: reads.append(_name) or _original(self, *a))
    _, (some, last) = attention_with_probs(q, k, v, records, chunk=4)
    assert reads == []
    assert (some - probs[1:3, :, 2:11, 1:5]).abs().max() < 1e-6 and (last - probs[:, :, 9:12]).abs().max() < 1e-6
    assert last.untyped_storage().nbytes() == last.numel() * last.element_size()  # a copy, not a view holding its whole chunk
    for name, outside in (("tokens", range(4, 13)), ("rows", range(1, 4)), ("queries", range(-2, 0))):  # slices would clip
        with pytest.raises(ValueError, match=rf"RecordAttention: {name}=range\(.*\) lies outside the"):
            attention_with_probs(q, k, v, [RecordAttention(**{name: outside})], chunk=4)


def test_recorded_queries_come_back_in_the_order_given_across_chunks():
    """Queries spanning several chunks, unsorted and repeated: map row j is query j as given (they came
    back chunk by chunk). Reference: the softmax written out in full, within 1e-6."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 8, generator=g) for _ in range(3))
    probs = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1)
    for queries in ([9, 1, 5], [11, 0, 11, 3]):
        _, (kept,) = attention_with_probs(q, k, v, [RecordAttention(queries=queries, mean_heads=False)], chunk=4)
        assert (kept - probs[:, :, queries]).abs().max() < 1e-6


def test_a_token_group_name_on_the_unet_raises(unet, inputs):
    with pytest.raises(ValueError, match="token groups exist in FLUX's joint attention only; give positions"):
        run(unet, inputs, Controls(record=[RecordAttention(queries="img")]))


@pytest.mark.parametrize("target", TARGETS)
def test_low_rank_at_scale_zero_is_the_base_model(unet, inputs, target):
    delta = random_low_rank(unet, target, scale=0.0)
    assert torch.equal(run(unet, inputs, Controls(low_rank=[delta])), run(unet, inputs))


@pytest.mark.parametrize("target", TARGETS)
def test_merged_low_rank_equals_the_residual(unet, inputs, target):
    delta = random_low_rank(unet, target, scale=0.7)
    residual = run(unet, inputs, Controls(low_rank=[delta]))
    merged_unet = copy.deepcopy(unet)
    with torch.no_grad():
        merged_unet.get_submodule(target).weight += delta.weight()
    merged = run(merged_unet, inputs)
    assert (residual - run(unet, inputs)).abs().max() > 1e-3  # the residual does something
    assert (residual - merged).abs().max() < TOL


def test_a_1x1_convs_down_factor_may_be_given_flat(unet, inputs):
    """check_low_rank accepts down [r, in] on a 1x1 conv: per call and merged it equals down [r, in, 1, 1]."""
    from minigen.loading.lora_files import merge

    target = "output_blocks.3.1.proj_out"
    delta = random_low_rank(unet, target, scale=0.7)
    flat = LowRank(target, delta.down.flatten(1), delta.up, 0.7)
    expected = run(unet, inputs, Controls(low_rank=[delta]))
    assert torch.equal(run(unet, inputs, Controls(low_rank=[flat])), expected)
    merged_unet = copy.deepcopy(unet)
    merge(merged_unet, [flat])
    assert (run(merged_unet, inputs) - expected).abs().max() < TOL


def test_low_rank_scoped_to_a_batch_row_leaves_other_rows_untouched(unet, inputs):
    delta = random_low_rank(unet, TARGETS[1], rows=torch.tensor([0.0, 1.0]))
    out, base = run(unet, inputs, Controls(low_rank=[delta])), run(unet, inputs)
    assert torch.equal(out[0], base[0])
    assert (out[1] - base[1]).abs().max() > 1e-3


def test_low_rank_region_zero_is_base_and_one_is_unscoped(unet, inputs):
    for target in ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "output_blocks.3.1.proj_out", "middle_block.0.in_layers.2"]:
        off = random_low_rank(unet, target, region=torch.zeros(1, 1, 16, 16))
        on = random_low_rank(unet, target, region=lambda site: torch.ones(1, 1, 16, 16))
        assert torch.equal(run(unet, inputs, Controls(low_rank=[off])), run(unet, inputs))
        unscoped = run(unet, inputs, Controls(low_rank=[random_low_rank(unet, target)]))
        assert (run(unet, inputs, Controls(low_rank=[on])) - unscoped).abs().max() < TOL


def test_low_rank_region_limits_the_change_in_space(unet, inputs):
    left = torch.zeros(1, 1, 16, 16)
    left[..., :8] = 1
    # proj_out of the last up block acts at full resolution; its residual only touches the left half.
    layer = unet.get_submodule("output_blocks.5.1")
    x = torch.randn(1, 32, 16, 16)
    delta = random_low_rank(unet, "output_blocks.5.1.proj_out", region=left)
    with torch.no_grad():
        diff = (layer(x, inputs[2][:1], Controls(low_rank=[delta])) - layer(x, inputs[2][:1])).abs()
    assert diff[..., 8:].max() == 0 and diff[..., :8].max() > 1e-3


def extra_tokens_layer():
    torch.manual_seed(0)
    layer = Attention(16, 8, heads=2, head_dim=8, layer_id="x", kind="cross").eval()
    to_k, to_v = torch.nn.Linear(12, 16, bias=False), torch.nn.Linear(12, 16, bias=False)
    return layer, {"x": (to_k, to_v)}, torch.randn(2, 4, 16), torch.randn(2, 6, 8), torch.randn(2, 3, 12)


def on_grid(controls: Controls, grid=(2, 2)) -> Controls:
    """Controls for a layer run on its own: the token grid its model would have told them."""
    controls.enter_grid(grid)
    return controls


def test_extra_tokens_with_uncond_on_a_layer_called_alone_check_the_layout():
    """A model checks the layout's size against its batch when a forward begins; a layer called on its own
    (as these tests do) is checked by ExtraTokens itself (an IndexError or TypeError deep inside before)."""
    layer, projections, x, ctx, _ = extra_tokens_layer()
    tokens = torch.randn(1, 3, 12)
    for layout in (BatchLayout.cfg(2), BatchLayout.plain(1)):
        controls = Controls(extra_tokens=[ExtraTokens(tokens, projections, uncond=torch.zeros(1, 3, 12))], layout=layout)
        with pytest.raises(ValueError, match=rf"\({layout.size} rows\), and this call's batch has 2"), torch.no_grad():
            layer(x, ctx, controls)


def test_extra_tokens_add_a_gated_decoupled_attention():
    layer, projections, x, ctx, tokens = extra_tokens_layer()
    with torch.no_grad():
        base = layer(x, ctx)
        zero_gate = layer(x, ctx, on_grid(Controls(extra_tokens=[ExtraTokens(tokens, projections, gate=torch.zeros(2, 1, 2, 2))])))
        full = layer(x, ctx, Controls(extra_tokens=[ExtraTokens(tokens, projections, scale=1.0)]))
        half = layer(x, ctx, on_grid(Controls(extra_tokens=[ExtraTokens(tokens, projections, scale=2.0, gate=torch.full((1, 1, 2, 2), 0.25))])))
    assert torch.equal(zero_gate, base)
    assert (full - base).abs().max() > 1e-3
    assert ((half - base) - 0.5 * (full - base)).abs().max() < TOL  # the output is linear in scale·gate


def test_extra_tokens_equal_a_hand_written_ip_adapter_attention():
    layer, projections, x, ctx, tokens = extra_tokens_layer()
    to_k, to_v = projections["x"]

    def attend(q, k, v):  # [B, N, 16] with 2 heads of 8
        q, k, v = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in (q, k, v))
        return ((q @ k.transpose(-1, -2) / 8**0.5).softmax(-1) @ v).transpose(1, 2).flatten(2)

    with torch.no_grad():
        q = layer.to_q(x)
        expected = attend(q, layer.to_k(ctx), layer.to_v(ctx)) + 0.6 * attend(q, to_k(tokens), to_v(tokens))
        expected = layer.to_out[0](expected)
        out = layer(x, ctx, Controls(extra_tokens=[ExtraTokens(tokens, projections, scale=0.6)]))
    assert (out - expected).abs().max() < TOL


def test_fuse_rows_blends_outputs_under_the_mask():
    torch.manual_seed(0)
    layer = Attention(16, 16, heads=2, head_dim=8, layer_id="x", kind="self").eval()
    x = torch.randn(3, 16, 16)  # 4x4 tokens
    top = torch.zeros(1, 4, 4)
    top[:, :2] = 1
    with torch.no_grad():
        base = layer(x, None)
        fused = layer(x, None, on_grid(Controls(fuse=[FuseRows(target=0, sources=[(1, top), (2, 1 - top)])]), (4, 4)))
    grid = fused.view(3, 4, 4, 16)
    assert torch.equal(grid[0, :2], base.view(3, 4, 4, 16)[1, :2])
    assert torch.equal(grid[0, 2:], base.view(3, 4, 4, 16)[2, 2:])
    assert torch.equal(fused[1:], base[1:])
    per_token = top.reshape(1, 16, 1)  # the same mask in the per-token form [1, N, 1] (was read as a 16x1 image)
    with torch.no_grad():
        tokens = layer(x, None, on_grid(Controls(fuse=[FuseRows(target=0, sources=[(1, per_token), (2, 1 - per_token)])]), (4, 4)))
    assert torch.equal(tokens, fused)
    with pytest.raises(ValueError, match=r"FuseRows: a mask of shape \[2, 4, 4\]; give one mask"):
        layer(x, None, on_grid(Controls(fuse=[FuseRows(target=0, sources=[(1, top.repeat(2, 1, 1))])]), (4, 4)))


def test_fuse_rows_on_the_input_or_query_reach_the_query_only():
    """feature "x" and "q" (the official params_merge "feature_input" and "query"): with a full mask, row 0
    attends with row 1's query to its own keys and values, written out by hand; "x" at half the mask
    blends the inputs before to_q."""
    torch.manual_seed(0)
    layer = Attention(16, 16, heads=2, head_dim=8, layer_id="x", kind="self").eval()
    x = torch.randn(2, 16, 16)  # 4x4 tokens
    split = lambda t: t.view(1, 16, 2, 8).transpose(1, 2)  # noqa: E731

    def by_hand(query_input):
        q, k, v = split(layer.to_q(query_input)), split(layer.to_k(x[:1])), split(layer.to_v(x[:1]))
        probs = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1)
        return layer.to_out[0]((probs @ v).transpose(1, 2).reshape(1, 16, 16))

    half = torch.zeros(1, 4, 4)
    half[:, :2] = 1
    with torch.no_grad():
        base = layer(x, None)
        for feature in ("x", "q"):
            fused = layer(x, None, on_grid(Controls(fuse=[FuseRows(0, [(1, torch.ones(1, 4, 4))], feature=feature)]), (4, 4)))
            assert (fused[0] - by_hand(x[1:])[0]).abs().max() < 1e-6
            assert torch.equal(fused[1], base[1]) and (fused[0] - base[0]).abs().max() > 0.01
        blended = torch.where(half.flatten(1)[..., None].bool(), x[1:], x[:1])  # top half from row 1
        fused = layer(x, None, on_grid(Controls(fuse=[FuseRows(0, [(1, half)], feature="x", resize="nearest")]), (4, 4)))
        assert (fused[0] - by_hand(blended)[0]).abs().max() < 1e-6


def test_captured_keys_keep_autograd(unet, inputs):
    x, t, ctx = inputs
    x = x.clone().requires_grad_(True)
    cap = CaptureFeatures(layers={"up.1.0.0"}, kind="self", what=("k",))
    unet(x, t, ctx, controls=Controls(capture=[cap]))
    k = cap.features["up.1.0.0"]["k"]
    assert k.shape == (2, 256, 32) and k.requires_grad  # 16x16 tokens, 32 channels
    (grad,) = torch.autograd.grad(k.pow(2).mean(), x)
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("layer, kind", [("up.0.1.0", "self"), ("down.1.0.0", "cross")])
def test_stop_after_ends_the_forward_with_the_same_features_and_gradient(unet, inputs, layer, kind):
    """A forward stopped after a layer returns None, runs no later layer (no later record), and gives
    exactly the features and the input gradient of the full forward (the loss only reads that layer)."""
    x, t, ctx = inputs
    results = []
    for stop in (None, (layer, kind)):
        xg = x.clone().requires_grad_(True)
        cap = CaptureFeatures(layers={layer}, kind=kind, what=("q",))
        every = RecordAttention(kind="self")  # every self-attention layer that runs
        out = unet(xg, t, ctx, controls=Controls(capture=[cap], record=[every], stop_after=stop))
        k = cap.features[layer]["q"]
        (grad,) = torch.autograd.grad(k.pow(2).mean(), xg)
        results.append((out, k, grad, every.maps))
    (full, k_full, g_full, ran_full), (stopped, k_stop, g_stop, ran_stopped) = results
    assert full is not None and stopped is None
    assert "up.1.2.0" in ran_full and "up.1.2.0" not in ran_stopped  # the last decoder layer never ran
    assert torch.equal(k_full, k_stop) and torch.equal(g_full, g_stop)


def test_per_layer_contexts(unet, inputs):
    x, t, ctx = inputs
    other = torch.randn_like(ctx)
    every_layer = {layer: other for layer in unet.attention_layers()}
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx, controls=Controls(contexts=every_layer)), unet(x, t, other))
        one_layer = unet(x, t, ctx, controls=Controls(contexts={"up.1.0.0": other}))
    assert (one_layer - unet(x, t, ctx)).abs().max() > 1e-4
    assert (one_layer - unet(x, t, other)).abs().max() > 1e-4


# ---------------------------------------------------------------- loud by default


@pytest.mark.parametrize(
    "controls, message",
    [
        (lambda: Controls(record=[RecordAttention(layers={"up.1.0.O"})]), "did you mean 'up.1.0.0'"),
        (lambda: Controls(bias=[AttentionBias(torch.zeros(1), layers={"down.9.0.0"}, kind="self")]), "not a self attention layer"),
        (lambda: Controls(fuse=[FuseRows(0, [(1, torch.ones(1, 4, 4))], layers={"up.1.0"})]), "'up.1.0' is not a self attention layer.*did you mean"),
        (lambda: Controls(fuse=[FuseRows(0, [(1, torch.ones(1, 4, 4))], feature="k")]), r"FuseRows: feature='k' is not one of \('x', 'q', 'out'\) for kind 'self'"),
        (lambda: Controls(capture=[CaptureFeatures(layers={"mid.0.0"}, what=("key",))]), "'x', 'q', 'k', 'v', 'out'"),
        (lambda: Controls(record=[RecordAttention(kind="joint")]), "no attention of kind 'joint'"),
        (lambda: Controls(contexts={"up.1.0.1": torch.zeros(1, 7, 32)}), "not a cross attention layer"),
        (lambda: Controls(extra_tokens=[ExtraTokens(torch.zeros(1, 2, 4), {"mid.0": (None, None)})]), "did you mean 'mid.0.0'"),
        (lambda: Controls(low_rank=[LowRank("output_blocks.3.1.proj_ot", torch.zeros(1, 32, 1, 1), torch.zeros(32, 1))]), "did you mean 'output_blocks.3.1.proj_out'"),
        (lambda: Controls(low_rank=[LowRank("output_blocks.3.1.norm", torch.zeros(1, 32), torch.zeros(32, 1))]), "not a Linear/Conv2d module path"),
        (lambda: Controls(low_rank=[LowRank("output_blocks.3.1.proj_out", torch.zeros(1, 16), torch.zeros(32, 1))]), "do not fit its weight"),
        (lambda: Controls(low_rank=[LowRank("input_blocks.1.1.transformer_blocks.0.attn2.to_k", torch.zeros(1, 32), torch.zeros(8, 1), outputs=(30, 38))]), "is not a slice"),
        (lambda: Controls(stop_after=("up.1.0", "self")), "stop_after: 'up.1.0' is not a self attention layer"),
        (lambda: Controls(record=[RecordAttention(layers=[])]), "RecordAttention: no layers are named"),
        (lambda: Controls(bias=[AttentionBias(torch.zeros(1), layers=set(), kind="self")]), "AttentionBias: no layers are named"),
        (lambda: Controls(extra_tokens=[ExtraTokens(torch.zeros(1, 2, 4), {})]), "ExtraTokens.projections: no layers are named"),
        (lambda: Controls(fuse=[FuseRows(0, [(1, torch.ones(1, 4, 4))], layers="up.1.0.0")]), r"got str 'up.1.0.0'; write \['up.1.0.0'\]"),
        (lambda: Controls(capture=[CaptureFeatures(layers=(f"up.1.0.{i}" for i in range(2)))]), "must be a list or set of layer ids, got generator"),
        (lambda: Controls(capture=[CaptureFeatures(what="out")]), r"write what=\('out',\) for one"),
        (lambda: Controls(low_rank=[LowRank("output_blocks.3.1.proj_out", torch.zeros(1, 32, device="meta"), torch.zeros(32, 1, device="meta"))]),
         "LowRank on 'output_blocks.3.1.proj_out': its factors are on the meta device"),
        (lambda: Controls(extra_tokens=[ExtraTokens(torch.zeros(1, 2, 4, device="meta"), {"mid.0.0": (None, None)})]), "ExtraTokens: its tokens are on the meta device"),
        (lambda: Controls(extra_tokens=[ExtraTokens(torch.zeros(1, 2, 4), {"mid.0.0": (torch.nn.Linear(4, 64, device="meta"), None)})]),
         r"ExtraTokens: its projections at \['mid.0.0'\] are on the meta device"),
        (lambda: Controls(capture=[CaptureFeatures(layers={"mid.0.0"}, what=())]), "what=\\(\\) names no feature"),
        (lambda: Controls(fuse=[FuseRows(0, [])]), r"FuseRows into row 0: no \(row, mask\) sources"),
        (lambda: (lambda twice: Controls(record=[twice, twice]))(RecordAttention()), "the same RecordAttention is in record twice"),
        (lambda: Controls(record=[RecordAttention(layers={"up.1.2.0"})], stop_after=("down.0.0.0", "self")),
         r"RecordAttention at \['up.1.2.0'\]: the forward stops after \('down.0.0.0', 'self'\) and never reaches it"),
        (lambda: Controls(record=[RecordAttention(layers={"down.0.0.0", "up.1.2.0"})], stop_after=("down.1.0.0", "self")),
         r"RecordAttention at \['up.1.2.0'\]: the forward stops after"),
        (lambda: Controls(capture=[CaptureFeatures(kind="cross")], stop_after=("down.0.0.0", "self")), r"CaptureFeatures at \['every cross layer'\]: .* never reaches it"),
        (lambda: Controls(bias=[AttentionBias(torch.zeros(2, 1, 7))]), r"\[2, 1, 7\] does not broadcast .* a 3-D bias would broadcast its first axis over the heads"),
        (lambda: Controls(record=[RecordAttention(layers={"up.1.0.0"}), RecordAttention(layers={"up.1.0.0"}, queries=[7, 10**6])]),
         "its queries hold index 1000000"),
        (lambda: Controls(layout=BatchLayout.cfg(3), bias=[AttentionBias(lambda site: None)]), r"\(6 rows\), and the model is called with 2 rows"),
    ],
    ids=["record-typo", "bias-layer", "fuse-layer", "fuse-feature", "capture-what", "kind-joint", "contexts", "extra-tokens", "low-rank-typo",
         "low-rank-not-linear", "low-rank-shape", "low-rank-slice", "stop-after", "record-no-layers", "bias-no-layers", "extra-tokens-none",
         "layers-a-string", "layers-a-generator", "capture-what-a-string", "low-rank-meta", "extra-tokens-meta", "projections-meta",
         "capture-nothing", "fuse-nothing", "record-twice", "record-after-stop", "record-partly-after-stop", "capture-after-stop", "bias-3d", "queries-beside-all",
         "layout-size"],
)
def test_a_control_that_cannot_apply_raises_naming_the_fix(unet, inputs, controls, message):
    with pytest.raises(ValueError, match=message):
        run(unet, inputs, controls())


@pytest.mark.parametrize("fields, message", [
    (dict(record=RecordAttention()), r"record takes a list of RecordAttention, got RecordAttention .*; write record=\[...\] for one"),
    (dict(low_rank=(LowRank(t, torch.zeros(1, 4), torch.zeros(4, 1)) for t in "ab")), "low_rank takes a list of LowRank, got generator"),
    (dict(bias=[RecordAttention()]), "bias takes a list of AttentionBias, got list"),
])  # fmt: skip
def test_controls_of_the_wrong_type_are_named(fields, message):
    with pytest.raises(TypeError, match=message):
        Controls(**fields)


def test_controls_are_read_as_built():
    """A Controls' lists are tuples, its contexts a read-only copy, and its fields are not set again: a LowRank
    appended after it was built was checked against the model but never applied (the residuals were sorted
    by layer when it was built); a context added to the caller's dict later was never checked."""
    delta = LowRank("output_blocks.3.1.proj_out", torch.zeros(1, 32, 1, 1), torch.zeros(32, 1))
    controls = Controls(low_rank=[])
    with pytest.raises(AttributeError, match="append"):
        controls.low_rank.append(delta)
    with pytest.raises(AttributeError, match=r"Controls.low_rank is set when the controls are built.*dataclasses.replace"):
        controls.low_rank = [delta]
    assert dataclasses.replace(controls, low_rank=[delta]).low_rank == (delta,)
    given = {"up.1.0.0": torch.zeros(1, 7, 32)}
    controls = Controls(contexts=given)
    given["up.1.0.1"] = torch.zeros(1, 7, 32)  # not a cross layer: a later add would skip that check
    assert list(controls.contexts) == ["up.1.0.0"]
    with pytest.raises(TypeError, match="does not support item assignment"):
        controls.contexts["up.1.0.1"] = torch.zeros(1, 7, 32)
    copied = copy.deepcopy(controls)  # as it did with a dict (a MappingProxyType cannot be copied)
    assert list(copied.contexts) == ["up.1.0.0"] and torch.equal(copied.contexts["up.1.0.0"], given["up.1.0.0"])
    assert torch.equal(dataclasses.asdict(controls)["contexts"]["up.1.0.0"], given["up.1.0.0"])
    more = {"up.1.0.1": torch.ones(1)}  # a dict's reading operations give dicts, to change
    assert list(controls.contexts | more) == ["up.1.0.0", "up.1.0.1"] and list(more | controls.contexts) == ["up.1.0.1", "up.1.0.0"]
    assert type(controls.contexts.copy()) is dict and list(reversed(controls.contexts)) == ["up.1.0.0"]
    with pytest.raises(TypeError, match=r"contexts takes a mapping \{cross layer id: \[B, T, C\] tensor\}, got list"):
        Controls(contexts=[("up.1.0.0", torch.zeros(1, 7, 32))])


def test_a_bias_per_key_broadcasts_and_a_query_without_keys_is_refused(unet, inputs):
    """A [K] bias is the [1, 1, 1, K] one (the kernels want at least [N, K]; it was an IndexError inside
    SDPA); a number or a row that keeps no key (NaN written out, zeros from SDPA) is refused."""
    bias = torch.zeros(7)
    bias[3:] = -1e4
    per_key = run(unet, inputs, Controls(bias=[AttentionBias(bias, layers={"up.1.0.0"})]))
    assert torch.equal(per_key, run(unet, inputs, Controls(bias=[AttentionBias(bias[None, None, None], layers={"up.1.0.0"})])))
    assert (per_key - run(unet, inputs)).abs().max() > 1e-3
    with pytest.raises(TypeError, match=r"bias=-5.0 is a number; give a tensor \(torch.tensor\(-5.0\)"):
        AttentionBias(-5.0)
    for blocked in (torch.zeros(1, 7, dtype=torch.bool), torch.tensor([[0.0, float("-inf")], [float("-inf"), float("-inf")]])):
        with pytest.raises(ValueError, match="some query attends to no key"):
            AttentionBias(blocked)


@pytest.mark.parametrize("index", [[], torch.tensor([1.0, 2.0]), torch.tensor([True, False]), torch.zeros(2, 2, dtype=torch.long), [1.5]])
def test_record_positions_must_be_a_list_or_vector_of_integers(index):
    """Empty, float, bool or 2-D positions were RuntimeError/IndexError inside index_select at the first layer."""
    for name in ("tokens", "rows", "queries"):
        with pytest.raises(ValueError, match=f"RecordAttention: {name} takes positions, a non-empty list or 1-D integer tensor"):
            RecordAttention(**{name: index})


def test_a_pipeline_names_controls_of_the_wrong_type(toy_sd):
    for wrong, given in (([Controls()], "given a list"), (lambda step: RecordAttention(), "returned a RecordAttention")):
        with pytest.raises(TypeError, match=f"a Controls \\(or a function of the step returning one\\) was expected, {given}"):
            toy_sd.generate("a star", steps=1, width=32, height=32, controls=wrong, progress=False)
    with pytest.raises(ValueError, match="stop_after ends the forward early .* not generation"):  # was AttributeError on None
        toy_sd.generate("a star", steps=1, width=32, height=32, controls=Controls(stop_after=("up.1.0.0", "cross")), progress=False)


def test_controls_made_for_a_run_length_or_layout_refuse_a_call_of_another(toy_sd, toy_flux):
    """Controls(steps=N) were made for a run of N sampler steps (Conceptrol's warmup counts them): a run of another
    length was sampled with them silently (one 10 steps long under controls for 50 held the reference back
    throughout). From an image at strength 0.5 of 4 steps the run is the 2 steps left. A layout given by the
    controls overrode the pipeline's without a word; now the two must agree. combine refuses two lengths."""
    call = dict(width=32, height=32, progress=False)
    with pytest.raises(ValueError, match="made for a run of 5 sampling steps, and this run takes 3: build them with steps=3"):
        toy_sd.generate("a star", steps=3, controls=Controls(steps=5), **call)
    with pytest.raises(ValueError, match="made for a run of 3 sampling steps, and this run takes 2"):
        toy_flux.generate("a star", steps=2, controls=lambda step: Controls(steps=3), **call)
    told = []
    image = torch.rand(1, 3, 32, 32)
    toy_sd.generate("a star", steps=4, image=image, strength=0.5, controls=Controls(after_forward=[told.append]), **call)
    assert [(site.step, site.steps) for site in told] == [(0, 2), (1, 2)]  # callables read the run's length at their Site
    told.clear()
    toy_sd.generate("a star", steps=4, image=image, strength=0.5, controls=Controls(steps=2, after_forward=[told.append]), **call)
    assert len(told) == 2  # two steps ran, under controls made for two
    told.clear()  # FLUX cuts as diffusers' FluxImg2ImgPipeline: int(4 - 4 * 0.3) = 2 steps skipped, 2 run (SD: int(4 * 0.3) = 1 run)
    toy_flux.generate("a star", steps=4, image=image, strength=0.3, controls=Controls(steps=2, after_forward=[told.append]), **call)
    assert [(site.step, site.steps) for site in told] == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match="made for a run of 1 sampling steps, and this run takes 2"):
        toy_flux.generate("a star", steps=4, image=image, strength=0.3, controls=Controls(steps=1), **call)
    with pytest.raises(ValueError, match="made for a run of 2 sampling steps, and this run takes 1"):
        toy_sd.generate("a star", steps=4, image=image, strength=0.3, controls=Controls(steps=2), **call)
    with pytest.raises(ValueError, match="steps is the number of sampling steps the controls were made for, a whole number; got '10'"):
        Controls(steps="10")
    with pytest.raises(ValueError, match="made for a run of 4 sampling steps, and this run takes 2"):
        toy_sd.generate("a star", steps=4, image=image, strength=0.5, controls=Controls(steps=4), **call)
    with pytest.raises(ValueError, match=r"made for the batch layout BatchLayout\(cond=\(1,\), uncond=\(0,\)\), and this call's is "
                                         r"BatchLayout\(cond=\(0, 1\), uncond=\(\)\)"):
        toy_sd.generate(["a star", "a moon"], steps=1, cfg=1.0, controls=Controls(layout=BatchLayout.cfg(1)), **call)
    toy_sd.generate("a star", steps=1, controls=Controls(layout=BatchLayout.cfg(1), steps=1), **call)  # the call's own: accepted
    with pytest.raises(ValueError, match="combine: the parts set steps to \\['3', '4'\\]"):
        combine(Controls(steps=3), Controls(steps=4))
    assert combine(Controls(steps=3), Controls()).steps == 3


def test_controls_are_checked_once_per_model(unet, inputs, monkeypatch):
    import minigen.controls

    checks = []
    real_check = minigen.controls.check
    monkeypatch.setattr(minigen.controls, "check", lambda c, m: (checks.append(m), real_check(c, m)))
    controls = Controls(record=[RecordAttention(layers={"up.1.0.0"})])
    for step in range(3):
        run(unet, inputs, controls.at_step(step, None))
    assert len(checks) == 1 and len(controls.record[0].maps["up.1.0.0"]) == 3


# ---------------------------------------------------------------- sites: where callables run


def test_attention_calls_run_in_the_listed_order_and_callables_see_their_site(unet, inputs):
    """Every attention layer enters once per forward, in `attention_sites()` order (self before cross);
    a record's sink sees its site (layer, kind, call index, grid, step, layout) and its probabilities."""
    seen = []
    sink = RecordAttention(kind="self", sink=lambda site, probs: seen.append((site.layer, site.kind, site.call, site.grid, probs.shape)))
    cross = RecordAttention(kind="cross", sink=lambda site, probs: seen.append((site.layer, site.kind, site.call, site.grid, probs.shape)))
    ends = []
    layout = BatchLayout.cfg(1)
    controls = Controls(record=[sink, cross], after_forward=[ends.append]).at_step(4, layout)
    run(unet, inputs, controls)
    order = [(layer, kind) for layer, kinds in unet.attention_sites().items() for kind in kinds]
    assert [(layer, kind) for layer, kind, *_ in seen] == order
    assert [call for _, _, call, *_ in seen] == list(range(len(order)))
    grids = {"down.0": (16, 16), "down.1": (8, 8), "mid": (8, 8), "up.0": (8, 8), "up.1": (16, 16)}  # 16x16 latents
    for layer, kind, _, grid, shape in seen:
        assert grid == grids[layer.rsplit(".", 2)[0]]
        assert shape == (2, 1, grid[0] * grid[1], grid[0] * grid[1] if kind == "self" else 7)
    assert [(s.call, s.step, s.layout) for s in ends] == [(len(order), 4, layout)]
    assert sink.maps == {}  # a sink keeps nothing itself


def test_sites_inside_a_layer_run_in_the_documented_order():
    """(b) bias, (a) records, (c) gates: each sees what the previous one produced in this call."""
    layer, projections, x, ctx, tokens = extra_tokens_layer()
    events = []
    record = RecordAttention(sink=lambda site, probs: events.append("sink"))

    def bias(site):
        events.append("bias")
        return None

    def gate(site):
        events.append("gate")
        assert site.probs(record).shape == (2, 1, 4, 6)  # this call's probabilities, all rows
        return site.probs(record)[..., 0].unflatten(-1, site.grid)  # attention to the first token, [2, 1, 2, 2]

    with torch.no_grad():
        layer(x, ctx, on_grid(Controls(record=[record], bias=[AttentionBias(bias)], extra_tokens=[ExtraTokens(tokens, projections, gate=gate)])))
    assert events == ["bias", "sink", "gate"]


# ---------------------------------------------------------------- masks


def test_stop_after_given_as_a_list_stops(unet, inputs):
    assert run(unet, inputs, Controls(stop_after=["up.1.0.0", "self"])) is None


def test_control_tensors_of_another_float_dtype_run_in_the_models(unet, inputs):
    """float64 extra tokens and contexts on a float32 UNet give what float32 ones give (were 'mat1 and mat2
    must have the same dtype'), as LowRank factors, latents and embeddings already did."""
    x, t, ctx = inputs
    projections = {"up.1.0.0": (torch.nn.Linear(4, 32), torch.nn.Linear(4, 32))}
    tokens, other = torch.randn(1, 2, 4), torch.randn_like(ctx)

    def controls(dtype):
        return Controls(extra_tokens=[ExtraTokens(tokens.to(dtype), projections)], contexts={"up.1.0.0": other.to(dtype)})

    as_float32, as_float64 = run(unet, inputs, controls(torch.float32)), run(unet, inputs, controls(torch.float64))
    assert as_float64.dtype == torch.float32 and torch.equal(as_float64, as_float32)


def test_extra_tokens_with_rows_for_another_batch_are_refused(unet, inputs):
    layer = "up.1.0.0"
    projections = {layer: (torch.nn.Linear(4, 32), torch.nn.Linear(4, 32))}
    with pytest.raises(ValueError, match="its tokens have 3 rows for a batch of 2"):
        run(unet, inputs, Controls(extra_tokens=[ExtraTokens(torch.zeros(3, 2, 4), projections)]))


def test_extra_tokens_with_uncond_are_placed_by_the_batch_layout(unet, inputs):
    """ExtraTokens(tokens, uncond=empty) under CFG equals the tokens stacked by hand [empty | tokens]; without
    CFG every row reads `tokens` (the stacked form had to be chosen to fit the call: stacked for CFG, a call of
    two prompts without it took it by its row count and gave image 0 the empty image's tokens)."""
    projections = {"up.1.0.0": (torch.nn.Linear(4, 32), torch.nn.Linear(4, 32))}
    g = torch.Generator().manual_seed(3)
    tokens, empty = torch.randn(1, 2, 4, generator=g), torch.randn(1, 2, 4, generator=g)

    def image(extra, layout):
        return run(unet, inputs, Controls(extra_tokens=[extra]).at_step(0, layout))

    placed = image(ExtraTokens(tokens, projections, uncond=empty), BatchLayout.cfg(1))
    assert torch.equal(placed, image(ExtraTokens(torch.cat([empty, tokens]), projections), BatchLayout.cfg(1)))
    plain = image(ExtraTokens(tokens, projections, uncond=empty), BatchLayout.plain(2))
    assert torch.equal(plain, image(ExtraTokens(tokens, projections), BatchLayout.plain(2)))
    assert (plain[0] - placed[0]).abs().max() > 1e-4  # the row that changed from the empty image's tokens to the reference's
    with pytest.raises(ValueError, match="tokens has 2 rows for the batch's 1 conditional rows; give 1 row"):
        image(ExtraTokens(torch.cat([tokens, tokens]), projections, uncond=empty), BatchLayout.cfg(1))
    with pytest.raises(ValueError, match=r"layout BatchLayout\(cond=\(1, 2\), uncond=\(0, 3\)\) \(4 rows\), and the model is called with 2 rows"):
        image(ExtraTokens(tokens, projections, uncond=empty), BatchLayout(cond=(1, 2), uncond=(0, 3)))
    x, t, ctx = inputs  # two images under CFG, each with its own reference: [e0, e1 | t0, t1] stacked by hand
    two, two_empty = torch.randn(2, 2, 4, generator=g), torch.randn(2, 2, 4, generator=g)
    four = (torch.cat([x, x.flip(0)]), torch.cat([t, t]), torch.cat([ctx, ctx.flip(0)]))

    def image_of_four(extra):
        return run(unet, four, Controls(extra_tokens=[extra]).at_step(0, BatchLayout.cfg(2)))

    stacked = image_of_four(ExtraTokens(torch.cat([two_empty, two]), projections))
    assert torch.equal(image_of_four(ExtraTokens(two, projections, uncond=two_empty)), stacked)
    assert not torch.equal(image_of_four(ExtraTokens(two.flip(0), projections, uncond=two_empty)), stacked)  # each image its own
    with pytest.raises(ValueError, match=r"uncond=\) places its tokens by the batch layout, which this call was not given"):
        run(unet, inputs, Controls(extra_tokens=[ExtraTokens(tokens, projections, uncond=empty)]))
    with pytest.raises(ValueError, match=r"uncond \[1, 3, 4\] torch.float32 on cpu must have the tokens' shape \[1, 2, 4\]"):
        ExtraTokens(tokens, projections, uncond=torch.zeros(1, 3, 4))


@pytest.mark.parametrize(
    "record, message",
    [
        (RecordAttention(rows=[2, 3]), r"its rows hold index 3, but this call has 2 batch rows \(under CFG"),
        (RecordAttention(tokens=[6, 7]), "its tokens hold index 7, but this call has 7 tokens; give tokens within 0..6"),
        (RecordAttention(kind="self", queries=[-1]), "its queries hold index -1, but this call has"),
    ],
    ids=["rows", "tokens", "negative-query"],
)
def test_a_record_reaching_past_the_call_is_named(unet, inputs, record, message):
    """Rows, keys or queries outside the call were a bare IndexError from index_select."""
    with pytest.raises(ValueError, match="RecordAttention at '[a-z0-9.]+': " + message):
        run(unet, inputs, Controls(record=[record]))


def test_an_empty_bias_by_token_group_leaves_the_layer_on_sdpas_path():
    """A bias function may return an empty mapping (AlignGen without its mask and one reference): no bias,
    so the layer attends without one rather than adding a zero bias on the written-out path."""
    from minigen.controls import Site

    layer = Controls(bias=[AttentionBias(lambda site: {}, kind="joint")]).at("double_blocks.0", "joint")
    site = Site("double_blocks.0", "joint", 0, None, None, (2, 2), groups={"txt": slice(0, 3), "img": slice(3, 7)})
    assert layer.logit_bias(site, torch.zeros(1, 2, 7, 4), 7) is None


def test_a_bool_mask_keeps_the_cells_it_mostly_covers():
    """Shrinking a bool mask keeps a cell where more than half of it is inside (not wherever any of it is),
    for every resize mode; a 4x4 square in an 8x8 mask is a 2x2 square on a 4x4 grid."""
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., 2:6, 2:6] = True
    for mode in ("bilinear", "area", "nearest"):
        small = resize_mask(mask, (4, 4), mode)
        assert small.dtype == torch.bool and small.sum() == 4 and small[0, 0, 1:3, 1:3].all(), mode
    one_pixel = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    one_pixel[..., 5, 5] = True
    assert not resize_mask(one_pixel, (4, 4)).any()


def test_a_per_token_mask_for_another_grid_is_refused():
    """A [B, N, 1] mask is per token; with N not the layer's h*w it is an error, not an N x 1 picture."""
    with pytest.raises(ValueError, match="must have N = 256 for this 16x16 grid, got N = 64"):
        tokens_mask(torch.ones(1, 64, 1), (16, 16))


def test_a_residual_on_a_slice_of_a_convs_channels(unet, inputs):
    """outputs= on a 1x1 conv slices its output channels (not the width): equal to merging into those rows."""
    target = "output_blocks.3.1.proj_out"  # 32 channels: the residual on 8..24
    g = torch.Generator().manual_seed(4)
    delta = LowRank(target, torch.randn(2, 32, 1, 1, generator=g), torch.randn(16, 2, generator=g), 0.5, outputs=(8, 24))
    merged_unet = copy.deepcopy(unet)
    with torch.no_grad():
        merged_unet.get_submodule(target).weight += delta.weight(out_features=32).view(32, 32, 1, 1)
    assert (run(unet, inputs, Controls(low_rank=[delta])) - run(merged_unet, inputs)).abs().max() < TOL


def test_fp32_residuals_apply_to_a_bf16_model(unet, inputs):
    """Factors kept in fp32 (a trained residual file) act on a bf16 UNet as on the fp32 one, within bf16's rounding."""
    target = "output_blocks.3.1.proj_out"
    delta = random_low_rank(unet, target, region=torch.ones(1, 1, 4, 4))
    half = copy.deepcopy(unet).to(torch.bfloat16)
    x, t, context = inputs
    with torch.no_grad():
        out = half(x.bfloat16(), t, context.bfloat16(), controls=Controls(low_rank=[delta])).float()
        base = half(x.bfloat16(), t, context.bfloat16()).float()
    full = run(unet, inputs, Controls(low_rank=[delta]))
    assert (out - base).abs().max() > 0.05 and (out - full).abs().max() < 0.05


def test_nearest_resize_keeps_every_other_cell_as_conceptrol_does():
    """Conceptrol resizes the 8x8 concept mask to a 4x4 layer with nearest: rows/cols 0, 2, 4, 6."""
    mask = torch.arange(64.0).view(1, 1, 8, 8)
    assert torch.equal(resize_mask(mask, (4, 4), "nearest")[0, 0], mask[0, 0, ::2, ::2])
    assert torch.equal(resize_mask(mask[..., :4, :4], (8, 8), "nearest"), mask[..., :4, :4].repeat_interleave(2, -1).repeat_interleave(2, -2))
    area = resize_mask(mask, (4, 4), "area")
    assert area[0, 0, 0, 0] == mask[0, 0, :2, :2].mean()


def test_gate_coarser_than_the_layer_and_per_token_gates():
    """A 1x2 gate on a 2x2 layer is upsampled (no 'does not match' refusal); a per-token [B, N, 1] gate is
    used as is, so the two ways of saying 'left column only' agree."""
    layer, projections, x, ctx, tokens = extra_tokens_layer()
    left = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    per_token = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 4, 1)
    with torch.no_grad():
        coarse = layer(x, ctx, on_grid(Controls(extra_tokens=[ExtraTokens(tokens, projections, gate=left, resize="nearest")])))
        tokenwise = layer(x, ctx, on_grid(Controls(extra_tokens=[ExtraTokens(tokens, projections, gate=per_token)])))
    assert torch.equal(coarse, tokenwise)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        tokens_mask(torch.zeros(1, 3, 4, 4), (2, 2))


def test_region_callable_gets_the_site_of_its_layer(unet, inputs):
    grids = []

    def region(site):
        grids.append((site.layer, site.kind, site.grid))
        return torch.ones(1, 1, *site.grid)

    target = "output_blocks.3.1.transformer_blocks.0.attn1.to_q"
    run(unet, inputs, Controls(low_rank=[random_low_rank(unet, target, region=region)]))
    assert grids == [(target, None, (16, 16))]


# ---------------------------------------------------------------- LoRA on part of a fused layer


def test_low_rank_on_an_output_slice_equals_merging_it_into_that_slice(unet, inputs):
    target = "input_blocks.1.1.transformer_blocks.0.attn1.to_v"  # 32 outputs: the residual on 8..24
    g = torch.Generator().manual_seed(3)
    delta = LowRank(target, torch.randn(2, 32, generator=g), torch.randn(16, 2, generator=g), 0.5, outputs=(8, 24))
    merged_unet = copy.deepcopy(unet)
    with torch.no_grad():
        merged_unet.get_submodule(target).weight += delta.weight(out_features=32)
    assert (run(unet, inputs, Controls(low_rank=[delta])) - run(merged_unet, inputs)).abs().max() < TOL
    assert delta.weight(out_features=32)[:8].abs().max() == 0


# ---------------------------------------------------------------- attention by blocks of query rows


def test_attention_by_row_blocks_equals_one_sdpa_with_the_whole_bias(monkeypatch):
    """A bias given as rows(start, stop) is evaluated block by block (here 3 rows at a time) and gives
    SDPA's result with the whole bias, on both the fast and the written-out path (<= 1e-5)."""
    import minigen.attention

    monkeypatch.setattr(minigen.attention, "BIAS_BLOCK", 3 * 7)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g) for n in (10, 7, 7))
    bias = torch.randn(2, 1, 10, 7, generator=g)
    asked = []

    def rows(start, stop):
        asked.append((start, stop))
        return bias[:, :, start:stop]

    expected = merge_heads(F.scaled_dot_product_attention(q, k, v, bias))
    assert (attention(q, k, v, rows) - expected).abs().max() < TOL
    assert asked == [(0, 3), (3, 6), (6, 9), (9, 10)]
    out, _ = attention_with_probs(q, k, v, [RecordAttention()], bias=rows, chunk=4)  # every query: written out
    assert (out - expected).abs().max() < TOL


def test_attention_differentiated_on_a_cpu_in_bf16_runs_in_fp32_only_where_that_is_faster():
    """Under CPU bf16 autocast, an attention with small heads and few keys that autograd will
    differentiate runs in fp32 (PyTorch's bf16 backward is slow there): its output and gradients equal
    fp32 SDPA's cast to bf16, biases included (exact). Without gradients, or with 64-wide heads, it is
    bf16 SDPA, bit for bit."""
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(2, 1, 10, 7, generator=g).bfloat16()

    def leaves(d):
        return [torch.randn(2, 2, n, d, generator=g).bfloat16().requires_grad_() for n in (10, 7, 7)]

    def fp32_reference(q, k, v, bias):
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        out = merge_heads(F.scaled_dot_product_attention(q32, k32, v32, attn_mask=bias.float()))
        out.sum().backward()
        return out.bfloat16(), [t.grad.bfloat16() for t in (q32, k32, v32)]

    for given in (bias, lambda start, stop: bias[:, :, start:stop]):
        q, k, v = leaves(8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attention(q, k, v, given)
        out.sum().backward()
        expected, grads = fp32_reference(q, k, v, bias)
        assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
        assert all(torch.equal(t.grad, grad) for t, grad in zip((q, k, v), grads))

    for d, grad in ((8, False), (64, True)):
        q, k, v = leaves(d)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            out = attention(q, k, v, bias)
        with torch.no_grad():
            assert torch.equal(out, merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=bias)))


@pytest.mark.slow
def test_every_linear_and_conv_of_the_unet_honours_low_rank(unet, inputs):
    """For each of the UNet's Linear/Conv2d layers, a residual equals merging it into the weight (<= 1e-4):
    no layer skips its controls."""
    from minigen.models.layers import Conv2d, Linear

    base = run(unet, inputs)
    for path, layer in unet.named_modules():
        if not isinstance(layer, (Linear, Conv2d)):
            continue
        delta = random_low_rank(unet, path, rank=1, scale=0.5)
        with torch.no_grad():
            layer.weight += delta.weight()
            merged = run(unet, inputs)
            layer.weight -= delta.weight()
        residual = run(unet, inputs, Controls(low_rank=[delta]))
        assert (residual - merged).abs().max() < 1e-4 and (merged - base).abs().max() > 0, path


def test_a_dense_bias_that_does_not_fit_the_call_is_named_with_or_without_a_record(unet, inputs):
    """A bias made for another grid (N rows) was cut to the call's N when a record wrote the softmax
    out (silently using its first rows) and a bare broadcasting error from SDPA otherwise."""
    for extra in ([], [RecordAttention(layers={"down.1.0.0"})]):
        for bias in (torch.zeros(1, 1, 999, 7), torch.zeros(1, 1, 1, 8)):
            with pytest.raises(ValueError, match=r"AttentionBias at 'down.1.0.0' \(cross\): a bias of shape .* does not broadcast to this call's logits"):
                run(unet, inputs, Controls(bias=[AttentionBias(bias, layers={"down.1.0.0"})], record=extra))


def test_a_bias_function_or_a_sum_of_biases_that_blocks_every_key_is_refused_on_both_paths(unet, inputs):
    """A fixed tensor is checked at construction; a function's tensor and a sum of biases at the call,
    with or without a record (SDPA gave such a query zeros, the written-out softmax NaN)."""
    def blocks_all(site):
        bias = torch.zeros(1, 1, 1, 7)
        bias[..., :] = float("-inf")
        return bias

    half = torch.zeros(7, dtype=torch.bool)
    half[:3] = True
    summed = [AttentionBias(half, layers={"up.1.0.0"}), AttentionBias(~half, layers={"up.1.0.0"})]
    for biases in ([AttentionBias(blocks_all, layers={"up.1.0.0"})], summed):
        for extra in ([], [RecordAttention(layers={"up.1.0.0"})]):
            with pytest.raises(ValueError, match=r"AttentionBias at 'up.1.0.0' \(cross\), step None: some query attends to no key"):
                run(unet, inputs, Controls(bias=biases, record=extra))
    kept = half.clone()
    kept[5] = True  # the sum now keeps key 5 for every query
    assert torch.isfinite(run(unet, inputs, Controls(bias=[summed[0], AttentionBias(~half | kept, layers={"up.1.0.0"})]))).all()
    with pytest.raises(TypeError, match="its function returned float; return a tensor"):
        run(unet, inputs, Controls(bias=[AttentionBias(lambda site: 0.5, layers={"up.1.0.0"})]))


def test_a_bool_in_a_bias_by_token_group_is_a_keep_mask():
    """{(q, k): False} blocked nothing: Python's False was added as the number 0. It is the keep-mask a
    bool tensor is (False: -inf), and True adds nothing."""
    from minigen.controls import Site

    site = Site("double_blocks.0", "joint", 0, None, None, (2, 2), groups={"txt": slice(0, 3), "img": slice(3, 7)})
    q = torch.zeros(1, 2, 7, 4)

    def rows(value):
        layer = Controls(bias=[AttentionBias({("img", "txt"): value}, kind="joint")]).at("double_blocks.0", "joint")
        return layer.logit_bias(site, q, 7)(0, 7)

    assert torch.equal(rows(False), rows(torch.tensor(False).reshape(1, 1)))
    assert torch.isneginf(rows(False)[..., 3:, :3]).all() and not torch.isneginf(rows(False)[..., :3, :]).any()
    assert torch.equal(rows(True), torch.zeros(1, 1, 7, 7))


def test_a_layers_context_must_have_the_batchs_rows(unet, inputs):
    """One row is shared by a plain batch; under CFG it gave both halves the prompt and cancelled the
    guidance without a word, and another row count was a bare broadcasting error."""
    x, t, ctx = inputs
    one = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(5))
    shared = run(unet, inputs, Controls(contexts={"up.1.0.0": one}))
    assert (shared - run(unet, inputs, Controls(contexts={"up.1.0.0": one.expand(2, -1, -1)}))).abs().max() <= TOL  # SDPA broadcasts k, v
    with pytest.raises(ValueError, match=r"contexts at 'up.1.0.0': 1 rows for a batch of 2; give 2 rows .* unconditional rows come first"):
        run(unet, inputs, Controls(contexts={"up.1.0.0": one}, layout=BatchLayout.cfg(1)))
    with pytest.raises(ValueError, match=r"contexts at 'up.1.0.0': 3 rows for a batch of 2; give 2 rows in the batch's order, or 1 shared"):
        run(unet, inputs, Controls(contexts={"up.1.0.0": one.expand(3, -1, -1)}))


def test_a_bias_function_reading_its_own_layers_record_is_told_why_it_is_empty(unet, inputs):
    record = RecordAttention(layers={"up.1.0.0"})

    def bias(site):
        site.probs(record)

    with pytest.raises(ValueError, match="has not recorded layer 'up.1.0.0' \\(cross\\) yet in this call: it keeps the softmax, which runs after"):
        run(unet, inputs, Controls(bias=[AttentionBias(bias, layers={"up.1.0.0"})], record=[record]))


def test_combine_joins_the_parts_in_order_and_steps_through_functions(unet, inputs):
    """combine(a, b) runs a's controls then b's at each site: the image of one Controls holding both
    lists in that order (exact); functions of the step give a function of the step; conflicts are named."""
    from minigen.controls import combine

    record = RecordAttention(layers={"up.1.0.0"})
    residual = random_low_rank(unet, TARGETS[1])
    bias = AttentionBias(torch.linspace(-2, 2, 7), layers={"up.1.0.0"})
    context = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(9))
    a = Controls(low_rank=[residual], record=[record])
    b = Controls(bias=[bias], contexts={"down.1.0.0": context})
    hand = run(unet, inputs, Controls(low_rank=[residual], record=[RecordAttention(layers={"up.1.0.0"})], bias=[bias], contexts={"down.1.0.0": context}))
    assert torch.equal(run(unet, inputs, combine(a, None, b)), hand)
    assert len(record.maps["up.1.0.0"]) == 1  # the part's own record kept the map
    assert combine(None) is None and combine(a) is a

    steps = combine(a, lambda step: b if step == 1 else None)
    assert callable(steps) and steps(0) is a and list(steps(1).bias) == [bias] and list(steps(1).low_rank) == [residual]
    with pytest.raises(ValueError, match=r"combine: two parts give contexts for \['down.1.0.0'\]"):
        combine(b, Controls(contexts={"down.1.0.0": context}))
    with pytest.raises(ValueError, match="combine: the parts set stop_after"):
        combine(Controls(stop_after=("up.1.0.0", "self")), Controls(stop_after=("mid.0.0", "self")))
    with pytest.raises(TypeError, match="combine takes Controls, functions of the step returning them, or None; got list"):
        combine([residual])
