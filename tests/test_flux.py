"""The FLUX transformer: parity with diffusers, token groups, joint-attention controls, coverage.

Reference: diffusers `FluxTransformer2DModel` (0.42), fp32, tiny random configs (2 heads x 16,
2 double + 2 single blocks). Tolerance: max abs difference <= 1e-4 (outputs have std ~0.5).
"""

from dataclasses import replace

import pytest
import torch
from conftest import TINY_FLUX
from diffusers import FluxTransformer2DModel

from minigen.controls import AttentionBias, CaptureFeatures, Controls, ExtraTokens, FuseRows, LowRank, RecordAttention
from minigen.loading.coverage import load_exact
from minigen.loading.keymaps_flux import flux_from_diffusers, flux_to_diffusers
from minigen.models.flux import Flux
from minigen.models.flux_config import PRESETS
from minigen.models.layers import Linear
from minigen.models.flux_tokens import (
    TokenGroup,
    group_slices,
    image_ids,
    pack_latents,
    text_ids,
    unpack_latents,
)

TOLERANCE = 1e-4
B, TXT, H, W = 2, 7, 3, 5  # an odd 3x5 token grid catches row/column mix-ups


def tiny(guidance: bool = True) -> Flux:
    """The tiny preset with weights of std 0.1, so every block changes the result."""
    model = Flux(replace(TINY_FLUX, guidance_embed=guidance)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def reference(model: Flux) -> FluxTransformer2DModel:
    c = model.config
    ref = FluxTransformer2DModel(
        in_channels=c.in_channels, num_layers=c.depth, num_single_layers=c.depth_single_blocks,
        attention_head_dim=c.head_dim, num_attention_heads=c.num_heads, joint_attention_dim=c.context_in_dim,
        pooled_projection_dim=c.vec_in_dim, guidance_embeds=c.guidance_embed, axes_dims_rope=c.axes_dim,
    ).eval()
    ref.load_state_dict(flux_to_diffusers(model.state_dict()), strict=True)
    return ref


def inputs(guidance: bool = True):
    img = torch.randn(B, H * W, 64)
    txt = torch.randn(B, TXT, 32)
    return dict(
        img=img, img_ids=image_ids(H, W), txt=txt, txt_ids=text_ids(TXT), timesteps=torch.tensor([0.3, 0.9]),
        y=torch.randn(B, 24), guidance=torch.tensor([3.5, 1.0]) if guidance else None,
    )


def run_reference(ref, img, img_ids, txt, txt_ids, timesteps, y, guidance):
    with torch.no_grad():
        return ref(
            hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=timesteps,
            img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=guidance,
        ).sample


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_matches_diffusers_from_bfl_layout(guidance):
    """minigen's weights (BFL names) mapped to diffusers: same velocity (max abs diff <= 1e-4)."""
    model = tiny(guidance)
    x = inputs(guidance)
    with torch.no_grad():
        ours = model(**x)
    theirs = run_reference(reference(model), **x)
    assert theirs.std() > 0.3
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_matches_diffusers_from_diffusers_layout():
    """A random diffusers model's own state dict, mapped to BFL names, loads into minigen (<= 1e-4)."""
    ref = reference(tiny())
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.device("meta"):
        model = Flux(TINY_FLUX)
    load_exact(model, flux_from_diffusers(ref.state_dict()))
    x = inputs()
    with torch.no_grad():
        ours = model.eval()(**x)
    assert (ours - run_reference(ref, **x)).abs().max() <= TOLERANCE


def test_pack_unpack_round_trip_and_ids():
    latents = torch.randn(2, 16, 6, 10)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 15, 64)
    assert torch.equal(unpack_latents(tokens, 6, 10), latents)
    # token (row 1, col 2) holds latent pixels rows 2-3, cols 4-5, channel-major: c*4 + dy*2 + dx
    assert torch.equal(tokens[0, 1 * 5 + 2].view(16, 2, 2), latents[0, :, 2:4, 4:6])
    ids = image_ids(3, 5, offset=(0, 5))
    assert ids[0, 7].tolist() == [0.0, 1.0, 7.0]


# ---------------------------------------------------------------- token groups


