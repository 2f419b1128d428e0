"""Speed and memory of minigen against diffusers, on the same weights, machine and run.

    python scripts/benchmark.py unet        # SD1.5 UNet step time, minigen / diffusers
    python scripts/benchmark.py flux        # FLUX transformer step time (mid-size: real width, 2+4 blocks)
    python scripts/benchmark.py load-rss    # peak RSS while loading a full-size SD1.5 single file
    python scripts/benchmark.py lag         # Personalized Residuals: sampling with LAG / without (minigen only)
    python scripts/benchmark.py joint-bias  # peak memory of a FLUX-dev joint attention biased by token group / unbiased
    python scripts/benchmark.py conceptrol  # sampling with Conceptrol / with the adapter alone (SD IP-Adapter, FLUX OminiControl)
    python scripts/benchmark.py conductor   # a Concept Conductor step, 2 concepts: batched paths / the official deep copies
    python scripts/benchmark.py unet --compile   # (and flux --compile) compiled blocks: minigen / diffusers' regional compile, each over eager
    python scripts/benchmark.py unet --channels-last   # channels-last convolutions / the default layout (with --compile: in the compiled models)
    python scripts/benchmark.py flux-cache  # First Block Cache: blocks skipped, speed-up, quality (toy-flux; flux-mid against diffusers')
    python scripts/benchmark.py unet-cache  # DeepCache for the UNet: calls skipped, speed-up, quality (toy-sd; an SD1.5 call)
    python scripts/benchmark.py gpu         # one-shot GPU run (H100/H200, < 8 min): SD1.5 and FLUX-dev size, eager / compiled / cached
    python scripts/benchmark.py gpu --dry-run   # the same code paths on tiny models on the CPU, in seconds
    python scripts/benchmark.py weights-dtype  # peak RSS of an SD1.5 UNet call, weights stored in fp16/bf16/fp8 / fp32
    python scripts/benchmark.py attention-backward  # CPU attention + backward in bf16: PyTorch's bf16 kernel / fp32 with casts

Weights are random (no downloads here) but full-size, so the arithmetic is the real model's.
Timings interleave the two implementations and report medians, because neighbours on a shared
machine move wall times; the ratio of each interleaved pair is the figure to read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from minigen import cli
from minigen.loading.files import check_output_path, write_atomically

ROOT = Path(__file__).resolve().parents[1]


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def in_fresh_process(worker: Callable[..., dict], *args, env: dict[str, str] | None = None) -> dict:
    """`worker(*args)`, a function of this file, run in a fresh Python process at this one's thread count
    (`env` added to its environment): its JSON result. The process imports this file and runs the worker,
    nothing else, so its memory figures are the worker's (and those imports'), none of this process's."""
    call = (f"import json, sys, torch; torch.set_num_threads({torch.get_num_threads()}); sys.path.insert(0, {str(ROOT / 'scripts')!r}); "
            f"from benchmark import {worker.__name__} as worker; print(json.dumps(worker(*json.loads(sys.argv[1]))))")
    out = subprocess.check_output([sys.executable, "-c", call, json.dumps(args)], cwd=ROOT, env={**os.environ, **(env or {})})
    return json.loads(out.splitlines()[-1])


def process_memory(field: str) -> int:
    """A memory figure of this process in bytes, from /proc/self/status: "VmRSS" (resident now) or "VmHWM" (its peak)."""
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) * 1024


def compare(ours, theirs, repeats: int, names: tuple[str, str] = ("minigen", "diffusers")) -> dict:
    """Wall times of two calls (minigen's and diffusers', by default) in interleaved pairs (each pair's
    order alternating), their ratios, and how far the two outputs differ."""
    with torch.inference_mode():
        max_diff = (ours() - theirs()).abs().max().item()
        pairs = []
        for i in range(repeats):  # alternate which runs first, so neither always inherits the other's memory state
            if i % 2:
                theirs_s = time_call(theirs)
                pairs.append((time_call(ours), theirs_s))
            else:
                pairs.append((time_call(ours), time_call(theirs)))
    ratios = [o / d for o, d in pairs]
    a, b = names
    return {
        f"{a}_median_s": statistics.median(o for o, _ in pairs),
        f"{b}_median_s": statistics.median(d for _, d in pairs),
        f"median_ratio_{a}_over_{b}": statistics.median(ratios),
        "ratios": ratios,
        "max_abs_diff": max_diff,
    }


def bench_unet(args) -> dict:
    """One UNet evaluation (batch 2, as with CFG) of SD1.5 at args.size px in fp32."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from minigen.models.unet import UNet
    from minigen.models.unet_config import PRESETS

    torch.manual_seed(0)
    ours = UNet(PRESETS["sd15"]).eval()
    config = json.loads((ROOT.parent / "shared/hf/runwayml/stable-diffusion-v1-5/unet/config.json").read_text())
    theirs = UNet2DConditionModel.from_config(config).eval()
    ldm = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    theirs.load_state_dict(convert_ldm_unet_checkpoint(ldm, theirs.config), strict=True)

    latent = args.size // 8
    x = torch.randn(2, 4, latent, latent)
    t = torch.tensor([500.0, 500.0])
    context = torch.randn(2, 77, 768)
    title = f"SD1.5 UNet, fp32, CPU, {args.size}x{args.size}, batch 2, {torch.get_num_threads()} threads"

    def run(model):
        out = model(x, t, context)
        return out if isinstance(out, torch.Tensor) else out.sample

    if args.compile or args.channels_last:
        ours_twin = twin(ours, lambda: UNet(PRESETS["sd15"]))
        theirs_twin = twin(theirs, lambda: UNet2DConditionModel.from_config(config))
        if not args.compile:  # channels-last against the default layout, eager
            ours_twin.to(memory_format=torch.channels_last)
            theirs_twin.to(memory_format=torch.channels_last)
            return {"benchmark": title + ", channels-last / default layout, eager",
                    **measure_variants({"minigen": (ours, ours_twin), "diffusers": (theirs, theirs_twin)}, run, args.repeats,
                                       names=("default", "channels_last"))}  # fmt: skip
        return {
            "benchmark": title + f", compiled blocks (torch.compile, inductor){', channels-last' if args.channels_last else ''}",
            "minigen_compiles": "every ResBlock and BasicTransformerBlock (compile_blocks)",
            "diffusers_compiles": "every BasicTransformerBlock (compile_repeated_blocks)"
            + (" and ResnetBlock2D" if args.diffusers_resnets else ""),
            **measure_variants(
                {"minigen": (ours, ours_twin), "diffusers": (theirs, theirs_twin)}, run, args.repeats, names=("eager", "compiled"),
                prepare={"minigen": partial(compile_blocks_of, channels_last=args.channels_last),
                         "diffusers": partial(compile_diffusers_unet, channels_last=args.channels_last, resnets=args.diffusers_resnets)},
            ),  # fmt: skip
        }
    return {"benchmark": title, **compare(lambda: run(ours), lambda: run(theirs), args.repeats)}


def bench_flux(args) -> dict:
    """One transformer evaluation of FLUX at full width (3072, 24 heads x 128) with a few blocks of each
    kind, 1024 image tokens (512x512 px) and 512 text tokens, fp32, batch 1."""
    from diffusers import FluxTransformer2DModel

    from minigen.loading.keymaps_flux import flux_to_diffusers
    from minigen.models.flux import Flux
    from minigen.models.flux_config import PRESETS
    from minigen.models.flux_tokens import image_ids, text_ids

    torch.manual_seed(0)
    config = PRESETS["flux-mid"]
    ours = Flux(config).eval()
    theirs = FluxTransformer2DModel(
        num_layers=config.depth, num_single_layers=config.depth_single_blocks, guidance_embeds=True
    ).eval()
    theirs.load_state_dict(flux_to_diffusers(ours.state_dict()), strict=True)

    img, ids = torch.randn(1, 1024, 64), image_ids(32, 32)
    txt, tids = torch.randn(1, 512, 4096), text_ids(512)
    t, y, g = torch.tensor([0.5]), torch.randn(1, 768), torch.tensor([3.5])

    def run(model):
        if isinstance(model, Flux):
            return model(img, ids, txt, tids, t, y, g)
        return model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                     img_ids=ids[0], txt_ids=tids[0], guidance=g).sample  # fmt: skip

    title = (f"FLUX transformer (3072 wide, {config.depth} double + {config.depth_single_blocks} single blocks), "
             f"fp32, CPU, 1024 image + 512 text tokens, batch 1, {torch.get_num_threads()} threads")  # fmt: skip
    if args.compile:
        ours_twin = twin(ours, lambda: Flux(config))
        theirs_twin = twin(theirs, lambda: FluxTransformer2DModel(num_layers=config.depth, num_single_layers=config.depth_single_blocks,
                                                                  guidance_embeds=True))  # fmt: skip
        return {
            "benchmark": title + ", compiled blocks (torch.compile, inductor)",
            "minigen_compiles": "every DoubleStreamBlock and SingleStreamBlock (compile_blocks)",
            "diffusers_compiles": "every FluxTransformerBlock and FluxSingleTransformerBlock (compile_repeated_blocks)",
            **measure_variants({"minigen": (ours, ours_twin), "diffusers": (theirs, theirs_twin)}, run, args.repeats,
                               names=("eager", "compiled"), prepare={"minigen": compile_blocks_of, "diffusers": compile_diffusers}),
        }  # fmt: skip
    return {"benchmark": title, **compare(lambda: run(ours), lambda: run(theirs), args.repeats)}


# ---------------------------------------------------------------- compiled blocks, layouts: variants of one model


def twin(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module:
    """Another instance of `model`'s class holding the very same weight tensors (built on the meta
    device, then assigned): two variants of one model at no extra memory."""
    with torch.device("meta"):
        copy = build()
    copy.load_state_dict(model.state_dict(), assign=True)
    return copy.eval()


def compile_blocks_of(model: nn.Module, channels_last: bool = False, **options) -> None:
    from minigen.compile import compile_blocks

    compile_blocks(model, channels_last=channels_last, **options)


def compile_diffusers(model: nn.Module, **options) -> None:
    """diffusers' own regional compilation: torch.compile on each block class named in `_repeated_blocks`."""
    model.compile_repeated_blocks(**options)


