"""Files minigen cannot run are refused by name when they load, not at the first step (or never).

Each case builds the variant from the shipped toy models or a config (an instruct-pix2pix-like UNet, a
FLUX Fill-like transformer, an SDXL refiner folder, an SD3 folder, an EDM scheduler, an IP-Adapter with a
full-face projection), and one case loads a file the others' rules must not refuse: an SD1 file in the
older CLIP key layout.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minigen.loading.detect import CheckpointError
from minigen.loading.files import read_metadata, read_state_dict
from minigen.loading.flux import load_flux
from minigen.loading.keymaps_unet import unet_config_from_diffusers
from minigen.loading.keymaps_vae import vae_config_from_diffusers
from minigen.loading.sd import load_sd
from minigen.loading.toy import TOY_FLUX, TOY_SD
from minigen.sampling import DiscreteSchedule


def toy_sd_variant(tmp_path, change) -> Path:
    weights = {key: value.clone() for key, value in read_state_dict(TOY_SD).items()}
    metadata = read_metadata(TOY_SD)
    change(weights, metadata)
    path = tmp_path / "variant.safetensors"
    save_file(weights, path, metadata=metadata)
    return path


def test_an_image_conditioned_unet_is_refused(tmp_path):
    def eight_channels(weights, metadata):  # instruct-pix2pix: the latent and the input image's latent
        conv = weights["model.diffusion_model.input_blocks.0.0.weight"]
        weights["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([conv, torch.zeros_like(conv)], 1)
        config = json.loads(metadata["minigen.unet_config"])
        metadata["minigen.unet_config"] = json.dumps({**config, "in_channels": 2 * config["in_channels"]})

    with pytest.raises(CheckpointError, match="reads 8 input channels, neither the latent's 4 .* nor 9 .*instruct-pix2pix"):
        load_sd(toy_sd_variant(tmp_path, eight_channels))


def test_the_older_clip_key_layout_of_sd1_files_loads(tmp_path):
    """Some SD1 files name the text encoder cond_stage_model.transformer.embeddings.* (no text_model.): the
    same encoder, so the same prompt embeddings as the same file in today's layout (both without minigen's
    metadata, as community files come, so the text config is read off the keys)."""
    prefix = "cond_stage_model.transformer."

    def plain(weights, metadata):
        metadata.pop("minigen.text_config")

    def older(weights, metadata):
        plain(weights, metadata)
        for key in [k for k in weights if k.startswith(prefix + "text_model.")]:
            weights[key.replace("text_model.", "", 1)] = weights.pop(key)

    (tmp_path / "older").mkdir()
    pipe, reference = load_sd(toy_sd_variant(tmp_path / "older", older)), load_sd(toy_sd_variant(tmp_path, plain))
    ours, theirs = (p.encode_prompt(["a red star"], 64, 64).context for p in (pipe, reference))
    assert torch.equal(ours, theirs)


def test_a_flux_fill_like_transformer_is_refused(tmp_path):
    weights = {key: value.clone() for key, value in read_state_dict(TOY_FLUX / "flux1-toy.safetensors").items()}
    metadata = read_metadata(TOY_FLUX / "flux1-toy.safetensors")
    weights["img_in.weight"] = torch.zeros(weights["img_in.weight"].shape[0], 384)  # latent, masked latent and mask
    config = json.loads(metadata["minigen.flux_config"])
    metadata["minigen.flux_config"] = json.dumps({**config, "in_channels": 384})
    save_file(weights, tmp_path / "fill.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match="reads 384 input channels per token, not the 64 of text-to-image FLUX.1"):
        load_flux(tmp_path / "fill.safetensors", ae=TOY_FLUX / "ae.safetensors", text_encoders=TOY_FLUX, dtype=torch.float32)


@pytest.mark.parametrize("index, loader, message", [
    ({"_class_name": "StableDiffusion3Pipeline"}, load_sd, "holds a StableDiffusion3Pipeline .*not a Stable Diffusion 1.x/2.x/XL pipeline"),
    ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True}, load_sd, "holds the SDXL refiner"),
    ({"_class_name": "FluxFillPipeline"}, load_flux, "holds a FluxFillPipeline .*not a FLUX.1 dev or schnell pipeline"),
    ({"_class_name": "FluxKontextPipeline"}, load_flux, "holds a FluxKontextPipeline"),
], ids=["sd3", "sdxl-refiner", "flux-fill", "flux-kontext"])  # fmt: skip
def test_folders_of_other_pipelines_are_refused_by_their_class(tmp_path, index, loader, message):
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=message):
        loader(tmp_path)


def test_a_folder_of_single_files_is_told_to_pass_the_file(tmp_path):
    (tmp_path / "flux1-dev.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"not a complete diffusers SD/SDXL folder; for a single-file checkpoint pass the file itself \(flux1-dev.safetensors\)"):
        load_sd(tmp_path)


def test_a_folder_with_an_edm_scheduler_is_refused_before_its_weights_are_read(tmp_path):
    """Playground v2.5's layout: an EDM scheduler (no beta schedule). Only the configs exist here, so the
    refusal comes before any weight file is looked for, and it names the folder."""
    (tmp_path / "unet").mkdir(), (tmp_path / "scheduler").mkdir(), (tmp_path / "vae").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D"] * 2,
                                                                "up_block_types": ["CrossAttnUpBlock2D"] * 2, "attention_head_dim": 4}))  # fmt: skip
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [32], "latent_channels": 4}))
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "EDMDPMSolverMultistepScheduler"}))
    with pytest.raises(CheckpointError, match=f"{tmp_path}: scheduler 'EDMDPMSolverMultistepScheduler' has no DDPM beta schedule"):
        load_sd(tmp_path)


def test_schedules_and_configs_minigen_does_not_implement_are_refused():
    with pytest.raises(ValueError, match="'EDMDPMSolverMultistepScheduler' has no DDPM beta schedule"):
        DiscreteSchedule.from_diffusers_config({"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_min": 0.002, "sigma_max": 80.0})
    with pytest.raises(ValueError, match="latents_mean / latents_std"):
        vae_config_from_diffusers({"block_out_channels": [32], "latent_channels": 4, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4})
    unet = {"block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D"] * 2, "up_block_types": ["CrossAttnUpBlock2D"] * 2,
            "attention_head_dim": 4, "cross_attention_dim": 32}  # fmt: skip
    for field, value in [("resnet_out_scale_factor", 2.0), ("mid_block_scale_factor", 1.414), ("timestep_post_act", "silu"), ("time_embedding_act_fn", "silu")]:
        with pytest.raises(ValueError, match=f"unet config sets {field}="):
            unet_config_from_diffusers({**unet, field: value})
    with pytest.raises(ValueError, match=r"unet config block_out_channels: level widths \(32, 40\) are not whole multiples of the first"):
        unet_config_from_diffusers({**unet, "block_out_channels": [32, 40]})  # read as (1, 1) x 32 before: a narrower model
    with pytest.raises(ValueError, match=r"vae config block_out_channels: level widths \(32, 48\) are not whole multiples"):
        vae_config_from_diffusers({"block_out_channels": [32, 48], "latent_channels": 4})


@pytest.mark.parametrize("prefix, key", [("cond_stage_model.transformer.", "text_model.embeddings.token_embedding.weight"),
                                         ("first_stage_model.", "encoder.down.0.block.0.conv2.weight")], ids=["text", "vae"])
@pytest.mark.filterwarnings("ignore:this UNet reads 64-wide text")  # toy-sd's heads, without the metadata that states them
def test_a_single_file_without_metadata_lacking_a_key_its_config_is_read_from_names_it(tmp_path, prefix, key):
    """The configs of a file without minigen's metadata come from its shapes; a missing one was a bare KeyError."""

    def damaged(weights, metadata):
        del weights[prefix + key]
        metadata.clear()

    with pytest.raises(CheckpointError, match=f"the file lacks {key}; it is incomplete or another kind of checkpoint"):
        load_sd(toy_sd_variant(tmp_path, damaged))


