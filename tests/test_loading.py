"""Checkpoint files, family detection, coverage reports and the UNet key map.

Key maps and detection are checked on the official key manifests (../shared/manifests) as meta
tensors: names and shapes of the real files, no weights.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from minigen.loading.coverage import LDM_TRAINING_KEYS, load_exact
from minigen.loading.detect import UNET_PREFIX, CheckpointError, detect, require
from minigen.loading.files import read_diffusers_component, read_state_dict
from minigen.loading.keymaps_unet import (
    module_pairs,
    unet_config_from_diffusers,
    unet_config_from_keys,
    unet_from_diffusers,
    unet_to_diffusers,
)
from minigen.models.unet_config import PRESETS

from conftest import TINY_SDXL_UNET, TINY_UNET, TINY_VAE, meta_tensors

REPO = pathlib.Path(__file__).resolve().parents[1]

UNET_CONFIGS = {**PRESETS, "tiny-sd": TINY_UNET, "tiny-sdxl": TINY_SDXL_UNET}  # presets and test configs

# preset, single-file manifest, diffusers UNet manifest, hub folder in ../shared/hf
UNET_CASES = [
    ("sd15", "sd15_v1-5-pruned-emaonly.json", "diffusers_sd15_unet.json", "runwayml/stable-diffusion-v1-5"),
    ("sdxl", "sdxl_sd_xl_base_1.0.json", "diffusers_sdxl_unet.json", "stabilityai/stable-diffusion-xl-base-1.0"),
]


def shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(t.shape) for key, t in state_dict.items()}


# --- UNet key map -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, single_file, diffusers_file, _", UNET_CASES)
def test_unet_map_round_trip_on_official_manifests(manifest, preset, single_file, diffusers_file, _):
    """diffusers manifest -> ldm gives exactly the single file's UNet keys and shapes, and back."""
    ldm = meta_tensors(manifest(single_file), UNET_PREFIX)
    diffusers = meta_tensors(manifest(diffusers_file))
    config = PRESETS[preset]

    assert shapes(unet_from_diffusers(diffusers, config)) == shapes(ldm)
    assert shapes(unet_to_diffusers(ldm, config)) == shapes(diffusers)
    back = unet_from_diffusers(unet_to_diffusers(ldm, config), config)
    assert all(back[key] is ldm[key] for key in ldm)  # same tensor objects: a pure renaming


