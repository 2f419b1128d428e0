"""Shrink a training run's checkpoint to commit it at a stopping point, and resume from it elsewhere.

    python scripts/compact_checkpoint.py runs/v3/sd/denoiser.safetensors checkpoints/toy-sd-v3-denoiser.safetensors

Every training script here (train_toy.py, train_residuals.py, ...) checkpoints its run in
`<work>/<stage>.safetensors`: the weights, their EMA and Adam's moments in fp32, and the random
state. The compact copy keeps the step, the run's record and the random state, the weights and
EMA in bf16, and drops Adam's moments: a sixth of the size. To go on with the run on another
machine, copy it back to `<work>/<stage>.safetensors` and give the run's command again: it resumes at
the same step of its schedule, with the same batches to come, from the rounded weights, with fresh
Adam moments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minigen.cli import Parser, run
from minigen.trainer import compact_checkpoint


def main(argv=None) -> None:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a run's <work>/<stage>.safetensors")
    parser.add_argument("out", type=Path, help="the compact copy (an existing file is never overwritten)")
    args = parser.parse_args(argv)
    out = compact_checkpoint(args.checkpoint, args.out)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB ({args.checkpoint.stat().st_size / 2**20:.1f} MiB in full)")


if __name__ == "__main__":
    sys.exit(run(main))
