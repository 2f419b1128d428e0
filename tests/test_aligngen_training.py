"""AlignGen training (minigen/methods/aligngen_training.py, scripts/train_aligngen.py) on a tiny random FLUX.

References and tolerances, test by test:
- Dropout and name substitution: counts over 20,000 draws within 5 binomial standard deviations of
  n·p (a false alarm about once in 1.7 million runs); the step with dropout 1 gives bit for bit the loss
  of black references, the step with level 1 always that of the parent-name captions.
- What trains: the base transformer and autoencoder bit for bit unchanged; S*, DEM and LoRA changed (or
  left alone where an ablation does not use them).
- The saved file: loaded, it gives bit-identical prompt embeddings and bit-identical velocities.
- A resumed run: the same losses and weights as an uninterrupted one (bit for bit).
- DDP: 2 processes (gloo, torch.multiprocessing) against 1 process with the same global batch 4: the
  loss curves agree within 1e-5 relative and the weights within 1e-5 (fp32 sums in other orders).
"""

import json
import math
import os
import socket
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from minigen.image import to_pil
from minigen.loading.aligngen import load_aligngen, save_aligngen, trained_settings
from minigen.methods.aligngen import AlignGen, AlignGenConfig, AlignGenSettings, ConceptTokens, aligngen_inputs
from minigen.methods.aligngen_training import (
    TRAINING,
    AlignGenStep,
    Distributed,
    EncodedCaption,
    FrozenBase,
    TrainingPair,
    TrainingSettings,
    draw,
    init_distributed,
    initial_token,
    train_aligngen,
)
from minigen.models.flux import Flux
from minigen.toy.judge import judge
from minigen.models.vae import AutoencoderKL
from minigen.pipelines.flux import FluxPipeline

from conftest import TINY_FLUX, TINY_FLUX_VAE, load_script

SIZE, M = 32, 8
METHOD = AlignGenSettings(reference_size=None)
EXACT = TrainingSettings(autocast=False)  # fp32 everywhere: bf16 autocast would hide the comparisons below
FEW = replace(TRAINING, steps=3, batch=4, lr=1e-3, warmup=0)
DDP_RUN = replace(FEW, steps=6)


def tiny_setup(s_star: bool = True):
    """The same tiny base, pairs and AlignGen in every process: everything drawn from fixed seeds."""
    torch.manual_seed(0)
    transformer, vae = Flux(TINY_FLUX).eval(), AutoencoderKL(TINY_FLUX_VAE).eval()
    pipe = FluxPipeline(transformer, vae, None, None, None, None, default_size=SIZE, default_cfg=1.0)
    g = torch.Generator().manual_seed(1)
    d = TINY_FLUX.context_in_dim

    def caption(level: int) -> EncodedCaption:  # the class name takes 2 tokens, parent and broad 1
        span = (3, 4) if level == 0 else (3,)
        states, pooled = torch.randn(M, d, generator=g), torch.randn(TINY_FLUX.vec_in_dim, generator=g)
        return EncodedCaption(states, pooled, ConceptTokens(span, 2 if s_star else None))

    pairs = [
        TrainingPair(torch.rand(3, SIZE, SIZE, generator=g), torch.rand(3, SIZE, SIZE, generator=g), torch.randn(5, d, generator=g),
                     tuple(caption(level) for level in range(1 + i % 3)))  # fmt: skip
        for i in range(6)
    ]
    aligngen = AlignGen(AlignGenConfig.for_transformer(transformer), transformer, initial_token=initial_token(pairs),
                        generator=torch.Generator().manual_seed(2))  # fmt: skip
    return pipe, pairs, aligngen


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --- the training strategy's draws ------------------------------------------------------------------------------


