"""Small operations that every key map and config reader uses: on checkpoint key names, and the
level widths of a UNet or VAE."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from torch import Tensor


def take_prefix(state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors whose key starts with `prefix`, with the prefix removed."""
    return {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}


def count_children(keys: Iterable[str], prefix: str) -> int:
    """How many numbered children stand under `prefix`: 3 for `decoder.up.` with keys
    `decoder.up.0.*`, `decoder.up.1.*`, `decoder.up.2.*`."""
    return len({key[len(prefix) :].split(".")[0] for key in keys if key.startswith(prefix)})


def channel_multipliers(widths: Sequence[int], what: str) -> tuple[int, ...]:
    """Each level's width as a whole multiple of the first (ldm's channel_mult), or a named error: the
    models build level i with base x channel_mult[i]. `what` names the source in the message."""
    widths = [int(w) for w in widths]
    if not widths or widths[0] <= 0 or any(w % widths[0] for w in widths):
        raise ValueError(f"{what}: level widths {tuple(widths)} are not whole multiples of the first, positive width; "
                         "minigen's UNet and VAE build level i with base channels x channel_mult[i], a whole number")
    return tuple(w // widths[0] for w in widths)