def extra_group(**kwargs) -> TokenGroup:
    return TokenGroup(tokens=torch.randn(1, 6, 64), ids=image_ids(2, 3, offset=(0, W)), name="condition", **kwargs)


def test_extra_image_group_with_zero_bias_equals_diffusers_on_the_concatenated_sequence():
    """An img-stream group is the same as more image tokens: diffusers sees cat(img, group) with
    cat(img_ids, group ids); its first H*W rows must equal minigen's output (<= 1e-4). A zero
    bias by token group is passed explicitly, so the biased path (by blocks of query rows) is the one checked."""
    model, x, group = tiny(), inputs(), extra_group()
    bias = Controls(bias=[AttentionBias({("img", "condition"): 0.0}, kind="joint")])
    with torch.no_grad():
        ours = model(**x, extra=[group], controls=bias)
    joint = dict(x, img=torch.cat([x["img"], group.tokens.expand(B, -1, -1)], 1), img_ids=torch.cat([x["img_ids"], group.ids], 1))
    theirs = run_reference(reference(model), **joint)[:, : H * W]
    assert (ours - theirs).abs().max() <= TOLERANCE


def test_extra_text_group_equals_diffusers_with_appended_text_tokens():
    """A txt-stream group (Redux-like tokens, ids 0) equals appending them to the T5 tokens (<= 1e-4)."""
    model, x = tiny(), inputs()
    redux = torch.randn(B, 5, 32)
    with torch.no_grad():
        ours = model(**x, extra=[TokenGroup(redux, text_ids(5), stream="txt")])
    joint = dict(x, txt=torch.cat([x["txt"], redux], 1), txt_ids=text_ids(TXT + 5))
    assert (ours - run_reference(reference(model), **joint)).abs().max() <= TOLERANCE


def blocked():
    """-inf from text and image queries to the extra group; the group still sees them."""
    return Controls(bias=[AttentionBias({("txt", "condition"): float("-inf"), ("img", "condition"): float("-inf")}, kind="joint")])


def test_minus_inf_bias_to_an_extra_group_removes_its_effect():
    """With the text and image blind to the group, the output equals running without it (<= 1e-6),
    whatever the group's tokens, timestep and LoRA; without the bias, the group changes the output."""
    model, x = tiny(), inputs()
    lora = [LowRank("double_blocks.0.img_attn.qkv", torch.randn(4, 32), torch.randn(96, 4))]
    group = extra_group(timestep=0.0, lora=lora)
    with torch.no_grad():
        alone = model(**x)
        masked = model(**x, extra=[group], controls=blocked())
        open_ = model(**x, extra=[group])
    assert (masked - alone).abs().max() <= 1e-6
    assert (open_ - alone).abs().max() > 1e-2


def test_group_lora_and_timestep_act_on_the_group_only():
    """A group's LoRA and timestep change the image only through attention to that group."""
    model, x = tiny(), inputs()
    lora = [LowRank("single_blocks.0.linear1", torch.randn(4, 32), torch.randn(32 * 3 + 128, 4))]
    with torch.no_grad():
        plain = model(**x, extra=[extra_group()])
        with_lora = model(**x, extra=[extra_group(lora=lora)])
        at_zero = model(**x, extra=[extra_group(timestep=0.0)])
    assert (with_lora - plain).abs().max() > 1e-3
    assert (at_zero - plain).abs().max() > 1e-3


def test_group_timestep_equal_to_the_call_is_a_no_op():
    model, x = tiny(), inputs()
    g = extra_group()
    with torch.no_grad():
        a = model(**x, extra=[g])
        b = model(**x, extra=[TokenGroup(g.tokens, g.ids, timestep=x["timesteps"])])
    assert torch.equal(a, b)


# ---------------------------------------------------------------- controls on joint attention


def test_record_joint_attention_selects_queries_and_keys():
    """Recorded probabilities: rows of image queries over all keys sum to 1; a query/column subset
    equals the same slice of the full record; every block records once per call."""
    model, x = tiny(), inputs()
    img_rows = group_slices([TXT, H * W])[1]
    full = RecordAttention(kind="joint", layers=["double_blocks.1"], rows=[1])
    part = RecordAttention(kind="joint", layers=["double_blocks.1"], rows=[1], queries=list(range(TXT, TXT + H * W)), tokens=[2, 3])
    every = RecordAttention(kind="joint", tokens=[0])
    with torch.no_grad():
        model(**x, controls=Controls(record=[full, part, every]))
    probs = full.maps["double_blocks.1"][0]  # [1, 1, L, L]
    assert probs.shape == (1, 1, TXT + H * W, TXT + H * W)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(part.maps["double_blocks.1"][0], probs[:, :, img_rows][..., [2, 3]])
    assert list(every.maps) == model.attention_layers()