@pytest.mark.parametrize("key", ["image_proj.proj_in.weight", "image_proj.proj_out.weight", "image_proj.layers.0.0.to_q.weight",
                                 "image_proj.layers.0.1.1.weight"])
def test_an_ip_adapter_plus_lacking_a_key_its_shape_is_read_from_names_it(key):
    from minigen.loading.ip_adapter import ip_adapter_from_state_dict
    from minigen.loading.toy import toy_ip_adapter_files

    weights = read_state_dict(toy_ip_adapter_files()["adapter"])
    del weights[key]
    with pytest.raises(CheckpointError, match=f"the file lacks {key}; it is incomplete or another kind of checkpoint"):
        ip_adapter_from_state_dict(weights, load_sd(TOY_SD).unet)


def test_an_ip_adapter_with_a_full_face_projection_is_refused():
    from minigen.loading.ip_adapter import ip_adapter_from_state_dict
    from minigen.loading.toy import toy_ip_adapter_files

    unet = load_sd(TOY_SD).unet
    width = unet.config.context_dim
    toy = read_state_dict(toy_ip_adapter_files()["adapter"])
    weights = {key: value for key, value in toy.items() if key.startswith("ip_adapter.")}  # the toy adapter's layers
    weights |= {"image_proj.proj.0.weight": torch.zeros(64, 32), "image_proj.proj.0.bias": torch.zeros(64),
                "image_proj.proj.2.weight": torch.zeros(width * 4, 64), "image_proj.norm.weight": torch.ones(width)}  # fmt: skip
    with pytest.raises(CheckpointError, match="full-face and FaceID adapters are not supported"):
        ip_adapter_from_state_dict(weights, unet)