def compile_diffusers_unet(model: nn.Module, channels_last: bool = False, resnets: bool = False, **options) -> None:
    """`compile_repeated_blocks` (its transformer blocks), and with `resnets` its ResnetBlock2D too: the
    regions minigen compiles (12 shapes in SD1.5, past torch's default of 8 graphs: the limit is raised)."""
    from diffusers.models.resnet import ResnetBlock2D

    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.compile_repeated_blocks(**options)
    if resnets:
        for module in model.modules():
            if isinstance(module, ResnetBlock2D):
                module.compile(recompile_limit=32, **options)


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def interleaved(calls: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Wall times of each call over `repeats` rounds; every round runs each call once, the round's order
    rotated by one, so no call always follows the same other."""
    names, times = list(calls), {name: [] for name in calls}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            start = time.perf_counter()
            calls[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def measure_variants(
    models: dict[str, tuple[nn.Module, nn.Module]],
    run: Callable[[nn.Module], torch.Tensor],
    repeats: int,
    *,
    names: tuple[str, str],
    prepare: dict[str, Callable[[nn.Module], None]] | None = None,
    sync: Callable[[], None] = lambda: None,
) -> dict:
    """Each implementation as a base model and a variant of it (`prepare` turns the second into the
    variant: compiles it), all four timed in interleaved rounds. Reports per implementation the base and
    variant medians and the median speed-up of the variant, the time of the variant's first call (its
    compilation) and the graphs it compiled; across implementations the median ratio of minigen over
    diffusers, for the base and for the variant; and how far outputs differ."""
    base, variant = names
    result: dict = {}
    with torch.inference_mode():
        outputs = {name: run(models[name][0]) for name in models}  # warm-up, and the reference outputs
        for name, (_, model) in models.items():
            graphs = graphs_compiled()
            sync()
            start = time.perf_counter()
            if prepare is not None:
                prepare[name](model)
            first = run(model)
            sync()
            result[name] = {f"{variant}_first_call_s": time.perf_counter() - start, "graphs_compiled": graphs_compiled() - graphs,
                            f"max_abs_diff_{variant}_vs_{base}": (first - outputs[name]).abs().max().item()}  # fmt: skip
            outputs[f"{name} {variant}"] = first
        calls = {f"{name} {kind}": partial(run, model) for name, pair in models.items() for kind, model in zip(names, pair)}
        times = interleaved(calls, repeats, sync)
    for name in models:
        b, v = times[f"{name} {base}"], times[f"{name} {variant}"]
        result[name].update({f"{base}_median_s": statistics.median(b), f"{variant}_median_s": statistics.median(v),
                             f"median_speedup_{variant}_over_{base}": median_ratio(b, v)})  # fmt: skip
        if prepare is not None:
            result[name]["compile_s"] = result[name][f"{variant}_first_call_s"] - statistics.median(v)
    if {"minigen", "diffusers"} <= set(models):
        for kind in names:
            result[f"median_ratio_{kind}_minigen_over_diffusers"] = median_ratio(times[f"minigen {kind}"], times[f"diffusers {kind}"])
        result[f"max_abs_diff_{variant}_minigen_vs_diffusers"] = (outputs[f"minigen {variant}"] - outputs[f"diffusers {variant}"]).abs().max().item()
    result["times"] = times
    return result


def bench_lag(args) -> dict:
    """Personalized Residuals with LAG against the same residuals applied everywhere, same run:
    (a) one full-size SD1.5 UNet call (batch 2, CFG layout) at args.size px with random weights and
    residuals; (b) a whole 25-step toy-sd generation with residuals on its 7 proj_out layers."""
    from minigen.controls import BatchLayout
    from minigen.loading.auto import load_pipeline
    from minigen.methods.residuals import Residuals, lag_controls
    from minigen.models.unet import UNet
    from minigen.models.unet_config import PRESETS

    torch.manual_seed(0)
    unet = UNet(PRESETS["sd15"]).eval().requires_grad_(False)
    residuals = Residuals(unet, identifier="sks", macro_class="dog", generator=torch.Generator().manual_seed(0))
    latent = args.size // 8
    x, t, context = torch.randn(2, 4, latent, latent), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    everywhere = residuals.controls().at_step(0, BatchLayout.cfg(1))
    lag = lag_controls([(residuals, [5, 6], 1.0)]).at_step(0, BatchLayout.cfg(1))
    step = compare(lambda: unet(x, t, context, controls=lag), lambda: unet(x, t, context, controls=everywhere), args.repeats,
                   names=("lag", "everywhere"))  # fmt: skip

    pipe = load_pipeline("toy-sd")
    toy = Residuals(pipe.unet, identifier="sks", macro_class="star", generator=torch.Generator().manual_seed(0))
    prompt = "a sks star above a small blue box on sand"

    def generate(make_controls):  # fresh controls (and attention records) for every run
        return lambda: pipe.generate(prompt, steps=25, seed=0, controls=make_controls(), progress=False)

    whole = compare(generate(lambda: lag_controls([(toy, [2, 3], 1.0)])), generate(toy.controls),
                    args.repeats, names=("lag", "everywhere"))  # fmt: skip
    return {
        "benchmark": f"LAG / residuals everywhere: (a) SD1.5 UNet call, fp32, CPU, {args.size}x{args.size}, batch 2; "
        f"(b) toy-sd, 25 steps with CFG, 64x64; {torch.get_num_threads()} threads",
        "sd15_unet_call": step,
        "toy_sd_generation": whole,
    }


def bench_conceptrol(args) -> dict:
    """Sampling with Conceptrol against the adapter alone, same weights and run (random, full width):
    (a) SD1.5 UNet at args.size px, CFG batch 2, an IP-Adapter of ip-adapter-plus_sd15's shapes (16 tokens on
    every cross-attention layer), 5 denoiser calls (steps 0-4 of 25, warmup 0.2: step 0 in warmup, as the official default);
    (b) FLUX at full width (flux-mid: 3072 wide, 2 double + 4 single blocks) at 512 px: 512 text tokens,
    a 1024-token OminiControl condition with a rank-16 LoRA on it, 3 calls. The extraction blocks are
    every depth-th block call ("code": 3 of FLUX.1's 57 calls, but 3 of this model's 6) or the last
    double block ("paper": 1 of 6); both are reported."""
    from minigen.methods.conceptrol import ConceptrolFlux, ConceptrolSD, FluxConcept, SDConcept
    from minigen.models.flux import Flux
    from minigen.models.flux_config import PRESETS as FLUX_PRESETS
    from minigen.models.flux_tokens import TokenGroup, image_ids, text_ids
    from minigen.models.unet import UNet
    from minigen.models.unet_config import PRESETS
    from minigen.controls import BatchLayout, LowRank
    from minigen.loading.ip_adapter import unet_cross_attention_widths
    from minigen.models.ip_adapter import IPAdapter, Resampler

    torch.manual_seed(0)
    unet = UNet(PRESETS["sd15"]).eval()
    resampler = Resampler(dim=768, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1280, output_dim=768)
    adapter = IPAdapter(resampler, unet_cross_attention_widths(unet), 768).eval()  # ip-adapter-plus_sd15's shapes
    latent = args.size // 8
    x, t, context = torch.randn(2, 4, latent, latent), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    with torch.no_grad():
        ip_tokens = adapter.tokens(torch.randn(2, 257, 1280))  # [unconditional | conditional] reference

    def sd_sampling(conceptrol: bool):
        def run():
            method = ConceptrolSD(adapter.projections(), [SDConcept([5, 6], ip_tokens)], steps=25, conceptrol=conceptrol,
                                  concept_layer="up.1.0.0" if conceptrol else None)  # the adapter alone reads no mask
            return [unet(x, t, context, controls=method.controls(step).at_step(step, BatchLayout.cfg(1))) for step in range(5)][-1]

        return run

    sd = compare(sd_sampling(True), sd_sampling(False), args.repeats, names=("conceptrol", "ip_adapter"))

    flux = Flux(FLUX_PRESETS["flux-mid"]).eval()
    lora = [LowRank(f"{block}.{name}", torch.randn(16, 3072) * 0.01, torch.randn(3072 * n, 16) * 0.01)
            for block, name, n in [(f"double_blocks.{i}", "img_attn.qkv", 3) for i in range(2)]]  # fmt: skip
    condition = TokenGroup(torch.randn(1, 1024, 64), image_ids(32, 32, offset=(0, 32)), timestep=0.0, lora=lora, name="cond")
    img, txt, y, g = torch.randn(1, 1024, 64), torch.randn(1, 512, 4096), torch.randn(1, 768), torch.tensor([3.5])

    def flux_sampling(mode: str, extraction: str = "code"):
        def run():
            method = ConceptrolFlux(flux.attention_layers(), [FluxConcept([5, 6])], steps=3, mode=mode, extraction=extraction)
            outs = [flux(img, image_ids(32, 32), txt, text_ids(512), torch.tensor([s]), y, g, extra=[condition],
                         controls=method.controls(i).at_step(i, BatchLayout.plain(1))) for i, s in enumerate([1.0, 0.6, 0.3])]  # fmt: skip
            return outs[-1]

        return run

    flux_paper = compare(flux_sampling("conceptrol", "paper"), flux_sampling("ominicontrol"), args.repeats, names=("conceptrol", "ominicontrol"))
    flux_code = compare(flux_sampling("conceptrol", "code"), flux_sampling("ominicontrol"), args.repeats, names=("conceptrol", "ominicontrol"))
    return {
        "benchmark": f"Conceptrol / adapter alone: (a) SD1.5 UNet, fp32, {args.size}px, CFG batch 2, 5 steps; (b) FLUX "
        f"flux-mid, fp32, 512 px + 1024 condition tokens, 3 steps; CPU, {torch.get_num_threads()} threads",
        "sd15_ip_adapter": sd,
        "flux_ominicontrol_paper_extraction": flux_paper,
        "flux_ominicontrol_code_extraction": flux_code,
    }


# ---------------------------------------------------------------- First Block Cache


def bench_flux_cache(args) -> dict:
    """First Block Cache (minigen/step_cache.py) at `args.threshold` (default minigen's), cached against
    uncached in the same run:

    (a) toy-flux, the first `args.n` held-out prompts of the toy evaluation in its world, one image per call as a user
        makes them (25 steps, toy-flux's CFG 4: each call is a batch of 2 rows), prompt i with seed i:
        block evaluations saved, time per image (interleaved pairs for the first `args.repeats`
        prompts, one pair after), mean abs pixel difference to the uncached image, and the toy judge's
        prompt following of both sets (the scoring of minigen/toy/evaluate.py, on these prompts);
    (b) flux-mid (full width: 3072, 2 double + 4 single blocks; random weights) at args.size px, a dev
        sampling loop of `args.steps` Euler steps, minigen's cache and diffusers' FirstBlockCache at
        the same threshold, each against its uncached loop: steps skipped, time, final difference.
    """
    from minigen.step_cache import DEFAULT_THRESHOLD

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    parts = {"toy": f"(a) toy-flux, {args.n} held-out prompts, 25 steps, CFG 4, 64x64, fp32",
             "mid": f"(b) flux-mid, fp32, {args.size} px, {args.steps} steps"}  # fmt: skip
    measured = "; ".join(text for name, text in parts.items() if args.only in (None, name))
    result = {"benchmark": f"First Block Cache at threshold {threshold}: {measured}; CPU, {torch.get_num_threads()} threads"}
    if args.only in (None, "toy"):
        result["toy_flux"] = cache_on_toy_flux(threshold, args.n, args.repeats)
    if args.only in (None, "mid"):
        result["flux_mid"] = cache_on_flux_mid(threshold, args.steps, args.size)
    return result


def cache_on_toy(pipe, option: str, cache, n: int, repeats: int, layout: str = "anywhere") -> dict:
    """A toy model's images of the first `n` held-out prompts of its world (``layout``) without and with `cache` (given to
    `generate` as `option`), one prompt per call, prompt i with seed i (as minigen/toy/evaluate.py draws
    them), 25 steps at the pipeline's default guidance: calls skipped, time per image in interleaved
    pairs (two for the first `repeats` prompts, one after), pixel difference, prompt following."""
    from minigen.image import to_pil
    from minigen.toy import captions
    from minigen.toy.judge import judge
    from minigen.toy.metrics import prompt_following

    prompts = captions.heldout_prompts(n, 0, layout=layout)
    images: dict[str, list[torch.Tensor]] = {"uncached": [], "cached": []}
    times, computed, skipped = [], 0, 0
    for i, (_, caption) in enumerate(prompts):
        made = {}
        calls = {"uncached": lambda: made.__setitem__("uncached", pipe.generate(caption.text, steps=25, seed=i, progress=False)),
                 "cached": lambda: made.__setitem__("cached", pipe.generate(caption.text, steps=25, seed=i, progress=False,
                                                                             **{option: cache}))}  # fmt: skip
        rounds = interleaved(calls, 2 if i < repeats else 1)
        times.append((statistics.median(rounds["uncached"]), statistics.median(rounds["cached"])))
        computed, skipped = computed + cache.computed, skipped + cache.skipped  # the counts of one generation
        for name in images:
            images[name].append(made[name])
    plain, cached = torch.cat(images["uncached"]), torch.cat(images["cached"])
    scores = {name: [prompt_following(judge(image), caption) for image, (_, caption) in zip(to_pil(torch.cat(made)), prompts)]
              for name, made in images.items()}  # fmt: skip
    return {
        "prompts": n,
        "calls_computed": computed,
        "calls_skipped": skipped,
        "fraction_of_calls_skipped": skipped / (computed + skipped),
        "uncached_median_s_per_image": statistics.median(u for u, _ in times),
        "cached_median_s_per_image": statistics.median(c for _, c in times),
        "median_speedup": statistics.median(u / c for u, c in times),
        "mean_abs_pixel_difference_0_255": 255 * (cached - plain).abs().mean().item(),
        "largest_image_mean_abs_pixel_difference_0_255": 255 * (cached - plain).abs().flatten(1).mean(1).max().item(),
        "prompt_following_uncached": statistics.fmean(scores["uncached"]),
        "prompt_following_cached": statistics.fmean(scores["cached"]),
    }


def cache_on_toy_flux(threshold: float, n: int, repeats: int) -> dict:
    from minigen.loading.auto import load_pipeline
    from minigen.loading.toy import toy_layout
    from minigen.step_cache import FirstBlockCache

    pipe = load_pipeline("toy-flux")
    result = cache_on_toy(pipe, "first_block_cache", FirstBlockCache(threshold), n, repeats, toy_layout("toy-flux"))
    blocks = pipe.transformer.config.depth + pipe.transformer.config.depth_single_blocks
    result["blocks"] = blocks
    result["fraction_of_block_evaluations_saved"] = result["fraction_of_calls_skipped"] * (blocks - 1) / blocks
    return result


def bench_unet_cache(args) -> dict:
    """DeepCache for the UNet (minigen/step_cache.py), cached against uncached in the same run: (a) toy-sd,
    the first `args.n` held-out prompts (see `cache_on_toy`) at intervals 2 and 3, branch 0; (b) one
    SD1.5 UNet call (full size, random weights, fp32, batch 2) at args.size px: a full call against a
    shallow one (branch 0 and 1), interleaved, with the FLOPs of each."""
    from torch.utils.flop_counter import FlopCounterMode

    from minigen.loading.auto import load_pipeline
    from minigen.models.unet import UNet
    from minigen.models.unet_config import PRESETS
    from minigen.step_cache import DeepCache

    pipe = load_pipeline("toy-sd")
    toy = {f"interval_{k}": cache_on_toy(pipe, "deep_cache", DeepCache(k), args.n, args.repeats) for k in (2, 3)}
    torch.manual_seed(0)
    unet = UNet(PRESETS["sd15"]).eval()
    latent = args.size // 8
    x, t, context = torch.randn(2, 4, latent, latent), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    caches = {f"branch_{b}": DeepCache(interval=10**9, branch=b) for b in (0, 1)}
    flops = {}
    with torch.inference_mode():
        for name, cache in caches.items():
            unet(x, t, context, cache=cache)  # the full call that fills the cache; every later call is shallow
        calls = {"full": lambda: unet(x, t, context)} | {name: partial(unet, x, t, context, cache=cache) for name, cache in caches.items()}
        for name, call in calls.items():
            with FlopCounterMode(display=False) as counter:
                call()
            flops[name] = counter.get_total_flops()
        times = interleaved(calls, args.repeats)
    return {
        "benchmark": f"DeepCache: (a) toy-sd, {args.n} held-out prompts, 25 steps, CFG 7.5, 64x64; (b) SD1.5 UNet call, fp32, "
        f"{args.size}x{args.size}, batch 2; CPU, {torch.get_num_threads()} threads",
        "toy_sd": toy,
        "sd15_call": {name: {"median_s": statistics.median(times[name]), "tflop": flops[name] / 1e12,
                             "median_speedup_over_full": median_ratio(times["full"], times[name])} for name in calls},  # fmt: skip
    }


def cache_on_flux_mid(threshold: float, steps: int, size: int) -> dict:
    from diffusers import FluxTransformer2DModel

    from minigen.models.flux import Flux
    from minigen.models.flux_config import PRESETS
    from minigen.models.flux_tokens import image_ids, text_ids
    from minigen.sampling import flow_sigmas, flux_shift

    torch.manual_seed(0)
    config = PRESETS["flux-mid"]
    ours = Flux(config).eval()
    theirs = twin_of_flux(ours, FluxTransformer2DModel)
    side = size // 16  # 2x2 patches of 8x-downsampled latents
    inputs = dict(ids=image_ids(side, side), txt=torch.randn(1, 512, 4096), tids=text_ids(512), y=torch.randn(1, 768), g=torch.tensor([3.5]))
    sigmas = flow_sigmas(steps, flux_shift(side * side))
    return flux_cache_runs({"minigen": ours, "diffusers": theirs}, inputs, torch.randn(1, side * side, 64), sigmas, threshold)


def twin_of_flux(ours, diffusers_class) -> nn.Module:
    """diffusers' FluxTransformer2DModel holding the weights of minigen's FLUX (the same tensors, split)."""
    from minigen.loading.keymaps_flux import flux_to_diffusers

    c = ours.config
    with torch.device("meta"):
        theirs = diffusers_class(
            in_channels=c.in_channels, num_layers=c.depth, num_single_layers=c.depth_single_blocks, attention_head_dim=c.head_dim,
            num_attention_heads=c.num_heads, joint_attention_dim=c.context_in_dim, pooled_projection_dim=c.vec_in_dim,
            guidance_embeds=c.guidance_embed, axes_dims_rope=c.axes_dim,
        )  # fmt: skip
    theirs.load_state_dict(flux_to_diffusers(ours.state_dict()), strict=True, assign=True)
    return theirs.eval()


def flux_cache_runs(models: dict[str, nn.Module], inputs: dict, noise: torch.Tensor, sigmas: torch.Tensor, threshold: float,
                    sync: Callable[[], None] = lambda: None) -> dict:  # fmt: skip
    """A sampling loop (Euler on the flow) of each FLUX model (minigen's; diffusers' when the name says so),
    uncached and with a first-block cache at `threshold`, all timed in one interleaved round: seconds per
    step, steps skipped, the final latents' difference to the uncached ones; and whether minigen's and
    diffusers' caches skipped the same steps."""
    from diffusers.hooks import FirstBlockCacheConfig
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    from minigen.step_cache import FirstBlockCache

    i, steps = inputs, len(sigmas) - 1
    caches = {name: FirstBlockCache(threshold) for name in models if not name.startswith("diffusers")}
    diffusers_skips: dict[str, list[bool]] = {name: [] for name in models if name.startswith("diffusers")}

    def velocity(name: str, x: torch.Tensor, sigma: torch.Tensor, cache=None) -> torch.Tensor:
        model, t = models[name], sigma.expand(1).to(x)
        if name in caches:
            return model(x, i["ids"], i["txt"], i["tids"], t, i["y"], i["g"], cache=cache)
        return model(hidden_states=x, encoder_hidden_states=i["txt"], pooled_projections=i["y"], timestep=t,
                     img_ids=i["ids"][0], txt_ids=i["tids"][0], guidance=i["g"]).sample  # fmt: skip

    def loop(name: str, cached: bool):
        model = models[name]
        x = noise.to(sigmas.device, next(model.parameters()).dtype)
        if name in caches:
            cache = caches[name] if cached else None
            if cache is not None:
                cache.reset()
            for k in range(steps):
                x = x + (sigmas[k + 1] - sigmas[k]) * velocity(name, x, sigmas[k], cache)
            return x
        skips = diffusers_skips[name]
        if cached:
            model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
            skips.clear()
        try:
            with model.cache_context("cond"):
                for k in range(steps):
                    v = velocity(name, x, sigmas[k])
                    if cached:
                        leader = model.transformer_blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)
                        skips.append(not leader.state_manager.get_state().should_compute)
                    x = x + (sigmas[k + 1] - sigmas[k]) * v
        finally:
            if cached:
                model.disable_cache()
        return x

    finals: dict[str, torch.Tensor] = {}
    calls = {f"{name} {kind}": (lambda name=name, kind=kind: finals.__setitem__(f"{name} {kind}", loop(name, kind == "cached")))
             for name in models for kind in ("uncached", "cached")}  # fmt: skip
    with torch.inference_mode():
        for name, model in models.items():  # one call each first: weights paged in, kernels picked, graphs compiled
            velocity(name, noise.to(sigmas.device, next(model.parameters()).dtype), sigmas[0])
        seconds = {call: t[0] for call, t in interleaved(calls, 1, sync).items()}
    result: dict = {"steps": steps, "threshold": threshold}
    for name, model in models.items():
        skipped = caches[name].skipped if name in caches else sum(diffusers_skips[name])
        result[name] = {
            "steps_skipped": skipped,
            "uncached_s_per_step": seconds[f"{name} uncached"] / steps,
            "cached_s_per_step": seconds[f"{name} cached"] / steps,
            "speedup": seconds[f"{name} uncached"] / seconds[f"{name} cached"],
            "max_abs_diff_cached_vs_uncached": (finals[f"{name} cached"] - finals[f"{name} uncached"]).abs().max().item(),
        }
        if name in caches:
            blocks = model.config.depth + model.config.depth_single_blocks
            result[name]["relative_changes"] = [round(c, 4) for c in caches[name].changes]
            result[name]["fraction_of_block_evaluations_saved"] = caches[name].saved_fraction(blocks)
    if "minigen" in caches and "diffusers" in diffusers_skips:
        ours = [change < threshold for change in caches["minigen"].changes]
        result["same_steps_skipped_as_diffusers"] = ours == diffusers_skips["diffusers"][1:]
        for kind in ("uncached", "cached"):
            result[f"max_abs_diff_{kind}_minigen_vs_diffusers"] = (finals[f"minigen {kind}"] - finals[f"diffusers {kind}"]).abs().max().item()
    return result


