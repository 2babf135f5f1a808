"""The ``avatar-kernels`` command: info, bench, train, sample, eval and demo subcommands.

It lives at the top of the dependency chain (``samplers -> avatar_models -> kernels``) because
sampling, training and the demo need all three layers. Each subcommand is a module in
``samplers/commands/`` exposing ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their subcommand runs, so ``avatar-kernels info`` never imports diffusers.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "info": ("samplers.commands.info", "which backend runs which op here, and why not"),
    "bench": ("samplers.commands.bench", "run an op's benchmark (GPU; --smoke on CPU)"),
    "train": ("samplers.commands.train", "train a system, e.g. `train anchored`"),
    "sample": ("samplers.commands.sample", "generate a video, e.g. `sample anchored`"),
    "eval": ("samplers.commands.evaluate", "metrics of a generated video against its inputs"),
    "demo": ("samplers.commands.demo", "the bundled end-to-end demo (CPU, minutes)"),
}


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(
        prog="avatar-kernels",
        description="Fused kernels, models and samplers for long-video avatar diffusion.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen subcommand's module is imported
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
    return parser, module


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 2
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
