"""LoRA files (kohya, peft/diffusers) on the tiny UNets and a tiny CLIP text encoder.

Each synthetic LoRA is built from the model's own layer list with random factors (std 0.1, rank 2),
written to a .safetensors file, and read back.

Tolerances, fp32: residual (Controls) vs merged weights <= 1e-5 (UNet outputs have std ≈ 0.3, the
LoRA moves them by up to ≈ 0.6-0.9, the two paths differ by ≈ 1e-6); merge then unmerge restores a
text encoder's output (std ≈ 1, moved by ≈ 0.4-0.5 while merged) to <= 1e-6 (measured ≈ 4-6e-7).
The reference for kohya name conversion is diffusers' own converter
(`diffusers.loaders.lora_conversion_utils`).
"""

import copy
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from minigen.controls import Controls
from minigen.loading.detect import CheckpointError
from minigen.loading.keymaps_unet import unet_to_diffusers
from minigen.loading.lora_files import layer_table, merge, read_lora, unmerge
from minigen.models.unet import UNet
from minigen.models.unet_config import PRESETS

from conftest import TINY_SDXL_UNET, TINY_UNET, tiny_clip

RANK = 2


# --- fixtures and LoRA writers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd():
    torch.manual_seed(0)
    return UNet(TINY_UNET).eval()


@pytest.fixture(scope="module")
def tiny_sdxl():
    torch.manual_seed(0)
    return UNet(TINY_SDXL_UNET).eval()


def layer_paths(model):
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def diffusers_paths(unet):
    """minigen (ldm) path -> diffusers path of every UNet layer, through the UNet key map."""
    paths = layer_paths(unet)
    tagged = {f"{p}.weight": torch.tensor(i) for i, p in enumerate(paths)}
    return {paths[int(i)]: k.removesuffix(".weight") for k, i in unet_to_diffusers(tagged, unet.config).items()}


def random_factors(model, paths, seed=0):
    """path -> (down, up): a conv gets a kxk down [r, in, k, k] and a 1x1 up [out, r, 1, 1]."""
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for path in paths:
        weight = model.get_submodule(path).weight
        down = torch.randn(RANK, *weight.shape[1:], generator=g) * 0.1
        up = torch.randn(weight.shape[0], RANK, *([1, 1] if weight.dim() == 4 else []), generator=g) * 0.1
        factors[path] = (down, up)
    return factors


def kohya(factors, names, prefix="lora_unet_", alpha=None):
    sd = {}
    for path, (down, up) in factors.items():
        name = prefix + names[path].replace(".", "_")
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return sd


def peft(factors, names, prefix="unet.", alpha=None):
    sd = {}
    for path, (down, up) in factors.items():
        name = prefix + names[path]
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = down, up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return sd


def save(sd, tmp_path, name="lora.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def inputs(unet):
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 32, generator=g)
    y = torch.randn(2, unet.config.adm_in_channels, generator=g) if unet.config.adm_in_channels else None
    return x, torch.tensor([10.0, 700.0]), context, y


def assert_residual_equals_merged(unet, deltas):
    with torch.no_grad():
        plain = unet(*inputs(unet))
        residual = unet(*inputs(unet), controls=Controls(low_rank=deltas))
        merged_unet = copy.deepcopy(unet)
        merge(merged_unet, deltas)
        merged = merged_unet(*inputs(unet))
    assert (residual - plain).abs().max() > 0.05, "the LoRA should visibly change the output"
    assert (residual - merged).abs().max() <= 1e-5


def same_deltas(a, b):
    assert [d.target for d in a] == [d.target for d in b]
    for x, y in zip(a, b):
        assert torch.equal(x.down, y.down) and torch.equal(x.up, y.up) and x.scale == y.scale


# --- UNet LoRAs ------------------------------------------------------------------------------------


def test_kohya_sd1_with_diffusers_names_targets_every_layer(tiny_sd, tmp_path):
    diffusers = diffusers_paths(tiny_sd)
    factors = random_factors(tiny_sd, layer_paths(tiny_sd))
    lora = read_lora(save(kohya(factors, diffusers, alpha=1), tmp_path), unet=tiny_sd)

    assert sorted(d.target for d in lora.unet) == sorted(factors) and lora.text == {}
    for delta in lora.unet:
        assert delta.weight().shape == tiny_sd.get_submodule(delta.target).weight.shape
        assert delta.scale == 0.5  # alpha 1 / rank 2
    assert_residual_equals_merged(tiny_sd, lora.unet)


