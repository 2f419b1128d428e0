"""The README's Python examples that run on the toy models run as written (each in a fresh namespace,
from a temporary working folder). Examples that need real checkpoints are not run here."""

import re

import pytest
import torch

from conftest import REPO

BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
TOY_BLOCKS = [block for block in BLOCKS if re.search(r'load_pipeline\("toy-(sd|flux)"\)', block)]


def test_the_readme_has_toy_examples():
    assert len(TOY_BLOCKS) >= 2  # the quick start and the sampler example


@pytest.mark.parametrize("block", TOY_BLOCKS, ids=[f"block{i}" for i in range(len(TOY_BLOCKS))])
def test_readme_toy_example_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    images = namespace["images"]
    assert images.shape[1:] == (3, 64, 64) and 0 <= images.min() and images.max() <= 1 and images.std() > 0.01
    assert torch.isfinite(images).all()
