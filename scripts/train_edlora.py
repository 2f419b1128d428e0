"""Train an ED-LoRA concept (Mix-of-Show's embedding-decomposed LoRA), the concepts Concept Conductor composes.

    python scripts/train_edlora.py --model sd15 --images dog/*.jpg --word "<dog1>" --word "<dog2>" --init-word dog \\
        --out dog.safetensors
    python scripts/train_edlora.py --toy-concept my_star --out runs/my_star.safetensors      # toy-sd, a few minutes on a CPU

Every reference is captioned by the template with the concept words in it ("a photo of a <dog1> <dog2>").
Each word learns one input embedding per cross-attention layer of the UNet; LoRAs of rank 4 learn on
the attention of the UNet and of the CLIP text encoder. The official recipe is the default: learning
rates 1e-3 (embeddings), 1e-5 (text LoRA), 1e-4 (UNet LoRA), batch 2, offset noise 0.01, and the
embeddings stop once their mean norm reaches 0.55. Initializers: one per word, a one-token word or
"<rand-σ>"; fewer than the words initialize the last words, and the earlier ones start "<rand-0.013>"
(the official "<rand-0.013>+dog"). A toy concept defaults to the words <NAME_1> <NAME_2>, started
from random and from its shape. See minigen/methods/edlora_training.py.

Training is resumable: checkpoints go to --work (default: beside --out), and the same command
continues a stopped run. The output is minigen's .safetensors form (with the base model's
fingerprint, prompt and settings in its metadata) or the official .pth layout, and is used with

    python scripts/conduct.py --concept "a <dog1> <dog2> on the beach" dog.safetensors dog_mask.png ...
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from minigen import cli
from minigen.image import read_image, read_square
from minigen.loading.files import check_output_path, check_writable_folder
from minigen.loading.auto import load_pipeline
from minigen.loading.edlora import save_edlora
from minigen.methods.edlora_training import (
    EMB_NORM_THRESHOLD,
    LEARNING_RATES,
    NOISE_OFFSET,
    RANK,
    TRAINING,
    EDLoRATraining,
    check_pipeline,
    check_prompt,
    check_words,
    initializers,
    train_edlora,
)
from minigen.pipelines.memory import check_memory, decode_bytes, unet_call_bytes
from minigen.storage import compute_device
from minigen.toy import world
from minigen.toy.data import concept_references
from minigen.toy.scenes import MAX_REFERENCES



def threshold(text: str) -> float | None:
    """An argparse type: 'none' (never stop the embeddings), or a finite number of 0 or more (0: stop them at once)."""
    return None if text.lower() == "none" else cli.non_negative_float(text)


def parse(argv=None) -> argparse.Namespace:
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="toy-sd", help="an SD1.x preset, hub id, file or folder (default: toy-sd)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", type=Path, help="reference images of the concept")
    source.add_argument("--toy-concept", choices=[c.name for c in world.CONCEPTS], help="a toy-world personal concept")
    p.add_argument("--references", type=cli.positive_int, help="with --toy-concept: how many references, 1-64 (default 6; DreamBench has 4-6)")
    p.add_argument("--word", action="append", help="a concept word, e.g. '<dog1>'; repeat for more (official: two)")
    p.add_argument("--init-word", action="append", default=[],
                   help="a word's initializer: a one-token word ('dog') or '<rand-σ>'; repeat per word, or give the last words' only")  # fmt: skip
    p.add_argument("--template", default="a photo of a {words}", help="the caption; {words} is replaced by the concept words")
    p.add_argument("--size", type=cli.positive_int, help="train at this image size in pixels (default: the model's)")
    p.add_argument("--steps", type=cli.positive_int, default=TRAINING.steps)
    p.add_argument("--batch", type=cli.positive_int, default=TRAINING.batch)
    p.add_argument("--rank", type=cli.positive_int, default=RANK)
    p.add_argument("--lr-embeddings", type=cli.non_negative_float, default=LEARNING_RATES["embeddings"])
    p.add_argument("--lr-text", type=cli.non_negative_float, default=LEARNING_RATES["text_lora"], help="0 leaves the text encoder's LoRA at zero")
    p.add_argument("--lr-unet", type=cli.non_negative_float, default=LEARNING_RATES["unet_lora"])
    p.add_argument("--emb-norm-threshold", type=threshold, default=EMB_NORM_THRESHOLD, help="'none': never stop the embeddings")
    p.add_argument("--noise-offset", type=cli.non_negative_float, default=NOISE_OFFSET)
    p.add_argument("--seed", type=cli.draw_seed, default=TRAINING.seed)
    p.add_argument("--work", type=Path, help="folder for resumable checkpoints (default: <out>.work beside --out)")
    p.add_argument("--out", type=Path, required=True, help="the ED-LoRA to write: .safetensors (minigen's) or .pth (official)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-memory-check", action="store_true", help="train even if the memory estimate exceeds what is free")
    return p.parse_args(argv)


def concept_setup(args: argparse.Namespace) -> tuple[list[str], list[str], str]:
    """The concept words, their initializers and the training prompt, checked before anything loads."""
    if args.toy_concept:
        name = args.toy_concept
        words = args.word or [f"<{name}_1>", f"<{name}_2>"]
        given = args.init_word or [world.concept(name).shape]
    elif not args.word:
        raise ValueError("--word is required with --images: the concept words, e.g. --word '<dog1>' --word '<dog2>'")
    else:
        words, given = args.word, args.init_word
    check_words(words)
    if "{words}" not in args.template and not all(word in args.template for word in words):
        raise ValueError(
            f"--template {args.template!r} has no {{words}} (and not every concept word): write e.g. 'a photo of a {{words}}'"
        )
    try:
        prompt = args.template.format(words=" ".join(words))
    except (KeyError, IndexError, ValueError) as error:
        message = f"--template {args.template!r}: only {{words}} is filled in ({type(error).__name__}: {error}); write '{{{{' for a brace"
        raise ValueError(message) from None
    check_prompt(prompt, words)
    return words, initializers(words, given), prompt


def check_training_memory(pipe, side: int, args: argparse.Namespace) -> None:
    """Refuse, before training starts, a --batch (or --size) whose training step would not fit in memory: a step
    encodes a batch of references at once (counted as a decode of each) and keeps the UNet's forward activations
    for its backward, about twice the rows (as conduct.py counts; minigen/pipelines/memory.py), checked as one part
    (check_memory's advice for a large decode, tiles, is not for an encode). toy-sd on the CPU peaked at 0.73 to
    0.94 of this estimate (256 and 512 px, batch 1 and 4). `side`: the references' (square) size."""
    height = width = side
    factor = pipe.vae.config.downsample_factor
    unet = unet_call_bytes(pipe.unet, 2 * args.batch, height // factor, width // factor)
    encode = args.batch * decode_bytes(pipe.vae, 1, width, height)
    check_memory(unet + encode, 0, compute_device(pipe.unet.out[2]), float("inf") if args.no_memory_check else None,
                 f"ED-LoRA training with --batch {args.batch} at {width}x{height}")


def main(argv=None) -> Path:
    args = parse(argv)
    if args.out.suffix not in (".safetensors", ".pth"):
        raise ValueError(f"--out {args.out}: write an ED-LoRA as .safetensors (minigen's form) or .pth (the official layout)")
    out = check_output_path(args.out, overwrite=args.overwrite, suffix=args.out.suffix, flag="--overwrite")
    work = check_writable_folder(args.work or out.with_suffix(".work"), "--work")
    if args.size and args.toy_concept:
        raise ValueError("--size resizes --images; a --toy-concept's references are rendered at the toy world's own size")
    if args.references is not None and args.references > MAX_REFERENCES:
        raise ValueError(f"--references {args.references}: the toy world renders 1 to {MAX_REFERENCES} references of a concept")
    if args.references and args.images:
        raise ValueError("--references sets how many toy references are rendered; with --images every image given is a reference")
    words, inits, prompt = concept_setup(args)
    for path in args.images or []:
        read_image(path, "reference image")  # a missing or damaged image fails before the model loads

    pipe = load_pipeline(args.model, device=args.device)
    check_pipeline(pipe)
    size = args.size or pipe.default_size
    images = concept_references(args.toy_concept, args.references or 6) if args.toy_concept else None  # the toy world's own size
    check_training_memory(pipe, size if images is None else images.shape[-1], args)  # before the images are resized to a huge --size
    if images is None:
        images = torch.stack([read_square(path, size, "reference image") for path in args.images])
    concept = EDLoRATraining(pipe, words, inits, rank=args.rank, generator=torch.Generator().manual_seed(args.seed))
    parts = ", ".join(f"{name} {sum(p.numel() for p in part.parameters()):,}" for name, part in concept.parts().items())
    print(f"{concept.parameter_count():,} trainable parameters ({parts}); {len(images)} references; prompt {prompt!r}; "
          f"initializers {dict(zip(words, inits))}")  # fmt: skip

    config = replace(TRAINING, steps=args.steps, batch=args.batch, seed=args.seed, lr=args.lr_unet)
    rates = {"embeddings": args.lr_embeddings, "text_lora": args.lr_text, "unet_lora": args.lr_unet}
    start = time.time()
    trained = train_edlora(pipe, concept, images, prompt, config, work,
                           learning_rates=rates, emb_norm_threshold=args.emb_norm_threshold, noise_offset=args.noise_offset)  # fmt: skip
    if trained.losses:
        seconds = time.time() - start
        print(f"trained {len(trained.losses)} steps in {seconds:.1f} s ({seconds / len(trained.losses):.3f} s/step); mean loss "
              f"of the first and last 10 steps {np.mean(trained.losses[:10]):.4f} -> {np.mean(trained.losses[-10:]):.4f}")  # fmt: skip
    metadata = trained.metadata | {"model": str(args.model)} if out.suffix == ".safetensors" else None
    save_edlora(trained.edlora, out, overwrite=args.overwrite, metadata=metadata)
    print(f"saved {out} (words {' '.join(words)})")
    return out


def run(argv=None) -> int:
    """main() for the command line: bad input ends with one line on stderr and exit code 2 (minigen/cli.py)."""
    return cli.run(main, argv, resumes=True)


if __name__ == "__main__":
    sys.exit(run())
