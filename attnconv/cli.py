"""The ``attnconv`` command: a thin layer over the library's functions of the same names."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from attnconv.training.commands import add_training_commands, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnconv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    add_training_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run_command(args)


if __name__ == "__main__":
    main()
