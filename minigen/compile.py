"""Regional compilation: torch.compile on each repeated block of a denoiser, in place.

    from minigen.compile import compile_blocks, compile_pipeline

    compile_blocks(pipe.unet)        # or pipe.transformer: each block's __call__ is compiled in place
    compile_pipeline(pipe)           # the same for an SD or FLUX pipeline's denoiser
    images = pipe.generate(...)      # the first call compiles (minutes on a CPU), later calls reuse it

A new image size or batch, or a batch of one row (cfg 1), compiles once more (README "Speed and
memory"); an offloaded model is refused (offloaded layers copy their weights in Python).

The repeated blocks are the UNet's transformer blocks (`BasicTransformerBlock`) and res blocks
(`ResBlock`), and FLUX's double and single blocks. Blocks of one class and shape share one compiled
graph, so compiling them costs a few graphs instead of the whole network's one large graph
(diffusers' `compile_repeated_blocks`, PyTorch's "regional compilation" recipe). Parameters stay
where they are: state dicts, LoRA merging and `.to()` work as before.

Controls never enter a compiled graph. A model calls each block through `call_block`: when no
control reaches the block (no attention control at its layers, no `LowRank` on its Linear/Conv
layers), the block runs compiled without controls, and its attention calls are still counted
(`Controls.enter`), so `Site.call` stays right for the blocks that follow; when a control reaches
it, the block runs eagerly with its controls, as if nothing had been compiled. So controls cause
no recompiles, whatever their values or the step, and no graph breaks; the blocks they reach run
at eager speed. LoRA applied as `LowRank` controls reaches every block it targets: merge it into the
weights first (`minigen.loading.lora_files.merge`) to run those blocks compiled. FLUX token groups
that carry their own LoRA (OminiControl) reach every block that LoRA targets.

A UNet compiles with channels-last convolutions (`channels_last=True`, the default: its 4-d weights
in channels-last memory format, so every convolution produces channels-last activations), as
inductor's convolution kernels want them: measured on a 2-core AMD EPYC (AVX2, fp32; scripts/
benchmark.py `unet --compile`, SD1.5 at 256 px, batch 2, one run each, inductor's cache cold), the
compiled UNet took 0.83x the eager speed in the default NCHW layout (its res blocks get slower) and
1.05x with channels-last, level with diffusers' regional compile in the same layout (1.01x and
1.04x its time in two runs). FLUX blocks have no convolutions (the option changes nothing there): compiled 1.09x over
eager, 0.95x the time of diffusers' compiled (`flux --compile`, flux-mid, 1024 + 512 tokens). On a
CPU compilation pays little and costs a minute (SD1.5's 15 graphs, cold); on a GPU it is the
documented win (README "Speed and memory").
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from minigen.controls import Controls


OFFLOAD_AND_COMPILE = (
    "compiling and offloading do not combine: an offloaded layer copies its weight to the device in Python "
    "at each use, which torch cannot compile, so the blocks would break into many small graphs and compile "
    "again at every block (slower than eager). Compile a model that stays on the device, or offload without compiling"
)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of `model` that `compile_blocks` compiles, in module order."""
    from minigen.models.flux import DoubleStreamBlock, SingleStreamBlock
    from minigen.models.unet import BasicTransformerBlock, ResBlock

    kinds = (BasicTransformerBlock, ResBlock, DoubleStreamBlock, SingleStreamBlock)
    return [module for module in model.modules() if isinstance(module, kinds)]


def compile_blocks(model: nn.Module, *, channels_last: bool = True, **options) -> nn.Module:
    """Compile each repeated block of a UNet or FLUX transformer in place; returns `model`.

    `options` go to `torch.compile` as they are (mode="max-autotune", backend="eager", dynamic=...).
    `channels_last` (default) also puts the model's 4-d weights in channels-last memory format (a
    UNet's convolutions; FLUX has none), which makes every convolution produce channels-last activations.
    """
    from minigen.storage import STORED_LAYERS

    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to compile; give a minigen UNet or Flux")
    if any(isinstance(layer, STORED_LAYERS) and layer.offload is not None for layer in model.modules()):
        raise ValueError(OFFLOAD_AND_COMPILE)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    # A graph holds its weights' shapes fixed, so each distinct block shape (SD1.5: 12 res blocks and
    # 3 transformer blocks) takes its own graphs, and torch counts its limit (default 8) per block class,
    # one code object: past it, it quietly runs the rest eagerly. A shape takes a graph of static sizes,
    # then more as sizes change (torch makes a size dynamic once it has seen it change), one more for
    # each batch of one row (torch specialises size 1: cfg 1), and FLUX's first double block another of
    # each (its inputs are views): a dozen after six calls of new batches and sizes. 64 per shape of a
    # class leaves room for a long session; each graph is compiled once, where it is needed.
    shapes = {(type(block), tuple(p.shape for p in block.parameters())) for block in blocks}
    options.setdefault("recompile_limit", 64 * max(Counter(kind for kind, _ in shapes).values()))
    for block in blocks:
        block.compile(**options)  # nn.Module.compile: this block's __call__, compiled; block.forward stays eager
    return model


def compile_pipeline(pipe, **options):
    """`compile_blocks(denoiser, **options)` on an SD pipeline's UNet or a FLUX pipeline's transformer; returns `pipe`."""
    compile_blocks(pipe.transformer if hasattr(pipe, "transformer") else pipe.unet, **options)
    return pipe


# ---------------------------------------------------------------- calling a block with controls


def reaches(controls: Controls, block: nn.Module) -> bool:
    """Whether any of `controls` applies inside `block`: an attention control at one of its layers, or
    a low-rank residual on one of its Linear/Conv2d layers."""
    from minigen.models.layers import Conv2d, Linear

    if any(controls.at(layer, kind) is not None for layer, kind in block.sites):  # (layer id, kind) in the order it runs them
        return True
    if not controls.low_rank:
        return False
    paths = {module.path for module in block.modules() if isinstance(module, (Linear, Conv2d))}
    return any(delta.target in paths for delta in controls.low_rank)


def call_block(block: nn.Module, *args, controls: Controls | None):
    """`block(*args)` (compiled, if `compile_blocks` compiled it) when no control reaches the block,
    its attention calls counted in `controls`; else `block.forward(*args, controls)`, eagerly.

    Without compilation both are the same computation: a block no control reaches computes exactly
    what it computes with the controls."""
    if controls is not None and reaches(controls, block):
        return block.forward(*args, controls)
    if controls is not None:
        for layer, kind in block.sites:
            controls.enter(layer, kind)
    return block(*args)
