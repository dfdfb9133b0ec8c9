"""``vitprune prune METHOD``: one sub-command per method, registered by ``vitprune.cli.prune_<method>``."""

from __future__ import annotations

import argparse
import importlib

PRUNE_MODULES = ["vitprune.cli.prune_vtp", "vitprune.cli.prune_nvit", "vitprune.cli.prune_obs"]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("prune", help="prune a model (nvit, obs, vtp, ...)")
    methods = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name in PRUNE_MODULES:
        importlib.import_module(name).register_prune(methods)