@pytest.mark.parametrize(
    "kohya_name, target",
    [  # written out by hand from the two layouts (tiny-sd: two levels, attention on both)
        ("down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", "input_blocks.1.1.transformer_blocks.0.attn2.to_k"),
        ("down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_out_0", "input_blocks.5.1.transformer_blocks.0.attn1.to_out.0"),
        ("down_blocks_0_downsamplers_0_conv", "input_blocks.3.0.op"),
        ("mid_block_resnets_1_time_emb_proj", "middle_block.2.emb_layers.1"),
        ("up_blocks_0_upsamplers_0_conv", "output_blocks.2.2.conv"),
        ("up_blocks_1_attentions_0_proj_out", "output_blocks.3.1.proj_out"),
        ("up_blocks_1_resnets_2_conv_shortcut", "output_blocks.5.0.skip_connection"),
        ("up_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj", "output_blocks.1.1.transformer_blocks.0.ff.net.0.proj"),
        ("output_blocks_3_1_proj_out", "output_blocks.3.1.proj_out"),  # the same layer in sgm naming
        ("time_embedding_linear_2", "time_embed.2"),
        ("conv_out", "out.2"),
    ],
)
def test_kohya_names_resolve_to_the_written_out_layers(tiny_sd, kohya_name, target):
    assert layer_table(tiny_sd)[kohya_name] == target


def test_kohya_sdxl_with_sgm_names(tiny_sdxl, tmp_path):
    paths = layer_paths(tiny_sdxl)
    assert "label_emb.0.0" in paths and "input_blocks.4.1.transformer_blocks.1.attn2.to_k" in paths
    factors = random_factors(tiny_sdxl, paths, seed=1)
    lora = read_lora(save(kohya(factors, {p: p for p in paths}), tmp_path), unet=tiny_sdxl)
    assert sorted(d.target for d in lora.unet) == sorted(paths)
    assert all(d.scale == 1.0 for d in lora.unet)  # no alpha: alpha = rank
    assert_residual_equals_merged(tiny_sdxl, lora.unet)


def test_peft_file_loads(tiny_sdxl, tmp_path):
    diffusers = diffusers_paths(tiny_sdxl)
    factors = random_factors(tiny_sdxl, [p for p in layer_paths(tiny_sdxl) if ".attn" in p or "proj_" in p], seed=2)
    lora = read_lora(save(peft(factors, diffusers), tmp_path), unet=tiny_sdxl, scale=0.7)
    assert sorted(d.target for d in lora.unet) == sorted(factors)
    assert all(d.scale == 0.7 for d in lora.unet)
    assert_residual_equals_merged(tiny_sdxl, lora.unet)


def test_kohya_and_peft_files_of_one_lora_give_identical_deltas(tiny_sd, tmp_path):
    diffusers = diffusers_paths(tiny_sd)
    factors = random_factors(tiny_sd, layer_paths(tiny_sd), seed=3)
    from_kohya = read_lora(save(kohya(factors, diffusers, alpha=8), tmp_path, "k.safetensors"), unet=tiny_sd)
    from_peft = read_lora(save(peft(factors, diffusers, alpha=8), tmp_path, "p.safetensors"), unet=tiny_sd)
    same_deltas(from_kohya.unet, from_peft.unet)


def test_alpha_over_rank_and_user_scale_multiply(tiny_sd):
    diffusers = diffusers_paths(tiny_sd)
    paths = ["input_blocks.1.1.transformer_blocks.0.attn2.to_k", "middle_block.0.in_layers.2"]
    factors = random_factors(tiny_sd, paths)
    plain = read_lora(kohya(factors, diffusers), unet=tiny_sd)
    scaled = read_lora(kohya(factors, diffusers, alpha=4), unet=tiny_sd, scale=0.5)
    for a, b in zip(plain.unet, scaled.unet):
        assert a.scale == 1.0 and b.scale == 0.5 * 4 / RANK
        assert torch.allclose(b.weight(), a.weight())  # 0.5 * 4 / 2 = 1: the same ΔW
    halved = read_lora(kohya(factors, diffusers, alpha=1), unet=tiny_sd)
    assert torch.allclose(halved.unet[0].weight(), 0.5 * plain.unet[0].weight())


