"""A small training loop that every minigen training script shares: resumable, seeded, logged.

    trainer = Trainer("vae", {"vae": vae}, TrainConfig(steps=2500, batch=32, lr=1e-3, seed=1), work=Path("runs/x"))
    trainer.run(loss_fn)                 # loss_fn(generator) -> scalar loss of one batch
    vae.load_state_dict(trainer.ema_state("vae"))

What it does, step by step: AdamW at a learning rate that warms up linearly and then follows a
cosine down to a tenth (or stays constant); bf16 autocast where bf16 is native (`bf16_is_fast`);
gradients clipped to norm 1; an exponential moving average (EMA) of the weights (optionally with
a warm-up of its decay, so that a short run's average does not keep its starting weights). Every
`save_every` steps it writes `<work>/<name>.safetensors` with the weights, the EMA, Adam's
moments and the random state, so a run stopped at any point and started again with the same
command continues exactly where its last checkpoint left it. Only the modules' trainable
parameters are optimized: freeze a base model with `requires_grad_(False)`. Each module may have
a peak learning rate of its own (`lr={"embeddings": 1e-3, ...}`: one Adam parameter group per
module), and the schedule scales all of them alike. A checkpoint also records `run`, what the run
is about (the frozen base it trains against, its data), with the schedule (warmup, cosine and its
length, EMA) and the peak learning rates, and a checkpoint of another run is refused rather than
resumed (what an older checkpoint did not record yet is taken as this run's), as are one of another model (other parameter names or shapes) and one past the steps asked
for. A loss or a gradient that is not finite stops the run before it reaches the weights, so the last
checkpoint stays the last good one. `compact_checkpoint` writes a copy small enough to commit (weights and
EMA in bf16, no Adam moments), from which a run resumes the same way, with fresh moments.
Losses go to a progress bar, to a line every `log_every` steps, and to `<work>/<name>-loss.tsv`;
an optional `evaluate` callback measures the EMA weights every `eval_every` steps, into
`<work>/<name>-eval.jsonl` (a learning curve).
"""

from __future__ import annotations

import hashlib
import json
import os
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn
from tqdm import tqdm

from minigen.loading.detect import CheckpointError
from minigen.loading.files import check_output_path, check_writable, read_metadata, read_state_dict, write_atomically


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch: int
    lr: float
    seed: int
    warmup: int = 100  # steps of linear warmup
    ema: float = 0.999  # EMA decay per step (0 keeps just the latest weights)
    ema_warmup: bool = False  # decay min(ema, (1 + step) / (10 + step)): the average forgets the start quickly
    cosine: bool = True  # decay to a tenth of lr after the warmup; False keeps lr constant


def schedule_record(config: TrainConfig) -> str:
    """What of `config` shapes the weights a resumed run continues: the warmup, the cosine and its length
    (a constant rate may run longer), the EMA."""
    length = f" over {config.steps} steps" if config.cosine else ""
    return f"warmup {config.warmup}, {'cosine' + length if config.cosine else 'constant'}, ema {config.ema:g}" + (
        " with warmup" if config.ema_warmup else "")


