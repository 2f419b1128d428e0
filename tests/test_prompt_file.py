"""minigen/prompt_file.py: prompt lists and JSONL files read into one job per image, the seed rule and
file names, and every bad line refused with its file and line number."""

from __future__ import annotations

import json
import re

import pytest

from minigen.prompt_file import SEED_STRIDE, PromptJob, read_prompt_file


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_a_prompt_list_skips_blank_lines_and_comments_and_numbers_prompts_not_lines(tmp_path):
    path = write(tmp_path, "prompts.txt", "# stars\n  a yellow star on grass  \n\n# circles\na blue circle on sand\n")
    jobs = read_prompt_file(path, seed=10, n=2)
    assert [(job.prompt, job.index, job.line, job.seed, job.name) for job in jobs] == [
        ("a yellow star on grass", 0, 2, 10, "00000-s10.png"),
        ("a yellow star on grass", 0, 2, 11, "00000-s11.png"),
        ("a blue circle on sand", 1, 5, 10 + SEED_STRIDE, "00001-s1010.png"),
        ("a blue circle on sand", 1, 5, 11 + SEED_STRIDE, "00001-s1011.png"),
    ]
    assert all(job.settings == {} for job in jobs) and jobs[2].where == f"{path}:5"


def test_jsonl_lines_carry_their_own_settings_seed_count_and_file_name(tmp_path):
    path = write(tmp_path, "prompts.jsonl", "\n".join([
        '{"prompt": "a red star", "steps": 3, "cfg": 5, "negative": "blurry", "sampler": "Euler a", "width": 32, "height": 48}',
        "# a comment",
        '{"prompt": "a blue box", "seed": 7, "n": 2, "out": "box.png", "guidance": 3.5}',
        '{"prompt": "a green heart", "out": "heart.png"}',
    ]))  # fmt: skip
    jobs = read_prompt_file(path, seed=100)
    assert jobs[0] == PromptJob("a red star", {"negative": "blurry", "steps": 3, "cfg": 5, "width": 32, "height": 48, "sampler": "Euler a"},
                                100, "00000-s100.png", 0, 1, path)  # fmt: skip
    assert [(job.seed, job.name, job.settings) for job in jobs[1:3]] == [(7, "box-0.png", {"guidance": 3.5}), (8, "box-1.png", {"guidance": 3.5})]
    assert (jobs[3].seed, jobs[3].name, jobs[3].line) == (100 + 2 * SEED_STRIDE, "heart.png", 4)


