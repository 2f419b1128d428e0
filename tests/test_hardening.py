"""Bad files and bad input: every loader answers with a CheckpointError naming the problem, outputs are
written atomically, and the command line ends every bad input with a message and exit code 2.

The fuzz test mutates the shipped toy-sd file (its header, its metadata and its bytes) with a fixed
seed and loads each mutant: the only acceptable outcomes are a CheckpointError, or a model whose
weights are all finite, within a time limit per case.
"""

import json
import os
import random
import signal
import struct

import pytest
import torch
from conftest import load_sample_script
from PIL import Image

from minigen.image import a1111_parameters, save_png
from minigen.loading.coverage import load_exact, non_finite
from minigen.loading.detect import CheckpointError
from minigen.loading.files import check_writable, config_from_metadata, pipeline_defaults, read_state_dict
from minigen.loading.sd import METADATA_UNET_CONFIG, load_sd
from minigen.loading.toy import TOY_SD
from minigen.models.unet_config import UNetConfig


# ---- safetensors files, taken apart and put together again -------------------------------------------
def split_safetensors(path):
    """(header dict, data bytes) of a .safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_safetensors(header, data: bytes, path):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.fixture(scope="module")
def toy_sd_parts():
    return split_safetensors(TOY_SD)


def with_metadata(parts, path, key, value):
    header, data = parts
    header = json.loads(json.dumps(header))
    header["__metadata__"][key] = value if isinstance(value, str) else json.dumps(value)
    return join_safetensors(header, data, path)


# ---- metadata drives what is built: checked before anything is allocated -----------------------------
@pytest.mark.parametrize(
    "field, value, message",
    [
        ("num_res_blocks", 100_000, "num_res_blocks must be an integer from 0 to 256"),
        ("model_channels", -64, "model_channels must be an integer from 0 to"),
        ("channel_mult", "big", "channel_mult must be a list of 1 to 16 integers"),
        ("transformer_depth", [1, 1, 10**9], r"transformer_depth\[2\] must be an integer"),
        ("num_heads", 4.5, "num_heads must be an integer"),
        ("use_linear_proj", 1, "use_linear_proj must be true or false"),
        ("head_dim", 8, "set exactly one of num_heads"),  # the config's own check, as a CheckpointError
        ("color", 3, "unknown field 'color'"),
        ("num_heads", 0, "does not build a UNet: ZeroDivisionError"),
        ("norm_groups", 7, "does not build a UNet: ValueError"),
    ],
)
def test_a_bad_config_in_metadata_is_refused_by_name(toy_sd_parts, tmp_path, field, value, message):
    config = json.loads(toy_sd_parts[0]["__metadata__"][METADATA_UNET_CONFIG])
    config[field] = value
    path = with_metadata(toy_sd_parts, tmp_path / "bad.safetensors", METADATA_UNET_CONFIG, config)
    with pytest.raises(CheckpointError, match=message):
        load_sd(path)


def test_a_zero_latent_scale_is_refused(toy_sd_parts, tmp_path):
    from minigen.loading.sd import METADATA_VAE_CONFIG

    config = json.loads(toy_sd_parts[0]["__metadata__"][METADATA_VAE_CONFIG]) | {"scaling_factor": 0.0}
    path = with_metadata(toy_sd_parts, tmp_path / "bad.safetensors", METADATA_VAE_CONFIG, config)
    with pytest.raises(CheckpointError, match="scaling_factor must be positive"):
        load_sd(path)


def test_metadata_that_is_not_json_or_not_an_object_is_refused():
    for text, message in [("{num_res_blocks: 1", "not valid JSON"), ("[1, 2]", "must be a JSON object")]:
        with pytest.raises(CheckpointError, match=message):
            config_from_metadata({"k": text}, "k", UNetConfig)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        pipeline_defaults({"minigen.pipeline": "{"}, ("default_size",))


@pytest.mark.parametrize("value", [100_000, -64, "big", 64.5, None])
def test_a_bad_default_size_is_refused_at_load(toy_sd_parts, tmp_path, value):
    path = with_metadata(toy_sd_parts, tmp_path / "bad.safetensors", "minigen.pipeline", {"default_size": value})
    with pytest.raises(CheckpointError, match="default_size must be an integer from 16 to 4096"):
        load_sd(path)


# ---- weights: dtypes and values ----------------------------------------------------------------------
def test_non_finite_or_integer_weights_are_refused():
    layer = torch.nn.Linear(3, 2)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["weight"][1, 2] = float("nan")
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in 1 tensors, e\.g\. weight"):
        load_exact(torch.nn.Linear(3, 2), state)
    state["weight"] = torch.ones(2, 3, dtype=torch.int32)
    with pytest.raises(CheckpointError, match="weight: checkpoint dtype torch.int32, the model needs floating-point"):
        load_exact(torch.nn.Linear(3, 2), state)
    huge = torch.full((4,), 3e38)  # finite, though its float32 sum would overflow
    assert non_finite({"huge": huge, "inf": torch.tensor([1.0, float("-inf")], dtype=torch.bfloat16)}) == ["inf"]


def test_files_that_are_not_checkpoints_get_a_message_naming_what_they_are(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder"):
        read_state_dict(tmp_path)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_state_dict("/dev/zero")
    pickled = tmp_path / "model.safetensors"
    torch.save({"w": torch.ones(2)}, pickled)  # a zip archive
    with pytest.raises(CheckpointError, match="zip archive.*rename it to .ckpt"):
        read_state_dict(pickled)
    pickled.write_bytes(b"\x80\x04\x95" + bytes(64))  # a pickle's first bytes
    with pytest.raises(CheckpointError, match="a Python pickle named .safetensors"):
        read_state_dict(pickled)


def test_a_truncated_residuals_file_is_a_checkpoint_error_naming_it(tmp_path):
    from minigen.methods.residuals import Residuals

    path = tmp_path / "mine.safetensors"
    path.write_bytes(TOY_SD.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="mine.safetensors"):
        Residuals.load(path, unet=None)


def test_a_text_encoder_that_does_not_fit_gets_the_coverage_report():
    from minigen.text.encoders import TextEncoderConfig, build_text_encoder

    config = TextEncoderConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, hidden_act="quick_gelu")
    weights = build_text_encoder(config).state_dict()
    weights.pop(next(k for k in weights if "layers.1.mlp.fc1.weight" in k))
    with pytest.raises(CheckpointError, match=r"1 missing keys(.|\n)*layers.1.mlp.fc1.weight"):
        build_text_encoder(config, weights)


# ---- outputs ------------------------------------------------------------------------------------------
class BrokenImage:
    """An image whose encoder writes some bytes and fails, as a full disk or a kill would."""

    def save(self, file, **kwargs):
        file.write(b"\x89PNG partial")
        raise OSError("No space left on device")


class RacingImage:
    """An image during whose writing another process creates the destination file."""

    def __init__(self, destination):
        self.destination = destination

    def save(self, file, **kwargs):
        self.destination.write_bytes(b"someone else's file")
        Image.new("RGB", (4, 4)).save(file, **kwargs)


def test_png_writes_are_atomic_and_never_lose_or_overwrite(tmp_path):
    out = tmp_path / "image.png"
    with pytest.raises(OSError, match="No space left"):
        save_png(BrokenImage(), out, {})
    assert os.listdir(tmp_path) == []  # neither a partial file at out nor a temporary one left behind

    kept = save_png(RacingImage(out), out, {"prompt": "p"})
    assert kept == tmp_path / "image-1.png" and out.read_bytes() == b"someone else's file"
    assert Image.open(kept).text["parameters"].startswith("p")

    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "elsewhere.png")  # a dangling symlink is an existing name, never followed
    with pytest.raises(FileExistsError, match=r"allow overwriting \(overwrite=True\)"):  # the API's own fix, not a script's flag
        save_png(Image.new("RGB", (4, 4)), link, {})
    save_png(Image.new("RGB", (4, 4)), link, {}, overwrite=True)
    assert not link.is_symlink() and not (tmp_path / "elsewhere.png").exists()


def test_files_that_belong_together_are_replaced_together(tmp_path):
    """A model and its tower were written one after the other: a kill between them left the new adapter
    beside the old tower. Now a failure while writing any of them leaves every old file as it was, and
    no temporary file behind."""
    from minigen.loading.files import write_files_together

    adapter, tower = tmp_path / "adapter.safetensors", tmp_path / "image_encoder" / "model.safetensors"
    write_files_together({adapter: b"old adapter", tower: b"old tower"})
    with pytest.raises(TypeError):  # the tower's data cannot be written: as a kill while writing it
        write_files_together({adapter: b"new adapter", tower: "not bytes"})
    assert (adapter.read_bytes(), tower.read_bytes()) == (b"old adapter", b"old tower")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["adapter.safetensors", "model.safetensors"]
    write_files_together({adapter: b"new adapter", tower: b"new tower"})
    assert (adapter.read_bytes(), tower.read_bytes()) == (b"new adapter", b"new tower")


def test_a_journal_says_how_far_the_killed_run_got(tmp_path, capsys):
    """Every evaluation says so on stderr in the same words (evaluate_residuals said nothing)."""
    from minigen.journal import Journal

    path = tmp_path / "run.journal.jsonl"
    Journal(path, {"steps": 2}).report_resumed(5, "concepts")
    assert capsys.readouterr().err == ""
    Journal(path, {"steps": 2}).add("a", 1)
    Journal(path, {"steps": 2}).report_resumed(5, "concepts")
    assert capsys.readouterr().err == f"resuming the killed run in {path}: 1 of 5 concepts drawn\n"


def test_a_journal_drops_a_line_cut_by_a_kill_and_replaces_one_of_nothing_finished(tmp_path):
    """minigen/journal.py: the piece whose line a kill cut short runs again (its line is not read); a
    journal of other settings that holds no finished piece is replaced without a word (nothing is lost),
    one that holds some is refused naming what differs."""
    from minigen.journal import Journal

    path = tmp_path / "run.journal.jsonl"
    journal = Journal(path, {"steps": 2})
    assert journal.add("a", {"cp": 0.1 + 0.2}) == {"cp": 0.30000000000000004}  # as read back: bit for bit
    with path.open("a") as file:
        file.write('{"key": "b", "value": {"cp"')  # killed while writing b's line
    again = Journal(path, {"steps": 2})
    assert again.done == {"a": {"cp": 0.30000000000000004}} and again.resumed == 1
    again.add("c", 1)
    assert Journal(path, {"steps": 2}).done == {"a": {"cp": 0.30000000000000004}, "c": 1}  # the cut line ended, c read
    with pytest.raises(ValueError, match=r"run.journal.jsonl holds the finished part of a killed run of other settings \(steps differ\)"):
        Journal(path, {"steps": 3})
    assert Journal(path, {"steps": 3}, restart=True).done == {}
    assert Journal(path, {"steps": 4}).done == {}  # nothing finished under steps 3: replaced
    Journal(path, {"steps": 4}).close()
    assert not path.exists()


def parse_a1111(text: str) -> dict:
    """A1111's `parse_generation_parameters`, re-implemented from its format: the last line holds
    `Key: value` pairs split at commas (a value may be a JSON string), a line starting with
    "Negative prompt:" begins the negative prompt, the lines before it are the prompt."""
    import re

    *lines, last = text.strip().split("\n")
    fields = {}
    for key, value in re.findall(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last):
        fields[key] = json.loads(value) if value.startswith('"') else value
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **fields}


def test_a1111_text_round_trips_through_a1111s_parser_and_cannot_be_forged():
    settings = {"prompt": "a cat\nNegative prompt: ugly\nSteps: 1", "negative": "x\ny", "steps": 25,
                "sampler": "dpmpp_2m karras", "cfg_scale": 7.5, "seed": 3, "size": "64x64",
                "model": "/models/a, b: c.safetensors", "lora": 'style.safetensors:0.8, "x".safetensors:1.0'}  # fmt: skip
    parsed = parse_a1111(a1111_parameters(settings))
    assert parsed == {"Prompt": "a cat Negative prompt: ugly Steps: 1", "Negative prompt": "x y", "Steps": "25",
                      "Sampler": "DPM++ 2M Karras", "CFG scale": "7.5", "Seed": "3", "Size": "64x64",
                      "Model": "/models/a, b: c.safetensors", "Lora": 'style.safetensors:0.8, "x".safetensors:1.0'}  # fmt: skip


# ---- the command line -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sample():
    return load_sample_script()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--width", "0"], "argument --width: 0 is not positive; give 1 or more"),
        (["--width", "-64"], "argument --width: -64 is negative; give 1 or more"),
        (["--steps", "0"], "argument --steps: 0 is not positive; give 1 or more"),
        (["--cfg", "nan"], "argument --cfg: nan is not a finite number"),
        (["--guidance", "inf"], "argument --guidance: inf is not a finite number"),
        (["--seed", str(2**32)], f"argument --seed: {2**32} is outside 0 .. 2^32 - 1"),
        (["--lora", "style.safetensors:nan"], "argument --lora: the scale of style.safetensors:nan is not a finite number"),
        (["--lag-quantile", "2"], "argument --lag-quantile: 2 is outside [0, 1]"),
        (["--omini", "subject.safetensors", "--ip-scale", "0"], "--ip-scale 0.0: the FLUX condition scale enters the attention as its log, so it must be > 0"),
        (["--ip-adapter", "ip.safetensors", "--warmup", "1"], "--warmup 1.0: give a share of the steps, 0 or more and below 1"),
        (["--omini", "subject.safetensors", "--warmup", "5"], "--warmup 5.0: give a share of the steps, 0 or more and below 1"),
        (["--omini", "subject.safetensors", "--warmup", "-0.5"], "--warmup -0.5: give a share of the steps, 0 or more"),
        (["--model", "toy-flux", "--t5-tokens", "513"], "--t5-tokens 513: FLUX reads at most 512 T5 tokens"),
        (["--deep-cache", "1"], "--deep-cache 1 runs the whole UNet at every call, so nothing is cached"),
        (["--model", "toy-flux", "--first-block-cache", "0"], "--first-block-cache 0 skips no step"),
    ],
)
def test_cli_rejects_bad_numbers_with_exit_code_2(sample, capsys, extra, message):
    assert sample.run(["--prompt", "a red star", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_bad_paths_and_devices_end_with_one_message_before_any_work(sample, capsys, tmp_path):
    (tmp_path / "taken.png").write_bytes(b"x")
    cases = [
        (["--out", str(tmp_path / "noext")], "noext: give a .png file, e.g."),
        (["--out", str(tmp_path)], "is a folder; give a file path inside it"),
        (["--out", str(tmp_path / "taken.png")], "exists; choose another output path or allow overwriting (--overwrite)"),
        (["--model", "weights/toy-sd.safetensor"], "did you mean weights/toy-sd.safetensors?"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "this machine has no CUDA GPU"))
    for extra, message in cases:
        assert sample.run(["--prompt", "a red star", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    assert (tmp_path / "taken.png").read_bytes() == b"x"


# ---- fuzzing the shipped file -------------------------------------------------------------------------
def mutants(parts, rng: random.Random):
    """(name, header, data) mutations of a safetensors file: metadata values, header entries, bytes."""
    header, data = parts
    tensors = [k for k in header if k != "__metadata__"]
    configs = [k for k, v in header["__metadata__"].items() if v.startswith("{")]
    while True:
        h, d = json.loads(json.dumps(header)), data
        kind = rng.choice(["config", "config", "json", "entry", "dtype", "shape", "offsets", "truncate", "nan"])
        if kind == "config":
            key = rng.choice(configs)
            config = json.loads(h["__metadata__"][key])
            field = rng.choice(list(config))
            config[field] = rng.choice([0, -1, 10**6, 2**40, 1.5, "x", None, [], [10**6], True, {"a": 1}])
            if isinstance(config[field], int) and rng.random() < 0.5 and isinstance(header_value := json.loads(header["__metadata__"][key])[field], int):
                config[field] = header_value * 1000
            h["__metadata__"][key] = json.dumps(config)
        elif kind == "json":
            key = rng.choice(list(h["__metadata__"]))
            text = h["__metadata__"][key]
            h["__metadata__"][key] = text[: rng.randrange(len(text))]
        elif kind == "entry":
            del h[rng.choice(tensors)]
        elif kind == "dtype":
            h[rng.choice(tensors)]["dtype"] = rng.choice(["F32", "I32", "I16", "U8", "BOOL", "F8_E4M3", "I64"])
        elif kind == "shape":
            entry = h[rng.choice(tensors)]
            entry["shape"] = [s * rng.choice([2, 1]) for s in entry["shape"]][::-1] or [2]
        elif kind == "offsets":
            entry = h[rng.choice(tensors)]
            entry["data_offsets"] = [o + rng.choice([-2, 2, 10**12]) for o in entry["data_offsets"]]
        elif kind == "truncate":
            d = d[: rng.randrange(len(d))]
        else:  # overwrite a few values of one fp16 tensor with NaN or infinity
            entry = h[rng.choice([k for k in tensors if h[k]["dtype"] == "F16"])]
            start, stop = entry["data_offsets"]
            at = start + 2 * rng.randrange((stop - start) // 2)
            d = d[:at] + rng.choice([b"\x00\x7e", b"\x00\x7c", b"\x00\xfc"]) + d[at + 2 :]
        yield kind, h, d


class Timeout(Exception):
    pass


@pytest.mark.slow
def test_fuzzed_toy_sd_files_give_checkpoint_errors_or_finite_models(toy_sd_parts, tmp_path):
    """200 mutants (fixed seed). Metric: each load ends within 30 s with a CheckpointError, or with a
    model whose weights are all finite; any other exception or a hang fails the test."""

    def alarm(*_):
        raise Timeout

    previous = signal.signal(signal.SIGALRM, alarm)
    outcomes = {}
    try:
        for i, (kind, header, data) in zip(range(200), mutants(toy_sd_parts, random.Random(0))):
            path = join_safetensors(header, data, tmp_path / f"mutant-{i % 2}.safetensors")
            signal.alarm(30)
            try:
                pipe = load_sd(path)
            except CheckpointError:
                outcome = "refused"
            except Timeout:
                pytest.fail(f"mutant {i} ({kind}) did not load or fail within 30 s")
            else:
                weights = {f"{n}.{k}": v for n, m in [("unet", pipe.unet), ("vae", pipe.vae), ("text", pipe.text_encoders[0])]
                           for k, v in m.state_dict().items()}  # fmt: skip
                assert not non_finite(weights), f"mutant {i} ({kind}) loaded with non-finite weights"
                outcome = "loaded"
            finally:
                signal.alarm(0)
            outcomes[kind, outcome] = outcomes.get((kind, outcome), 0) + 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    refused = sum(n for (kind, outcome), n in outcomes.items() if outcome == "refused")
    assert refused >= 150, outcomes  # most mutations break the file; a few (a config value equal in effect) do not


# ---- generation sizes, LoRA values --------------------------------------------------------------------
def test_memory_estimates_add_up_on_the_cpu_and_name_the_way_out():
    """On the CPU the denoiser's memory is not given back before the decode, so the two parts add up (the
    generations measured peaked above both: 0.70 to 0.98 of the larger); elsewhere (CUDA's caching
    allocator reuses it) the larger counts. A decode too large is met by a tiled decode of latents."""
    from minigen.pipelines.memory import TooLargeError, check_memory, value_bytes

    check_memory(3, 4, torch.device("meta"), 6, "a call")  # max(3, 4) fits 6
    with pytest.raises(TooLargeError, match=r"a call needs about 0 MiB .*output='latents'.*tile_size=64"):
        check_memory(3, 4, torch.device("cpu"), 6, "a call")  # 3 + 4 does not; the decode is the larger part
    with pytest.raises(TooLargeError, match="choose a smaller size or batch, or pass max_memory"):
        check_memory(5, 4, torch.device("cpu"), 6, "a call")
    assert [value_bytes(d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)] == [3, 3, 4, 8]


def test_a_generation_larger_than_the_memory_allowed_fails_before_the_first_step(toy_sd):
    """Metric: the estimate (minigen/pipelines/memory.py) against a stated limit, and no step run."""
    from minigen.pipelines.memory import TooLargeError

    steps = []
    with pytest.raises(TooLargeError, match=r"1 image\(s\) of 1024x1024 needs about \d\.\d GiB .* 512 MiB is allowed on cpu; choose a smaller size"):
        toy_sd.generate("a red star", width=1024, height=1024, steps=1, max_memory=2**29, callback=steps.append, progress=False)
    assert steps == []
    for bad in (float("nan"), -1.0, 0, True):  # "nan GiB allowed" went through
        with pytest.raises(ValueError, match="max_memory takes a number of bytes above 0"):
            toy_sd.generate("a red star", width=64, height=64, steps=1, max_memory=bad, progress=False)
    image = toy_sd.generate("a red star", width=64, height=64, steps=1, max_memory=2**29, progress=False)
    assert image.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="width and height must be positive, got 0x64"):
        toy_sd.generate("a red star", width=0, height=64, steps=1, progress=False)


def test_a_lora_with_an_infinite_value_is_refused(toy_sd, tmp_path):
    from safetensors.torch import save_file

    from minigen.loading.lora_files import read_lora

    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{name}.lora_down.weight": torch.ones(2, 64), f"{name}.lora_up.weight": torch.full((128, 2), float("inf"))}
    save_file(tensors, tmp_path / "lora.safetensors")
    with pytest.raises(CheckpointError, match="NaN or infinite values in 1 tensors"):
        read_lora(tmp_path / "lora.safetensors", unet=toy_sd.unet)


def test_cli_lora_files_flux_on_sd_and_pickles(sample, capsys, tmp_path):
    """A FLUX LoRA given to toy-sd is named as such; a pickled LoRA is refused, and read with --allow-pickle."""
    from safetensors.torch import save_file

    flux_lora = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 128),
                 "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(128, 2)}  # fmt: skip
    save_file(flux_lora, tmp_path / "flux.safetensors")
    base = ["--prompt", "a red star", "--steps", "1", "--seed", "1"]
    assert sample.run([*base, "--lora", str(tmp_path / "flux.safetensors"), "--out", str(tmp_path / "a.png")]) == 2
    assert "this is a LoRA for FLUX's transformer" in capsys.readouterr().err

    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    torch.save({f"{name}.lora_down.weight": torch.zeros(2, 64), f"{name}.lora_up.weight": torch.zeros(128, 2)}, tmp_path / "sd.bin")
    assert sample.run([*base, "--lora", str(tmp_path / "sd.bin"), "--out", str(tmp_path / "b.png")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert sample.run([*base, "--lora", str(tmp_path / "sd.bin"), "--allow-pickle", "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").exists()
    assert sample.run([*base, "--lora", f"{tmp_path / 'sd.bin'}:abc", "--out", str(tmp_path / "d.png")]) == 2  # was "file not found"
    assert "sd.bin:abc: the scale 'abc' after the file" in capsys.readouterr().err


def test_cli_allow_pickle_reads_a_pickled_omini_lora(sample, capsys, tmp_path):
    """--omini read its file without --allow-pickle, and the refusal told to pass it."""
    from minigen.loading.toy import TOY_SUBJECT_LORA

    torch.save(read_state_dict(TOY_SUBJECT_LORA), tmp_path / "subject.bin")
    Image.new("RGB", (64, 64), "yellow").save(tmp_path / "ref.png")
    base = ["--model", "toy-flux", "--omini", str(tmp_path / "subject.bin"), "--image", str(tmp_path / "ref.png"), "--concept", "star",
            "--prompt", "a star on grass", "--steps", "1", "--seed", "1"]  # fmt: skip
    assert sample.run([*base, "--out", str(tmp_path / "a.png")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert sample.run([*base, "--allow-pickle", "--out", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "b.png").exists()


class ModelLoads(Exception):
    """What the stand-in for load_pipeline raises: the input files passed their checks."""


@pytest.mark.parametrize("extra, message", [
    (["--lora", "{tmp}/missing.safetensors"], "--lora: checkpoint file not found: {tmp}/missing.safetensors"),
    (["--residuals", "{tmp}/missing.safetensors:0.5"], "--residuals: checkpoint file not found"),
    (["--embedding", "{tmp}/missing.pt"], "--embedding: checkpoint file not found"),
    (["--vae", "{tmp}/missing.safetensors"], "--vae: checkpoint file not found"),
    (["--ip-adapter", "{tmp}/missing.safetensors"], "--ip-adapter: checkpoint file not found"),
    (["--lora", "{tmp}/folder"], "--lora: {tmp}/folder is a folder; give a checkpoint file, such as {tmp}/folder/pytorch_lora_weights.safetensors"),
    (["--embedding", "{tmp}/word.pt"], "--embedding: {tmp}/word.pt is a pickled PyTorch file"),
    (["--lora", "{tmp}/folder/pytorch_lora_weights.safetensors"], None),
    (["--embedding", "{tmp}/word.pt", "--allow-pickle"], None),
    (["--vae", "stabilityai/sd-vae-ft-mse"], None),  # a hub id
    (["--vae", "{tmp}/folder"], None),  # a diffusers folder: its loader says what it lacks
    (["--ip-adapter", "ip-adapter-plus_sd15"], None),  # a variant name
    (["--residuals", "{tmp}/word.pt", "--allow-pickle"], "--residuals: {tmp}/word.pt: Personalized Residuals are .safetensors files"),  # no metadata
], ids=["lora", "residuals", "embedding", "vae", "ip-adapter", "lora-folder", "pickle", "lora-file", "allowed-pickle", "vae-hub-id",
        "vae-folder", "ip-adapter-variant", "pickled-residuals"])  # fmt: skip
def test_cli_input_files_are_checked_before_the_model_loads(sample, capsys, monkeypatch, tmp_path, extra, message):
    """A missing, folder or pickled --lora, --residuals, --embedding, --vae or --ip-adapter was found after the model
    loaded (minutes for SDXL and FLUX); what may also be a hub id, a folder or a variant name goes on to the loaders."""
    from safetensors.torch import save_file

    def load_pipeline(*args, **kwargs):
        raise ModelLoads

    monkeypatch.setattr(sample, "load_pipeline", load_pipeline)
    (tmp_path / "folder").mkdir()
    save_file({"w": torch.zeros(1)}, tmp_path / "folder" / "pytorch_lora_weights.safetensors")
    torch.save({"emb_params": torch.zeros(1, 32)}, tmp_path / "word.pt")
    argv = ["--prompt", "a red star", "--out", str(tmp_path / "a.png"), *(arg.replace("{tmp}", str(tmp_path)) for arg in extra)]
    if message is None:
        with pytest.raises(ModelLoads):
            sample.run(argv)
        return
    assert sample.run(argv) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err and len(err.strip().splitlines()) == 1, err


def test_cli_refuses_a_negative_prompt_without_guidance_and_offers_no_inversion_sampler(sample, capsys, tmp_path):
    assert sample.run(["--prompt", "a red star", "--negative", "blue", "--cfg", "1", "--out", str(tmp_path / "a.png")]) == 2
    assert "--negative acts through classifier-free guidance" in capsys.readouterr().err
    assert sample.run(["--prompt", "a red star", "--sampler", "ddim_inversion"]) == 2
    assert "invalid choice: 'ddim_inversion'" in capsys.readouterr().err


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_cli_n_images_equal_single_runs_with_consecutive_seeds(sample, tmp_path, sampler):
    """`--n 4 --seed 10 --batch-size 3` (a batch of 3, then one of 1) gives the images of four single runs
    with seeds 10..13. Metric: max difference of the 8-bit PNGs, at most 1 grey level (batched matmuls
    differ in the last bits), and each PNG records its own seed."""
    import numpy as np

    base = ["--prompt", "a large blue star on a white background", "--steps", "4", "--sampler", sampler]
    many = sample.main([*base, "--n", "4", "--seed", "10", "--batch-size", "3", "--out", str(tmp_path / "many.png")])
    assert [p.name for p in many] == [f"many-{k}.png" for k in range(4)]
    for k, path in enumerate(many):
        [single] = sample.main([*base, "--seed", str(10 + k), "--out", str(tmp_path / f"single-{k}.png")])
        a, b = (np.asarray(Image.open(p), dtype=int) for p in (path, single))
        assert np.abs(a - b).max() <= 1
        assert f"Seed: {10 + k}," in Image.open(path).text["parameters"]
    assert np.abs(np.asarray(Image.open(many[0]), dtype=int) - np.asarray(Image.open(many[1]), dtype=int)).max() > 10


@pytest.mark.parametrize("preset, names", [
    ("sd15", "v1-5-pruned-emaonly.safetensors"),
    ("flux-dev", "flux1-dev.safetensors"),
    ("sd15-inpainting", r"sd-v1-5-inpainting\.ckpt from stable-diffusion-v1-5/stable-diffusion-inpainting \(a pickle: add --allow-pickle"),
    ("sdxl-inpainting", r"the diffusers folder of diffusers/stable-diffusion-xl-1\.0-inpainting-0\.1 \(it has no single file\): "
                        r"model_index\.json, unet/"),
], ids=["sd15", "flux-dev", "sd15-inpainting", "sdxl-inpainting"])  # fmt: skip
def test_a_hub_preset_offline_fails_at_once_naming_the_files_to_fetch(monkeypatch, tmp_path, preset, names):
    """Metric: wall time of the failing call (< 2 s; the download client alone retried for ~15 s here)."""
    import time

    from huggingface_hub import constants

    from minigen.loading.auto import load_pipeline
    from minigen.loading.hub import ModelFetchError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to find locally
    start = time.perf_counter()
    with pytest.raises(ModelFetchError, match=f"HF_HUB_OFFLINE is set(.|\\n)*Offline, pass local files instead(.|\\n)*{names}"):
        load_pipeline(preset)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("dtype", [torch.int32, "float16", torch.bool])
def test_load_pipeline_names_a_dtype_that_is_not_a_float_type(dtype):
    """An int dtype was a RuntimeError about gradients, a string "Invalid device string"."""
    from minigen.loading.auto import load_pipeline

    with pytest.raises(TypeError, match="dtype takes a floating torch.dtype"):
        load_pipeline("toy-sd", dtype=dtype)


@pytest.mark.parametrize("script, argv", [
    ("train_residuals", ["--toy-concept", "my_heart", "--steps", "0"]),  # trained nothing and saved the file
    ("evaluate_residuals", ["--concepts", "0"]),
    ("evaluate_conductor", ["--train-steps", "0"]),  # named train_edlora's own --steps
    ("benchmark", ["unet", "--threads", "0"]),
    ("analyze_attention", ["--prompts", "0"]),
    ("train_aligngen", ["--reference-size", "0"]),
    ("train_edlora", ["--rank", "0"]),
])  # fmt: skip
def test_every_scripts_counts_below_one_are_refused_by_name_before_any_work(script, argv, capsys, tmp_path, monkeypatch):
    from conftest import load_script

    from minigen.cli import run

    monkeypatch.chdir(tmp_path)
    assert run(load_script(script).main, argv) == 2
    assert capsys.readouterr().err == f"error: argument {argv[-2]}: 0 is not positive; give 1 or more (see --help)\n"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script, argv, message", [
    ("train_aligngen", ["--lr-token", "-1"], "-1 is not a finite number of 0 or more"),  # AdamW refused it after the data and model loaded
    ("train_aligngen", ["--lr-dem", "nan"], "nan is not a finite number of 0 or more"),
    ("train_edlora", ["--lr-unet", "inf"], "inf is not a finite number of 0 or more"),
    ("train_edlora", ["--noise-offset", "nan"], "nan is not a finite number of 0 or more"),  # NaN noise, NaN loss
    ("train_toy", ["sd", "--lr", "0"], "0 is not a finite number above 0"),
    ("conduct", ["--cfg", "nan"], "nan is not a finite number of 0 or more"),  # the conductor ran 200 steps of NaN
    ("conduct", ["--alpha", "inf"], "inf is not a finite number of 0 or more"),
])  # fmt: skip
def test_learning_rates_and_offsets_that_are_not_finite_or_are_negative_are_refused_before_any_work(script, argv, message, capsys, tmp_path, monkeypatch):
    from conftest import load_script

    from minigen.cli import run

    monkeypatch.chdir(tmp_path)
    assert run(load_script(script).main, argv) == 2
    assert capsys.readouterr().err == f"error: argument {argv[-2]}: {message} (see --help)\n"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("text, message", [("x", "'x' is not a whole number; give 1 or more"), ("-3", "-3 is negative; give 1 or more")])
def test_a_count_that_is_not_a_whole_number_or_is_negative_is_named(text, message):
    import argparse

    from minigen.cli import non_negative_int, positive_int

    with pytest.raises(argparse.ArgumentTypeError, match=message):
        positive_int(text)
    assert positive_int("4") == 4 and non_negative_int("0") == 0


def test_benchmark_refuses_a_taken_out_before_measuring(capsys, tmp_path):
    from conftest import load_script

    from minigen.cli import run

    taken = tmp_path / "bench.json"
    taken.write_text("an earlier run\n")
    assert run(load_script("benchmark").main, ["gpu", "--dry-run", "--out", str(taken)]) == 2  # the dry run takes seconds: refused first
    assert "bench.json exists; choose another output path or allow overwriting (--overwrite)" in capsys.readouterr().err
    assert taken.read_text() == "an earlier run\n"


@pytest.mark.parametrize("script", ["benchmark", "compact_checkpoint"])
def test_help_prints_the_scripts_docstring_as_laid_out(script, capsys):
    """compact_checkpoint.py's --help ran its example command into the paragraph after it."""
    from conftest import load_script

    module = load_script(script)
    with pytest.raises(SystemExit) as exit:
        module.main(["--help"])
    assert exit.value.code == 0
    example = next(line for line in module.__doc__.splitlines() if line.startswith("    python scripts/"))
    assert example + "\n" in capsys.readouterr().out