def within_binomial(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1e-9


@pytest.mark.parametrize("dropout, names", [(0.5, (0.5, 0.25, 0.25)), (0.3, (0.6, 0.3, 0.1))])
def test_dropout_and_name_substitution_follow_their_probabilities(dropout, names):
    """20,000 draws: P(black reference) = dropout; a pair with 3 names gets each with its probability, one with
    2 names with the two renormalized, one with 1 name always its class name."""
    _, pairs, _ = tiny_setup()
    settings = TrainingSettings(reference_dropout=dropout, name_probabilities=names)
    n = 20_000
    draws = draw(torch.Generator().manual_seed(0), pairs, n, (16, 4, 4), settings)
    assert within_binomial(int(draws.dropped.sum()), n, dropout)
    levels_available = torch.tensor([len(pairs[i].captions) for i in draws.pairs.tolist()])
    for available in (1, 2, 3):
        chosen = draws.levels[levels_available == available]
        p = torch.tensor(names[:available]) / sum(names[:available])
        for level in range(3):
            count = int((chosen == level).sum())
            assert within_binomial(count, len(chosen), float(p[level]) if level < available else 0.0), (available, level, count)
    off = draw(torch.Generator().manual_seed(0), pairs, 2000, (16, 4, 4), replace(settings, strategy=False))
    assert not off.dropped.any() and (off.levels == 0).all()


def step_loss(pipe, pairs, aligngen, training, seed=5):
    step = AlignGenStep(aligngen, FrozenBase(pipe.transformer, pipe.vae), METHOD, training)
    draws = draw(torch.Generator().manual_seed(seed), pairs, 4, (16, 4, 4), training)
    with torch.no_grad():
        return step([pairs[i] for i in draws.pairs.tolist()], draws)


def test_a_dropped_reference_is_a_black_image_and_a_substituted_name_its_caption():
    """Dropout 1 gives the loss of black references bit for bit; level 1 always gives that of the parent captions."""
    pipe, pairs, aligngen = tiny_setup()
    black = [replace(p, reference=torch.zeros_like(p.reference)) for p in pairs]
    none = TrainingSettings(reference_dropout=0.0, name_probabilities=(1.0, 0.0, 0.0))
    assert torch.equal(step_loss(pipe, pairs, aligngen, replace(none, reference_dropout=1.0)), step_loss(pipe, black, aligngen, none))
    assert not torch.equal(step_loss(pipe, pairs, aligngen, none), step_loss(pipe, black, aligngen, none))
    with_parent = [p for p in pairs if len(p.captions) >= 2]
    parent_first = [replace(p, captions=(p.captions[1],)) for p in with_parent]
    parent = replace(none, name_probabilities=(0.0, 1.0, 0.0))
    assert torch.equal(step_loss(pipe, with_parent, aligngen, parent), step_loss(pipe, parent_first, aligngen, none))


def test_the_step_module_keeps_its_recipe_in_eval_mode():
    """The recipe sat in `self.training`, nn.Module's train/eval flag: `.eval()` turned it into False and the
    next forward failed ('bool' object has no attribute 'guidance'). The module has no mode-dependent layer."""
    pipe, pairs, aligngen = tiny_setup()
    training = TrainingSettings(reference_dropout=0.0)
    step = AlignGenStep(aligngen, FrozenBase(pipe.transformer, pipe.vae), METHOD, training)
    draws = draw(torch.Generator().manual_seed(5), pairs, 4, (16, 4, 4), training)
    with torch.no_grad():
        losses = [module([pairs[i] for i in draws.pairs.tolist()], draws) for module in (step.eval(), step.train())]
    assert step.training is True and step.recipe == training and torch.equal(*losses)


# --- what trains ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, moved", [(METHOD, {"token", "dem", "lora"}), (replace(METHOD, dem=False), {"token", "lora"}),
                                           (replace(METHOD, s_star=False), {"lora"})])  # fmt: skip
def test_training_moves_the_trained_parts_only_and_never_the_base(tmp_path, method, moved):
    pipe, pairs, aligngen = tiny_setup(s_star=method.s_star)
    base = {"transformer": snapshot(pipe.transformer), "vae": snapshot(pipe.vae)}
    before = {name: snapshot(getattr(aligngen, name)) for name in ("token", "dem", "lora")}
    losses = train_aligngen(pipe, aligngen, pairs, FEW, tmp_path, settings=method, training=EXACT).losses
    assert len(losses) == FEW.steps and all(math.isfinite(loss) for loss in losses)
    for name, model in (("transformer", pipe.transformer), ("vae", pipe.vae)):
        assert all(torch.equal(a, b) for a, b in zip(base[name].values(), snapshot(model).values())), name
    for name, state in before.items():
        changed = any(not torch.equal(a, b) for a, b in zip(state.values(), snapshot(getattr(aligngen, name)).values()))
        assert changed == (name in moved), name


