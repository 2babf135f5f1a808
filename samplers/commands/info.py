"""``avatar-kernels info``: the op x backend table with reasons (same as python -m kernels.info)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    from kernels.info import main

    return main([])