def test_jsonl_is_recognised_by_its_lines_unless_the_file_is_named_txt(tmp_path):
    lines = '{"prompt": "a red star", "seed": 1}\n\n{"prompt": "a blue box", "seed": 2}\n'
    assert [job.prompt for job in read_prompt_file(write(tmp_path, "prompts", lines), seed=None)] == ["a red star", "a blue box"]
    as_text = read_prompt_file(write(tmp_path, "prompts.txt", lines), seed=0)
    assert as_text[0].prompt == '{"prompt": "a red star", "seed": 1}'
    mixed = read_prompt_file(write(tmp_path, "mixed.txt", '{"prompt": "a red star"}\na blue box\n'), seed=0)
    assert [job.prompt for job in mixed] == ['{"prompt": "a red star"}', "a blue box"]
    assert read_prompt_file(write(tmp_path, "bom.txt", "\ufeffa red star\n"), seed=0)[0].prompt == "a red star"


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "stpes": 3}', "unknown key 'stpes'; did you mean 'steps'? the keys are prompt, negative"),
    ('{"prompt": "a", "steps": "30"}', "'steps' must be a positive integer, got \"30\""),
    ('{"prompt": "a", "steps": 2.5}', "'steps' must be a positive integer, got 2.5"),
    ('{"prompt": "a", "n": 0}', "'n' must be a positive integer up to 10000, got 0"),
    ('{"prompt": "a", "cfg": true}', "'cfg' must be a finite number, got true"),
    ('{"prompt": "a", "cfg": NaN}', "'cfg' must be a finite number, got NaN"),
    ('{"prompt": "a", "seed": -1}', "'seed' must be an integer in 0 .. 2^32 - 1, got -1"),
    ('{"prompt": 3}', "'prompt' must be a string, got 3"),
    ('{"prompt": "a", "sampler": ["euler"]}', "'sampler' must be a string"),
    ('{"prompt": "a", "out": "sub/x.png"}', '"out" must be a PNG file name without folders or control characters, at most 240 bytes, like "star.png", got "sub/x.png"'),
    ('{"prompt": "a", "out": "a\\nb.png"}', '"out" must be a PNG file name without folders or control characters'),
    ('{"prompt": "a", "out": "' + "x" * 300 + '.png"}', '"out" must be a PNG file name without folders or control characters, at most 240 bytes'),
    ('{"prompt": "a", "cfg_scale": 7}', "unknown key 'cfg_scale'; did you mean 'cfg'?"),
    ('{"prompt": "a", "negative_prompt": "b"}', "unknown key 'negative_prompt'; did you mean 'negative'?"),
    ('null', 'a line must be a JSON object, {"prompt": "...", ...}, not null'),
    ('{"prompt": "a", "out": "x.jpg"}', '"out" must be a PNG file name without folders'),
    ('{"prompt": "a", "out": ".x.png"}', '"out" must be a PNG file name without folders'),
    ('{"negative": "a"}', 'no "prompt"; every line needs one'),
    ('{"prompt": "a", "prompt": "b"}', "the key 'prompt' is given twice; keep one"),
    ('{"prompt": "a",}', "not a JSON object (Expecting property name enclosed in double quotes, column 16)"),
    ('["a"]', "a line must be a JSON object"),
])  # fmt: skip
def test_a_bad_jsonl_line_is_refused_with_its_file_and_line(tmp_path, line, message):
    path = write(tmp_path, "prompts.jsonl", '{"prompt": "a good line"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: {message}")):
        read_prompt_file(path, seed=0)


def test_seeds_and_names_that_cannot_work_are_refused(tmp_path):
    path = write(tmp_path, "prompts.jsonl", '{"prompt": "a", "seed": 1}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: this line gives no seed; give a base seed")):
        read_prompt_file(path, seed=None)
    path = write(tmp_path, "big.jsonl", '{"prompt": "a", "seed": 4294967295, "n": 2}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: the seeds 4294967295 .. 4294967296, from its seed, pass 2^32 - 1")):
        read_prompt_file(path, seed=0)
    path = write(tmp_path, "base.txt", "a\nb\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: the seeds 4294968295 .. 4294968295, from the base seed (sample.py --seed) + 1000 x 1")):
        read_prompt_file(path, seed=4294967295)
    path = write(tmp_path, "same.jsonl", '{"prompt": "a", "out": "x.png"}\n{"prompt": "b", "n": 2, "out": "y.png"}\n{"prompt": "c", "out": "y-1.png"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: the file name y-1.png is also that of line 2")):
        read_prompt_file(path, seed=0)


def test_an_empty_missing_or_undecodable_file_is_refused(tmp_path):
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompt_file(write(tmp_path, "empty.txt", "# only a comment\n\n"), seed=0)
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        read_prompt_file(tmp_path / "missing.txt", seed=0)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        read_prompt_file(tmp_path, seed=0)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        read_prompt_file(tmp_path / "latin1.txt", seed=0)


def test_numbers_too_large_for_a_float_and_too_many_images_are_named(tmp_path):
    """A 300-digit cfg is no finite number (not an OverflowError), and "n" beyond MAX_IMAGES is refused
    before anything is drawn (not a MemoryError)."""
    from minigen.prompt_file import MAX_IMAGES, read_prompt_file

    for line, message in ((f'{{"prompt": "a", "cfg": {10**300}}}', "'cfg' must be a finite number"),
                          (f'{{"prompt": "a", "n": {MAX_IMAGES + 1}}}', f"'n' must be a positive integer up to {MAX_IMAGES}")):
        (tmp_path / "p.jsonl").write_text(line + "\n")
        with pytest.raises(ValueError, match=message):
            read_prompt_file(tmp_path / "p.jsonl", seed=1, n=1)


@pytest.mark.parametrize("name, text, message", [
    ("prompts.json", '[\n  {"prompt": "a red star"}\n]\n', "a .json file; minigen reads JSONL"),
    ("typo.prompts", '{"prompt": "a red star"}\n"prompt": "a blue box"}\n', ":2: not a JSON object, where other lines are"),
    ("a1111.txt", '--prompt "a red star" --steps 30\n', "looks like command-line options (A1111's prompts_from_file)"),
])  # fmt: skip
def test_json_or_options_in_a_text_file_are_not_drawn_as_prompts(tmp_path, name, text, message):
    """A JSON array file, a JSONL file with one broken line (read as text as a whole), or A1111's
    `--prompt ... --steps` lines were drawn as literal prompts ("[", "{", '"prompt": "a red star",'); a .txt
    file is plain prompts, whatever they start with."""
    path = write(tmp_path, name, text)
    with pytest.raises(ValueError, match=re.escape(message)):
        read_prompt_file(path, seed=0)
    assert [job.prompt for job in read_prompt_file(write(tmp_path, "brackets.txt", "[blurry] background, a star\n"), seed=0)] == [
        "[blurry] background, a star"]  # A1111's de-emphasis starts a prompt with "["


def test_lines_end_where_editors_end_them(tmp_path):
    """str.splitlines also splits at U+2028, NEL and form feeds: a valid JSONL line holding U+2028 was refused,
    and a two-line text file read as four prompts whose line numbers matched no editor."""
    path = tmp_path / "ls.jsonl"
    path.write_text(json.dumps({"prompt": "a red star\u2028on grass", "seed": 1}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_prompt_file(path, seed=None)[0].prompt == "a red star\u2028on grass"
    path = tmp_path / "nel.txt"
    path.write_text("a red\x85star\r\na blue\x0cbox\ra green circle\n", encoding="utf-8")
    assert [(job.line, job.prompt) for job in read_prompt_file(path, seed=0)] == [(1, "a red\x85star"), (2, "a blue\x0cbox"), (3, "a green circle")]
