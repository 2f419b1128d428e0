"""The shared training loop (minigen/trainer.py) resumes exactly; the toy datasets are reproducible;
scripts/train_toy.py writes toy-sd and toy-flux in the official layouts, and the real-file loaders
read them back with the configs and sampling defaults they state."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from minigen.loading.detect import detect
from minigen.loading.files import read_metadata, read_state_dict
from minigen.loading.flux import load_flux
from minigen.loading.hashes import files_digest
from minigen.loading.sd import load_sd
from minigen.loading.toy import TOY_FLUX, TOY_SD, toy_layout
from minigen.text.t5 import build_t5_encoder, load_t5_tokenizer
from minigen.toy.captions import sample_captioned
from minigen.toy.data import render_dataset
from minigen.toy.reader import reading_batch
from minigen.toy.scenes import render, sample_scene
from minigen.trainer import Trainer, TrainConfig, cached_tensors, fingerprint


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
    stage = TrainConfig(steps=6, batch=16, lr=1e-2, seed=5, warmup=2, ema=0.9)
    model, loss_fn = _regression()
    straight = Trainer("run", {"m": model}, stage, tmp_path / "a", torch.device("cpu"))
    straight.run(loss_fn, save_every=100)

    model, loss_fn = _regression()
    calls = []

    def crashing(generator: torch.Generator) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # stopped during step 5, after the checkpoint of step 3
        return loss_fn(generator)

    interrupted = Trainer("run", {"m": model}, stage, tmp_path / "b", torch.device("cpu"))
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(crashing, save_every=3)
    assert not model.training  # back in eval mode however the run ends (it stayed in train mode)
    model, loss_fn = _regression(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed = Trainer("run", {"m": model}, stage, tmp_path / "b", torch.device("cpu"))
    assert resumed.step == 3
    resumed.run(loss_fn, save_every=100)
    logged = (tmp_path / "b" / "run-loss.tsv").read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in logged] == [1, 2, 3, 4, 5, 6]  # each step's loss once

    for key, value in straight.params.items():
        assert torch.equal(value, resumed.params[key]), key
        assert torch.equal(straight.ema[key], resumed.ema[key]), key
    assert not torch.equal(straight.ema["m.0.weight"], straight.params["m.0.weight"])  # the EMA is a real average


def test_an_evaluation_stopped_after_its_checkpoint_runs_on_resume(tmp_path):
    """A kill between the step-3 checkpoint and its evaluation lost that point of the learning curve (the
    resumed run starts after it), and at the last step the final one; a line cut short by a kill stopped
    every later resume with a JSON error. Each evaluation step is in the curve once."""
    stage = TrainConfig(steps=6, batch=16, lr=1e-2, seed=5, warmup=2, ema=0.9)
    model, loss_fn = _regression()

    def stopping_at(step):
        def evaluate(at):
            if at == step:
                raise KeyboardInterrupt
            return {"at": at}
        return evaluate

    for stop in (3, 6):  # mid-run, and the final evaluation
        work = tmp_path / str(stop)
        with pytest.raises(KeyboardInterrupt):
            Trainer("run", {"m": model}, stage, work, torch.device("cpu")).run(loss_fn, save_every=3, evaluate=stopping_at(stop), eval_every=3)
        if stop == 6:
            with (work / "run-eval.jsonl").open("a") as f:
                f.write('{"step": 6, "at"')  # a line cut short
        Trainer("run", {"m": model}, stage, work, torch.device("cpu")).run(loss_fn, save_every=3, evaluate=lambda at: {"at": at}, eval_every=3)
        steps = [json.loads(line)["step"] for line in (work / "run-eval.jsonl").read_text().splitlines()]
        assert steps == [3, 6], (stop, steps)


def test_a_work_folder_that_cannot_take_files_is_refused_before_the_first_step(tmp_path):
    """It was found at the first checkpoint (after --save-every steps, lost), with a traceback from
    safetensors for some folders."""
    stage = TrainConfig(steps=6, batch=16, lr=1e-2, seed=5, warmup=2, ema=0.9)
    model, loss_fn = _regression()
    (tmp_path / "file").write_text("not a folder")
    calls = []
    trainer = Trainer("run", {"m": model}, stage, tmp_path / "file" / "work", torch.device("cpu"))
    with pytest.raises(NotADirectoryError, match=r"the checkpoint in the work folder \(a script's --work\) .*file/work/run\S*: .*file is a file, so nothing can be written under it"):
        trainer.run(lambda generator: calls.append(1) or loss_fn(generator), save_every=3)
    assert calls == []


def test_a_resumed_run_keeps_each_evaluation_once_and_refuses_what_it_cannot_continue(tmp_path):
    """Evaluations after the last checkpoint run again on resume, so their lines are dropped first (each
    step once in the learning curve); a checkpoint past the steps asked for and one of another schedule
    are refused by name; a non-finite loss stops the run before any weight moves, the checkpoint kept."""
    stage = TrainConfig(steps=6, batch=16, lr=1e-2, seed=5, warmup=2, ema=0.9)
    model, loss_fn = _regression()
    calls = []

    def crashing(generator: torch.Generator) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt  # during step 6: steps 4 and 5 were evaluated, not saved
        return loss_fn(generator)

    try:
        Trainer("run", {"m": model}, stage, tmp_path, torch.device("cpu")).run(crashing, save_every=3, evaluate=lambda step: {}, eval_every=1)
    except KeyboardInterrupt:
        pass
    Trainer("run", {"m": model}, stage, tmp_path, torch.device("cpu")).run(loss_fn, save_every=3, evaluate=lambda step: {}, eval_every=1)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run-eval.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]

    for other in (dataclasses.replace(stage, steps=8), dataclasses.replace(stage, warmup=0)):  # a cosine's length is its schedule
        with pytest.raises(ValueError, match="checkpoint of another run .*differs in schedule"):
            Trainer("run", {"m": model}, other, tmp_path, torch.device("cpu"))
    constant = dataclasses.replace(stage, cosine=False)
    Trainer("flat", {"m": model}, constant, tmp_path, torch.device("cpu")).run(loss_fn, save_every=100)
    assert Trainer("flat", {"m": model}, dataclasses.replace(constant, steps=9), tmp_path, torch.device("cpu")).step == 6  # a constant rate runs on
    with pytest.raises(ValueError, match="is at step 6, past the 4 steps asked for"):
        Trainer("flat", {"m": model}, dataclasses.replace(constant, steps=4), tmp_path, torch.device("cpu"))

    saved = read_state_dict(tmp_path / "flat.safetensors")
    longer = Trainer("flat", {"m": model}, dataclasses.replace(constant, steps=9), tmp_path, torch.device("cpu"))
    with pytest.raises(ValueError, match="the loss of step 7 is nan; nothing of it was applied, and .*flat.safetensors keeps the last checkpoint"):
        longer.run(lambda generator: loss_fn(generator) * float("nan"), save_every=1)
    with pytest.raises(ValueError, match="the loss of step 1 is nan; nothing of it was applied, and no checkpoint was written yet: .*run again$"):
        Trainer("fresh", {"m": model}, constant, tmp_path, torch.device("cpu")).run(lambda generator: loss_fn(generator) * float("nan"))
    after = read_state_dict(tmp_path / "flat.safetensors")
    assert all(torch.equal(saved[k], after[k]) for k in saved) and torch.isfinite(longer.params["m.0.weight"]).all()
    (tmp_path / "flat.safetensors").write_bytes((tmp_path / "flat.safetensors").read_bytes()[:1000])  # a damaged file
    with pytest.raises(ValueError, match="flat.safetensors is not a readable checkpoint .*delete it to start afresh"):
        Trainer("flat", {"m": model}, constant, tmp_path, torch.device("cpu"))


def test_a_finite_loss_with_a_non_finite_gradient_stops_the_run_before_the_weights(tmp_path):
    """A loss of 0 whose gradient is NaN (sqrt at 0) was applied: NaN weights went into the checkpoint and every
    resume failed. The gradient's norm is checked too; the last checkpoint stays the last good one."""
    stage = TrainConfig(steps=6, batch=16, lr=1e-2, seed=5, warmup=2, ema=0.9)
    model, loss_fn = _regression()
    trainer = Trainer("run", {"m": model}, stage, tmp_path, torch.device("cpu"))

    def bad_at_step_3(generator: torch.Generator) -> torch.Tensor:
        loss = loss_fn(generator)
        weight = model[0].weight
        return loss + torch.sqrt((weight - weight.detach()).pow(2).sum()) if trainer.step == 2 else loss

    with pytest.raises(ValueError, match="the gradient norm of step 3 is nan; nothing of it was applied"):
        trainer.run(bad_at_step_3, save_every=2)
    saved = read_state_dict(tmp_path / "run.safetensors")
    assert all(torch.isfinite(v).all() for k, v in saved.items() if k != "generator")
    assert all(torch.equal(saved[f"param.{k}"], p) for k, p in trainer.params.items())  # step 3 moved nothing
    assert Trainer("run", {"m": model}, stage, tmp_path, torch.device("cpu")).run(loss_fn, save_every=100)  # resumes at step 2


