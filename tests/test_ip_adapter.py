"""IP-Adapter: parity with diffusers' IP-Adapter, official file layouts and coverage, CLIP preprocessing.

Reference: diffusers (0.42) UNet2DConditionModel with `_load_ip_adapter_weights`, which converts the
official file (image_proj.* / ip_adapter.*) into its own ImageProjection / IPAdapterPlusImageProjection
and IPAdapterAttnProcessor2_0, on a tiny random SD1.5-like and SDXL-like UNet, fp32. Tolerances: noise
predictions <= 1e-4 (std ≈ 0.5-1, the adapter moves them by ≈ 0.1-1), image tokens <= 1e-5.
CLIP preprocessing against transformers' CLIPImageProcessor() with its defaults: <= 1e-6.
"""

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

pytest.importorskip("diffusers")
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

from minigen.controls import Controls  # noqa: E402
from minigen.image import preprocess_clip  # noqa: E402
from minigen.loading.detect import CheckpointError  # noqa: E402
from minigen.loading.ip_adapter import (  # noqa: E402
    CLIP_VISION,
    CLIP_VISION_COMMON,
    build_clip_vision,
    ip_adapter_from_state_dict,
    load_clip_vision,
    unet_cross_attention_widths,
)
from minigen.models.ip_adapter import IPAdapter, ImageProjModel, Resampler, reference_tokens  # noqa: E402
from minigen.models.unet import UNet  # noqa: E402
from minigen.models.unet_config import PRESETS  # noqa: E402

from conftest import TINY_UNET, tiny_diffusers_unet, unet_twin  # noqa: E402

FEATURES = 24  # width of the tiny vision tower's features


def random_adapter_file(unet, plus: bool, seed=0) -> dict:
    """An official-layout state dict (flat image_proj.* / ip_adapter.*) of random weights (std 0.2)."""
    torch.manual_seed(seed)
    cross = unet.config.context_dim
    proj = Resampler(dim=32, depth=4, dim_head=64, heads=1, num_queries=5, embedding_dim=FEATURES, output_dim=cross) if plus else ImageProjModel(FEATURES, cross, 4)
    adapter = IPAdapter(proj, unet_cross_attention_widths(unet), cross)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.2)
    return {k: v.clone() for k, v in adapter.state_dict().items()}


def nested(sd):
    """The .bin layout diffusers' loader takes: {"image_proj": {...}, "ip_adapter": {...}}."""
    out = {"image_proj": {}, "ip_adapter": {}}
    for key, value in sd.items():
        part, rest = key.split(".", 1)
        out[part][rest] = value
    return out


@pytest.mark.parametrize("plus", [False, True], ids=["base", "plus"])
@pytest.mark.parametrize("name", ["sd15-like", "sdxl-like"])
def test_ip_adapter_matches_diffusers(name, plus, tmp_path):
    reference = tiny_diffusers_unet(name)
    unet = unet_twin(reference)
    sd = random_adapter_file(unet, plus)
    save_file(sd, tmp_path / "adapter.safetensors")
    from minigen.loading.files import read_state_dict

    adapter = ip_adapter_from_state_dict(read_state_dict(tmp_path / "adapter.safetensors"), unet)
    reference._load_ip_adapter_weights([nested(sd)])
    for processor in reference.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [0.7]

    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3.0, 801.0]), torch.randn(2, 7, 32, generator=g)
    features = torch.randn(2, 9, FEATURES, generator=g) if plus else torch.randn(2, FEATURES, generator=g)
    added, y = {}, None
    if name == "sdxl-like":
        from minigen.models.unet import sdxl_vector

        pooled, time_ids = torch.randn(2, 32, generator=g), torch.tensor([[64.0, 48, 0, 8, 64, 48]]).expand(2, 6)
        added, y = {"text_embeds": pooled, "time_ids": time_ids}, sdxl_vector(pooled, time_ids, embed_dim=8)
    with torch.no_grad():
        tokens = adapter.tokens(features)
        theirs_tokens = reference.encoder_hid_proj.image_projection_layers[0](features)
        expected = reference(x, t, ctx, added_cond_kwargs={**added, "image_embeds": [features[:, None]]}).sample
        plain = unet(x, t, ctx, y)
        ours = unet(x, t, ctx, y, controls=Controls(extra_tokens=[adapter.extra_tokens(tokens, scale=0.7)]))
    assert (tokens - theirs_tokens).abs().max() <= 1e-5
    assert (expected - plain).abs().max() > 0.05  # the adapter acts
    assert (ours - expected).abs().max() <= 1e-4


