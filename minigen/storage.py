"""Running models larger than memory: weights kept in a small dtype, offload to a GPU, peak memory.

Weights dtype. A checkpoint's weights are usually fp16 or bf16 (FLUX files also fp8), but the model
may have to compute in fp32 (CPUs without fast half precision, or for accuracy). Casting the
whole model doubles its memory; `store_weights` instead keeps every Linear/Conv2d weight in the
storage dtype and casts it to the compute dtype inside the layer, once per call, so only one
layer's weight at a time exists in the compute dtype:

    unet = store_weights(unet, torch.float16, compute_dtype=torch.float32)   # 1.7 GB instead of 3.4 GB

It is model surgery, done once and visible: each nn.Linear / nn.Conv2d is replaced (by name, in its
parent) by a `StoredLinear` / `StoredConv2d` with the same path, shapes and `weight` parameter, now
in the storage dtype. Biases, norms and embeddings are small and are kept in the compute dtype.
`restore_weights` puts plain layers back, their weights cast to the compute dtype.

Who reads `layer.weight` sees the stored tensor: LoRA `merge` adds into it in place (rounded to the
storage dtype), shape checks are unchanged. Who takes the *compute* dtype or device from a weight
must ask `compute_dtype(layer)` / `compute_device(layer)` instead (the UNet and FLUX cast their
inputs to it); an input in the wrong dtype for a single layer fails in F.linear / F.conv2d with a
dtype mismatch, never silently.

Offload. `offload(pipe, level, device)` keeps every Linear/Conv2d weight in CPU memory (pinned when
the device is a CUDA GPU, so copies can run asynchronously) and copies it to `device` when it is
used; everything else (biases, norms, embeddings) lives on the device: 0.05% of the SD1.5 UNet's
parameters, 0.03% of FLUX's transformer, but 31% of CLIP-L (its token embedding). Which weights sit on the device at once is the `level`:

    "model"  a whole component (a text encoder, the denoiser, the VAE), copied on the first use of
             any of its layers and dropped when another component is used;
    "block"  one block (`input_blocks.4`, `double_blocks.7`, `encoder.layers.5`, see `block_of`),
             copied before its first layer runs and dropped when the next block starts.

Both levels are the same mechanism, an `Offload` object that the stored layers ask for their
weight on the device (`Offload.weight`); a block is a group of layers that travel together.
"Moving back" costs nothing: the stored copy never changed, so the device copy is just dropped.

Peak memory. `peak_memory(device)` and `peak_memory_line(device)` report the peak so far: CUDA's
allocator peak, or the process's peak resident set size on the CPU.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minigen.compile import OFFLOAD_AND_COMPILE, repeated_blocks
from minigen.controls import Controls
from minigen.models.layers import Conv2d, Linear

# --weights-dtype names; fp8 (e4m3fn, FLUX's fp8 files) where this torch has it
WEIGHTS_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
if hasattr(torch, "float8_e4m3fn"):
    WEIGHTS_DTYPES["fp8"] = torch.float8_e4m3fn

PLAIN_LAYERS = (nn.Linear, Linear, nn.Conv2d, Conv2d)  # the exact types that are converted (not their subclasses)


# ---------------------------------------------------------------- the stored layers


class _FollowsCasts:
    """A stored layer's compute dtype follows `.to(dtype)`, `.half()`, `.float()` on its model, which cast
    its weight and bias as any parameters: the layer then computes in the new dtype (it kept the old one
    and failed in F.linear with a dtype mismatch)."""

    def _apply(self, fn, recurse=True):
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype  # what the cast does to a tensor of it
        return super()._apply(fn, recurse)


class StoredLinear(_FollowsCasts, Linear):
    """A Linear whose weight is stored in one dtype (and device) and used in another.

    weight: [out, in] in the storage dtype; bias: in the compute dtype, on the compute device.
    `compute_dtype`: the dtype of inputs, outputs and the matmul. `offload`: None (the weight is on
    the compute device already), or the `Offload` that hands out its copy on the device.
    """

    compute_dtype: torch.dtype
    offload: Offload | None = None
    block: str = ""  # the group of layers this one travels with (offload)
    plain_class: type = Linear  # the class `restore_weights` gives back

    def forward(self, x: Tensor, controls: Controls | None = None) -> Tensor:
        y = F.linear(x, compute_weight(self), self.bias)
        return y if controls is None else controls.add_low_rank(self.path, x, y, self)


class StoredConv2d(_FollowsCasts, Conv2d):
    """A Conv2d whose weight is stored in one dtype (and device) and used in another (see StoredLinear)."""

    compute_dtype: torch.dtype
    offload: Offload | None = None
    block: str = ""
    plain_class: type = Conv2d

    def forward(self, x: Tensor, controls: Controls | None = None) -> Tensor:
        y = self._conv_forward(x, compute_weight(self), self.bias)
        return y if controls is None else controls.add_low_rank(self.path, x, y, self)


STORED_LAYERS = (StoredLinear, StoredConv2d)


def compute_weight(layer: StoredLinear | StoredConv2d) -> Tensor:
    """The layer's weight on its compute device, in its compute dtype: the one cast per call."""
    weight = layer.weight if layer.offload is None else layer.offload.weight(layer)
    return weight.to(layer.compute_dtype)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype `module` computes in, what its inputs must have: a Linear/Conv2d's (stored: its
    `compute_dtype`; plain: its weight's), or for a whole model its first Linear/Conv2d's."""
    layer = _first_layer(module)
    return layer.compute_dtype if isinstance(layer, STORED_LAYERS) else layer.weight.dtype


def compute_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: an offloaded layer's offload device (its weight stays in storage),
    else the weight's device; for a whole model, its first Linear/Conv2d's."""
    layer = _first_layer(module)
    if isinstance(layer, STORED_LAYERS) and layer.offload is not None:
        return layer.offload.device
    return layer.weight.device


