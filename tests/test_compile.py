"""Regional compilation (minigen/compile.py): compiled blocks compute what eager blocks compute, and
controls whose values change every step never add a graph.

Compiles are counted with torch's CompileCounter backend (each graph it is handed is one compile;
it then runs the graph eagerly, so these tests are quick); one test compiles with inductor for the
numbers. Tolerances: CompileCounter runs the traced ops themselves, so its outputs match eager to
1e-6 (fp32, the same kernels up to SDPA's choice), or 1e-5 where the UNet's convolutions run
channels-last (compile_blocks' default; another summation order); inductor fuses and reorders sums:
1e-5 on outputs of std ~0.5.
"""

from dataclasses import replace

import pytest
import torch
from conftest import TINY_FLUX, TINY_UNET
from torch._dynamo.testing import CompileCounter

from minigen.compile import compile_blocks, compile_pipeline, reaches, repeated_blocks
from minigen.controls import AttentionBias, BatchLayout, Controls, ExtraTokens, FuseRows, LowRank, RecordAttention
from minigen.models.flux import Flux
from minigen.models.flux_tokens import TokenGroup, image_ids, text_ids
from minigen.models.unet import UNet

B, H, W, TXT = 2, 3, 4, 5
STEPS = 5
FLUX_3_3 = replace(TINY_FLUX, depth=3, depth_single_blocks=3)  # room for blocks no control reaches


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Compiled code lives on the blocks' code objects, shared by every model: start each test clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_flux() -> Flux:
    model = Flux(FLUX_3_3).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model


def flux_inputs(step: int, batch: int = B) -> dict:
    g = torch.Generator().manual_seed(step)
    return dict(
        img=torch.randn(batch, H * W, 64, generator=g), img_ids=image_ids(H, W), txt=torch.randn(batch, TXT, 32, generator=g),
        txt_ids=text_ids(TXT), timesteps=torch.full((batch,), 1 - step / STEPS), y=torch.randn(batch, 24, generator=g),
        guidance=torch.full((batch,), 3.5),
    )


def flux_controls(step: int, calls: list) -> Controls:
    """Every kind of FLUX control, with values that change at each step: a LoRA scale, a bias by token
    group, a fusion mask; a record; a bias function that notes the attention call index it is given.
    double_blocks.2 and single_blocks.1 are left to no control."""

    def noted(site):
        calls.append((site.step, site.call))
        return None

    g = torch.Generator().manual_seed(100 + step)
    return Controls(
        low_rank=[LowRank("double_blocks.1.img_attn.qkv", torch.randn(2, 32, generator=g), torch.randn(96, 2, generator=g), 0.1 * step)],
        bias=[AttentionBias({("img", "txt"): -0.5 * step}, layers=["single_blocks.0"], kind="joint"),
              AttentionBias(noted, layers=["single_blocks.2"], kind="joint")],  # fmt: skip
        record=[RecordAttention(layers=["double_blocks.0"], kind="joint")],
        fuse=[FuseRows(0, [(1, torch.rand(1, H, W, generator=g))], layers=["double_blocks.1"], kind="joint")],
    ).at_step(step, BatchLayout.cfg(1))


def test_repeated_blocks_are_the_transformer_and_res_blocks():
    unet, flux = UNet(TINY_UNET), tiny_flux()
    names = {type(b).__name__ for b in repeated_blocks(unet)}
    assert names == {"ResBlock", "BasicTransformerBlock"}
    assert len(repeated_blocks(flux)) == 6
    with pytest.raises(ValueError, match="no repeated blocks"):
        compile_blocks(torch.nn.Linear(2, 2))