# ---------------------------------------------------------------- one-shot GPU benchmark

SD15_DIFFUSERS = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
TINY_SD_DIFFUSERS = dict(  # the dry run's: SD1.5's topology at two levels
    sample_size=8, layers_per_block=2, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
)  # fmt: skip


def bench_gpu(args) -> dict:
    """One GPU run of at most ~8 minutes on an H100/H200, minigen against diffusers on the same random
    full-size weights, interleaved:

      sd15   SD1.5 UNet, 512 px, fp16, batch 2 (one CFG step): it/s eager and with compiled blocks
             (minigen's compile_blocks / diffusers' compile_repeated_blocks), compile times;
      flux   FLUX.1-dev's size (BFL config: 19 double + 38 single blocks, 3072 wide), 1024 px (4096
             image + 512 text tokens), bf16, batch 1: seconds per step eager and compiled; then a
             28-step dev sampling loop with the first-block cache off and on (minigen's and diffusers'
             at the same threshold; minigen's compiled too). Random weights: the steps skipped show the
             cache's mechanics and cost, not what trained weights skip.

    `--dry-run` runs every one of these code paths on tiny models on the CPU (fp32 UNet, bf16 FLUX,
    torch.compile with the "eager" backend), in seconds; the JSON has the same fields. A section that
    fails on the GPU records its error and the run goes on."""
    from minigen.step_cache import DEFAULT_THRESHOLD

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("benchmark.py gpu: no CUDA device here; --dry-run runs the same code paths on the CPU")
    device = torch.device("cpu" if dry else "cuda")
    sync = (lambda: None) if dry else torch.cuda.synchronize
    setup = dict(device=device, dry=dry, sync=sync, compile_options={"backend": "eager"} if dry else {},
                 threshold=DEFAULT_THRESHOLD if args.threshold is None else args.threshold)  # fmt: skip
    import diffusers

    result = {
        "benchmark": "one-shot GPU: SD1.5 512 px fp16 and FLUX-dev size 1024 px bf16, eager / compiled blocks, first-block cache off / on",
        "dry_run": dry,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "CPU (dry run)" if dry else torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    start = time.perf_counter()
    for name, section in (("flux", gpu_flux), ("sd15", gpu_sd15)):  # FLUX first: 4 graphs to compile; SD1.5 has ~20
        began = time.perf_counter()
        try:
            result[name] = section(**setup)
        except Exception as error:  # on the one GPU run, a failing section must not lose the other's figures
            if dry:
                raise
            result[name] = {"error": f"{type(error).__name__}: {error}"}
        result[name]["section_s"] = time.perf_counter() - began
        if not dry:
            result[name]["peak_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    result["total_s"] = time.perf_counter() - start
    return result


def gpu_sd15(device, dry, sync, compile_options, threshold) -> dict:
    from diffusers import UNet2DConditionModel

    from minigen.loading.keymaps_unet import unet_config_from_diffusers, unet_from_diffusers
    from minigen.models.unet import UNet

    arguments, dtype, latent = (TINY_SD_DIFFUSERS, torch.float32, 8) if dry else (SD15_DIFFUSERS, torch.float16, 64)
    torch.manual_seed(0)
    with torch.device(device):
        theirs = UNet2DConditionModel(**arguments).to(dtype).eval()
    config = unet_config_from_diffusers(dict(theirs.config))
    with torch.device("meta"):
        ours = UNet(config)
    ours.load_state_dict(unet_from_diffusers(theirs.state_dict(), config), strict=True, assign=True)
    ours.eval()
    x = torch.randn(2, 4, latent, latent, device=device, dtype=dtype)
    t = torch.tensor([500.0, 500.0], device=device)
    context = torch.randn(2, 77, arguments["cross_attention_dim"], device=device, dtype=dtype)

    def run(model):
        out = model(x, t, context)
        return out if isinstance(out, torch.Tensor) else out.sample

    measured = measure_variants(
        {"minigen": (ours, twin(ours, lambda: UNet(config))), "diffusers": (theirs, twin(theirs, lambda: UNet2DConditionModel(**arguments)))},
        run, 2 if dry else 20, names=("eager", "compiled"), sync=sync,
        prepare={"minigen": partial(compile_blocks_of, **compile_options), "diffusers": partial(compile_diffusers, **compile_options)},
    )  # fmt: skip
    for name in ("minigen", "diffusers"):
        for kind in ("eager", "compiled"):
            measured[name][f"{kind}_it_per_s"] = 1 / measured[name][f"{kind}_median_s"]
    return {"what": f"SD1.5 UNet{' (tiny)' if dry else ''}, {8 * latent} px, {dtype}, batch 2", **measured}


def gpu_flux(device, dry, sync, compile_options, threshold) -> dict:
    from diffusers import FluxTransformer2DModel

    from minigen.models.flux import Flux
    from minigen.models.flux_config import PRESETS, FluxConfig
    from minigen.models.flux_tokens import image_ids, text_ids
    from minigen.sampling import flow_sigmas, flux_shift

    config = FluxConfig(vec_in_dim=24, context_in_dim=32, hidden_size=32, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6)) \
        if dry else PRESETS["flux-dev"]  # fmt: skip
    side, text, dtype, steps = (4, 8, torch.bfloat16, 4) if dry else (64, 512, torch.bfloat16, 28)
    torch.manual_seed(0)
    with torch.device("meta"):
        ours = Flux(config).to(dtype)
    ours.to_empty(device=device)
    with torch.no_grad():
        for name, p in ours.named_parameters():  # random weights of a trained model's scale; RMSNorm scales 1
            p.fill_(1.0) if name.endswith(".scale") else p.normal_(0.0, 0.02)
    ours.eval()
    theirs = twin_of_flux(ours, FluxTransformer2DModel)
    inputs = dict(ids=image_ids(side, side).to(device), txt=torch.randn(1, text, config.context_in_dim, device=device, dtype=dtype),
                  tids=text_ids(text).to(device), y=torch.randn(1, config.vec_in_dim, device=device, dtype=dtype),
                  g=torch.tensor([3.5], device=device))  # fmt: skip
    img, t = torch.randn(1, side * side, config.in_channels, device=device, dtype=dtype), torch.tensor([0.5], device=device, dtype=dtype)

    def run(model):
        if isinstance(model, Flux):
            return model(img, inputs["ids"], inputs["txt"], inputs["tids"], t, inputs["y"], inputs["g"])
        return model(hidden_states=img, encoder_hidden_states=inputs["txt"], pooled_projections=inputs["y"], timestep=t,
                     img_ids=inputs["ids"][0], txt_ids=inputs["tids"][0], guidance=inputs["g"]).sample  # fmt: skip

    ours_compiled = twin(ours, lambda: Flux(config))
    measured = measure_variants(
        {"minigen": (ours, ours_compiled), "diffusers": (theirs, twin_of_flux(ours, FluxTransformer2DModel))}, run, 2 if dry else 5,
        names=("eager", "compiled"), sync=sync,
        prepare={"minigen": partial(compile_blocks_of, **compile_options), "diffusers": partial(compile_diffusers, **compile_options)},
    )  # fmt: skip
    sigmas = flow_sigmas(steps, flux_shift(side * side)).to(device)
    noise = torch.randn(1, side * side, config.in_channels, device=device, dtype=dtype)
    cache = flux_cache_runs({"minigen": ours, "minigen compiled": ours_compiled, "diffusers": theirs}, inputs, noise, sigmas, threshold, sync)
    return {"what": f"FLUX transformer{' (tiny)' if dry else ' (FLUX.1-dev size, BFL config)'}, {16 * side} px, {text} text tokens, "
            f"{dtype}, batch 1", **measured, "first_block_cache": cache}  # fmt: skip


JOINT_SIZES = {"txt": 512, "img": 4096, "cond": 4096}  # FLUX.1-dev at 1024 px with a 1024 px condition (OminiControl)


def joint_attention_peak(mode: str) -> dict:
    """Peak memory added by one joint attention at FLUX-dev sizes (24 heads x 128, fp32), in this process:
    "plain" (one SDPA call), "by-group" (Conceptrol's bias by token group, built a block of query rows at
    a time) or "dense" (the same bias as one [L, L] tensor). Resets the kernel's peak-RSS counter first,
    so the figure is the attention's own (bias and output included), not the inputs'."""
    from minigen.attention import attention
    from minigen.controls import group_bias_rows
    from minigen.models.flux_tokens import group_slices

    torch.manual_seed(0)
    L = sum(JOINT_SIZES.values())
    q, k, v = (torch.randn(1, 24, L, 128) for _ in range(3))
    groups = dict(zip(JOINT_SIZES, group_slices(list(JOINT_SIZES.values()))))
    spec = {("txt", "cond"): torch.zeros(JOINT_SIZES["txt"], 1), ("img", "cond"): torch.randn(JOINT_SIZES["img"], 1),
            ("cond", "img"): 0.0}  # fmt: skip
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = process_memory("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        rows = group_bias_rows([spec], groups, None, q, L)
        bias = None if mode == "plain" else rows if mode == "by-group" else rows(0, L)
        attention(q, k, v, bias)
    return {"seconds": time.perf_counter() - start, "peak_bytes": process_memory("VmHWM") - before}


def bench_joint_bias(args) -> dict:
    """Peak memory and time of one biased joint attention at FLUX-dev sizes against the unbiased one,
    each in a fresh process (so no allocator cache carries over)."""
    results = {}
    for mode in ("plain", "by-group", "dense"):
        results[mode] = in_fresh_process(joint_attention_peak, mode)
    plain = results["plain"]
    return {
        "benchmark": f"one joint attention, FLUX-dev sizes: {JOINT_SIZES} tokens, 24 heads x 128, fp32, CPU, "
        f"{torch.get_num_threads()} threads; peak memory the call adds (output included)",
        **{f"{mode}_peak_MiB": r["peak_bytes"] / 2**20 for mode, r in results.items()},
        **{f"{mode}_seconds": r["seconds"] for mode, r in results.items()},
        "by_group_over_plain_peak": results["by-group"]["peak_bytes"] / plain["peak_bytes"],
        "dense_over_plain_peak": results["dense"]["peak_bytes"] / plain["peak_bytes"],
        "by_group_over_plain_time": results["by-group"]["seconds"] / plain["seconds"],
    }


# (batch, heads, queries, keys, head dim) of attentions that training differentiates
BACKWARD_SHAPES = {
    "toy-sd self 16x16": (64, 4, 256, 256, 16), "toy-sd cross 16x16": (64, 4, 256, 77, 16),
    "toy-sd self 8x8": (64, 4, 64, 64, 32), "toy-sd cross 8x8": (64, 4, 64, 77, 32),
    "toy-flux joint": (48, 4, 112, 112, 32),
    "SD1.5 512px self": (2, 8, 4096, 4096, 40), "SD1.5 512px cross": (2, 8, 4096, 77, 40),
    "SDXL 1024px self 32x32": (2, 10, 1024, 1024, 64), "FLUX 256px joint": (1, 24, 768, 768, 128),
}  # fmt: skip


def bench_attention_backward(args) -> dict:
    """One attention and its backward on the CPU, bf16 inputs: PyTorch's bf16 flash kernel against the
    same attention in fp32 with the casts both ways, interleaved; and which of the two `attention` runs
    (`trains_faster_in_fp32`), so its rule can be checked against the ratios."""
    import torch.nn.functional as F

    from minigen.attention import trains_faster_in_fp32

    def forward_backward(q, k, v, fp32: bool):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype) if fp32 else F.scaled_dot_product_attention(q, k, v)
        out.sum().backward()

    result = {}
    for name, (b, h, n, m, d) in BACKWARD_SHAPES.items():
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, h, length, d, dtype=torch.bfloat16, requires_grad=True) for length in (n, m, m))
        calls = {"bf16": partial(forward_backward, q, k, v, False), "fp32": partial(forward_backward, q, k, v, True)}
        for call in calls.values():  # warm-up
            call()
        times = interleaved(calls, args.repeats)
        result[name] = {"shape": [b, h, n, m, d], "bf16_median_ms": 1000 * statistics.median(times["bf16"]),
                        "fp32_median_ms": 1000 * statistics.median(times["fp32"]),
                        "median_ratio_bf16_over_fp32": median_ratio(times["bf16"], times["fp32"]),
                        "attention_runs_fp32": trains_faster_in_fp32(q, k, v)}  # fmt: skip
    return {"benchmark": f"SDPA forward + backward, bf16 inputs, CPU, {torch.get_num_threads()} threads: PyTorch's bf16 kernel / fp32 with casts",
            **result}  # fmt: skip


