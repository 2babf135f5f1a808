"""The ``avatar-kernels`` command: ``info`` and ``bench``, and the system verbs ``train``,
``sample``, ``eval`` and ``demo``.

It lives at the top of the dependency chain (``samplers -> avatar_models -> kernels``) because
sampling, training and the demo need all three layers.

- ``TOOLS``: verbs without a system; each is a module with ``add_arguments(parser)`` and
  ``run(args) -> int``. A tool that sets the parser default ``forward_unknown=True`` receives
  the arguments it does not declare in ``args.forwarded`` (``bench`` hands them to
  ``python -m bench``).
- ``SYSTEM_VERBS`` x ``SYSTEMS``: ``avatar-kernels VERB SYSTEM ...``. Each system is ONE module,
  ``samplers/commands/<system>.py``, exposing ``add_<verb>_arguments(parser)`` and
  ``run_<verb>(args) -> int`` for the verbs it has. A new system is one row of ``SYSTEMS``.

Only the chosen module is imported, so ``avatar-kernels info`` never imports diffusers.

Errors: a user error (a bad option or input file, see
:func:`samplers.commands.validation.is_user_error`) prints ONE line naming the option or file
and exits with status 2; ``--debug`` (anywhere on the line) shows its traceback instead. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

PROG = "avatar-kernels"

# verb -> (module, one-line help)
TOOLS: dict[str, tuple[str, str]] = {
    "info": ("samplers.commands.info", "which backend runs which op here, and why not"),
    "bench": ("samplers.commands.bench",
              "benchmarks of every op (`python -m bench`; a reduced, labelled sweep on CPU)"),
}
# verb -> one-line help
SYSTEM_VERBS: dict[str, str] = {
    "train": "train a system, e.g. `train anchored`",
    "sample": "generate a video, e.g. `sample anchored`",
    "eval": "metrics of a generated video against its inputs, e.g. `eval anchored`",
    "demo": "a system's bundled end-to-end demo (CPU, minutes), e.g. `demo anchored`",
    "edit": "motion-space editing of an image, e.g. `edit warpface`",
}
# system -> (module, one-line help): the one table the system verbs dispatch on
SYSTEMS: dict[str, tuple[str, str]] = {
    "anchored": ("samplers.commands.anchored",
                 "Anchored Diffusion (sDiT on non-uniform sequences sharing an anchor frame)"),
    "lookahead": ("samplers.commands.lookahead", "Lookahead Anchoring (distant keyframe)"),
    "lavieid": ("samplers.commands.lavieid", "LaVieID (local router and temporal AR module)"),
    "warpface": ("samplers.commands.warpface", "WarpFace (face reenactment: WarpCA + MGME)"),
    "mcdm": ("samplers.commands.mcdm", "MCDM (archived/present-clip motion priors, memory)"),
}
# verb -> the system used when none is named (`avatar-kernels demo` is `demo anchored`)
DEFAULT_SYSTEM: dict[str, str] = {"demo": "anchored"}
USER_ERROR_STATUS = 2


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every option's help, except where there is nothing to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        nothing = action.default is None or action.default is False or action.default == []
        if nothing or action.default is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (option, problem, where to look)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(USER_ERROR_STATUS, f"{self.prog}: error: {message} (see `{self.prog} -h`)\n")


def _chosen(argv: Sequence[str]) -> tuple[str | None, str | None]:
    """(verb, system) named on the command line, before any parsing."""
    positional = [i for i, a in enumerate(argv) if not a.startswith("-")]
    if not positional:
        return None, None
    i = positional[0]
    verb = argv[i]
    system = argv[i + 1] if i + 1 < len(argv) and argv[i + 1] in SYSTEMS else None
    return verb, system


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The full parser; only the chosen verb's (and system's) module is imported. The chosen
    leaf parser's defaults hold ``run``, the function that executes it."""
    parser = _Parser(
        prog=PROG, description="Fused kernels, models and samplers for long-video avatar "
                               "diffusion.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error (allowed anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    verb, system = _chosen(argv)
    for name, (module_name, help_text) in TOOLS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            module = importlib.import_module(module_name)
            module.add_arguments(sp)
            sp.set_defaults(run=module.run)
    for name, help_text in SYSTEM_VERBS.items():
        vp = sub.add_parser(name, help=help_text, description=help_text)
        systems = vp.add_subparsers(dest="system", metavar="SYSTEM", required=True)
        for sys_name, (module_name, sys_help) in SYSTEMS.items():
            sp = systems.add_parser(sys_name, help=sys_help, description=f"{name}: {sys_help}")
            if (name, sys_name) == (verb, system):
                module = importlib.import_module(module_name)
                add = getattr(module, f"add_{name}_arguments", None)
                if add is None:
                    parser.error(f"{sys_name} has no `{name}` command")
                add(sp)
                sp.set_defaults(run=getattr(module, f"run_{name}"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    verb, system = _chosen(argv)
    if verb in DEFAULT_SYSTEM and system is None:
        at = argv.index(verb) + 1
        argv[at:at] = [DEFAULT_SYSTEM[verb]]
    try:
        parser = build_parser(argv)
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "forward_unknown", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.forwarded = [a for a in extra if a != "--"]
        if getattr(args, "run", None) is None:
            parser.print_help()
            return USER_ERROR_STATUS
        return int(args.run(args) or 0)
    except Exception as exc:
        from samplers.commands.validation import is_user_error

        if debug or not is_user_error(exc):
            raise
        message = " ".join(str(exc).split())  # one line, whatever the library wrote
        print(f"{PROG}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return USER_ERROR_STATUS


if __name__ == "__main__":
    sys.exit(main())