def tiny_clip_vision():
    config = CLIPVisionConfig(hidden_size=FEATURES, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=FEATURES)
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(config).eval()


@pytest.mark.parametrize("plus", [False, True], ids=["base", "plus"])
def test_reference_tokens_follow_the_official_recipe(plus):
    """Plus: penultimate hidden states of the image and of an all-zero input; base: pooled projection and zeros."""
    unet = UNet(TINY_UNET)
    adapter = ip_adapter_from_state_dict(random_adapter_file(unet, plus), unet)
    encoder, pixels = tiny_clip_vision(), torch.randn(2, 3, 28, 28)
    tokens, empty = reference_tokens(adapter, encoder, pixels)
    with torch.no_grad():
        if plus:
            hidden = encoder(pixels, output_hidden_states=True).hidden_states
            assert len(hidden) == 4  # embeddings + 3 layers: [-2] is the output of layer 2 of 3
            expected = adapter.image_proj(hidden[-2])
            expected_empty = adapter.image_proj(encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2])
        else:
            expected = adapter.image_proj(encoder(pixels).image_embeds)
            expected_empty = adapter.image_proj(torch.zeros(2, FEATURES))
    assert torch.equal(tokens, expected) and torch.equal(empty, expected_empty)
    assert not torch.equal(tokens[0], tokens[1])


def test_clip_preprocessing_matches_clip_image_processor():
    g = torch.Generator().manual_seed(0)
    sizes = [(300, 451), (500, 233), (224, 224), (71, 71), (85, 80)]  # 71 and 80: where size / short * long rounds down a pixel
    images = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for h, w in sizes]
    expected = CLIPImageProcessor()(images=images, return_tensors="pt").pixel_values
    assert (preprocess_clip(images) - expected).abs().max() <= 1e-6