def test_a_checkpoint_of_another_model_is_refused_naming_the_parameters(tmp_path):
    """Other modules, names or shapes in the same work folder ended in safetensors' "File does not contain
    tensor" or torch's size mismatch (a traceback from the scripts); a ValueError now names them."""
    stage = TrainConfig(steps=2, batch=16, lr=1e-2, seed=5, warmup=1)
    model, loss_fn = _regression()
    Trainer("run", {"m": model}, stage, tmp_path, torch.device("cpu")).run(loss_fn, save_every=1)
    with pytest.raises(ValueError, match=r"checkpoint of another model \(2 parameters not in the checkpoint: n.bias, n.weight\)"):
        Trainer("run", {"m": model, "n": nn.Linear(2, 2)}, stage, tmp_path, torch.device("cpu"))
    wider = nn.Sequential(nn.Linear(4, 9), nn.GELU(), nn.Linear(9, 1))
    with pytest.raises(ValueError, match=r"another model \(3 parameters of other shapes: m.0.bias \[8\] there, \[9\] here, .*delete it"):
        Trainer("run", {"m": wider}, stage, tmp_path, torch.device("cpu"))


def test_a_resume_at_other_peak_learning_rates_is_refused(tmp_path):
    """The peak learning rates (config.lr and each module's own) are part of the run: a library caller resumed
    at another one silently. A checkpoint written before they were recorded still resumes."""
    from safetensors.torch import save_file

    stage = TrainConfig(steps=4, batch=16, lr=1e-2, seed=5, warmup=1)
    model, loss_fn = _regression()
    Trainer("run", {"m": model}, stage, tmp_path, torch.device("cpu")).run(loss_fn, save_every=2)
    for other, lr in ((dataclasses.replace(stage, lr=1.0), None), (stage, {"m": 5.0})):
        with pytest.raises(ValueError, match=r"checkpoint of another run \(it differs in peak_lr: saved \{'peak_lr': 'm 0.01'\}"):
            Trainer("run", {"m": model}, other, tmp_path, torch.device("cpu"), lr=lr)
    file = tmp_path / "run.safetensors"
    metadata = read_metadata(file)
    older = {k: v for k, v in json.loads(metadata["run"]).items() if k != "peak_lr"}
    save_file(load_file(file), file, {**metadata, "run": json.dumps(older)})
    assert Trainer("run", {"m": model}, stage, tmp_path, torch.device("cpu")).step == 4
    # what a script records since (train_toy's stages: their data) is not in an older checkpoint: it resumes (it was refused)
    assert Trainer("run", {"m": model}, stage, tmp_path, torch.device("cpu"), run={"data": "toy-data-halves"}).step == 4
    Trainer("whole", {"m": model}, dataclasses.replace(stage, lr=1.0), tmp_path, torch.device("cpu")).run(loss_fn, save_every=2)
    assert Trainer("whole", {"m": model}, dataclasses.replace(stage, lr=1), tmp_path, torch.device("cpu")).step == 4  # 1 is 1.0


