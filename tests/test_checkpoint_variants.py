"""Checkpoint variants the official loaders meet in the wild (the "Hardening" issue).

* full SD training checkpoints with EMA shadows of the UNet (`model_ema.*`): EMA weights by default,
  the training weights with `ema=False`; shadow names checked against diffusers' converter;
* harmless `position_ids` buffers in either text tower of an SD/SDXL single file;
* ComfyUI "scaled fp8" FLUX files: fp8 weights times their `scale_weight`;
* every LoRA dialect `read_lora` reads is named by `detect`.

Synthetic files are made from the shipped toy models (weights/) or from the official manifests
(meta tensors: names and shapes only); every comparison is exact (`torch.equal`).
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from minigen.loading.auto import load_pipeline
from minigen.loading.detect import UNET_PREFIX, CheckpointError, detect
from minigen.loading.files import read_metadata, read_state_dict
from minigen.loading.flux import load_flux_transformer
from minigen.loading.keymaps_text import SDXL_OPEN_CLIP_PREFIX, text_encoders_from_single_file
from minigen.loading.keymaps_unet import unet_to_diffusers
from minigen.loading.lora_files import read_lora
from minigen.loading.sd import ema_keys, ema_name, load_sd
from minigen.loading.toy import TOY_FLUX, TOY_SD
from minigen.models.unet import UNet
from minigen.models.unet_config import PRESETS as UNET_PRESETS
from minigen.text.encoders import PRESETS as TEXT_PRESETS
from minigen.text.encoders import build_text_encoder
from minigen.transformers_compat import tower

from conftest import TINY_UNET, meta_tensors, tiny_clip, with_ema

# --- EMA weights in full SD checkpoints ------------------------------------------------------------


def test_ema_weights_load_by_default_and_ema_false_loads_the_others(tmp_path):
    file, checkpoint, shadows = with_ema(tmp_path)
    originals = {key.removeprefix(UNET_PREFIX): t for key, t in checkpoint.items() if key.startswith(UNET_PREFIX)}
    assert shadows.keys() == originals.keys() and len(shadows) > 100
    for ema, expected in ((True, shadows), (False, originals)):
        unet = load_sd(file, ema=ema).unet.state_dict()
        assert unet.keys() == expected.keys()
        for key, value in unet.items():
            assert torch.equal(value, expected[key].float()), (ema, key)


def test_ema_false_on_flux_is_refused():
    """FLUX files hold one set of weights: ema=False chose nothing (sample.py refused --no-ema, the API did not)."""
    with pytest.raises(ValueError, match="ema=False .* toy-flux is a FLUX model, whose files hold one set"):
        load_pipeline("toy-flux", ema=False)


@pytest.mark.parametrize("load", [lambda: load_sd(TOY_SD, ema=False), lambda: load_pipeline("toy-sd", ema=False)], ids=["file", "by-name"])
def test_ema_false_on_a_file_without_shadows_is_refused(load):
    """It chose nothing (sample.py --no-ema on toy-sd drew the image it draws without; by name, toy-sd was
    loaded without passing ema on)."""
    with pytest.raises(CheckpointError, match=r"ema=False \(sample.py --no-ema\) picks .* this file holds one set"):
        load()


def test_an_incomplete_ema_set_is_refused_unless_ema_false(tmp_path):
    dropped = UNET_PREFIX + "out.2.weight"
    file, checkpoint, _ = with_ema(tmp_path, shadow_of=lambda key: key != dropped)
    with pytest.raises(CheckpointError, match=r"has no shadow model_ema\.diffusion_modelout2weight.*ema=False"):
        load_sd(file)
    unet = load_sd(file, ema=False).unet
    assert torch.equal(unet.state_dict()["out.2.weight"], checkpoint[dropped].float())


def test_ema_bookkeeping_without_shadows_is_no_ema_set(tmp_path):
    """The released `*-emaonly` files keep `model_ema.decay` / `num_updates` but no shadows."""
    file, checkpoint, _ = with_ema(tmp_path, shadow_of=lambda key: False)
    assert ema_keys(read_state_dict(file)) == {}
    unet = load_sd(file).unet.state_dict()
    assert all(torch.equal(value, checkpoint[UNET_PREFIX + key].float()) for key, value in unet.items())


def test_shadow_names_are_the_ones_diffusers_extracts(manifest, shared_hf):
    """Oracle: diffusers' convert_ldm_unet_checkpoint(extract_ema=True) on the full-size SD1.5 keys with a
    shadow under `ema_name` of each: every diffusers tensor it returns is our shadow of that weight."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    checkpoint = meta_tensors(manifest("sd15_v1-5-pruned-emaonly.json"))
    unet_keys = [key for key in checkpoint if key.startswith(UNET_PREFIX)]
    shadows = {ema_name(key): torch.empty_like(checkpoint[key]) for key in unet_keys}
    checkpoint |= shadows
    assert set(ema_keys(checkpoint).values()) == set(shadows)
    config = json.loads((shared_hf / "runwayml/stable-diffusion-v1-5/unet/config.json").read_text())
    theirs = convert_ldm_unet_checkpoint(checkpoint, config, extract_ema=True)
    ours = unet_to_diffusers({key: checkpoint[shadow] for key, shadow in ema_keys(checkpoint).items()}, UNET_PRESETS["sd15"])
    assert theirs.keys() == ours.keys() and all(theirs[key] is ours[key] for key in ours)


