"""One resume fingerprint per run: every setting, the models' and the data's identity.

A run writes ``OUT/fingerprint.json`` once its inputs have been checked; ``--resume`` recomputes the
fingerprint and refuses to continue when anything differs, naming the flag (``cannot resume OUT: --data
differs (was A, now B)``). Identities are cheap: a model is its path plus the names, sizes and mtimes of its
files; a dataset is its root plus a hash of the sorted file list with sizes (a copy of the same data elsewhere
is the same data only if the path is the same too).

The pruners use the same functions: :func:`run_fingerprint` then :func:`check_resume_fingerprint` (on
``--resume``) and :func:`write_fingerprint` (once the inputs are checked, before the work starts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vitprune.errors import VitPruneError
from vitprune.utils.fs import atomic_write_text

FINGERPRINT_NAME = "fingerprint.json"
FORMAT_VERSION = 1
# argparse destinations that never change what a run computes: a resume may change them freely.
RUNTIME_DESTS = frozenset(
    {
        "func",
        "argv",
        "command",
        "resume",
        "overwrite",
        "out",
        "export",
        "ckpt_every",
        "log_every",
        "eval_every",
        "no_progress",
        "quiet",
        "json",
        "workers",
        "device",
        "threads",
        "skip_eval_before",
        "eval_batch_size",
        "recipe_info",
    }
)


def _plain(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples -> lists, paths -> str)."""
    return json.loads(json.dumps(value, default=str))


def flag_name(dest: str) -> str:
    """The CLI name of an argparse destination: ``data_root`` -> ``--data-root``, ``model`` -> ``MODEL``."""
    return dest.upper() if dest in ("model", "lut") else "--" + dest.replace("_", "-")


def settings_from_args(
    args: argparse.Namespace, ignore: Iterable[str] = RUNTIME_DESTS, path_dests: Iterable[str] = ()
) -> dict[str, Any]:
    """The parsed options that define a run (``ignore`` excluded); ``path_dests`` are stored as absolute paths."""
    skip, paths = set(ignore), set(path_dests)
    out: dict[str, Any] = {}
    for dest, value in sorted(vars(args).items()):
        if dest in skip or callable(value):
            continue
        if dest in paths and value is not None:
            value = os.path.abspath(os.fspath(value))
        out[dest] = _plain(value)
    return out


def _files_under(root: Path, limit: int | None = None) -> list[tuple[str, int, int]]:
    """``(relative path, size, mtime_ns)`` of the files under ``root``, sorted (hidden files skipped)."""
    rows = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            rows.append((os.path.relpath(full, root), st.st_size, st.st_mtime_ns))
            if limit is not None and len(rows) > limit:
                break
    return sorted(rows)


def model_identity(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Path, and the sizes and mtimes of the model file (or of the files of a model directory)."""
    if path is None:
        return None
    p = Path(path)
    ident: dict[str, Any] = {"path": os.path.abspath(p)}
    if p.is_file():
        st = p.stat()
        ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    elif p.is_dir():
        h = hashlib.sha256(json.dumps(_files_under(p, limit=1000)).encode())
        ident["files_sha256"] = h.hexdigest()[:16]
    else:
        ident["missing"] = True
    return ident


def data_identity(root: str | os.PathLike | None) -> dict[str, Any] | None:
    """Root path, file count and a hash of the sorted file list with sizes (a file: its size)."""
    if root is None:
        return None
    p = Path(root)
    ident: dict[str, Any] = {"path": os.path.abspath(p)}
    if p.is_file():
        ident["size"] = p.stat().st_size
    elif p.is_dir():
        rows = [(name, size) for name, size, _ in _files_under(p)]
        ident["files"] = len(rows)
        ident["files_sha256"] = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
    else:
        ident["missing"] = True
    return ident


def run_fingerprint(
    settings: Mapping[str, Any],
    models: Mapping[str, str | os.PathLike | None] | None = None,
    data: Mapping[str, str | os.PathLike | None] | None = None,
) -> dict[str, Any]:
    """The fingerprint of a run: ``settings`` (argparse destination -> value), the identity of each model
    (``{"model": path, "teacher": path}``) and of each data source (``{"data": root, "classes": file}``),
    keyed by the destination of the option that named them."""
    return {
        "format_version": FORMAT_VERSION,
        "settings": _plain(dict(settings)),
        "models": {k: model_identity(v) for k, v in (models or {}).items()},
        "data": {k: data_identity(v) for k, v in (data or {}).items()},
    }


def _show(value: Any) -> str:
    if isinstance(value, dict) and "path" in value:
        return str(value["path"])
    return "unset" if value is None else json.dumps(value) if not isinstance(value, str) else value


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """One phrase per difference, in CLI terms (``--data differs (was A, now B)``)."""
    out: list[str] = []
    s_set, c_set = saved.get("settings", {}), current.get("settings", {})
    for dest in sorted(set(s_set) | set(c_set)):
        a, b = s_set.get(dest, "<missing>"), c_set.get(dest, "<missing>")
        if a != b:
            out.append(f"{flag_name(dest)} differs (was {_show(a)}, now {_show(b)})")
    for section in ("models", "data"):
        s_sec, c_sec = saved.get(section, {}), current.get(section, {})
        for dest in sorted(set(s_sec) | set(c_sec)):
            a, b = s_sec.get(dest), c_sec.get(dest)
            if a == b:
                continue
            name = flag_name(dest)
            if a is None or b is None or a.get("path") != b.get("path"):
                phrase = f"{name} differs (was {_show(a)}, now {_show(b)})"
                if phrase not in out:
                    out.append(phrase)
            else:
                out.append(f"the files of {name} ({b['path']}) changed since the run started")
    return out


def read_fingerprint(out_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The fingerprint a run in ``out_dir`` recorded (None if it recorded none: a run older than fingerprints)."""
    path = Path(out_dir) / FINGERPRINT_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        raise VitPruneError(f"cannot resume {out_dir}: {path} is unreadable or not JSON") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise VitPruneError(f"cannot resume {out_dir}: {path} is not a vitprune run fingerprint")
    return data


def check_resume_fingerprint(out_dir: str | os.PathLike, current: Mapping[str, Any]) -> None:
    """Raise one line naming what differs between the run recorded in ``out_dir`` and ``current``."""
    saved = read_fingerprint(out_dir)
    if saved is None:
        return
    diff = fingerprint_differences(saved, current)
    if diff:
        more = f" (and {len(diff) - 2} more)" if len(diff) > 2 else ""
        raise VitPruneError(f"cannot resume {out_dir}: {'; '.join(diff[:2])}{more}")


def write_fingerprint(out_dir: str | os.PathLike, fingerprint: Mapping[str, Any]) -> Path:
    """Record ``fingerprint`` in ``out_dir`` (atomically; the directory is created)."""
    path = Path(out_dir) / FINGERPRINT_NAME
    return atomic_write_text(path, json.dumps(fingerprint, indent=2) + "\n", overwrite=True)


__all__ = [
    "FINGERPRINT_NAME",
    "RUNTIME_DESTS",
    "check_resume_fingerprint",
    "data_identity",
    "fingerprint_differences",
    "flag_name",
    "model_identity",
    "read_fingerprint",
    "run_fingerprint",
    "settings_from_args",
    "write_fingerprint",
]