def test_a_run_resumes_from_its_compact_checkpoint(tmp_path, capsys):
    """scripts/compact_checkpoint.py keeps the step, the random state and the weights and EMA in bf16,
    without Adam's moments; a Trainer resumes from it at that step with those weights (fp32 again, the
    EMA too) and no moments, and trains on; an existing output and a file that is no checkpoint are
    refused with one line (exit code 2)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import compact_checkpoint

    stage = TrainConfig(steps=6, batch=16, lr=1e-2, seed=5, warmup=2, ema=0.9)
    model, loss_fn = _regression()
    first = Trainer("run", {"m": model}, stage, tmp_path / "a", torch.device("cpu"))
    first.config = TrainConfig(steps=3, batch=16, lr=1e-2, seed=5, warmup=2, ema=0.9)  # stop at step 3
    first.run(loss_fn, save_every=3)
    full, small = tmp_path / "a" / "run.safetensors", tmp_path / "run-compact.safetensors"
    assert compact_checkpoint.main([str(full), str(small)]) is None
    stored = load_file(small)
    assert not any(k.startswith("adam.") for k in stored) and any(k.startswith("adam.") for k in load_file(full))
    assert {v.dtype for k, v in stored.items() if k != "generator"} == {torch.bfloat16}

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "run.safetensors").write_bytes(small.read_bytes())
    model, loss_fn = _regression(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed = Trainer("run", {"m": model}, stage, tmp_path / "b", torch.device("cpu"))
    assert resumed.step == 3 and not resumed.optimizer.state
    for key, value in first.params.items():
        assert torch.equal(resumed.params[key], value.bfloat16().float()), key
        assert resumed.ema[key].dtype == torch.float32 and torch.equal(resumed.ema[key], first.ema[key].bfloat16().float()), key
    assert torch.equal(resumed.generator.get_state(), first.generator.get_state())
    resumed.run(loss_fn, save_every=100)
    assert resumed.step == 6 and not torch.equal(resumed.params["m.0.weight"], first.params["m.0.weight"])

    small.with_suffix(".txt").write_text("not a checkpoint")
    for args, message in (([str(full), str(small)], "exists; a compact copy never replaces a file: give another out path"),
                          ([str(small.with_suffix(".txt")), str(tmp_path / "x.safetensors")], "unknown checkpoint format"),
                          ([str(full), str(tmp_path / "c.pt")], "the output must be a .safetensors file"),  # was written as safetensors data
                          ([str(full), str(tmp_path)], "is a folder; give a file path inside it")):  # fmt: skip
        assert compact_checkpoint.run(compact_checkpoint.main, args) == 2
        assert message in capsys.readouterr().err


def test_evaluation_sees_the_ema_weights_and_leaves_training_unchanged(tmp_path):
    """`evaluate` runs every eval_every steps and at the end, on the EMA weights in eval mode; the
    run it interrupts ends bit for bit where a run without it ends; the figures land in -eval.jsonl."""
    stage = TrainConfig(steps=5, batch=16, lr=1e-2, seed=5, warmup=2, ema=0.9)
    model, loss_fn = _regression()
    plain = Trainer("run", {"m": model}, stage, tmp_path / "a", torch.device("cpu"))
    plain.run(loss_fn, save_every=100)

    model, loss_fn = _regression()
    trainer = Trainer("run", {"m": model}, stage, tmp_path / "b", torch.device("cpu"))
    seen = []

    def evaluate(step: int) -> dict:
        assert not model.training
        assert all(torch.equal(p, trainer.ema[f"m.{k}"]) for k, p in model.named_parameters())
        seen.append(step)
        return {"weight_sum": model[0].weight.sum().item()}

    trainer.run(loss_fn, save_every=100, evaluate=evaluate, eval_every=2)
    assert seen == [2, 4, 5]
    for key, value in plain.params.items():
        assert torch.equal(value, trainer.params[key]) and torch.equal(plain.ema[key], trainer.ema[key]), key
    lines = [json.loads(line) for line in (tmp_path / "b" / "run-eval.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 5]
    assert lines[-1]["weight_sum"] == pytest.approx(float(plain.ema["m.0.weight"].sum()))
    with pytest.raises(ValueError, match="eval_every"):
        trainer.run(loss_fn, evaluate=evaluate)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    stage = TrainConfig(steps=100, batch=1, lr=1.0, seed=0, warmup=10)
    trainer_lr = Trainer.lr_at
    fake = type("T", (), {"config": stage})()
    values = [trainer_lr(fake, s) for s in range(100)]
    assert values[0] == 0.1 and values[9] == 1.0
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert abs(trainer_lr(fake, 100) - 0.1) < 1e-9


def test_cached_tensors_are_made_once_and_then_read_from_their_file(tmp_path):
    """The first call makes and writes the tensors and metadata; later calls read them from the file
    (a `make` that fails shows it is not called); a `make` that fails writes nothing, not even a
    partial file."""
    file = tmp_path / "cache" / "data.safetensors"
    made = {"images": torch.arange(12, dtype=torch.uint8).view(3, 4)}, {"captions": '["a", "b", "c"]'}
    tensors, metadata = cached_tensors(file, lambda: made)
    assert torch.equal(tensors["images"], made[0]["images"]) and metadata == made[1]

    def fail():
        raise RuntimeError("make called")

    tensors, metadata = cached_tensors(file, fail)
    assert torch.equal(tensors["images"], made[0]["images"]) and metadata == made[1]
    with pytest.raises(RuntimeError, match="make called"):
        cached_tensors(tmp_path / "other.safetensors", fail)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["data.safetensors"]


def test_datasets_are_reproducible_and_prefix_consistent():
    small, large = render_dataset(4, seed=3), render_dataset(6, seed=3)
    assert torch.equal(small.images, large.images[:4]) and small.captions == large.captions[:4]
    assert not torch.equal(render_dataset(4, seed=4).images, small.images)
    parallel = render_dataset(6, seed=3, workers=2)  # two processes, three scenes each
    assert torch.equal(parallel.images, large.images) and parallel.captions == large.captions
    assert small.images.dtype == torch.uint8 and small.images.shape == (4, 3, 64, 64)
    assert small.captions[0][0] != small.captions[0][1] or small.captions[1][0] != small.captions[1][1]
    x = small.images_as_float(slice(0, 2))
    assert x.min() >= -1 and x.max() <= 1


def test_shape_only_mentions_name_the_shape_alone_and_leave_the_rest_unchanged():
    """captions with shape_only: at 0 every caption is as before (no random draw added); at 1 every mention
    is "a <shape word>" / "<count> <plural>" stating the shape alone, and the judge finds the true render
    following it in full; the rendered images do not depend on it, only the captions do."""
    from minigen.toy import captions, scenes
    from minigen.toy.judge import judge
    from minigen.toy.metrics import prompt_following

    for i in range(20):
        assert captions.sample_captioned(i, shape_only=0.0) == captions.sample_captioned(i)
        scene, caption = captions.sample_captioned(i, shape_only=1.0)
        assert all(m.attributes == {"shape": scene.objects[m.objects[0]].shape} for m in caption.mentions)
        assert prompt_following(judge(scenes.render(scene).image), caption) == 1.0
    assert captions.sample_captioned(np.random.default_rng(1), shape_only=1.0)[1].text.startswith(("a ", "an ", "two ", "three "))
    plain, open_looks = render_dataset(20, seed=3), render_dataset(20, seed=3, shape_only=0.5)
    assert torch.equal(plain.images, open_looks.images) and plain.captions != open_looks.captions


def test_shape_only_captions_name_every_mention_of_a_caption_by_its_shape_alone():
    """shape_only_captions: at 0 every caption is as before; at 1 every mention of every caption states its
    shape alone (which the true render follows in full); at 0.15 a share near 0.15 of the captions are
    wholly shape-only (binomial, 1200 captions: 5 standard errors is 0.05), several objects included,
    where mentions drawn one by one at the same share make far fewer such captions."""
    from minigen.toy import captions, scenes
    from minigen.toy.judge import judge
    from minigen.toy.metrics import prompt_following

    def bare(caption) -> bool:
        return all(set(m.attributes) == {"shape"} for m in caption.mentions)

    for i in range(20):
        assert captions.sample_captioned(i, shape_only=0.15, shape_only_captions=0.0) == captions.sample_captioned(i, shape_only=0.15)
        scene, caption = captions.sample_captioned(i, shape_only_captions=1.0)
        assert all(m.attributes == {"shape": scene.objects[m.objects[0]].shape} for m in caption.mentions)
        assert prompt_following(judge(scenes.render(scene).image), caption) == 1.0
    whole = [captions.sample_captioned(np.random.default_rng([5, i]), shape_only_captions=0.15)[1] for i in range(1200)]
    assert abs(np.mean([bare(c) for c in whole]) - 0.15) < 0.05
    several = [c for c in whole if len(c.mentions) >= 2]
    by_mention = [captions.sample_captioned(np.random.default_rng([5, i]), shape_only=0.15)[1] for i in range(1200)]
    several_by_mention = [c for c in by_mention if len(c.mentions) >= 2]
    assert np.mean([bare(c) for c in several]) > 0.1 > 3 * np.mean([bare(c) for c in several_by_mention])
    with pytest.raises(ValueError, match=r"shape_only_captions=-0.1: give a share in \[0, 1\]"):
        captions.sample_captioned(0, shape_only_captions=-0.1)


def test_shape_only_changes_the_training_data_and_the_readers_run(tiny_training, tmp_path):
    """--shape-only and --shape-only-captions render (and cache) captions of their own, a reader trained on
    them is not resumed on other captions, and a share outside [0, 1) is refused."""
    plain, open_looks = tiny_training.training_data(tmp_path / "a"), tiny_training.training_data(tmp_path / "a", 0.3)
    assert torch.equal(plain.images, open_looks.images) and plain.captions != open_looks.captions
    assert sorted(p.name for p in tmp_path.glob("toy-data-*")) == ["toy-data-300-0-shape-only-0.3.safetensors", "toy-data-300-0.safetensors"]
    stage, tokenizer = TrainConfig(steps=2, batch=4, lr=1e-2, seed=9, warmup=1), load_t5_tokenizer(TOY_FLUX / "tokenizer_2")
    build = partial(build_t5_encoder, tiny_training.TOY_T5)
    tiny_training.train_reader("reader-t5", build, tokenizer, 48, stage, tmp_path, torch.device("cpu"), 1, shape_only=0.3)
    with pytest.raises(ValueError, match="checkpoint of another run .*shape_only"):
        tiny_training.train_reader("reader-t5", build, tokenizer, 48, stage, tmp_path, torch.device("cpu"), 1)
    with pytest.raises(SystemExit, match=re.escape("--shape-only 1.0: give a share in [0, 1)")):
        tiny_training.main(["sd", "--work", str(tmp_path / "b"), "--shape-only", "1"])
    with pytest.raises(SystemExit, match=re.escape("--shape-only-captions 1.0: give a share in [0, 1)")):
        tiny_training.main(["sd", "--work", str(tmp_path / "b"), "--shape-only-captions", "1"])
    both = tiny_training.training_data(tmp_path / "a", 0.3, 0.5)
    assert torch.equal(plain.images, both.images) and both.captions != open_looks.captions
    assert (tmp_path / "toy-data-300-0-shape-only-0.3-captions-0.5.safetensors").is_file()
    tiny_training.train_reader("reader-t5", build, tokenizer, 48, stage, tmp_path / "c", torch.device("cpu"), 1, 0.3, 0.5)
    with pytest.raises(ValueError, match="checkpoint of another run .*shape_only_captions"):
        tiny_training.train_reader("reader-t5", build, tokenizer, 48, stage, tmp_path / "c", torch.device("cpu"), 1, 0.3)


def _tiny(monkeypatch: pytest.MonkeyPatch):
    """train_toy with a 300-scene dataset and a few steps per stage (the real configs, real export)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import train_toy

    monkeypatch.setattr(train_toy, "DATA_SIZE", 300)
    monkeypatch.setattr(train_toy, "READER_CAPTIONS", 50)
    few = {"vae": TrainConfig(steps=3, batch=4, lr=1e-3, seed=1, warmup=1), "denoiser": TrainConfig(steps=3, batch=4, lr=1e-3, seed=2, warmup=1)}
    monkeypatch.setitem(train_toy.STAGES, "sd", {**few, "reader": TrainConfig(steps=3, batch=4, lr=1e-3, seed=7, warmup=1),
                                                 "continue": TrainConfig(steps=3, batch=4, lr=1e-3, seed=8, warmup=1, ema_warmup=True)})
    monkeypatch.setitem(train_toy.STAGES, "flux", {**few, "decoder": TrainConfig(steps=3, batch=4, lr=1e-3, seed=3, warmup=1),
                                                   "reader-t5": TrainConfig(steps=3, batch=4, lr=1e-3, seed=9, warmup=1),
                                                   "reader-clip": TrainConfig(steps=3, batch=4, lr=1e-3, seed=10, warmup=1),
                                                   "denoiser": TrainConfig(steps=3, batch=4, lr=1e-3, seed=4, warmup=1, ema_warmup=True),
                                                   "continue": TrainConfig(steps=3, batch=4, lr=1e-3, seed=6, warmup=1, ema_warmup=True)})
    return train_toy


