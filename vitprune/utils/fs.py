"""Write outputs atomically and never overwrite silently.

:func:`check_output` is the one check every command runs on its output path before any work starts:
the parent chain must be writable directories, the target must not exist (or, with ``--overwrite``, must be
of the kind the command writes: a file, a vitprune model directory or a run directory), and nothing else is
ever deleted. :func:`atomic_path` / :func:`atomic_write_text` write through a temporary sibling and keep the
previous output intact when the write fails; every ``OSError`` on output becomes one :class:`VitPruneError`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from vitprune.errors import VitPruneError

OutputKind = Literal["file", "dir", "run_dir"]

# Temporary siblings are named ``.<name>.tmp<pid>.<random>``: a later run recognises (and removes) those of
# processes that no longer exist, e.g. a checkpoint write killed with SIGKILL.
TMP_TAG = ".tmp"
# Files whose presence makes a directory a vitprune run / report directory (replaceable with --overwrite).
RUN_MARKERS = ("checkpoint.pt", "summary.json", "metrics.jsonl", "report.json", "fingerprint.json")
MODEL_MARKERS = (("config.json", "model.safetensors"), ("config.json", "model.sparse.safetensors"))


def os_error_text(exc: OSError) -> str:
    """``strerror`` of an OSError (``No space left on device``), without paths or errno numbers."""
    return exc.strerror or str(exc) or type(exc).__name__


def is_model_output(path: str | os.PathLike) -> bool:
    """A vitprune model directory (dense or compressed weights + config.json)."""
    p = Path(path)
    return p.is_dir() and any(all((p / name).is_file() for name in names) for names in MODEL_MARKERS)


def is_run_output(path: str | os.PathLike) -> bool:
    """A directory written by a vitprune command: run/report marker files, or a model directory."""
    p = Path(path)
    return p.is_dir() and (any((p / name).is_file() for name in RUN_MARKERS) or is_model_output(p))


def _is_empty_dir(p: Path) -> bool:
    try:
        return p.is_dir() and not any(p.iterdir())
    except OSError:
        return False


def check_parent(path: str | os.PathLike) -> Path:
    """Fail unless ``path``'s parent chain consists of directories that can be written.

    The first existing ancestor is probed with a real temporary file (``os.access`` says yes to root on a
    read-only bind or under ``/proc``); the probe is removed at once.
    """
    p = Path(path)
    probe = p.parent if str(p.parent) else Path(".")
    while True:
        if probe.exists() or probe.is_symlink():
            break
        if probe == probe.parent:
            break
        probe = probe.parent
    if not probe.is_dir():
        what = "a file" if probe.is_file() else "not a directory"
        raise VitPruneError(f"cannot write {p}: {probe} is {what}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise VitPruneError(f"cannot write {p}: {probe} is not writable")
    try:
        fd, name = tempfile.mkstemp(prefix=".vitprune-probe.", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise VitPruneError(f"cannot write {p}: {probe} is not writable ({os_error_text(exc)})") from None
    return p


def check_output(
    path: str | os.PathLike,
    kind: OutputKind = "file",
    overwrite: bool = False,
    resume: bool = False,
    is_run_dir: Callable[[Path], bool] | None = None,
) -> Path:
    """The one output check, run before any work: raise :class:`VitPruneError` (one line) unless ``path``
    can be written by a command writing ``kind``.

    - the parent chain must be writable directories (``cannot write OUT: PARENT is a file``);
    - ``kind="file"``: ``path`` must not exist; with ``overwrite`` it may be an existing regular file;
    - ``kind="dir"`` (a model/report directory written whole): ``path`` must not exist or be an empty
      directory; with ``overwrite`` it may be a directory recognised by ``is_run_dir`` (default: a vitprune
      model or run directory);
    - ``kind="run_dir"`` (a resumable run): as ``"dir"``, and with ``resume`` it must be an existing run
      directory (``is_run_dir``, default :func:`is_run_output`).

    A directory that is not recognised is never replaced, with or without ``overwrite``.
    """
    p = Path(path)
    check_parent(p)
    recognise = is_run_dir or is_run_output
    if kind == "file":
        if p.is_dir():
            raise VitPruneError(f"cannot write {p}: it is a directory (a file is written here)")
        if (p.exists() or p.is_symlink()) and not overwrite:
            raise VitPruneError(f"output exists: {p} (use --overwrite to replace it)")
        if p.exists() and not p.is_file():
            raise VitPruneError(f"cannot write {p}: it is not a regular file")
        return p
    if kind not in ("dir", "run_dir"):
        raise ValueError(f"unknown output kind {kind!r}")
    if resume and kind == "run_dir":
        if not p.exists():
            raise VitPruneError(f"cannot resume {p}: it does not exist (drop --resume to start a run)")
        if not p.is_dir() or not recognise(p):
            raise VitPruneError(f"cannot resume {p}: it holds no vitprune run")
        return p
    if not p.exists() and not p.is_symlink():
        return p
    if not p.is_dir():
        raise VitPruneError(f"cannot write {p}: it is a file (a directory is written here)")
    if _is_empty_dir(p):
        return p
    if not recognise(p):
        what = "run" if kind == "run_dir" else "output"
        raise VitPruneError(f"refusing to write into {p}: it exists and is not a vitprune {what} directory")
    if not overwrite:
        hint = " or --resume to continue it" if kind == "run_dir" else ""
        raise VitPruneError(f"output exists: {p} (use --overwrite to replace it{hint})")
    return p


def check_writable_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any work) if ``path`` exists without ``overwrite`` or its parent chain cannot be
    written (kind-agnostic; commands should prefer :func:`check_output`)."""
    p = Path(path)
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise VitPruneError(f"output exists: {p} (use --overwrite to replace it)")
    return check_parent(p)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings (``.<name>.tmp<pid>.*``) left in ``directory`` by writes of processes that
    no longer run (a kill during a checkpoint write); returns what was removed. A previous output moved aside
    by a directory replacement that was killed midway (``.<name>.old<pid>.*`` with ``<name>`` missing) is put
    back."""
    d = Path(directory)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    for entry in sorted(d.iterdir()):
        m = re.fullmatch(r"\.(.+)(\.tmp|\.old)(\d+)\.[^.]+", entry.name)
        if m is None or _pid_alive(int(m.group(3))):
            continue
        try:
            if m.group(2) == ".old":
                if not (d / m.group(1)).exists():
                    os.rename(entry, d / m.group(1))
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}{TMP_TAG}{os.getpid()}."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success move it onto ``path``, on failure delete it.

    The previous output stays in place until the new one is complete; a directory is replaced only when it is
    empty or a vitprune output (:func:`is_run_output`), a file only by a file. ``OSError`` while writing (no
    space, read-only file system, ...) becomes a one-line :class:`VitPruneError`.
    """
    target = check_writable_target(path, overwrite)
    if target.exists():
        if is_dir and not (target.is_dir() and (_is_empty_dir(target) or is_run_output(target))):
            raise VitPruneError(f"refusing to replace {target}: it is not a vitprune output directory")
        if not is_dir and target.is_dir():
            raise VitPruneError(f"cannot write {target}: it is a directory (a file is written here)")
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(target), dir=target.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=_tmp_prefix(target), dir=target.parent)
            os.close(fd)
            tmp = Path(name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask)  # mkdtemp/mkstemp create private 0700/0600 paths
        yield tmp
        _replace(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists():
                with contextlib.suppress(OSError):
                    tmp.unlink()
        if isinstance(exc, OSError):
            raise VitPruneError(f"cannot write {target}: {os_error_text(exc)}") from None
        raise


def _replace(tmp: Path, target: Path) -> None:
    """Move ``tmp`` onto ``target``; an existing directory is moved aside first and restored on failure."""
    if not (target.is_dir() and not target.is_symlink()):
        os.replace(tmp, target)  # atomic for files (and onto a missing target)
        return
    # not named like a temporary: a kill between the two renames leaves the previous output here, kept
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old{os.getpid()}.", dir=target.parent))
    aside.rmdir()
    os.rename(target, aside)
    try:
        os.replace(tmp, target)
    except OSError:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (the previous file survives a failed write)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)
    return Path(path)