def test_a_trained_file_round_trips_to_identical_outputs(tmp_path):
    """Trained 3 steps, saved, loaded: bit-identical weights and prompt embeddings; sampled latents within
    1e-6 (bit equality there depends on thread count: the loaded tensors' layout can change the order of
    a multi-threaded reduction)."""
    pipe, pairs, aligngen = tiny_setup()
    trained = train_aligngen(pipe, aligngen, pairs, FEW, tmp_path / "work", settings=METHOD, training=EXACT)
    path = save_aligngen(trained.aligngen, tmp_path / "trained.safetensors", metadata=trained.metadata)
    loaded = load_aligngen(path, pipe.transformer)
    txt, pooled = pairs[0].captions[0].txt[None], pairs[0].captions[0].pooled[None]
    concept = [pairs[0].captions[0].concept]

    def velocity(model):
        out = aligngen_inputs(model, pipe.vae, pipe.transformer, txt, pooled, concept, [pairs[0].reference], [pairs[0].redux], METHOD)
        latents = pipe.generate(**out.generate_kwargs(), width=SIZE, height=SIZE, steps=2, seed=3, progress=False, output="latents")
        return out.prompt_embeds, latents

    (embeds_a, latents_a), (embeds_b, latents_b) = velocity(trained.aligngen), velocity(loaded)
    trained_state, loaded_state = trained.aligngen.state_dict(), loaded.state_dict()
    assert trained_state.keys() == loaded_state.keys() and all(torch.equal(trained_state[k], loaded_state[k]) for k in trained_state)
    assert torch.equal(embeds_a, embeds_b) and (latents_a - latents_b).abs().max() <= 1e-6
    assert json.loads(loaded_metadata(path)["training"])["method"]["mask"] is True
    assert trained.aligngen.settings == loaded.settings == METHOD  # it runs as trained, before and after the file (it ran the paper's)


def loaded_metadata(path):
    from minigen.loading.files import read_metadata

    return read_metadata(path)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    pipe, pairs, aligngen = tiny_setup()
    straight = train_aligngen(pipe, aligngen, pairs, replace(FEW, steps=4), tmp_path / "a", settings=METHOD, training=EXACT)
    pipe, pairs, first = tiny_setup()
    part = train_aligngen(pipe, first, pairs, replace(FEW, steps=2), tmp_path / "b", settings=METHOD, training=EXACT)
    pipe, pairs, second = tiny_setup()
    rest = train_aligngen(pipe, second, pairs, replace(FEW, steps=4), tmp_path / "b", settings=METHOD, training=EXACT)
    assert part.losses + rest.losses == straight.losses
    assert all(torch.equal(a, b) for a, b in zip(straight.aligngen.state_dict().values(), second.state_dict().values()))
    with pytest.raises(ValueError, match="checkpoint of another run"):  # other settings: refused, not resumed
        train_aligngen(pipe, tiny_setup()[2], pairs, replace(FEW, steps=5), tmp_path / "b", settings=replace(METHOD, mask=False), training=EXACT)
    with torch.no_grad():  # a base of the same config with other weights (another checkpoint of the model)
        pipe.transformer.img_in.weight.add_(0.01)
    with pytest.raises(ValueError, match="checkpoint of another run .*differs in base"):
        train_aligngen(pipe, tiny_setup()[2], pairs, replace(FEW, steps=5), tmp_path / "b", settings=METHOD, training=EXACT)


# --- several processes ------------------------------------------------------------------------------------------


