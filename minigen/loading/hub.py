"""Hugging Face hub ids -> local folders, downloading only the files a model needs.

`resolve("stabilityai/stable-diffusion-xl-base-1.0")` returns the folder of a cached snapshot of
that repository, restricted to `allow_patterns`. With the hub reachable, the snapshot is completed
(only the files the cache lacks are fetched: a cache that holds one file of a repository, from
`hf_hub_download`, is not taken for the whole); without it, the cache serves as far as it goes, so
a model downloaded once keeps working offline. Local paths pass through unchanged, which lets every
loader accept "a hub id, a folder or a file" in one argument.
"""

from __future__ import annotations

import difflib
import socket
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from minigen.loading.files import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES


class ModelFetchError(OSError):
    """A model could not be found locally nor fetched from the Hugging Face hub."""


def diffusers_patterns(components: Sequence[str], variant: str | None = None) -> list[str]:
    """allow_patterns for the given component folders of a diffusers repository.

    Configs, tokenizer files and the weights in safetensors form: the plain files
    (`model.safetensors`, `diffusion_pytorch_model-00001-of-00003.safetensors`) or, with
    `variant="fp16"`, only the variant files (`model.fp16.safetensors`, ...), so that a repo that
    ships both is not downloaded twice.
    """
    patterns = ["model_index.json"]
    for folder in components:
        patterns += [f"{folder}/*.json", f"{folder}/*.txt", f"{folder}/*.model"]  # configs, vocab, merges, spiece
        for name in ("diffusion_pytorch_model", "model"):
            if variant:
                patterns += [f"{folder}/{name}.{variant}.safetensors", f"{folder}/{name}.{variant}-*-of-*.safetensors"]
            else:
                patterns += [f"{folder}/{name}.safetensors", f"{folder}/{name}-*-of-*.safetensors"]
    return patterns


FILE_SUFFIXES = (*SAFETENSORS_SUFFIXES, *PICKLE_SUFFIXES, ".json", ".png", ".jpg")  # names no hub repository has


def _near(path: Path) -> str:
    """'; did you mean ...?' for a mistyped local path, from the names in its folder."""
    if not path.parent.is_dir():
        return ""
    close = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=3)
    return f"; did you mean {', '.join(str(path.parent / name) for name in close)}?" if close else ""


def resolve(
    source: str | Path,
    allow_patterns: Sequence[str] | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files: str = "",
) -> Path:
    """A local path for `source`: itself if it exists, else a hub snapshot of that repository id.

    allow_patterns: fnmatch patterns of the repository files to fetch (None: all of them).
    local_files: what to download and pass instead, for the error when the hub cannot be reached
    (the loaders say it per model family). An unreachable hub is found out within
    `REACH_TIMEOUT` seconds, not after the download client's retries.
    """
    path = Path(source)
    if path.exists():
        return path
    repo_id = str(source)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")) or path.suffix.lower() in FILE_SUFFIXES:
        raise FileNotFoundError(f"{source!r} is not an existing file or folder, nor a hub id like 'owner/name'{_near(path)}")

    arguments = dict(repo_id=repo_id, allow_patterns=allow_patterns, revision=revision, cache_dir=cache_dir)
    why = hub_unreachable()
    if why is None:
        try:
            return Path(snapshot_download(**arguments))  # fetches only what the cache lacks
        except (HfHubHTTPError, OSError) as error:  # gated, the hub or a proxy failing, a timeout: the cache may hold it all
            why = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    try:
        return Path(snapshot_download(**arguments, local_files_only=True))
    except LocalEntryNotFoundError as error:
        near = _near(path)  # a mistyped local path?
        raise ModelFetchError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({why}) and it is not in the local cache{near}.\n"
            + (local_files or "Download it where the hub is reachable and pass the local folder or file instead of the hub id")
            + ". For a gated or private repository, log in first with `hf auth login`."
        ) from error


REACH_TIMEOUT = 2.0  # seconds to wait for a connection to the hub before calling it unreachable


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached right now (offline mode, no route, no name), or None if it can."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=REACH_TIMEOUT).close()
    except OSError as error:
        return f"cannot connect to {endpoint.hostname}: {error}"
    return None
