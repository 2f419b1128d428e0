"""FLUX LoRA files (peft/diffusers, kohya, BFL/ComfyUI, XLabs) on the tiny FLUX and on full-size meta models.

Reference: diffusers' unfused `FluxTransformer2DModel` (0.42) with each LoRA's ΔW = (alpha/rank)·B·A
added to its to_q / to_k / to_v / proj_mlp / norm_out... weights, fp32, tiny config (2 heads x 16, 2 + 2
blocks, weights of std 0.1). Tolerance: max abs difference of the velocities <= 1e-5 (they have std
≈ 0.5 and the LoRA moves them by ≈ 0.1-0.5). The XLabs and kohya name maps are also checked against
diffusers' own converters (`diffusers.loaders.lora_conversion_utils`).
"""

import json
from dataclasses import replace

import pytest
import torch
from conftest import TINY_FLUX, tiny_diffusers_flux
from safetensors.torch import save_file

from minigen.controls import Controls
from minigen.loading.coverage import load_exact
from minigen.loading.detect import CheckpointError
from minigen.loading.keymaps_flux import flux_from_diffusers, flux_to_diffusers
from minigen.loading.lora_files import merge, read_lora, unmerge
from minigen.loading.lora_flux import flux_layer_table, read_flux_lora
from minigen.models.flux import Flux
from minigen.models.flux_config import PRESETS
from minigen.models.flux_tokens import image_ids, text_ids
from minigen.models.unet import UNet

from conftest import TINY_UNET

RANK, TOL = 3, 1e-5


@pytest.fixture(scope="module")
def pair():
    """The tiny FLUX-dev in diffusers' layout and the same weights in minigen's."""
    reference = tiny_diffusers_flux(replace(TINY_FLUX, guidance_embed=True))
    model = Flux(replace(TINY_FLUX, guidance_embed=True)).eval()
    load_exact(model, flux_from_diffusers(reference.state_dict()))
    return reference, model


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        img=torch.randn(2, 15, 64, generator=g), img_ids=image_ids(3, 5), txt=torch.randn(2, 7, 32, generator=g),
        txt_ids=text_ids(7), timesteps=torch.tensor([0.3, 0.9]), y=torch.randn(2, 24, generator=g),
        guidance=torch.tensor([3.5, 1.0]),
    )


def run_reference(reference, x):
    with torch.no_grad():
        return reference(
            hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["timesteps"],
            img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=x["guidance"],
        ).sample


def diffusers_linears(reference):
    return [name for name, module in reference.named_modules() if isinstance(module, torch.nn.Linear)]


def peft_lora(reference, names, seed=0, alpha=None):
    """{name: (A [r, in], B [out, r])} and its peft file (transformer.<name>.lora_A/.lora_B/.alpha)."""
    g = torch.Generator().manual_seed(seed)
    factors, sd = {}, {}
    for name in names:
        out_features, in_features = reference.get_submodule(name).weight.shape
        a, b = torch.randn(RANK, in_features, generator=g) * 0.3, torch.randn(out_features, RANK, generator=g) * 0.3
        factors[name] = (a, b)
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = a, b
        if alpha is not None:
            sd[f"transformer.{name}.alpha"] = torch.tensor(float(alpha))
    return factors, sd


def merged_reference(reference, factors, scale):
    """diffusers' model with each ΔW added to its own, unfused weight: the reference semantics of a LoRA."""
    merged = tiny_diffusers_flux(replace(TINY_FLUX, guidance_embed=True))
    merged.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for name, (a, b) in factors.items():
            merged.get_submodule(name).weight += scale * b @ a
    return merged


def test_peft_lora_on_every_unfused_layer_equals_diffusers(pair):
    """q/k/v of both streams, proj_mlp and norm_out (halves swapped) included: as residuals and merged."""
    reference, model = pair
    names = diffusers_linears(reference)
    assert {"transformer_blocks.0.attn.to_k", "single_transformer_blocks.1.proj_mlp", "norm_out.linear"} <= set(names)
    factors, sd = peft_lora(reference, names, alpha=1.5)
    lora = read_flux_lora(sd, model, scale=0.8)
    assert len(lora) == len(names)
    expected = run_reference(merged_reference(reference, factors, 0.8 * 1.5 / RANK), inputs())
    with torch.no_grad():
        plain = model(**inputs())
        residual = model(**inputs(), controls=Controls(low_rank=lora))
        merge(model, lora)
        merged = model(**inputs())
        unmerge(model, lora)
        restored = model(**inputs())
    assert (expected - plain).abs().max() > 0.05  # the LoRA matters
    assert (residual - expected).abs().max() <= TOL
    assert (merged - expected).abs().max() <= TOL
    assert (restored - plain).abs().max() <= 1e-6


