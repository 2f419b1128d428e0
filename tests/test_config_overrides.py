"""Loaders take the config fields a file cannot show: head counts, GroupNorm groups, RoPE axes.

Reference: the toy models as shipped, whose files state their configs in metadata. The same tensors
saved without that metadata must load to the same model when the caller gives the missing fields
(outputs equal exactly: the same weights, the same arithmetic), and be refused or differ without.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minigen.loading.flux import load_flux_transformer
from minigen.loading.sd import load_sd
from minigen.loading.toy import TOY_FLUX, TOY_SD


def without_metadata(source, target, drop: str) -> dict:
    """Copy a safetensors file without one metadata entry; returns that entry's config fields."""
    with safe_open(str(source), "pt") as f:
        metadata = dict(f.metadata())
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    fields = json.loads(metadata.pop(drop))
    save_file(tensors, str(target), metadata)
    return fields


def test_a_flux_file_with_64_wide_heads_loads_when_its_rope_axes_are_given(tmp_path):
    file = tmp_path / "flux-custom.safetensors"
    fields = without_metadata(TOY_FLUX / "flux1-toy.safetensors", file, "minigen.flux_config")
    shipped = load_flux_transformer(TOY_FLUX / "flux1-toy.safetensors", torch.float32)
    with pytest.raises(ValueError, match=r"head_dim=32.*transformer_config=\{'axes_dim'"):
        load_flux_transformer(file, torch.float32)
    with pytest.raises(ValueError, match="FluxConfig has no field 'head_dim'"):
        load_flux_transformer(file, torch.float32, {"head_dim": 32})
    model = load_flux_transformer(file, torch.float32, {"axes_dim": fields["axes_dim"]})
    assert model.config == shipped.config
    g = torch.Generator().manual_seed(0)
    from minigen.models.flux_tokens import image_ids, text_ids

    inputs = (torch.randn(1, 16, 64, generator=g), image_ids(4, 4), torch.randn(1, 5, 64, generator=g), text_ids(5),
              torch.tensor([0.5]), torch.randn(1, 64, generator=g))  # fmt: skip
    with torch.no_grad():
        assert torch.equal(model(*inputs), shipped(*inputs))


def test_an_sd_file_loads_with_the_head_count_and_norm_groups_given(tmp_path):
    file = tmp_path / "sd-custom.safetensors"
    fields = without_metadata(TOY_SD, file, "minigen.unet_config")
    shipped = load_sd(TOY_SD).unet
    guessed = load_sd(file).unet  # the official rule (64-wide heads, 32 groups) fits the shapes, not the model
    pipe = load_sd(file, unet_config={"num_heads": fields["num_heads"], "head_dim": None, "norm_groups": fields["norm_groups"]})
    assert pipe.unet.config == shipped.config
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 64)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, context), shipped(x, t, context))
        assert (guessed(x, t, context) - shipped(x, t, context)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="VAEConfig has no field 'groups'"):
        load_sd(TOY_SD, vae_config={"groups": 8})
