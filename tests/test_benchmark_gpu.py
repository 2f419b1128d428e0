"""`scripts/benchmark.py gpu` is meant to run once on a GPU: its `--dry-run` runs every code path on tiny
models on the CPU (torch.compile with the "eager" backend), and this test checks what it reports.

Marked `slow` (11-30 s on a 2-core machine: compiling is tracing 13 graphs); `-m "not slow"`
skips it. Tolerances: the tiny fp32 UNets match to 1e-4; the bf16 FLUX to 0.1 (outputs of std ~1,
bf16's step at 1 is 0.008, and the sampling loop adds up 4 steps of rounding).
"""

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_dry_run_exercises_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, "scripts/benchmark.py", "gpu", "--dry-run", "--threads", "1", "--out", str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    printed = json.loads(run.stdout)
    assert json.loads(out.read_text()) == printed
    assert printed["dry_run"] is True and printed["device"] == "CPU (dry run)"

    sd = printed["sd15"]
    for name in ("minigen", "diffusers"):
        assert sd[name]["graphs_compiled"] > 0
        assert sd[name]["eager_it_per_s"] > 0 and sd[name]["compiled_it_per_s"] > 0 and sd[name]["compile_s"] > 0
        assert sd[name]["max_abs_diff_compiled_vs_eager"] <= 1e-4
    assert sd["minigen"]["graphs_compiled"] > sd["diffusers"]["graphs_compiled"]  # res blocks too
    assert sd["max_abs_diff_compiled_minigen_vs_diffusers"] <= 1e-4
    assert len(sd["times"]["minigen compiled"]) == 2

    flux = printed["flux"]
    assert flux["minigen"]["graphs_compiled"] == 2  # one double-block and one single-block graph
    assert flux["max_abs_diff_compiled_minigen_vs_diffusers"] <= 0.1
    cache = flux["first_block_cache"]
    assert cache["steps"] == 4
    for name in ("minigen", "minigen compiled", "diffusers"):
        assert cache[name]["uncached_s_per_step"] > 0 and cache[name]["cached_s_per_step"] > 0
    assert cache["minigen"]["steps_skipped"] == cache["minigen compiled"]["steps_skipped"]
    assert cache["same_steps_skipped_as_diffusers"] is True
    assert cache["max_abs_diff_uncached_minigen_vs_diffusers"] <= 0.1


def test_without_a_gpu_it_says_to_dry_run():
    run = subprocess.run([sys.executable, "scripts/benchmark.py", "gpu"], cwd=REPO, capture_output=True, text=True, timeout=300)
    if "no CUDA device" not in run.stderr:
        pytest.skip("a GPU is here: the real run is not a test")
    assert run.returncode != 0 and "--dry-run" in run.stderr


def test_a_size_the_unet_cannot_halve_is_refused_before_any_work():
    """--size 4 ran 27 s, then died in a convolution's traceback (exit code 1)."""
    run = subprocess.run([sys.executable, "scripts/benchmark.py", "unet", "--size", "100"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stderr == "error: argument --size: 100 is not a multiple of 64; try 64 (see --help)\n"
