"""A long run's finished pieces, one JSON line each, so that a killed run goes on where it stopped.

An evaluation draws hundreds of images; killed after an hour, it should not start over. It writes a
journal beside its outputs: a first line with the run's settings, then one line per finished piece
(a case, a layout), appended and flushed to disk as each piece ends. Run the same command again and
the pieces in the journal are read back instead of drawn; the finished run deletes its journal.

A journal of other settings belongs to another run: it is refused, naming what differs, unless the
caller starts afresh (`restart=True`, a script's `--force`) or it holds nothing finished. One of the
same settings is always resumed (delete it to draw everything again). A line cut
short by the kill is dropped (that piece runs again). Values go through JSON, so a resumed run reports
exactly what an uninterrupted one does: Python's floats print and read back bit for bit.

    journal = Journal(out.with_suffix(".journal.jsonl"), settings, restart=args.force)
    journal.report_resumed(len(cases), "cases")  # "resuming the killed run in ...: 3 of 10 cases drawn"
    for case in cases:
        if case.key not in journal.done:
            journal.add(case.key, measure(case))
    results = [journal.done[case.key] for case in cases]
    ...write the outputs...
    journal.close()
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def append_line(path: Path, line: str) -> None:
    """Append one line to `path` in a single write and flush it to disk. Earlier lines are never
    touched, and a line cut short by a crash is ended before the next one starts."""
    handle = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(handle).st_size
        data = (b"\n" if size and os.pread(handle, 1, size - 1) != b"\n" else b"") + line.encode() + b"\n"
        while data:
            data = data[os.write(handle, data) :]
        os.fsync(handle)
    finally:
        os.close(handle)


def read_json_lines(path: Path) -> list[Any]:
    """The JSON values of a file's lines; a line cut short by a crash (not JSON) is left out."""
    values = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            values.append(json.loads(line))
        except ValueError:
            continue
    return values


class Journal:
    """The finished pieces of one run, by key: `done` holds those of an earlier, killed run of the same settings."""

    def __init__(self, path: Path, settings: dict, restart: bool = False, flag: str = "--force"):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))  # as a resumed run reads them back
        lines = read_json_lines(self.path) if self.path.exists() else []
        if lines and lines[0] != {"settings": self.settings}:
            if not restart and len(lines) > 1:  # nothing finished is lost by starting afresh
                earlier = lines[0].get("settings", {}) if isinstance(lines[0], dict) else {}
                changed = sorted(k for k in {*earlier, *self.settings} if earlier.get(k) != self.settings.get(k)) or ["(unreadable)"]
                raise ValueError(f"{self.path} holds the finished part of a killed run of other settings ({', '.join(changed)} differ): "
                                 f"run that command again to finish it, or pass {flag} to start this one afresh")  # fmt: skip
            lines = []
        if not lines:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)
            append_line(self.path, json.dumps({"settings": self.settings}))
        self.done: dict[str, Any] = {line["key"]: line["value"] for line in lines[1:] if isinstance(line, dict) and "key" in line}
        self.resumed = len(self.done)

    def report_resumed(self, total: int, pieces: str) -> None:
        """Say on stderr that this run goes on from a killed one, and how far that one got."""
        if self.resumed:
            print(f"resuming the killed run in {self.path}: {self.resumed} of {total} {pieces} drawn", file=sys.stderr)

    def add(self, key: str, value: Any) -> Any:
        """Record a finished piece; returns its value as read back (what a resumed run gets)."""
        line = json.dumps({"key": key, "value": value})
        append_line(self.path, line)
        self.done[key] = json.loads(line)["value"]
        return self.done[key]

    def close(self) -> None:
        """The run's outputs are written: its journal goes."""
        self.path.unlink(missing_ok=True)