@pytest.mark.parametrize("script, argv, message", [
    ("sample", ["--prompt", "a star", "--lag-quantile", "0.3"], "--lag-quantile applies with --lag"),
    ("sample", ["--prompt", "a star", "--mask-blur", "9"], "--mask-blur applies with --mask"),
    ("sample", ["--prompt", "a star", "--no-conceptrol", "--concept-layer", "up.1.0.0"], "--concept-layer applies with the gating"),
    ("sample", ["--prompt", "a star", "--model", "toy-flux", "--lag"], "Personalized Residuals (--residuals, --lag) sit on the UNet"),
    ("sample", ["--prompt", "a star", "--model", "toy-flux", "--no-ema"], "--no-ema) picks the non-EMA UNet weights of an SD training checkpoint; toy-flux is a FLUX model"),
    ("sample", ["--prompt", "a star", "--seed", str(2**32 - 1), "--n", "2"], "image k draws with seed + k, which must stay below 2^32"),
    ("sample", ["--prompt", "a star", "--n", "10001"], "--n 10001: at most 10000 images a call"),
    ("sample", ["--prompt", "a star", "--device", "meta"], "--device meta: minigen draws on cpu, cuda or mps"),
    ("sample", ["--prompt", "a star", "--clip-skip", "100"], "--clip-skip 100: this model's text encoder has"),
    ("sample", ["--prompt", "a star", "--out", "same.png", "--save-masks", "same.png"], "--save-masks same.png is also where an image goes"),
    ("sample", ["--prompt", "a star", "--n", "3", "--out", "b"], "--out b: give a .png file, e.g. b.png (with --n 3: b-0.png, b-1.png, ...)"),
    ("sample", ["--prompt", "a star", "--out", "."], "--out .: is a folder; give a file path inside it, e.g. image.png"),
    ("train_residuals", ["--toy-concept", "my_star", "--template", "a {foo} star", "--out", "r.safetensors"], "it may name {identifier} and {macro_class} only"),
    ("train_residuals", ["--toy-concept", "my_star", "--rank-ratio", "1.5", "--out", "r.safetensors"], "--rank-ratio 1.5: a share of each layer's width"),
    ("train_residuals", ["--toy-concept", "my_star", "--template", "a photo", "--out", "r.safetensors"], "--template 'a photo' has no {identifier}"),
    ("train_residuals", ["--toy-concept", "my_star", "--identifier", "two words", "--out", "r.safetensors"], "--identifier 'two words': one rare word"),
    ("train_residuals", ["--toy-concept", "my_star", "--out", "."], ". is a folder; give a file path inside it"),
    ("evaluate_residuals", ["--model", "toy-flux", "--concepts", "1"], "--model toy-flux: Personalized Residuals sit on an SD UNet"),
    ("train_residuals", ["--images", "a.png", "--class", "star", "--references", "5", "--out", "r.safetensors"], "with --images every image given is a reference"),
    ("train_residuals", ["--toy-concept", "my_star", "--references", "100", "--out", "r.safetensors"], "--references 100: the toy world renders 1 to 64"),
    ("train_edlora", ["--images", "a.png", "--word", "<x>", "--init-word", "star", "--references", "5", "--out", "e.safetensors"], "with --images every image given is a reference"),
    ("train_aligngen", ["--toy-pairs", "2", "--no-strategy", "--dropout", "0.3", "--out", "a.safetensors"], "--dropout and --names set the training strategy that --no-strategy turns off"),
    ("evaluate_conceptrol", ["--low-auc-layer", "down.0.0.0"], "--low-auc-layer is the mask-source ablation's block: it applies with --ablations"),
    ("evaluate_conceptrol", ["--seed", str(2**32 - 2)], "--seed 4294967294 with --prompts 20: image k draws with seed + k"),
    ("evaluate_conductor", ["--seed", str(2**32 - 2)], "--seed 4294967294 with --layouts 8: image k draws with seed + k"),
    ("conduct", ["--seed", str(2**32)], f"argument --seed: {2**32} is outside 0 .. 2^32 - 1"),
    ("analyze_attention", ["--seed", str(2**32 - 1), "--prompts", "2"], "--seed 4294967295 with --prompts 2: image k draws with seed + k"),
    ("train_toy", ["reader", "--work", "w", "--out", "x.safetensors"], "the reader stage keeps its readers in --work"),
    ("train_edlora", ["--toy-concept", "my_star", "--size", "32", "--out", "e.safetensors"], "--size resizes --images"),
    ("train_aligngen", ["--toy-pairs", "2", "--redux", "r", "--out", "a.safetensors"], "--redux and --siglip give --pairs' references"),
    ("benchmark", ["unet", "--only", "toy"], "unet does not read --only toy; its flags are --size, --repeats, --compile"),
    ("benchmark", ["unet", "--diffusers-resnets"], "--diffusers-resnets chooses what --compile compiles in diffusers' UNet; add --compile"),
], ids=lambda value: value if isinstance(value, str) and " " not in value and len(value) < 20 else None)  # fmt: skip
def test_options_that_cannot_apply_are_refused_on_one_line_before_any_work(script, argv, message, capsys, tmp_path, monkeypatch):
    from conftest import load_script

    from minigen.cli import run

    monkeypatch.chdir(tmp_path)
    assert run(load_script(script).main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script", ["evaluate_conductor", "evaluate_residuals", "evaluate_aligngen"])
def test_a_work_folder_that_is_a_file_is_refused_at_once(script, tmp_path, capsys):
    """Was a bare '[Errno 17] File exists' when the first file was written (evaluate_conductor, evaluate_aligngen),
    or '[Errno 20] Not a directory' once the model was loaded (evaluate_residuals)."""
    from conftest import load_script

    from minigen.cli import run

    (tmp_path / "text.txt").write_text("notes\n")
    for work, message in [("text.txt", "text.txt is a file, and --work names a folder (a missing one is made); give a folder"),
                          ("text.txt/sub", f"sub: {tmp_path / 'text.txt'} is a file, so nothing can be written under it")]:
        assert run(load_script(script).main, ["--work", str(tmp_path / work)]) == 2
        err = capsys.readouterr().err
        assert f"--work {tmp_path / work}" in err and message in err and err.count("\n") == 1, err
    assert (tmp_path / "text.txt").read_text() == "notes\n"


def test_torchrun_with_one_prompt_is_refused(capsys, tmp_path, monkeypatch):
    from conftest import load_script

    from minigen.cli import run

    monkeypatch.chdir(tmp_path)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    assert run(load_script("sample").main, ["--prompt", "a star", "--out", "a.png"]) == 2
    assert "under torchrun, draw a prompt file with --prompts FILE" in capsys.readouterr().err


def test_a_batch_larger_than_the_images_asked_for_is_refused(capsys, tmp_path, monkeypatch):
    """`--batch-size 4` alone drew one image (a call draws at most --n): refused, before the model loads."""
    from conftest import load_script

    from minigen.cli import run

    monkeypatch.chdir(tmp_path)
    script = load_script("sample")
    monkeypatch.setattr(script, "load_model", lambda *a, **k: pytest.fail("the model loads only after the checks"))
    assert run(script.main, ["--prompt", "a star", "--batch-size", "4", "--out", "a.png"]) == 2
    assert "--batch-size 4 with --n 1: a call draws at most the --n images asked for; give --n 4" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()


def test_train_toy_never_replaces_its_default_export_unasked(capsys, tmp_path):
    """Without --out the model is exported to <work>/toy-sd.safetensors: an existing one is refused before
    any work (as an explicit --out is), and kept byte for byte."""
    from conftest import load_script

    from minigen.cli import run

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "toy-sd.safetensors").write_bytes(b"an earlier export")
    assert run(load_script("train_toy").main, ["sd", "--work", str(tmp_path / "w"), "--steps", "1"]) == 2
    assert "toy-sd.safetensors (the default --out, in --work) exists" in capsys.readouterr().err
    assert (tmp_path / "w" / "toy-sd.safetensors").read_bytes() == b"an earlier export"