def ddp_worker(rank: int, world: int, port: int, work: str) -> None:
    """One torchrun-like process: the environment torchrun sets, then the library's own init and training."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    job = init_distributed("cpu")
    pipe, pairs, aligngen = tiny_setup()
    trained = train_aligngen(pipe, aligngen, pairs, DDP_RUN, work, settings=METHOD, training=EXACT, distributed=job, log_every=1000)
    torch.save({"losses": trained.losses, "state": trained.aligngen.state_dict()}, os.path.join(work, f"result{rank}.pt"))
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_processes_follow_the_loss_curve_of_one(tmp_path):
    """gloo, 2 processes with 2 pairs each against 1 process with the same global batch of 4."""
    pipe, pairs, aligngen = tiny_setup()
    one = train_aligngen(pipe, aligngen, pairs, DDP_RUN, tmp_path / "one", settings=METHOD, training=EXACT)
    work = tmp_path / "two"
    work.mkdir()
    mp.spawn(ddp_worker, args=(2, free_port(), str(work)), nprocs=2, join=True)
    results = [torch.load(work / f"result{rank}.pt", weights_only=True) for rank in range(2)]
    for result in results:
        losses = torch.tensor(result["losses"])
        assert torch.allclose(losses, torch.tensor(one.losses), rtol=1e-5, atol=0), (result["losses"], one.losses)
        for key, value in one.aligngen.state_dict().items():
            assert torch.allclose(result["state"][key], value, rtol=1e-5, atol=1e-6), key
    assert (work / "aligngen.safetensors").exists() and [p.name for p in work.glob("*.tsv")] == ["aligngen-loss.tsv"]  # rank 0 writes


# --- bad input -------------------------------------------------------------------------------------------------------


def test_bad_training_input_is_refused(tmp_path):
    pipe, pairs, aligngen = tiny_setup()
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        train_aligngen(pipe, aligngen, pairs, FEW, tmp_path, distributed=Distributed(0, 3))
    with pytest.raises(ValueError, match="the target must be"):
        train_aligngen(pipe, aligngen, [*pairs, replace(pairs[0], target=torch.rand(3, 16, 16))], FEW, tmp_path)
    with pytest.raises(ValueError, match="encoded with S\\*"):
        train_aligngen(pipe, aligngen, pairs, FEW, tmp_path, settings=replace(METHOD, s_star=False))
    with pytest.raises(ValueError, match="summing to 1"):
        TrainingSettings(name_probabilities=(0.5, 0.2))
    with pytest.raises(ValueError, match="probability"):
        TrainingSettings(reference_dropout=1.5)
    class_only = [replace(pair, captions=pair.captions[:1]) for pair in pairs]  # level 0 only, which (0, .5, .5) never draws
    with pytest.raises(ValueError, match=r"captions at levels 0..0 only, which the name probabilities \(0.0, 0.5, 0.5\) never draw"):
        train_aligngen(pipe, aligngen, class_only, FEW, tmp_path / "levels", training=replace(EXACT, name_probabilities=(0.0, 0.5, 0.5)))


# --- the script ---------------------------------------------------------------------------------------------------


def test_the_script_trains_on_toy_pairs_and_writes_a_file_for_its_base(toy_flux, tmp_path, capsys, monkeypatch):
    script = load_script("train_aligngen")
    monkeypatch.setattr(script, "load_pipeline", lambda model, device: toy_flux)  # the fixture's toy-flux: no second load
    out = tmp_path / "toy.safetensors"
    assert script.run(["--toy-pairs", "4", "--steps", "2", "--batch", "2", "--out", str(out)]) == 0
    aligngen = load_aligngen(out, toy_flux.transformer)
    assert aligngen.config.dim == toy_flux.transformer.config.context_in_dim
    assert trained_settings(out) == AlignGenSettings(reference_size=64)  # what sample.py --aligngen runs it with
    assert script.run(["--toy-pairs", "4", "--steps", "2", "--batch", "2", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_toy_pairs_on_toy_flux_are_scenes_of_its_halves_world(toy_flux):
    """toy-flux learnt one or two objects on the canvas halves: its pairs' targets and references are
    renders of that world (the judge finds each object centred on a slot)."""
    script = load_script("train_aligngen")
    slots = {(17, 32), (47, 32)}
    for pair in script.toy_pairs(toy_flux, 4, seed=0, s_star=True, size=64, layout="halves"):
        for image in (pair.target, pair.reference):
            found = judge(to_pil(image[None])[0])
            assert 1 <= len(found) <= 2, found
            for obj in found:
                ys, xs = np.nonzero(obj.mask)
                centre = ((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2)  # of the box: slots lie 30 px apart
                assert min(max(abs(centre[0] - x), abs(centre[1] - y)) for x, y in slots) <= 5, centre


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--toy-pairs", "4", "--names", "0.5", "0.4"], "summing to 1"),
        (["--pairs", "missing.jsonl"], "does not exist"),
        (["--pairs", "bad.jsonl"], "give target, reference, caption"),
        (["--pairs", "pairs.jsonl"], "needs --redux"),
        (["--pairs", "pairs.jsonl", "--redux", "r", "--siglip", "s"], "cannot be read as an image"),
        (["--toy-pairs", "4", "--work", "garbage.png"], "--work garbage.png is a file, and --work names a folder"),  # found at step 1
    ],
)
def test_script_errors_are_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"target": "t.png"}\n')
    (tmp_path / "garbage.png").write_bytes(b"not a png")
    line = {"target": "garbage.png", "reference": "garbage.png", "caption": "a {} on grass", "names": ["star", "symbol"]}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(line) + "\n")
    script = load_script("train_aligngen")
    monkeypatch.setattr(script, "load_pipeline", lambda *a, **k: pytest.fail("the model loads only after the checks"))
    assert script.run([*arguments, "--out", "x.safetensors"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
