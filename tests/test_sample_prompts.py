"""scripts/sample.py --prompts on toy-sd: the images of single --prompt runs, a resumable folder with a
manifest, bad lines refused before anything is drawn, and the same files from 2 torchrun processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, load_sample_script, with_ema
from minigen.distributed import Ranks, rank_device, torchrun_ranks
from minigen.prompt_file import SEED_STRIDE

FAST = ["--width", "32", "--height", "32", "--steps", "2"]
PROMPTS = ["a large yellow star on grass", "a small blue circle on sand", "a red heart on a sky background"]


@pytest.fixture(scope="module")
def sample():
    return load_sample_script()


def manifest(folder) -> list[dict]:
    """Every entry of the folder's manifests, from all ranks."""
    return [json.loads(line) for path in sorted(folder.glob("manifest*.jsonl")) for line in path.read_text().splitlines()]


def test_a_prompts_run_writes_the_files_of_single_runs_and_lists_each_once(sample, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"prompt": PROMPTS[0]}),
        "# the second prompt has settings of its own",
        json.dumps({"prompt": PROMPTS[1], "seed": 7, "n": 2, "steps": 3, "cfg": 5, "cfg_rescale": 0.5, "negative": "a green box",
                    "sampler": "Euler a", "width": 48, "out": "circle.png"}),
    ]))  # fmt: skip
    written = sample.main(["--prompts", str(prompts), "--seed", "3", *FAST, "--out", str(tmp_path / "batch")])
    assert sorted(path.name for path in written) == ["00000-s3.png", "circle-0.png", "circle-1.png"]

    [star] = sample.main(["--prompt", PROMPTS[0], "--seed", "3", *FAST, "--out", str(tmp_path / "star.png")])
    circles = sample.main(["--prompt", PROMPTS[1], "--seed", "7", "--n", "2", *FAST, "--steps", "3", "--cfg", "5", "--cfg-rescale", "0.5", "--negative", "a green box",
                           "--sampler", "euler_ancestral", "--width", "48", "--out", str(tmp_path / "circle.png")])  # fmt: skip
    batch = tmp_path / "batch"
    assert (batch / "00000-s3.png").read_bytes() == star.read_bytes()  # pixels and settings, byte for byte
    assert [(batch / f"circle-{k}.png").read_bytes() for k in range(2)] == [path.read_bytes() for path in circles]

    entries = manifest(batch)
    assert [(e["file"], e["prompt"], e["seed"], e["line"]) for e in entries] == [
        ("00000-s3.png", PROMPTS[0], 3, 1), ("circle-0.png", PROMPTS[1], 7, 3), ("circle-1.png", PROMPTS[1], 8, 3)]  # fmt: skip
    assert entries[1]["settings"]["size"] == "48x32" and entries[1]["settings"]["sampler"] == "euler_ancestral"
    assert entries[1]["settings"]["cfg_rescale"] == 0.5 and entries[0]["settings"]["cfg_rescale"] is None


