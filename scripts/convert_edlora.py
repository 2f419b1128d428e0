"""Convert an ED-LoRA concept file (Mix-of-Show, Concept Conductor) between the official .pth and minigen's .safetensors.

    python scripts/convert_edlora.py chow_dog.pth chow_dog.safetensors [--base sd1|sdxl] [--overwrite]
    python scripts/convert_edlora.py chow_dog.safetensors chow_dog.pth      # back, for the official code

The official .pth is a pickle. This script reads it with torch.load(weights_only=True), which rebuilds
only tensors and plain containers, but unpickling is still code from the file's author: convert only
files you trust. The .safetensors form keeps the same tensors, the concept words in their order, and
the base model family (sd1 / sdxl: --base, or what the file's shapes show; --base must agree with them:
a file whose shapes do not show SDXL and that has no weights for a second text encoder is not for SDXL).
A .pth keeps the tensors and the word order only: what else the .safetensors records (a base its shapes
do not show, a training's metadata) is named on stderr. See minigen/loading/edlora.py for both layouts.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from minigen import cli

from minigen.loading.edlora import EMBEDDINGS_2, RESERVED_METADATA, TEXT_2, EDLoRA, guess_base, read_edlora, save_edlora
from minigen.loading.files import PICKLE_SUFFIXES, check_output_path, checked_file, read_metadata
from minigen.loading.lora_files import FAMILY_NAMES



def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the ED-LoRA to read: an official .pth, or a minigen .safetensors")
    parser.add_argument("target", type=Path, help="where to write it: .safetensors for a .pth, .pth for a .safetensors")
    parser.add_argument("--base", choices=["sd1", "sdxl"], help="the base model family to record (.safetensors output)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing target file")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    pickled = args.source.suffix in PICKLE_SUFFIXES
    if (pickled, args.target.suffix) not in ((True, ".safetensors"), (False, ".pth")):
        sys.exit(f"convert a .pth to a .safetensors or a .safetensors to a .pth; got {args.source.name} -> {args.target.name}")
    if args.base and args.target.suffix == ".pth":
        sys.exit("--base is recorded in .safetensors metadata; a .pth has no place for it: drop --base")
    checked_file(args.source)  # a missing source or an existing target is refused before anything is read
    check_output_path(args.target, overwrite=args.overwrite, suffix=args.target.suffix, flag="--overwrite")
    if pickled:
        print(f"reading {args.source} with torch.load(weights_only=True): convert only files you trust", file=sys.stderr)
    edlora = with_base(read_edlora(args.source, allow_pickle=pickled), args.base)
    path = save_edlora(edlora, args.target, overwrite=args.overwrite)
    if path.suffix == ".pth" and (lost := left_out_of_pth(args.source, edlora)):
        print(f"note: a .pth holds the tensors and the word order only; {path} leaves out {' and '.join(lost)}", file=sys.stderr)
    print(f"{path}: {summary(edlora)}")
    return path


def with_base(edlora: EDLoRA, base: str | None) -> EDLoRA:
    """`edlora` recording `base`, refused where its shapes show another family, or (where they do not tell) no
    second text encoder for an SDXL base."""
    shown, evidence = guess_base(edlora)
    if base and shown and base != shown:
        sys.exit(f"--base {base}, but this ED-LoRA looks made for {FAMILY_NAMES[shown]} ({evidence}); drop --base or fix it")
    if base == "sdxl" and not shown:  # guess_base shows SDXL wherever there are weights for its second text encoder
        sys.exit(f"--base sdxl, but this ED-LoRA has no weights for SDXL's second text encoder ({EMBEDDINGS_2}, {TEXT_2}): "
                 "it is for a model of one text encoder (SD1.x); drop --base or give --base sd1")
    return replace(edlora, base=base or edlora.base or shown)


def left_out_of_pth(source: Path, edlora: EDLoRA) -> list[str]:
    """What a .pth of `edlora`, read from the .safetensors `source`, cannot hold: the base it records where the shapes
    do not show it (a .pth read back gets its base from them), and the rest of its metadata (a training's prompt, say)."""
    lost = []
    if edlora.base and guess_base(edlora)[0] != edlora.base:
        lost.append(f"the base {edlora.base} (its shapes do not show it: give --base {edlora.base} to convert it back)")
    if extra := sorted(set(read_metadata(source)) - set(RESERVED_METADATA)):
        lost.append(f"the metadata {', '.join(extra)}")
    return lost


def summary(edlora: EDLoRA) -> str:
    text_layers = len(edlora.text) + len(edlora.text_2)
    base = FAMILY_NAMES.get(edlora.base, "unknown base model")
    return (
        f"{len(edlora.words)} concept words ({', '.join(edlora.words)}) of {edlora.layers} layer-wise embeddings, "
        f"LoRA on {len(edlora.unet)} UNet and {text_layers} text-encoder layers; {base}"
    )


def run(argv=None) -> int:
    """main() for the command line: bad input ends with one line on stderr and exit code 2 (minigen/cli.py)."""
    return cli.run(main, argv)


if __name__ == "__main__":
    sys.exit(run())
