"""UNet parity with diffusers' UNet2DConditionModel on tiny random SD1.5-like and SDXL-like configs.

Reference: diffusers UNet2DConditionModel (fp32). minigen loads the same weights two ways: from the
diffusers state dict through minigen's own map (`unet_from_diffusers`), and from the official
single-file layout, which is checked independently by diffusers' ldm converter
(`convert_ldm_unet_checkpoint`) turning that layout back into the reference's exact state dict.
Tolerance: max abs difference <= 1e-4; weights are perturbed so the output std is about 0.3-1.
"""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

from minigen.loading.coverage import load_exact  # noqa: E402
from minigen.loading.keymaps_unet import unet_config_from_diffusers, unet_from_diffusers  # noqa: E402
from minigen.models.unet import UNet, sdxl_vector  # noqa: E402

TINY = {
    "sd15-like": dict(
        block_out_channels=(32, 64), layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ),
    "sdxl-like": dict(
        block_out_channels=(32, 64), layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2), norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 48,
    ),
}


def reference(name):
    torch.manual_seed(0)
    model = UNet2DConditionModel(**TINY[name], sample_size=16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def run_both(ref, ours, size=(16, 16)):
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(2, 4, *size, generator=g), torch.tensor([3.0, 801.0]), torch.randn(2, 7, 32, generator=g)
    kwargs, y = {}, None
    if ref.config.addition_embed_type == "text_time":
        pooled = torch.randn(2, 32, generator=g)
        time_ids = torch.tensor([[64.0, 48, 0, 8, 64, 48]]).expand(2, 6)
        kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        y = sdxl_vector(pooled, time_ids, embed_dim=8)
    with torch.no_grad():
        return ours(x, t, ctx, y), ref(x, t, ctx, **kwargs).sample


@pytest.mark.parametrize("name", list(TINY))
def test_unet_from_diffusers_files_matches_diffusers(name):
    ref = reference(name)
    config = unet_config_from_diffusers(dict(ref.config))
    with torch.device("meta"):
        ours = UNet(config)
    load_exact(ours, unet_from_diffusers(ref.state_dict(), config))
    for size in [(16, 16), (13, 11)]:  # odd latent sizes exercise the explicit upsample targets
        out, expected = run_both(ref, ours.eval(), size)
        assert expected.std() > 0.2
        assert (out - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("name", list(TINY))
def test_unet_from_single_file_layout_matches_diffusers(name):
    ref = reference(name)
    config = unet_config_from_diffusers(dict(ref.config))
    single_file = {f"model.diffusion_model.{k}": v for k, v in unet_from_diffusers(ref.state_dict(), config).items()}
    # independent check of the layout: diffusers' own converter gives back the reference's state dict
    back = convert_ldm_unet_checkpoint(single_file, ref.config)
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    ours = UNet(config).eval()
    load_exact(ours, {k.removeprefix("model.diffusion_model."): v for k, v in single_file.items()})
    out, expected = run_both(ref, ours)
    assert (out - expected).abs().max() <= 1e-4
