"""``vitprune`` entry point: sub-commands are registered by the modules listed in COMMAND_MODULES.

Each command module exposes ``register(subparsers)`` and sets ``func`` on its parsers; ``func(args)``
returns an exit code. A :class:`VitPruneError` becomes a one-line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vitprune import __version__
from vitprune.errors import VitPruneError

COMMAND_MODULES = [
    "vitprune.cli.model_cmds",
    "vitprune.cli.prune_cmds",
    "vitprune.cli.train_cmds",
    "vitprune.cli.lut_cmds",
    "vitprune.cli.demo_cmds",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitprune", description="Prune Vision Transformers and measure them.")
    parser.add_argument("--version", action="version", version=f"vitprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the exact command, for provenance records
    try:
        return int(args.func(args) or 0)
    except VitPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
