"""Generate an image from a prompt.

    python scripts/sample.py --prompt "a large yellow star to the left of a small blue circle on grass"   # toy-sd
    python scripts/sample.py --model sd15 --prompt "a photo of a corgi on the beach"
    python scripts/sample.py --model /models/sd_xl_base_1.0.safetensors --prompt "..." --steps 30
    python scripts/sample.py --model sd15 --prompt "..." --lora my_style.safetensors:0.8
    python scripts/sample.py --prompt "a sks star above a blue box on sand" --residuals my_star.safetensors --lag
    python scripts/sample.py --model flux-dev --prompt "..." --guidance 3.5 --lora flux_style.safetensors:0.9
    python scripts/sample.py --model /models/flux1-schnell.safetensors --ae /models/ae.safetensors --prompt "..."
    python scripts/sample.py --model sd15 --prompt "a (red:1.3) fox, [blurry]" --embedding easynegative.safetensors --vae vae-ft-mse.safetensors
    python scripts/sample.py --model sd15 --prompt "an oil painting" --image photo.png --strength 0.6          # image to image
    python scripts/sample.py --model sd15-inpainting --prompt "a cat" --image photo.png --mask mask.png        # inpainting
    python scripts/sample.py --model flux-dev --aligngen guitar.safetensors --prompt "a guitar on the beach" --image g.png --concept guitar   # AlignGen

--model takes a preset name (toy-sd, the default: the tiny model of the toy world shipped in
weights/; toy-flux, its FLUX-topology sibling; sd15, sdxl, sd15-inpainting, sdxl-inpainting, flux-dev, flux-schnell),
a Hugging Face hub id, a single
checkpoint file or a diffusers folder. A FLUX transformer file also needs the autoencoder (--ae) and
the text encoders (--text-encoders, a FLUX diffusers folder or hub id); both default to the files
of black-forest-labs/FLUX.1-schnell. The PNG carries the prompt and settings (A1111-style
`parameters` text, with the model file's A1111 hash).

SD prompts are read as A1111 reads them: `(word:1.3)` weights and prompts longer than 75 tokens
(--prompt-syntax plain reads them as diffusers does; with Personalized Residuals' --lag and IP-Adapter
the default is plain, and --prompt-syntax a1111 reads their prompts, and finds their words, in A1111's
syntax; SDXL's --prompt-2/--negative-2 are read plain). A reference adapter (--ip-adapter, --omini, --aligngen) takes
each --image with the --concept words that name its subject in the prompt, pairs in order; --aligngen
(a FLUX file of scripts/train_aligngen.py) also reads each reference's Redux tokens (--redux, --siglip)
and runs as its file was trained (reference size, ablations). Without a reference adapter, --image is
the image to start from (--strength, default 0.75); with --mask (white = repaint) only the masked part
is redrawn, and the original pixels are pasted back outside the mask, blurred by --mask-blur (A1111's overlay).

Many prompts: --prompts FILE draws every image a prompt file asks for, loading the model once:

    python scripts/sample.py --prompts prompts.txt --seed 1 --out runs/batch
    torchrun --standalone --nproc_per_node 4 -- scripts/sample.py --model sd15 --prompts prompts.jsonl --seed 1 --out runs/batch

(the `--` keeps torchrun from reading sample.py's options, such as --n, as abbreviations of its own).
The file holds one prompt per line, or JSONL lines with per-line settings (minigen/prompt_file.py
describes both, the seed rule and the file names). Prompt i draws with --seed + 1000 i unless its line
gives a seed, and its --n images take that seed, +1, ...; image k is `<i:05d>-s<seed>.png` in the
--out folder (default runs/prompts-<date>-<time>). A file that is already there is skipped if it holds
the same prompt and settings (so a killed run, started again with the same --out, redraws nothing it
finished) and refused if it holds others; --overwrite redraws and replaces those (and keeps the ones of
the same settings, so a killed --overwrite run goes on too). Each image
written gets a line in the folder's manifest.jsonl (prompt, seed, settings, file), appended after the
PNG is in place; a file found without its manifest line gets it then. Under torchrun each rank draws the
images rank, rank + N, ... of the file's list on its own device (cuda:LOCAL_RANK; gloo on CPU) and
keeps its own manifest-rank<r>.jsonl: the files do not depend on N, and the manifest of the folder is
the union of its manifest*.jsonl. torchrun sets OMP_NUM_THREADS=1 in each process (see
minigen/distributed.py), and the files are byte for byte the same for every N as long as each process
has the same number of threads: a plain run with torch's default (one per core) may differ from them by
one level in a few pixels, as a convolution's float sums depend on how many threads share it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import inspect
import json
import logging
import math
import os
import secrets
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from minigen import cli, distributed
from minigen.journal import append_line, read_json_lines
from minigen.controls import Controls, combine
from minigen.pipelines.arguments import MAX_SEED, check_size
from minigen.pipelines.flux import FluxPipeline
from minigen.image import A1111_SAMPLERS, from_pil, next_free_path, paste_outside, preprocess_siglip, read_image, read_mask, save_png, to_pil
from minigen.loading.aligngen import load_aligngen
from minigen.loading.auto import PRESETS, load_pipeline
from minigen.loading.files import check_output_path, check_writable_folder, checked_input, is_safetensors, read_state_dict, write_atomically
from minigen.loading.hub import FILE_SUFFIXES
from minigen.loading.hashes import model_hash
from minigen.loading.textual_inversion import load_textual_inversion
from minigen.loading.toy import TOY_MODELS, toy_files
from minigen.loading.lora_files import merge, read_lora
from minigen.loading.ip_adapter import load_ip_adapter
from minigen.loading.lora_flux import read_flux_lora
from minigen.loading.redux import REDUX_HUB_ID, SIGLIP_HUB_ID, load_redux
from minigen.methods.aligngen import centre_square, insert_placeholders, prepare
from minigen.methods.conceptrol import ConceptrolFlux, ConceptrolSD, default_concept_layer, flux_concepts, held_back_throughout, sd_concepts
from minigen.methods.residuals import Residuals, checked_residuals_file, concept_tokens, lag_controls
from minigen.models.redux import ReduxConfig, redux_tokens
from minigen.pipelines.sd import SizeConditioning
from minigen.prompt_file import MAX_IMAGES, PromptJob, read_prompt_file
from minigen.sampling import SAMPLERS
from minigen.compile import OFFLOAD_AND_COMPILE, compile_pipeline
from minigen.text.spans import same_for_every_encoder
from minigen.text.t5 import MAX_LENGTH_DEV
from minigen.text.weighting import refuse_scheduling
from minigen.storage import WEIGHTS_DTYPES, components, compute_device, compute_dtype, offload, peak_memory_line, store_weights

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ETA_SAMPLERS = [name for name, sampler in SAMPLERS.items() if "eta" in inspect.signature(sampler).parameters]


def finite(text: str) -> float:
    """A float argument that is a real number (nan and inf would only give a black image)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def sampler_argument(text: str) -> tuple[str, bool]:
    """`--sampler` -> (sampler, karras): minigen's name or A1111's, in any case; a " Karras" suffix is --karras."""
    name = " ".join(text.split()).lower()
    karras = name.endswith(" karras")
    base = name.removesuffix(" karras")
    a1111 = {words.lower(): ours for ours, words in A1111_SAMPLERS.items() if ours in SAMPLERS}
    sampler = base if base in SAMPLERS else a1111.get(base)
    if sampler is None:
        names = ", ".join(A1111_SAMPLERS[ours] for ours in SAMPLERS if ours in A1111_SAMPLERS)
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(SAMPLERS)} or A1111's {names}, each with an optional ' Karras')"
        )
    return sampler, karras


def fraction(text: str) -> float:
    value = finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]")
    return value


def timesteps_argument(text: str) -> list[int]:
    """`999,850,...` -> [999, 850, ...] (checked against the model's schedule when it runs)."""
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 999,850,736") from None


