"""Offload (minigen/storage.py): weights kept in storage, copied to the compute device one model or one
block at a time; and the peak-memory report.

This machine has no GPU, so the pipelines are offloaded with device "cpu": the copies are then the
stored tensors themselves, and what is checked is the bookkeeping (which group is on the device,
how many copies, how many bytes) and that outputs are *identical* to the resident pipeline's
(tolerance 0: the same operations on the same weights). The CUDA test (skipped here) checks that
weights really stay in pinned CPU memory and outputs match the resident GPU model.
"""

import copy

import pytest
import torch
from torch import nn

from minigen.controls import LowRank
from minigen.loading.auto import load_pipeline
from minigen.loading.lora_files import merge
from minigen.storage import (
    STORED_LAYERS,
    Offload,
    block_of,
    components,
    compute_device,
    offload,
    peak_memory,
    peak_memory_line,
    restore_weights,
    store_weights,
)
from minigen.models.unet import UNet

from conftest import TINY_UNET

PROMPT = "a red star above a small blue box on grass"
STEPS = 2


def generate(pipe, **options):
    return pipe.generate(PROMPT, steps=STEPS, seed=1, progress=False, **options)


@pytest.fixture(scope="module")
def resident():
    """toy-sd as loaded, and what it draws."""
    pipe = load_pipeline("toy-sd")
    return pipe, generate(pipe)


def stored_layers(pipe):
    return [m for model in components(pipe).values() for m in model.modules() if isinstance(m, STORED_LAYERS)]


def test_block_of():
    assert block_of("output_blocks.3.1.transformer_blocks.0.attn1.to_q") == "output_blocks.3"
    assert block_of("encoder.block.5.layer.1.DenseReluDense.wi_0") == "encoder.block.5"
    assert block_of("encoder.mid.attn_1.q") == "encoder.mid.attn_1"
    assert block_of("img_in") == ""


def test_model_offload_draws_the_same_image_one_component_at_a_time(resident):
    """Level "model": text encoder, UNet (all steps), VAE, each copied once; the device held the largest
    component's weights at most."""
    _, expected = resident
    pipe = load_pipeline("toy-sd")
    sizes = {name: sum(m.weight.nbytes for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d))
             for name, model in components(pipe).items()}  # fmt: skip
    placement = offload(pipe, "model", "cpu")
    assert set(placement.groups) == {"unet", "vae", "text_encoders.0"}
    assert torch.equal(generate(pipe), expected)
    assert placement.loads == 3 and placement.active == "vae"  # the prompt and the negative share one load
    assert placement.bytes_copied == sum(sizes.values())
    assert placement.peak_bytes == max(sizes.values()) == sizes["unet"]
    for layer in stored_layers(pipe):  # between calls the weights are where they were stored
        assert layer.weight.device == placement.storage and not layer.weight.is_pinned()
        assert layer.bias is None or layer.bias.device == placement.device
    placement.release()
    assert placement.on_device == {} and placement.on_device_bytes() == 0


def test_block_offload_draws_the_same_image_one_block_at_a_time(resident):
    """Level "block": every UNet block is copied once per UNet call (2 steps: 2 calls), and the device
    held the largest block's weights at most."""
    _, expected = resident
    pipe = load_pipeline("toy-sd")
    placement = offload(pipe, "block", "cpu")
    unet_blocks = [group for group in placement.groups if group.startswith("unet:")]
    assert "unet:input_blocks.4" in unet_blocks and "unet:middle_block.1" in unet_blocks
    assert torch.equal(generate(pipe), expected)
    group_bytes = {group: sum(m.weight.nbytes for m in layers) for group, layers in placement.groups.items()}
    assert placement.peak_bytes == max(group_bytes.values()) < sum(group_bytes.values()) / 4

    copies_before = placement.loads
    generate(pipe, output="latents")  # no VAE: each text-encoder block twice (prompt, negative), each UNet block once per call
    text_blocks = [group for group in placement.groups if group.startswith("text_encoders.0:")]
    assert placement.loads - copies_before == 2 * len(text_blocks) + STEPS * len(unet_blocks)


@torch.no_grad()
def test_offload_after_store_weights():
    """A weights dtype and offload together: the fp16-stored UNet, offloaded block by block, computes what
    it computes resident. (The pipelines take their compute dtype from `unet.out[2].weight.dtype`, the
    stored fp16, until they ask `compute_dtype(layer)`: then the fp16 inputs fail loudly in F.linear.)"""
    unet = store_weights(UNet(TINY_UNET).eval().requires_grad_(False), torch.float16, torch.float32)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([500.0, 20.0]), torch.randn(2, 77, 32)
    expected = unet(x, t, context)
    placement = Offload("cpu")
    placement.add(unet, "unet", "block")
    assert torch.equal(unet(x, t, context), expected)
    assert {layer.weight.dtype for layer in unet.modules() if isinstance(layer, STORED_LAYERS)} == {torch.float16}
    assert placement.loads == len(placement.groups) == 18


