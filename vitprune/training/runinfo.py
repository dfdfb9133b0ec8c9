"""Provenance of a training run: machine, software, load, command line."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other processes competing for the CPU), if the OS reports them."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def command_line(argv: list[str] | None = None, prog: str = "vitprune") -> str:
    args = sys.argv[1:] if argv is None else argv
    return shlex.join([prog, *args])


def git_commit(repo: str | os.PathLike) -> str:
    """``<sha>`` of ``repo``'s HEAD, with ``+dirty`` when tracked files have uncommitted changes; ``unknown``
    outside a git checkout."""
    import subprocess

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class LoadSampler:
    """A trainer hook recording the 1-minute load average every ``every`` steps (to qualify wall times)."""

    def __init__(self, every: int = 50) -> None:
        self.every = every
        self.samples: list[float] = []
        first = loadavg()
        if first:
            self.samples.append(first[0])

    def __call__(self, trainer: Any, step: int) -> None:
        if step % self.every == 0:
            la = loadavg()
            if la:
                self.samples.append(la[0])

    def summary(self) -> dict[str, float] | None:
        if not self.samples:
            return None
        return {
            "mean_1min": round(sum(self.samples) / len(self.samples), 2),
            "max_1min": max(self.samples),
            "samples": len(self.samples),
        }