@pytest.mark.parametrize("preset, single_file, _, hub_folder", UNET_CASES)
def test_unet_map_agrees_with_diffusers_converter(manifest, shared_hf, preset, single_file, _, hub_folder):
    """Oracle: diffusers' convert_ldm_unet_checkpoint sends every ldm tensor to the same name as ours."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    checkpoint = meta_tensors(manifest(single_file))
    diffusers_config = json.loads((shared_hf / hub_folder / "unet" / "config.json").read_text())
    theirs = convert_ldm_unet_checkpoint(checkpoint, diffusers_config)
    ours = unet_to_diffusers({k[len(UNET_PREFIX) :]: t for k, t in checkpoint.items() if k.startswith(UNET_PREFIX)},
                             PRESETS[preset])
    assert set(theirs) == set(ours)
    assert all(theirs[key] is ours[key] for key in ours)


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_unet_map_is_one_to_one(name):
    """No two modules share a name on either side, so the inverse map is well defined."""
    pairs = module_pairs(UNET_CONFIGS[name])
    assert len({ldm for ldm, _ in pairs}) == len({d for _, d in pairs}) == len(pairs)


def test_unet_map_rejects_foreign_keys():
    with pytest.raises(CheckpointError, match=r"1 keys are not diffusers UNet keys.*encoder\.conv_in\.weight"):
        unet_from_diffusers({"conv_in.weight": torch.zeros(1), "encoder.conv_in.weight": torch.zeros(1)},
                            PRESETS["sd15"])


# --- UNet configs -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, single_file, _, hub_folder", UNET_CASES)
def test_unet_config_from_keys_and_from_diffusers_config(manifest, shared_hf, preset, single_file, _, hub_folder):
    assert unet_config_from_keys(meta_tensors(manifest(single_file))) == PRESETS[preset]
    assert unet_config_from_keys(meta_tensors(manifest(single_file), UNET_PREFIX)) == PRESETS[preset]
    config_json = json.loads((shared_hf / hub_folder / "unet" / "config.json").read_text())
    assert unet_config_from_diffusers(config_json) == PRESETS[preset]


def test_unet_config_from_diffusers_refuses_other_architectures(shared_hf):
    config_json = json.loads((shared_hf / "runwayml/stable-diffusion-v1-5/unet/config.json").read_text())
    with pytest.raises(ValueError, match=r"resnet_time_scale_shift='scale_shift'.*implements"):
        unet_config_from_diffusers({**config_json, "resnet_time_scale_shift": "scale_shift"})


# --- detection ----------------------------------------------------------------------------------

EXPECTED_DETECTION = {
    "ae.json": ("flux-ae", "bfl", ""),
    "clip_vision_vit-bigG-14_image_encoder.json": ("clip-vision", "transformers", ""),
    "clip_vision_vit-h-14_image_encoder.json": ("clip-vision", "transformers", ""),
    "diffusers_flux1-dev_transformer.json": ("flux-dev", "diffusers-transformer", ""),
    "diffusers_flux1-schnell_transformer.json": ("flux-schnell", "diffusers-transformer", ""),
    "diffusers_flux1_text_encoder.json": ("clip-text", "transformers", ""),
    "diffusers_flux1_text_encoder_2.json": ("t5-text", "transformers", ""),
    "diffusers_flux1_vae.json": ("flux-ae", "diffusers-vae", ""),
    "diffusers_sd15_text_encoder.json": ("clip-text", "transformers", ""),
    "diffusers_sd15_unet.json": ("sd1", "diffusers-unet", ""),
    "diffusers_sd15_vae.json": ("sd-vae", "diffusers-vae", ""),
    "diffusers_sdxl_text_encoder.json": ("clip-text", "transformers", ""),
    "diffusers_sdxl_text_encoder_2.json": ("clip-text", "transformers", ""),
    "diffusers_sdxl_unet.json": ("sdxl", "diffusers-unet", ""),
    "diffusers_sdxl_vae.json": ("sd-vae", "diffusers-vae", ""),
    "flux1-dev.json": ("flux-dev", "bfl", ""),
    "flux1-redux-dev.json": ("flux-redux", "bfl", ""),
    "flux1-schnell.json": ("flux-schnell", "bfl", ""),
    "ip-adapter-plus_sd15.json": ("ip-adapter-plus-sd1", "ip-adapter", ""),
    "ip-adapter-plus_sdxl_vit-h.json": ("ip-adapter-plus-sdxl", "ip-adapter", ""),
    "ip-adapter_sd15.json": ("ip-adapter-sd1", "ip-adapter", ""),
    "ip-adapter_sdxl.json": ("ip-adapter-sdxl", "ip-adapter", ""),
    "ip-adapter_sdxl_vit-h.json": ("ip-adapter-sdxl", "ip-adapter", ""),
    "mixofshow_edlora.json": ("lora-sd1", "mixofshow", ""),
    "omini_subject_512.json": ("lora-flux", "peft", ""),
    "sd15_v1-5-pruned-emaonly.json": ("sd1", "single-file", UNET_PREFIX),
    "sdxl_sd_xl_base_1.0.json": ("sdxl", "single-file", UNET_PREFIX),
    "siglip-so400m-patch14-384_full.json": ("siglip", "transformers", ""),
    "siglip-so400m-patch14-384_vision.json": ("siglip-vision", "transformers", ""),
}


def test_detect_every_manifest(manifest):
    manifest("sd15_v1-5-pruned-emaonly.json")  # skips when ../shared is absent
    folder = REPO.parent / "shared" / "manifests"
    on_disk = {p.name for p in folder.glob("*.json")} - {"verification.json"}
    assert on_disk == set(EXPECTED_DETECTION), "a manifest was added or removed: update EXPECTED_DETECTION"
    for name, expected in EXPECTED_DETECTION.items():
        found = detect(meta_tensors(manifest(name)))
        assert (found.family, found.layout, found.prefix) == expected, name


def test_detect_reads_shapes_and_prefixes(manifest):
    """SD2 by its 1024-wide context, the SDXL refiner by its 2560-wide label_emb, ComfyUI's FLUX prefix."""
    sd15 = meta_tensors(manifest("sd15_v1-5-pruned-emaonly.json"))
    sd2 = {k: torch.empty(t.shape[0], 1024, device="meta") if "attn2.to_k" in k else t for k, t in sd15.items()}
    assert detect(sd2).family == "sd2"

    sdxl = meta_tensors(manifest("sdxl_sd_xl_base_1.0.json"))
    sdxl[f"{UNET_PREFIX}label_emb.0.0.weight"] = torch.empty(1536, 2560, device="meta")
    assert detect(sdxl).family == "sdxl-refiner"

    comfy_flux = {UNET_PREFIX + k: t for k, t in meta_tensors(manifest("flux1-dev.json")).items()}
    found = detect(comfy_flux)
    assert (found.family, found.layout, found.prefix) == ("flux-dev", "bfl", UNET_PREFIX)


