"""Helpers every benchmark script shares: where the real model/data live, what machine ran, where results go.

A benchmark writes ``benchmarks/results/<name>.json`` (the numbers plus :func:`environment`) and
``benchmarks/results/<name>.md`` (a Markdown table plus the same provenance), both atomically.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

if str(REPO) not in sys.path:  # run as ``python benchmarks/x.py`` without installing
    sys.path.insert(0, str(REPO))

from vitprune.training import runinfo  # noqa: E402
from vitprune.utils.fs import atomic_write_text  # noqa: E402


def shared_root() -> Path:
    """``$VITPRUNE_SHARED`` or ``../shared`` relative to the repository root."""
    return Path(os.environ.get("VITPRUNE_SHARED", REPO.parent / "shared")).resolve()


def shared_model() -> Path:
    return shared_root() / "models" / "vit_tiny_patch16_224.tinyimagenet200"


def shared_data() -> Path:
    return shared_root() / "data" / "tiny-imagenet-200"


def command_line() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def git_commit() -> str:
    return runinfo.git_commit(REPO)


def environment() -> dict[str, Any]:
    """Machine, software and provenance of a benchmark run (:mod:`vitprune.training.runinfo`)."""
    machine = runinfo.machine_info() | {"loadavg": runinfo.loadavg()}
    return {
        "command": command_line(),
        "date": runinfo.utc_now(),
        "git_commit": git_commit(),
        "machine": machine,
        "python": machine["python"],
        "torch": machine["torch"],
        "shared_root": str(shared_root()),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance_markdown(env: dict[str, Any]) -> str:
    m = env["machine"]
    return (
        f"- command: `{env['command']}`\n"
        f"- date (UTC): {env['date']}; git: {env['git_commit']}\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}"
        + (f", GPU {m['cuda']}" if m.get("cuda") else "")
        + (f", load average {m['loadavg'][0]:.1f} when written" if m.get("loadavg") else "")
        + f"\n- torch {env['torch']}, Python {env['python']}\n"
    )


def write_results(name: str, record: dict[str, Any], markdown: str, results_dir: Path | None = None) -> Path:
    """Write ``<name>.json`` (``record`` + ``environment``) and ``<name>.md`` (``markdown`` + provenance)."""
    out = Path(results_dir or RESULTS)
    env = record.setdefault("environment", environment())
    atomic_write_text(out / f"{name}.json", json.dumps(record, indent=2, default=str) + "\n", overwrite=True)
    atomic_write_text(out / f"{name}.md", markdown.rstrip() + "\n\n" + provenance_markdown(env), overwrite=True)
    return out / f"{name}.json"


loadavg = runinfo.loadavg


def ci95(top1_pct: float, n: int) -> float:
    """Half-width (points) of the normal-approximation 95 % interval of a top-1 measured on ``n`` images."""
    p = top1_pct / 100
    return 196 * math.sqrt(p * (1 - p) / n) if n else float("nan")


def cached_batches(dataset, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decode and preprocess once; every model is then evaluated on the same tensors."""
    from vitprune.data import make_loader

    return [(x, torch.as_tensor(y)) for x, y in make_loader(dataset, batch_size, workers=0)]