@pytest.fixture
def tiny_training(monkeypatch):
    return _tiny(monkeypatch)


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> tuple[Path, Path]:
    """(work folder, export) of one tiny toy-flux trained from scratch, shared by the tests that only read them."""
    folder = tmp_path_factory.mktemp("tiny-flux")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _tiny(monkeypatch).main(["flux", "--work", str(folder / "work"), "--out", str(folder / "toy-flux")])
    return folder / "work", folder / "toy-flux"


def test_decoder_finetune_changes_the_decoder_and_leaves_the_latent_space_alone(tiny_training, tmp_path):
    from minigen.models.vae import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(tiny_training.TOY_FLUX_VAE)
    data = render_dataset(8, 0)
    x = data.images_as_float(slice(0, 4))
    with torch.no_grad():
        latents = vae.encode(x)
    decoder = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    stage = TrainConfig(steps=3, batch=4, lr=1e-3, seed=5, warmup=1)
    vae = tiny_training.finetune_decoder(vae, data, "scenes", stage, tmp_path, torch.device("cpu"), save_every=250)
    with torch.no_grad():
        assert torch.equal(vae.encode(x), latents)  # the encoder is frozen: the denoiser's latents stay valid
    assert any(not torch.equal(v, decoder[k]) for k, v in vae.decoder.state_dict().items())


