"""scripts/train_toy.py: the training loop resumes exactly, the datasets are reproducible, and the
exports load through the official-layout loaders with the configs they state."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_toy  # noqa: E402

from minigen.toy.data import render_dataset  # noqa: E402


def _regression(seed: int = 0) -> tuple[nn.Module, callable]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
    target = torch.tensor([1.0, -2.0, 0.5, 3.0])  # the task is fixed; only the initial weights follow the seed

    def loss_fn(generator: torch.Generator) -> torch.Tensor:
        x = torch.randn(16, 4, generator=generator)
        return (model(x).squeeze(-1) - x @ target).pow(2).mean()

    return model, loss_fn


def test_trainer_resumes_exactly(tmp_path):
    """6 steps in one go == a run stopped after its step-3 checkpoint, then resumed by a new Trainer
    from that file: same weights, same EMA, bit for bit (Adam moments and the random state are restored)."""
    stage = train_toy.Stage(steps=6, batch=16, lr=1e-2, seed=5, warmup=2, ema=0.9)
    model, loss_fn = _regression()
    straight = train_toy.Trainer("run", {"m": model}, stage, tmp_path / "a", torch.device("cpu"))
    straight.run(loss_fn, save_every=100)

    model, loss_fn = _regression()
    calls = []

    def crashing(generator: torch.Generator) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # stopped during step 5, after the checkpoint of step 3
        return loss_fn(generator)

    interrupted = train_toy.Trainer("run", {"m": model}, stage, tmp_path / "b", torch.device("cpu"))
    try:
        interrupted.run(crashing, save_every=3)
    except KeyboardInterrupt:
        pass
    model, loss_fn = _regression(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed = train_toy.Trainer("run", {"m": model}, stage, tmp_path / "b", torch.device("cpu"))
    assert resumed.step == 3
    resumed.run(loss_fn, save_every=100)

    for key, value in straight.params.items():
        assert torch.equal(value, resumed.params[key]), key
        assert torch.equal(straight.ema[key], resumed.ema[key]), key
    assert not torch.equal(straight.ema["m.0.weight"], straight.params["m.0.weight"])  # the EMA is a real average


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    stage = train_toy.Stage(steps=100, batch=1, lr=1.0, seed=0, warmup=10)
    trainer_lr = train_toy.Trainer.lr_at
    fake = type("T", (), {"stage": stage})()
    values = [trainer_lr(fake, s) for s in range(100)]
    assert values[0] == 0.1 and values[9] == 1.0
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert abs(trainer_lr(fake, 100) - 0.1) < 1e-9


def test_datasets_are_reproducible_and_prefix_consistent():
    small, large = render_dataset(4, seed=3), render_dataset(6, seed=3)
    assert torch.equal(small.images, large.images[:4]) and small.captions == large.captions[:4]
    assert not torch.equal(render_dataset(4, seed=4).images, small.images)
    assert small.images.dtype == torch.uint8 and small.images.shape == (4, 3, 64, 64)
    assert small.captions[0][0] != small.captions[0][1] or small.captions[1][0] != small.captions[1][1]
    x = small.images_as_float(slice(0, 2))
    assert x.min() >= -1 and x.max() <= 1
