"""Inpainting UNets (SD1.5 and SDXL inpainting: 9 input channels) from their official layouts.

* Coverage on the official manifests (meta tensors: names and shapes, no weights): the SD1.5 / SDXL
  UNet keys with the first conv widened to 9 input channels, as `sd-v1-5-inpainting.ckpt` and the
  diffusers inpainting repositories have it, build a UNet with in_channels 9 that takes every key.
* Parity: a tiny random 9-channel UNet against diffusers' UNet2DConditionModel(in_channels=9), fp32,
  max abs difference <= 1e-5, loaded from the diffusers names and from the single-file layout.
* Loading: in_channels is read off the weights (single files and diffusers folders); the presets
  `sd15-inpainting` / `sdxl-inpainting` name their repositories and, offline, the files to fetch.
"""

import json
import logging
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from minigen.loading import sd
from minigen.loading.coverage import build_exact, load_exact
from minigen.loading.detect import UNET_PREFIX, detect
from minigen.loading.files import config_metadata
from minigen.loading.keymaps_unet import (
    unet_config_from_diffusers,
    unet_config_from_keys,
    unet_from_diffusers,
    unet_to_diffusers,
    with_weight_channels,
)
from minigen.models.unet import UNet
from minigen.models.unet_config import PRESETS
from minigen.models.vae import AutoencoderKL

from conftest import TINY_DIFFUSERS_UNETS, TINY_UNET, TINY_VAE, meta_tensors
from test_unet import run_both

# preset, detected family, single-file manifest, diffusers UNet manifest, the base model's hub folder in ../shared/hf
CASES = [
    ("sd15-inpainting", "sd1", "sd15_v1-5-pruned-emaonly.json", "diffusers_sd15_unet.json", "runwayml/stable-diffusion-v1-5"),
    ("sdxl-inpainting", "sdxl", "sdxl_sd_xl_base_1.0.json", "diffusers_sdxl_unet.json", "stabilityai/stable-diffusion-xl-base-1.0"),
]
TOL = 1e-5


def widened(tensors: dict[str, torch.Tensor], key: str, in_channels: int = 9) -> dict[str, torch.Tensor]:
    """`tensors` with the conv `key` [o, 4, 3, 3] given `in_channels` input channels (an inpainting UNet's first conv)."""
    out, _, kh, kw = tensors[key].shape
    return {**tensors, key: torch.empty(out, in_channels, kh, kw, dtype=tensors[key].dtype, device=tensors[key].device)}


# --- coverage on the official manifests -------------------------------------------------------------


@pytest.mark.parametrize("preset, family, single_file, _, __", CASES)
def test_single_file_inpainting_unet_takes_every_key(manifest, preset, family, single_file, _, __):
    """The single file's UNet keys with input_blocks.0.0.weight [320, 9, 3, 3]: the config read from the
    keys is the inpainting preset, and that UNet (meta device) takes every key, shapes included."""
    checkpoint = widened(meta_tensors(manifest(single_file)), f"{UNET_PREFIX}input_blocks.0.0.weight")
    assert detect(checkpoint).family == family  # an inpainting file is its base model's family
    config = unet_config_from_keys(checkpoint)
    assert config == PRESETS[preset] and config.in_channels == 9 and config.out_channels == 4
    unet = build_exact(UNet, config, sd._unet_weights(checkpoint, ema=True))  # nothing missing, nothing unexpected
    assert unet.input_blocks[0][0].weight.shape[1] == 9


@pytest.mark.parametrize("preset, _, __, diffusers_file, hub_folder", CASES)
def test_diffusers_inpainting_unet_takes_every_key(manifest, shared_hf, preset, _, __, diffusers_file, hub_folder):
    """The diffusers UNet manifest with conv_in.weight [320, 9, 3, 3] and its config.json with in_channels 9
    (as the inpainting repositories ship them) build the inpainting preset, which takes every key."""
    weights = widened(meta_tensors(manifest(diffusers_file)), "conv_in.weight")
    config_json = json.loads((shared_hf / hub_folder / "unet" / "config.json").read_text()) | {"in_channels": 9}
    config = with_weight_channels(unet_config_from_diffusers(config_json), weights)
    assert config == PRESETS[preset]
    with torch.device("meta"):
        unet = UNet(config)
    load_exact(unet, unet_from_diffusers(weights, config))
    assert unet.config.in_channels == 9