def test_peft_lora_on_q_k_only_matches_diffusers(pair):
    """OminiControl's module set: parts of the fused layers, the rest of their rows untouched."""
    reference, model = pair
    names = [n for n in diffusers_linears(reference) if n.endswith(("attn.to_q", "attn.to_k", "norm1.linear", "norm.linear"))]
    factors, sd = peft_lora(reference, names, seed=1)
    lora = read_flux_lora(sd, model)
    by_target = {(d.target, d.outputs) for d in lora}
    assert ("single_blocks.0.linear1", (0, 32)) in by_target and ("single_blocks.0.linear1", (32, 64)) in by_target
    expected = run_reference(merged_reference(reference, factors, 1.0), inputs())
    with torch.no_grad():
        assert (model(**inputs(), controls=Controls(low_rank=lora)) - expected).abs().max() <= TOL


def kohya_from_peft(model, factors):
    """The same LoRA as sd-scripts writes it: one factor pair per BFL layer, q/k/v/mlp parts fused as a
    stacked down and a block-diagonal up (how sd-scripts saves its split_qkv LoRAs)."""
    table = flux_layer_table(model)
    fused: dict[str, list] = {}
    for name, (a, b) in factors.items():
        place = table[name.replace(".", "_")]
        b = torch.cat(b.chunk(2)[::-1]) if place.swap_halves else b
        fused.setdefault(place.target, []).append((place.outputs, a, b))
    sd = {}
    for target, parts in fused.items():
        rows = model.get_submodule(target).out_features
        down = torch.cat([a for _, a, _ in parts])
        up = torch.zeros(rows, down.shape[0])
        for i, (outputs, _, b) in enumerate(parts):
            start, stop = outputs or (0, rows)
            up[start:stop, i * RANK : (i + 1) * RANK] = b
        key = "lora_unet_" + target.replace(".", "_")
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
        sd[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha = rank: scale 1
    return sd


def test_kohya_bfl_and_peft_files_of_one_lora_agree(pair, tmp_path):
    reference, model = pair
    factors, peft = peft_lora(reference, diffusers_linears(reference), seed=2)
    kohya = kohya_from_peft(model, factors)
    paths = {path.replace(".", "_"): path for path, _ in model.named_modules()}
    bfl = {}  # ComfyUI's spelling: BFL's dotted path, peft's factor names
    for key, tensor in kohya.items():
        name, part = key.removeprefix("lora_unet_").split(".", 1)
        part = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(part, part)
        bfl[f"diffusion_model.{paths[name]}.{part}"] = tensor
    save_file(kohya, tmp_path / "kohya.safetensors")
    expected = run_reference(merged_reference(reference, factors, 1.0), inputs())
    for sd in (tmp_path / "kohya.safetensors", bfl):
        lora = read_flux_lora(sd, model)
        assert all(d.outputs is None for d in lora)
        with torch.no_grad():
            assert (model(**inputs(), controls=Controls(low_rank=lora)) - expected).abs().max() <= TOL


def xlabs_lora(model, seed=3):
    """XLabs' processor LoRAs on every double and single block of the tiny model, rank 3."""
    g = torch.Generator().manual_seed(seed)
    h, sd = model.config.hidden_size, {}
    shapes = {"qkv_lora1": 3 * h, "qkv_lora2": 3 * h, "proj_lora1": h, "proj_lora2": h}
    names = [(f"double_blocks.{i}.processor.{n}", rows) for i in range(model.config.depth) for n, rows in shapes.items()]
    names += [(f"single_blocks.{i}.processor.{n}", rows) for i in range(model.config.depth_single_blocks)
              for n, rows in (("qkv_lora", 3 * h), ("proj_lora", h))]
    for name, rows in names:
        in_features = 5 * h if name.endswith("proj_lora") and name.startswith("single") else h  # linear2 reads attn + mlp
        sd[f"{name}.down.weight"] = torch.randn(RANK, in_features, generator=g) * 0.3
        sd[f"{name}.up.weight"] = torch.randn(rows, RANK, generator=g) * 0.3
    return sd


def test_xlabs_lora_equals_diffusers_conversion_of_it(pair):
    """diffusers converts XLabs files to peft names; both read to the same velocities."""
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    _, model = pair
    sd = xlabs_lora(model)
    converted = conversion._convert_xlabs_flux_lora_to_diffusers(dict(sd))
    ours, theirs = read_flux_lora(sd, model), read_flux_lora(converted, model)
    assert len(ours) == len(sd) // 2 and {d.target for d in ours} == {d.target for d in theirs}
    with torch.no_grad():
        plain = model(**inputs())
        a, b = (model(**inputs(), controls=Controls(low_rank=lora)) for lora in (ours, theirs))
    assert (a - plain).abs().max() > 0.05 and (a - b).abs().max() <= TOL


# --- full-size names ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_dev():
    with torch.device("meta"):
        return Flux(PRESETS["flux-dev"])


def meta_lora(shapes, key, down="lora_A", up="lora_B"):
    """{key(name).{down,up}.weight: meta tensors} of rank 4 for {name: (out, in)}."""
    sd = {}
    for name, (out_features, in_features) in shapes.items():
        sd[f"{key(name)}.{down}.weight"] = torch.empty(4, in_features, device="meta")
        sd[f"{key(name)}.{up}.weight"] = torch.empty(out_features, 4, device="meta")
    return sd


def test_official_ominicontrol_lora_reads_every_key(manifest_tensors, flux_dev):
    """OminiControl's subject_512 (peft names, rank 16, to_q/to_k/norm on 19 + 38 blocks) on FLUX.1 at full size."""
    sd = manifest_tensors("omini_subject_512.json")
    lora = read_flux_lora(sd, flux_dev)
    assert len(lora) == len(sd) // 2 == 19 * 3 + 38 * 3
    assert {d.outputs for d in lora if d.target == "double_blocks.3.img_attn.qkv"} == {(0, 3072), (3072, 6144)}


@pytest.mark.parametrize("dialect", ["peft", "kohya", "bfl", "comfyui", "xlabs"])
def test_every_dialect_places_every_layer_of_full_size_flux_dev(flux_dev, dialect):
    bfl = {path: tuple(m.weight.shape) for path, m in flux_dev.named_modules() if isinstance(m, torch.nn.Linear)}
    if dialect == "peft":
        weights = flux_to_diffusers({f"{p}.weight": torch.empty(s, device="meta") for p, s in bfl.items()})
        shapes = {k.removesuffix(".weight"): tuple(t.shape) for k, t in weights.items()}
        sd = meta_lora(shapes, lambda name: f"transformer.{name}")
    elif dialect == "kohya":
        shapes = bfl
        sd = meta_lora(shapes, lambda name: "lora_unet_" + name.replace(".", "_"), "lora_down", "lora_up")
    elif dialect == "xlabs":
        shapes = {f"double_blocks.{i}.processor.{n}": (rows, 3072) for i in range(19)
                  for n, rows in (("qkv_lora1", 9216), ("qkv_lora2", 9216), ("proj_lora1", 3072), ("proj_lora2", 3072))}
        shapes |= {f"single_blocks.{i}.processor.{n}": s for i in range(38)
                   for n, s in (("qkv_lora", (9216, 3072)), ("proj_lora", (3072, 15360)))}
        sd = meta_lora(shapes, lambda name: name, "down", "up")
    else:
        shapes = bfl
        prefix = "diffusion_model." if dialect == "bfl" else "model.diffusion_model."
        sd = meta_lora(shapes, lambda name: prefix + name)
    lora = read_flux_lora(sd, flux_dev)
    assert len(lora) == len(shapes)
    if dialect != "xlabs":
        assert {d.target for d in lora} == set(bfl)  # every Linear, embedders and final layer included


def test_kohya_names_agree_with_diffusers_kohya_converter(flux_dev):
    """diffusers splits sd-scripts' fused layers into its own names; read back, each BFL layer gets the
    same output rows covered (meta tensors: rank 5 keeps the converter off its value-reading path)."""
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    bfl = {path: tuple(m.weight.shape) for path, m in flux_dev.named_modules() if isinstance(m, torch.nn.Linear)}
    kohya = {}
    for path, (out_features, in_features) in bfl.items():
        key = "lora_unet_" + path.replace(".", "_")
        kohya[f"{key}.lora_down.weight"] = torch.empty(5, in_features, device="meta")
        kohya[f"{key}.lora_up.weight"] = torch.empty(out_features, 5, device="meta")
        kohya[f"{key}.alpha"] = torch.tensor(5.0)
    converted = conversion._convert_kohya_flux_lora_to_diffusers(dict(kohya))
    ours, theirs = read_flux_lora(kohya, flux_dev), read_flux_lora(converted, flux_dev)

    def rows(lora):
        covered = {}
        for d in lora:
            covered.setdefault(d.target, []).append(d.outputs or (0, bfl[d.target][0]))
        return {target: sorted(spans) for target, spans in covered.items()}

    theirs_rows = rows(theirs)
    assert set(theirs_rows) == set(bfl)
    assert theirs_rows["single_blocks.5.linear1"] == [(0, 3072), (3072, 6144), (6144, 9216), (9216, 21504)]
    for target, spans in theirs_rows.items():  # the slices tile the layer's rows
        assert spans[0][0] == 0 and spans[-1][1] == bfl[target][0], target
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), target
    assert rows(ours) == {target: [(0, shape[0])] for target, shape in bfl.items()}