def test_a_diffusers_file_with_its_scale_in_metadata_reads_as_peft_scales_it(tiny_sd, tmp_path):
    """diffusers' save_lora_weights(unet_lora_adapter_metadata=...) keeps lora_alpha in the metadata, not in
    .alpha tensors; peft's scale from it: lora_alpha / sqrt(r) under use_rslora, alpha_pattern's entry for a
    module whose name ends with the pattern (attn2.to_k), every other layer lora_alpha's. File written by
    diffusers itself; the expected scales recomputed from peft's rule."""
    import math

    from diffusers import StableDiffusionPipeline

    diffusers = diffusers_paths(tiny_sd)
    factors = random_factors(tiny_sd, [p for p in layer_paths(tiny_sd) if ".attn" in p], seed=4)
    layers = {k.removeprefix("unet."): v.contiguous() for k, v in peft(factors, diffusers).items()}
    metadata = {"r": RANK, "lora_alpha": 4, "alpha_pattern": {"attn2.to_k": 1.0}, "use_rslora": True}
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors", unet=tiny_sd, scale=0.5)
    assert len(lora.unet) == len(factors)
    for delta in lora.unet:
        alpha = 1.0 if diffusers[delta.target].endswith("attn2.to_k") else 4
        assert delta.scale == pytest.approx(0.5 * alpha / math.sqrt(RANK))
    assert {d.scale for d in read_lora(layers, unet=tiny_sd).unet} == {1.0}  # the same tensors without the metadata


def test_older_diffusers_attention_processor_names(tiny_sd):
    diffusers = diffusers_paths(tiny_sd)
    path = "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0"
    down, up = random_factors(tiny_sd, [path])[path]
    attn = diffusers[path].removesuffix(".to_out.0")
    old = {f"{attn}.processor.to_out_lora.down.weight": down, f"{attn}.processor.to_out_lora.up.weight": up}
    (delta,) = read_lora(old, unet=tiny_sd).unet
    assert delta.target == path and torch.equal(delta.down, down)


def test_one_by_one_conv_factors_fit_a_linear_layer(tiny_sdxl):
    path = "input_blocks.4.1.proj_in"  # Linear in SDXL
    down, up = random_factors(tiny_sdxl, [path])[path]
    as_convs = kohya({path: (down[:, :, None, None], up[:, :, None, None])}, {path: path})
    (delta,) = read_lora(as_convs, unet=tiny_sdxl).unet
    assert delta.down.shape == down.shape and torch.equal(delta.down, down)


# --- text encoders ---------------------------------------------------------------------------------


def file_names(encoder):
    """Layer path -> its name in LoRA files, which always spell `text_model.`."""
    paths = layer_paths(encoder)
    return {p: p if p.startswith("text_model.") or p == "text_projection" else f"text_model.{p}" for p in paths}


def test_text_encoder_lora_merge_changes_output_and_unmerge_restores_it(tiny_sd):
    te1, te2 = tiny_clip(), tiny_clip(projection=True)
    f1 = random_factors(te1, layer_paths(te1), seed=4)
    f2 = random_factors(te2, layer_paths(te2), seed=5)
    sd = {**kohya(f1, file_names(te1), "lora_te1_", alpha=1), **kohya(f2, file_names(te2), "lora_te2_")}
    lora = read_lora(sd, unet=tiny_sd, text_encoders={"te1": te1, "te2": te2})
    assert lora.unet == [] and [d.target for d in lora.text["te1"]] == list(f1)
    assert "text_projection" in [d.target for d in lora.text["te2"]]

    ids = torch.tensor([[0, 5, 9, 13, 2, 1, 1]])
    for encoder, deltas in ((te1, lora.text["te1"]), (te2, lora.text["te2"])):
        with torch.no_grad():
            before = encoder(ids)[0]
            merge(encoder, deltas)
            merged = encoder(ids)[0]
            unmerge(encoder, deltas)
            after = encoder(ids)[0]
        assert (merged - before).abs().max() > 1e-2
        assert (after - before).abs().max() <= 1e-6