def test_flux_blocks_share_two_graphs_and_controls_add_none():
    """Without controls the 3 double and 3 single blocks compile to one graph per kind; then five steps
    whose controls change values every step (and a new step index) add no graph, and give eager's
    outputs, records and attention call numbers (the blocks no control reaches still count theirs)."""
    model = tiny_flux()
    with torch.no_grad():
        eager_calls, compiled_calls = [], []
        eager = [model(**flux_inputs(s), controls=flux_controls(s, eager_calls)) for s in range(STEPS)]
        plain = model(**flux_inputs(0))
        counter = CompileCounter()
        compile_blocks(model, backend=counter)
        assert (model(**flux_inputs(0)) - plain).abs().max() <= 1e-6
        assert counter.frame_count == 2  # one DoubleStreamBlock and one SingleStreamBlock graph
        for step in range(STEPS):
            controls = flux_controls(step, compiled_calls)
            out = model(**flux_inputs(step), controls=controls)
            assert (out - eager[step]).abs().max() <= 1e-6
            assert len(controls.record[0].maps["double_blocks.0"]) == 1
        assert counter.frame_count == 2
    assert compiled_calls == eager_calls == [(s, 5) for s in range(STEPS)]  # single_blocks.2: the 6th attention call


def test_a_controlled_block_runs_eagerly_the_others_compiled():
    model = tiny_flux()
    controls = flux_controls(1, [])
    reached = [block.layer_id for block in repeated_blocks(model) if reaches(controls, block)]
    assert reached == ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.2"]
    only_lora = Controls(low_rank=controls.low_rank)
    assert [block.layer_id for block in repeated_blocks(model) if reaches(only_lora, block)] == ["double_blocks.1"]


def test_flux_token_group_with_its_own_lora_compiles_no_more():
    """An extra token group with a LoRA (OminiControl's condition): the blocks its LoRA targets run
    eagerly, the others compiled; its values changing every step add no graph."""
    model = tiny_flux()

    def group(step):
        g = torch.Generator().manual_seed(step)
        lora = [LowRank("single_blocks.2.linear1", torch.randn(2, 32, generator=g), torch.randn(32 * 3 + 128, 2, generator=g), 0.5)]
        return TokenGroup(torch.randn(1, 4, 64, generator=g), image_ids(2, 2, offset=(0, W)), timestep=0.0, lora=lora, name="cond")

    with torch.no_grad():
        eager = [model(**flux_inputs(s), extra=[group(s)]) for s in range(3)]
        counter = CompileCounter()
        compile_blocks(model, backend=counter)
        outs = [model(**flux_inputs(s), extra=[group(s)]) for s in range(3)]
    assert all((a - b).abs().max() <= 1e-6 for a, b in zip(outs, eager))
    assert counter.frame_count == 2  # 3 branches instead of 2: one graph per kind, however many steps


def unet_controls(unet: UNet, step: int) -> Controls:
    """UNet controls whose values change every step: a LoRA inside one transformer block, IP-Adapter-like
    extra tokens on every cross-attention layer, a layer's own text context, a bias."""
    g = torch.Generator().manual_seed(step)
    target = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    linear = unet.get_submodule(target)
    cross = [layer for layer in unet.attention_layers()]
    projections = {layer: (torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)) for layer in cross[:2]}
    return Controls(
        low_rank=[LowRank(target, torch.randn(2, 32, generator=g), torch.randn(linear.weight.shape[0], 2, generator=g), 0.2 * step)],
        extra_tokens=[ExtraTokens(torch.randn(1, 4, 32, generator=g), projections, scale=0.1 * step)],
        contexts={cross[-1]: torch.randn(B, 7, 32, generator=g)},
        bias=[AttentionBias(torch.randn(1, 1, 1, 7, generator=g), layers=[cross[3]])],
    ).at_step(step, BatchLayout.cfg(1))


def test_unet_controls_changing_each_step_add_no_graph():
    torch.manual_seed(0)
    unet = UNet(TINY_UNET).eval()
    g = torch.Generator().manual_seed(1)
    x, t, context = torch.randn(B, 4, 16, 16, generator=g), torch.tensor([10.0, 700.0]), torch.randn(B, 7, 32, generator=g)
    with torch.no_grad():
        controls = [unet_controls(unet, s) for s in range(STEPS)]
        eager = [unet(x, t, context, controls=c) for c in controls]
        plain = unet(x, t, context)
        counter = CompileCounter()
        compile_blocks(unet, backend=counter)
        assert (unet(x, t, context) - plain).abs().max() <= 1e-5  # channels-last convolutions
        graphs = counter.frame_count
        for step, c in enumerate(controls):
            assert (unet(x, t, context, controls=c) - eager[step]).abs().max() <= 1e-5
    assert counter.frame_count == graphs


