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
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402

from minigen.loading.coverage import load_exact  # noqa: E402
from minigen.loading.keymaps_unet import unet_config_from_diffusers, unet_from_diffusers  # noqa: E402
from minigen.models.unet import UNet, sdxl_vector  # noqa: E402

from conftest import TINY_DIFFUSERS_UNETS, tiny_diffusers_unet  # noqa: E402


def run_both(ref, ours, size=(16, 16), channels=4):
    """Both UNets on the same random input (`channels`: 9 for an inpainting UNet), timesteps, text and (SDXL) vector."""
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(2, channels, *size, generator=g), torch.tensor([3.0, 801.0]), torch.randn(2, 7, 32, generator=g)
    kwargs, y = {}, None
    if ref.config.addition_embed_type == "text_time":
        pooled = torch.randn(2, 32, generator=g)
        time_ids = torch.tensor([[64.0, 48, 0, 8, 64, 48]]).expand(2, 6)
        kwargs = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        y = sdxl_vector(pooled, time_ids, embed_dim=8)
    with torch.no_grad():
        return ours(x, t, ctx, y), ref(x, t, ctx, **kwargs).sample


@pytest.mark.parametrize("name", list(TINY_DIFFUSERS_UNETS))
def test_unet_from_diffusers_files_matches_diffusers(name):
    ref = tiny_diffusers_unet(name)
    config = unet_config_from_diffusers(dict(ref.config))
    with torch.device("meta"):
        ours = UNet(config)
    load_exact(ours, unet_from_diffusers(ref.state_dict(), config))
    for size in [(16, 16), (13, 11)]:  # odd latent sizes exercise the explicit upsample targets
        out, expected = run_both(ref, ours.eval(), size)
        assert expected.std() > 0.2
        assert (out - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("name", list(TINY_DIFFUSERS_UNETS))
def test_unet_from_single_file_layout_matches_diffusers(name):
    ref = tiny_diffusers_unet(name)
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