def fingerprint(*items: nn.Module | Tensor) -> str:
    """A short digest of modules' weights (every parameter and buffer, by name, shape and values)
    or of tensors: equal weights give equal digests, so a run can tell which base it trained on."""
    digest = hashlib.sha256()
    for item in items:
        named = item.state_dict().items() if isinstance(item, nn.Module) else [("", item)]
        for key, value in named:
            digest.update(f"{key}{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def base_fingerprint(pipe) -> str:
    """The `fingerprint` of a pipeline's weights, as an adapter trained on it records its base: FLUX's
    transformer, autoencoder, T5 and CLIP, or SD's UNet, autoencoder and text encoders."""
    if hasattr(pipe, "transformer"):
        return fingerprint(pipe.transformer, pipe.vae, pipe.t5, pipe.clip)
    return fingerprint(pipe.unet, pipe.vae, *pipe.text_encoders)


def cached_tensors(
    file: Path, make: Callable[[], tuple[dict[str, Tensor], dict[str, str]]]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors (by name) and string metadata kept in `file`; where it does not exist yet, `make()`
    computes them and they are written there (atomically: a run stopped while writing leaves no half
    file). Rendered training sets and their latents take minutes on a CPU; every run, and every script,
    that needs the same ones reads them from one file named for what they are."""
    if file.exists():
        with safe_open(file, "pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    tensors, metadata = make()
    content = save({key: value.contiguous() for key, value in tensors.items()}, metadata)
    write_atomically(file, lambda out: out.write(content), overwrite=True)
    return tensors, metadata


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up on ``device``: on a GPU, and on a CPU with bf16 matrix
    instructions (AMX or AVX512-BF16). A CPU without them (AVX2 only) emulates bf16, and there a
    training step of toy-flux's transformer is six times slower than in fp32."""
    if device.type != "cpu":
        return True
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


class Trainer:
    """Adam with warmup and cosine decay, an EMA copy, bf16 autocast where native, checkpoints that
    resume exactly."""

    def __init__(
        self,
        name: str,
        modules: dict[str, nn.Module],
        config: TrainConfig,
        work: Path,
        device: torch.device | None = None,
        run: dict[str, str] | None = None,
        lr: Mapping[str, float] | None = None,
        rank: int = 0,
    ):
        self.name, self.modules, self.config = name, modules, config
        self.rank = rank  # in a DDP job, only rank 0 writes the checkpoint and the loss log, and shows progress
        if unknown := sorted(set(lr or {}) - set(modules)):
            raise ValueError(f"{name}: learning rates for {unknown}, which are not among the modules {sorted(modules)}")
        self.lrs = {m: (lr or {}).get(m, config.lr) for m in modules}  # each module's peak learning rate
        peak_lr = ", ".join(f"{m} {float(value)}" for m, value in self.lrs.items())  # lr=1 and lr=1.0 are one run
        self.run_info = {**(run or {}), "schedule": schedule_record(config), "peak_lr": peak_lr}
        self.device = device or next(p.device for m in modules.values() for p in m.parameters())
        self.file = Path(work) / f"{name}.safetensors"
        self.loss_log, self.eval_log = self.file.with_name(f"{name}-loss.tsv"), self.file.with_name(f"{name}-eval.jsonl")
        self.params = {f"{m}.{k}": p for m, module in modules.items() for k, p in module.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError(f"{name}: none of the modules has a trainable parameter; nothing to train")
        self.ema = {k: p.detach().clone() for k, p in self.params.items()}
        groups = [  # one parameter group per module with trainable parameters, at its own learning rate
            {"params": [p for k, p in self.params.items() if k.startswith(f"{m}.")], "lr": self.lrs[m], "module": m}
            for m in modules
        ]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.autocast = bf16_is_fast(self.device)
        if self.file.exists():
            self._resume()

    def lr_at(self, step: int, module: str | None = None) -> float:
        """The learning rate at `step`: of `module` (its own peak) when given, else of `config.lr`."""
        c = self.config
        peak = c.lr if module is None else self.lrs[module]
        if step < c.warmup:
            return peak * (step + 1) / c.warmup
        if not c.cosine:
            return peak
        progress = (step - c.warmup) / max(1, c.steps - c.warmup)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def run(
        self, loss_fn: Callable[[torch.Generator], Tensor], save_every: int = 250, log_every: int = 50,
        evaluate: Callable[[int], dict] | None = None, eval_every: int = 0,
    ) -> list[float]:  # fmt: skip
        """Train until `config.steps`; returns this run's losses.

        evaluate: called as `evaluate(step)` every `eval_every` steps and at the end, with the EMA
        weights in the modules (and the modules in eval mode); the figures it returns are appended to
        `<work>/<name>-eval.jsonl`, one line per call: the run's learning curve."""
        if evaluate is not None and eval_every <= 0:
            raise ValueError(f"{self.name}: evaluate needs eval_every > 0 (steps between evaluations), got {eval_every}")
        self._prepare()
        start, losses, unsaved = time.time(), [], []  # unsaved: the loss-log lines of the steps since the last checkpoint
        bar = tqdm(total=self.config.steps, initial=self.step, desc=self.name, leave=False, disable=None if self.rank == 0 else True)
        try:  # the modules go back to eval mode however the run ends (Ctrl-C, a non-finite loss)
            if evaluate is not None and self.step and self._due(eval_every) and self.step not in self.evaluated_steps():
                self._evaluate(evaluate)  # stopped between its checkpoint and its evaluation
            while self.step < self.config.steps:
                losses.append(self._step(loss_fn))
                unsaved.append(f"{self.step}\t{losses[-1]:.6f}\n")
                self._report(bar, losses, log_every, start)
                if self._due(save_every):
                    self._checkpoint(unsaved)
                if evaluate is not None and self._due(eval_every):
                    self._evaluate(evaluate)
        finally:
            bar.close()
            for module in self.modules.values():
                module.eval()
        return losses

    def _prepare(self) -> None:
        """Before the first step: the checkpoint's folder must take files, the modules train, and a run started
        afresh (its checkpoint deleted) starts its logs afresh too."""
        if self.rank == 0:
            check_writable(self.file, "the checkpoint in the work folder (a script's --work)")  # found at the first checkpoint, the steps before it were lost
        for module in self.modules.values():
            module.train()
        if self.step == 0 and self.rank == 0:
            for old in (self.loss_log, self.eval_log):
                old.unlink(missing_ok=True)

    def _due(self, every: int) -> bool:
        """Whether something done every `every` steps and after the last one (a checkpoint, a log line, an
        evaluation) is due now; only rank 0 does them."""
        return self.rank == 0 and (self.step % every == 0 or self.step == self.config.steps)

    def _step(self, loss_fn: Callable[[torch.Generator], Tensor]) -> float:
        """One step at this step's learning rates: a batch's loss, Adam on its clipped gradients, the EMA; returns the loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step, group["module"])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = loss_fn(self.generator)
        if not math.isfinite(value := loss.item()):
            raise self._not_applied("loss", value)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not math.isfinite(norm := torch.nn.utils.clip_grad_norm_(self.params.values(), 1.0).item()):  # a finite loss may have one
            raise self._not_applied("gradient norm", norm)
        self.optimizer.step()
        self._update_ema()
        self.step += 1
        return value

    def _not_applied(self, what: str, value: float) -> ValueError:
        """The error that stops a run at a step whose loss or gradient is not finite, before it reaches the weights."""
        if self.file.exists():
            advice = (f"{self.file} keeps the last checkpoint: run again to resume from it, or start afresh in another work folder "
                      "with a lower learning rate (or check the data)")
        else:
            advice = "no checkpoint was written yet: lower the learning rate (or check the data) and run again"
        return ValueError(f"{self.name}: the {what} of step {self.step + 1} is {value}; nothing of it was applied, and {advice}")

    def _update_ema(self) -> None:
        """Move the EMA a share 1 - decay towards the weights (the decay warms up under `ema_warmup`)."""
        decay = min(self.config.ema, (1 + self.step) / (10 + self.step)) if self.config.ema_warmup else self.config.ema
        with torch.no_grad():  # one fused update of every EMA tensor (a GPU launches a few kernels, not one per tensor)
            torch._foreach_lerp_(list(self.ema.values()), [p.detach() for p in self.params.values()], 1 - decay)

    def _report(self, bar: tqdm, losses: list[float], log_every: int, start: float) -> None:
        """The step on the progress bar, and every `log_every` steps a line: their mean loss, the learning rate, the speed."""
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if self._due(log_every):
            recent = losses[-log_every:]
            bar.write(f"{self.name} step {self.step}/{self.config.steps}  loss {sum(recent) / len(recent):.5f}  "
                      f"lr {self.lr_at(self.step - 1):.2e}  {len(losses) / (time.time() - start):.2f} it/s")  # fmt: skip

    def _checkpoint(self, unsaved: list[str]) -> None:
        """Save the checkpoint, then log the losses of the steps it holds (and empty `unsaved`)."""
        self._save()
        with self.loss_log.open("a") as f:
            f.writelines(unsaved)
        unsaved.clear()

    def ema_state(self, module: str) -> dict[str, Tensor]:
        """The EMA weights of one module, as its state dict (buffers and frozen weights from the module)."""
        prefix = module + "."
        state = {k: v.detach() for k, v in self.modules[module].state_dict().items()}
        state.update({k[len(prefix) :]: v for k, v in self.ema.items() if k.startswith(prefix)})
        return state

    def _evaluate(self, evaluate: Callable[[int], dict]) -> None:
        """`evaluate(step)` on the EMA weights; its figures go to `<name>-eval.jsonl`."""
        trained = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.ema[k])
        for module in self.modules.values():
            module.eval()
        try:
            figures = evaluate(self.step)
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(trained[k])
            for module in self.modules.values():
                module.train()
        self.file.parent.mkdir(parents=True, exist_ok=True)  # no checkpoint written yet
        with self.eval_log.open("a") as f:
            f.write(json.dumps({"step": self.step, **figures}) + "\n")

    def evaluated_steps(self) -> set[int]:
        """The steps whose evaluation `<name>-eval.jsonl` holds."""
        if not self.eval_log.exists():
            return set()
        return {logged_step(line) for line in self.eval_log.read_text().splitlines()} - {-1}

    def _save(self) -> None:
        tensors = {f"param.{k}": p.detach() for k, p in self.params.items()}
        tensors.update({f"ema.{k}": v for k, v in self.ema.items()})
        for k, p in self.params.items():
            for moment, value in self.optimizer.state.get(p, {}).items():
                tensors[f"adam.{k}.{moment}"] = value.detach()
        tensors["generator"] = self.generator.get_state()
        metadata = {"step": str(self.step), "run": json.dumps(self.run_info, sort_keys=True)}
        data = save({k: v.cpu().contiguous() for k, v in tensors.items()}, metadata)
        write_atomically(self.file, lambda file: file.write(data), overwrite=True)  # a crash while writing never leaves a half-written checkpoint

    def _resume(self) -> None:
        try:
            checkpoint = safe_open(self.file, "pt")
        except SafetensorError as error:
            raise CheckpointError(f"{self.file} is not a readable checkpoint ({error}): delete it to start afresh") from error
        with checkpoint as f:
            shapes = {k.removeprefix("param."): tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("param.")}
            if differences := shape_differences(shapes, {k: tuple(p.shape) for k, p in self.params.items()}):
                raise ValueError(f"{self.file} is a checkpoint of another model ({differences}); delete it to start afresh, "
                                 "or pass another work folder")
            saved = json.loads(f.metadata().get("run", "{}"))
            for later in self.run_info.keys() - saved.keys():  # what a checkpoint written before it was recorded did not record
                saved[later] = self.run_info[later]
            if saved != self.run_info:
                differ = sorted(k for k in saved.keys() | self.run_info.keys() if saved.get(k) != self.run_info.get(k))
                raise ValueError(
                    f"{self.file} is a checkpoint of another run (it differs in {', '.join(differ)}: saved "
                    f"{ {k: saved.get(k) for k in differ} }, now { {k: self.run_info.get(k) for k in differ} }); "
                    f"delete it to start afresh, or pass another work folder"
                )
            self.step = int(f.metadata()["step"])
            if self.step > self.config.steps:
                raise ValueError(f"{self.file} is at step {self.step}, past the {self.config.steps} steps asked for: ask for "
                                 f"at least {self.step}, or pass another work folder to train {self.config.steps} steps afresh")
            keys = set(f.keys())
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(f.get_tensor(f"param.{k}"))
                    self.ema[k] = f.get_tensor(f"ema.{k}").to(self.device, p.dtype)  # a compact checkpoint's bf16 back to fp32
                    moments = {m: f.get_tensor(f"adam.{k}.{m}") for m in ("step", "exp_avg", "exp_avg_sq") if f"adam.{k}.{m}" in keys}
                    if moments:
                        moments["exp_avg"], moments["exp_avg_sq"] = moments["exp_avg"].to(self.device), moments["exp_avg_sq"].to(self.device)
                        self.optimizer.state[p] = moments
            self.generator.set_state(f.get_tensor("generator"))
        if self.rank == 0 and self.eval_log.exists():  # evaluations after the checkpoint run again: drop their lines
            lines = [line for line in self.eval_log.read_text().splitlines(keepends=True) if 0 <= logged_step(line) <= self.step]
            write_atomically(self.eval_log, lambda out: out.write("".join(lines).encode()), overwrite=True)
        if self.rank == 0:
            print(f"{self.name}: resumed at step {self.step} from {self.file}", flush=True)


def shape_differences(saved: dict[str, tuple], ours: dict[str, tuple], shown: int = 3) -> str:
    """What a checkpoint's parameters and a trainer's ({name: shape}) disagree on, a few of each kind named; "" when nothing."""
    reshaped = sorted(k for k in saved.keys() & ours.keys() if saved[k] != ours[k])
    kinds = (("not in the checkpoint", sorted(ours.keys() - saved.keys()), str),
             ("only in the checkpoint", sorted(saved.keys() - ours.keys()), str),
             ("of other shapes", reshaped, lambda k: f"{k} {list(saved[k])} there, {list(ours[k])} here"))  # fmt: skip
    return "; ".join(f"{len(names)} parameters {kind}: {', '.join(map(name, names[:shown]))}{', ...' if len(names) > shown else ''}"
                     for kind, names, name in kinds if names)  # fmt: skip


def logged_step(line: str) -> int:
    """The step of one line of an evaluation log; -1 for a line cut short by a kill (its evaluation runs again)."""
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return -1


def compact_checkpoint(checkpoint: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A copy of a Trainer checkpoint that is small enough to commit: its weights and EMA in `dtype`, its
    step, run and random state, without Adam's moments (a third of the size, in bf16 a sixth).

    Copied to `<work>/<name>.safetensors` on another machine, it resumes the run at the same step of the
    schedule, the same batches following, from the rounded weights, and Adam gathers its moments afresh.
    """
    check_output_path(out, overwrite=True, suffix=".safetensors")  # a folder, another suffix, no write access: said before a
    if os.path.lexists(out):  # large checkpoint is read
        raise FileExistsError(f"{out} exists; a compact copy never replaces a file: give another out path")
    metadata = read_metadata(checkpoint)
    tensors = {k: v for k, v in read_state_dict(checkpoint).items() if not k.startswith("adam.")}
    if "step" not in metadata or not any(k.startswith("ema.") for k in tensors):
        raise ValueError(f"{checkpoint} is not a Trainer checkpoint (no step, no EMA weights); give a run's <work>/<name>.safetensors")
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}  # the random state is bytes
    write_atomically(Path(out), lambda file: file.write(save(tensors, metadata)), overwrite=False)  # refuses an existing `out`
    return Path(out)
