"""A1111's model hash (minigen/loading/hashes.py) and the A1111 PNG info order.

Reference for the hash: hashlib's sha256 of the file, first 10 hex digits (A1111's AutoV2 "Model hash"),
and the known value of an all-zero file computed independently with `sha256sum`-equivalent hashlib
over the same bytes. Reference for the order: A1111's create_infotext (Steps, Sampler, CFG scale,
Seed, Size, Model hash, Model, VAE hash, VAE, Denoising strength, Clip skip, then the extra settings)."""

import hashlib
import os

import pytest

from minigen.image import a1111_parameters
from minigen.loading.hashes import model_hash

from test_hardening import parse_a1111


def test_model_hash_is_the_first_ten_hex_digits_of_sha256_and_is_cached(tmp_path):
    path, cache = tmp_path / "model.safetensors", tmp_path / "cache" / "hashes.json"
    data = os.urandom(3 * (1 << 20) + 17)  # several read chunks and a partial one
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()[:10]
    assert model_hash(path, cache=cache) == expected
    assert expected in cache.read_text()
    os.utime(path, ns=(1, 1))  # a changed file (new mtime) is hashed again, not read from the cache
    path.write_bytes(b"other")
    os.utime(path, ns=(2, 2))
    assert model_hash(path, cache=cache) == hashlib.sha256(b"other").hexdigest()[:10]


def test_model_hash_uses_the_cache_and_survives_a_broken_one(tmp_path):
    path, cache = tmp_path / "m.ckpt", tmp_path / "hashes.json"
    path.write_bytes(b"\0" * 1000)
    cache.write_text("{not json")
    assert model_hash(path, cache=cache) == "541b3e9daa"  # sha256 of 1000 zero bytes
    stat = path.stat()
    cache.write_text(f'{{"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}": "cachedhash"}}')
    assert model_hash(path, cache=cache) == "cachedhash"
    with pytest.raises(FileNotFoundError, match="no such file to hash"):
        model_hash(tmp_path / "missing.safetensors", cache=cache)


def test_a1111_infotext_is_in_a1111s_order_and_round_trips():
    settings = {"prompt": "a cat", "negative": "blurry", "lora": "x.safetensors:1.0", "clip_skip": 2, "strength": 0.6,
                "sampler": "euler", "steps": 20, "cfg_scale": 7.0, "dtype": "fp16", "model": "v1-5", "seed": 9,
                "size": "512x512", "model_hash": "6ce0161689", "vae": "vae-ft-mse", "eta": 0.5}  # fmt: skip
    text = a1111_parameters(settings)
    keys = [part.split(":")[0].strip() for part in text.splitlines()[-1].split(", ")]
    assert keys == ["Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model", "VAE", "Denoising strength",
                    "Clip skip", "Lora", "Dtype", "Eta"]  # fmt: skip
    parsed = parse_a1111(text)
    assert parsed["Model hash"] == "6ce0161689" and parsed["Denoising strength"] == "0.6" and parsed["Negative prompt"] == "blurry"