def write_synthetic_sd15(path: Path) -> None:
    """A full-size SD1.5 single file in the official layout, every key of the manifest, random-free.

    Tensors are zeros (content does not matter for memory), fp32 like v1-5-pruned-emaonly.
    """
    from safetensors.torch import save_file

    manifest = json.loads((ROOT.parent / "shared/manifests/sd15_v1-5-pruned-emaonly.json").read_text())
    dtypes = {"int64": torch.int64, "int32": torch.int32, "float32": torch.float32}
    tensors = {
        key: torch.zeros(shape, dtype=dtypes[manifest["tensor_dtypes"].get(key, "float32")])
        for key, shape in manifest["tensors"].items()
    }
    save_file(tensors, str(path))


def load_rss_worker(stage: str, path: str) -> dict:
    """Peak RSS of this fresh process after `stage`: "imports" (minigen's SD loader imported), "load" (and the
    single file at `path` loaded) or "read" (and every weight of it read once)."""
    from minigen.loading.sd import load_sd  # imported here, not by this file: the imports are part of every stage's figure

    if stage != "imports":
        pipe = load_sd(path, dtype=torch.float32)
        if stage == "read":
            for module in (pipe.unet, pipe.vae, *pipe.text_encoders):
                for p in module.parameters():
                    float(p.sum())
    return {"peak_rss_bytes": process_memory("VmHWM")}  # the peak since exec (ru_maxrss would count the parent's)