def test_ctrl_c_ends_a_script_with_one_line_and_code_130(capsys):
    """Ctrl-C printed a KeyboardInterrupt traceback of some 20 lines from every script."""
    from minigen import cli

    def main(argv):
        raise KeyboardInterrupt

    assert cli.run(main, []) == 130
    err = capsys.readouterr().err
    assert "interrupted; finished files are kept" in err and "Traceback" not in err
    with pytest.raises(KeyboardInterrupt):
        cli.run(main, ["--debug"])


def test_an_output_folder_that_takes_no_files_is_refused_before_the_work(tmp_path):
    """train_toy.py, train_toy_adapters.py and evaluate_conceptrol.py checked --out for existence only: an
    output under a file (or in a read-only folder) was found when the work was done."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"--out .*file/out.md: .*file is a file, so nothing can be written under it"):
        check_writable(tmp_path / "file" / "out.md", "--out")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root writes anywhere: the check is then the temporary file's
            with pytest.raises(PermissionError, match=r"--out .*locked/out.md: cannot write into .*locked"):
                check_writable(locked / "out.md", "--out")
    finally:
        locked.chmod(0o700)
    check_writable(tmp_path / "new" / "deeper" / "out.md", "--out")  # folders still to make, under one that takes files
    assert not (tmp_path / "new").exists()
