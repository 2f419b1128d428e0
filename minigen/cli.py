"""What the scripts' command lines share: bad input ends with one line on stderr and exit code 2.

    def main(argv=None): args = Parser(description=__doc__).parse_args(argv); ...
    if __name__ == "__main__":
        sys.exit(run(main))

`run` prints a failure of the kinds in `errors` (ValueError and OSError by default: minigen's
CheckpointError and NonFiniteError are ValueErrors; a missing file, an unreachable hub and a refused
pickle are OSErrors) as `error: <message>` on one line, with no traceback unless the arguments hold
`--debug`; a `sys.exit("message")` of an argument check is printed the same way.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, `<message> (see --help)`, printed by `run` (exit code 2), and
    which takes the `--debug` that `run` reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the full traceback of an error")

    def error(self, message: str):
        raise SystemExit(f"{message} (see --help)")


def run(
    main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None, *,
    errors: tuple[type[BaseException], ...] = (ValueError, OSError), resumes: bool = False,
) -> int:  # fmt: skip
    """`main(argv)` for the command line: 0 when it returns, 2 (and one line on stderr) when it fails,
    130 (and one line) when Ctrl-C stops it; `resumes`: the script keeps checkpoints (or a journal of its
    finished work) and goes on from them when run again, which that line then says."""
    try:
        main(argv)
    except KeyboardInterrupt:
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        again = "; the same command run again goes on from where it stopped" if resumes else ""
        print(f"\ninterrupted; finished files are kept{again}", file=sys.stderr)
        return 130
    except errors as error:
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        print("error: " + " ".join(str(error).split()), file=sys.stderr)  # one line, also for a multi-line message
        return 2
    except SystemExit as exit:  # the sys.exit(message) of an argument check
        if isinstance(exit.code, str):
            print(f"error: {exit.code}", file=sys.stderr)
            return 2
        raise
    return 0


def draw_seed(text: str) -> int:
    """An argparse type: a seed to draw with, 0 .. 2^32 - 1 (torch's CPU generator reads a seed's low 32 bits)."""
    from minigen.pipelines.arguments import MAX_SEED

    value = _count(text, 0, "give 0 or more")
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is outside 0 .. 2^32 - 1 (torch's CPU generator reads a seed's low 32 bits)")
    return value


def check_seeds(parser: argparse.ArgumentParser, seed: int, count: int, flag: str) -> None:
    """Refuse, as `parser`'s error, a base seed whose `count` images (seeds seed .. seed + count - 1) pass 2^32 - 1."""
    from minigen.pipelines.arguments import MAX_SEED

    if seed + count - 1 > MAX_SEED:
        parser.error(f"--seed {seed} with {flag} {count}: image k draws with seed + k, which must stay below 2^32; give a smaller --seed")


def positive_int(text: str) -> int:
    """An argparse type: a count of 1 or more (steps, batch, size, threads)."""
    return _count(text, 1, "give 1 or more")


def non_negative_int(text: str) -> int:
    """An argparse type: a count of 0 or more (0 turns the option off)."""
    return _count(text, 0, "give 0 (off) or more")


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0 (a learning rate, a share)."""
    return _number(text, lambda value: value > 0, "above 0")


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number of 0 or more (a learning rate where 0 freezes that part)."""
    return _number(text, lambda value: value >= 0, "of 0 or more")


def _number(text: str, allowed: Callable[[float], bool], what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and allowed(value)):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number {what}")
    return value


def _count(text: str, least: int, fix: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; {fix}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text} is {'negative' if value < 0 else 'not positive'}; {fix}")
    return value