def test_require_names_detected_family_and_missing_keys(manifest):
    sd15 = meta_tensors(manifest("sd15_v1-5-pruned-emaonly.json"))
    assert require(sd15, "sd1").prefix == UNET_PREFIX
    with pytest.raises(CheckpointError) as error:
        require(sd15, "sdxl")
    message = str(error.value)
    assert "expected a sdxl checkpoint, but this one looks like sd1 (single-file layout" in message
    assert f"{UNET_PREFIX}label_emb.0.0.weight" in message
    assert "conditioner.embedders.1.model.token_embedding.weight" in message

    with pytest.raises(CheckpointError, match=r"looks like flux-ae .*\n.*\n  img_in.weight"):
        require(meta_tensors(manifest("ae.json")), "flux-dev")
    with pytest.raises(ValueError, match="unknown model family 'sd3'; known families"):
        require(sd15, "sd3")


# --- coverage -----------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(12)])
        self.head = nn.Linear(4, 2)


def test_load_exact_loads_into_meta_module_and_casts():
    source = Tiny()
    with torch.device("meta"):
        target = Tiny()
    checkpoint = {**source.state_dict(), "model_ema.decay": torch.tensor(0.999), "betas": torch.zeros(1000)}
    load_exact(target, checkpoint, ignore=LDM_TRAINING_KEYS, dtype=torch.float16)
    assert target.head.weight.dtype == torch.float16 and not target.head.weight.is_meta
    torch.testing.assert_close(target.head.weight, source.head.weight.half(), rtol=0, atol=0)


def test_load_exact_report_lists_and_groups_differences():
    checkpoint = Tiny().state_dict()
    for i in range(12):
        del checkpoint[f"blocks.{i}.bias"]
    checkpoint["head.weight"] = torch.zeros(3, 4)
    checkpoint["vae.conv.weight"] = torch.zeros(1)
    with torch.device("meta"):
        model = Tiny()
    with pytest.raises(CheckpointError) as error:
        load_exact(model, checkpoint)
    message = str(error.value)
    assert message.startswith("checkpoint does not fit Tiny: 12 missing keys, 1 unexpected keys, 1 shape mismatches")
    assert "  blocks.9.bias\n  ... and 2 more under: blocks.10 (1), blocks.11 (1)" in message  # natural order
    assert "unexpected (in the checkpoint, not in the model):\n  vae.conv.weight" in message
    assert "head.weight: checkpoint [3, 4] vs model [2, 4]" in message
    assert model.head.weight.is_meta  # nothing was loaded


def test_full_size_unets_load_every_official_key(manifest):
    """Coverage: UNet(sd15 / sdxl) on the meta device takes every UNet key of the official single
    files, and of the diffusers files through the key map (shapes included)."""
    unet = pytest.importorskip("minigen.models.unet")
    for preset, single_file, diffusers_file, _ in UNET_CASES:
        with torch.device("meta"):
            model = unet.UNet(PRESETS[preset])
        load_exact(model, meta_tensors(manifest(single_file), UNET_PREFIX))
        with torch.device("meta"):
            model = unet.UNet(PRESETS[preset])
        load_exact(model, unet_from_diffusers(meta_tensors(manifest(diffusers_file)), PRESETS[preset]))