# --- bad input ------------------------------------------------------------------------------------


def test_sd_and_flux_loras_are_refused_by_the_other_reader(pair):
    _, model = pair
    unet = UNet(TINY_UNET)
    sd_lora = {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(32, 2)}
    with pytest.raises(CheckpointError, match="LoRA for SD1.x's UNet, not for FLUX.*lora_files.read_lora"):
        read_flux_lora(sd_lora, model)
    for flux_lora in (
        {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32),
         "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2)},
        {"double_blocks.0.processor.qkv_lora1.down.weight": torch.zeros(2, 32),
         "double_blocks.0.processor.qkv_lora1.up.weight": torch.zeros(96, 2)},
    ):
        with pytest.raises(CheckpointError, match="LoRA for FLUX's transformer.*read_flux_lora"):
            read_lora(flux_lora, unet=unet)


def test_dev_lora_on_schnell_names_the_guidance_embedder(flux_dev):
    with torch.device("meta"):
        schnell = Flux(PRESETS["flux-schnell"])
    sd = meta_lora({"guidance_in.in_layer": (3072, 256), "img_in": (3072, 64)}, lambda n: "lora_unet_" + n.replace(".", "_"),
                   "lora_down", "lora_up")
    assert len(read_flux_lora(sd, flux_dev)) == 2
    with pytest.raises(CheckpointError, match="(?s)guidance embedder.*Fix: use this LoRA with FLUX.1-dev"):
        read_flux_lora(sd, schnell)


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (2, 32)}, "train a text encoder"),
        ({"transformer.proj_out.lora_magnitude_vector": (64,)}, "not read.*DoRA"),
        ({"transformer.proj_out.lora_A.weight": (2, 32)}, "not read"),  # no up factor
        ({"transformer.single_transformer_blocks.7.attn.to_q.lora_A.weight": (2, 32),
          "transformer.single_transformer_blocks.7.attn.to_q.lora_B.weight": (32, 2)}, "(?s)blocks this model lacks"),
        ({"transformer.proj_out.lora_A.weight": (2, 48), "transformer.proj_out.lora_B.weight": (64, 2)},
         r"(?s)wrong shape.*proj_out \(down \(2, 48\)"),
        ({"text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": (2, 32)}, "train a text encoder"),
        ({"transformer.x_embedder.lora_A.weight": (2, 128), "transformer.x_embedder.lora_B.weight": (32, 2)},
         r"transformer.x_embedder.lora_A.weight reads 128 input channels per token, not the 64 .* a FLUX Control LoRA"),
        ({"lora_unet_img_in.lora_down.weight": (2, 128), "lora_unet_img_in.lora_up.weight": (32, 2), "img_in.lora_B.bias": (32,)},
         r"lora_unet_img_in.lora_down.weight reads 128 input channels .* FLUX Control LoRA"),
        ({"transformer.proj_out.lora_A.weight": (2, 32), "transformer.proj_out.lora_B.weight": (64, 2),
          "diffusion_model.proj_out.lora_A.weight": (2, 32)}, r"transformer.proj_out.lora_A.weight and "
         r"diffusion_model.proj_out.lora_A.weight are both the down factor of one layer"),
    ],
    ids=["text-encoder", "dora", "half", "deeper", "shape", "comfy-text-encoders", "control", "bfl-control", "two-prefixes"],
)
def test_bad_loras_are_refused_naming_the_problem(pair, keys, message):
    _, model = pair
    with pytest.raises(CheckpointError, match=message):
        read_flux_lora({k: torch.zeros(s) for k, s in keys.items()}, model)


