"""scripts/benchmark.py's command line and workers: each mode takes the flags it reads and refuses the others,
naming its own; a worker runs in a fresh process, so its memory figures hold nothing of the parent's."""

import pytest
import torch
from conftest import load_script

from minigen.cli import run


@pytest.mark.parametrize("argv, message", [
    (["load-rss", "--size", "128"], "load-rss does not read --size 128; its flags are --threads, --out, --overwrite"),
    (["gpu", "--compile"], "gpu does not read --compile; its flags are --dry-run, --threshold, --threads, --out, --overwrite"),
    (["joint-bias", "--repeats", "3"], "joint-bias does not read --repeats 3; its flags are --threads, --out, --overwrite"),
])  # fmt: skip
def test_a_flag_the_mode_does_not_read_is_refused_on_one_line_naming_the_modes_flags(argv, message, capsys):
    assert run(load_script("benchmark").main, argv) == 2
    assert capsys.readouterr().err == f"error: {message} (see --help)\n"


def test_a_negative_or_nan_cache_threshold_is_refused_before_measuring(capsys):
    """--threshold -1 was taken: the cache refused it after seconds of measuring (on a GPU, the FLUX section's results)."""
    for value in ("-1", "nan"):
        assert run(load_script("benchmark").main, ["gpu", "--dry-run", "--threshold", value]) == 2
        assert f"argument --threshold: {value}" in capsys.readouterr().err


def test_a_worker_runs_in_a_fresh_process_and_returns_its_json():
    """The worker's peak RSS (torch and minigen's SD loader imported: ~0.4 GiB) holds none of the parent's 1 GiB."""
    benchmark = load_script("benchmark")
    ballast = torch.ones(2**28)  # 1 GiB, resident in this process
    result = benchmark.in_fresh_process(benchmark.load_rss_worker, "imports", "")
    assert set(result) == {"peak_rss_bytes"}
    assert 100 * 2**20 < result["peak_rss_bytes"] < ballast.nbytes
