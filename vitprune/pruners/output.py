"""The one output writer of pruning runs (CLI, :func:`vitprune.prune` and the pipeline all use it).

Layout of a run directory ``OUT``::

    OUT/model/                 structural: the pruned model (vitprune directory: model.safetensors + config.json)
    OUT/masks.json             structural: the masks over the dense model (StructuralMasks JSON)
    OUT/dims.png               structural: per-block widths, dense vs pruned
    OUT/s0.50/model/           unstructured: one model per sweep target (zeros stored dense)
    OUT/s0.50/masks.safetensors  keep-masks (uint8) by parameter name, for masked fine-tuning
    OUT/s0.50/sparse/          with ``compressed``: bitmask + values storage
    OUT/report.json            written last: settings, history, evaluations, run record and recipe

Resumable state of the run (``state.pt``, ``finetune/``, ``sparsity/``, ``gradual/``) stays beside the outputs.
Every file is written atomically; ``report.json`` last, so a directory with a report is a finished run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vitprune.errors import VitPruneError
from vitprune.pruners.base import PruneResult, jsonable

REPORT_NAME = "report.json"
# files and folders a pruning run writes: what --overwrite may replace in an existing run directory
RUN_MARKERS = (
    "report.json",
    "state.pt",
    "model",
    "masks.json",
    "finetune",
    "sparsity",
    "gradual",
    "stages",
    "fingerprint.json",
)


def target_dir(target: float) -> str:
    """Sub-directory of one sweep target (``s0.50``)."""
    return f"s{target:.2f}"


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a pruning run (any of :data:`RUN_MARKERS`, or ``sX.XX/`` sweep folders)."""
    p = Path(path)
    if not p.is_dir():
        return False
    names = {c.name for c in p.iterdir()}
    return bool(names & set(RUN_MARKERS)) or any(n.startswith("s0.") and (p / n / "model").is_dir() for n in names)


def prepare_run_dir(out_dir: str | os.PathLike, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Check (before any work) that ``out_dir`` may receive a run; with ``overwrite`` clear a previous run.

    A new or empty directory is fine; an existing run needs ``resume`` (continue it) or ``overwrite`` (its run
    files are removed - never anything that is not a run file); any other non-empty directory is refused.
    """
    import shutil

    from vitprune.utils.fs import check_output, remove_stale_temps

    out = check_output(out_dir, "run_dir", overwrite=overwrite, resume=resume, is_run_dir=is_run_dir)  # the one check
    if out.is_dir():
        remove_stale_temps(out)  # a write killed midway leaves a temporary sibling
    if resume or not out.is_dir():
        return out
    for child in out.iterdir():  # --overwrite: a previous run's files go, nothing else
        sweep = child.name.startswith("s0.") and child.is_dir()
        if child.name in RUN_MARKERS or sweep or child.name == "dims.png":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    return out


def _results(results: PruneResult | list[PruneResult]) -> list[PruneResult]:
    out = results if isinstance(results, list) else [results]
    if not out:
        raise VitPruneError("no pruning result to write")
    return out


def write_results(
    results: PruneResult | list[PruneResult],
    out_dir: str | os.PathLike,
    *,
    run: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
    compressed: bool = False,
    dense_config: Any = None,
) -> dict[str, Any]:
    """Write ``results`` into ``out_dir`` (see the module docstring); returns the report written."""
    from vitprune.models.io import save
    from vitprune.reports import plot_block_dims, write_json_report
    from vitprune.training import distributed as D
    from vitprune.utils.fs import atomic_write_text

    items = _results(results)
    out = Path(out_dir)
    if not D.is_main_process():
        D.barrier()
        return {}
    try:
        out.mkdir(parents=True, exist_ok=True)
        if items[0].kind == "structural":
            if len(items) != 1:
                raise VitPruneError("a structural run has one result")
            res = items[0]
            report = dict(res.report)
            meta = {"prune": {"method": report.get("method"), "target": report.get("target")}}
            save(res.model, out / "model", overwrite=True, meta=meta)
            atomic_write_text(out / "masks.json", res.masks.to_json() + "\n", overwrite=True)
            if dense_config is not None:
                plot_block_dims(dense_config, res.model.config, out / "dims.png", title=str(report.get("method")),
                                kept_blocks=report.get("pruned", {}).get("kept_blocks"))  # fmt: skip
        else:
            report = _unstructured(items, out, compressed)
        report["run"] = run
        report["recipe"] = recipe
        write_json_report(out / REPORT_NAME, jsonable(report))
    except OSError as exc:
        raise VitPruneError(f"cannot write {out}: {exc.strerror or exc}") from None
    D.barrier()
    return report


def _unstructured(items: list[PruneResult], out: Path, compressed: bool) -> dict[str, Any]:
    from safetensors.torch import save_file

    from vitprune.models.io import save
    from vitprune.utils.fs import atomic_path

    first = items[0].report
    report: dict[str, Any] = {k: first[k] for k in ("method", "label", "type", "paper", "settings") if k in first}
    report["targets"] = {}
    for res in items:
        key = f"{res.target:.2f}"
        sub = out / target_dir(res.target)
        sub.mkdir(exist_ok=True)
        save(res.model, sub / "model", overwrite=True, meta={"prune": {"method": first.get("method"), "target": key}})
        with atomic_path(sub / "masks.safetensors", overwrite=True) as tmp:
            save_file({k: v.to(torch.uint8).contiguous().cpu() for k, v in res.masks.items()}, str(tmp))
        entry = {k: v for k, v in res.report.items() if k not in ("method", "label", "type", "paper", "settings")}
        if compressed:
            from vitprune.export.sparse import save_sparse

            info = save_sparse(res.model, sub / "sparse")
            entry["compressed"] = {k: v for k, v in info.items() if k != "compressed_tensors"}
            entry["compressed"]["path"] = str(sub / "sparse")
        report["targets"][key] = entry
    return report


def summary_lines(results: PruneResult | list[PruneResult], out: str | os.PathLike | None = None) -> list[str]:
    """One line per result for the terminal (fractions, sparsity, top-1 with an evaluation)."""
    lines = []
    for res in _results(results):
        r = res.report
        if res.kind == "structural":
            frac, target = r["pruned"]["fraction"], r["target"]
            text = (
                f"{r.get('label') or r['method']}: kept {frac['macs']:.3f} of dense MACs, "
                f"{frac['params']:.3f} of params"
                + (f", {frac['latency_pred']:.3f} of LUT latency" if "latency_pred" in frac else "")
                + f" (target {target['metric']} {target['fraction']:g}); embedding {r['dense']['embed_dim']} -> "
                f"{r['pruned']['embed_dim']}, {r['pruned']['depth']}/{r['dense']['depth']} blocks"
            )
            if "eval" in r["pruned"]:
                text += f"; top-1 {r['dense'].get('eval', {}).get('top1', float('nan')):.2f} % -> "
                text += f"{r['pruned']['eval']['top1']:.2f} %"
        else:
            text = f"{r.get('label') or r['method']} s={res.target:.2f}: sparsity {r['sparsity']:.4f}"
            if "eval" in r:
                text += f", top-1 {r['eval']['top1']:.2f} % (dense {r['dense_eval']['top1']:.2f} %)"
        lines.append(text)
    if out is not None:
        lines.append(f"model(s) and report: {out}")
    return lines


__all__ = [
    "REPORT_NAME",
    "RUN_MARKERS",
    "is_run_dir",
    "prepare_run_dir",
    "summary_lines",
    "target_dir",
    "write_results",
]
