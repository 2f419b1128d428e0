"""Weights kept in a storage dtype (fp16, bf16, fp8) and cast per layer to the compute dtype (minigen/storage.py).

The reference of a stored model is the plain fp32 model holding the same rounded weights (every
Linear/Conv2d weight passed through the storage dtype and back). Both then run the same fp32
operations on the same values, so outputs must be *identical*: tolerance 0 (torch.equal), measured
0 on every model here. How far the rounding itself moves the output (against the unrounded fp32
model) is the storage dtype's business, not the mechanism's; on the tiny SD UNet it is ≈9e-4 (fp16),
≈7e-3 (bf16), ≈0.13 (fp8) in max abs, outputs of std ≈ 0.3-0.5 (full-size SD1.5 UNet:
`benchmark.py weights-dtype`).
"""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from minigen.controls import Controls, LowRank
from minigen.loading.lora_files import merge, unmerge
from minigen.storage import (
    PLAIN_LAYERS,
    WEIGHTS_DTYPES,
    Offload,
    StoredConv2d,
    StoredLinear,
    compute_device,
    compute_dtype,
    restore_weights,
    store_weights,
    to_compute,
)
from minigen.models.flux import Flux
from minigen.models.flux_tokens import image_ids, text_ids
from minigen.models.layers import Conv2d, Linear
from minigen.models.unet import UNet
from minigen.models.vae import AutoencoderKL
from minigen.text.t5 import build_t5_encoder

from conftest import TINY_FLUX, TINY_T5, TINY_UNET, TINY_VAE, tiny_clip

STORAGE = [WEIGHTS_DTYPES[name] for name in ("fp16", "bf16", "fp8") if name in WEIGHTS_DTYPES]