def test_the_autoencoder_stages_resume_only_their_own_run(tiny_training, tmp_path):
    """The VAE and decoder stages record their architecture and data (the decoder its encoder too): the same
    --work resumed the anywhere VAE on halves scenes (no training), and another model's ended in a size mismatch."""
    from minigen.models.vae import AutoencoderKL

    cpu, stage = torch.device("cpu"), TrainConfig(steps=1, batch=2, lr=1e-3, seed=1, warmup=1)
    data, halves = render_dataset(4, 0), tiny_training.data_name(layout="halves")
    vae = tiny_training.train_vae(tiny_training.TOY_SD_VAE, data, tiny_training.data_name(), stage, tmp_path, cpu, 1)
    with pytest.raises(ValueError, match=r"checkpoint of another run \(it differs in data: saved \{'data': 'toy-data-300-0'\}"):
        tiny_training.train_vae(tiny_training.TOY_SD_VAE, data, halves, stage, tmp_path, cpu, 1)
    with pytest.raises(ValueError, match="checkpoint of another model .*parameters of other shapes"):
        tiny_training.train_vae(tiny_training.TOY_FLUX_VAE, data, tiny_training.data_name(), stage, tmp_path, cpu, 1)
    tiny_training.finetune_decoder(vae, data, halves, stage, tmp_path, cpu, 1)
    torch.manual_seed(0)
    other = AutoencoderKL(vae.config)
    with pytest.raises(ValueError, match="checkpoint of another run .*differs in encoder"):
        tiny_training.finetune_decoder(other, data, halves, stage, tmp_path, cpu, 1)


def test_a_work_folders_t5_tokenizer_is_never_replaced_by_another(tiny_training, tiny_flux, tmp_path):
    """--vae-from/--text-from/--init copied their model's tokenizer over <work>/tokenizer_2, so the work
    folder's readers resumed on other token ids; another tokenizer there is refused, and the T5 reader's run
    records its tokenizer's digest."""
    import argparse

    work = tmp_path / "work"
    (work / "tokenizer_2").mkdir(parents=True)
    (work / "tokenizer_2" / "spiece.model").write_bytes(b"a tokenizer learnt from the captions")
    args = argparse.Namespace(work=work, text_from=None, init=None, vae_from=TOY_FLUX)
    with pytest.raises(ValueError, match=f"tokenizer_2 is another T5 tokenizer than {TOY_FLUX}'s.*give a new --work \\(e.g. {work}-toy-flux\\)"):
        tiny_training.t5_tokenizer_folder(args, None)
    assert (work / "tokenizer_2" / "spiece.model").read_bytes() == b"a tokenizer learnt from the captions"
    args.work = tmp_path / "fresh"
    folder = tiny_training.t5_tokenizer_folder(args, None)
    assert files_digest(folder) == files_digest(TOY_FLUX / "tokenizer_2") == files_digest(tiny_training.t5_tokenizer_folder(args, None))
    trained, _ = tiny_flux
    assert json.loads(read_metadata(trained / "reader-t5.safetensors")["run"])["tokenizer"] == files_digest(trained / "tokenizer_2")


def test_training_data_shows_its_rendering_progress(tiny_training, tmp_path, monkeypatch, capsys):
    """Rendering 30,000 scenes printed nothing for minutes: train_toy shows a bar of the scenes rendered,
    part by part (the parts make the same scenes as one go)."""
    import minigen.toy.data

    monkeypatch.setattr(tiny_training, "DATA_SIZE", 6)
    tiny_training.training_data(tmp_path / "work")
    err = capsys.readouterr().err
    assert "rendering the scenes: 100%" in err and "6/6" in err
    monkeypatch.setattr(minigen.toy.data, "PART", 4)
    parts, whole = render_dataset(6, 0), tiny_training.training_data(tmp_path / "work")  # two parts; one, read from the cache
    assert torch.equal(parts.images, whole.images) and parts.captions == whole.captions


@pytest.mark.slow
def test_toy_sd_export_loads_through_the_sd15_single_file_path(tiny_training, tmp_path):
    out = tmp_path / "toy-sd.safetensors"
    tiny_training.main(["sd", "--work", str(tmp_path / "work"), "--out", str(out)])
    checkpoint = read_state_dict(out)
    found = detect(checkpoint)
    assert (found.family, found.layout) == ("sd1", "single-file")
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."))
               for k in checkpoint)  # fmt: skip
    pipe = load_sd(out)
    assert pipe.unet.config == tiny_training.TOY_SD_UNET and pipe.default_size == 64
    assert pipe.vae.config.downsample_factor == 4 and pipe.vae.config.scaling_factor != 1.0  # measured on the data
    assert pipe.generate("a red star", steps=2, progress=False).shape == (1, 3, 64, 64)

    # --init: the exported model's VAE kept bit for bit, its UNet trained on, the reader's text encoder exported
    tiny_training.main(["sd", "--work", str(tmp_path / "work2"), "--out", str(tmp_path / "continued.safetensors"), "--init", str(out)])
    continued = load_sd(tmp_path / "continued.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(continued.vae.state_dict().values(), pipe.vae.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(continued.unet.state_dict().values(), pipe.unet.state_dict().values()))


@pytest.mark.slow
def test_toy_sd_from_scratch_on_another_models_autoencoder_with_a_curriculum_and_a_learning_curve(tiny_training, tmp_path):
    """--vae-from keeps the given model's autoencoder bit for bit and trains a fresh UNet; --eval-every
    writes a snapshot and a learning-curve point at each evaluation; the recipe changes are recorded, so
    the same work folder refuses a resume with other ones."""
    source = tmp_path / "source.safetensors"
    tiny_training.main(["sd", "--work", str(tmp_path / "work"), "--out", str(source)])
    work, out = tmp_path / "v2", tmp_path / "v2.safetensors"
    flags = ["--vae-from", str(source), "--one-object-steps", "2", "--eval-every", "2", "--eval-prompts", "2", "--steps", "3"]
    tiny_training.main(["sd", "--work", str(work), "--out", str(out), *flags])
    trained, base = load_sd(out), load_sd(source)
    assert all(torch.equal(a, b) for a, b in zip(trained.vae.state_dict().values(), base.vae.state_dict().values()))
    assert any(not torch.equal(a, b) for a, b in zip(trained.unet.state_dict().values(), base.unet.state_dict().values()))
    curve = [json.loads(line) for line in (work / "denoiser-eval.jsonl").read_text().splitlines()]
    assert [point["step"] for point in curve] == [2, 3] and all(0 <= point["mean"] <= 1 for point in curve)
    for point in curve:  # the shape probe at each point, on --eval-prompts scenes (halves of 2)
        assert set(point["shape_probe"]) == {"0.5", "0.7", "0.85"}
        for row in point["shape_probe"].values():
            assert all(row[k] in (0, 0.5, 1) for k in ("kept", "kept_swapped", "followed"))
            assert row["effect"] == pytest.approx(row["kept"] - row["kept_swapped"])
    assert sorted(p.name for p in (work / "snapshots").iterdir()) == ["toy-sd-000002.safetensors", "toy-sd-000003.safetensors"]
    final = load_sd(work / "snapshots" / "toy-sd-000003.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(final.unet.state_dict().values(), trained.unet.state_dict().values()))
    with pytest.raises(ValueError, match="another run"):
        tiny_training.main(["sd", "--work", str(work), "--out", str(out), "--overwrite", *flags[:-2], "--steps", "4", "--lr", "3e-3"])

    # --init F --text-from F: F's UNet trained on, on F's own text encoder (no reader stage), F's VAE kept
    again = tmp_path / "again.safetensors"
    tiny_training.main(["sd", "--work", str(tmp_path / "v3"), "--out", str(again), "--init", str(out), "--text-from", str(out)])
    continued = load_sd(again)
    assert not (tmp_path / "v3" / "reader.safetensors").exists()
    for part in ("vae", "text_encoders"):
        mine, theirs = getattr(continued, part), getattr(trained, part)
        mine, theirs = (mine[0], theirs[0]) if part == "text_encoders" else (mine, theirs)
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values())), part
    assert any(not torch.equal(a, b) for a, b in zip(continued.unet.state_dict().values(), trained.unet.state_dict().values()))


