"""Collect ``vitprune prune`` run directories into one results table (JSON + Markdown in benchmarks/results/).

Each run's ``report.json`` already holds its settings, evaluations and run record (command, machine, date); this
script only gathers the rows so that CLI runs are recorded like the other benchmarks. The commit is the one the
runs were made at (``--commit``; checked against the reports' own ``git_commit`` when they carry one).

    python benchmarks/collect_prune_runs.py --runs obs50=/tmp/obsruns/obs50 obs50-rec=/tmp/obsruns/obs50-rec \\
        --name obs_reconstruct --title "OBS at 50 % sparsity with and without reconstruction" --commit a465ec0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _common import ci95, markdown_table, write_results


def rows_of(name: str, run: Path) -> list[dict[str, Any]]:
    report = json.loads((run / "report.json").read_text())
    out = []
    for key, entry in (report.get("targets") or {"-": report}).items():
        ev = entry.get("eval") or entry.get("pruned", {}).get("eval") or {}
        dense = entry.get("dense_eval") or entry.get("dense", {}).get("eval") or {}
        before = entry.get("before_reconstruction_eval") or entry.get("pruned_before_reconstruction_eval") or {}
        out.append({
            "run": name,
            "method": report.get("method"),
            "target": key,
            "sparsity": entry.get("sparsity"),
            "reconstruct": report.get("settings", {}).get("reconstruct"),
            "top1_dense": dense.get("top1"),
            "top1_before_reconstruction": before.get("top1"),
            "top1": ev.get("top1"),
            "n": ev.get("n"),
            "ci95": ci95(ev["top1"], ev["n"]) if ev else None,
            "reconstruction_s": (entry.get("reconstruction") or {}).get("time_s"),
            "command": (report.get("run") or {}).get("command"),
            "git_commit": (report.get("run") or {}).get("git_commit"),
        })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="NAME=RUN_DIR")
    ap.add_argument("--name", required=True)
    ap.add_argument("--title", required=True)
    ap.add_argument("--commit", required=True, help="the (clean) commit the runs were made at")
    args = ap.parse_args(argv)
    rows = []
    for item in args.runs:
        name, _, path = item.partition("=")
        rows += rows_of(name, Path(path))
    for r in rows:
        if r["git_commit"] and not r["git_commit"].startswith(args.commit):
            raise SystemExit(f"run {r['run']} was made at {r['git_commit']}, not {args.commit}")
    table = markdown_table(
        ["run", "method", "sparsity", "reconstruct", "dense top-1", "before reconstruction", "top-1 +- 95 % CI", "n"],
        [[r["run"], r["method"], f"{r['sparsity']:.4f}" if r["sparsity"] is not None else "-", r["reconstruct"],
          r["top1_dense"], r["top1_before_reconstruction"] if r["top1_before_reconstruction"] is not None else "-",
          f"{r['top1']:.2f} +- {r['ci95']:.2f}", r["n"]] for r in rows],
    )  # fmt: skip
    commands = "\n".join(f"- `{r['run']}`: `{r['command']}`" for r in rows)
    md = f"# {args.title}\n\nRuns made at commit {args.commit} (clean tree).\n\n{table}\n\n{commands}\n"
    write_results(args.name, {"rows": rows, "runs_commit": args.commit}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
