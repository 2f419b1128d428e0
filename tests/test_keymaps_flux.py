"""FLUX transformer key map (BFL <-> diffusers) and the FLUX config readers.

Key sets and shapes are checked on the official manifests (../shared/manifests) as meta tensors;
the tensor bookkeeping (which rows go where) against diffusers' own single-file converter and a
tiny diffusers FluxTransformer2DModel.
"""

import json

import pytest
import torch

from minigen.loading.detect import CheckpointError
from minigen.loading.keymaps_flux import (
    flux_config_from_diffusers,
    flux_config_from_keys,
    flux_from_diffusers,
    flux_to_diffusers,
)

from conftest import TINY_FLUX, meta_tensors, tiny_diffusers_flux

# BFL manifest, diffusers transformer manifest, hub folder in ../shared/hf
CASES = [
    ("flux1-dev.json", "diffusers_flux1-dev_transformer.json", "black-forest-labs/FLUX.1-dev"),
    ("flux1-schnell.json", "diffusers_flux1-schnell_transformer.json", "black-forest-labs/FLUX.1-schnell"),
]


def shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(t.shape) for key, t in state_dict.items()}


# --- key sets and shapes of the official files ---------------------------------------------------


@pytest.mark.parametrize("bfl_file, diffusers_file, _", CASES)
def test_map_gives_the_official_key_sets_and_shapes(manifest, bfl_file, diffusers_file, _):
    """BFL manifest -> diffusers has exactly the diffusers manifest's keys and shapes, and back; dtypes kept."""
    bfl = meta_tensors(manifest(bfl_file))
    diffusers = meta_tensors(manifest(diffusers_file))

    converted = flux_to_diffusers(bfl)
    assert shapes(converted) == shapes(diffusers)
    assert shapes(flux_from_diffusers(diffusers)) == shapes(bfl)
    assert {t.dtype for t in converted.values()} == {torch.bfloat16}


def test_map_agrees_with_diffusers_converter(manifest):
    """Oracle: diffusers' convert_flux_transformer_checkpoint_to_diffusers puts every row where we do.

    Its converter is written for the full 3072-wide model, so it gets FLUX.1-dev at full size with
    one column per tensor: each row holds a number unique in the whole checkpoint. Equal outputs
    mean the same split of qkv and linear1, the same order of q, k, v and mlp, and the same swap.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    labelled, start = {}, 0
    for key, shape in manifest("flux1-dev.json")["tensors"].items():
        rows = torch.arange(start, start + shape[0], dtype=torch.float64)
        labelled[key] = rows if len(shape) == 1 else rows[:, None]
        start += shape[0]

    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(labelled))
    ours = flux_to_diffusers(labelled)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)


# --- exactness on real values --------------------------------------------------------------------


def test_round_trips_are_exact_and_the_final_adaln_halves_swap():
    diffusers = {key: torch.randn_like(t) for key, t in tiny_diffusers_flux().state_dict().items()}
    bfl = flux_from_diffusers(diffusers)
    assert len(diffusers) == 2 * 32 + 2 * 14 + 20 and len(bfl) == 2 * 24 + 2 * 8 + 20

    back = flux_to_diffusers(bfl)
    assert back.keys() == diffusers.keys()
    assert all(torch.equal(back[key], diffusers[key]) for key in diffusers)
    again = flux_from_diffusers(back)
    assert all(torch.equal(again[key], bfl[key]) for key in bfl)

    # diffusers' norm_out.linear is (scale, shift), BFL's final adaLN (shift, scale): hidden 32.
    for suffix in ("weight", "bias"):
        ours, theirs = bfl[f"final_layer.adaLN_modulation.1.{suffix}"], diffusers[f"norm_out.linear.{suffix}"]
        assert torch.equal(ours[:32], theirs[32:]) and torch.equal(ours[32:], theirs[:32])
    # linear1 is q; k; v; mlp in that order
    linear1 = bfl["single_blocks.1.linear1.weight"]
    assert torch.equal(linear1[32:64], diffusers["single_transformer_blocks.1.attn.to_k.weight"])
    assert torch.equal(linear1[96:], diffusers["single_transformer_blocks.1.proj_mlp.weight"])


def test_diffusers_model_gives_identical_output_after_a_round_trip():
    """Reference: a tiny diffusers FluxTransformer2DModel (fp32). Its weights go to BFL names and
    back into a second, differently initialised model; outputs must be identical (torch.equal).
    Output std is about 3.5; before loading, the two models' outputs differ by up to about 15."""
    source, target = tiny_diffusers_flux(std=0.2, seed=0), tiny_diffusers_flux(std=0.2, seed=1)

    image_tokens, text_tokens = 12, 5
    inputs = dict(
        hidden_states=torch.randn(1, image_tokens, TINY_FLUX.in_channels),
        encoder_hidden_states=torch.randn(1, text_tokens, 32),
        pooled_projections=torch.randn(1, 24),
        timestep=torch.tensor([0.7]),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0),
                                           indexing="ij"), dim=-1).reshape(-1, 3),
        txt_ids=torch.zeros(text_tokens, 3),
        guidance=torch.tensor([3.5]),
    )
    with torch.no_grad():
        expected, before = source(**inputs).sample, target(**inputs).sample
        target.load_state_dict(flux_to_diffusers(flux_from_diffusers(source.state_dict())), strict=True)
        actual = target(**inputs).sample
    assert expected.std() > 1.0 and not torch.allclose(before, expected, atol=0.1)
    assert torch.equal(actual, expected)