def test_a_weight_changed_on_storage_is_copied_again():
    """A LoRA merged into a stored weight while its group is on the device: the next use copies that
    layer again (its version changed), so the device never computes with the weight before the merge."""
    unet = UNet(TINY_UNET).eval().requires_grad_(False)
    placement = Offload("cpu")
    placement.add(unet, "unet", "model")
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([10.0]), torch.randn(1, 77, 32)
    with torch.no_grad():
        unet(x, t, context)
        layer = unet.get_submodule("input_blocks.1.1.proj_in")
        copied = placement.bytes_copied
        unet(x, t, context)
        assert placement.bytes_copied == copied and placement.loads == 1  # resident: nothing copied again
        weight = layer.weight
        merge(unet, [LowRank("input_blocks.1.1.proj_in", torch.randn(2, *weight.shape[1:]), torch.randn(weight.shape[0], 2, 1, 1))])
        unet(x, t, context)
    assert placement.bytes_copied == copied + layer.weight.nbytes and placement.loads == 1
    assert placement.on_device[layer].version == layer.weight._version


def test_loras_and_residuals_follow_the_compute_device_not_the_storage():
    """On a GPU, `--offload` with `--lora` or `--residuals` crashed: merge added GPU factors to a weight
    kept in CPU storage, and Residuals put its factors beside the stored weight (CPU) while the layer
    computed on the GPU. Here the meta device stands in for the second device: Residuals on a UNet
    offloaded to it keep their factors there, and merge adds factors of one device to a weight of another
    (it raised "Tensor on device meta is not on the expected device cpu")."""
    from minigen.methods.residuals import Residuals

    unet = UNet(TINY_UNET).eval().requires_grad_(False)
    Offload("meta").add(unet, "unet", "block")
    residuals = Residuals(unet, identifier="sks", macro_class="star", generator=torch.Generator().manual_seed(0))
    assert {p.device.type for p in residuals.parameters()} == {"meta"}
    assert {layer.weight.device.type for layer in unet.modules() if isinstance(layer, STORED_LAYERS)} == {"cpu"}
    layer = nn.Linear(4, 3, device="meta")
    merge(layer, [LowRank("", torch.randn(2, 4), torch.randn(3, 2))])
    assert layer.weight.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_lora_merged_into_and_residuals_on_a_unet_offloaded_to_cuda():
    """The GPU case of the test above: the merged weight stays in CPU storage and is the resident merge's;
    residuals computed on the GPU change the output as on the resident UNet."""
    from minigen.methods.residuals import Residuals

    torch.manual_seed(0)
    unet = UNet(TINY_UNET).eval().requires_grad_(False)
    resident = copy.deepcopy(unet).cuda()
    Offload("cuda").add(unet, "unet", "block")
    weight = unet.get_submodule("input_blocks.1.1.proj_in").weight
    delta = LowRank("input_blocks.1.1.proj_in", torch.randn(2, *weight.shape[1:]), torch.randn(weight.shape[0], 2, 1, 1))
    merge(unet, [replace_factors(delta, "cuda")])
    merge(resident, [replace_factors(delta, "cuda")])
    assert weight.device.type == "cpu"
    torch.testing.assert_close(weight.cuda(), resident.get_submodule("input_blocks.1.1.proj_in").weight)
    residuals = Residuals(unet, identifier="sks", macro_class="star", generator=torch.Generator().manual_seed(0))
    x, t, context = torch.randn(2, 4, 16, 16).cuda(), torch.tensor([500.0, 20.0]).cuda(), torch.randn(2, 77, 32).cuda()
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, context, controls=residuals.controls()), resident(x, t, context, controls=residuals.controls()),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


def replace_factors(delta: LowRank, device: str) -> LowRank:
    import dataclasses

    return dataclasses.replace(delta, down=delta.down.to(device), up=delta.up.to(device))


def test_restore_after_offload(resident):
    _, expected = resident
    pipe = load_pipeline("toy-sd")
    offload(pipe, "model", "cpu")
    for model in components(pipe).values():
        restore_weights(model)
    assert stored_layers(pipe) == []
    assert torch.equal(generate(pipe), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("level", ["model", "block"])
def test_offload_to_cuda_keeps_weights_in_pinned_cpu_memory(level):
    """On a GPU: stored weights stay in pinned CPU memory, biases and norms live on the GPU, and the UNet
    computes on the GPU what the resident GPU UNet computes (the same kernels on the same values: identical
    is expected; the tolerance 1e-5 leaves room for a different cuDNN algorithm choice)."""
    torch.manual_seed(0)
    unet = UNet(TINY_UNET).eval().requires_grad_(False)
    resident = copy.deepcopy(unet).cuda()
    placement = Offload("cuda")
    placement.add(unet, "unet", level)
    x, t, context = torch.randn(2, 4, 16, 16).cuda(), torch.tensor([500.0, 20.0]).cuda(), torch.randn(2, 77, 32).cuda()
    with torch.no_grad():
        out = unet(x, t, context)
        torch.testing.assert_close(out, resident(x, t, context), rtol=1e-5, atol=1e-5)
    for layer in unet.modules():
        if isinstance(layer, STORED_LAYERS):
            assert layer.weight.device.type == "cpu" and layer.weight.is_pinned()
            assert compute_device(layer).type == "cuda"
    assert unet.out[0].weight.device.type == "cuda"
    assert all(c.tensor.device.type == "cuda" for c in placement.on_device.values())
    assert placement.loads == (1 if level == "model" else len(placement.groups))


def test_peak_memory_on_the_cpu_is_the_peak_resident_set():
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert peak_memory("cpu") >= block.nbytes
    del block
    line = peak_memory_line("cpu")
    assert line.startswith("peak memory: ") and line.endswith(" GiB (peak resident set size of this process)")
    assert float(line.split()[2]) * 2**30 >= 64 * 2**20