def test_peft_text_encoder_names_match_kohya_ones(tiny_sd):
    te1 = tiny_clip()
    factors = random_factors(te1, layer_paths(te1), seed=6)
    from_kohya = read_lora(kohya(factors, file_names(te1), "lora_te_"), unet=tiny_sd, text_encoders={"te1": te1})
    from_peft = read_lora(peft(factors, file_names(te1), "text_encoder."), unet=tiny_sd, text_encoders={"te1": te1})
    same_deltas(from_kohya.text["te1"], from_peft.text["te1"])
    saved_by_peft = read_lora(peft(factors, file_names(te1), "base_model.model."), unet=tiny_sd, text_encoders={"te1": te1})
    same_deltas(from_kohya.text["te1"], saved_by_peft.text["te1"])  # peft's save_pretrained of the encoder alone


# --- errors ----------------------------------------------------------------------------------------


def test_unknown_keys_are_listed(tiny_sd):
    sd = kohya(random_factors(tiny_sd, ["out.2"]), {"out.2": "out.2"})
    sd["lora_unet_out_2.hada_w1_a"] = torch.zeros(2, 2)  # LyCORIS LoHa
    sd["lora_unet_conv_in.lora_down.weight"] = torch.zeros(2, 4, 3, 3)  # no up
    with pytest.raises(CheckpointError, match="not read") as error:
        read_lora(sd, unet=tiny_sd)
    assert "lora_unet_out_2.hada_w1_a" in str(error.value) and "lora_unet_conv_in.lora_down.weight" in str(error.value)
    assert "LoHa" in str(error.value)


def test_sdxl_lora_on_sd1_unet_names_both_families(tiny_sd, tiny_sdxl):
    paths = layer_paths(tiny_sdxl)
    sd = kohya(random_factors(tiny_sdxl, paths), {p: p for p in paths})
    with pytest.raises(CheckpointError) as error:
        read_lora(sd, unet=tiny_sd)
    message = str(error.value)
    assert "made for SDXL" in message and "the UNet is SD1.x" in message
    assert "name no layer" in message and "unet:label_emb_0_0" in message
    assert "Fix: use this LoRA with a SDXL model" in message


def test_factors_of_the_wrong_shape_are_named(tiny_sd):
    """Same names, other widths: a LoRA for a UNet that reads 48-wide text features."""
    other = UNet(replace(TINY_UNET, context_dim=48))
    path = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    sd = kohya(random_factors(other, [path, "out.2"]), {path: path, "out.2": "out.2"})
    with pytest.raises(CheckpointError, match=r"1 have factors of the wrong shape.*attn2_to_k \(down \(2, 48\)"):
        read_lora(sd, unet=tiny_sd)


@pytest.mark.parametrize("down, up", [((), (4, 2, 1, 1)), ((2, 32, 3, 3), (4,)), ((2, 32, 3, 3), (0,))], ids=["0-d-down", "1-d-up", "empty-up"])
def test_factors_that_are_neither_2d_nor_4d_are_refused(tiny_sd, down, up):
    """A damaged factor raised a bare IndexError (`up.flatten(1)`, the family guess's `down.shape[1]`)."""
    sd = {"lora_unet_out_2.lora_down.weight": torch.randn(down), "lora_unet_out_2.lora_up.weight": torch.randn(up)}
    with pytest.raises(CheckpointError, match=r"unet:out_2: its factors have shapes \[.*\], not 2-D or 4-D; the file is damaged"):
        read_lora(sd, unet=tiny_sd)


@pytest.mark.parametrize("down", [(), (2,)], ids=["0-d", "1-d"])
def test_a_damaged_cross_attention_factor_is_named_not_an_index_error(tiny_sd, down):
    """attn2.to_k's down factor tells the family by its width (shape[1]): one of fewer dimensions raised a bare IndexError."""
    name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    sd = {f"{name}.lora_down.weight": torch.randn(down), f"{name}.lora_up.weight": torch.randn(32, 2)}
    with pytest.raises(CheckpointError, match=r"attn2_to_k: its factors have shapes \[.*\], \[32, 2\], not 2-D or 4-D; the file is damaged"):
        read_lora(sd, unet=tiny_sd)