@pytest.mark.parametrize("model", ["sd", "flux"])
@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "argument --steps: 0 is not positive; give 1 or more"),
    (["--batch", "-2"], "argument --batch: -2 is negative; give 1 or more"),
    (["--one-object-steps", "-5"], "argument --one-object-steps: -5 is negative; give 0 (off) or more"),
    (["--eval-every", "-1"], "argument --eval-every: -1 is negative; give 0 (off) or more"),
    (["--eval-every", "10", "--eval-prompts", "0"], "argument --eval-prompts: 0 is not positive; give 1 or more"),
    (["--lr", "nan"], "argument --lr: nan is not a finite number above 0"),
    (["--lr=-1e-3"], "argument --lr: -1e-3 is not a finite number above 0"),
    (["--eval-prompts", "20"], "give --eval-every N too"),
    (["--text-from", "missing"], "--text-from missing: give an exported toy-"),
    (["--sigma-shift", "0"], "argument --sigma-shift: 0 is not a finite number above 0"),
])  # fmt: skip
def test_recipe_flags_that_cannot_apply_are_refused(tiny_training, tmp_path, model, flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        tiny_training.main([model, "--work", str(tmp_path), *flags])
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize("argv, message", [
    (["flux", "--vae-from", str(TOY_SD)], f"--vae-from {TOY_SD}: give an exported toy-flux folder"),
    (["flux", "--init", str(TOY_SD)], f"--init {TOY_SD}: give an exported toy-flux folder"),
    (["flux", "--text-from", str(TOY_FLUX / "text_encoder")], "give an exported toy-flux folder"),
    (["sd", "--text-from", str(TOY_FLUX)], f"--text-from {TOY_FLUX}: give an exported toy-sd file"),
    (["flux", "--init", str(TOY_FLUX), "--vae-from", str(TOY_FLUX)], "--vae-from trains a denoiser from scratch"),
    (["reader", "--steps", "3", "--text-from", str(TOY_SD)], "--steps, --text-from: recipe changes apply to the denoiser stage of sd and flux"),
    (["reader", "--init", str(TOY_SD)], "the reader trains from scratch"),
    (["sd", "--sigma-shift", "3"], "the timestep shift applies to toy-flux's flow matching only"),
    (["reader", "--layout", "halves"], "--layout: recipe changes apply to the denoiser stage"),
    (["flux", "--init", str(TOY_FLUX)], f"--init {TOY_FLUX} learnt the layout 'halves'; continue it with --layout halves"),
])  # fmt: skip
def test_exported_models_of_the_wrong_kind_are_refused(tiny_training, tmp_path, argv, message):
    """--init, --vae-from and --text-from take a toy-sd file for sd and a toy-flux folder for flux; the
    reader stage alone takes none of them, nor any recipe change."""
    with pytest.raises(SystemExit, match=re.escape(message)):
        tiny_training.main([*argv[:1], "--work", str(tmp_path), *argv[1:]])
    assert not any(tmp_path.iterdir())


def test_encoded_latents_are_cached_per_data_set_and_autoencoder(tiny_training, tmp_path):
    """encode_dataset keeps the latents in the cache folder, under the set's name and the autoencoder's
    fingerprint: a second call reads the file (planted values come back), another autoencoder gets a file of
    its own, and so does another set (a --layout halves run read the anywhere run's latents on one --vae-from)."""
    from safetensors.torch import save_file

    from minigen.models.vae import AutoencoderKL

    torch.manual_seed(0)
    vae, data, cpu = AutoencoderKL(tiny_training.TOY_SD_VAE).eval(), render_dataset(6, 0), torch.device("cpu")
    first = tiny_training.encode_dataset(vae, data, "set", cpu, cache=tmp_path)
    assert torch.equal(first, tiny_training.encode_dataset(vae, data, "set", cpu))  # the cache changes nothing
    [file] = tmp_path.glob("set-latents-*.safetensors")
    save_file({"latents": torch.zeros_like(first)}, file)
    assert torch.equal(tiny_training.encode_dataset(vae, data, "set", cpu, cache=tmp_path), torch.zeros_like(first))
    torch.manual_seed(1)
    other = AutoencoderKL(tiny_training.TOY_SD_VAE).eval()
    assert not torch.equal(tiny_training.encode_dataset(other, data, "set", cpu, cache=tmp_path), torch.zeros_like(first))
    assert len(list(tmp_path.glob("set-latents-*.safetensors"))) == 2

    anywhere, halves = tiny_training.data_name(), tiny_training.data_name(layout="halves")
    layouts = {name: render_dataset(6, 0, layout=layout) for name, layout in ((anywhere, "anywhere"), (halves, "halves"))}
    cached = {name: tiny_training.encode_dataset(vae, scenes, name, cpu, cache=tmp_path) for name, scenes in layouts.items()}
    assert torch.equal(cached[halves], tiny_training.encode_dataset(vae, layouts[halves], halves, cpu))
    assert not torch.equal(cached[halves], cached[anywhere])


def test_object_counts_agree_with_the_judge_on_the_rendered_scenes(tiny_training):
    """The curriculum's object counts (scenes drawn again) match what the judge finds in the renders."""
    from minigen.toy.judge import judge

    data, counts = render_dataset(30, 0), tiny_training.object_counts(30, 0)
    found = [len(judge(image.permute(1, 2, 0).numpy())) for image in data.images]
    assert set(counts) == {1, 2, 3} and found == counts.tolist()


def _layer_names(keys) -> set[str]:
    """Key names with layer numbers folded ("encoder.layers.N.mlp.fc1.weight"): the layout, not the depth."""
    return {re.sub(r"\.\d+\.", ".N.", key) for key in keys}


@pytest.mark.slow
def test_toy_flux_export_loads_through_the_bfl_path(tiny_training, tiny_flux, manifest):
    _, out = tiny_flux
    found = detect(read_state_dict(out / "flux1-toy.safetensors"))
    assert (found.family, found.layout) == ("flux-schnell", "bfl")
    assert detect(read_state_dict(out / "ae.safetensors")).family == "flux-ae"
    for folder, name in (("text_encoder", "diffusers_flux1_text_encoder"), ("text_encoder_2", "diffusers_flux1_text_encoder_2")):
        official = manifest(f"{name}.json")["tensors"]
        assert _layer_names(read_state_dict(out / folder / "model.safetensors")) == _layer_names(official), folder
    pipe = load_flux(out / "flux1-toy.safetensors", ae=out / "ae.safetensors", text_encoders=out, dtype=torch.float32)
    assert pipe.transformer.config == tiny_training.TOY_FLUX and pipe.patch == 8
    assert (pipe.default_size, pipe.default_steps, pipe.default_cfg, pipe.max_length) == (64, 25, 4.0, 48)
    assert pipe.vae.config.shift_factor != 0.0  # FLUX-style: the latent mean is subtracted
    assert len(pipe.t5_tokenizer.tokenize("a large red star with blue stripes to the left of two small circles")) == 14
    assert pipe.generate("a red star", steps=2, true_cfg=pipe.default_cfg, progress=False).shape == (1, 3, 64, 64)


def _reader(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The EMA weights of a reader stage's text encoder, from its checkpoint, by parameter name."""
    return {k.removeprefix("ema.text."): v for k, v in load_file(checkpoint).items() if k.startswith("ema.text.")}


def test_toy_flux_trains_its_transformer_on_the_frozen_readers(tiny_training, tiny_flux):
    """The reader stages teach T5 and CLIP; the denoiser stage then trains the transformer and leaves both
    readers exactly as the reader stages left them (the export holds their EMA weights: T5 bit for bit in
    fp32, CLIP in fp16)."""
    work, out = tiny_flux
    t5, t5_reader = read_state_dict(out / "text_encoder_2" / "model.safetensors"), _reader(work / "reader-t5.safetensors")
    assert set(t5) == set(t5_reader) and all(torch.equal(t5[k], t5_reader[k]) for k in t5)
    clip = {k.removeprefix("text_model."): v for k, v in read_state_dict(out / "text_encoder" / "model.safetensors").items()}
    clip_reader = {k.removeprefix("text_model."): v for k, v in _reader(work / "reader-clip.safetensors").items()}
    assert set(clip) == set(clip_reader) and all(torch.equal(clip[k], clip_reader[k].half()) for k in clip)
    torch.manual_seed(tiny_training.STAGES["flux"]["denoiser"].seed)
    start = tiny_training.Flux(tiny_training.TOY_FLUX)
    assert not torch.equal(read_state_dict(out / "flux1-toy.safetensors")["img_in.weight"], start.img_in.weight.half())


@pytest.mark.slow
def test_toy_flux_from_scratch_on_another_models_autoencoder_and_readers_with_a_learning_curve(tiny_training, tiny_flux, tmp_path):
    """--vae-from F and --text-from F (a toy-flux folder) take F's autoencoder, tokenizer and readers (same
    fingerprints, no reader or VAE stage) and train a fresh transformer on them; --eval-every writes
    snapshot folders that load as FLUX pipelines and a learning-curve point each; a resume with other recipe
    changes is refused. --layout halves trains on scenes of that layout and the export states it."""
    _, source = tiny_flux
    work, out = tmp_path / "v2", tmp_path / "v2-flux"
    flags = ["--vae-from", str(source), "--text-from", str(source), "--one-object-steps", "2", "--eval-every", "2", "--eval-prompts", "2",
             "--sigma-shift", "3", "--layout", "halves"]  # fmt: skip
    tiny_training.main(["flux", "--work", str(work), "--out", str(out), *flags, "--steps", "3"])
    assert sorted(p.name for p in work.glob("*.safetensors")) == ["denoiser.safetensors"]  # no reader, VAE or decoder stage
    assert (toy_layout(source), toy_layout(out), toy_layout(work / "snapshots" / "toy-flux-000002")) == ("anywhere", "halves", "halves")
    (data,) = tmp_path.glob("toy-data-*-halves.safetensors")  # rendered in that layout: every object on a slot
    images = load_file(data)["images"]
    assert images.shape[0] == tiny_training.DATA_SIZE
    for i in range(min(8, images.shape[0])):
        scene = sample_scene(np.random.default_rng([tiny_training.DATA_SEED, i]), layout="halves")
        assert torch.equal(images[i], torch.from_numpy(np.array(render(scene).image)).permute(2, 0, 1))
    trained, base = tiny_training.load_toy("flux", out, torch.device("cpu")), tiny_training.load_toy("flux", source, torch.device("cpu"))
    assert fingerprint(trained.t5, trained.clip) == fingerprint(base.t5, base.clip)
    assert fingerprint(trained.vae) == fingerprint(base.vae)
    assert (out / "tokenizer_2" / "spiece.model").read_bytes() == (source / "tokenizer_2" / "spiece.model").read_bytes()
    assert fingerprint(trained.transformer) != fingerprint(base.transformer)
    curve = [json.loads(line) for line in (work / "denoiser-eval.jsonl").read_text().splitlines()]
    assert [point["step"] for point in curve] == [2, 3] and all(0 <= point["mean"] <= 1 for point in curve)
    assert sorted(p.name for p in (work / "snapshots").iterdir()) == ["toy-flux-000002", "toy-flux-000003"]
    final = load_flux(work / "snapshots" / "toy-flux-000003" / "flux1-toy.safetensors", ae=work / "snapshots" / "toy-flux-000003" / "ae.safetensors",
                      text_encoders=work / "snapshots" / "toy-flux-000003", dtype=torch.float32)  # fmt: skip
    assert fingerprint(final.transformer) == fingerprint(trained.transformer)
    assert fingerprint(final.t5, final.clip) == fingerprint(base.t5, base.clip)
    with pytest.raises(ValueError, match="another run"):
        tiny_training.main(["flux", "--work", str(work), "--out", str(out), "--overwrite", *flags, "--steps", "4"])
    with pytest.raises(ValueError, match="another run"):  # the shift is part of the recipe
        tiny_training.main(["flux", "--work", str(work), "--out", str(out), "--overwrite", *flags[:-4], *flags[-2:], "--steps", "3"])
    with pytest.raises(ValueError, match="another run"):  # so is the layout
        tiny_training.main(["flux", "--work", str(work), "--out", str(out), "--overwrite", *flags[:-2], "--steps", "3"])


def test_the_reader_stage_moves_only_the_token_rows_its_captions_use(tiny_training, tmp_path):
    """Every weight of a reader trains, yet the token table's rows that no caption of the pool uses stay
    exactly as drawn (no gradient, no weight decay), and with them their EMA."""
    stage, tokenizer = TrainConfig(steps=3, batch=4, lr=1e-2, seed=9, warmup=1), load_t5_tokenizer(TOY_FLUX / "tokenizer_2")
    build = partial(build_t5_encoder, tiny_training.TOY_T5)
    torch.manual_seed(stage.seed)
    drawn = build().shared.weight.detach().clone()
    t5 = tiny_training.train_reader("reader-t5", build, tokenizer, 48, stage, tmp_path, torch.device("cpu"), save_every=250)
    pool = [sample_captioned(np.random.default_rng([tiny_training.READER_SEED, i]))[1] for i in range(tiny_training.READER_CAPTIONS)]
    used = torch.zeros(len(drawn), dtype=torch.bool)
    used[reading_batch(pool, tokenizer, 48).ids.unique()] = True
    assert 0 < used.sum() < len(used)
    assert torch.equal(t5.shared.weight[~used], drawn[~used])
    assert not torch.equal(t5.shared.weight[used], drawn[used])


def test_toy_flux_continues_an_export_on_its_own_readers_with_its_autoencoder_and_tokenizer(tiny_training, tiny_flux, tmp_path):
    """--init F --text-from F trains F's transformer on: its readers stay frozen (no reader stage), the
    autoencoder and the tokenizer are carried over unchanged, and the result loads through the BFL path again."""
    (_, first), second = tiny_flux, tmp_path / "second"
    tiny_training.main(["flux", "--work", str(tmp_path / "work2"), "--out", str(second), "--init", str(first), "--text-from", str(first)])
    assert sorted(p.name for p in (tmp_path / "work2").glob("*.safetensors")) == ["continue.safetensors"]
    assert (second / "tokenizer_2" / "spiece.model").read_bytes() == (first / "tokenizer_2" / "spiece.model").read_bytes()
    for part in ("ae.safetensors", "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"):
        saved_first, saved_second = read_state_dict(first / part), read_state_dict(second / part)
        assert all(torch.equal(saved_first[k], saved_second[k]) for k in saved_first), part
    flux_first, flux_second = read_state_dict(first / "flux1-toy.safetensors"), read_state_dict(second / "flux1-toy.safetensors")
    assert not torch.equal(flux_first["img_in.weight"], flux_second["img_in.weight"])
    pipe = load_flux(second / "flux1-toy.safetensors", ae=second / "ae.safetensors", text_encoders=second, dtype=torch.float32)
    assert pipe.generate("a red star", steps=2, true_cfg=pipe.default_cfg, progress=False).shape == (1, 3, 64, 64)
    with pytest.raises(SystemExit):
        tiny_training.main(["sd", "--work", str(tmp_path / "work3"), "--init", str(first)])


def test_an_existing_out_is_refused_before_any_work(tiny_training, tmp_path):
    """--out already there: refused at the start (not after hours of training) unless --overwrite."""
    out = tmp_path / "toy-sd.safetensors"
    out.write_bytes(b"an earlier model")
    with pytest.raises(SystemExit, match=re.escape("exists; give another --out, or pass --overwrite")):
        tiny_training.main(["sd", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert out.read_bytes() == b"an earlier model" and not (tmp_path / "work").exists()
    (tmp_path / "folder").mkdir()  # an --out that could not be written at the end (the folder: IsADirectoryError hours in)
    for given, message in ((tmp_path / "folder", "is a folder; give a file path inside it"), (tmp_path / "toy.bin", "must be a .safetensors file")):
        with pytest.raises((OSError, ValueError), match=message):
            tiny_training.main(["sd", "--work", str(tmp_path / "work"), "--out", str(given), "--overwrite"])


def test_a_file_given_for_a_folder_is_refused_before_any_work(tiny_training, tmp_path, monkeypatch):
    """--work, and toy-flux's --out, are folders: a file there was taken for an output to replace and found
    only when written, after the training."""
    for stage in ("train_sd", "train_flux", "sd_reader"):
        monkeypatch.setattr(tiny_training, stage, lambda *a: pytest.fail("trained before the checks"))
    file = tmp_path / "file"
    file.write_text("not a folder")
    flux_out = ["flux", "--work", str(tmp_path / "work"), "--out", str(file), "--overwrite"]
    for argv, flag in ((["reader", "--work", str(file)], "--work"), (flux_out, "--out")):
        with pytest.raises(NotADirectoryError, match=f"{flag} .*file is a file, and {flag} names a folder"):
            tiny_training.main(argv)
    assert file.read_text() == "not a folder" and sorted(tmp_path.iterdir()) == [file]


def test_a_file_that_is_not_an_exported_toy_sd_is_refused_before_any_training(tiny_training, tmp_path, monkeypatch):
    """sd's --init, --vae-from and --text-from were checked to be files only: an image started the reader
    stage (minutes) before load_sd read it. Each file's header is read first: toy-sd's states "minigen.toy"."""
    monkeypatch.setattr(tiny_training, "train_sd", lambda *a: pytest.fail("trained before the checks"))
    image = tmp_path / "image.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    for flag, path in (("--init", image), ("--vae-from", TOY_FLUX / "ae.safetensors"), ("--text-from", TOY_FLUX / "flux1-toy.safetensors")):
        with pytest.raises(SystemExit, match=re.escape(f"{flag} {path}: give an exported toy-sd file")):
            tiny_training.main(["sd", "--work", str(tmp_path / "work"), flag, str(path)])
    assert not (tmp_path / "work").exists()