def test_record_selects_token_groups_by_name():
    """queries="img", tokens="txt" keep the same probabilities as the groups' positions (<= 1e-6); a name
    that is not a group raises, naming the groups (on a UNet: tests/test_controls.py)."""
    model, x = tiny(), inputs()
    by_name = RecordAttention(kind="joint", layers=["double_blocks.1"], queries="img", tokens="txt", mean_heads=False)
    by_position = RecordAttention(kind="joint", layers=["double_blocks.1"], queries=range(TXT, TXT + H * W), tokens=range(TXT),
                                  mean_heads=False)  # fmt: skip
    with torch.no_grad():
        model(**x, controls=Controls(record=[by_name, by_position]))
    named, positioned = by_name.maps["double_blocks.1"][0], by_position.maps["double_blocks.1"][0]
    assert named.shape == (B, 2, H * W, TXT) and (named - positioned).abs().max() <= 1e-6
    with pytest.raises(ValueError, match=r"no such token group.*'txt', 'img'"), torch.no_grad():
        model(**x, controls=Controls(record=[RecordAttention(kind="joint", queries="cond")]))


def test_bias_callable_and_capture_on_joint_attention():
    model, x = tiny(), inputs()
    L = TXT + H * W
    seen = []

    def bias(site):
        seen.append(site.groups["img"].stop)
        return torch.zeros(L, L)

    cap = CaptureFeatures(kind="joint", layers=["single_blocks.1"], what=("q", "out"))
    with torch.no_grad():
        plain = model(**x)
        out = model(**x, controls=Controls(bias=[AttentionBias(bias, kind="joint")], capture=[cap]))
    assert seen == [L] * 4
    assert (out - plain).abs().max() <= 1e-6
    assert cap.features["single_blocks.1"]["q"].shape == (B, L, 32)


def dense_bias(sizes, blocks):
    """The straightforward reference: an [L, L] tensor with each (query group, key group) block added."""
    slices = dict(zip(["txt", "img", "condition"], group_slices(sizes)))
    bias = torch.zeros(sum(sizes), sum(sizes))
    for (query, key), value in blocks.items():
        bias[slices[query], slices[key]] += value
    return bias


def test_bias_by_token_group_equals_the_dense_bias_built_by_hand(monkeypatch):
    """Scalars, a per-query column, a per-key row and a full block, given by group name and built a few
    query rows at a time (forced small here), equal one dense [L, L] bias (<= 1e-5), with and without
    recording (the written-out path)."""
    import minigen.attention

    monkeypatch.setattr(minigen.attention, "BIAS_BLOCK", 4 * (TXT + H * W + 6))  # 4 query rows per block
    model, x, group = tiny(), inputs(), extra_group()
    g = torch.Generator().manual_seed(5)
    blocks = {
        ("txt", "condition"): torch.tensor([0.0, -1e7, 0.0, -1e7, -1e7, 0.0, -1e7]).view(TXT, 1),  # per query
        ("img", "condition"): torch.randn(H * W, 1, generator=g),
        ("condition", "img"): torch.randn(1, H * W, generator=g),  # per key
        ("img", "txt"): torch.randn(H * W, TXT, generator=g),  # a full block
        ("condition", "txt"): -0.5,
    }
    dense = Controls(bias=[AttentionBias(dense_bias([TXT, H * W, 6], blocks), kind="joint")])
    with torch.no_grad():
        expected = model(**x, extra=[group], controls=dense)
        by_group = model(**x, extra=[group], controls=Controls(bias=[AttentionBias(blocks, kind="joint")]))
        recorded = model(**x, extra=[group], controls=Controls(bias=[AttentionBias(lambda site: blocks, kind="joint")],
                                                                record=[RecordAttention(kind="joint", tokens=[0])]))
        plain = model(**x, extra=[group])
    assert (by_group - plain).abs().max() > 1e-3
    assert (by_group - expected).abs().max() <= 1e-5
    assert (recorded - expected).abs().max() <= 1e-5


