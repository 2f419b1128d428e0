import pathlib

import pytest
import torch

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def manifest(name: str) -> dict:
    """One of the official key manifests in ../shared/manifests (tensor names and shapes)."""
    import json

    path = SHARED / "manifests" / name
    if not path.exists():
        pytest.skip(f"{path} not found: the shared manifests sit beside the checkout")
    return json.loads(path.read_text())
