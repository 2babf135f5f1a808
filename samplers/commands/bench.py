"""``avatar-kernels bench [--op NAME] [--quick] [--out DIR] ...``: forwards to ``python -m bench``.

Benchmarks live in the source checkout (``bench/``), not in the installed wheel: run this from a
clone. Without a GPU it runs a reduced sweep under a ``cpu-<machine>`` results folder, which checks
the wiring and is not evidence (see bench/README.md).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

from samplers.commands.validation import OptionError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Every option belongs to `python -m bench` (--op NAME, --quick, --out DIR, --dtype, --mode,
    # --workload, --budget-s ...): the CLI forwards what it does not know.
    parser.epilog = ("Options are those of `python -m bench`: `avatar-kernels bench -- -h` "
                     "lists them.")
    parser.set_defaults(forward_unknown=True)


def find_bench_root() -> Path:
    """The source checkout holding ``bench/``: the one this package was imported from, else the
    working directory (an installed console script has neither on ``sys.path``)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "bench" / "harness.py").is_file():
            return root
    raise OptionError("bench/ is part of the source checkout: run `avatar-kernels bench` from "
                      "the repository root (or `python -m bench` there)")


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("bench") is None:
        sys.path.insert(0, str(find_bench_root()))
    entry = importlib.import_module("bench.__main__")
    return int(entry.main(args.forwarded) or 0)