def test_bool_keep_mask_by_token_group_blocks_like_minus_inf():
    """A bool block (True = attend) equals the float block with -inf where False (<= 1e-6), and the
    recorded probability of a blocked pair is exactly 0."""
    model, x, group = tiny(), inputs(), extra_group()
    keep = torch.tensor([True, False, True, False, False, True, False]).view(TXT, 1)
    as_bool = {("txt", "condition"): keep}
    as_float = {("txt", "condition"): torch.zeros(TXT, 1).masked_fill(~keep, float("-inf"))}
    record = RecordAttention(kind="joint", layers=["double_blocks.0"], mean_heads=False)
    with torch.no_grad():
        expected = model(**x, extra=[group], controls=Controls(bias=[AttentionBias(as_float, kind="joint")]))
        got = model(**x, extra=[group], controls=Controls(bias=[AttentionBias(as_bool, kind="joint")], record=[record]))
    assert (got - expected).abs().max() <= 1e-6
    probs = record.maps["double_blocks.0"][0]  # [B, heads, L, L]
    blocked = probs[..., :TXT, TXT + H * W :][..., ~keep[:, 0], :]
    assert blocked.numel() and (blocked == 0).all()
    assert (probs[..., :TXT, TXT + H * W :][..., keep[:, 0], :] > 0).all()


def test_bias_by_token_group_refuses_unknown_groups_and_misshaped_blocks():
    model, x, group = tiny(), inputs(), extra_group()
    with pytest.raises(ValueError, match="no token group 'cond'"):
        model(**x, extra=[group], controls=Controls(bias=[AttentionBias({("img", "cond"): 0.0}, kind="joint")]))
    with pytest.raises(ValueError, match=r"broadcast to \[B, heads, 15, 6\]"):
        model(**x, extra=[group], controls=Controls(bias=[AttentionBias({("img", "condition"): torch.zeros(15)}, kind="joint")]))


def test_fuse_rows_blends_the_image_tokens_of_the_joint_attention():
    """At double_blocks.1 with a left-half mask, the captured output's image tokens of row 0 equal
    m * (row 1's) + (1 - m) * (row 0's) of the plain run (blocks before it are untouched); text rows stay."""
    model, x = tiny(), inputs()
    left = torch.zeros(1, H, W)
    left[..., :2] = 1
    plain_cap = CaptureFeatures(kind="joint", layers=["double_blocks.1"], what=("out",))
    fused_cap = CaptureFeatures(kind="joint", layers=["double_blocks.1"], what=("out",))
    fuse = FuseRows(target=0, sources=[(1, left)], layers=["double_blocks.1"], kind="joint")
    with torch.no_grad():
        plain = model(**x, controls=Controls(capture=[plain_cap]))
        fused = model(**x, controls=Controls(fuse=[fuse], capture=[fused_cap]))
    before, after = plain_cap.features["double_blocks.1"]["out"], fused_cap.features["double_blocks.1"]["out"]
    m = left.flatten().view(-1, 1)
    image = slice(TXT, TXT + H * W)
    assert (after[0, image] - (m * before[1, image] + (1 - m) * before[0, image])).abs().max() <= 1e-6
    assert torch.equal(after[0, :TXT], before[0, :TXT]) and torch.equal(after[1], before[1])
    assert (fused[0] - plain[0]).abs().max() > 1e-3 and torch.equal(fused[1], plain[1])


def test_every_linear_of_flux_honours_low_rank():
    """For each Linear of the transformer, a residual equals merging it into the weight (<= 1e-5): the
    embedders and the last layer, once silently skipped, included."""
    from minigen.models.layers import Linear

    model, x = tiny(), inputs()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        base = model(**x)
        for path, layer in model.named_modules():
            if not isinstance(layer, Linear):
                continue
            out_features, in_features = layer.weight.shape
            delta = LowRank(path, torch.randn(1, in_features, generator=g) * 0.3, torch.randn(out_features, 1, generator=g) * 0.3)
            layer.weight += delta.weight()
            merged = model(**x)
            layer.weight -= delta.weight()
            residual = model(**x, controls=Controls(low_rank=[delta]))
            assert (residual - merged).abs().max() <= 1e-5 and (merged - base).abs().max() > 0, path