def tiny_diffusers_config(name: str) -> dict:
    """A diffusers unet config.json describing the tiny UNets."""
    if name == "tiny-sd":
        return dict(block_out_channels=[32, 64], layers_per_block=2, cross_attention_dim=32, attention_head_dim=4,
                    norm_num_groups=8, down_block_types=["CrossAttnDownBlock2D"] * 2,
                    up_block_types=["CrossAttnUpBlock2D"] * 2, in_channels=4, out_channels=4)
    return dict(block_out_channels=[32, 64], layers_per_block=2, cross_attention_dim=32, attention_head_dim=[4, 8],
                transformer_layers_per_block=[1, 2], norm_num_groups=8, use_linear_projection=True,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], in_channels=4, out_channels=4,
                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], addition_embed_type="text_time",
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_tiny_unet_weights_map_onto_diffusers_unet(name):
    """Oracle: our UNet's random weights, renamed, load strictly into diffusers' UNet2DConditionModel
    built from the equivalent config, and come back unchanged (exact, fp32)."""
    unet = pytest.importorskip("minigen.models.unet")
    from diffusers import UNet2DConditionModel

    config_json = tiny_diffusers_config(name)
    config = UNET_CONFIGS[name]
    assert unet_config_from_diffusers(config_json) == config
    ours = unet.UNet(config).state_dict()
    theirs = UNet2DConditionModel(**config_json)
    theirs.load_state_dict(unet_to_diffusers(ours, config), strict=True)
    back = unet_from_diffusers(theirs.state_dict(), config)
    assert set(back) == set(ours)
    assert all(torch.equal(back[key], ours[key]) for key in ours)


# --- files --------------------------------------------------------------------------------------


def test_read_safetensors_is_memory_mapped(tmp_path):
    """Peak RSS growth while reading (and touching) every tensor stays <= 1.2 x the file size: the
    tensors are views of the mapped file, not copies."""
    path = tmp_path / "weights.safetensors"
    save_file({f"w{i}": torch.randn(1024, 2048) for i in range(12)}, path)  # 96 MiB
    script = textwrap.dedent(f"""
        from minigen.loading.files import read_state_dict

        def status(field):
            line = next(l for l in open("/proc/self/status") if l.startswith(field))
            return int(line.split()[1]) * 1024

        before = status("VmRSS")
        state_dict = read_state_dict({str(path)!r})
        total = sum(float(t.sum()) for t in state_dict.values())
        print((status("VmHWM") - before) / {path.stat().st_size})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    assert float(result.stdout) <= 1.2


def test_pickles_are_refused_unless_allowed(tmp_path):
    path = tmp_path / "model.ckpt"
    weights = {"model.diffusion_model.out.2.weight": torch.randn(4, 3)}
    torch.save({"state_dict": weights, "global_step": 470000}, path)
    with pytest.raises(PermissionError, match=r"pickled PyTorch file.*arbitrary code.*allow_pickle=True"):
        read_state_dict(path)
    loaded = read_state_dict(path, allow_pickle=True)
    assert loaded.keys() == weights.keys()  # state_dict unwrapped, global_step dropped
    key = "model.diffusion_model.out.2.weight"
    torch.testing.assert_close(loaded[key], weights[key], rtol=0, atol=0)

    nested = tmp_path / "ip-adapter.bin"  # IP-Adapter's .bin: {"image_proj": {...}, "ip_adapter": {...}}
    torch.save({"image_proj": {"proj.weight": torch.zeros(2)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(2)}},
               nested)
    assert set(read_state_dict(nested, allow_pickle=True)) == {"image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight"}


def test_a_pickle_of_python_objects_is_a_checkpoint_error_even_when_allowed(tmp_path):
    """weights_only=True refuses to rebuild an arbitrary class; that is a CheckpointError (a ValueError,
    so the scripts print it on one line), naming the file and the fix."""
    import argparse

    path = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CheckpointError, match=r"objects\.ckpt holds Python objects other than tensors.*Convert it to \.safetensors"):
        read_state_dict(path, allow_pickle=True)


class CallsSystem:
    """A pickle payload: unpickled, it runs `touch <marker>` (as a malicious checkpoint would run anything)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_pickle_that_calls_a_blocked_global_is_named_malicious_and_never_runs(tmp_path, zipped):
    """torch refuses os.system ("... GLOBAL posix.system whose module posix is blocked"), which read as a file
    cut short; it is named, with the advice not to load the file, and the payload never runs."""
    from minigen.loading.textual_inversion import read_textual_inversion

    marker, path = tmp_path / "PWNED", tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.randn(2, 768)}, "x": CallsSystem(marker)}, path, _use_new_zipfile_serialization=zipped)
    system = f"{os.system.__module__}.system"  # posix.system (nt.system on Windows)
    with pytest.raises(CheckpointError, match=rf"evil\.pt asks to call {system} when unpickled, which a checkpoint never needs: "
                                              "the file may be malicious; do not load it"):
        read_textual_inversion(path, allow_pickle=True)
    assert not marker.exists()


