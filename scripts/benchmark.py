"""Speed and memory of minigen against diffusers, on the same weights, machine and run.

    python scripts/benchmark.py unet        # SD1.5 UNet step time, minigen / diffusers
    python scripts/benchmark.py flux        # FLUX transformer step time (mid-size: real width, 2+4 blocks)
    python scripts/benchmark.py load-rss    # peak RSS while loading a full-size SD1.5 single file
    python scripts/benchmark.py lag         # Personalized Residuals: sampling with LAG / without (minigen only)
    python scripts/benchmark.py joint-bias  # peak memory of a FLUX-dev joint attention biased by token group / unbiased
    python scripts/benchmark.py conceptrol  # sampling with Conceptrol / with the adapter alone (SD IP-Adapter, FLUX OminiControl)
    python scripts/benchmark.py conductor   # a Concept Conductor step, 2 concepts: batched paths / the official deep copies

Weights are random (no downloads here) but full-size, so the arithmetic is the real model's.
Timings interleave the two implementations and report medians, because neighbours on a shared
machine move wall times; the ratio of each interleaved pair is the figure to read.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def time_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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
    return {
        "benchmark": f"SD1.5 UNet, fp32, CPU, {args.size}x{args.size}, batch 2, {torch.get_num_threads()} threads",
        **compare(lambda: ours(x, t, context), lambda: theirs(x, t, context).sample, args.repeats),
    }


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

    def run_ours():
        return ours(img, ids, txt, tids, t, y, g)

    def run_theirs():
        return theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                      img_ids=ids[0], txt_ids=tids[0], guidance=g).sample

    return {
        "benchmark": f"FLUX transformer (3072 wide, {config.depth} double + {config.depth_single_blocks} single blocks), "
        f"fp32, CPU, 1024 image + 512 text tokens, batch 1, {torch.get_num_threads()} threads",
        **compare(run_ours, run_theirs, args.repeats),
    }


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
            method = ConceptrolSD(adapter.projections(), [SDConcept([5, 6], ip_tokens)], steps=25, conceptrol=conceptrol)
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


JOINT_SIZES = {"txt": 512, "img": 4096, "cond": 4096}  # FLUX.1-dev at 1024 px with a 1024 px condition (OminiControl)


def joint_attention_peak(mode: str) -> dict:
    """Peak memory added by one joint attention at FLUX-dev sizes (24 heads x 128, fp32), in this process:
    "plain" (one SDPA call), "by-group" (Conceptrol's bias by token group, built a block of query rows at
    a time) or "dense" (the same bias as one [L, L] tensor). Resets the kernel's peak-RSS counter first,
    so the figure is the attention's own (bias and output included), not the inputs'."""
    from minigen.attention import attention
    from minigen.controls import group_bias_rows
    from minigen.models.flux_tokens import group_slices

    def status(field: str) -> int:
        return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) * 1024

    torch.manual_seed(0)
    L = sum(JOINT_SIZES.values())
    q, k, v = (torch.randn(1, 24, L, 128) for _ in range(3))
    groups = dict(zip(JOINT_SIZES, group_slices(list(JOINT_SIZES.values()))))
    spec = {("txt", "cond"): torch.zeros(JOINT_SIZES["txt"], 1), ("img", "cond"): torch.randn(JOINT_SIZES["img"], 1),
            ("cond", "img"): 0.0}  # fmt: skip
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    start = time.perf_counter()
    with torch.no_grad():
        rows = group_bias_rows([spec], groups, None, q, L)
        bias = None if mode == "plain" else rows if mode == "by-group" else rows(0, L)
        attention(q, k, v, bias)
    return {"seconds": time.perf_counter() - start, "peak_bytes": status("VmHWM") - before}


def bench_joint_bias(args) -> dict:
    """Peak memory and time of one biased joint attention at FLUX-dev sizes against the unbiased one,
    each in a fresh process (so no allocator cache carries over)."""
    results = {}
    for mode in ("plain", "by-group", "dense"):
        out = subprocess.check_output([sys.executable, __file__, "joint-bias", "--worker", mode], cwd=ROOT)
        results[mode] = json.loads(out.splitlines()[-1])
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


def bench_load_rss(args) -> dict:
    """Peak RSS of a fresh process that loads the whole SD1.5 pipeline from one file.

    Weights stay memory-mapped, so loading alone reads little; the second figure also reads every
    weight once (as the first denoising step does), which is the memory a ready pipeline holds.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v1-5-synthetic.safetensors"
        write_synthetic_sd15(path)
        size = path.stat().st_size
        # VmHWM (peak resident memory) starts afresh at exec; ru_maxrss would inherit this process's peak.
        peak_rss = "print(int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024)"
        load = f"import torch; from minigen.loading.sd import load_sd; pipe = load_sd({str(path)!r}, dtype=torch.float32);"
        touch = "[float(p.sum()) for m in (pipe.unet, pipe.vae, *pipe.text_encoders) for p in m.parameters()];"
        peak = int(subprocess.check_output([sys.executable, "-c", load + peak_rss], cwd=ROOT).split()[-1])
        touched = int(subprocess.check_output([sys.executable, "-c", load + touch + peak_rss], cwd=ROOT).split()[-1])
        imports = int(subprocess.check_output([sys.executable, "-c", "import minigen.loading.sd;" + peak_rss], cwd=ROOT).split()[-1])
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
    layer = settings.guidance_layer
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

    def status(field: str) -> int:
        return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) * 1024

    Path("/proc/self/clear_refs").write_text("5")
    before = status("VmRSS")
    seconds = time_call(run)
    return {"seconds": seconds, "peak_bytes": status("VmHWM") - before}


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
        out = subprocess.check_output([sys.executable, __file__, "conductor", "--worker", mode, "--size", str(args.size)], cwd=ROOT)
        memory[mode] = json.loads(out.splitlines()[-1])
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=["unet", "flux", "load-rss", "lag", "joint-bias", "conceptrol", "conductor"])
    parser.add_argument("--worker", choices=["plain", "by-group", "dense", "conductor-batched", "conductor-official"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=256, help="image size in pixels (unet)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:  # one measurement of `joint-bias` or `conductor`, in its own process
        measure = conductor_peak(args.worker, args.size) if args.worker.startswith("conductor") else joint_attention_peak(args.worker)
        print(json.dumps(measure))
        return
    benchmarks = {"unet": bench_unet, "flux": bench_flux, "load-rss": bench_load_rss, "lag": bench_lag,
                  "joint-bias": bench_joint_bias, "conceptrol": bench_conceptrol, "conductor": bench_conductor}  # fmt: skip
    result = benchmarks[args.which](args)
    result["machine"] = f"{os.cpu_count()} CPUs, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