def test_low_rank_on_the_q_slice_of_the_fused_qkv_equals_merging_it():
    model, x = tiny(), inputs()
    g = torch.Generator().manual_seed(2)
    delta = LowRank("double_blocks.0.img_attn.qkv", torch.randn(4, 32, generator=g) * 0.3, torch.randn(32, 4, generator=g) * 0.3, outputs=(0, 32))
    merged = tiny()
    merged.load_state_dict(model.state_dict())
    with torch.no_grad():
        merged.get_submodule(delta.target).weight += delta.weight(out_features=96)
        assert (model(**x, controls=Controls(low_rank=[delta])) - merged(**x)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "controls, message",
    [
        (lambda: Controls(extra_tokens=[ExtraTokens(torch.zeros(1, 2, 4), {"double_blocks.0": (None, None)})]), "add tokens as a TokenGroup"),
        (lambda: Controls(contexts={"double_blocks.0": torch.zeros(1, 7, 32)}), "FLUX has no cross-attention"),
        (lambda: Controls(record=[RecordAttention(kind="cross")]), "use kind='joint'"),
        (lambda: Controls(fuse=[FuseRows(0, [(1, torch.ones(1, 4, 4))], kind="self")]), "use kind='joint'"),
        (lambda: Controls(fuse=[FuseRows(0, [(1, torch.ones(1, 4, 4))], kind="joint", feature="x")]), r"feature='x' is not one of \('out',\) for kind 'joint'"),
        (lambda: Controls(capture=[CaptureFeatures(kind="joint", what=("x", "k"))]), r"what=\['x'\] is not one of .* for kind 'joint'"),
        (lambda: Controls(record=[RecordAttention(kind="joint", layers=["double_block.1"])]), "did you mean 'double_blocks.1'"),
        (lambda: Controls(low_rank=[LowRank("double_blocks.0.img_attn.qkv", torch.zeros(1, 32), torch.zeros(96, 1), region=torch.ones(1, 1, 3, 5))]), "TokenGroup.lora"),
        (lambda: Controls(low_rank=[LowRank("final_layer.linear.weight", torch.zeros(1, 32), torch.zeros(64, 1))]), "did you mean 'final_layer.linear'"),
        (lambda: Controls(bias=[AttentionBias({("img", "txt"): torch.zeros(3, 1, H * W, TXT)}, kind="joint")]),  # was torch's RuntimeError
         r"\('img', 'txt'\) has shape \[3, 1, 15, 7\]; it must broadcast to \[B, heads, 15, 7\] = \[2, 2, 15, 7\]"),
        (lambda: Controls(bias=[AttentionBias({("img", "txt"): torch.zeros(2, H * W, TXT)}, kind="joint")]), r"rows or heads need all 4 axes"),
    ],
    ids=["extra-tokens", "contexts", "kind-cross", "fuse-self", "fuse-input", "capture-input", "layer-typo", "region", "target-typo",
         "group-bias-rows", "group-bias-3d"],
)
def test_controls_flux_cannot_apply_raise_naming_the_fix(controls, message):
    model, x = tiny(), inputs()
    with pytest.raises(ValueError, match=message):
        model(**x, controls=controls())


def test_a_group_with_rows_for_another_batch_is_refused_by_name():
    """1 row serves every row and B rows are per row; 3 rows for a batch of 2 (a group stacked for one
    CFG half only, say) is refused naming the group, not left to a broadcasting error."""
    model, x = tiny(), inputs()
    with torch.no_grad():
        model(**x, extra=[TokenGroup(tokens=torch.randn(B, 6, 64), ids=image_ids(2, 3, offset=(0, W)), name="condition", timestep=torch.zeros(B))])
        with pytest.raises(ValueError, match=r"token group 'condition' has \{'tokens': 3\} rows for a batch of 2"):
            model(**x, extra=[TokenGroup(tokens=torch.randn(3, 6, 64), ids=image_ids(2, 3, offset=(0, W)), name="condition")])