def bench_load_rss(args) -> dict:
    """Peak RSS of a fresh process that loads the whole SD1.5 pipeline from one file.

    Weights stay memory-mapped, so loading alone reads little; the second figure also reads every
    weight once (as the first denoising step does), which is the memory a ready pipeline holds.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v1-5-synthetic.safetensors"
        write_synthetic_sd15(path)
        size = path.stat().st_size
        peak, touched, imports = (in_fresh_process(load_rss_worker, stage, str(path))["peak_rss_bytes"] for stage in ("load", "read", "imports"))
    return {
        "benchmark": "peak RSS loading a full-size SD1.5 single file (fp32, official layout)",
        "file_bytes": size,
        "peak_rss_bytes": peak,
        "rss_after_imports_bytes": imports,
        "peak_after_load_over_file": peak / size,
        "peak_rss_every_weight_read_bytes": touched,
        "peak_every_weight_read_over_file": touched / size,
        "peak_every_weight_read_minus_imports_over_file": (touched - imports) / size,
    }


CONDUCTOR_CONCEPTS = 2


def conductor_setup(size: int):
    """A full-size SD1.5 UNet (random weights), two concepts with rank-4 ED-LoRA-like LoRAs on every
    attention Linear, layer-wise contexts and half-image masks, and one step's inputs."""
    from minigen.controls import LowRank
    from minigen.methods.concept_conductor import Concept, ConceptConductor, ConductorSettings, Reference
    from minigen.models.unet import UNet
    from minigen.models.unet_config import PRESETS

    torch.manual_seed(0)
    unet = UNet(PRESETS["sd15"]).eval().requires_grad_(False)
    latent = size // 8
    concepts = []
    for i in range(CONDUCTOR_CONCEPTS):
        lora = [LowRank(path, torch.randn(4, m.weight.shape[1]) * 0.01, torch.randn(m.weight.shape[0], 4) * 0.01, 0.7)
                for path, m in unet.named_modules() if path.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]  # fmt: skip
        mask = torch.zeros(latent, latent)
        mask[:, i * latent // 2 : (i + 1) * latent // 2] = 1
        concepts.append(Concept(torch.randn(16, 77, 768), torch.randn(16, 77, 768), lora, mask))
    settings = ConductorSettings(steps=1, guidance_end=0)  # one step, with layout alignment
    conductor = ConceptConductor(unet, settings)
    t = int(conductor.schedule.timesteps(settings.steps)[0])
    reference = Reference(torch.randn(77, 768), {t: torch.randn(1, 4, latent, latent)})
    inputs = dict(noise=torch.randn(1, 4, latent, latent), context=torch.randn(77, 768), uncond=torch.randn(77, 768))
    return conductor, concepts, reference, inputs, t


def conductor_batched(setup):
    conductor, concepts, reference, inputs, _ = setup
    return lambda: conductor.sample(inputs["noise"], inputs["context"], inputs["uncond"], concepts, reference, progress=False)


def conductor_official(setup):
    """The official structure of one step (notes §1.2): for each concept a deep copy of the UNet with
    its LoRA merged, once for the guidance pass and once for the generation pass; paths run one after
    another. Its fusion is left out (it costs a few additions), so the emulation is, if anything, fast."""
    import copy

    from minigen.controls import CaptureFeatures, Controls
    from minigen.loading.lora_files import merge

    conductor, concepts, reference, inputs, t = setup
    unet, settings = conductor.unet, conductor.settings
    (layer,) = settings.guidance_layers
    up = {lid for lid in unet.attention_sites() if lid.startswith("up.")}

    def layerwise(context, rows):
        return {lid: context[i][None].expand(rows, -1, -1) for i, lid in enumerate(conductor.cross_layers)}

    def step():
        z = inputs["noise"].clone().requires_grad_(True)
        keys = []
        for concept in concepts:  # guidance: each custom path on a merged copy, with grad, stopped early
            custom = copy.deepcopy(unet)
            merge(custom, list(concept.low_rank))
            capture = CaptureFeatures(layers={layer}, kind="self")
            custom(z, torch.tensor([float(t)]), None, controls=Controls(contexts=layerwise(concept.context, 1), capture=[capture], stop_after=(layer, "self")))
            keys.append(capture.features[layer]["k"])
        with torch.no_grad():
            capture = CaptureFeatures(layers={layer}, kind="self")
            unet(reference.latents[t], torch.tensor([float(t)]), reference.context[None], controls=Controls(capture=[capture], stop_after=(layer, "self")))
            ref = capture.features[layer]["k"]
        capture = CaptureFeatures(layers={layer}, kind="self")
        unet(z, torch.tensor([float(t)]), inputs["context"][None], controls=Controls(capture=[capture], stop_after=(layer, "self")))
        loss = (capture.features[layer]["k"] - ref).pow(2).sum(0).mean() + torch.stack([(k - ref).pow(2).sum(0).mean() for k in keys]).mean()
        (grad,) = torch.autograd.grad(loss, z)
        z = (z - settings.guidance_weight * grad).detach()
        with torch.no_grad():  # generation: each custom path on a fresh merged copy, its decoder outputs kept
            stored = []
            for concept in concepts:
                custom = copy.deepcopy(unet)
                merge(custom, list(concept.low_rank))
                contexts = {lid: torch.cat([c[None], u[None]]) for lid, c, u in zip(conductor.cross_layers, concept.context, concept.uncond)}
                captures = [CaptureFeatures(layers=up, kind=kind, what=("out",)) for kind in ("self", "cross")]
                custom(torch.cat([z, z]), torch.tensor([float(t)] * 2), None, controls=Controls(contexts=contexts, capture=captures))
                stored.append(captures)
            context = torch.stack([inputs["context"], inputs["uncond"]])
            cond, uncond = unet(torch.cat([z, z]), torch.tensor([float(t)] * 2), context).chunk(2)
        return uncond + settings.cfg * (cond - uncond)

    return step


def conductor_peak(mode: str, size: int) -> dict:
    """Peak memory one step adds in this process (model and inputs excluded), batched or official."""
    setup = conductor_setup(size)
    run = conductor_batched(setup) if mode == "conductor-batched" else conductor_official(setup)

    Path("/proc/self/clear_refs").write_text("5")
    before = process_memory("VmRSS")
    seconds = time_call(run)
    return {"seconds": seconds, "peak_bytes": process_memory("VmHWM") - before}


def bench_conductor(args) -> dict:
    """One Concept Conductor step (layout alignment + generation with CFG, 2 concepts, full-size SD1.5 UNet
    at args.size px, random weights): all paths as rows of one batch against the official structure
    (sequential deep copies and LoRA merges) emulated in the same run; then peak memory of each in a
    fresh process."""
    setup = conductor_setup(args.size)
    batched, official = conductor_batched(setup), conductor_official(setup)
    pairs = []
    for i in range(args.repeats):  # interleaved pairs, the order alternating
        first, second = (batched, official) if i % 2 == 0 else (official, batched)
        a, b = time_call(first), time_call(second)
        pairs.append((a, b) if i % 2 == 0 else (b, a))
    memory = {}
    for mode in ("conductor-batched", "conductor-official"):
        memory[mode] = in_fresh_process(conductor_peak, mode, args.size)
    ratios = [o / b for b, o in pairs]
    return {
        "benchmark": f"one Concept Conductor step, {CONDUCTOR_CONCEPTS} concepts, SD1.5 UNet, fp32, CPU, {args.size}x{args.size}, "
        f"batch 1, {torch.get_num_threads()} threads",
        "batched_median_s": statistics.median(b for b, _ in pairs),
        "official_median_s": statistics.median(o for _, o in pairs),
        "median_speedup_official_over_batched": statistics.median(ratios),
        "speedups": ratios,
        "batched_peak_MiB": memory["conductor-batched"]["peak_bytes"] / 2**20,
        "official_peak_MiB": memory["conductor-official"]["peak_bytes"] / 2**20,
    }


def weights_dtype_unet(storage: str, mode: str):
    """A full-size SD1.5 UNet with random weights, the same in every process: each Linear/Conv2d weight
    N(0, 1/fan_in) from its own seed, rounded through `storage` (fp32: not rounded); biases N(0, 0.02²),
    norms 1. mode "stored": those weights kept in `storage` (`store_weights`, fp32 compute); "fp32": the
    same rounded values held in fp32 (the reference)."""
    from minigen.storage import PLAIN_LAYERS, WEIGHTS_DTYPES, store_weights
    from minigen.models.unet import UNet
    from minigen.models.unet_config import PRESETS

    dtype = WEIGHTS_DTYPES[storage]
    with torch.device("meta"):
        unet = UNet(PRESETS["sd15"]).eval().requires_grad_(False)
    layer_weights = {f"{path}.weight" for path, m in unet.named_modules() if type(m) in PLAIN_LAYERS}
    state = {}
    for i, (key, meta) in enumerate(unet.state_dict().items()):
        g = torch.Generator().manual_seed(i)
        if key in layer_weights:
            weight = (torch.randn(meta.shape, generator=g) * meta[0].numel() ** -0.5).to(dtype)
            state[key] = weight if mode == "stored" else weight.float()
        elif key.endswith("bias"):
            state[key] = torch.randn(meta.shape, generator=g) * 0.02
        else:
            state[key] = torch.ones(meta.shape)
    unet.load_state_dict(state, assign=True)
    if mode == "stored":
        store_weights(unet, dtype, torch.float32)  # the weights are in `dtype` already: nothing is copied
    return unet


def weights_dtype_inputs(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, size // 8, size // 8, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 768, generator=g)


def weights_dtype_worker(storage: str, mode: str, size: int, out: str) -> dict:
    """Build `weights_dtype_unet(storage, mode)` in this fresh process and call it once (batch 1, fp32
    compute): resident memory after building, and peak resident memory over the call. Saves the output to `out`."""

    unet = weights_dtype_unet(storage, mode)
    rss_model = process_memory("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of the call alone, from here
    with torch.inference_mode():
        output = unet(*weights_dtype_inputs(size))
    torch.save(output, out)
    return {"parameter_bytes": sum(p.nbytes for p in unet.parameters()), "rss_after_build_bytes": rss_model,
            "peak_rss_bytes": process_memory("VmHWM")}  # fmt: skip


def bench_weights_dtype(args) -> dict:
    """Weights stored in fp16 / bf16 / fp8 with fp32 compute against the fp32 model holding the same
    rounded weights (full-size SD1.5 UNet, one call, random weights).

    Memory: each model is built and called in a fresh process (`weights_dtype_worker`) whose glibc
    returns freed blocks to the system (MALLOC_MMAP_THRESHOLD_), so the resident figure is the model's,
    not the allocator's leftovers from building it. Outputs must agree exactly: both compute in fp32 on
    the same values. The fp32 process with unrounded weights gives what the rounding itself costs.
    Time: stored / fp32 in interleaved pairs in this process (the per-layer casts)."""
    from minigen.storage import WEIGHTS_DTYPES

    def run(storage: str, mode: str, tmp: str) -> tuple[dict, torch.Tensor]:
        out = str(Path(tmp) / f"{storage}-{mode}.pt")
        result = in_fresh_process(weights_dtype_worker, storage, mode, args.size, out, env={"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)})
        return result, torch.load(out, weights_only=True)

    storages = [name for name in ("fp16", "bf16", "fp8") if name in WEIGHTS_DTYPES]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        original, original_out = run("fp32", "fp32", tmp)
        results["fp32"] = original
        for storage in storages:
            stored, stored_out = run(storage, "stored", tmp)
            reference, reference_out = run(storage, "fp32", tmp)
            results[storage] = {
                "stored": stored,
                "fp32_same_rounded_weights": reference,
                "rss_after_build_stored_over_fp32": stored["rss_after_build_bytes"] / reference["rss_after_build_bytes"],
                "peak_rss_stored_over_fp32": stored["peak_rss_bytes"] / reference["peak_rss_bytes"],
                "peak_rss_saved_MiB": (reference["peak_rss_bytes"] - stored["peak_rss_bytes"]) / 2**20,
                "max_abs_diff_vs_fp32_same_weights": (stored_out - reference_out).abs().max().item(),
                "max_abs_diff_vs_fp32_unrounded": (stored_out - original_out).abs().max().item(),
                "output_std": original_out.std().item(),
            }
    def timing(storage: str) -> dict:  # one pair of models at a time (3.4 + at most 1.7 GB), freed on return
        stored, reference = weights_dtype_unet(storage, "stored"), weights_dtype_unet(storage, "fp32")
        inputs = weights_dtype_inputs(args.size)
        pairs = compare(lambda: stored(*inputs), lambda: reference(*inputs), args.repeats, names=("stored", "fp32"))
        return {key: value for key, value in pairs.items() if key != "max_abs_diff"}

    for storage in storages:
        results[storage]["time"] = timing(storage)
    return {
        "benchmark": f"SD1.5 UNet (full size, random weights), one call, fp32 compute, CPU, {args.size}x{args.size}, batch 1, "
        f"{args.threads} threads",
        **results,
    }


def multiple_of_64(text: str) -> int:
    """An argparse type: a size in pixels the full-size models take (the UNet halves it three times, 8x8 latents at least)."""
    value = cli.positive_int(text)
    if value % 64:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 64; try {max(64, value // 64 * 64)}")
    return value


FLAGS = {  # the flags of all modes; MODES names those each mode reads
    "--size": dict(type=multiple_of_64, default=256, help="image size in pixels, a multiple of 64 (flux-cache: flux-mid's)"),
    "--repeats": dict(type=cli.positive_int, default=5),
    "--threads": dict(type=cli.positive_int, default=os.cpu_count()),
    "--compile": dict(action="store_true", help="compiled blocks against eager and against diffusers' compiled"),
    "--channels-last": dict(action="store_true", help="channels-last convolutions (with --compile: both compiled models', as minigen's compile_blocks does by default)"),
    "--diffusers-resnets": dict(action="store_true", help="with --compile: diffusers also compiles its ResnetBlock2D, as minigen does"),
    "--threshold": dict(type=cli.non_negative_float, default=None, help="the First Block Cache threshold (default: minigen's)"),
    "--n": dict(type=cli.positive_int, default=50, help="toy prompts"),
    "--steps": dict(type=cli.positive_int, default=28, help="flux-mid sampling steps"),
    "--only": dict(choices=["toy", "mid"], help="only (a) toy-flux or (b) flux-mid"),
    "--dry-run": dict(action="store_true", help="tiny models on the CPU, every code path in seconds"),
    "--out": dict(type=Path, help="also write the JSON here (gpu: default runs/benchmark-gpu-<time>.json)"),
    "--overwrite": dict(action="store_true", help="replace an existing --out"),
}  # fmt: skip
COMMON_FLAGS = ("--threads", "--out", "--overwrite")
MODES = {  # each mode's function and the flags it reads besides COMMON_FLAGS; it refuses the others
    "unet": (bench_unet, ("--size", "--repeats", "--compile", "--channels-last", "--diffusers-resnets")),
    "flux": (bench_flux, ("--repeats", "--compile")),
    "load-rss": (bench_load_rss, ()),
    "lag": (bench_lag, ("--size", "--repeats")),
    "joint-bias": (bench_joint_bias, ()),
    "conceptrol": (bench_conceptrol, ("--size", "--repeats")),
    "conductor": (bench_conductor, ("--size", "--repeats")),
    "flux-cache": (bench_flux_cache, ("--size", "--repeats", "--threshold", "--n", "--steps", "--only")),
    "unet-cache": (bench_unet_cache, ("--size", "--repeats", "--n")),
    "gpu": (bench_gpu, ("--dry-run", "--threshold")),
    "weights-dtype": (bench_weights_dtype, ("--size", "--repeats")),
    "attention-backward": (bench_attention_backward, ("--repeats",)),
}


def main(argv=None) -> None:
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="which", required=True, help="the measurement; `benchmark.py MODE -h` lists the flags it reads")
    for name, (_, flags) in MODES.items():
        mode = modes.add_parser(name)
        for flag in flags + COMMON_FLAGS:
            mode.add_argument(flag, **FLAGS[flag])
    args, unread = parser.parse_known_args(argv)
    if unread:  # another mode's flag (or none), which this mode would ignore
        parser.error(f"{args.which} does not read {' '.join(unread)}; its flags are {', '.join(MODES[args.which][1] + COMMON_FLAGS)}")
    if getattr(args, "diffusers_resnets", False) and not args.compile:
        parser.error("--diffusers-resnets chooses what --compile compiles in diffusers' UNet; add --compile or drop it")
    if args.out is not None:  # a taken or unwritable --out is refused before minutes of measuring
        check_output_path(args.out, overwrite=args.overwrite, suffix=".json", flag="--overwrite")
    torch.set_num_threads(args.threads)
    if getattr(args, "compile", False):  # compile times from a cold start: inductor's on-disk caches of earlier runs are not read
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="benchmark-inductor-")
    benchmark, _ = MODES[args.which]
    result = benchmark(args)
    result["machine"] = f"{os.cpu_count()} CPUs, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}"
    print(json.dumps(result, indent=2))
    out = args.out or (ROOT / "runs" / f"benchmark-gpu-{time.strftime('%Y%m%d-%H%M%S')}.json" if args.which == "gpu" else None)
    if out is not None:
        write_atomically(out, lambda file: file.write((json.dumps(result, indent=2) + "\n").encode()), overwrite=args.overwrite)


if __name__ == "__main__":
    sys.exit(cli.run(main))  # bad input: one line on stderr, exit code 2, no traceback
