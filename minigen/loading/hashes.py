"""The model hash A1111 writes in its PNG info ("Model hash: 6ce0161689"): the first 10 hex digits of
the file's SHA-256 (what civitai calls AutoV2), so an image found later names the exact file it came from.

Hashing a checkpoint reads all of it (a few seconds per GB), so results are kept, as A1111 keeps them,
in a cache file keyed by the file's absolute path, size and modification time:

    hash = model_hash("/models/v1-5-pruned-emaonly.safetensors")     # "6ce0161689"

The cache is `$XDG_CACHE_HOME/minigen/model-hashes.json` (default ~/.cache/minigen/), or the `cache`
argument; a changed file gets a fresh hash, a cache that cannot be read or written is only skipped.

`files_digest` is a short digest of small files and folders (an adapter and its tower), for telling
whether a run used the same ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tqdm import tqdm

from minigen.loading.files import write_atomically

CHUNK = 1 << 20
DIGITS = 10  # A1111's "Model hash" (AutoV2)


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minigen" / "model-hashes.json"


def model_hash(path: str | Path, *, cache: Path | None = None, progress: bool = True) -> str:
    """A1111's hash of the file at `path`: sha256(file)[:10], read from or written to `cache`."""
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file to hash (A1111's model hash is a hash of one checkpoint file)")
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache = default_cache() if cache is None else cache
    known = read_cache(cache)
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    with open(path, "rb") as file, tqdm(total=stat.st_size, unit="B", unit_scale=True, desc=f"hashing {path.name}",
                                         disable=not progress or stat.st_size < 1 << 30, leave=False) as bar:  # fmt: skip
        while block := file.read(CHUNK):
            digest.update(block)
            bar.update(len(block))
    value = digest.hexdigest()[:DIGITS]
    try:
        known = {**read_cache(cache), key: value}  # re-read: another process may have added entries meanwhile
        write_atomically(cache, lambda f: f.write(json.dumps(known, indent=0).encode()), overwrite=True)
    except OSError:
        pass  # a read-only home: the hash is still right, only not remembered
    return value


def read_cache(cache: Path) -> dict[str, str]:
    """The cache's entries; {} when it is missing or unreadable (it is only a cache)."""
    try:
        entries = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in entries.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(entries, dict) else {}


def files_digest(*paths: Path | None) -> str:
    """A digest of the bytes of files and of the files in folders (None skipped): another adapter or
    tower at the same path is another run."""
    digest = hashlib.sha256()
    for path in filter(None, paths):
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0".encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