def to_compute(tensor: Tensor, module: nn.Module) -> Tensor:
    """`tensor` on `module`'s compute device, in its compute dtype (e.g. LoRA factors for a stored layer)."""
    return tensor.to(compute_device(module), compute_dtype(module))


def _first_layer(module: nn.Module) -> nn.Module:
    for layer in module.modules():  # the module itself first
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            return layer
    raise ValueError(f"{type(module).__name__} has no Linear or Conv2d layer to tell its compute dtype and device")


def _stored_like(layer: nn.Module, weight: Tensor, compute: torch.dtype, device: torch.device) -> StoredLinear | StoredConv2d:
    """A stored layer with `layer`'s shapes, path and hyper-parameters, holding `weight` as it is and
    `layer`'s bias cast to `compute` on `device`. Built on the meta device: nothing is allocated twice."""
    bias = layer.bias is not None
    with torch.device("meta"):
        if isinstance(layer, nn.Linear):
            stored = StoredLinear(layer.in_features, layer.out_features, bias=bias)
        else:
            stored = StoredConv2d(
                layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                dilation=layer.dilation, groups=layer.groups, bias=bias, padding_mode=layer.padding_mode,
            )  # fmt: skip
    stored.weight = nn.Parameter(weight, requires_grad=False)  # stored weights are frozen (inference, merges)
    if bias:
        stored.bias = nn.Parameter(layer.bias.detach().to(device, compute), requires_grad=layer.bias.requires_grad)
    stored.path = layer.path if isinstance(layer, (Linear, Conv2d)) else ""
    stored.compute_dtype = compute
    stored.plain_class = type(layer)
    stored.train(layer.training)
    return stored


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` where `model.get_submodule(path)` is (the same name in the same parent)."""
    if not path:
        raise ValueError("store_weights / offload take a model that contains its layers, not a single layer")
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


def _move_other_tensors(model: nn.Module, dtype: torch.dtype | None, device: torch.device | None) -> None:
    """Cast (floating ones to `dtype`) and move every parameter and buffer that is not a stored weight.
    A tensor shared by several modules (tied embeddings) stays shared."""
    done: dict[int, tuple[Tensor, Tensor]] = {}  # id -> (the original, kept alive so ids stay unique; its replacement)
    for module in model.modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False)] + list(module.named_buffers(recurse=False))
        for name, tensor in own:
            if isinstance(module, STORED_LAYERS) and name == "weight":
                continue
            if id(tensor) not in done:
                moved = tensor.detach().to(device=device, dtype=dtype if tensor.is_floating_point() and dtype else None)
                if isinstance(tensor, nn.Parameter):
                    moved = nn.Parameter(moved, tensor.requires_grad)
                done[id(tensor)] = (tensor, moved)
            setattr(module, name, done[id(tensor)][1])  # setattr keeps a buffer's persistence


# ---------------------------------------------------------------- weights dtype


def store_weights(model: nn.Module, dtype: torch.dtype, compute_dtype: torch.dtype, *, keep: Iterable[str] = ()) -> nn.Module:
    """Keep `model`'s Linear/Conv2d weights in `dtype`, computing in `compute_dtype`; returns `model`.

    Every nn.Linear / nn.Conv2d (minigen's and plain ones, not other subclasses) becomes a
    StoredLinear / StoredConv2d holding its weight in `dtype` (no copy when it is in `dtype` already,
    e.g. fp16 tensors of an fp16 file); every other floating-point parameter and buffer (biases, norms,
    embeddings) is cast to `compute_dtype`. Layers whose path ends with a name in `keep` stay plain,
    in `compute_dtype` (transformers' T5 casts its activations to `wo.weight.dtype`: pass keep=("wo",)).

    fp8 (e4m3fn) holds magnitudes up to 448 and torch saturates beyond, fp16 up to 65504: a weight with
    larger entries is refused (a ValueError naming the layer) rather than clipped or made infinite.
    """
    if not (dtype.is_floating_point and compute_dtype.is_floating_point):
        raise ValueError(f"store_weights: dtypes must be floating point, got {dtype} and {compute_dtype}")
    if stored := [path for path, layer in model.named_modules() if isinstance(layer, STORED_LAYERS)]:
        raise ValueError(f"store_weights: {stored[0]!r} and {len(stored) - 1} more layers are stored or offloaded already; "
                         "restore_weights(model) first, then store them in the new dtype (and offload after storing)")
    keep = tuple(keep)
    for path in [path for path, layer in model.named_modules() if type(layer) in PLAIN_LAYERS and path.rpartition(".")[2] not in keep]:
        layer = model.get_submodule(path)  # by path, not from a list of layers: each replaced layer is freed at once
        weight = in_storage_dtype(f"{path}.weight", layer.weight.detach(), dtype)
        _replace(model, path, _stored_like(layer, weight, compute_dtype, layer.weight.device))
    _move_other_tensors(model, compute_dtype, None)
    return model


def in_storage_dtype(name: str, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """`weight` in the storage `dtype` (no copy when it is in it already). A finite entry beyond the dtype's
    range would be clipped (fp8, which saturates at 448) or become infinite (fp16 beyond 65504): such a weight
    is refused, naming it and the dtypes that hold it."""
    stored = weight.to(dtype)
    beyond = weight.abs().max() > torch.finfo(dtype).max if dtype.itemsize == 1 < weight.dtype.itemsize else (
        stored is not weight and not bool(torch.isfinite(stored).all()) and bool(torch.isfinite(weight).all()))
    if beyond:
        peak = weight.abs().max().item()
        wider = [label for label, d in (("fp16", torch.float16), ("bf16", torch.bfloat16)) if torch.finfo(d).max >= peak] or ["a wider dtype"]
        raise ValueError(f"{name} has entries up to {peak:.4g}, beyond the largest {dtype} ({torch.finfo(dtype).max:g}): keep this "
                         f"model's weights in {' or '.join(wider)}")
    return stored


def restore_weights(model: nn.Module) -> nn.Module:
    """Undo `store_weights` (and `offload`): plain layers again, each weight cast to its compute dtype
    and moved to its compute device. Returns `model`."""
    for path in [path for path, layer in model.named_modules() if isinstance(layer, STORED_LAYERS)]:
        layer = model.get_submodule(path)
        with torch.device("meta"):  # the plain layer's own parameters are replaced at once
            if issubclass(layer.plain_class, nn.Linear):
                plain = layer.plain_class(layer.in_features, layer.out_features, bias=layer.bias is not None)
            else:
                plain = layer.plain_class(
                    layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                    dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None, padding_mode=layer.padding_mode,
                )  # fmt: skip
        plain.weight = nn.Parameter(layer.weight.detach().to(compute_device(layer), layer.compute_dtype), requires_grad=False)
        plain.bias = layer.bias
        if isinstance(plain, (Linear, Conv2d)):
            plain.path = layer.path
        plain.train(layer.training)
        _replace(model, path, plain)
    return model


# ---------------------------------------------------------------- offload


def block_of(path: str) -> str:
    """The block a layer travels with at level "block": its path up to its first number
    (`output_blocks.3.1.proj_in` -> `output_blocks.3`, `encoder.block.5.layer.1.DenseReluDense.wi_0`
    -> `encoder.block.5`), or its parent's path for a layer outside numbered containers
    (`encoder.mid.attn_1.q` -> `encoder.mid.attn_1`; `img_in` -> "")."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


@dataclass
class _DeviceCopy:
    source: Tensor  # the stored weight it copies
    version: int  # source._version when copied: an in-place change since (a LoRA merge) makes it stale
    tensor: Tensor  # the copy on the device, in the storage dtype


class Offload:
    """Weights stored on `storage` (pinned CPU memory for a CUDA device), used on `device`.

    The stored layers added with `add` ask `weight(layer)` for their weight on the device. Layers are
    grouped (`layer.block`): the first request of a group other than the active one drops the
    active group's device copies and copies every weight of the new group, so the device holds the
    weights of one group at a time. `loads` and `bytes_copied` count the copies made, `peak_bytes`
    is the most weight bytes held on the device at once.
    """

    def __init__(self, device: str | torch.device, storage: str | torch.device = "cpu", pin: bool | None = None):
        self.device = torch.device(device)
        self.storage = torch.device(storage)
        # pinned (page-locked) host memory lets the copy to a CUDA device run asynchronously (non_blocking)
        self.pin = (self.storage.type == "cpu" and self.device.type == "cuda") if pin is None else pin
        self.groups: dict[str, list[StoredLinear | StoredConv2d]] = {}
        self.active: str | None = None
        self.on_device: dict[nn.Module, _DeviceCopy] = {}
        self.loads = 0
        self.bytes_copied = 0
        self.peak_bytes = 0

    def add(self, model: nn.Module, name: str, level: Literal["model", "block"]) -> nn.Module:
        """Put `model`'s Linear/Conv2d weights in storage (stored layers, their dtypes kept; layers
        already stored keep their storage dtype) and everything else on the device. Groups are named
        `name` (level "model") or `name:block` (level "block", see `block_of`). Returns `model`."""
        if level not in ("model", "block"):
            raise ValueError(f"offload level must be 'model' or 'block', got {level!r}")
        if any(getattr(block, "_compiled_call_impl", None) is not None for block in repeated_blocks(model)):  # nn.Module.compile's
            raise ValueError(f"offload: {name} has compiled blocks; {OFFLOAD_AND_COMPILE}")
        for path in [path for path, layer in model.named_modules() if type(layer) in PLAIN_LAYERS or isinstance(layer, STORED_LAYERS)]:
            layer = model.get_submodule(path)
            if type(layer) in PLAIN_LAYERS:
                weight = layer.weight.detach()
                layer = _stored_like(layer, weight, weight.dtype, self.device)
                _replace(model, path, layer)
            if layer.offload is not None:
                raise ValueError(f"offload: {name}.{path} is offloaded already; restore_weights(model) first")
            stored = layer.weight.detach().to(self.storage)
            layer.weight = nn.Parameter(stored.pin_memory() if self.pin else stored, requires_grad=False)
            layer.offload = self
            layer.block = name if level == "model" else f"{name}:{block_of(path)}"
            self.groups.setdefault(layer.block, []).append(layer)
        _move_other_tensors(model, None, self.device)
        return model

    def weight(self, layer: StoredLinear | StoredConv2d) -> Tensor:
        """`layer`'s weight on the device (storage dtype), copying its group there first if needed."""
        if layer.block != self.active:
            self.load(layer.block)
        copy = self.on_device[layer]
        if copy.source is not layer.weight or copy.version != layer.weight._version:  # changed since (merged)
            copy = self.on_device[layer] = self._copy(layer)
        return copy.tensor

    def load(self, group: str) -> None:
        """Drop the device copies of the active group, then copy every weight of `group` to the device."""
        self.on_device = {}  # the last references: the allocator may reuse that memory for the new group
        for layer in self.groups[group]:
            self.on_device[layer] = self._copy(layer)
        self.active = group
        self.loads += 1
        self.peak_bytes = max(self.peak_bytes, self.on_device_bytes())

    def _copy(self, layer: StoredLinear | StoredConv2d) -> _DeviceCopy:
        self.bytes_copied += layer.weight.nbytes
        # from pinned memory, non_blocking enqueues the copy and returns: the CPU goes on to queue the
        # kernels that use it, which the GPU runs after the copy (same stream)
        tensor = layer.weight.detach().to(self.device, non_blocking=self.pin)
        return _DeviceCopy(layer.weight, layer.weight._version, tensor)

    def release(self) -> None:
        """Drop every device copy (e.g. after a generation, to give the memory to something else)."""
        self.on_device = {}
        self.active = None

    def on_device_bytes(self) -> int:
        """Bytes of weights copied to the device right now."""
        return sum(copy.tensor.nbytes for copy in self.on_device.values())


def components(pipe) -> dict[str, nn.Module]:
    """A pipeline's models by field name (`unet`, `vae`, `text_encoders.0`, `transformer`, `t5`, ...):
    every nn.Module field of the pipeline dataclass, and the modules in its list fields."""
    found = {}
    for field in dataclasses.fields(pipe):
        value = getattr(pipe, field.name)
        if isinstance(value, nn.Module):
            found[field.name] = value
        elif isinstance(value, (list, tuple)):
            found.update({f"{field.name}.{i}": v for i, v in enumerate(value) if isinstance(v, nn.Module)})
    return found


def offload(
    pipe,
    level: Literal["model", "block"] = "model",
    device: str | torch.device = "cuda",
    *,
    storage: str | torch.device = "cpu",
    pin: bool | None = None,
) -> Offload:
    """Offload every model of `pipe` (StableDiffusion, FluxPipeline): weights in `storage`, used on
    `device` one component (level "model") or one block (level "block") at a time. Works on a pipeline
    loaded on any device (best: on the CPU, so the GPU never holds it all); combine with a weights
    dtype by calling `store_weights` on the models first. `pin` (default: when `device` is CUDA) keeps
    the stored weights in page-locked memory, which the asynchronous copies need; it cannot be swapped
    out, so on a machine with little RAM pass pin=False (copies then wait). Returns the `Offload` (its
    counters, `release()`); `restore_weights(model)` on each component undoes it."""
    placement = Offload(device, storage, pin)
    for name, model in components(pipe).items():
        placement.add(model, name, level)
    return placement


# ---------------------------------------------------------------- peak memory


def peak_memory(device: str | torch.device) -> int:
    """Peak bytes so far: on CUDA, the most memory torch's allocator held for tensors on `device`
    (`torch.cuda.max_memory_allocated`; reset with `torch.cuda.reset_peak_memory_stats`); elsewhere the
    peak resident set size of this process (`getrusage`: weights read, activations, libraries)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def peak_memory_line(device: str | torch.device) -> str:
    """One line for `--verbose`, e.g. "peak memory: 2.41 GiB (CUDA tensors on cuda:0)"."""
    device = torch.device(device)
    what = f"CUDA tensors on {device}" if device.type == "cuda" else "peak resident set size of this process"
    return f"peak memory: {peak_memory(device) / 2**30:.2f} GiB ({what})"
