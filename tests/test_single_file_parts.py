"""Single files with a part missing, a part of another model, or more than the model: each is read as
its keys say or refused by name at load time (not at the first step, and never loaded as something else).

Files are built from the shipped toy-sd (weights/) and from a tiny SDXL single file made here (sgm key
layout: UNet, VAE, CLIP-L, OpenCLIP-bigG with its projection, minigen's config in the metadata).
Comparisons of weights are exact (`torch.equal`).
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from minigen.loading.detect import CheckpointError
from minigen.loading.files import config_metadata, read_metadata, read_state_dict
from minigen.loading.keymaps_text import open_clip_from_transformers
from minigen.loading.sd import load_sd
from minigen.loading.toy import TOY_SD
from minigen.models.unet import UNet
from minigen.models.unet_config import UNetConfig
from minigen.models.vae import AutoencoderKL, VAEConfig

SDXL_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), transformer_depth=(0, 2), transformer_depth_middle=2, num_heads=None,
                       head_dim=8, context_dim=32, use_linear_proj=True, adm_in_channels=16 + 6 * 256, norm_groups=8)  # fmt: skip
SDXL_VAE = VAEConfig(base_channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8, scaling_factor=0.13025)


def toy_sd_file(tmp_path, change=lambda weights: None, name="variant.safetensors"):
    weights = {key: value.clone() for key, value in read_state_dict(TOY_SD).items()}
    change(weights)
    save_file(weights, tmp_path / name, metadata=read_metadata(TOY_SD))
    return tmp_path / name


def text_tower(projection: bool) -> dict[str, torch.Tensor]:
    config = CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=1, projection_dim=16,
                            hidden_act="gelu" if projection else "quick_gelu", eos_token_id=49407)  # fmt: skip
    torch.manual_seed(1 + projection)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    return {key: value for key, value in model.state_dict().items() if "position_ids" not in key}


@pytest.fixture(scope="module")
def sdxl_parts():
    """A tiny SDXL single file's tensors and metadata (sgm layout)."""
    torch.manual_seed(0)
    weights = {f"model.diffusion_model.{k}": v for k, v in UNet(SDXL_UNET).state_dict().items()}
    weights |= {f"first_stage_model.{k}": v for k, v in AutoencoderKL(SDXL_VAE).state_dict().items()}
    weights |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in text_tower(False).items()}
    weights |= {f"conditioner.embedders.1.model.{k}": v for k, v in open_clip_from_transformers(text_tower(True)).items()}
    metadata = config_metadata({"minigen.unet_config": SDXL_UNET, "minigen.vae_config": SDXL_VAE})
    metadata["minigen.pipeline"] = json.dumps({"default_size": 64})
    return weights, metadata


def sdxl_file(tmp_path, parts, keep=lambda key: True):
    weights, metadata = parts
    path = tmp_path / "sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items() if keep(k)}, path, metadata=metadata)
    return path


def test_the_tiny_sdxl_file_loads(tmp_path, sdxl_parts):
    pipe = load_sd(sdxl_file(tmp_path, sdxl_parts))
    assert pipe.is_sdxl and len(pipe.text_encoders) == 2


@pytest.mark.parametrize("dropped, message", [
    ("conditioner.embedders.1.", "lacks SDXL's second text encoder, OpenCLIP-bigG"),  # was KeyError 'text_encoder_2'
    ("conditioner.embedders.1.model.text_projection", "lacks its text_projection"),  # loaded, then AttributeError at generate
    ("conditioner.embedders.0.", "has no CLIP-L text encoder"),  # was a KeyError telling to pass an SDXL file
])  # fmt: skip
def test_an_sdxl_file_without_a_text_encoder_part_is_refused(tmp_path, sdxl_parts, dropped, message):
    with pytest.raises(CheckpointError, match=message):
        load_sd(sdxl_file(tmp_path, sdxl_parts, keep=lambda key: not key.startswith(dropped)))


def test_a_file_without_a_vae_needs_one_and_takes_the_given_one(tmp_path):
    """A UNet-and-text-encoders file was a bare KeyError, and vae= could not rescue it (the file's VAE was
    built first): it is refused naming vae=, and with vae= it takes that VAE's weights."""
    no_vae = toy_sd_file(tmp_path, lambda w: [w.pop(k) for k in [k for k in w if k.startswith("first_stage_model.")]])
    with pytest.raises(CheckpointError, match=r"has no VAE \(no first_stage_model.\* keys\): pass the base model's with vae="):
        load_sd(no_vae)
    pipe, toy = load_sd(no_vae, vae=TOY_SD), load_sd(TOY_SD)
    ours, theirs = pipe.vae.state_dict(), toy.vae.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert pipe.vae.config == toy.vae.config


def test_a_full_checkpoint_of_another_latent_space_is_refused_as_vae(tmp_path, sdxl_parts):
    """An SDXL checkpoint given as vae= to an SD1.x model loaded its VAE into SD1's latent space."""
    with pytest.raises(CheckpointError, match=r"sdxl.safetensors is a full sdxl checkpoint: its VAE encodes latents of scale 0.13025"):
        load_sd(TOY_SD, vae=sdxl_file(tmp_path, sdxl_parts))


def test_v_prediction_and_zero_terminal_snr_markers(tmp_path):
    """ComfyUI's and A1111's v-prediction files carry an empty `v_pred` key (dropped: sampled as epsilon);
    `ztsnr` (zero terminal SNR, infinite last sigma) is refused as its diffusers config is."""
    assert load_sd(TOY_SD).schedule.prediction_type == "epsilon"
    v_pred = toy_sd_file(tmp_path, lambda w: w.update(v_pred=torch.tensor([])))
    assert load_sd(v_pred).schedule.prediction_type == "v"
    ztsnr = toy_sd_file(tmp_path, lambda w: w.update(v_pred=torch.tensor([]), ztsnr=torch.tensor([])), name="z.safetensors")
    with pytest.raises(CheckpointError, match="marks zero-terminal-SNR training"):
        load_sd(ztsnr)


def test_keys_outside_the_model_are_named_in_a_warning(tmp_path):
    """A ControlNet or LoRA stored in the file was dropped without a word; ldm's schedule buffers and EMA
    bookkeeping are not warned about."""
    def extras(weights):
        weights.update({"control_model.input_blocks.0.0.weight": torch.zeros(2), "lora_unet_down_blocks_0.lora_up.weight": torch.zeros(2),
                        "betas": torch.zeros(2), "model_ema.decay": torch.tensor(0.9)})  # fmt: skip

    with pytest.warns(UserWarning, match=r"2 keys outside the UNet, VAE and text encoders are not used \(control_model\*, lora_unet\*;"):
        load_sd(toy_sd_file(tmp_path, extras))


def test_a_unet_of_unofficial_width_without_its_config_warns_that_its_heads_are_a_guess(tmp_path):
    """toy-sd re-saved without minigen's metadata (any merge tool does that) was built with guessed heads
    and ran 1.4 off, without a word; official widths (768, 1024, 2048) are not warned about."""
    weights = read_state_dict(TOY_SD)
    metadata = {k: v for k, v in read_metadata(TOY_SD).items() if k != "minigen.unet_config"}
    save_file({k: v.contiguous() for k, v in weights.items()}, tmp_path / "plain.safetensors", metadata=metadata)
    with pytest.warns(UserWarning, match=r"this UNet reads \d+-wide text, none of SD1.x/SD2.x/SDXL's, so its attention heads are a guess"):
        load_sd(tmp_path / "plain.safetensors")
