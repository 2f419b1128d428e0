"""The shape-following probe (minigen/toy/shape_probe.py): its scenes, its one-step estimates against the
networks called directly, and its reading of the shipped toy-sd, which draws the shapes it is told."""

import re

import pytest
import torch

from minigen.models.flux_tokens import image_ids, pack_latents, text_ids, unpack_latents
from minigen.toy import world
from minigen.toy.shape_probe import one_step_estimates, probe_scenes, shape_following


def test_probe_scenes_swap_the_shape_word_and_nothing_else():
    rows = probe_scenes(40, seed=3)
    assert len(rows) == 40
    for scene, text, swapped, other in rows:
        [obj] = scene.objects
        assert obj.size != "small" and other in world.SHAPES and other != obj.shape
        assert re.search(rf"\b{obj.shape}\b", text)
        assert swapped == re.sub(rf"\b{obj.shape}\b", other, text) and swapped != text
    assert len({row[3] for row in rows}) > 4  # the swapped-in shapes vary
    assert len({(scene.objects[0].x, scene.objects[0].y) for scene, *_ in rows}) > 20  # placed anywhere
    halves = probe_scenes(20, seed=3, layout="halves")  # toy-flux's world: on the slot of either half
    assert {(scene.objects[0].x, scene.objects[0].y) for scene, *_ in halves} == {(17.0, 32.0), (47.0, 32.0)}


def _noised(vae, n: int):
    torch.manual_seed(0)
    latents = torch.randn(n, vae.config.z_channels, 8, 8)
    return latents, torch.randn_like(latents)


def test_flux_estimate_is_x_minus_sigma_times_velocity(toy_flux):
    """Reference: the transformer called directly on (1 - σ) x0 + σ ε; x0 = x - σ v. Tolerance 1e-5."""
    latents, noise = _noised(toy_flux.vae, 2)
    prompts, sigma = ["a red star", "a big blue heart on grass"], 0.7
    estimate = one_step_estimates(toy_flux, latents, noise, sigma, prompts)
    c = toy_flux.encode_prompt(prompts)
    x = (1 - sigma) * latents + sigma * noise
    with torch.no_grad():
        v = toy_flux.transformer(pack_latents(x), image_ids(4, 4), c.txt, text_ids(c.txt.shape[1]), torch.full((2,), sigma), c.y, None)
    torch.testing.assert_close(estimate, x - sigma * unpack_latents(v, 8, 8), atol=1e-5, rtol=1e-5)


def test_sd_estimate_uses_the_timestep_of_the_same_signal_to_noise_ratio(toy_sd):
    """Reference: at σ = s / (1 + s) with s the schedule's σ of training step 600, the UNet called directly at
    t = 600 on √ᾱ x0 + √(1 - ᾱ) ε, x0 = (x - √(1 - ᾱ) ε̂) / √ᾱ. Tolerance 1e-4."""
    latents, noise = _noised(toy_sd.vae, 2)
    prompts, t = ["a red star", "a big blue heart on grass"], 600
    s = float(toy_sd.schedule.train_sigmas()[t].float())
    estimate = one_step_estimates(toy_sd, latents, noise, s / (1 + s), prompts)
    abar = toy_sd.schedule.alphas_cumprod()[t].float()
    x = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    with torch.no_grad():
        eps = toy_sd.unet(x, torch.full((2,), float(t)), toy_sd.encode_prompt(prompts, 32, 32).context)
    torch.testing.assert_close(estimate, (x - (1 - abar).sqrt() * eps) / abar.sqrt(), atol=1e-4, rtol=1e-4)


def test_the_shipped_toy_sd_draws_the_shape_it_is_told(toy_sd):
    """Metric: judged shape of one-step estimates from σ = 0.7 over 24 one-object scenes. With the scene's
    caption toy-sd keeps its shape; with the shape word swapped most estimates change shape (the words decide)."""
    [row] = shape_following(toy_sd, n=24, sigmas=(0.7,)).values()
    assert row["kept"] >= 0.8 and row["effect"] >= 0.5 and row["followed"] >= 0.3
    assert row["effect"] == pytest.approx(row["kept"] - row["kept_swapped"])


def test_noise_levels_outside_zero_one_are_refused(toy_sd):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        shape_following(toy_sd, n=2, sigmas=(0.5, 1.0))


@pytest.mark.parametrize("argv, message", [
    (["--model", "no/such-folder-here"], "no/such-folder-here"),
    (["--sigmas", "0.5", "1"], "--sigmas [0.5, 1.0]: give noise levels strictly between 0 and 1"),
    (["--n", "0"], "argument --n: 0 is not positive; give 1 or more"),
])  # fmt: skip
def test_the_command_line_prints_bad_input_on_one_line(argv, message, capsys):
    from minigen.cli import run
    from minigen.toy.shape_probe import main

    assert run(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