def test_a_lines_sampler_replaces_the_command_lines_with_its_own_karras(sample, tmp_path):
    """Under --sampler "DPM++ 2M Karras" a line's "DPM++ 2M" was drawn (and recorded) with Karras sigmas:
    the name's Karras was kept as if --karras had been given. --karras itself holds for every line."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[0], "sampler": "DPM++ 2M"}) + "\n")
    for flags, karras in ((["--sampler", "DPM++ 2M Karras"], False), (["--sampler", "euler", "--karras"], True)):
        [line] = sample.main(["--prompts", str(prompts), "--seed", "3", *FAST, *flags, "--out", str(tmp_path / f"batch-{karras}")])
        [single] = sample.main(["--prompt", PROMPTS[0], "--seed", "3", *FAST, "--sampler", "DPM++ 2M" + " Karras" * karras,
                                "--out", str(tmp_path / f"single-{karras}.png")])  # fmt: skip
        assert line.read_bytes() == single.read_bytes(), karras


def test_a_second_run_draws_only_what_is_missing_and_never_replaces_unasked(sample, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    folder = tmp_path / "batch"
    argv = ["--prompts", str(prompts), "--seed", "1", *FAST, "--out", str(folder)]
    first = sample.main(argv)
    names = [f"{i:05d}-s{1 + SEED_STRIDE * i}.png" for i in range(3)]
    assert [path.name for path in first] == names
    before = {name: ((folder / name).stat().st_mtime_ns, (folder / name).read_bytes()) for name in names}

    # as if killed: one image never drawn, one drawn but not yet listed in the manifest
    (folder / names[1]).unlink()
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    (folder / "manifest.jsonl").write_text("\n".join(line for line in lines if names[2] not in line) + "\n")
    time.sleep(0.01)
    assert [path.name for path in sample.main(argv)] == [names[1]]
    assert capsys.readouterr().out.endswith(f"{folder}: wrote 1 images, kept 2 that were already there\n")
    for name in (names[0], names[2]):
        assert ((folder / name).stat().st_mtime_ns, (folder / name).read_bytes()) == before[name]
    assert (folder / names[1]).read_bytes() == before[names[1]][1]
    assert sorted(entry["file"] for entry in manifest(folder)) == names  # each exactly once
    assert sample.main(argv) == []

    with pytest.raises(ValueError, match=r"00000-s1.png exists with other settings \(steps 2, not 3\); give another --out folder"):
        sample.main([*argv, "--steps", "3"])
    assert (folder / names[0]).stat().st_mtime_ns == before[names[0]][0]
    redrawn = sample.main([*argv, "--steps", "3", "--overwrite"])
    assert [path.name for path in redrawn] == names and (folder / names[0]).read_bytes() != before[names[0]][1]
    assert [(entry["file"], entry["settings"]["steps"]) for entry in manifest(folder)] == [(name, 3) for name in names]
    whole = (folder / names[0]).read_bytes()  # cut short (by a copy, a full disk): its settings chunk is whole, its pixels not
    (folder / names[0]).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="00000-s1.png exists but is not a PNG that sample.py wrote .*truncated.*--overwrite"):
        sample.main([*argv, "--steps", "3"])


def test_without_out_the_images_go_to_a_new_folder_under_runs(sample, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text(PROMPTS[0] + "\n")
    [path] = sample.main(["--prompts", "prompts.txt", "--seed", "5", *FAST])
    assert path.parts[0] == "runs" and path.parent.name.startswith("prompts-") and path.name == "00000-s5.png"
    assert f"to resume a killed run, give --out {path.parent}" in capsys.readouterr().out


@pytest.mark.parametrize("arguments,lines,message", [
    (["--image", "ref.png"], None, "--prompts with --image: prompt files take no reference images yet"),
    (["--batch-size", "2"], None, "--prompts draws one image per model call; drop --batch-size"),
    (["--out", "x.png"], None, "with --prompts, --out is the folder the images go into"),
    ([], ['{"prompt": "a", "sampler": "eulr"}'], "prompts.jsonl:2: \"sampler\": invalid choice: 'eulr'"),
    (["--eta", "0.5", "--sampler", "ddim"], ['{"prompt": "a", "sampler": "heun"}'], "prompts.jsonl:2: the heun sampler takes no eta (--eta)"),
    ([], ['{"prompt": "a", "width": 30}'], "prompts.jsonl:2: width and height must be multiples of 4 (the VAE's latent factor), got 30x32"),
    ([], ['{"prompt": "a", "guidance": 3.5}'], "prompts.jsonl:2: --guidance is FLUX dev's distilled guidance; SD models take --cfg"),
    ([], ['{"prompt": "a", "negative": "b", "cfg": 1}'], "prompts.jsonl:2: --negative acts through classifier-free guidance"),
    ([], ['{"prompt": "a", "cfg_rescale": 2}'], "prompts.jsonl:2: --cfg-rescale 2.0 is not between 0 and 1"),
    ([], ['{"prompt": "a", "prompt_2": "b"}'], "prompts.jsonl:2: --prompt-2 and --negative-2 are for SDXL's second text encoder"),
    (["--width", "30"], None, "the command line: width and height must be multiples of 4 (the VAE's latent factor), got 30x32"),
    ([], ['{"prompt": "a [red:blue:0.5] star"}'], "prompts.jsonl:2: '[red:blue:0.5]' in prompt"),  # stopped the run at its line
    ([], ['{"prompt": "a", "negative": "cats AND dogs"}'], "prompts.jsonl:2: 'AND' in prompt 'cats AND dogs'"),
])  # fmt: skip
def test_bad_arguments_and_lines_end_in_one_line_before_anything_is_drawn(sample, tmp_path, capsys, arguments, lines, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(['{"prompt": "a good line"}', *(lines or [])]) + "\n")
    folder = tmp_path / "batch"
    code = sample.run(["--prompts", str(prompts), "--seed", "1", *FAST, "--out", str(folder), *arguments])
    error = capsys.readouterr().err
    assert code == 2 and message in error and error.count("\n") == 1, error
    assert not folder.exists()  # made only once every check has passed


def test_a_prompt_file_with_lag_reads_each_lines_prompt(sample, tmp_path):
    """--residuals --lag with --prompts: LAG finds the concept in each line's own prompt (the command line
    has none), and each image is the one --prompt draws."""
    import numpy as np
    from PIL import Image

    from minigen.loading.auto import load_pipeline
    from minigen.methods.residuals import Residuals

    unet = load_pipeline("toy-sd").unet
    Residuals(unet, identifier="sks", macro_class="star", init_scale=0.5).save(tmp_path / "r.safetensors", base="toy-sd")
    (tmp_path / "p.txt").write_text("a sks star on grass\n")
    flags = ["--residuals", str(tmp_path / "r.safetensors"), "--lag", "--seed", "1", *FAST]
    [batch] = sample.main(["--prompts", str(tmp_path / "p.txt"), *flags, "--out", str(tmp_path / "batch")])
    [single] = sample.main(["--prompt", "a sks star on grass", *flags, "--out", str(tmp_path / "single.png")])
    assert np.array_equal(np.asarray(Image.open(batch)), np.asarray(Image.open(single)))


def test_a_resumed_run_tells_apart_other_weights_under_the_same_names(sample, tmp_path):
    """The settings name the files they read: a --prompts run resumed after retrained residuals were saved under
    the same name, or with --no-ema on a checkpoint with EMA shadows, kept the images of the other weights ("kept
    2 that were already there"). The PNG records each file's A1111 hash (`Hashes`) and `EMA: off`; a resumed run
    refuses the folder."""
    from PIL import Image

    from minigen.loading.auto import load_pipeline
    from minigen.loading.hashes import model_hash
    from minigen.methods.residuals import Residuals

    unet = load_pipeline("toy-sd").unet
    residuals = tmp_path / "r.safetensors"
    Residuals(unet, identifier="sks", macro_class="star", init_scale=0.5).save(residuals, base="toy-sd")
    (tmp_path / "p.txt").write_text("a sks star on grass\n")
    argv = ["--prompts", str(tmp_path / "p.txt"), "--residuals", str(residuals), "--seed", "1", *FAST, "--out", str(tmp_path / "r")]
    [image] = sample.main(argv)
    assert json.loads(manifest(tmp_path / "r")[0]["settings"]["hashes"]) == {"residuals:r.safetensors": model_hash(residuals)}
    (tmp_path / "other").mkdir()  # a second file of that name (another run's) is hashed too, not in place of the first
    Residuals(unet, identifier="sks", macro_class="star", init_scale=0.6).save(tmp_path / "other" / "r.safetensors", base="toy-sd")
    twice = sample.main(["--prompt", "a sks star on grass", *argv[2:-2], "--residuals", str(tmp_path / "other" / "r.safetensors"),
                         "--out", str(tmp_path / "twice.png")])  # fmt: skip
    assert json.loads(json.loads(Image.open(twice[0]).info["minigen"])["hashes"]) == {
        "residuals:r.safetensors": model_hash(residuals), "residuals:r.safetensors#2": model_hash(tmp_path / "other" / "r.safetensors")}
    Residuals(unet, identifier="sks", macro_class="star", init_scale=0.8).save(residuals, base="toy-sd", overwrite=True)
    with pytest.raises(ValueError, match=r"exists with other settings \(hashes .*r.safetensors"):
        sample.main(argv)

    file, _, _ = with_ema(tmp_path, offset=1e-3)
    argv = ["--prompts", str(tmp_path / "p.txt"), "--model", str(file), "--seed", "1", *FAST, "--out", str(tmp_path / "ema")]
    sample.main(argv)
    with pytest.raises(ValueError, match=r"exists with other settings \(ema None, not 'off'\)"):
        sample.main([*argv, "--no-ema"])


def test_ctrl_c_on_a_prompts_run_says_the_same_command_resumes(sample, monkeypatch, capsys):
    """A --prompts run keeps its finished images and goes on from them when run again; Ctrl-C said only that
    finished files are kept. A single --prompt draws anew, so its line says no more."""
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "main", interrupted)
    for argv, resumes in ((["--prompts", "p.txt"], True), (["--prompt", "a star"], False)):
        assert sample.run(argv) == 130
        assert ("the same command run again goes on from where it stopped" in capsys.readouterr().err) == resumes


def test_prompt_and_prompts_exclude_each_other(sample, capsys):
    for argv in (["--prompt", "a star", "--prompts", "prompts.txt"], ["--seed", "1"]):
        assert sample.run(argv) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == ["error: argument --prompts: not allowed with argument --prompt (see --help)",
                      "error: one of the arguments --prompt --prompts is required (see --help)"]  # fmt: skip


def test_ranks_share_the_images_round_robin_and_read_torchrun_environment():
    assert [Ranks(rank, 3).share(list(range(8))) for rank in range(3)] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert torchrun_ranks({}) is None
    assert torchrun_ranks({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Ranks(1, 2, 1)
    with pytest.raises(ValueError, match="torchrun's environment is incomplete"):
        torchrun_ranks({"RANK": "1"})
    with pytest.raises(ValueError, match="do not fit together"):
        torchrun_ranks({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert str(rank_device("cpu", Ranks(1, 2, 1))) == "cpu"
    with pytest.raises(ValueError, match="under torchrun each rank draws on cuda:LOCAL_RANK; give --device cuda"):
        rank_device("cuda:1", Ranks(1, 2, 1))


@pytest.mark.slow
def test_two_torchrun_processes_write_the_files_of_one(sample, tmp_path):
    """Two gloo ranks on the CPU (about 20 s on 2 cores, most of it starting the processes). torchrun
    gives each rank one thread; the process alone gets one too, as the float sums of a convolution
    depend on how many threads share it (at 64 px and 25 steps, a few pixels by one level)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    argv = ["--prompts", str(prompts), "--seed", "4", "--n", "2", *FAST]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = sample.main([*argv, "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "--", str(REPO / "scripts" / "sample.py"), *argv, "--out", str(tmp_path / "two")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # torchrun's own choice, unless the caller's environment says otherwise
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    assert sorted(path.name for path in two.glob("*.png")) == sorted(path.name for path in alone)
    assert all((two / path.name).read_bytes() == path.read_bytes() for path in alone)
    assert sorted(path.name for path in two.glob("manifest*")) == ["manifest-rank0.jsonl", "manifest-rank1.jsonl"]
    assert sorted(map(json.dumps, manifest(two))) == sorted(map(json.dumps, manifest(tmp_path / "one")))
    assert f"{two}: wrote 6 images, kept 0 that were already there" in result.stdout


def test_overwrite_redraws_what_differs_and_keeps_the_rest_of_the_folder(sample, tmp_path):
    """--overwrite wiped every manifest of the folder (images of other seeds went unlisted for good), and a
    killed --overwrite run could only redraw everything again: it keeps images of the same settings."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    folder = tmp_path / "batch"
    argv = ["--prompts", str(prompts), *FAST, "--out", str(folder)]
    sample.main([*argv, "--seed", "1"])
    sample.main([*argv, "--seed", "7"])  # other files in the same folder
    sample.main([*argv, "--seed", "1", "--steps", "3", "--overwrite"])
    assert sorted((e["file"], e["settings"]["steps"]) for e in manifest(folder)) == [
        ("00000-s1.png", 3), ("00000-s7.png", 2), ("00001-s1001.png", 3), ("00001-s1007.png", 2)]  # fmt: skip
    kept = (folder / "00000-s1.png").stat().st_mtime_ns
    (folder / "00001-s1001.png").unlink()  # as if killed while redrawing it
    assert [path.name for path in sample.main([*argv, "--seed", "1", "--steps", "3", "--overwrite"])] == ["00001-s1001.png"]
    assert (folder / "00000-s1.png").stat().st_mtime_ns == kept and len(manifest(folder)) == 4


def test_a_comment_added_before_resuming_lists_no_image_twice(sample, tmp_path):
    """The manifest's "listed" test took the line number in: a comment put on top of the file moved every
    line, and each kept image was listed again."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    argv = ["--prompts", str(prompts), "--seed", "1", *FAST, "--out", str(tmp_path / "batch")]
    sample.main(argv)
    prompts.write_text("# my batch\n" + "\n".join(PROMPTS[:2]) + "\n")
    assert sample.main(argv) == [] and len(manifest(tmp_path / "batch")) == 2


def test_an_image_another_run_drew_meanwhile_is_kept(sample, tmp_path, monkeypatch, capsys):
    """Two runs into one folder: the second's save found the file and ended with "exists; ... allow overwriting
    (overwrite=True)"; a file of the same settings is counted as kept."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    save = sample.save_png

    def another_run_first(image, path, settings, overwrite=False):
        save(image, path, settings, overwrite=overwrite)  # the other run's copy
        return save(image, path, settings, overwrite=overwrite)

    monkeypatch.setattr(sample, "save_png", another_run_first)
    assert sample.main(["--prompts", str(prompts), "--seed", "1", *FAST, "--out", str(tmp_path / "batch")]) == []
    assert capsys.readouterr().out.endswith("wrote 0 images, kept 1 that were already there\n")
