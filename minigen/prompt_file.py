"""Prompt files: many prompts, each with its own settings, read into a list of images to draw.

Two formats. A text file holds one prompt per line:

    a large yellow star on grass
    # a comment
    a small blue circle on sand

A JSONL file (suffix `.jsonl`; or, unless the suffix is `.txt`, every line that is not blank or a
comment starts with "{"; some but not all is a broken file, refused) holds one JSON object per line, a "prompt" and any of the settings of `LINE_KEYS`, which replace the command
line's for that line only:

    {"prompt": "a large yellow star on grass", "seed": 7, "n": 2, "steps": 30, "out": "star.png"}

In both, blank lines and lines starting with "#" are skipped. An unknown key, a value of the wrong
type and a file name with folders are refused with the file and line: `prompts.jsonl:3: ...`.

Seeds and file names follow from the file alone, never from how the work is split among processes.
The prompt at index i (0, 1, ... counting prompts, not lines) draws with `seed + SEED_STRIDE * i`
unless its line gives a "seed"; its n images take that seed, +1, ..., +n-1 (as `sample.py --n` does).
Image k of prompt i is the file `<i:05d>-s<seed>.png` (`00012-s12000.png`), or with an "out" name the
file `out` itself (n = 1) or `<out stem>-<k>.png` (n > 1). Inserting a prompt into the file shifts the
index, hence the default seed and name, of every prompt after it.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minigen.pipelines.arguments import MAX_SEED

SEED_STRIDE = 1000  # prompt i's default seed is seed + 1000 i: prompts with n <= 1000 share no seed
MAX_IMAGES = 10_000  # "n" of one line: more is a typo (or a job for more lines)
MAX_NAME_BYTES = 240  # an "out" name: filesystems take 255 bytes, and n > 1 adds "-<k>"

# The keys of a JSONL line and the type of each value. "number" is an int or a finite float.
LINE_KEYS = {
    "prompt": "string", "negative": "string", "prompt_2": "string", "negative_2": "string", "seed": "seed", "n": "positive integer", "steps": "positive integer",
    "cfg": "number", "cfg_rescale": "number", "guidance": "number", "width": "positive integer", "height": "positive integer",
    "sampler": "string", "out": "file name",
}  # fmt: skip
# Other programs' names for those keys (A1111's infotext and prompts_from_file, diffusers' arguments): named in the hint.
ALIASES = {"cfg_scale": "cfg", "guidance_scale": "cfg", "negative_prompt": "negative", "sampler_name": "sampler", "count": "n",
           "batch_size": "n", "n_iter": "n", "num_images_per_prompt": "n", "num_inference_steps": "steps", "size": "width"}  # fmt: skip
# The keys that are settings of the image (the others say which images and where they go).
SETTING_KEYS = ("negative", "prompt_2", "negative_2", "steps", "cfg", "cfg_rescale", "guidance", "width", "height", "sampler")


@dataclass(frozen=True)
class PromptJob:
    """One image of a prompt file: what to draw, with which seed, into which file.

    `settings` holds only what the line itself set (some of `SETTING_KEYS`, values as written);
    the caller fills in the rest from its own defaults. `index` is the prompt's position among the
    file's prompts, `line` its line number (from 1) in `source`.
    """

    prompt: str
    settings: dict[str, Any]
    seed: int
    name: str
    index: int
    line: int
    source: Path

    @property
    def where(self) -> str:
        """`prompts.jsonl:3`, the start of every message about this line."""
        return f"{self.source}:{self.line}"


def read_prompt_file(path: str | Path, *, seed: int | None, n: int = 1) -> list[PromptJob]:
    """The images a prompt file asks for, in file order: each prompt's n images, one job each.

    `seed` is the base seed (None is allowed only when every line gives its own), `n` the images per
    prompt where a line does not say. A bad file is a ValueError naming the file and line.
    """
    path = Path(path)
    lines = read_lines(path)
    if not lines:
        raise ValueError(f"{path} holds no prompts (blank lines and lines starting with # are skipped); write one prompt per line")
    suffix = path.suffix.lower()
    json_lines = suffix == ".jsonl" or (suffix != ".txt" and all(text.startswith("{") for _, text in lines))
    if suffix == ".json":
        raise ValueError(f"{path}: a .json file; minigen reads JSONL (one object per line, suffix .jsonl) or plain prompts (.txt)")
    if not json_lines and suffix != ".txt" and any(text.startswith("{") for _, text in lines):  # JSONL with a broken line
        number = next(number for number, text in lines if not text.startswith("{"))
        raise ValueError(f"{path}:{number}: not a JSON object, where other lines are; write every line as one (JSONL), or give "
                         "the file the suffix .txt to read each line as a prompt")
    jobs, names = [], {}
    for index, (number, text) in enumerate(lines):
        where = f"{path}:{number}"
        if not json_lines and text.startswith("--"):  # A1111's prompts_from_file lines would be drawn as text
            raise ValueError(f"{where}: {text[:40]!r} looks like command-line options (A1111's prompts_from_file); write them as "
                             'a JSONL line, {"prompt": "...", "steps": 30}')
        fields = parse_json_line(text, where) if json_lines else {"prompt": text}
        prompt_seed = fields.get("seed", None if seed is None else seed + SEED_STRIDE * index)
        if prompt_seed is None:
            raise ValueError(f"{where}: this line gives no seed; give a base seed (sample.py --seed N: prompt i then draws with N + {SEED_STRIDE} i)")
        count = fields.get("n", n)
        if prompt_seed + count - 1 > MAX_SEED:
            given = "its seed" if "seed" in fields else f"the base seed (sample.py --seed) + {SEED_STRIDE} x {index} (its prompt's index)"
            raise ValueError(f"{where}: the seeds {prompt_seed} .. {prompt_seed + count - 1}, from {given}, pass 2^32 - 1; choose a smaller seed")
        settings = {key: fields[key] for key in SETTING_KEYS if key in fields}
        for k in range(count):
            name = file_name(fields.get("out"), index, k, count, prompt_seed + k)
            if name in names:
                raise ValueError(f"{where}: the file name {name} is also that of line {names[name]}; give the lines different \"out\" names")
            names[name] = number
            jobs.append(PromptJob(fields["prompt"], settings, prompt_seed + k, name, index, number, path))
    return jobs


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of each line that is neither blank nor a comment."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a prompt file (one prompt per line, or JSONL)")
    if not path.exists():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first prompt
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); save it as UTF-8") from error
    # \n, \r\n and \r end a line, as editors count them (str.splitlines also splits at U+2028, form feeds, ...)
    lines = [(number, line.strip()) for number, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), start=1)]
    return [(number, line) for number, line in lines if line and not line.startswith("#")]


def parse_json_line(text: str, where: str) -> dict[str, Any]:
    """One JSONL line as checked fields: a "prompt", known keys only, each of its type."""
    try:
        fields = json.loads(text, object_pairs_hook=lambda pairs: refuse_duplicates(pairs, where))
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not a JSON object ({error.msg}, column {error.colno}); write one object per line, "
                         '{"prompt": "...", ...}, or give the file a .txt suffix for plain prompts') from error  # fmt: skip
    if not isinstance(fields, dict):
        raise ValueError(f'{where}: a line must be a JSON object, {{"prompt": "...", ...}}, not {json.dumps(fields)[:40]}')
    for key, value in fields.items():
        if key not in LINE_KEYS:
            close = [ALIASES[key]] if key in ALIASES else difflib.get_close_matches(key, LINE_KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"{where}: unknown key {key!r}; {hint}the keys are {', '.join(LINE_KEYS)}")
        check_value(key, value, where)
    if "prompt" not in fields:
        raise ValueError(f'{where}: no "prompt"; every line needs one, {{"prompt": "...", ...}}')
    return fields


def refuse_duplicates(pairs: list[tuple[str, Any]], where: str) -> dict[str, Any]:
    """json's object hook: a key given twice is an error (json.loads would keep the last silently)."""
    fields = {}
    for key, value in pairs:
        if key in fields:
            raise ValueError(f"{where}: the key {key!r} is given twice; keep one")
        fields[key] = value
    return fields


