"""A standalone VAE replacing a pipeline's (minigen/loading/vae.py; `load_sd(..., vae=)`, `load_pipeline(..., vae=)`).

* Tiny random VAEs saved in every layout a VAE ships in (LDM file, with and without `first_stage_model.`,
  diffusers file, diffusers folder, a pipeline folder's vae/, a pickled .ckpt with ldm's training
  loss) load back equal to the original, tensor for tensor (`torch.equal`), and decode as diffusers'
  AutoencoderKL with those weights does (max abs difference <= 1e-5, fp32).
* A VAE of another latent space (the FLUX autoencoder's 16 channels, another downsampling factor) is
  refused by name; a file that is no VAE too.
* The replacement keeps the pipeline's latent scale (toy-sd 0.56029, SD1.x 0.18215, SDXL 0.13025).
* Coverage on the official manifests (meta tensors): SD1.5's and SDXL's VAE in the single-file and
  diffusers layouts go through the same reading and build an AutoencoderKL that takes every key.
"""

import logging
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from minigen.loading.auto import load_pipeline
from minigen.loading.coverage import build_exact
from minigen.loading.detect import CheckpointError
from minigen.loading.files import read_state_dict
from minigen.loading.keymaps_vae import vae_from_diffusers, vae_to_diffusers
from minigen.loading.toy import TOY_FLUX, TOY_SD
from minigen.loading.vae import load_vae, vae_config, vae_weights
from minigen.models.vae import PRESETS as VAE_PRESETS
from minigen.models.vae import AutoencoderKL

from conftest import TINY_FLUX_VAE, TINY_VAE, diffusers_vae, meta_tensors

TOL = 1e-5


def random_vae(config, seed=0):
    """An AutoencoderKL of `config` with every weight + N(0, 0.05²) (norms not all 1), eval mode."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(config).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return vae


def save(tensors, path, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata)
    return path


def assert_same_weights(loaded: AutoencoderKL, expected: dict[str, torch.Tensor]):
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    for key, value in state.items():
        assert torch.equal(value, expected[key]), key


def decode_difference(ours: AutoencoderKL, reference) -> float:
    """Max abs difference of the two decoders on the same scaled latent (diffusers takes it unscaled)."""
    latent = torch.randn(1, ours.config.z_channels, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        mine = ours.decode(latent)
        theirs = reference.decode(latent / reference.config.scaling_factor).sample
    assert theirs.std() > 0.05
    return (mine - theirs).abs().max().item()


# --- every layout, bit for bit ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """diffusers' AutoencoderKL of TINY_VAE (random weights, as diffusers initialises them) and its weights
    under minigen's names."""
    reference = diffusers_vae(TINY_VAE)
    return reference, vae_from_diffusers(reference.state_dict())


def test_ldm_files_load_bit_for_bit(tmp_path, tiny):
    reference, weights = tiny
    plain = save(weights, tmp_path / "vae.safetensors")
    prefixed = save({"first_stage_model." + k: v for k, v in weights.items()}, tmp_path / "prefixed.safetensors")
    for file in (plain, prefixed):
        vae = load_vae(file, like=TINY_VAE)
        assert vae.config == TINY_VAE
        assert_same_weights(vae, weights)
        assert decode_difference(vae, reference) <= TOL
    standalone = load_vae(plain)  # no pipeline: SD1.x's scale; GroupNorm groups from the widths (8 here)
    assert standalone.config == TINY_VAE


def test_diffusers_file_and_folders_load_bit_for_bit(tmp_path, tiny):
    reference, weights = tiny
    file = save(reference.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    reference.save_pretrained(tmp_path / "folder")
    reference.save_pretrained(tmp_path / "pipeline" / "vae")  # a pipeline folder: its vae/ is taken
    for source in (file, tmp_path / "folder", tmp_path / "pipeline"):
        vae = load_vae(source, like=TINY_VAE)
        assert vae.config == TINY_VAE
        assert_same_weights(vae, weights)
        assert decode_difference(vae, reference) <= TOL
    assert load_vae(tmp_path / "folder").config == TINY_VAE  # config.json alone says it all


def test_pickled_vae_needs_allow_pickle_and_its_training_loss_is_dropped(tmp_path, tiny):
    """ldm's unpruned VAE .ckpt: {"state_dict": {encoder.*, ..., loss.*}} with the training loss's weights."""
    _, weights = tiny
    loss = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4)}
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": {**weights, **loss}, "global_step": 840000}, path)
    with pytest.raises(PermissionError, match="allow_pickle=True"):
        load_vae(path, like=TINY_VAE)
    assert_same_weights(load_vae(path, like=TINY_VAE, allow_pickle=True), weights)


# --- refusals -----------------------------------------------------------------------------------------


def test_a_vae_of_another_latent_space_is_refused(tmp_path):
    flux_ae = save(random_vae(TINY_FLUX_VAE).state_dict(), tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match=r"ae\.safetensors is a VAE with 16 latent channels \(a FLUX autoencoder\), "
                                              r"but this pipeline's model works on 4-channel latents: pass a VAE made for it"):
        load_vae(flux_ae, like=TINY_VAE)
    four_x = save(random_vae(replace(TINY_VAE, channel_mult=(1, 2, 2))).state_dict(), tmp_path / "vae-4x.safetensors")
    with pytest.raises(CheckpointError, match=r"vae-4x\.safetensors shrinks images 4x into latents, but this pipeline's VAE 8x"):
        load_vae(four_x, like=TINY_VAE)