def other_kinds():
    """(file, what it is, where it goes) of the shipped files that are not LoRAs, and of an embedding and a VAE."""
    from minigen.loading.files import read_state_dict
    from minigen.loading.keys import take_prefix
    from minigen.loading.toy import TOY_SD, TOY_SUBJECT_LORA, toy_ip_adapter_files

    toy_flux = TOY_SUBJECT_LORA.parents[1] / "toy-flux"
    return [
        (TOY_SD, "an SD1.x model", "--model"),
        (toy_flux / "flux1-toy.safetensors", "a FLUX.1-schnell transformer", "--model"),
        (toy_flux / "ae.safetensors", "a FLUX autoencoder", "--ae"),
        (take_prefix(read_state_dict(TOY_SD), "first_stage_model."), "an SD VAE", "--vae"),
        (toy_ip_adapter_files()["adapter"], "an IP-Adapter", "--ip-adapter"),
        ({"emb_params": torch.randn(2, 32)}, "a textual-inversion embedding", "--embedding"),
    ]


@pytest.mark.parametrize("file, what, flag", other_kinds(), ids=["sd", "flux", "flux-ae", "sd-vae", "ip-adapter", "embedding"])
def test_a_file_of_another_kind_is_named_with_where_it_goes(tiny_sd, file, what, flag):
    """A model, VAE, adapter or embedding given as a LoRA got the advice for LyCORIS and DoRA files."""
    from minigen.loading.lora_flux import read_flux_lora
    from minigen.models.flux import Flux

    from conftest import TINY_FLUX

    message = f"^this is {what} file, not a LoRA; pass it as {flag} \\(sample.py\\), or to .* in code$"
    with pytest.raises(CheckpointError, match=message):
        read_lora(file, unet=tiny_sd)
    with pytest.raises(CheckpointError, match=message):
        read_flux_lora(file, Flux(TINY_FLUX))


def test_text_encoder_weights_without_the_encoder_say_what_to_pass(tiny_sd):
    te1 = tiny_clip()
    sd = kohya(random_factors(te1, layer_paths(te1)[:2]), file_names(te1), "lora_te_")
    with pytest.raises(CheckpointError, match=r"text_encoders=\{'te1': \.\.\.\}"):
        read_lora(sd, unet=tiny_sd)


def test_text_encoders_must_be_named_te1_te2(tiny_sd):
    with pytest.raises(ValueError, match="'te1' and 'te2'.*'clip_l'"):
        read_lora(kohya(random_factors(tiny_sd, ["out.2"]), {"out.2": "out.2"}), unet=tiny_sd, text_encoders={"clip_l": tiny_clip()})


def test_pickles_are_refused(tiny_sd, tmp_path):
    path = tmp_path / "lora.bin"
    torch.save({}, path)
    with pytest.raises(PermissionError, match="allow_pickle"):
        read_lora(path, unet=tiny_sd)


def test_an_empty_lora_file_is_refused(tiny_sd, tmp_path):
    """A file of no tensors read as a LoRA of no layers (the image as without it)."""
    with pytest.raises(CheckpointError, match="this LoRA holds no tensors"):
        read_lora(save({}, tmp_path), unet=tiny_sd)


def test_scoped_deltas_cannot_be_merged(tiny_sd):
    (delta,) = read_lora(kohya(random_factors(tiny_sd, ["out.2"]), {"out.2": "out.2"}), unet=tiny_sd).unet
    delta.rows = torch.tensor([1.0, 0.0])
    with pytest.raises(ValueError, match="Controls"):
        merge(copy.deepcopy(tiny_sd), [delta])


def test_merge_into_float64_weights_stays_in_float64():
    """A float64 model (parity runs against a float64 reference) merges W + scale * up @ down in float64:
    the recomputation in float64 agrees to 1e-15; rounding through float32 would leave about 1e-8."""
    from minigen.controls import LowRank

    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 64)).double()
    before = layer[0].weight.detach().clone()
    down, up = torch.randn(4, 64, dtype=torch.float64), torch.randn(64, 4, dtype=torch.float64)
    merge(layer, [LowRank("0", down, up, scale=0.3)])
    assert layer[0].weight.dtype == torch.float64
    assert (layer[0].weight - (before + 0.3 * up @ down)).abs().max() < 1e-13