def test_clip_preprocessing_lays_transparency_on_white_as_clip_image_processor():
    """A cut-out reference (RGBA, a colour hidden under its transparent parts): <= 1e-6 of transformers'
    processor, which composites onto white (convert("RGB") kept the hidden colour: 3.8 off)."""
    pixels = (torch.rand(90, 120, 4, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy()
    pixels[:40, :, 3] = 0
    images = [Image.fromarray(pixels, "RGBA"), Image.fromarray(pixels[..., :2], "LA")]
    expected = CLIPImageProcessor()(images=images, return_tensors="pt").pixel_values
    assert (preprocess_clip(images) - expected).abs().max() <= 1e-6


def test_clip_vision_file_loads_without_its_config(tmp_path):
    """A tower saved by transformers (config.json + model.safetensors) loads to the same outputs."""
    encoder = tiny_clip_vision()
    encoder.save_pretrained(tmp_path / "image_encoder", safe_serialization=True)
    loaded = load_clip_vision(tmp_path / "image_encoder")
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(pixels).image_embeds, encoder(pixels).image_embeds)


# --- official files on full-size meta models ----------------------------------------------------------


@pytest.fixture(scope="module")
def full_size():
    with torch.device("meta"):
        return {"sd15": UNet(PRESETS["sd15"]), "sdxl": UNet(PRESETS["sdxl"])}


def layer_id(diffusers_name):
    """"up_blocks.1.attentions.0.transformer_blocks.0.attn2" -> "up.1.0.0"; "mid_block.attentions.0..." -> "mid.0.0"."""
    parts = diffusers_name.split(".")
    if parts[0] == "mid_block":
        return f"mid.{parts[2]}.{parts[4]}"
    return f"{parts[0].removesuffix('_blocks')}.{parts[1]}.{parts[3]}.{parts[5]}"


@pytest.mark.parametrize(
    "file, base, layers, tokens",
    [("ip-adapter_sd15.json", "sd15", 16, 4), ("ip-adapter-plus_sd15.json", "sd15", 16, 16), ("ip-adapter_sdxl.json", "sdxl", 70, 4),
     ("ip-adapter_sdxl_vit-h.json", "sdxl", 70, 4), ("ip-adapter-plus_sdxl_vit-h.json", "sdxl", 70, 16)],
)
def test_official_adapters_load_every_key(manifest, manifest_tensors, full_size, file, base, layers, tokens):
    sd = manifest_tensors(file)
    adapter = ip_adapter_from_state_dict(sd, full_size[base])
    assert len(adapter.ip_adapter) == layers and sum(p.numel() for p in adapter.parameters()) == manifest(file)["num_elements"]
    index_to_layer = manifest(file).get("ip_adapter_index_to_attn2")
    if index_to_layer:  # the manifest's own record of which diffusers layer each N is, from the official code
        assert {str(n): layer for layer, n in adapter.index.items()} == {n: layer_id(name) for n, name in index_to_layer.items()}
    if base == "sdxl":
        assert adapter.index["up.0.1.3"] == 75  # the Conceptrol concept layer (notes §4.3)
    shape = (1, 257, 1280) if adapter.plus else (1, adapter.image_proj.proj.in_features)
    out = adapter.image_proj(torch.empty(shape, dtype=torch.float16, device="meta"))
    assert out.shape[1:] == (tokens, full_size[base].config.context_dim)


@pytest.mark.parametrize("file, tower", [("clip_vision_vit-h-14_image_encoder.json", "ViT-H/14"), ("clip_vision_vit-bigG-14_image_encoder.json", "ViT-bigG/14")])
def test_clip_vision_towers_load_every_key(manifest, manifest_tensors, file, tower):
    assert {k: v for k, v in manifest(file)["config"].items() if k in CLIP_VISION[tower]} == CLIP_VISION[tower]
    model = build_clip_vision(CLIPVisionConfig(**CLIP_VISION_COMMON, **CLIP_VISION[tower]), manifest_tensors(file))
    assert sum(p.numel() for p in model.parameters()) == manifest(file)["num_elements"] - 257  # less the position_ids buffer


def test_adapter_for_another_base_model_is_refused(manifest_tensors, full_size):
    with pytest.raises(CheckpointError, match=r"for SD1.x \(16 cross-attention layers, 768-wide.*UNet is SDXL.*Fix"):
        ip_adapter_from_state_dict(manifest_tensors("ip-adapter-plus_sd15.json"), full_size["sdxl"])
    with pytest.raises(CheckpointError, match="not an IP-Adapter file"):
        ip_adapter_from_state_dict({"lora_unet_x.lora_down.weight": torch.zeros(1)}, full_size["sd15"])


def test_features_of_the_wrong_kind_are_refused():
    unet = unet_twin(tiny_diffusers_unet())
    adapter = ip_adapter_from_state_dict(random_adapter_file(unet, plus=True), unet)
    with pytest.raises(ValueError, match=r"hidden states \[B, N, D\]"):
        adapter.tokens(torch.zeros(1, FEATURES))


# --- the CLI: toy-sd with a random adapter and a tiny vision tower --------------------------------------


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    """An IP-Adapter-Plus file for toy-sd's UNet, a tiny CLIP tower folder and a reference image."""
    from minigen.loading.auto import load_pipeline

    folder = tmp_path_factory.mktemp("ip")
    unet = load_pipeline("toy-sd").unet
    save_file(random_adapter_file(unet, plus=True), folder / "adapter.safetensors")
    tiny_clip_vision().save_pretrained(folder / "tower", safe_serialization=True)
    Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(folder / "ref.png")
    return folder


def run_cli(folder, out, *extra):
    from conftest import load_sample_script

    argv = ["--prompt", "a large yellow star to the left of a small blue circle on grass", "--steps", "3", "--seed", "1",
            "--ip-adapter", str(folder / "adapter.safetensors"), "--image-encoder", str(folder / "tower"),
            "--image", str(folder / "ref.png"), "--out", str(out), *extra]
    return load_sample_script().main(argv)


def test_cli_conceptrol_differs_from_the_adapter_alone_and_saves_masks(cli_files, tmp_path):
    import numpy as np

    run_cli(cli_files, tmp_path / "conceptrol.png", "--concept", "star", "--warmup", "0", "--ip-scale", "3", "--save-masks", str(tmp_path / "masks.png"))
    run_cli(cli_files, tmp_path / "alone.png", "--no-conceptrol", "--warmup", "0", "--ip-scale", "3")
    gated, alone = (np.asarray(Image.open(tmp_path / n), dtype=np.int16) for n in ("conceptrol.png", "alone.png"))
    assert np.abs(gated - alone).max() > 0
    masks = np.asarray(Image.open(tmp_path / "masks.png").convert("L"))
    assert masks.shape == (64, 3 * 64)  # one concept, three steps
    assert masks.max() == 255 and masks.min() < 128  # each mask scaled to its maximum, not uniform


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (["--concept", "book"], ValueError, r"not in prompt.*The prompt's words: \['a', 'large'"),
        (["--concept", "star", "--concept", "circle"], SystemExit, "1 --image but 2 --concept"),
        ([], SystemExit, "--concept 'the book'"),
        (["--concept", "star", "--omini", "x.safetensors"], SystemExit, "SD models take --ip-adapter"),
        (["--no-conceptrol", "--save-masks", "m.png"], SystemExit, "makes none"),
        (["--no-conceptrol", "--concept", "star"], SystemExit, r"the adapter alone \(--no-conceptrol\) reads none: drop one"),
        (["--prompt", "a star " * 40 + "and a circle", "--concept", "circle"], ValueError, "the rest is truncated. Shorten the prompt"),
    ],
    ids=["concept-not-in-prompt", "more-concepts-than-images", "no-concept", "both-adapters", "masks-without-conceptrol", "concept-without-conceptrol",
         "concept-beyond-the-token-window"],
)
def test_cli_bad_input_names_the_fix(cli_files, tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        run_cli(cli_files, tmp_path / "out.png", *extra)


def test_cli_unreadable_reference_and_foreign_adapter(cli_files, tmp_path, manifest_tensors):
    (tmp_path / "ref.png").write_text("not an image")
    (tmp_path / "adapter.safetensors").write_bytes((cli_files / "adapter.safetensors").read_bytes())
    (tmp_path / "tower").symlink_to(cli_files / "tower")
    with pytest.raises(ValueError, match="--image .*ref.png: cannot be read as an image"):
        run_cli(tmp_path, tmp_path / "out.png", "--concept", "star")
    sdxl = {k: torch.zeros(v.shape, dtype=torch.float16) for k, v in manifest_tensors("ip-adapter_sdxl_vit-h.json").items()
            if k.startswith("image_proj") or k.split(".")[1] in ("1", "3")}
    save_file(sdxl, tmp_path / "adapter.safetensors")
    Image.new("RGB", (30, 30)).save(tmp_path / "ref.png")
    with pytest.raises(CheckpointError, match="for SDXL .*but the UNet is"):
        run_cli(tmp_path, tmp_path / "out.png", "--concept", "star")


def test_cli_adapter_options_without_an_adapter_are_refused(tmp_path):
    from conftest import load_sample_script

    with pytest.raises(SystemExit, match="--ip-scale, --concept-layer: these go with --ip-adapter"):
        load_sample_script().main(["--prompt", "a star", "--ip-scale", "2", "--concept-layer", "up.1.0.0", "--out", str(tmp_path / "o.png")])