def test_toy_sd_refuses_the_flux_autoencoder():
    """The shipped toy-flux ae (16 channels) given to toy-sd: refused before anything is built."""
    with pytest.raises(CheckpointError, match=r"ae\.safetensors is a VAE with 16 latent channels \(a FLUX autoencoder\)"):
        load_pipeline("toy-sd", vae=TOY_FLUX / "ae.safetensors")


def test_a_file_that_is_no_vae_is_refused(tmp_path):
    unet_only = {k: v for k, v in read_state_dict(TOY_SD).items() if k.startswith("model.diffusion_model.")}
    path = save(unet_only, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match=r"unet\.safetensors is not a VAE: it looks like sd1 \(single-file layout\)\. Pass a VAE file"):
        load_vae(path)
    with pytest.raises(ValueError, match=r"vae replaces an SD / SDXL model's VAE; toy-flux is a FLUX model.*ae="):
        load_pipeline("toy-flux", vae=path)


def test_a_vae_hub_id_offline_fails_at_once_naming_local_files(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from minigen.loading.hub import ModelFetchError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ModelFetchError, match=r"'stabilityai/sd-vae-ft-mse'(.|\n)*Offline, pass a local VAE instead: "
                                              r"a file such as vae-ft-mse-840000-ema-pruned\.safetensors"):
        load_vae("stabilityai/sd-vae-ft-mse", like=VAE_PRESETS["sd"])
    assert time.perf_counter() - start < 2.0


# --- replacing toy-sd's VAE ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_config():
    return load_pipeline("toy-sd").vae.config


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_load_pipeline_toy_sd_uses_the_given_vae(tmp_path, toy_config, layout):
    """A VAE of toy-sd's own config (3 levels, 8 groups), random weights, saved without any config: toy-sd
    loads with it, keeping its latent scale 0.56029 and its group count, and decodes as that VAE does."""
    vae = random_vae(toy_config, seed=1)
    tensors = vae.state_dict() if layout == "ldm" else vae_to_diffusers(vae.state_dict())
    pipe = load_pipeline("toy-sd", vae=save(tensors, tmp_path / f"{layout}.safetensors"))
    assert pipe.vae.config == toy_config and pipe.vae.config.scaling_factor == 0.56029
    assert_same_weights(pipe.vae, vae.state_dict())
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(pipe.vae.decode(latent), vae.decode(latent))
    assert not pipe.vae.decoder.conv_in.weight.requires_grad and not pipe.vae.training


def test_the_pipeline_keeps_its_latent_scale_whatever_the_vae_states(tmp_path, toy_config, caplog):
    """A diffusers VAE folder whose config.json states SDXL's 0.13025: toy-sd keeps 0.56029 and says so."""
    reference = diffusers_vae(replace(toy_config, scaling_factor=0.13025))
    reference.save_pretrained(tmp_path / "vae")
    with caplog.at_level(logging.WARNING, logger="minigen.loading.vae"):
        pipe = load_pipeline("toy-sd", vae=tmp_path / "vae")
    assert pipe.vae.config == toy_config
    assert "states scaling factor 0.13025 and shift 0.0; keeping the pipeline's 0.56029" in caplog.text
    assert load_vae(tmp_path / "vae").config.scaling_factor == 0.13025  # alone, the folder's own scale


def test_an_sdxl_pipeline_keeps_0_13025():
    """like=SDXL's VAE config: an LDM file (which states no scale) gets SDXL's."""
    weights = {k: torch.empty(v.shape, device="meta") for k, v in AutoencoderKL(TINY_VAE).state_dict().items()}
    sdxl_like = replace(TINY_VAE, scaling_factor=VAE_PRESETS["sdxl"].scaling_factor)
    assert vae_config(weights, None, sdxl_like).scaling_factor == 0.13025
    assert vae_config(weights, None, None).scaling_factor == 0.18215


# --- the official layouts (manifests, meta tensors) ---------------------------------------------------

OFFICIAL = [  # manifest, the pipeline VAE it replaces
    ("sd15_v1-5-pruned-emaonly.json", "sd"),  # a full single file: its first_stage_model.*
    ("sdxl_sd_xl_base_1.0.json", "sdxl"),
    ("diffusers_sd15_vae.json", "sd"),  # diffusers 0.6 names (query/key/value/proj_attn)
    ("diffusers_sdxl_vae.json", "sdxl"),
]


@pytest.mark.parametrize("name, family", OFFICIAL)
def test_official_vae_layouts_build_and_take_every_key(manifest, name, family):
    weights = vae_weights(meta_tensors(manifest(name)), name)
    config = vae_config(weights, None, VAE_PRESETS[family], name)
    assert config == VAE_PRESETS[family]
    build_exact(AutoencoderKL, config, weights)  # meta device: nothing missing, nothing unexpected, shapes equal
    ldm_only = dict(weights)  # the keys of an LDM VAE file (vae-ft-mse-840000-ema-pruned) are these
    assert vae_weights(ldm_only, "vae.safetensors").keys() == weights.keys()


def test_the_official_flux_ae_is_refused_for_sd(manifest):
    weights = vae_weights(meta_tensors(manifest("ae.json")), "ae.safetensors")
    with pytest.raises(CheckpointError, match=r"16 latent channels \(a FLUX autoencoder\)"):
        vae_config(weights, None, VAE_PRESETS["sd"], "ae.safetensors")