@pytest.fixture(scope="module")
def full_size():
    with torch.device("meta"):
        return UNet(PRESETS["sd15"]), UNet(PRESETS["sdxl"])


def test_full_size_tables_resolve_names_of_real_files(full_size):
    sd15, sdxl = map(layer_table, full_size)
    assert sd15["down_blocks_2_attentions_1_transformer_blocks_0_attn2_to_v"] == "input_blocks.8.1.transformer_blocks.0.attn2.to_v"
    assert sdxl["input_blocks_4_1_transformer_blocks_1_attn1_to_k"] == "input_blocks.4.1.transformer_blocks.1.attn1.to_k"
    assert sdxl["up_blocks_0_attentions_2_transformer_blocks_9_ff_net_2"] == "output_blocks.2.1.transformer_blocks.9.ff.net.2"


@pytest.mark.parametrize("lora_for, model, clue", [(1, 0, "2048-wide"), (0, 1, "768-wide")])
def test_full_size_lora_for_the_other_family_says_so(full_size, lora_for, model, clue):
    """Meta tensors: only names and shapes matter. SDXL's first level has no attention, SD1.5's does."""
    source = full_size[lora_for]
    names = diffusers_paths(source)
    paths = [p for p in layer_paths(source) if p.endswith("attn2.to_k")]
    sd = kohya({p: (torch.empty(4, *w.shape[1:], device="meta"), torch.empty(w.shape[0], 4, device="meta"))
                for p in paths for w in [source.get_submodule(p).weight]}, names)
    families = ["SD1.x", "SDXL"]
    with pytest.raises(CheckpointError, match=f"made for {families[lora_for]} .*{clue}.*the UNet is {families[model]}"):
        read_lora(sd, unet=full_size[model])


# --- oracle: diffusers' own kohya converter ----------------------------------------------------------


def test_targets_agree_with_diffusers_kohya_converter(tiny_sd, tiny_sdxl):
    """diffusers converts kohya names by string rules (sgm blocks with the help of the UNet config)
    into its older `processor.to_q_lora` / `lora_linear_layer` names, and those into peft names;
    read back, every version must give the same layers and factors as the kohya file.
    Reference: diffusers.loaders.lora_conversion_utils and diffusers.utils.state_dict_utils."""
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    class DiffusersUNetConfig:  # the one field the sgm block mapping reads
        layers_per_block = 2

    def to_peft(sd):
        unet = {k: v for k, v in sd.items() if k.startswith("unet.")}
        text = {k: v for k, v in sd.items() if not k.startswith("unet.")}
        return {**convert_unet_state_dict_to_peft(unet), **convert_state_dict_to_peft(text)}

    te1, te2 = tiny_clip(), tiny_clip(projection=True)
    cases = [  # (UNet, its names in kohya files, text encoders, their kohya prefixes)
        (tiny_sd, diffusers_paths(tiny_sd), {"te1": te1}, {"te1": "lora_te_"}),
        (tiny_sdxl, {p: p for p in layer_paths(tiny_sdxl)}, {"te1": te1, "te2": te2},
         {"te1": "lora_te1_", "te2": "lora_te2_"}),
    ]
    for unet, names, encoders, prefixes in cases:
        sd = kohya(random_factors(unet, layer_paths(unet)), names)
        for key, encoder in encoders.items():
            sd |= kohya(random_factors(encoder, layer_paths(encoder)), file_names(encoder), prefixes[key])
        ours = read_lora(sd, unet=unet, text_encoders=encoders)
        if unet is tiny_sdxl:
            sd = conversion._maybe_map_sgm_blocks_to_diffusers(sd, DiffusersUNetConfig())
        converted, _ = conversion._convert_non_diffusers_lora_to_diffusers(sd)
        for theirs in (converted, to_peft(converted)):
            lora = read_lora(theirs, unet=unet, text_encoders=encoders)
            for mine, other in [(ours.unet, lora.unet), *((ours.text[k], lora.text[k]) for k in encoders)]:
                by_target = {d.target: d for d in other}
                assert sorted(by_target) == sorted(d.target for d in mine)
                assert all(torch.equal(by_target[d.target].down, d.down) for d in mine)


