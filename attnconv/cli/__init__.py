"""The ``attnconv`` command: a thin layer over the library's functions of the same names.

One parser per command group (:mod:`.training`, :mod:`.detection`, :mod:`.segmentation`,
:mod:`.tools`), one map
from library errors to messages and exit statuses (:mod:`.errors`). Building the parser imports
neither Lightning nor the training code: ``attnconv --help`` is quick.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence

from attnconv.cli import detection, segmentation, tools, training
from attnconv.cli.errors import classify, one_line

__all__ = ["build_parser", "main", "run_command"]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose "unrecognized arguments" names the command's close options
    (``--trainer.max_epoch`` -> ``--trainer.max_epochs``)."""

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}"
                       f"{_close_options(self, parsed, extras)}")
        return parsed


def _close_options(parser: argparse.ArgumentParser, parsed: argparse.Namespace,
                   extras: Sequence[str]) -> str:
    commands = parser._subparsers._group_actions[0].choices if parser._subparsers else {}
    command = commands.get(getattr(parsed, "command", None), parser)
    known = [o for o in command._option_string_actions if o.startswith("--")]
    close = [m for e in extras if e.startswith("--")
             for m in difflib.get_close_matches(e.split("=")[0], known, n=3)]
    return f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else ""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnconv", allow_abbrev=False,
        description="AW-convolution and RFAConv: layers, the papers' networks, training, "
        "detection, export and figures. Every refusal is one line on stderr with exit status "
        "2; --debug (anywhere) shows the traceback.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    training.add_parsers(sub)
    detection.add_parsers(sub)
    segmentation.add_parsers(sub)
    tools.add_parsers(sub)
    return parser


def run_command(args: argparse.Namespace, debug: bool = False) -> None:
    """Run a parsed command; a known error ends with one clear line on stderr and the exit
    status of :data:`attnconv.cli.errors.ERRORS` (2 for bad input)."""
    try:
        args.func(args)
    except Exception as err:
        kind = classify(err)
        if kind is None or debug or getattr(args, "debug", False):
            raise
        word, status = kind
        print(f"attnconv {args.command}: {word}: {one_line(err)}", file=sys.stderr)
        sys.exit(status)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    run_command(args, debug=debug)
