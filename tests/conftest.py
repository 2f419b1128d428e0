import json
import pathlib

import pytest
import torch

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def manifest():
    """Loader for the official key manifests in ../shared/manifests (tensor names and shapes)."""

    def load(name: str) -> dict:
        path = SHARED / "manifests" / name
        if not path.exists():
            pytest.skip(f"{path} not found: the shared folder sits beside the checkout")
        return json.loads(path.read_text())

    return load


@pytest.fixture
def shared_hf():
    """Folder of the official configs and tokenizer files (../shared/hf)."""
    path = SHARED / "hf"
    if not path.exists():
        pytest.skip(f"{path} not found: the shared folder sits beside the checkout")
    return path


@pytest.fixture
def manifest_tensors(manifest):
    """An official file's tensors as meta tensors of the right shapes: `manifest_tensors(name, prefix)`
    gives the keys under `prefix`, with the prefix stripped."""

    def load(name: str, prefix: str = "") -> dict[str, torch.Tensor]:
        return {
            key[len(prefix) :]: torch.empty(shape, device="meta")
            for key, shape in manifest(name)["tensors"].items()
            if key.startswith(prefix)
        }

    return load
