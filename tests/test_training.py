"""Training objectives: the noising matches diffusers' schedulers, and a few steps of Adam fit a batch.

Reference: diffusers DDPMScheduler.add_noise (SD1.5 config) and the rectified-flow interpolation of
FlowMatchEulerDiscreteScheduler.scale_noise, fp32, max abs diff <= 1e-6.
"""

import pytest
import torch
from diffusers import DDPMScheduler

from minigen import cli
from minigen.models.flux import Flux
from minigen.models.flux_tokens import pack_latents
from minigen.models.unet import UNet
from minigen.sampling import DiscreteSchedule
from minigen.objectives import diffusion_loss, flow_loss

from conftest import TINY_FLUX, TINY_UNET, load_script


class Recorder(torch.nn.Module):
    """Stands in for a network: remembers its inputs and predicts zeros."""

    def forward(self, *args, **kwargs):
        self.inputs = args
        return torch.zeros_like(args[0])


def test_diffusion_loss_noises_like_ddpm_and_targets_the_noise():
    latents = torch.randn(3, 4, 8, 8)
    recorder = Recorder()
    loss = diffusion_loss(recorder, DiscreteSchedule(), latents, torch.zeros(3, 77, 8), generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (3,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").add_noise(latents, noise, t)
    assert torch.equal(recorder.inputs[1], t.float())
    assert (recorder.inputs[0] - reference).abs().max() <= 1e-6
    assert torch.allclose(loss, noise.pow(2).mean())



def test_min_snr_weighting_scales_each_sample_by_min_snr_gamma_over_snr():
    """Reference: the Min-SNR-γ weight min(SNR, γ)/SNR from Hang et al. (2023), as diffusers'
    train_text_to_image.py computes it for ε-prediction; exact up to 1e-6."""
    latents = torch.randn(64, 4, 8, 8)
    loss = diffusion_loss(Recorder(), DiscreteSchedule(), latents, torch.zeros(64, 77, 8), generator=torch.Generator().manual_seed(5),
                          snr_gamma=5.0)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (64,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    abar = torch.from_numpy(DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod.numpy())[t]
    snr = abar / (1 - abar)
    weight = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    assert (weight < 1).any() and (weight == 1).any()  # the draw covers both regimes
    expected = (noise.pow(2).flatten(1).mean(1) * weight).mean()
    assert abs(loss.item() - expected.item()) <= 1e-6

def test_flow_loss_interpolates_and_targets_the_velocity():
    latents = torch.randn(2, 16, 4, 6)
    recorder = Recorder()
    loss = flow_loss(recorder, latents, torch.zeros(2, 5, 32), torch.zeros(2, 24), generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    sigma = torch.sigmoid(torch.randn(2, generator=g))
    noise = torch.randn(latents.shape, generator=g)
    s = sigma.view(2, 1, 1, 1)
    assert torch.equal(recorder.inputs[4], sigma)  # (img, img_ids, txt, txt_ids, timesteps, ...)
    assert (recorder.inputs[0] - pack_latents(s * noise + (1 - s) * latents)).abs().max() <= 1e-6
    assert torch.allclose(loss, (noise - latents).pow(2).mean())


def test_flow_loss_shift_moves_the_times_towards_noise_as_sd3():
    """shift=3: each time is SD3's shifted logit-normal draw 3σ / (1 + 2σ) (Esser et al. 2024, eq. 23), exact
    up to 1e-6, with the same noise; so more of them lie above 0.9."""
    latents = torch.randn(64, 16, 2, 2)
    recorder = Recorder()
    flow_loss(recorder, latents, torch.zeros(64, 5, 32), torch.zeros(64, 24), generator=torch.Generator().manual_seed(2), shift=3.0)
    sigma = torch.sigmoid(torch.randn(64, generator=torch.Generator().manual_seed(2)))
    shifted = 3 * sigma / (1 + 2 * sigma)
    assert (recorder.inputs[4] - shifted).abs().max() <= 1e-6
    assert (shifted > 0.9).sum() > (sigma > 0.9).sum()


def test_a_few_adam_steps_fit_a_fixed_batch():
    """Both objectives are differentiable end to end: 30 steps on one batch lower the loss by > 30 %."""
    unet, flux = UNet(TINY_UNET), Flux(TINY_FLUX)
    latents, context = torch.randn(4, 4, 8, 8), torch.randn(4, 7, 32)
    flux_latents, txt, y = torch.randn(4, 16, 4, 4), torch.randn(4, 5, 32), torch.randn(4, 24)

    def fit(model, loss_fn):
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(30):
            loss = loss_fn(generator=torch.Generator().manual_seed(0))  # the same noise each step
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    sd = fit(unet, lambda **kw: diffusion_loss(unet, DiscreteSchedule(), latents, context, **kw))
    fl = fit(flux, lambda **kw: flow_loss(flux, flux_latents, txt, y, guidance=1.0, **kw))
    assert sd[-1] < 0.7 * sd[0]
    assert fl[-1] < 0.7 * fl[0]


def test_a_v_prediction_schedule_targets_the_velocity():
    """Reference: diffusers DDPMScheduler(prediction_type="v_prediction").get_velocity, and the Min-SNR weight
    min(SNR, γ)/(SNR + 1) of diffusers' train_text_to_image.py for v-prediction; within 1e-6."""
    latents = torch.randn(64, 4, 8, 8)
    schedule = DiscreteSchedule(prediction_type="v")
    loss = diffusion_loss(Recorder(), schedule, latents, torch.zeros(64, 77, 8), generator=torch.Generator().manual_seed(5), snr_gamma=5.0)
    g = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (64,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    reference = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction")
    velocity = reference.get_velocity(latents, noise, t)
    abar = reference.alphas_cumprod[t]
    snr = abar / (1 - abar)
    weight = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1)
    expected = (velocity.pow(2).flatten(1).mean(1) * weight).mean()  # the Recorder predicts zeros
    assert abs(loss.item() - expected.item()) <= 1e-6
    plain = diffusion_loss(Recorder(), schedule, latents, torch.zeros(64, 77, 8), generator=torch.Generator().manual_seed(5))
    assert abs(plain.item() - velocity.pow(2).mean().item()) <= 1e-6


def test_train_residuals_refuses_a_work_folder_that_is_a_file_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """--work is the folder of the checkpoints: a file there was found at the first step, after the model loaded."""
    script = load_script("train_residuals")
    monkeypatch.setattr(script, "load_pipeline", lambda *a, **k: pytest.fail("the model loads only after the checks"))
    (tmp_path / "work").write_text("not a folder")
    argv = ["--toy-concept", "my_star", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "r.safetensors")]
    assert cli.run(script.main, argv, resumes=True) == 2
    err = capsys.readouterr().err
    assert "work is a file, and --work names a folder" in err and err.count("\n") == 1, err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["work"]