def test_a_diffusers_file_with_its_scale_in_metadata_reads_as_peft_scales_it(pair, tmp_path):
    """diffusers' save_lora_weights(transformer_lora_adapter_metadata=...) keeps lora_alpha in the file's
    metadata, not in .alpha tensors, and diffusers builds peft's LoraConfig from it: a layer's scale is
    lora_alpha / r, or its alpha_pattern entry where a pattern matches the end of its name (here every
    to_q: 1.5 / r). The file is written by diffusers itself; the reference is diffusers' model with each
    ΔW merged at that scale."""
    from diffusers import FluxPipeline

    reference, model = pair
    factors, sd = peft_lora(reference, diffusers_linears(reference), seed=3)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers={k.removeprefix("transformer."): v for k, v in sd.items()},
                                   transformer_lora_adapter_metadata={"r": RANK, "lora_alpha": 6, "alpha_pattern": {"to_q": 1.5}})  # fmt: skip
    lora = read_flux_lora(tmp_path / "pytorch_lora_weights.safetensors", model, scale=0.5)
    expected_model = merged_reference(reference, {}, 0.0)
    with torch.no_grad():
        for name, (a, b) in factors.items():
            expected_model.get_submodule(name).weight += 0.5 * (1.5 if name.endswith(".to_q") else 6) / RANK * b @ a
        velocity = model(**inputs(), controls=Controls(low_rank=lora))
        read_as_tensors = model(**inputs(), controls=Controls(low_rank=read_flux_lora(sd, model, scale=0.5)))  # no metadata: alpha = r
    expected = run_reference(expected_model, inputs())
    # this LoRA's scales (6/3, 1.5/3) move some velocities to ~18, where 1e-5 is a few float32 steps: relative there
    torch.testing.assert_close(velocity, expected, atol=TOL, rtol=1e-5)
    assert (read_as_tensors - expected).abs().max() > 0.05  # the metadata's scale matters