# --- refused rather than half applied ------------------------------------------------------------------


@pytest.mark.parametrize("alpha, message", [
    (torch.tensor(0.0), r"out_2.alpha is 0: an alpha must be a positive number \(kohya's sd-scripts read 0 as the rank"),
    (torch.tensor(-2.0), r"out_2.alpha is -2: an alpha must be a positive number"),
    (torch.tensor([2.0, 2.0]), r"out_2.alpha holds 2 numbers \(shape \[2\]\), not one"),
])  # fmt: skip
def test_an_alpha_that_is_not_one_positive_number_is_refused(tiny_sd, alpha, message):
    """An alpha of 0 turned the layer off without a word (diffusers' reading; kohya's reads it as the rank),
    and a 2-element alpha raised a bare "only one element tensors" naming no key."""
    sd = kohya(random_factors(tiny_sd, ["out.2"]), {"out.2": "out.2"})
    sd["lora_unet_out_2.alpha"] = alpha
    with pytest.raises(CheckpointError, match=message):
        read_lora(sd, unet=tiny_sd)
    sd["lora_unet_out_2.alpha"] = torch.tensor([2.0])  # a 1-element alpha is one number
    assert read_lora(sd, unet=tiny_sd).unet[0].scale == 2.0 / RANK


def test_metadata_alpha_of_zero_and_rank_zero_are_refused(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    factors = random_factors(tiny_sd, ["out.2"])
    layers = {k.removeprefix("unet."): v.contiguous() for k, v in peft(factors, {"out.2": "conv_out"}).items()}
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata={"r": RANK, "lora_alpha": 0})
    with pytest.raises(CheckpointError, match=r"conv_out: the file's metadata .* gives it alpha 0, which scales it by 0"):
        read_lora(tmp_path / "pytorch_lora_weights.safetensors", unet=tiny_sd)
    empty = {"lora_unet_out_2.lora_down.weight": torch.zeros(0, 32, 3, 3), "lora_unet_out_2.lora_up.weight": torch.zeros(4, 0, 1, 1)}
    with pytest.raises(CheckpointError, match=r"out_2: its factors have rank 0"):
        read_lora(empty, unet=tiny_sd)  # was a bare ZeroDivisionError


def test_one_layer_under_two_prefixes_is_refused(tiny_sd):
    """`unet.X.lora_A` beside `X.lora_A` (two LoRAs merged into one file) kept only the later pair."""
    names = {"out.2": "conv_out"}
    first, second = peft(random_factors(tiny_sd, ["out.2"]), names), peft(random_factors(tiny_sd, ["out.2"], seed=1), names, prefix="")
    with pytest.raises(CheckpointError, match=r"unet.conv_out.lora_A.weight and conv_out.lora_A.weight are both the down factor of one layer"):
        read_lora({**first, **second}, unet=tiny_sd)


def test_peft_save_pretrained_prefix_reads_as_unet(tiny_sd):
    names = diffusers_paths(tiny_sd)
    factors = random_factors(tiny_sd, list(names)[:5])
    same_deltas(read_lora(peft(factors, names, prefix="base_model.model."), unet=tiny_sd).unet, read_lora(peft(factors, names), unet=tiny_sd).unet)


def test_merging_into_fp8_weights_is_refused():
    """Rounded to fp8, a ΔW of 1 % of W changed no entry at all: merge refuses weights kept in one byte."""
    from minigen.controls import LowRank
    from minigen.storage import store_weights

    layer = nn.Sequential(nn.Linear(64, 64))
    store_weights(layer, torch.float8_e4m3fn, torch.float32)
    before = layer[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"0's weight is kept in torch.float8_e4m3fn, .* merge before store_weights"):
        merge(layer, [LowRank("0", torch.randn(4, 64) * 0.01, torch.randn(64, 4) * 0.01, scale=1.0)])
    assert torch.equal(layer[0].weight, before)