# --- bad input -----------------------------------------------------------------------------------


def test_map_asks_to_strip_a_prefix():
    with pytest.raises(CheckpointError, match=r"'model\.diffusion_model\.img_in\.weight' is not a BFL.*Strip"):
        flux_to_diffusers({"model.diffusion_model.img_in.weight": torch.zeros(4, 2)})
    with pytest.raises(CheckpointError, match=r"'transformer\.proj_out\.bias' is not a diffusers"):
        flux_from_diffusers({"transformer.proj_out.bias": torch.zeros(4)})


def test_map_names_the_missing_part_of_a_fused_projection():
    diffusers = tiny_diffusers_flux().state_dict()
    del diffusers["transformer_blocks.1.attn.add_k_proj.bias"]
    with pytest.raises(CheckpointError, match=r"double_blocks\.1\.txt_attn\.qkv\.bias.*add_k_proj\.bias"):
        flux_from_diffusers(diffusers)


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bfl_file, _, hub_folder", CASES)
def test_configs_from_diffusers_json_and_from_keys_match_bfl_params(manifest, shared_hf, bfl_file, _, hub_folder):
    """Both readers give BFL's own `configs[...].params` (recorded in the manifest)."""
    bfl = manifest(bfl_file)
    expected = {**bfl["params"], "axes_dim": tuple(bfl["params"]["axes_dim"])}
    config_json = json.loads((shared_hf / hub_folder / "transformer" / "config.json").read_text())

    from_json = flux_config_from_diffusers(config_json)
    assert from_json == expected
    assert flux_config_from_keys(meta_tensors(bfl)) == expected
    assert (from_json["hidden_size"], from_json["num_heads"], from_json["depth"], from_json["depth_single_blocks"],
            from_json["axes_dim"], from_json["theta"]) == (3072, 24, 19, 38, (16, 56, 56), 10000)
    assert from_json["guidance_embed"] is ("dev" in bfl_file)


def test_config_readers_agree_on_a_tiny_model():
    model = tiny_diffusers_flux()
    bfl = flux_from_diffusers(model.state_dict())
    from_json = flux_config_from_diffusers(dict(model.config))
    assert (from_json["hidden_size"], from_json["num_heads"], from_json["vec_in_dim"], from_json["axes_dim"]) == (
        32, 2, 24, (4, 6, 6))
    # head_dim 16 is not FLUX.1's 128, so the RoPE axes cannot be guessed from the keys
    with pytest.raises(ValueError, match=r"head_dim=16: axes_dim .* not stored in the weights.*metadata"):
        flux_config_from_keys(bfl)


def test_config_readers_refuse_what_they_cannot_describe():
    with pytest.raises(ValueError, match=r"patch_size=2.*patch_size=1 only"):
        flux_config_from_diffusers({"_class_name": "FluxTransformer2DModel", "patch_size": 2})
    with pytest.raises(ValueError, match=r"SD3Transformer2DModel; expected FluxTransformer2DModel"):
        flux_config_from_diffusers({"_class_name": "SD3Transformer2DModel"})
    with pytest.raises(CheckpointError, match=r"not a BFL FLUX transformer.*model\.diffusion_model\."):
        flux_config_from_keys({"model.diffusion_model.img_in.weight": torch.zeros(4, 2)})