def test_diffusers_converter_maps_the_nine_channel_single_file_the_same(manifest, shared_hf):
    """Oracle: diffusers' convert_ldm_unet_checkpoint sends every tensor of the 9-channel SD1.5 single file
    to the name ours does (conv_in included)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    checkpoint = widened(meta_tensors(manifest("sd15_v1-5-pruned-emaonly.json")), f"{UNET_PREFIX}input_blocks.0.0.weight")
    config_json = json.loads((shared_hf / "runwayml/stable-diffusion-v1-5/unet/config.json").read_text()) | {"in_channels": 9}
    theirs = convert_ldm_unet_checkpoint(checkpoint, config_json)
    ours = unet_to_diffusers({k.removeprefix(UNET_PREFIX): t for k, t in checkpoint.items() if k.startswith(UNET_PREFIX)},
                             PRESETS["sd15-inpainting"])
    assert theirs.keys() == ours.keys() and all(theirs[key] is ours[key] for key in ours)
    assert tuple(ours["conv_in.weight"].shape) == (320, 9, 3, 3)


def test_weights_overrule_a_config_json_that_states_other_channels(manifest, shared_hf, caplog):
    """A diffusers folder whose config.json says in_channels 4 beside 9-channel weights builds the
    9-channel UNet and says so in the log."""
    weights = widened(meta_tensors(manifest("diffusers_sd15_unet.json")), "conv_in.weight")
    config_json = json.loads((shared_hf / "runwayml/stable-diffusion-v1-5/unet/config.json").read_text())
    with caplog.at_level(logging.WARNING, logger="minigen.loading.keymaps_unet"):
        config = with_weight_channels(unet_config_from_diffusers(config_json), weights, "sd15/unet")
    assert config.in_channels == 9
    assert "sd15/unet: config.json states in_channels=4, its weights have 9; using 9" in caplog.text
    assert with_weight_channels(PRESETS["sd15"], {}) == PRESETS["sd15"]  # no conv_in: load_exact will say so


# --- parity with diffusers ----------------------------------------------------------------------------


def tiny_inpainting_unet(name: str):
    """diffusers UNet2DConditionModel(in_channels=9) of TINY_DIFFUSERS_UNETS[name], every weight + N(0, 0.1²), seed 0."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(**TINY_DIFFUSERS_UNETS[name], in_channels=9, sample_size=16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("name", list(TINY_DIFFUSERS_UNETS))