def size_argument(text: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT` pixels (as A1111 writes a size) -> (height, width), as SizeConditioning takes it."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT in pixels, e.g. 2048x1536") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be at least 1x1")
    return height, width


def corner_argument(text: str) -> tuple[int, int]:
    """`TOP,LEFT` pixels -> (top, left)."""
    try:
        top, left = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not TOP,LEFT in pixels, e.g. 0,256") from None
    if top < 0 or left < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a crop corner cannot be negative")
    return top, left


def lora_argument(text: str) -> tuple[str, float]:
    """`path[:scale]` -> (path, scale); the scale defaults to 1, and an existing file is read whole (a file
    named `style:2` is that file at scale 1)."""
    if os.path.isfile(text):
        return text, 1.0
    path, colon, scale = text.rpartition(":")
    try:
        value = float(scale) if colon else 1.0
    except ValueError:  # a colon inside the path itself, unless the part before it is the file
        if os.path.isfile(path) and not os.path.exists(text):
            raise argparse.ArgumentTypeError(f"{text}: the scale {scale!r} after the file {path} is not a number") from None
        return text, 1.0
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"the scale of {text} is not a finite number")
    return (path, value) if colon else (text, value)


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-sd", help=f"preset ({', '.join(PRESETS)}; default toy-sd), hub id, single file or diffusers folder")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt")
    prompts.add_argument("--prompts", type=Path, metavar="FILE",
                         help="draw every prompt of FILE (one per line, or JSONL with per-line settings) into the --out folder")
    parser.add_argument("--negative", default="", help="negative prompt")
    parser.add_argument("--prompt-2", default=None, help="SDXL only: what its second text encoder (OpenCLIP bigG) reads (default: --prompt; plain syntax)")
    parser.add_argument("--negative-2", default=None, help="SDXL only: the negative its second text encoder reads (default: --negative)")
    parser.add_argument("--original-size", type=size_argument, metavar="WxH",
                        help="SDXL only: draw as if from an image of this size (micro-conditioning; default the output size)")
    parser.add_argument("--crop-top-left", type=corner_argument, metavar="TOP,LEFT",
                        help="SDXL only: the corner of that image the crop starts at (default 0,0: uncropped)")
    parser.add_argument("--target-size", type=size_argument, metavar="WxH", help="SDXL only: the size the crop is framed as (default the output size)")
    parser.add_argument("--width", type=cli.positive_int, help="pixels, a multiple of the model's factor (SD 8, FLUX 16, toy-sd 4, toy-flux 8; default: the model's native size)")
    parser.add_argument("--height", type=cli.positive_int, help="pixels, a multiple of the model's factor (SD 8, FLUX 16, toy-sd 4, toy-flux 8; default: the model's native size)")
    parser.add_argument("--steps", type=cli.positive_int, help="default 25 (SD and the toy models), 28 (FLUX dev), 4 (FLUX schnell)")
    parser.add_argument("--timesteps", type=timesteps_argument, metavar="T1,T2,...",
                        help="SD only: the training timesteps to visit, decreasing, instead of --steps' schedule "
                             "(e.g. Align Your Steps for SD1.5: 999,850,736,645,545,455,343,233,124,24)")
    parser.add_argument("--cfg", type=finite, help="classifier-free guidance scale (1 = off); default 7.5 (SD), the model's (FLUX: 1, toy-flux 4)")
    parser.add_argument("--cfg-rescale", type=finite, default=0.0, metavar="R",
                        help="SD only: pull the guided prediction's spread back towards the conditional one's, 0-1 (diffusers' guidance_rescale; 0.7 in its paper; default 0: off)")
    parser.add_argument("--guidance", type=finite, help="FLUX dev's distilled guidance (default 3.5); not for schnell or SD")
    parser.add_argument("--t5-tokens", type=cli.positive_int, metavar="N",
                        help=f"FLUX: the T5 tokens the prompt is padded to, at most {MAX_LENGTH_DEV} (default the model's: dev 512, schnell 256; "
                             "the official OminiControl and Conceptrol pipelines read 512 on schnell too)")
    parser.add_argument("--sampler", default="euler", type=sampler_argument, metavar="NAME",
                        help=f"SD only: {', '.join(SAMPLERS)}, or A1111's name in any case ('DPM++ 2M Karras' is dpmpp_2m --karras); FLUX samples with flow Euler")
    parser.add_argument("--karras", action="store_true", help="Karras sigma schedule (SD only)")
    parser.add_argument("--eta", type=cli.non_negative_float, help=f"fresh noise of {', '.join(ETA_SAMPLERS)} (0: none, 1: the SDE's; default: the sampler's, 0 for ddim, 1 for the others)")
    parser.add_argument("--clip-skip", type=cli.positive_int, default=1, help="A1111's Clip skip: 1 = the text encoder's last layer (default), 2 = the penultimate, ... (SD1.x/SD2.x models; A1111 leaves it out on SDXL)")
    parser.add_argument("--seed", type=cli.draw_seed, help="random when omitted (and printed); with --prompts the base seed, prompt i drawing with seed + 1000 i "
                        "(needed unless every line gives its own)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default fp32 (SD and the toy models), bf16 (FLUX)")
    parser.add_argument("--ae", help="FLUX autoencoder file for a FLUX transformer file (default: FLUX.1-schnell's ae.safetensors)")
    parser.add_argument("--text-encoders", help="FLUX diffusers folder or hub id with the text encoders, for a transformer file")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lora", action="append", default=[], type=lora_argument, metavar="PATH[:SCALE]",
                        help="LoRA merged at SCALE (default 1); repeatable. SD: kohya, peft/diffusers; FLUX: also BFL/ComfyUI, XLabs")
    parser.add_argument("--residuals", action="append", default=[], type=lora_argument, metavar="PATH[:SCALE]",
                        help="Personalized Residuals file at SCALE (default 1); repeatable, SD only")
    parser.add_argument("--lag", action="store_true", help="apply the residuals only where cross-attention finds each concept")
    parser.add_argument("--lag-quantile", type=fraction, help="with --lag: where LAG binarizes each attention map (default 0.5: the median)")
    adapters = parser.add_argument_group("reference images (Conceptrol: each reference acts only where its concept is; AlignGen: a learned token per concept)")
    adapters.add_argument("--ip-adapter", help="SD/SDXL: IP-Adapter file or h94/IP-Adapter variant (e.g. ip-adapter-plus_sd15); toy-sd: ip-adapter-plus_toy-sd (shipped)")
    adapters.add_argument("--image-encoder", help="CLIP vision tower folder for an --ip-adapter file (default: its h94/IP-Adapter tower)")
    adapters.add_argument("--omini", help="FLUX: OminiControl subject LoRA file (omini/subject_512.safetensors); toy-flux: weights/toy-flux-omini/subject_toy-flux.safetensors (shipped)")
    adapters.add_argument("--aligngen", type=Path, metavar="FILE",
                          help="FLUX: an AlignGen file of scripts/train_aligngen.py; each --image with its --concept word (two subjects: each twice)")
    adapters.add_argument("--redux", help=f"with --aligngen: the Redux projector (file, folder or hub id; default {REDUX_HUB_ID})")
    adapters.add_argument("--siglip", help=f"with --aligngen: the SigLIP tower Redux reads (folder, file or hub id; default {SIGLIP_HUB_ID})")
    adapters.add_argument("--image", action="append", default=[], type=Path,
                          help="reference image, repeatable, one per --concept; without an adapter, the image to start from (image to image)")
    adapters.add_argument("--concept", action="append", default=[],
                          help="the prompt's words for the reference's subject (--aligngen: its concept word, e.g. guitar); repeatable")
    adapters.add_argument("--ip-scale", type=finite, help="IP-Adapter scale (SD) or condition scale (FLUX); default 1")
    adapters.add_argument("--warmup", type=finite, help="share of the steps without the reference (SD; default 0.2) or at condition scale 0.5 (FLUX; default 0)")
    adapters.add_argument("--no-conceptrol", action="store_true", help="the adapter alone, ungated (the baseline)")
    adapters.add_argument("--concept-layer", help="SD: the layer whose text attention gives the mask (default: SD1.5 up.1.0.0, SDXL up.0.1.3)")
    adapters.add_argument("--save-masks", type=Path, help="write each concept's mask over the steps as a PNG grid here")
    start = parser.add_argument_group("image to image and inpainting (--image without a reference adapter)")
    start.add_argument("--strength", type=fraction, help="share of the steps redrawn: 0 keeps the image, 1 redraws it all (default 0.75; with --mask 1)")
    start.add_argument("--mask", type=Path, help="inpainting: a mask image, white where the image is redrawn (grey 128 or more; a "
                       "transparent layer's painted part), where A1111 redraws")
    start.add_argument("--mask-blur", type=cli.non_negative_float, help="with --mask: blur of the mask through which the original pixels are pasted back (default A1111's 4)")
    text = parser.add_argument_group("prompts and text encoders (SD)")
    text.add_argument("--prompt-syntax", choices=("a1111", "plain"),
                      help="a1111: (word:1.3) weights and any length (the default); plain: as diffusers, 77 tokens (the default "
                           "with --lag, --ip-adapter, --prompt-2 or --negative-2)")
    text.add_argument("--embedding", action="append", default=[], type=Path, metavar="FILE",
                      help="textual-inversion embedding (A1111 or diffusers file); its word is the file name; repeatable")
    parser.add_argument("--vae", help="SD: another VAE (single file, diffusers folder or hub id), e.g. vae-ft-mse-840000-ema-pruned.safetensors")
    memory = parser.add_argument_group("memory")
    memory.add_argument("--weights-dtype", choices=sorted(WEIGHTS_DTYPES),
                        help="keep the denoiser's weights in this dtype, cast per layer to --dtype on use (minigen/storage.py)")
    memory.add_argument("--offload", choices=("model", "block"),
                        help="weights in CPU memory, copied to --device one model or one block at a time (GPUs with little memory)")
    memory.add_argument("--verbose", action="store_true", help="print the peak memory after drawing")
    speed = parser.add_argument_group("speed")
    speed.add_argument("--compile", action="store_true", help="torch.compile each repeated block (the first image waits for it; not with --offload)")
    speed.add_argument("--first-block-cache", type=cli.non_negative_float, metavar="THRESHOLD",
                       help="FLUX: skip the later blocks at steps whose first block changed less than this (e.g. 0.1); off by default")
    speed.add_argument("--deep-cache", type=cli.positive_int, metavar="N", help="SD: the whole UNet every N-th call, its shallow path between (DeepCache); off by default")
    parser.add_argument("--no-ema", action="store_true", help="full SD training checkpoints: the non-EMA UNet weights (default: EMA)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin files (only if you trust them)")
    parser.add_argument("--n", type=cli.positive_int, default=1, help="images of the prompt, with seeds seed, seed+1, ... (each its single run's; with --batch-size > 1 up to one level off in a few pixels: batched float sums)")
    parser.add_argument("--batch-size", type=cli.positive_int, default=1, help="images per call of the model (default 1)")
    parser.add_argument("--out", type=Path, help="output PNG (default: runs/minigen-NNNNN.png); with --n > 1, <stem>-<k>.png; "
                        "with --prompts the folder (default runs/prompts-<date>-<time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists; with --prompts redraw every image of the file whose settings differ")
    parser.add_argument("--no-memory-check", action="store_true", help="generate even if the memory estimate exceeds what is free")
    args = parser.parse_args(argv)
    args.sampler, karras = args.sampler
    args.karras_flag, args.karras = args.karras, args.karras or karras  # --karras holds for every prompt file line, a name's Karras for its own
    if args.t5_tokens is not None and args.t5_tokens > MAX_LENGTH_DEV:
        parser.error(f"--t5-tokens {args.t5_tokens}: FLUX reads at most {MAX_LENGTH_DEV} T5 tokens; give {MAX_LENGTH_DEV} or fewer")
    if args.warmup is not None and not 0 <= args.warmup < 1:
        parser.error(f"--warmup {args.warmup}: give a share of the steps, 0 or more and below 1 (at 1 the IP branch of SD would run "
                     "on no step, FLUX's condition every step at the warmup scale)")
    if args.omini and args.ip_scale is not None and args.ip_scale <= 0:
        parser.error(f"--ip-scale {args.ip_scale}: the FLUX condition scale enters the attention as its log, so it must be > 0; leave out --omini to draw without the reference")
    if args.deep_cache == 1:
        parser.error("--deep-cache 1 runs the whole UNet at every call, so nothing is cached: give 2 or more, or leave it out")
    if args.first_block_cache == 0:
        parser.error("--first-block-cache 0 skips no step (no change is below 0): give a threshold above 0, e.g. 0.1, or leave it out")
    if args.eta is not None and args.sampler not in ETA_SAMPLERS:
        parser.error(f"--eta: the {args.sampler} sampler takes no eta; only {', '.join(ETA_SAMPLERS)} do")
    for flag, value, needs, given in (("--lag-quantile", args.lag_quantile, "--lag", args.lag), ("--mask-blur", args.mask_blur, "--mask", args.mask),
                                      ("--concept-layer", args.concept_layer, "the gating it chooses for (drop --no-conceptrol)", not args.no_conceptrol)):
        if value is not None and not given:
            parser.error(f"{flag} applies with {needs}; drop it or give that too")
    if args.n > MAX_IMAGES:
        parser.error(f"--n {args.n}: at most {MAX_IMAGES} images a call; use a prompt file for more")
    args.lag_quantile = 0.5 if args.lag_quantile is None else args.lag_quantile
    args.mask_blur = 4 if args.mask_blur is None else args.mask_blur
    if args.seed is not None and args.prompt is not None:
        cli.check_seeds(parser, args.seed, args.n, "--n")
    return args


def check_device(name: str) -> None:
    """Refuse a device this machine does not have before anything is loaded."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device {name}: not a device name ({error}); use cpu, cuda, cuda:1 or mps") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: minigen draws on cpu, cuda or mps")


def memory_limit(args):
    """max_memory for generate: None checks against the free memory, inf (--no-memory-check) skips the check."""
    return float("inf") if args.no_memory_check else None


def weights_source(path, args):
    """A LoRA file (--lora, --omini) as read_lora and read_flux_lora take it: its path (a .safetensors file also gives its
    metadata, the scale of a diffusers LoRA), or with --allow-pickle a pickled file's tensors."""
    return read_state_dict(path, allow_pickle=True) if args.allow_pickle and not is_safetensors(Path(path)) else path


def check_input_files(args) -> None:
    """Every input file a flag names is there and is a file, and none is a pickle without --allow-pickle: said before the
    model loads (minutes for SDXL and FLUX), not after. --vae (also a diffusers folder or a hub id) and --ip-adapter (also a
    variant name) are checked where they name a file: an existing path, or a name with a file's suffix."""
    files = [("--lora", path) for path, _ in args.lora] + [("--residuals", path) for path, _ in args.residuals]
    files += [("--embedding", path) for path in args.embedding] + [("--omini", args.omini)] * bool(args.omini)
    named = [("--vae", args.vae)] * (args.vae is not None and not Path(args.vae).is_dir())  # a diffusers folder is read as one
    named += [("--ip-adapter", args.ip_adapter)] * bool(args.ip_adapter)
    files += [(flag, value) for flag, value in named if Path(value).exists() or Path(value).suffix.lower() in FILE_SUFFIXES]
    for flag, path in files:
        try:
            checked_residuals_file(path) if flag == "--residuals" else checked_input(path, allow_pickle=args.allow_pickle)
        except (OSError, ValueError) as error:
            sys.exit(f"{flag}: {error}")


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    check_device(args.device)
    if args.offload and args.compile:
        sys.exit(f"--offload {args.offload} and --compile: {OFFLOAD_AND_COMPILE}")
    if args.offload and torch.device(args.device).type == "cpu":
        sys.exit(f"--offload {args.offload} copies weights from CPU memory to a GPU one part at a time; with --device cpu "
                 "they are in CPU memory already and it would only copy them: drop --offload (--weights-dtype saves memory)")
    if (args.redux or args.siglip) and not args.aligngen:
        sys.exit("--redux and --siglip give AlignGen the references' Redux tokens; they go with --aligngen")
    if args.prompts is not None:
        return sample_prompts(args)
    if args.batch_size > args.n:
        sys.exit(f"--batch-size {args.batch_size} with --n {args.n}: a call draws at most the --n images asked for; "
                 f"give --n {args.batch_size} for {args.batch_size} images, or drop --batch-size")
    if args.n > 1 and adapter_flags(args):
        sys.exit("--n > 1 with a reference image: run sample.py once per seed, or batch Conceptrol in code")
    if distributed.torchrun_ranks(os.environ) is not None:
        sys.exit("under torchrun, draw a prompt file with --prompts FILE (each rank draws its share); one --prompt is one process's work")
    outs = output_paths(args)
    for out in outs:  # before the model loads: a path that cannot be written fails now, not after generating
        check_output_path(out, overwrite=args.overwrite, flag="--overwrite")
    if args.save_masks is not None:
        check_output_path(args.save_masks, overwrite=args.overwrite, flag="--overwrite")
        if Path(args.save_masks).resolve() in {Path(out).resolve() for out in outs}:
            sys.exit(f"--save-masks {args.save_masks} is also where an image goes: give the masks a path of their own")
    seed = args.seed if args.seed is not None else secrets.randbelow(MAX_SEED + 2 - args.n)  # its --n images' seeds stay in range
    if args.seed is None:
        print(f"seed: {seed}")

    start_image(args)  # a start image or mask that cannot be read, or a prompt syntax the second prompts cannot be read in, fails now
    prompt_syntax(args)
    if args.aligngen:
        aligngen_references(args)  # its references and concept words too
    if args.ip_adapter and args.omini:  # said before their files are checked
        sys.exit("--ip-adapter and --omini: SD models take --ip-adapter, FLUX models --omini; give one")
    check_input_files(args)
    pipe = load_model(args, args.device)
    setup = (prepare_flux if isinstance(pipe, FluxPipeline) else prepare_sd)(pipe, args)
    draw, settings = setup(args)
    saved = []
    for start in range(0, args.n, args.batch_size):  # image k has seed + k, whatever the batch it is drawn in
        images = draw(seed + start, min(args.batch_size, args.n - start))
        for k, image in enumerate(to_pil(images), start=start):
            info = png_settings(pipe, args, settings, seed + k, (images.shape[-1], images.shape[-2]))
            saved.append(save_png(image, outs[k] if outs else next_free_path("runs"), info, overwrite=args.overwrite))
            print(f"saved {saved[-1]}")
    if args.verbose:
        print(peak_memory_line(args.device))
    return saved


def load_model(args, device):
    """The --model pipeline on `device`, with its --vae and --embedding files loaded and its --lora files merged.

    --weights-dtype: the denoiser's weights are read from the file into it, so the model never exists whole in
    --dtype; but --lora files merge into the --dtype weights (fp8 weights take no merge), so with them the model
    is read in --dtype on the CPU, merged, stored, and only then moved to `device`."""
    weights = WEIGHTS_DTYPES.get(args.weights_dtype)
    merge_first = weights is not None and bool(args.lora)
    pipe = load_pipeline(
        args.model, dtype=DTYPES.get(args.dtype), device="cpu" if args.offload or merge_first else device, allow_pickle=args.allow_pickle,
        ae=args.ae, text_encoders=args.text_encoders, ema=not args.no_ema, vae=args.vae, weights_dtype=None if merge_first else weights,
    )
    merge_loras(pipe, args)
    if merge_first:
        denoiser = pipe.transformer if isinstance(pipe, FluxPipeline) else pipe.unet
        store_weights(denoiser, weights, compute_dtype(denoiser))
        if not args.offload:
            for model in components(pipe).values():
                model.to(device)
    if args.offload:
        offload(pipe, args.offload, device)
    if args.compile:
        compile_pipeline(pipe)
    if args.embedding and isinstance(pipe, FluxPipeline):
        sys.exit("--embedding: textual-inversion embeddings are for SD models' CLIP encoders")
    for path in args.embedding:
        word = load_textual_inversion(pipe.text_encoders, pipe.tokenizers, path, allow_pickle=args.allow_pickle)
        print(f"embedding {path.name}: write {word!r} in the prompt")
    return pipe


def merge_loras(pipe, args) -> None:
    """Each --lora merged into the model's weights (SD: the UNet and text encoders; FLUX: the transformer)."""
    for path, scale in args.lora:
        if isinstance(pipe, FluxPipeline):
            merge(pipe.transformer, read_flux_lora(weights_source(path, args), pipe.transformer, scale=scale))
            continue
        encoders = {f"te{i + 1}": encoder for i, encoder in enumerate(pipe.text_encoders)}
        lora = read_lora(weights_source(path, args), unet=pipe.unet, text_encoders=encoders, scale=scale)
        merge(pipe.unet, lora.unet)
        for name, deltas in lora.text.items():
            merge(encoders[name], deltas)


def png_settings(pipe, options, settings, seed, size) -> dict:
    """What an image's PNG records: the sampler's settings, the prompt, the seed, the size (width,
    height), the model (a file's name without suffix, or the toy model's name, and the file's A1111 hash;
    a hub id alone), the non-EMA weights if chosen, its VAE (--vae, or FLUX's --ae), its dtype, and the
    hashes of the other files it read."""
    weights = pipe.transformer if isinstance(pipe, FluxPipeline) else pipe.unet
    dtype = next(name for name, d in DTYPES.items() if d == compute_dtype(weights))
    if options.weights_dtype:
        dtype += f", weights {options.weights_dtype}"
    model = Path(options.model)
    if options.model in TOY_MODELS:  # the shipped file: toy-sd's, toy-flux's transformer
        identity = {"model_hash": model_hash(toy_files(options.model)["source"]), "model": options.model}
    else:
        identity = {"model_hash": model_hash(model), "model": model.stem} if model.is_file() else {"model": str(options.model)}
    vae = {"vae": Path(options.vae or options.ae).stem} if options.vae or options.ae else {}
    ema = {"ema": "off"} if options.no_ema else {}
    return {**settings, "prompt": options.prompt, "seed": seed, "size": f"{size[0]}x{size[1]}", **identity, **ema, **vae, "dtype": dtype,
            **input_hashes(options)}


def input_hashes(options) -> dict:
    """A1111's hash of each local file the image reads besides the model (whose hash is model_hash), by kind
    and name as A1111's `Hashes` ({"lora:style.safetensors": "7c6bad76eb", ...}): the settings name files,
    and a --prompts run resumed with new contents under an old name must not keep the old images.
    Hub ids, folders and the shipped adapters' names are told apart by the settings alone."""
    given = {"vae": [options.vae, options.ae], "lora": [path for path, _ in options.lora], "residuals": [path for path, _ in options.residuals],
             "embed": options.embedding, "adapter": [options.ip_adapter, options.omini, options.aligngen, options.redux, options.siglip],
             "image": options.image, "mask": [options.mask]}  # fmt: skip
    hashes = {}
    for kind, paths in given.items():
        for path in (Path(p) for p in paths if p is not None and Path(p).is_file()):
            name = f"{kind}:{path.name}"  # two files of one name (from two run folders) keep a hash each: name, name#2, ...
            same = sum(key.partition("#")[0] == name for key in hashes)
            hashes[name + (f"#{same + 1}" if same else "")] = model_hash(path)
    return {"hashes": json.dumps(hashes)} if hashes else {}


class Start:
    """--image (without an adapter) and --mask: the image to start from and the inpainting mask, as read."""

    def __init__(self, image: Image.Image, mask: Image.Image | None):
        self.image, self.mask = image, mask

    def inputs(self, options, factor: int) -> tuple[dict, Image.Image, Image.Image | None]:
        """generate's image=, mask= and strength=, at --width/--height (default: the image's size
        rounded down to a multiple of the model's `factor`), and the resized image and mask."""
        width = options.width or self.image.width // factor * factor
        height = options.height or self.image.height // factor * factor
        if min(width, height) < factor:
            sys.exit(f"--image is {self.image.width}x{self.image.height}, smaller than the model's factor {factor}; give a larger image")
        image = self.image.resize((width, height), Image.LANCZOS) if self.image.size != (width, height) else self.image
        mask = None if self.mask is None else self.mask.resize((width, height), Image.NEAREST)
        given = {"image": from_pil(image), "strength": options.strength, "width": width, "height": height}
        if mask is not None:
            given["mask"] = from_pil(mask.convert("RGB"))[:, :1]
        return given, image, mask

    def paste(self, images, image: Image.Image, mask: Image.Image | None, blur: float):
        """With a mask, the original pixels pasted back outside it (A1111's overlay)."""
        if mask is None:
            return images
        return torch.cat([from_pil(paste_outside(generated, image, mask, blur)) for generated in to_pil(images)])


def start_image(args) -> Start | None:
    """The --image to start from when no reference adapter is given (else None), with its --mask; refused
    when it cannot be read or is combined with what it does not go with."""
    adapter = adapter_flags(args)
    flags = [flag for flag, value in (("--strength", args.strength is not None), ("--mask", args.mask)) if value]
    if adapter:
        if flags:
            sys.exit(f"{', '.join(flags)}: image to image with a reference adapter is not in sample.py; compose them in code")
        return None
    if not args.image:
        if flags:
            sys.exit(f"{' and '.join(flags)} {'need' if len(flags) > 1 else 'needs'} --image, the image to start from")
        return None
    if len(args.image) > 1:
        sys.exit(f"{len(args.image)} --image without a reference adapter: give one image to start from")
    image, mask = read_image(args.image[0], "--image"), None if args.mask is None else read_mask(args.mask, "--mask")
    return Start(image, mask)


def output_paths(args) -> list[Path]:
    """The --out file of each image: --out itself for one image, <stem>-<k>.png for --n > 1; [] without --out."""
    if args.out is None:
        return []
    if args.out.suffix.lower() != ".png":  # named as typed, not as the <stem>-<k> it would become
        example = args.out / "image.png" if args.out.is_dir() or not args.out.name else args.out.with_suffix(".png")
        many = f" (with --n {args.n}: {example.stem}-0.png, {example.stem}-1.png, ...)" if args.n > 1 else ""
        problem = "is a folder; give a file path inside it" if args.out.is_dir() else "give a .png file"
        sys.exit(f"--out {args.out}: {problem}, e.g. {example}{many}; a folder of images is --prompts' --out")
    if args.n == 1:
        return [args.out]
    return [args.out.with_name(f"{args.out.stem}-{k}{args.out.suffix}") for k in range(args.n)]


def prepare_sd(pipe, args):
    """Load the SD model's residuals and set up its method, once; returns
    setup(options) -> (draw(seed, count, progress=True) -> images, settings), where options is args
    or a prompt file line's copy of it (`line_options`)."""
    steps, _, _ = check_sd(pipe, args)
    method = ip_adapter_method(pipe, args, steps)
    recorder = MaskRecorder(method) if method is not None else None
    residuals = load_residuals(pipe, args)
    start = start_image(args)

    def setup(options):
        steps, cfg, sizes = check_sd(pipe, options)
        syntax = prompt_syntax(options)
        controls = combine(residual_controls(pipe, options, residuals, syntax), None if recorder is None else recorder.controls)
        given, image, mask = ({"width": options.width, "height": options.height}, None, None) if start is None else \
            start.inputs(options, pipe.vae.config.downsample_factor)  # fmt: skip

        def draw(seed, count, progress=True):
            images = pipe.generate(
                [options.prompt] * count, options.negative, prompt_2=[options.prompt_2] * count if options.prompt_2 else None,
                negative_2=options.negative_2, size_conditioning=sizes, steps=steps, timesteps=options.timesteps, cfg=cfg,
                cfg_rescale=options.cfg_rescale, sampler=options.sampler, karras=options.karras, seed=seed, max_memory=memory_limit(options),
                controls=controls, clip_skip=options.clip_skip - 1, prompt_syntax=syntax, progress=progress, deep_cache=options.deep_cache,
                **given, **({} if options.eta is None else {"sampler_options": {"eta": options.eta}}),
            )
            if options.save_masks:
                recorder.save(options.save_masks, images.shape[-2:], 8, options.overwrite)
            return images if start is None else start.paste(images, image, mask, options.mask_blur)

        return draw, sd_settings(options, steps, cfg, syntax, start)

    return setup


def sd_settings(options, steps: int, cfg: float, syntax: str, start) -> dict:
    """What the PNG records of an SD image's settings (None: left out)."""
    return {
        "negative": options.negative,
        "prompt_2": options.prompt_2,
        "negative_2": options.negative_2,
        "original_size": None if options.original_size is None else "{1}x{0}".format(*options.original_size),
        "crop_top_left": None if options.crop_top_left is None else "{},{}".format(*options.crop_top_left),
        "target_size": None if options.target_size is None else "{1}x{0}".format(*options.target_size),
        "steps": steps,
        "timesteps": ",".join(map(str, options.timesteps)) if options.timesteps else None,
        "sampler": options.sampler + (" karras" if options.karras else ""),
        "eta": options.eta,
        "clip_skip": options.clip_skip if options.clip_skip != 1 else None,
        "cfg_scale": cfg,
        "cfg_rescale": options.cfg_rescale or None,
        "lora": lora_names(options),
        "residuals": ", ".join(f"{Path(p).name}:{s}" for p, s in options.residuals) or None,
        "lag": f"quantile {options.lag_quantile}" if options.lag else None,
        "prompt_syntax": None if syntax == "a1111" else syntax,
        "embeddings": ", ".join(path.name for path in options.embedding) or None,
        "deep_cache": options.deep_cache,
        **start_settings(start, options),
        **reference_settings(options),
    }


def prompt_syntax(options) -> str:
    """--prompt-syntax, by default a1111. --lag and --ip-adapter find their words in either syntax and default
    to plain, as they did when they read no other (so that a command line from before draws the same image);
    SDXL's second prompts are read plain only, as diffusers reads them."""
    seconds = [flag for flag, on in (("--prompt-2", options.prompt_2), ("--negative-2", options.negative_2)) if on]
    if seconds and options.prompt_syntax == "a1111":
        sys.exit(f"{', '.join(seconds)} read the prompt in the plain syntax; drop --prompt-syntax a1111")
    return options.prompt_syntax or ("plain" if seconds or options.lag or options.ip_adapter else "a1111")


def start_settings(start, options) -> dict:
    """What the PNG records of an image to image or inpainting start (A1111's words: Denoising strength, Mask blur)."""
    if start is None:
        return {}
    strength = options.strength if options.strength is not None else (1.0 if start.mask is not None else 0.75)
    return {"strength": strength, **({"mask_blur": options.mask_blur} if start.mask is not None else {})}


def check_sd(pipe, options):
    """The steps, cfg and size conditioning of an SD image, checked against the model and the rest of its settings."""
    if options.aligngen:
        sys.exit(f"--aligngen: AlignGen runs on FLUX, and {options.model} is an SD model; give a FLUX model "
                 "(--model flux-dev, the one its file was trained for)")
    if options.first_block_cache is not None:
        sys.exit("--first-block-cache is FLUX's; SD models take --deep-cache N")
    if options.guidance is not None:
        sys.exit("--guidance is FLUX dev's distilled guidance; SD models take --cfg")
    if options.t5_tokens is not None:
        sys.exit("--t5-tokens is FLUX's T5 length; SD models read 77 CLIP tokens (longer prompts in chunks of 75)")
    steps, cfg = options.steps or 25, 7.5 if options.cfg is None else options.cfg
    if options.timesteps:
        if options.steps is not None and options.steps != len(options.timesteps):
            sys.exit(f"--timesteps lists {len(options.timesteps)} steps but --steps says {options.steps}; drop --steps")
        if options.karras:
            sys.exit("--timesteps is a schedule of its own; drop --karras")
        steps = len(options.timesteps)
    if options.negative and cfg == 1.0:
        sys.exit("--negative acts through classifier-free guidance, which --cfg 1 turns off; use --cfg > 1 or drop --negative")
    if not 0 <= options.cfg_rescale <= 1:
        sys.exit(f"--cfg-rescale {options.cfg_rescale} is not between 0 and 1 (0: off; 0.7 in its paper)")
    if options.cfg_rescale and cfg == 1.0:
        sys.exit("--cfg-rescale acts on classifier-free guidance, which --cfg 1 turns off; use --cfg > 1 or drop --cfg-rescale")
    layers = min(encoder.config.num_hidden_layers for encoder in pipe.text_encoders)
    if options.clip_skip > layers:
        sys.exit(f"--clip-skip {options.clip_skip}: this model's text encoder has {layers} layers, so --clip-skip is 1 to {layers}")
    if options.clip_skip != 1 and pipe.is_sdxl:  # an A1111 PNG's "Clip skip: 2" would replay as another image here
        sys.exit(f"--clip-skip {options.clip_skip}: A1111's Clip skip, which A1111 leaves out on SDXL (SDXL reads its encoders' penultimate "
                 "layer already); to skip further layers of both encoders, as diffusers' clip_skip does, call generate(clip_skip=N)")
    if (options.prompt_2 or options.negative_2) and not pipe.is_sdxl:
        sys.exit("--prompt-2 and --negative-2 are for SDXL's second text encoder; this SD1.x/SD2.x model has one")
    sizes = SizeConditioning(options.original_size, options.crop_top_left or (0, 0), options.target_size)
    if sizes != SizeConditioning() and not pipe.is_sdxl:
        sys.exit("--original-size, --crop-top-left and --target-size are SDXL's micro-conditioning; this SD1.x/SD2.x model reads no sizes")
    if options.timesteps:
        try:
            pipe.schedule.sigmas_at(options.timesteps)
        except ValueError as error:
            sys.exit(f"--timesteps: {error}")
    return steps, cfg, sizes


def references(args, adapter_flag):
    """The (image, concept phrase) pairs of --image/--concept, checked; [] without an adapter."""
    given = [flag for flag, value in (
        ("--concept", args.concept), ("--image-encoder", args.image_encoder),
        ("--ip-scale", args.ip_scale is not None), ("--warmup", args.warmup is not None), ("--no-conceptrol", args.no_conceptrol),
        ("--concept-layer", args.concept_layer), ("--save-masks", args.save_masks),
    ) if value]  # fmt: skip
    if not (args.ip_adapter or args.omini):
        if given:
            sys.exit(f"{', '.join(given)}: these go with --ip-adapter (SD), --omini or --aligngen (FLUX)")
        return []
    if args.omini and (args.image_encoder or args.concept_layer):
        sys.exit("--image-encoder and --concept-layer are for --ip-adapter (SD); FLUX's reference needs neither")
    if args.save_masks and args.no_conceptrol:
        sys.exit("--save-masks writes Conceptrol's concept masks; the adapter alone (--no-conceptrol) makes none")
    if args.concept and args.no_conceptrol:
        sys.exit("--concept names the words whose mask Conceptrol gates the reference by; the adapter alone (--no-conceptrol) "
                 "reads none: drop one of the two")
    if args.image and not args.concept and not args.no_conceptrol:
        sys.exit("give each --image the prompt's words for its subject (--concept 'the book'), or --no-conceptrol for the plain adapter")
    return read_references(args, adapter_flag)


def read_references(args, adapter_flag):
    """The (image, concept phrase or None) pairs of --image/--concept, in order: at least one image, as
    many concepts as images (or none), each image read as RGB."""
    if not args.image:
        sys.exit(f"{adapter_flag} needs at least one --image")
    if args.concept and len(args.concept) != len(args.image):
        sys.exit(f"{len(args.image)} --image but {len(args.concept)} --concept: give one concept per image, in the same order")
    return [(read_image(path, "--image"), phrase) for path, phrase in zip(args.image, args.concept or [None] * len(args.image))]


def adapter_flags(args) -> list[str]:
    """The reference adapters given: --ip-adapter, --omini, --aligngen."""
    return [flag for flag, value in (("--ip-adapter", args.ip_adapter), ("--omini", args.omini), ("--aligngen", args.aligngen)) if value]


def aligngen_references(args):
    """--aligngen's (image, concept word) pairs, checked before the model loads: the only adapter, none of
    Conceptrol's options, the file there, each subject's word in the prompt, every image readable. Two
    subjects are the paper's tested case (three or more confuse their attributes, its Sec. 4.2)."""
    if others := [flag for flag in adapter_flags(args) if flag != "--aligngen"]:
        sys.exit(f"--aligngen and {', '.join(others)} are two reference adapters; give one (AlignGen brings its own reference tokens and LoRA)")
    conceptrol = [flag for flag, value in (
        ("--image-encoder", args.image_encoder), ("--ip-scale", args.ip_scale is not None), ("--warmup", args.warmup is not None),
        ("--no-conceptrol", args.no_conceptrol), ("--concept-layer", args.concept_layer), ("--save-masks", args.save_masks),
    ) if value]  # fmt: skip
    if conceptrol:
        sys.exit(f"{', '.join(conceptrol)}: Conceptrol's options; --aligngen takes none of them")
    if not args.aligngen.is_file():
        sys.exit(f"--aligngen {args.aligngen}: no such file; give the .safetensors that scripts/train_aligngen.py wrote")
    if args.image and not args.concept:
        sys.exit("--aligngen: give each --image the concept word that names its subject in the prompt, e.g. --image guitar.png --concept guitar")
    pairs = read_references(args, "--aligngen")
    insert_placeholders(args.prompt, [word for _, word in pairs])  # a ValueError if a word is not in the prompt
    return pairs


def aligngen_method(pipe, args):
    """--aligngen: the AlignGen file on this FLUX model, the references' Redux tokens, and the inputs
    `generate` takes (the prompt's T5 states with each S*', the reference groups, the selective mask),
    with the settings the file was trained with."""
    pairs = aligngen_references(args)
    aligngen = load_aligngen(args.aligngen, pipe.transformer)  # refuses a file of another base model; runs as trained
    width = aligngen.config.dim
    if args.redux is None and width != ReduxConfig().txt_dim:
        sys.exit(f"--aligngen {args.aligngen.name} reads {width}-wide T5 states, and {REDUX_HUB_ID}'s tokens are "
                 f"{ReduxConfig().txt_dim} wide; give --redux and --siglip whose tokens are {width} wide (no Redux exists for the toy models)")
    device, dtype = compute_device(pipe.transformer), compute_dtype(pipe.transformer)
    siglip, projector = load_redux(args.redux or REDUX_HUB_ID, args.siglip or SIGLIP_HUB_ID, dtype=dtype, device=device)
    if projector.config.txt_dim != width:
        sys.exit(f"--redux {args.redux or REDUX_HUB_ID}: its tokens are {projector.config.txt_dim} wide, but the AlignGen file "
                 f"reads {width}-wide T5 states; give the Redux projector of this base model")
    references = [from_pil(image) for image, _ in pairs]
    seen = [centre_square(r) for r in references] if aligngen.settings.reference_size is not None else references  # as trained
    with torch.no_grad():
        redux = [redux_tokens(siglip, projector, preprocess_siglip(image, size=siglip.config.image_size)) for image in seen]
    del siglip, projector  # only the tokens are needed from here on
    return prepare(pipe, aligngen, args.prompt, [word for _, word in pairs], references, redux)


def ip_adapter_method(pipe, args, steps):
    """--ip-adapter: Conceptrol over IP-Adapter (or, with --no-conceptrol, the adapter alone)."""
    if args.omini:
        sys.exit("--omini is an OminiControl LoRA for FLUX; SD models take --ip-adapter")
    pairs = references(args, "--ip-adapter")
    if not pairs:
        return None
    adapter, encoder = load_ip_adapter(args.ip_adapter, pipe.unet, image_encoder=args.image_encoder, allow_pickle=args.allow_pickle)
    concepts = sd_concepts(pipe, adapter, encoder, args.prompt, pairs, prompt_syntax=prompt_syntax(args), prompt_2=args.prompt_2 or None)
    return ConceptrolSD(
        adapter.projections(), concepts, steps,
        scale=1.0 if args.ip_scale is None else args.ip_scale, warmup=0.2 if args.warmup is None else args.warmup, conceptrol=not args.no_conceptrol,
        concept_layer=None if args.no_conceptrol else args.concept_layer or default_concept_layer(pipe.unet),
    )


class MaskRecorder:
    """A method's controls for each step, keeping each concept's mask as every step begins (--save-masks)."""

    def __init__(self, method):
        self.method, self.history, self.step = method, [], 0

    def controls(self, step):
        if step != self.step:  # a new step (a second-order sampler calls the model twice in one)
            self.history.append(self.method.masks())
        self.step = step
        return self.method.controls(step)

    def save(self, path, size, factor, overwrite):
        """One row per concept, one column per step, each mask scaled to [0, 1]."""
        history = self.history + [self.method.masks()]
        h, w = size[0] // factor, size[1] // factor
        rows = []
        for i in range(len(history[0])):
            row = [torch.zeros(1, 1, h, w) if masks[i] is None else masks[i][-1:].float().cpu() for masks in history]
            row = [m.reshape(1, 1, h, w) if m.dim() == 2 else m for m in row]  # FLUX: per token; SD: the concept layer's grid
            row = [F.interpolate(m / m.amax().clamp_min(1e-6), size=(64, 64 * w // h), mode="nearest") for m in row]
            rows.append(torch.cat(row, dim=-1))
        grid = torch.cat(rows, dim=-2).expand(-1, 3, -1, -1)
        print(f"saved {save_png(to_pil(grid)[0], path, {'masks': 'rows: concepts, columns: steps'}, overwrite=overwrite)}")


def lora_names(args):
    """The --lora files as one line of the image's settings."""
    return ", ".join(f"{Path(p).name}:{s}" for p, s in args.lora) or None


def load_residuals(pipe, args):
    """The --residuals files, read and checked against the UNet: [(residuals, scale), ...]."""
    if args.lag and not args.residuals:
        sys.exit("--lag applies Personalized Residuals locally; give them with --residuals file.safetensors")
    return [(Residuals.load(path, pipe.unet), scale) for path, scale in args.residuals]


def residual_controls(pipe, options, loaded, syntax: str):
    """The residuals as controls: everywhere, or with --lag only where each concept's tokens of the prompt, read in
    `syntax`, attend."""
    if not loaded:
        return None
    if not options.lag:
        return Controls(low_rank=[delta for residuals, scale in loaded for delta in residuals.low_rank(scale)])
    def tokens(residuals):  # the concept's positions, the same for each text encoder (SDXL: two)
        find = partial(concept_tokens, residuals=residuals, syntax=syntax)
        concept = f"the concept '{residuals.identifier} {residuals.macro_class}'"
        return same_for_every_encoder(pipe.tokenizers, options.prompt, options.prompt_2 or None, find, concept)

    concepts = [(residuals, tokens(residuals), scale) for residuals, scale in loaded]
    return lag_controls(concepts, quantile=options.lag_quantile)


def prepare_flux(pipe, args):
    """The FLUX twin of `prepare_sd`."""
    steps, cfg, guidance = check_flux(pipe, args)
    if args.t5_tokens is not None:
        pipe = dataclasses.replace(pipe, max_length=args.t5_tokens)  # this run's; the caller's pipeline is left as it was
    extra, recorder, aligngen = [], None, None
    if args.aligngen:
        aligngen = aligngen_method(pipe, args)
    elif pairs := references(args, "--omini"):
        omini = read_flux_lora(weights_source(args.omini, args), pipe.transformer)
        extra, concepts = flux_concepts(pipe, omini, args.prompt, pairs, width=image_size(pipe, args)[0])
        method = ConceptrolFlux(
            pipe.transformer.attention_layers(), concepts, steps, condition_scale=1.0 if args.ip_scale is None else args.ip_scale,
            warmup=args.warmup or 0.0, mode="ominicontrol" if args.no_conceptrol else "conceptrol",
        )  # fmt: skip
        if held_back_throughout(steps, method.warmup, method.end):  # the API runs it, as the official code
            sys.exit(f"--warmup {args.warmup} of {steps} steps runs every step at the warmup scale {method.warmup_scale}, so --ip-scale "
                     "would change nothing: lower --warmup, or take more --steps")
        recorder = MaskRecorder(method)

    start = start_image(args)

    def setup(options):
        steps, cfg, guidance = check_flux(pipe, options)
        given, image, mask = ({"width": options.width, "height": options.height}, None, None) if start is None else \
            start.inputs(options, pipe.patch)  # fmt: skip

        def draw(seed, count, progress=True):
            if aligngen is None:
                prompt = dict(prompt=[options.prompt] * count, extra=extra, controls=None if recorder is None else recorder.controls)
            else:  # the prompt's T5 states with S*' in place, the reference groups and the selective mask (one image: --n 1)
                prompt = aligngen.generate_kwargs()
            images = pipe.generate(
                negative=options.negative, steps=steps, guidance=guidance, true_cfg=cfg, seed=seed, max_memory=memory_limit(options),
                progress=progress, first_block_cache=options.first_block_cache, **prompt, **given,
            )
            if options.save_masks:
                recorder.save(options.save_masks, images.shape[-2:], pipe.patch, options.overwrite)
            return images if start is None else start.paste(images, image, mask, options.mask_blur)

        settings = {"negative": options.negative if cfg != 1.0 else None, "steps": steps, "sampler": "flow euler",
                    "cfg_scale": cfg, "guidance": guidance, "t5_tokens": options.t5_tokens, "lora": lora_names(options), "first_block_cache": options.first_block_cache,
                    **start_settings(start, options), **reference_settings(options)}
        return draw, settings

    return setup


def reference_settings(options) -> dict:
    """What the PNG records of a reference adapter (--ip-adapter, --omini, --aligngen): the adapter, the
    concept words and the reference images in order, and the switches given (IP scale, warmup, the
    adapter alone without Conceptrol)."""
    adapter = next(((flag, value) for flag, value in (("ip_adapter", options.ip_adapter), ("omini", options.omini),
                                                       ("aligngen", options.aligngen)) if value), None)  # fmt: skip
    if adapter is None:
        return {}
    flag, value = adapter
    settings = {flag: Path(value).name, "concepts": ", ".join(options.concept), "references": ", ".join(p.name for p in options.image)}
    if flag != "aligngen":
        settings |= {"ip_scale": options.ip_scale, "warmup": options.warmup, "conceptrol": "off" if options.no_conceptrol else None}
    return settings


def check_flux(pipe, options):
    """The steps, true CFG scale and guidance of a FLUX image, checked against the model and the rest of its settings."""
    if options.residuals or options.lag:
        sys.exit("Personalized Residuals (--residuals, --lag) sit on the UNet's proj_out layers: SD1.x and SDXL models only")
    if options.ip_adapter:
        sys.exit("--ip-adapter is for SD models; FLUX takes an OminiControl LoRA with --omini")
    if options.sampler != "euler" or options.karras or options.eta is not None:
        sys.exit("FLUX samples with the flow-matching Euler sampler; drop --sampler, --karras and --eta")
    if options.deep_cache is not None:
        sys.exit("--deep-cache is for SD's UNet; FLUX takes --first-block-cache THRESHOLD")
    if options.clip_skip != 1 or options.prompt_syntax:
        sys.exit("--clip-skip and --prompt-syntax are for SD models; FLUX reads T5 and CLIP's pooled output")
    if options.cfg_rescale:
        sys.exit("--cfg-rescale is for SD models' classifier-free guidance; FLUX's true CFG has no rescale")
    if options.timesteps:
        sys.exit("--timesteps is for SD models' discrete schedule; FLUX samples its shifted flow sigmas (--steps)")
    if options.prompt_2 or options.negative_2:
        sys.exit("--prompt-2 and --negative-2 are for SDXL's second text encoder; FLUX reads one prompt (T5 and CLIP)")
    if options.original_size or options.crop_top_left or options.target_size:
        sys.exit("--original-size, --crop-top-left and --target-size are SDXL's micro-conditioning; FLUX reads no sizes")
    if options.guidance is not None and not pipe.is_guidance_distilled:
        sys.exit("this FLUX model is not guidance-distilled (schnell-like) and takes no --guidance; use --cfg > 1 with --negative for true CFG")
    cfg = pipe.default_cfg if options.cfg is None else options.cfg
    if options.negative and cfg == 1.0:
        given = "as given" if options.cfg is not None else "this model's default"
        sys.exit(f"--negative acts through true classifier-free guidance, which is off at --cfg 1 ({given}); use --cfg > 1 (e.g. 4) or drop --negative")
    steps = options.steps or pipe.default_steps
    guidance = options.guidance if options.guidance is not None else pipe.default_guidance
    return steps, cfg, guidance


# --- --prompts: many prompts, one model, any number of processes -------------------------------------


def sample_prompts(args) -> list[Path]:
    """--prompts: this process's share of the prompt file's images, drawn into the --out folder
    (the module docstring says how); returns the files this process wrote."""
    check_prompts_arguments(args)
    jobs = read_prompt_file(args.prompts, seed=args.seed, n=args.n)
    options = {job.line: line_options(args, job) for job in jobs}  # each line's settings: args with the line's own
    check_input_files(args)
    with distributed.process_group(args.device) as (ranks, device):
        pipe = load_model(args, device)
        setup = (prepare_flux if isinstance(pipe, FluxPipeline) else prepare_sd)(pipe, args)
        check_line_size(pipe, args, "the command line")  # its own size first: a bad flag is not the file's fault
        setups = {job.line: set_up_line(pipe, setup, options[job.line], job.where)  # every line, before the first image is drawn
                  for job in {job.line: job for job in jobs}.values()}  # fmt: skip
        folder = distributed.broadcast(output_folder(args, jobs) if ranks.rank == 0 else None)  # made once all is checked

        manifest = folder / ("manifest.jsonl" if ranks.world_size == 1 else f"manifest-rank{ranks.rank}.jsonl")
        listed = manifest_entries(folder)
        by_line = {line: png_settings(pipe, options[line], setups[line][1], None, image_size(pipe, options[line])) for line in options}
        infos = {job.name: {**by_line[job.line], "seed": job.seed} for job in jobs}  # a line's settings, once; each image its seed
        kept = {job.name for job in jobs if finished(folder / job.name, infos[job.name], args.overwrite)}  # every rank checks every file:
        mine = ranks.share(jobs)  # a folder's problem stops all ranks alike, before any draws; round-robin over the images,
        todo = [job for job in mine if job.name not in kept]  # so the files do not depend on the number of ranks
        for job in mine:
            if job.name in kept and listing(entry := manifest_entry(job, job.name, infos[job.name])) not in listed:  # drawn by a run
                append_line(manifest, json.dumps(entry))  # killed before it was listed
        skipped = len(mine) - len(todo)

        written = []
        progress = tqdm(todo, desc="images" if ranks.world_size == 1 else f"images of rank 0 (of {ranks.world_size})",
                        unit="image", disable=ranks.rank != 0)  # fmt: skip
        for job in progress:
            info = infos[job.name]
            draw, _ = setups[job.line]
            try:
                images = draw(job.seed, 1, progress=False)
            except ValueError as error:  # what only drawing finds (a non-finite step, say) names its line too
                raise ValueError(f"{job.where}: {error}") from None
            try:
                path = save_png(to_pil(images)[0], folder / job.name, info, overwrite=args.overwrite)
            except FileExistsError:  # another run into this folder drew it meanwhile
                if not finished(folder / job.name, info, False):
                    raise
                skipped += 1
                continue
            if listing(entry := manifest_entry(job, path.name, info)) not in listed:  # listed already if it was drawn, then deleted
                append_line(manifest, json.dumps(entry))
            written.append(path)
        drawn, kept = distributed.total([len(written), skipped], device)
        if ranks.rank == 0:
            print(f"{folder}: wrote {drawn} images, kept {kept} that were already there")
    return written


def check_prompts_arguments(args) -> None:
    """What --prompts does not combine with, and an --out that cannot be its folder: refused before any work."""
    references = adapter_flags(args) + (["--image"] if args.image else [])
    if references:
        sys.exit(f"--prompts with {', '.join(references)}: prompt files take no reference images yet; run sample.py --prompt once per prompt")
    if args.batch_size != 1:
        sys.exit("--prompts draws one image per model call; drop --batch-size")
    if args.out is None:
        return
    if args.out.suffix.lower() == ".png":
        sys.exit(f"--out {args.out}: with --prompts, --out is the folder the images go into; give a folder, e.g. runs/{args.prompts.stem}")
    check_writable_folder(args.out, "--out")


def line_options(args, job: PromptJob) -> argparse.Namespace:
    """args with a prompt file line's prompt and settings in place of the command line's."""
    settings = dict(job.settings)
    for key in ("cfg", "cfg_rescale", "guidance"):  # 7 and 7.0 are the same setting, and read the same in the PNG
        if key in settings:
            settings[key] = float(settings[key])
    if "sampler" in settings:
        try:
            sampler, karras = sampler_argument(settings["sampler"])
        except argparse.ArgumentTypeError as error:
            raise ValueError(f"{job.where}: \"sampler\": {error}") from None
        if args.eta is not None and sampler not in ETA_SAMPLERS:
            raise ValueError(f"{job.where}: the {sampler} sampler takes no eta (--eta); only {', '.join(ETA_SAMPLERS)} do")
        settings.update(sampler=sampler, karras=args.karras_flag or karras)  # "DPM++ 2M" under --sampler "DPM++ 2M Karras" is not Karras
    return argparse.Namespace(**{**vars(args), **settings, "prompt": job.prompt})


def set_up_line(pipe, setup, options, where: str):
    """The line's `setup(options)`, (draw, settings); a line whose settings the model cannot draw is refused as
    `<file>:<line>: <problem>`."""
    try:
        prepared = setup(options)  # the settings' own checks, and LAG's search for the concept's words in the prompt
    except SystemExit as exit:
        if isinstance(exit.code, str):
            raise ValueError(f"{where}: {exit.code}") from None
        raise
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    check_line_size(pipe, options, where)
    if not isinstance(pipe, FluxPipeline) and prompt_syntax(options) == "a1111":  # found here, not hours into the run
        try:
            for text in (options.prompt, options.negative):
                refuse_scheduling(text)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    return prepared


def check_line_size(pipe, options, where: str) -> None:
    """Refuse, as `<where>: <problem>`, an image size the model cannot draw."""
    try:
        if isinstance(pipe, FluxPipeline):
            check_size(*image_size(pipe, options), pipe.patch, "FLUX: the VAE's downsampling times 2x2 token patches")
        else:
            check_size(*image_size(pipe, options), pipe.vae.config.downsample_factor, "the VAE's latent factor")
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def image_size(pipe, options) -> tuple[int, int]:
    """(width, height) of the images drawn with `options`."""
    return options.width or pipe.default_size, options.height or pipe.default_size


def output_folder(args, jobs: list[PromptJob]) -> Path:
    """The --out folder, or a new runs/prompts-<date>-<time>, made if missing; under --overwrite its manifests
    forget this file's images (each is listed again as it is kept or drawn), not the folder's others."""
    folder = args.out or Path("runs") / f"prompts-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    folder.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        names = {job.name for job in jobs}
        for manifest in folder.glob("manifest*.jsonl"):
            entries = [entry for entry in read_json_lines(manifest) if not (isinstance(entry, dict) and entry.get("file") in names)]
            write_atomically(manifest, lambda file: file.write("".join(json.dumps(e) + "\n" for e in entries).encode()), overwrite=True)
    print(f"drawing into {folder}" + ("" if args.out else f" (to resume a killed run, give --out {folder})"))
    return folder


def finished(path: Path, info: dict, overwrite: bool) -> bool:
    """Whether `path` holds this image already: False if there is no file, True if it holds the same
    settings; a file with other settings (or not minigen's PNG) is an error, as it is never replaced unasked,
    and to be redrawn (False) under `overwrite`, which keeps one of the same settings (a killed --overwrite
    run goes on where it stopped)."""
    if not os.path.lexists(path):
        return False
    try:
        with Image.open(path) as image:
            stored = json.loads(image.info["minigen"])  # the text chunk comes before the pixels:
            image.load()  # a file cut short by a killed run has the settings but not the whole image
    except (OSError, KeyError, ValueError) as error:
        if overwrite:
            return False
        raise ValueError(f"{path} exists but is not a PNG that sample.py wrote ({error!r}); move it away, or redraw it with --overwrite") from None
    expected = json.loads(json.dumps(info))
    if stored != expected and overwrite:
        return False
    if stored != expected:
        differences = ", ".join(f"{key} {stored.get(key)!r}, not {expected.get(key)!r}" for key in sorted(set(stored) | set(expected)) if stored.get(key) != expected.get(key))
        raise ValueError(f"{path} exists with other settings ({differences}); give another --out folder, or redraw it with --overwrite")
    return True


def manifest_entry(job: PromptJob, file: str, info: dict) -> dict:
    """The manifest entry of an image: its file, the prompt's index and line, prompt, seed and all its settings."""
    return {"file": file, "index": job.index, "line": job.line, "prompt": job.prompt, "seed": job.seed, "settings": info}


def listing(entry: dict) -> str:
    """What makes a manifest entry's image listed: its file, prompt, seed and settings (not the line and index,
    which a comment added to the prompt file moves)."""
    return json.dumps({key: entry.get(key) for key in ("file", "prompt", "seed", "settings")})


def manifest_entries(folder: Path) -> set[str]:
    """The `listing`s of the images in the folder's manifests (a line cut short by a crash is left out)."""
    entries = (entry for manifest in folder.glob("manifest*.jsonl") for entry in read_json_lines(manifest))
    return {listing(entry) for entry in entries if isinstance(entry, dict)}


def run(argv=None) -> int:
    """main() for the command line: bad input ends with one line on stderr and exit code 2, no traceback
    (--debug shows it; minigen/cli.py)."""
    minigen_log = logging.getLogger("minigen")  # what the loaders chose (EMA weights, say), one line each
    minigen_log.setLevel(logging.INFO)
    handler = logging.StreamHandler()  # on this call's stderr, removed after it: no line twice on a second call
    minigen_log.addHandler(handler)
    prompts = "--prompts" in (sys.argv[1:] if argv is None else argv)  # a folder of images resumes; one --prompt draws anew
    try:
        return cli.run(main, argv, resumes=prompts)
    finally:
        minigen_log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(run())