def test_lora_metadata_rank_pattern_and_a_single_models_unprefixed_fields(pair, tmp_path):
    """peft's rank_pattern gives the to_k layers rank 2 (their factors are cut to 2): scale lora_alpha / 2
    there, lora_alpha / r elsewhere; a single model's save_lora_adapter writes the fields without the
    "transformer." prefix, and they apply as well."""
    reference, model = pair
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_k"]
    _, sd = peft_lora(reference, names)
    for name in names[1:]:  # rank 2 on the to_k layers
        a, b = f"transformer.{name}.lora_A.weight", f"transformer.{name}.lora_B.weight"
        sd[a], sd[b] = sd[a][:2].contiguous(), sd[b][:, :2].contiguous()
    for fields in ({"transformer.r": RANK, "transformer.lora_alpha": 6, "transformer.rank_pattern": {"to_k": 2}},
                   {"r": RANK, "lora_alpha": 6, "rank_pattern": {"to_k": 2}}):  # fmt: skip
        save_file(sd, str(tmp_path / "l.safetensors"), {"lora_adapter_metadata": json.dumps(fields)})
        scales = {(d.target, d.outputs): d.scale for d in read_flux_lora(tmp_path / "l.safetensors", model)}
        assert scales == {("double_blocks.0.img_attn.qkv", (0, 32)): 6 / RANK, ("double_blocks.0.img_attn.qkv", (32, 64)): 6 / 2,
                          ("single_blocks.0.linear1", (32, 64)): 6 / 2}  # fmt: skip


@pytest.mark.parametrize("fields, alpha, message", [
    ({"transformer.use_dora": True, "transformer.r": 3}, None, "this is a DoRA"),
    ({"transformer.r": 0}, None, "rank must be 1 or more"),
    ({"transformer.lora_alpha": "many"}, None, "cannot be read"),
    ({"transformer.r": 4, "transformer.lora_alpha": 8}, None, "its factors have rank 3, but the file's metadata"),
    ({"transformer.r": 3, "transformer.lora_alpha": 6}, 6.0, "has an .alpha tensor, and the file's metadata"),
])  # fmt: skip
def test_lora_metadata_that_cannot_apply_is_refused(pair, tmp_path, fields, alpha, message):
    """What diffusers refuses too (a rank the factors do not have, .alpha tensors beside the metadata),
    and what minigen cannot apply (DoRA) or read."""
    reference, model = pair
    _, sd = peft_lora(reference, ["transformer_blocks.0.attn.to_q"], alpha=alpha)
    save_file(sd, str(tmp_path / "l.safetensors"), {"lora_adapter_metadata": json.dumps(fields)})
    with pytest.raises(CheckpointError, match=message):
        read_flux_lora(tmp_path / "l.safetensors", model)


def test_peft_save_pretrained_prefix_reads_as_the_transformer(pair):
    reference, model = pair
    _, sd = peft_lora(reference, diffusers_linears(reference)[:6])
    renamed = {"base_model.model." + key.removeprefix("transformer."): value for key, value in sd.items()}
    for a, b in zip(read_flux_lora(renamed, model), read_flux_lora(sd, model)):
        assert a.target == b.target and torch.equal(a.down, b.down) and torch.equal(a.up, b.up) and a.outputs == b.outputs