def test_tiny_nine_channel_unet_matches_diffusers(name):
    """Our UNet given the weights of diffusers' 9-channel UNet in the single-file layout (which diffusers' own
    converter turns back into the reference's state dict): the same output within 1e-5 (fp32)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    reference = tiny_inpainting_unet(name)
    weights = reference.state_dict()
    config = with_weight_channels(unet_config_from_diffusers(dict(reference.config)), weights)
    assert config.in_channels == 9
    ldm = unet_from_diffusers(weights, config)
    back = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in ldm.items()}, reference.config)
    assert back.keys() == weights.keys() and all(torch.equal(back[k], v) for k, v in weights.items())
    ours = build_exact(UNet, config, ldm).eval()  # every key used, every shape matching
    out, expected = run_both(reference, ours, size=(16, 12), channels=9)
    assert expected.std() > 0.2  # a real output, not a constant
    assert (out - expected).abs().max() <= TOL


# --- loading ------------------------------------------------------------------------------------------


def test_single_file_reads_nine_channels_off_the_weights(tmp_path):
    """A tiny SD1 single file whose UNet's first conv has 9 input channels and whose metadata states no UNet
    config: load_sd reads in_channels 9 from the weights (head count and groups given, as a tiny file needs)."""
    from minigen.text.encoders import TextEncoderConfig, build_text_encoder
    from minigen.transformers_compat import file_layout

    unet_config = replace(TINY_UNET, in_channels=9)
    unet = UNet(unet_config)
    text_config = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, hidden_act="quick_gelu")
    text = build_text_encoder(text_config)
    checkpoint = {
        **{UNET_PREFIX + k: v for k, v in unet.state_dict().items()},
        **{"first_stage_model." + k: v for k, v in AutoencoderKL(TINY_VAE).state_dict().items()},
        **{"cond_stage_model.transformer." + k: v for k, v in file_layout(text.state_dict(), text, "text_model").items()},
    }
    assert tuple(checkpoint[f"{UNET_PREFIX}input_blocks.0.0.weight"].shape) == (32, 9, 3, 3)
    metadata = config_metadata({sd.METADATA_TEXT_CONFIG: text_config})
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, tmp_path / "tiny-inpainting.safetensors", metadata)
    pipe = sd.load_sd(tmp_path / "tiny-inpainting.safetensors",
                      unet_config={"num_heads": 4, "head_dim": None, "norm_groups": 8})
    assert pipe.unet.config == unet_config and pipe.is_inpainting
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())


def test_diffusers_folder_reads_nine_channels_off_the_weights(tmp_path, shared_hf, caplog):
    """A diffusers inpainting folder (saved by diffusers' StableDiffusionInpaintPipeline) loads as an
    inpainting pipeline, also when its unet/config.json wrongly states 4 input channels."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline
    from transformers import CLIPTokenizer

    from conftest import diffusers_vae, tiny_clip

    repo = shared_hf / "runwayml/stable-diffusion-v1-5"
    pipe = StableDiffusionInpaintPipeline(
        vae=diffusers_vae(TINY_VAE), text_encoder=tiny_clip(32), tokenizer=CLIPTokenizer.from_pretrained(repo / "tokenizer"),
        unet=tiny_inpainting_unet("sd15-like"), scheduler=EulerDiscreteScheduler.from_pretrained(repo / "scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp_path)
    loaded = sd.load_sd(tmp_path)
    assert loaded.unet.config.in_channels == 9 and loaded.is_inpainting

    config_file = tmp_path / "unet" / "config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"in_channels": 4}))
    with caplog.at_level(logging.WARNING, logger="minigen.loading.keymaps_unet"):
        loaded = sd.load_sd(tmp_path)
    assert loaded.unet.config.in_channels == 9 and "states in_channels=4, its weights have 9" in caplog.text
    reference = pipe.unet.state_dict()
    ours = unet_to_diffusers(loaded.unet.state_dict(), loaded.unet.config)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)


# --- presets ------------------------------------------------------------------------------------------


def test_inpainting_presets_resolve_to_their_repositories(monkeypatch):
    """sd15-inpainting fetches the repository's fp16 safetensors (its full-precision weights are pickles only);
    sdxl-inpainting the full-precision ones; both are presets of load_pipeline."""
    from minigen.loading.auto import PRESETS as PIPELINE_PRESETS
    from minigen.loading.auto import is_flux

    asked = []

    def fake_resolve(source, patterns, **_):
        asked.append((source, patterns))
        raise LookupError("stop here")

    monkeypatch.setattr(sd, "resolve", fake_resolve)
    for preset in ("sd15-inpainting", "sdxl-inpainting"):
        assert preset in PIPELINE_PRESETS and not is_flux(preset)
        with pytest.raises(LookupError):
            sd.load_sd(preset)
    (sd15, sd15_patterns), (sdxl, sdxl_patterns) = asked
    assert sd15 == "stable-diffusion-v1-5/stable-diffusion-inpainting"
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in sd15_patterns
    assert "unet/diffusion_pytorch_model.safetensors" not in sd15_patterns
    assert sdxl == "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
    assert {"unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"} <= set(sdxl_patterns)