def check_value(key: str, value: Any, where: str) -> None:
    """Refuse a value that is not of its key's type (`LINE_KEYS`); true and false are not numbers."""
    kind = LINE_KEYS[key]
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind in ("string", "file name"):
        ok, wanted = isinstance(value, str), "a string"
    elif kind == "number":  # an int too large for a float (300 digits) is no finite number either
        ok, wanted = (is_int and abs(value) < 2**63 or isinstance(value, float) and math.isfinite(value)), "a finite number"
    elif kind == "seed":
        ok, wanted = is_int and 0 <= value <= MAX_SEED, "an integer in 0 .. 2^32 - 1"
    elif key == "n":
        ok, wanted = is_int and 0 < value <= MAX_IMAGES, f"a positive integer up to {MAX_IMAGES}"
    else:
        ok, wanted = is_int and value > 0, "a positive integer"
    if not ok:
        raise ValueError(f"{where}: {key!r} must be {wanted}, got {json.dumps(value)}")
    if kind == "file name" and (Path(value).name != value or "\\" in value or value.startswith(".") or not value.lower().endswith(".png")
                                or any(ord(c) < 32 or ord(c) == 127 for c in value) or len(value.encode()) > MAX_NAME_BYTES):
        raise ValueError(f'{where}: "out" must be a PNG file name without folders or control characters, at most {MAX_NAME_BYTES} '
                         f'bytes, like "star.png", got {json.dumps(value)[:80]}')


def file_name(out: str | None, index: int, k: int, count: int, seed: int) -> str:
    """Image k (of `count`) of prompt `index`: `00012-s12000.png`, or the line's "out" name."""
    if out is None:
        return f"{index:05d}-s{seed}.png"
    if count == 1:
        return out
    stem = Path(out).stem
    return f"{stem}-{k}{Path(out).suffix}"