def test_a_damaged_pickle_is_a_checkpoint_error_naming_the_file(tmp_path):
    """A .pth cut short, text or random bytes failed inside torch.load (KeyError: 101, IndexError, a zip
    error) with a traceback, or were called files of Python objects."""
    whole = tmp_path / "whole.pth"
    torch.save({"w": torch.zeros(64)}, whole)
    damaged = {"half.pth": whole.read_bytes()[: whole.stat().st_size // 2], "text.pth": b"hello",
               "noise.pth": torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy().tobytes()}  # fmt: skip
    for name, content in damaged.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=f"{name} is not a readable PyTorch file: it may be cut short or not a checkpoint"):
            read_state_dict(tmp_path / name, allow_pickle=True)


def test_ae_and_text_encoders_are_refused_where_they_cannot_apply():
    """They complete a FLUX transformer file; a folder, preset or toy model brings its own (was: ignored)."""
    from minigen.loading.auto import load_pipeline
    from minigen.loading.flux import load_flux

    folder = REPO / "weights" / "toy-flux"
    for source in ("toy-flux", "toy-sd", folder):
        with pytest.raises(ValueError, match="ae and text_encoders complete a FLUX transformer file.*leave them out"):
            load_pipeline(source, ae=folder / "ae.safetensors")
    with pytest.raises(ValueError, match="is a diffusers folder .* leave them out"):
        load_flux(folder, text_encoders=folder)


def test_a_pickled_flux_transformer_loads_with_allow_pickle(tmp_path):
    """The family was read from the pickle with allow_pickle, then the FLUX loader read the file without it:
    a PermissionError telling to pass allow_pickle, which was passed. (head_dim 128: its RoPE split is known.)"""
    from minigen.loading.auto import load_pipeline
    from minigen.models.flux import Flux
    from minigen.models.flux_config import FluxConfig

    folder = REPO / "weights" / "toy-flux"  # its autoencoder and text encoders (64 wide)
    config = FluxConfig(vec_in_dim=64, context_in_dim=64, hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1, guidance_embed=False)
    torch.save(Flux(config).state_dict(), tmp_path / "flux.ckpt")
    files = dict(ae=folder / "ae.safetensors", text_encoders=folder, dtype=torch.float32)
    with pytest.raises(PermissionError, match="allow_pickle=True"):
        load_pipeline(tmp_path / "flux.ckpt", **files)
    assert load_pipeline(tmp_path / "flux.ckpt", **files, allow_pickle=True).transformer.config == config


def test_text_encoders_given_a_file_say_they_take_a_folder():
    """Was "diffusers component folder not found: weights/toy-sd.safetensors/text_encoder", after the transformer loaded."""
    from minigen.loading.auto import load_pipeline

    folder = REPO / "weights" / "toy-flux"
    with pytest.raises(ValueError, match=r"toy-sd\.safetensors is a file; text_encoders \(sample\.py --text-encoders\) takes a diffusers "
                                         r"folder or hub id with text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/"):
        load_pipeline(folder / "flux1-toy.safetensors", ae=folder / "ae.safetensors", text_encoders=REPO / "weights" / "toy-sd.safetensors")


def test_a_vae_without_its_encoder_output_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match=r"no encoder\.conv_out\.weight, which gives its latent channels"):
        detect({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)})


def test_read_state_dict_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*missing.safetensors"):
        read_state_dict(tmp_path / "missing.safetensors")
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"unknown checkpoint format '.gguf'"):
        read_state_dict(tmp_path / "weights.gguf")