def test_more_block_shapes_than_torchs_default_limit_all_compile():
    """Four levels give 9 distinct res-block shapes and 4 transformer-block shapes: past torch's default
    of 8 graphs per function, which would leave the rest eager; compile_blocks raises the limit."""
    config = replace(TINY_UNET, model_channels=8, channel_mult=(1, 2, 3, 4), transformer_depth=(1, 1, 1, 1), norm_groups=4, num_heads=2)
    unet = UNet(config).eval()
    res_shapes = {tuple(p.shape for p in b.parameters()) for b in repeated_blocks(unet) if type(b).__name__ == "ResBlock"}
    assert len(res_shapes) > 8
    counter = CompileCounter()
    compile_blocks(unet, backend=counter)
    with torch.no_grad():
        unet(torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 7, 32))
        unet(torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 7, 32))
    assert counter.frame_count >= len(res_shapes) + 4


def test_new_batches_and_sizes_keep_every_block_compiled():
    """torch counts compile_blocks' limit per block class, and a batch of one row (cfg 1) and FLUX's first
    double block (its inputs are views) each take graphs of their own: with the limit at 2 per shape,
    a new size after batches of 2, 1 and 3 left blocks to run eagerly, silently. Counted: the compiled
    graphs that run in each call, against the 6 blocks."""
    model = tiny_flux()
    runs = []

    def backend(graph, example_inputs):
        def run(*args):
            runs.append(1)
            return graph.forward(*args)

        return run

    compile_blocks(model, backend=backend)
    with torch.no_grad():
        for batch, (h, w) in ((2, (H, W)), (1, (H, W)), (3, (H, W)), (1, (H + 1, W)), (2, (H + 1, W + 2)), (1, (H, W))):
            runs.clear()
            inputs = flux_inputs(0, batch)
            g = torch.Generator().manual_seed(batch)
            inputs.update(img=torch.randn(batch, h * w, 64, generator=g), img_ids=image_ids(h, w))
            model(**inputs)
            assert len(runs) == 6, (batch, h, w, len(runs))


def test_compiling_and_offloading_are_refused_together():
    """Offloaded layers copy their weights in Python at each use: compiled blocks broke into small graphs
    and compiled again at every block (slower than eager), so the two are refused, in either order."""
    from minigen.storage import Offload

    model = tiny_flux()
    Offload("cpu").add(model, "transformer", "block")
    with pytest.raises(ValueError, match="compiling and offloading do not combine"):
        compile_blocks(model, backend="eager")
    compiled = compile_blocks(tiny_flux(), backend="eager")
    with pytest.raises(ValueError, match="offload: transformer has compiled blocks; compiling and offloading do not combine"):
        Offload("cpu").add(compiled, "transformer", "model")


def test_inductor_flux_matches_eager():
    model = tiny_flux()
    with torch.no_grad():
        eager = model(**flux_inputs(0))
        compile_blocks(model)
        assert (model(**flux_inputs(0)) - eager).abs().max() <= 1e-5


def test_compile_pipeline_compiles_the_denoiser(toy_sd):
    """Every repeated block of the UNet compiled (and there are some); a generation then goes through the
    compiler (graphs counted) and draws the eager image (within 1e-4 on pixels in [0, 1]: channels-last
    convolutions sum in another order, carried through two steps and the decoder; measured 2e-5)."""
    kw = dict(steps=2, seed=0, progress=False)
    eager = toy_sd.generate("a red star on grass", **kw)
    counter = CompileCounter()
    compile_pipeline(toy_sd, backend=counter)
    blocks = repeated_blocks(toy_sd.unet)
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    compiled = toy_sd.generate("a red star on grass", **kw)
    assert counter.frame_count > 0
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
