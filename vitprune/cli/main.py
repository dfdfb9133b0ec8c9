"""``vitprune`` entry point: sub-commands are registered by the modules listed in COMMAND_MODULES.

Each command module exposes ``register(subparsers)`` and sets ``func`` on its parsers; ``func(args)``
returns an exit code. A :class:`VitPruneError` (or an ``OSError`` of the file system) becomes a one-line
``error: ...`` and exit status 2; so does a usage error (:class:`OneLineParser`).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import NoReturn

from vitprune import __version__
from vitprune.errors import VitPruneError

COMMAND_MODULES = [
    "vitprune.cli.model_cmds",
    "vitprune.cli.prune_cmds",
    "vitprune.cli.train_cmds",
    "vitprune.cli.lut_cmds",
    "vitprune.cli.demo_cmds",
]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one ``error: <message>`` line on stderr and exit status 2 (usage is
    shown by ``--help`` only). ``add_subparsers`` builds sub-parsers of the parent's class, so every command
    (and the recipe mix-in, which subclasses a parser's own class) inherits it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {one_line_message(message, self.prog)}\n")


def one_line_message(message: str, prog: str = "vitprune") -> str:
    """argparse's message in CLI terms: ``argument --hflip: must be ...`` -> ``--hflip must be ...``."""
    message = " ".join(message.split())
    m = re.match(r"argument ([^:]+): (.*)", message)
    if m:
        flag = m.group(1).split("/")[-1]
        rest = m.group(2)
        sep = " " if rest.startswith(("must ", "expected ", "both ", "LO ")) else ": "
        message = f"{flag}{sep}{rest}"
    if message.startswith("the following arguments are required") and prog != "vitprune":
        message = f"{prog}: {message}"
    return message


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="vitprune", description="Prune Vision Transformers and measure them.")
    parser.add_argument("--version", action="version", version=f"vitprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2, its one line already printed)
        return exc.code if isinstance(exc.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the exact command, for provenance records
    try:
        return int(args.func(args) or 0)
    except VitPruneError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system failed us (no space, read-only, ...): one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