def test_group_lora_with_a_typo_is_refused():
    model, x = tiny(), inputs()
    lora = [LowRank("double_blocks.0.img_atn.qkv", torch.zeros(1, 32), torch.zeros(96, 1))]
    with pytest.raises(ValueError, match="did you mean 'double_blocks.0.img_attn.qkv'"):
        model(**x, extra=[extra_group(lora=lora)])


@pytest.mark.parametrize("stream, timestep", [("img", None), ("img", 0.0), ("txt", None)])
def test_group_lora_on_a_layer_the_group_never_runs_through_is_refused(monkeypatch, stream, timestep):
    """Each Linear of the model, as the group's one-residual LoRA: on a layer the group runs through
    (`Flux.group_layers`) the output moves (but through the last single block's linear2: nothing reads
    the group after it), on any other it is refused, and (with the refusal lifted) it would have left
    the output bit for bit as it was (the other stream's layers, the final layer, and the embedders of
    the modulation vector the group shares without a timestep of its own)."""
    model, x = tiny(), inputs()
    width = 64 if stream == "img" else TINY_FLUX.context_in_dim
    group = TokenGroup(torch.randn(1, 6, width), image_ids(2, 3, offset=(0, W)), stream=stream, timestep=timestep, name="condition")
    g = torch.Generator().manual_seed(0)
    linears = {path: m for path, m in model.named_modules() if isinstance(m, Linear)}
    with torch.no_grad():
        plain = model(**x, extra=[group])
        moved, refused = {}, set()
        for path, layer in linears.items():
            lora = [LowRank(path, torch.randn(2, layer.weight.shape[1], generator=g), torch.randn(layer.weight.shape[0], 2, generator=g))]
            try:
                moved[path] = (model(**x, extra=[replace(group, lora=lora)]) - plain).abs().max().item()
            except ValueError as error:
                assert "never runs through" in str(error)
                refused.add(path)
        monkeypatch.setattr(Flux, "group_layers", lambda self, group: set(linears))
        for path in refused:
            lora = [LowRank(path, torch.randn(2, linears[path].weight.shape[1], generator=g), torch.randn(linears[path].weight.shape[0], 2, generator=g))]
            assert torch.equal(model(**x, extra=[replace(group, lora=lora)]), plain), path
    assert {path for path, change in moved.items() if change <= 1e-6} == {"single_blocks.1.linear2"}
    other = "txt" if stream == "img" else "img"
    assert {f"double_blocks.0.{other}_attn.qkv", f"{other}_in", "final_layer.linear"} <= refused
    assert ("time_in.in_layer" in refused) == (timestep is None)


# ---------------------------------------------------------------- coverage and bad input


@pytest.mark.parametrize("name, diffusers_name", [("flux1-dev.json", "diffusers_flux1-dev_transformer.json"), ("flux1-schnell.json", "diffusers_flux1-schnell_transformer.json")])
def test_full_size_flux_loads_every_official_key(manifest, manifest_tensors, name, diffusers_name):
    """Built on meta, FLUX dev/schnell take every key of the BFL file and of the diffusers shards."""
    preset = PRESETS["flux-dev" if "dev" in name else "flux-schnell"]
    for weights in (manifest_tensors(name), flux_from_diffusers(manifest_tensors(diffusers_name))):
        with torch.device("meta"):
            model = Flux(preset)
        load_exact(model, weights)
    assert sum(p.numel() for p in model.parameters()) == manifest(name)["num_elements"]


def test_guidance_must_match_the_model():
    x = inputs()
    with pytest.raises(ValueError, match="guidance-distilled"):
        tiny()(**dict(x, guidance=None))
    with pytest.raises(ValueError, match="no guidance embedding"):
        tiny(guidance=False)(**x)


def test_a_token_group_names_a_stream_or_timestep_it_cannot_have():
    """stream="image" was an AttributeError at the first block; a timestep of 5 ran as a flow time."""
    tokens, ids = torch.zeros(1, 4, 16), torch.zeros(1, 4, 3)
    with pytest.raises(ValueError, match="stream is 'img' or 'txt'"):
        TokenGroup(tokens, ids, stream="image")
    with pytest.raises(ValueError, match=r"timestep is a flow time in \[0, 1\]"):
        TokenGroup(tokens, ids, timestep=5.0)