def rounded(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `model` (fp32) whose Linear/Conv2d weights went through `dtype` and back (every
    nn.Linear/nn.Conv2d, by isinstance: independent of the storage's own list of layer types)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.copy_(module.weight.to(dtype).float())
    return model


def layers(model: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(TINY_UNET).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([500.0, 20.0]), torch.randn(2, 77, 32, generator=g)


@pytest.mark.parametrize("dtype", STORAGE, ids=str)
@torch.no_grad()
def test_stored_unet_equals_the_fp32_unet_with_rounded_weights(unet, unet_inputs, dtype):
    stored = store_weights(copy.deepcopy(unet), dtype, torch.float32)
    out = stored(*unet_inputs)
    assert out.dtype == torch.float32 and out.std() > 0.1
    assert torch.equal(out, rounded(unet, dtype)(*unet_inputs))
    assert not torch.equal(out, unet(*unet_inputs))  # the rounding is real: this is not the fp32 model


def test_what_is_stored_and_what_stays_in_the_compute_dtype(unet):
    stored = store_weights(copy.deepcopy(unet), torch.float16, torch.float32)
    before, after = layers(unet), layers(stored)
    assert before.keys() == after.keys()  # same paths: LoRA targets, controls and state-dict keys unchanged
    for path, layer in after.items():
        assert type(layer) is (StoredLinear if isinstance(before[path], nn.Linear) else StoredConv2d)
        assert isinstance(layer, (Linear, Conv2d)) and layer.path == before[path].path == path
        assert layer.weight.dtype == torch.float16 and layer.weight.shape == before[path].weight.shape
        assert layer.bias is None or layer.bias.dtype == torch.float32
        assert compute_dtype(layer) == torch.float32 and compute_device(layer) == torch.device("cpu")
    assert stored.out[0].weight.dtype == torch.float32  # a GroupNorm
    assert stored.state_dict().keys() == unet.state_dict().keys()
    weights = sum(m.weight.numel() for m in before.values())
    saved = sum(p.nbytes for p in unet.parameters()) - sum(p.nbytes for p in stored.parameters())
    assert saved == 2 * weights  # 4 -> 2 bytes per Linear/Conv2d weight entry, nothing else changed
    assert compute_dtype(unet.out[2]) == torch.float32  # plain layers: their weight's dtype
    assert compute_dtype(stored) == torch.float32 and compute_device(stored) == torch.device("cpu")  # whole models
    factor = to_compute(torch.ones(2, 32, dtype=torch.float16), stored.get_submodule("input_blocks.1.1.proj_in"))
    assert factor.dtype == torch.float32


def test_weights_already_in_the_storage_dtype_are_not_copied(unet):
    """An fp16 file's tensors (here: a model cast to fp16) stay the very same storage."""
    half = copy.deepcopy(unet).half()
    pointers = {path: m.weight.data_ptr() for path, m in layers(half).items()}
    store_weights(half, torch.float16, torch.float32)
    assert {path: m.weight.data_ptr() for path, m in layers(half).items()} == pointers
    assert half.out[0].weight.dtype == torch.float32  # norms were cast up to the compute dtype


@torch.no_grad()
def test_restore_gives_back_plain_layers_in_the_compute_dtype(unet, unet_inputs):
    stored = store_weights(copy.deepcopy(unet), torch.bfloat16, torch.float32)
    expected = stored(*unet_inputs)
    restored = restore_weights(stored)
    for path, layer in layers(restored).items():
        assert type(layer) is type(layers(unet)[path]) and layer.weight.dtype == torch.float32
    assert torch.equal(restored(*unet_inputs), expected)


@torch.no_grad()
def test_controls_low_rank_on_stored_layers(unet, unet_inputs):
    """Residuals (`Controls(low_rank=...)`) run on stored layers with exactly the reference's result;
    factors in another dtype (the storage dtype here) are cast to the compute dtype where they act."""
    targets = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.0.in_layers.2"]

    def deltas(dtype):
        g = torch.Generator().manual_seed(2)
        out = []
        for path in targets:
            weight = unet.get_submodule(path).weight
            down = torch.randn(2, *weight.shape[1:], generator=g) * 0.1
            up = torch.randn(weight.shape[0], 2, *([1, 1] if weight.dim() == 4 else []), generator=g) * 0.1
            out.append(LowRank(path, down.to(dtype), up.to(dtype)))
        return out

    stored = store_weights(copy.deepcopy(unet), torch.float16, torch.float32)
    ours = stored(*unet_inputs, controls=Controls(low_rank=deltas(torch.float32)))
    reference = rounded(unet, torch.float16)(*unet_inputs, controls=Controls(low_rank=deltas(torch.float32)))
    assert torch.equal(ours, reference)
    assert not torch.equal(ours, stored(*unet_inputs))
    halves = deltas(torch.float16)
    cast = [LowRank(d.target, d.down.float(), d.up.float()) for d in halves]
    assert torch.equal(stored(*unet_inputs, controls=Controls(low_rank=halves)), stored(*unet_inputs, controls=Controls(low_rank=cast)))


@torch.no_grad()
def test_merge_and_unmerge_into_stored_weights(unet, unet_inputs):
    """`merge` adds ΔW into the stored fp16 weight, rounding W + ΔW once to fp16: the merged stored
    model equals the fp32 model holding those fp16 weights exactly; `unmerge` gives each weight back
    within its two fp16 roundings, of W + ΔW and of the difference: |W' - W| <= 2^-11 (|W| + |W + ΔW|)
    (measured: most entries exact, the largest error one fp16 ulp of W + ΔW)."""
    path = "input_blocks.1.1.proj_in"
    weight = unet.get_submodule(path).weight
    g = torch.Generator().manual_seed(3)
    delta = LowRank(path, torch.randn(2, *weight.shape[1:], generator=g) * 0.1, torch.randn(weight.shape[0], 2, 1, 1, generator=g) * 0.1)

    stored = store_weights(copy.deepcopy(unet), torch.float16, torch.float32)
    original = stored.get_submodule(path).weight.clone()
    merge(stored, [delta])
    merged = stored.get_submodule(path).weight
    assert merged.dtype == torch.float16
    torch.testing.assert_close(merged, (original.float() + delta.weight()).half(), rtol=0, atol=0)
    reference = rounded(unet, torch.float16)
    reference.get_submodule(path).weight.copy_(merged.float())
    assert torch.equal(stored(*unet_inputs), reference(*unet_inputs))

    merged = merged.float().clone()
    unmerge(stored, [delta])
    back = stored.get_submodule(path).weight.float()
    assert ((back - original.float()).abs() <= (original.float().abs() + merged.abs()) * 2**-11 + 2**-24).all()
    assert (back == original.float()).float().mean() > 0.5


def test_weights_beyond_the_storage_range_are_refused(unet):
    """fp8 would clip an entry of 500, fp16 overflow one of 1e6 to Inf (read from a file with weights_dtype,
    that was called a damaged file): both refused by name, when stored and when read into storage."""
    from minigen.loading.coverage import build_exact

    for dtype, entry, message in [(torch.float16, 1e6, r"up to 1e\+06, beyond the largest torch\.float16 \(65504\): .* in bf16")] + (
        [(torch.float8_e4m3fn, 500.0, r"up to 500, beyond the largest torch\.float8_e4m3fn \(448\)")] if "fp8" in WEIGHTS_DTYPES else []
    ):
        model = copy.deepcopy(unet)
        with torch.no_grad():
            model.get_submodule("out.2").weight[0, 0, 0, 0] = entry
        with pytest.raises(ValueError, match=r"out\.2\.weight has entries " + message):
            store_weights(model, dtype, torch.float32)
        with pytest.raises(ValueError, match=r"out\.2\.weight has entries " + message):
            build_exact(UNet, TINY_UNET, model.state_dict(), dtype=torch.float32, weights_dtype=dtype)


@pytest.mark.parametrize("dtype", STORAGE, ids=str)
@torch.no_grad()
def test_vae_flux_and_clip_stored(dtype):
    """The same identity on the VAE (plain nn.Conv2d), FLUX (minigen Linear) and a transformers CLIP
    (nn.Linear); every Linear/Conv2d weight is held in `dtype`, and the outputs differ from the
    unrounded fp32 model's (so the rounding happened)."""
    torch.manual_seed(0)
    vae = AutoencoderKL(TINY_VAE).eval()
    images = torch.rand(1, 3, 32, 48) * 2 - 1
    stored = store_weights(copy.deepcopy(vae), dtype, torch.float32)
    assert all(m.weight.dtype == dtype for m in layers(stored).values())
    reference = rounded(vae, dtype)
    latents = stored.encode(images)
    assert torch.equal(latents, reference.encode(images)) and not torch.equal(latents, vae.encode(images))
    assert torch.equal(stored.decode(latents), reference.decode(latents))

    flux = Flux(TINY_FLUX).eval()
    inputs = (torch.randn(1, 16, 64), image_ids(4, 4), torch.randn(1, 8, 32), text_ids(8), torch.tensor([0.5]), torch.randn(1, 24), torch.tensor([3.5]))
    stored = store_weights(copy.deepcopy(flux), dtype, torch.float32)
    assert all(m.weight.dtype == dtype for m in layers(stored).values())
    out = stored(*inputs)
    assert torch.equal(out, rounded(flux, dtype)(*inputs)) and not torch.equal(out, flux(*inputs))

    clip = tiny_clip(projection=True)
    ids = torch.randint(0, 49406, (2, 77))
    stored = store_weights(copy.deepcopy(clip), dtype, torch.float32)
    assert all(m.weight.dtype == dtype for m in layers(stored).values())
    ours, theirs = stored(ids), rounded(clip, dtype)(ids)
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state) and torch.equal(ours.text_embeds, theirs.text_embeds)
    assert not torch.equal(ours.last_hidden_state, clip(ids).last_hidden_state)


@torch.no_grad()
def test_t5_needs_its_wo_layers_kept():
    """transformers' T5 casts the MLP's input to `wo.weight.dtype`: with `wo` stored in fp16 that input
    would be fp16 while the layer computes in fp32, and the call fails (loudly). keep=("wo",) leaves the
    `wo` layers plain, in the compute dtype, and the rest stored: identical to the rounded reference."""
    t5 = build_t5_encoder(TINY_T5).eval()
    ids = torch.randint(0, 32000, (1, 12))
    with pytest.raises(RuntimeError, match="(?i)type"):
        store_weights(copy.deepcopy(t5), torch.float16, torch.float32)(ids)

    stored = store_weights(copy.deepcopy(t5), torch.float16, torch.float32, keep=("wo",))
    assert stored.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert stored.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.dtype == torch.float16
    reference = copy.deepcopy(t5)
    for path, module in reference.named_modules():
        if type(module) in PLAIN_LAYERS and not path.endswith(".wo"):
            module.weight.copy_(module.weight.half().float())
    assert torch.equal(stored(ids).last_hidden_state, reference(ids).last_hidden_state)
    assert stored.shared.weight is stored.encoder.embed_tokens.weight  # tied embeddings stay tied


@torch.no_grad()
def test_models_take_inputs_of_another_float_dtype_and_answer_in_it(unet, unet_inputs):
    """A bf16 UNet (or FLUX) given fp32 latents (what vae.encode_images returns; Concept Conductor's
    inversion passed them on) was a dtype mismatch in the first conv: the inputs are cast to the compute
    dtype, and the prediction comes back in the latents' dtype. Reference: the same call with the inputs
    cast by hand (exact)."""
    half = copy.deepcopy(unet).to(torch.bfloat16)
    x, t, context = unet_inputs
    out = half(x, t, context)
    assert out.dtype == torch.float32
    assert torch.equal(out, half(x.bfloat16(), t, context.bfloat16()).float())
    stored = store_weights(copy.deepcopy(unet), torch.float16, torch.float32)  # computes in fp32: fp16 latents are cast up
    assert torch.equal(stored(x.half(), t, context.half()), stored(x.half().float(), t, context.half().float()).half())

    torch.manual_seed(0)
    flux = Flux(TINY_FLUX).eval().to(torch.bfloat16)
    img, txt, y = torch.randn(1, 16, 64), torch.randn(1, 8, 32), torch.randn(1, 24)
    common = dict(img_ids=image_ids(4, 4), txt_ids=text_ids(8), timesteps=torch.tensor([0.5]).bfloat16(), guidance=torch.tensor([3.5]))
    v = flux(img=img, txt=txt, y=y, **common)
    assert v.dtype == torch.float32 and torch.equal(v, flux(img=img.bfloat16(), txt=txt.bfloat16(), y=y.bfloat16(), **common).float())


@torch.no_grad()
def test_extra_token_projections_run_in_their_own_dtype(unet, unet_inputs):
    """An IP-Adapter's projections in fp16 beside a UNet that computes in fp32 (`--weights-dtype fp16`
    kept them in the storage dtype), or fp32 projections beside a bf16 UNet, were a dtype mismatch: each
    projection runs in its own dtype and its keys and values join the attention in the UNet's. Reference:
    fp32 projections holding the fp16-rounded weights (1e-3: the fp16 matmul's rounding, outputs std ~0.3)."""
    from minigen.controls import ExtraTokens

    x, t, context = unet_inputs
    layer = "up.1.0.0"
    torch.manual_seed(3)
    projections = (nn.Linear(8, 32, bias=False), nn.Linear(8, 32, bias=False))
    tokens = torch.randn(1, 4, 8)
    as_fp16 = {layer: tuple(copy.deepcopy(p).half() for p in projections)}
    as_rounded = {layer: tuple(rounded(p, torch.float16) for p in projections)}
    out = unet(x, t, context, controls=Controls(extra_tokens=[ExtraTokens(tokens, as_fp16)]))
    reference = unet(x, t, context, controls=Controls(extra_tokens=[ExtraTokens(tokens, as_rounded)]))
    assert (out - reference).abs().max() < 1e-3 and (out - unet(x, t, context)).abs().max() > 1e-2
    half = copy.deepcopy(unet).to(torch.bfloat16)
    mixed = half(x, t, context, controls=Controls(extra_tokens=[ExtraTokens(tokens, {layer: projections})]))
    assert torch.isfinite(mixed).all() and (mixed - out).abs().max() < 0.1


def test_an_ip_adapter_for_a_stored_unet_takes_its_compute_dtype(toy_sd):
    """load_ip_adapter took the dtype of the UNet's first parameter, the storage dtype of a
    `--weights-dtype fp16` UNet, so the adapter sat in fp16 beside an fp32 computation."""
    from minigen.loading.auto import load_pipeline
    from minigen.loading.ip_adapter import load_ip_adapter

    pipe = load_pipeline("toy-sd")
    store_weights(pipe.unet, torch.float16, torch.float32)
    adapter, encoder = load_ip_adapter("ip-adapter-plus_toy-sd", pipe.unet)
    assert {p.dtype for p in adapter.parameters()} == {p.dtype for p in encoder.parameters()} == {torch.float32}


@pytest.mark.parametrize("dtype", STORAGE, ids=str)
def test_aligngen_training_on_a_stored_transformer_computes_in_its_compute_dtype(dtype):
    """AlignGen's training step took its dtype from `img_in.weight`, the storage dtype: latents, text and
    sigma were cast to fp16/bf16 (fp8 failed in a multiply). Metric: the step's loss on a transformer stored
    in `dtype` equals, bit for bit, the loss of the fp32 transformer holding the rounded weights."""
    from test_aligngen_training import EXACT, step_loss, tiny_setup

    pipe, pairs, aligngen = tiny_setup()
    reference = step_loss(replace(pipe, transformer=rounded(pipe.transformer, dtype)), pairs, copy.deepcopy(aligngen), EXACT)
    store_weights(pipe.transformer, dtype, torch.float32)
    assert torch.equal(step_loss(pipe, pairs, aligngen, EXACT), reference)


def test_storing_frees_each_replaced_layer_at_once(unet, monkeypatch):
    """store_weights held every replaced layer until its loop ended, so storing an fp32 model peaked at the fp32
    weights plus a full copy in the storage dtype. Metric: when a layer is converted, none of the layers
    converted before it is alive (weak references; CPython frees on the last reference)."""
    import weakref

    import minigen.storage

    model = copy.deepcopy(unet)
    originals = [weakref.ref(m) for m in model.modules() if type(m) in PLAIN_LAYERS]
    alive_before = []
    convert = minigen.storage._stored_like

    def counting(layer, *args):
        alive_before.append(sum(ref() is not None and ref() is not layer for ref in originals[: len(alive_before)]))
        return convert(layer, *args)

    monkeypatch.setattr(minigen.storage, "_stored_like", counting)
    store_weights(model, torch.float16, torch.float32)
    assert len(alive_before) == len(originals) > 10 and max(alive_before) == 0


@torch.no_grad()
def test_stored_layers_follow_casts_and_are_not_stored_twice(unet, unet_inputs):
    """`.to(torch.bfloat16)` / `.double()` on a stored model cast its weights and biases as any parameters;
    its layers kept computing in the old dtype (a bare dtype RuntimeError): now they compute in the new one,
    as the plain model with the same weights does (bit for bit). Storing a stored or offloaded model again
    left its weights as they were (silently) or mixed dtypes: refused, naming restore_weights."""
    for cast in (torch.bfloat16, torch.float64):
        stored = store_weights(copy.deepcopy(unet), torch.float16, torch.float32).to(cast)
        plain = rounded(unet, torch.float16).to(cast)
        assert torch.equal(stored(*unet_inputs), plain(*unet_inputs))
        assert compute_dtype(stored) == cast and stored.out[2].weight.dtype == cast
    for prepare in (lambda m: store_weights(m, torch.float16, torch.float32), lambda m: Offload("cpu").add(m, "unet", "block")):
        model = prepare(copy.deepcopy(unet))
        with pytest.raises(ValueError, match=r"store_weights: '.*' and \d+ more layers are stored or offloaded already; restore_weights\(model\) first"):
            store_weights(model, torch.bfloat16, torch.float32)


@pytest.mark.parametrize("model, dtype", [("toy-sd", torch.float16), ("toy-flux", torch.bfloat16)] + [("toy-flux", d) for d in STORAGE[2:]])
@torch.no_grad()
def test_weights_read_into_their_storage_dtype_are_those_stored_after_loading(model, dtype):
    """load_pipeline(weights_dtype=): each Linear/Conv2d weight of the denoiser goes from the file straight to the
    storage dtype (sample.py built the whole model in --dtype first, then stored it: its peak memory was
    fp32's). The result equals loading in fp32 and storing afterwards, bit for bit; other components stay."""
    from minigen.loading.auto import load_pipeline

    stored = load_pipeline(model, weights_dtype=dtype)
    reference = load_pipeline(model)
    denoiser, expected = (stored.unet, reference.unet) if model == "toy-sd" else (stored.transformer, reference.transformer)
    store_weights(expected, dtype, torch.float32)
    kept = {path: layer.weight.dtype for path, layer in denoiser.named_modules() if isinstance(layer, (StoredLinear, StoredConv2d))}
    assert kept and set(kept.values()) == {dtype} and compute_dtype(denoiser) == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(denoiser.state_dict().values(), expected.state_dict().values()))
    assert compute_dtype(stored.vae) == torch.float32 and not any(isinstance(m, StoredConv2d) for m in stored.vae.modules())
    with pytest.raises(TypeError, match="weights_dtype takes a floating torch.dtype"):
        load_pipeline(model, weights_dtype="fp16")
