"""Two small operations on checkpoint key names that every key map and config reader uses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor


def take_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors whose key starts with `prefix`, with the prefix removed."""
    return {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}


def count_children(keys: Iterable[str], prefix: str) -> int:
    """How many numbered children stand under `prefix`: 3 for `decoder.up.` with keys
    `decoder.up.0.*`, `decoder.up.1.*`, `decoder.up.2.*`."""
    return len({key[len(prefix) :].split(".")[0] for key in keys if key.startswith(prefix)})