# --- position_ids in the text towers ---------------------------------------------------------------


@pytest.mark.parametrize("extra", ["text_model.embeddings.position_ids", "embeddings.position_ids", "position_ids"])
def test_open_clip_position_ids_are_ignored(manifest, extra):
    """An SDXL file whose OpenCLIP-bigG tower carries a position_ids buffer (older ComfyUI saves) splits
    into the same text encoders as the official file, and they load (meta tensors, full size)."""
    official = meta_tensors(manifest("sdxl_sd_xl_base_1.0.json"))
    position_ids = torch.empty(1, 77, dtype=torch.int64, device="meta")
    saved = text_encoders_from_single_file({**official, SDXL_OPEN_CLIP_PREFIX + extra: position_ids})
    reference = text_encoders_from_single_file(official)
    for name in ("text_encoder", "text_encoder_2"):
        assert {k: t.shape for k, t in saved[name].items()} == {k: t.shape for k, t in reference[name].items()}
        assert not any(key.endswith("position_ids") for key in saved[name])
    build_text_encoder(TEXT_PRESETS["openclip-bigg"], saved["text_encoder_2"])
    build_text_encoder(TEXT_PRESETS["clip-l"], saved["text_encoder"])


# --- ComfyUI scaled fp8 FLUX files -----------------------------------------------------------------


def scaled_fp8(weights, *, scale_input=True):
    """ComfyUI's scaled fp8 layout of a BFL transformer: each 2-D (Linear) weight stored as fp8 of
    weight / scale with a float32 `scale_weight` (and `scale_input`), the rest as it was, the marker."""
    saved = {"model.diffusion_model.scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for key, value in weights.items():
        module = key.removesuffix("weight")
        if key.endswith(".weight") and value.dim() == 2:
            scale = value.float().abs().max() / 448  # e4m3fn's largest normal number
            saved[f"model.diffusion_model.{key}"] = (value.float() / scale).to(torch.float8_e4m3fn)
            saved[f"model.diffusion_model.{module}scale_weight"] = scale.reshape(())
            if scale_input:
                saved[f"model.diffusion_model.{module}scale_input"] = torch.tensor(1.0)
        else:
            saved[f"model.diffusion_model.{key}"] = value
    return saved


def test_scaled_fp8_flux_file_loads_dequantized(tmp_path):
    source = TOY_FLUX / "flux1-toy.safetensors"
    weights = read_state_dict(source)
    saved = scaled_fp8(weights)
    file = tmp_path / "flux1-toy-fp8-scaled.safetensors"
    save_file(saved, str(file), read_metadata(source))
    model = load_flux_transformer(file, torch.float32).state_dict()
    quantized = [key for key in weights if f"model.diffusion_model.{key.removesuffix('weight')}scale_weight" in saved]
    assert len(quantized) > 20 and model.keys() == weights.keys()
    for key, value in model.items():
        stored = saved[f"model.diffusion_model.{key}"]
        if key in quantized:  # the straightforward recomputation: fp8 value times its scale, in float32
            scale = saved[f"model.diffusion_model.{key.removesuffix('weight')}scale_weight"]
            expected = stored.to(torch.float32) * scale
            assert (value - weights[key].float()).abs().max() <= 0.07 * weights[key].float().abs().max(), key
        else:
            expected = stored.float()
        assert torch.equal(value, expected), key


def test_scaled_fp8_without_prefix_or_scale_input_and_a_damaged_one(tmp_path):
    """BFL names (marker `scaled_fp8`, no prefix) and no `scale_input` load the same weights; a scale
    whose weight is missing is named."""
    source = TOY_FLUX / "flux1-toy.safetensors"
    prefixed = scaled_fp8(read_state_dict(source))
    bare = {key.removeprefix("model.diffusion_model."): t for key, t in prefixed.items() if not key.endswith("scale_input")}
    for name, tensors in (("prefixed", prefixed), ("bare", bare)):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), read_metadata(source))
    reference = load_flux_transformer(tmp_path / "prefixed.safetensors", torch.float32).state_dict()
    model = load_flux_transformer(tmp_path / "bare.safetensors", torch.float32).state_dict()
    assert model.keys() == reference.keys() and all(torch.equal(model[key], reference[key]) for key in model)
    del bare["double_blocks.1.img_mlp.0.weight"]
    save_file(bare, str(tmp_path / "damaged.safetensors"), read_metadata(source))
    with pytest.raises(CheckpointError, match=r"double_blocks\.1\.img_mlp\.0\.scale_weight scales no weight"):
        load_flux_transformer(tmp_path / "damaged.safetensors", torch.float32)


