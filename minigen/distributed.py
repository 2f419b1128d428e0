"""Several processes sharing one list of work, as torchrun starts them.

    torchrun --nproc_per_node 4 scripts/sample.py --prompts prompts.txt --seed 1 --out runs/batch

torchrun starts one process per rank and tells each who it is in environment variables (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `process_group(device)` reads them: with them the
process joins the default process group (nccl on CUDA, gloo otherwise) and takes its device
(cuda:LOCAL_RANK on CUDA); without them it is alone, rank 0 of 1, and nothing is initialised.
`Ranks.share` deals the work out round-robin.

Threads: torch's default is one per core. torchrun sets OMP_NUM_THREADS=1 in every process it starts
(unless it is set already), so N ranks on a CPU use N threads in all; set OMP_NUM_THREADS yourself
to give each rank more. On a CPU the float sums of a convolution depend on how many threads share
it, so results are bit for bit the same across processes only when each has the same thread count.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Ranks:
    """Which of `world_size` processes this one is (`rank`), and which on its machine (`local_rank`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items, round-robin: items rank, rank + world_size, rank + 2 world_size, ..."""
        return list(items[self.rank :: self.world_size])


def torchrun_ranks(environ: Mapping[str, str]) -> Ranks | None:
    """The ranks torchrun states in `environ`, or None when it states none (a plain process)."""
    if not any(name in environ for name in TORCHRUN_VARIABLES):
        return None
    try:
        rank, world_size, local_rank = (int(environ[name]) for name in TORCHRUN_VARIABLES)
    except (KeyError, ValueError):
        stated = ", ".join(f"{name}={environ.get(name)!r}" for name in TORCHRUN_VARIABLES)
        raise ValueError(f"torchrun's environment is incomplete or not numbers ({stated}); start the script with torchrun, or unset them") from None
    if not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank} do not fit together; start the script with torchrun")
    return Ranks(rank, world_size, local_rank)


def rank_device(device: str | torch.device, ranks: Ranks) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK for "cuda", any other device as given."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"--device {device}: under torchrun each rank draws on cuda:LOCAL_RANK; give --device cuda "
                         "(CUDA_VISIBLE_DEVICES chooses the GPUs)")  # fmt: skip
    if ranks.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {ranks.local_rank} but this machine has {torch.cuda.device_count()} CUDA devices; "
                         "start at most that many processes per node (--nproc_per_node)")  # fmt: skip
    return torch.device("cuda", ranks.local_rank)


@contextmanager
def process_group(device: str | torch.device, environ: Mapping[str, str] = os.environ) -> Iterator[tuple[Ranks, torch.device]]:
    """(ranks, device) of this process; under torchrun inside the default process group, left on exit."""
    ranks = torchrun_ranks(environ)
    if ranks is None:
        yield Ranks(), torch.device(device)
        return
    device = rank_device(device, ranks)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        yield ranks, device
    finally:
        dist.destroy_process_group()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object); `value` itself in a plain process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def total(counts: Sequence[int], device: torch.device) -> list[int]:
    """The sums of `counts` over all ranks (on every rank); `counts` itself in a plain process."""
    if not dist.is_initialized():
        return list(counts)
    summed = torch.tensor(list(counts), dtype=torch.int64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()