def test_a_folder_given_for_a_file_names_its_one_safetensors_file(tmp_path):
    """A LoRA's diffusers folder (pytorch_lora_weights.safetensors) was told "a diffusers folder goes to the
    loaders", which no LoRA loader takes; the one file in it is named instead."""
    save_file({"w": torch.zeros(1)}, tmp_path / "pytorch_lora_weights.safetensors")
    (tmp_path / "README.md").write_text("a LoRA")
    folder, file = re.escape(str(tmp_path)), re.escape(str(tmp_path / "pytorch_lora_weights.safetensors"))
    with pytest.raises(CheckpointError, match=f"^{folder} is a folder; give a checkpoint file, such as {file}, the only safetensors file in it$"):
        read_state_dict(tmp_path)
    save_file({"w": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=f"^{folder} is a folder; give a checkpoint file$"):
        read_state_dict(tmp_path)


def test_read_diffusers_component_single_variant_and_shards(tmp_path):
    full, half, sharded = tmp_path / "unet", tmp_path / "vae", tmp_path / "transformer"
    for folder in (full, half, sharded):
        folder.mkdir()
    save_file({"a": torch.ones(2)}, full / "diffusion_pytorch_model.safetensors")
    save_file({"a": torch.ones(2, dtype=torch.float16)}, half / "diffusion_pytorch_model.fp16.safetensors")
    save_file({"a": torch.ones(2)}, sharded / "model-00001-of-00002.safetensors")
    save_file({"b": torch.ones(3)}, sharded / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))

    assert set(read_diffusers_component(full)) == {"a"}
    assert read_diffusers_component(half, variant="fp16")["a"].dtype == torch.float16
    assert {k: tuple(t.shape) for k, t in read_diffusers_component(sharded).items()} == {"a": (2,), "b": (3,)}

    with pytest.raises(FileNotFoundError) as error:
        read_diffusers_component(half)
    message = str(error.value)
    assert "looked for diffusion_pytorch_model.safetensors, model.safetensors" in message
    assert "diffusion_pytorch_model.fp16.safetensors" in message and "variant='fp16'" in message


# --- hub ----------------------------------------------------------------------------------------