# --- detect names every LoRA dialect read_lora reads -----------------------------------------------

UNET_LAYERS = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.transformer_blocks.0.attn2.to_k"]
TEXT_LAYER = "text_model.encoder.layers.0.self_attn.q_proj"


def lora(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], down: str, up: str) -> dict[str, torch.Tensor]:
    """{name.down: down factor, name.up: up factor} for each layer name."""
    return {key: t for name, (d, u) in pairs.items() for key, t in ((f"{name}.{down}", d), (f"{name}.{up}", u))}


def dialects(unet, clip) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """{dialect: (the layout detect should name, a LoRA in it)}: rank-2 factors for a self- and a
    cross-attention layer of `unet` and, where the dialect names text-encoder layers, a query of `clip`."""
    g = torch.Generator().manual_seed(0)

    def pair(model, path):  # the files' `text_model.` path, wherever this transformers version keeps it
        weight = tower(model, "text_model").get_submodule(path.removeprefix("text_model.")).weight
        return torch.randn(2, weight.shape[1], generator=g), torch.randn(weight.shape[0], 2, generator=g)

    ldm = {path: pair(unet, path) for path in UNET_LAYERS}
    tagged = {f"{path}.weight": torch.tensor(i) for i, path in enumerate(UNET_LAYERS)}
    diffusers = {k.removesuffix(".weight"): ldm[UNET_LAYERS[int(i)]] for k, i in unet_to_diffusers(tagged, unet.config).items()}
    text = pair(clip, TEXT_LAYER)
    processors = {f"{module}.processor.{proj}_lora": f for (module, proj), f in
                  ((path.rsplit(".", 1), f) for path, f in diffusers.items())}
    kohya = lambda names: {"lora_unet_" + name.replace(".", "_"): f for name, f in names.items()}  # noqa: E731
    prefixed = lambda prefix, names: {prefix + name: f for name, f in names.items()}  # noqa: E731
    return {
        "kohya, ldm names": ("kohya", lora(kohya(ldm) | {"lora_te_" + TEXT_LAYER.replace(".", "_"): text},
                                           "lora_down.weight", "lora_up.weight")),
        "kohya, diffusers names": ("kohya", lora(kohya(diffusers), "lora_down.weight", "lora_up.weight")),
        "peft": ("peft", lora(prefixed("unet.", diffusers) | {f"text_encoder.{TEXT_LAYER}": text}, "lora_A.weight", "lora_B.weight")),
        "diffusers 0.15-0.24": ("diffusers", lora(prefixed("unet.", diffusers), "lora.down.weight", "lora.up.weight")
                                | lora({f"text_encoder.{TEXT_LAYER}": text}, "lora_linear_layer.down.weight",
                                       "lora_linear_layer.up.weight")),
        "diffusers, no prefix": ("diffusers", lora(diffusers, "lora.down.weight", "lora.up.weight")),
        "attention processors": ("diffusers", lora(processors, "down.weight", "up.weight")
                                 | lora({f"text_encoder.{TEXT_LAYER.replace('.q_proj', '.to_q_lora')}": text},
                                        "down.weight", "up.weight")),
    }


@pytest.fixture(scope="module")
def tiny_sd():
    torch.manual_seed(0)
    return UNet(TINY_UNET).eval()


def test_detect_names_every_lora_dialect_read_lora_reads(tiny_sd):
    clip = tiny_clip()
    for dialect, (layout, sd) in dialects(tiny_sd, clip).items():
        read = read_lora(sd, unet=tiny_sd, text_encoders={"te1": clip})  # read_lora reads the dialect ...
        assert (len(read.unet), len(read.text.get("te1", []))) == (2, len(sd) // 2 - 2), dialect
        found = detect(sd)  # ... and detect names it
        assert (found.family, found.layout) == ("lora-sd1", layout), dialect


@pytest.mark.parametrize("width, family", [(768, "lora-sd1"), (1024, "lora-sd2"), (2048, "lora-sdxl")])
def test_lora_family_reads_the_cross_attention_width_in_every_dialect(width, family):
    """attn2's to_k down factor is [rank, text width], however the dialect spells the layer."""
    names = {
        "kohya": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight",
        "peft": "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight",
        "diffusers": "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.down.weight",
    }
    for layout, key in names.items():
        up = key.replace("lora_down", "lora_up").replace("lora_A", "lora_B").replace(".down.", ".up.")
        found = detect({key: torch.empty(4, width, device="meta"), up: torch.empty(640, 4, device="meta")})
        assert (found.family, found.layout) == (family, layout), key


def test_a_second_text_encoder_marks_an_sdxl_lora():
    name = "lora_te2_" + TEXT_LAYER.replace(".", "_")
    sd = lora({name: (torch.empty(4, 1280, device="meta"), torch.empty(1280, 4, device="meta"))},
              "lora_down.weight", "lora_up.weight")
    found = detect(sd)
    assert (found.family, found.layout) == ("lora-sdxl", "kohya")