def run_offline(code: str, cache: pathlib.Path) -> subprocess.CompletedProcess:
    """Run `code` with HF_HUB_OFFLINE=1 (read by huggingface_hub at import, hence a subprocess)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)


def test_hub_offline_error_says_how_to_use_local_files(tmp_path):
    code = "from minigen.loading.hub import resolve, diffusers_patterns\n" \
           "resolve('runwayml/stable-diffusion-v1-5', diffusers_patterns(['unet']))"
    result = run_offline(code, tmp_path)
    assert result.returncode != 0
    assert "ModelFetchError: could not fetch 'runwayml/stable-diffusion-v1-5'" in result.stderr
    assert "HF_HUB_OFFLINE is set" in result.stderr and "pass the local folder or file instead of the hub id" in result.stderr


def test_hub_uses_the_cache_offline_and_passes_local_paths_through(tmp_path):
    snapshot = tmp_path / "models--owner--name" / "snapshots" / "abc123"
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "unet" / "config.json").write_text("{}")
    (tmp_path / "models--owner--name" / "refs").mkdir()
    (tmp_path / "models--owner--name" / "refs" / "main").write_text("abc123")
    code = "from minigen.loading.hub import resolve, diffusers_patterns\n" \
           f"print(resolve('owner/name', diffusers_patterns(['unet'])))\nprint(resolve({str(tmp_path)!r}))"
    result = run_offline(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(snapshot), str(tmp_path)]


def test_a_reachable_hub_completes_the_cache_and_a_failing_one_falls_back_to_it(monkeypatch, tmp_path):
    """With the hub reachable the snapshot is asked for online first (it fetches only what the cache lacks,
    so a cache holding one file of the repository is not taken for the whole); when the hub answers with
    an error, the cache serves; a hub id whose owner is also a folder here is still tried on the hub."""
    from huggingface_hub.errors import HfHubHTTPError

    import minigen.loading.hub as hub

    class ServerError(HfHubHTTPError):  # without the HTTP response the real one carries
        def __init__(self, message):
            Exception.__init__(self, message)

    calls = []

    def snapshot(fail_online):
        def download(**arguments):
            calls.append("cache" if arguments.get("local_files_only") else "hub")
            if fail_online and calls[-1] == "hub":
                raise fail_online if isinstance(fail_online, Exception) else ServerError("503 Server Error")
            return str(tmp_path)

        return download

    monkeypatch.setattr(hub, "hub_unreachable", lambda: None)
    monkeypatch.setattr(hub, "snapshot_download", snapshot(fail_online=False))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner").mkdir()
    assert hub.resolve("owner/name", ["unet/*"]) == tmp_path and calls == ["hub"]
    monkeypatch.setattr(hub, "snapshot_download", snapshot(fail_online=True))
    assert hub.resolve("owner/name", ["unet/*"]) == tmp_path and calls == ["hub", "hub", "cache"]
    monkeypatch.setattr(hub, "snapshot_download", snapshot(fail_online=ConnectionError("proxy refused")))
    assert hub.resolve("owner/name", ["unet/*"]) == tmp_path and calls[-2:] == ["hub", "cache"]  # a connection error too


def test_truncated_safetensors_file_gets_a_clear_error(tmp_path):
    whole = tmp_path / "whole.safetensors"
    save_file({"a": torch.zeros(100)}, str(whole))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(whole.read_bytes()[:150])
    with pytest.raises(CheckpointError, match="not a readable safetensors file .* truncated or corrupt: download it again"):
        read_state_dict(broken)


def test_single_file_states_configs_the_weights_cannot_show(tmp_path):
    """A small custom SD1 file (the toy models) records its UNet, VAE and text-encoder configs in the
    safetensors metadata: head counts and the latent scale are not visible in the weights."""
    from dataclasses import replace

    from safetensors.torch import save_file

    from minigen.loading.files import config_metadata
    from minigen.loading.sd import METADATA_TEXT_CONFIG, METADATA_UNET_CONFIG, METADATA_VAE_CONFIG, load_sd
    from minigen.models.unet import UNet
    from minigen.models.vae import AutoencoderKL
    from minigen.text.encoders import TextEncoderConfig, build_text_encoder
    from minigen.transformers_compat import file_layout

    unet_config = TINY_UNET
    vae_config = replace(TINY_VAE, scaling_factor=0.5)
    text_config = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, hidden_act="quick_gelu")
    text = build_text_encoder(text_config)
    checkpoint = {
        **{UNET_PREFIX + k: v for k, v in UNet(unet_config).state_dict().items()},
        **{"first_stage_model." + k: v for k, v in AutoencoderKL(vae_config).state_dict().items()},
        **{"cond_stage_model.transformer." + k: v for k, v in file_layout(text.state_dict(), text, "text_model").items()},
    }
    metadata = config_metadata({METADATA_UNET_CONFIG: unet_config, METADATA_VAE_CONFIG: vae_config, METADATA_TEXT_CONFIG: text_config})
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, tmp_path / "toy.safetensors", metadata)
    pipe = load_sd(tmp_path / "toy.safetensors")
    assert pipe.unet.config == unet_config
    assert pipe.vae.config == vae_config
    assert pipe.text_encoders[0].config.num_attention_heads == 4  # from keys alone it would be 32 // 64 -> 1


def test_pipeline_defaults_are_read_from_metadata_and_unknown_ones_refused():
    """A custom file states its sampling defaults (the toy models' 64-pixel size); a key no pipeline
    knows is refused by name instead of being silently ignored."""
    import json

    from minigen.loading.files import METADATA_PIPELINE, pipeline_defaults

    assert pipeline_defaults({}, ("default_size",)) == {}
    assert pipeline_defaults({METADATA_PIPELINE: json.dumps({"default_size": 64})}, ("default_size",)) == {"default_size": 64}
    with pytest.raises(ValueError, match=r"unknown pipeline defaults \['default_sise'\].*known: \['default_size'\]"):
        pipeline_defaults({METADATA_PIPELINE: json.dumps({"default_sise": 64})}, ("default_size",))


def test_sharded_variant_weights_are_read_by_their_index(tmp_path):
    """diffusers names the index of sharded fp16 weights `diffusion_pytorch_model.safetensors.index.fp16.json`
    (transformers `model.safetensors.index.fp16.json`): read back, every tensor equal to what was saved."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2,
                                up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32, attention_head_dim=4,
                                norm_num_groups=8, sample_size=16)  # fmt: skip
    unet.save_pretrained(tmp_path, variant="fp16", max_shard_size="100KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    weights = read_diffusers_component(tmp_path, variant="fp16")
    expected = unet.state_dict()
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.mark.parametrize("suffix", [".sft", ".SAFETENSORS"])
def test_safetensors_files_by_other_suffixes_are_read(tmp_path, suffix):
    """BFL's original FLUX files are `.sft`; suffixes are compared without case."""
    from minigen.loading.files import read_metadata

    path = tmp_path / f"ae{suffix}"
    save_file({"a": torch.arange(3.0)}, str(path), metadata={"format": "pt"})
    assert torch.equal(read_state_dict(path)["a"], torch.arange(3.0)) and read_metadata(path) == {"format": "pt"}
