"""One table from several ``prune_recover.py`` rows (their ``benchmarks/results/prune_recover_<row>.json``).

Copies the numbers (no new measurement): per row its method and settings, MACs, one-shot and recovered top-1 on the
tuning split and on val (+- 95 % interval), the recovery budget and throughput, and the commit that ran it.

    python benchmarks/collect_prune_recover.py --rows nvit50_per_cost nvit70 obs75 --name data_efficient \\
        --title "Data-efficient pruning: one-shot + reconstruction, then the shared recovery"
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from _common import RESULTS, markdown_table, write_results


def ci(rec: dict[str, Any], split: str = "val") -> str:
    return f"{rec[f'top1_{split}']:.2f} +- {rec[f'ci95_{split}']:.2f}" if f"top1_{split}" in rec else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", nargs="+", required=True, help="prune_recover row names")
    ap.add_argument("--name", required=True)
    ap.add_argument("--title", default="prune + shared recovery")
    args = ap.parse_args(argv)
    table, record = [], []
    for name in args.rows:
        path = RESULTS / f"prune_recover_{name}.json"
        if not path.is_file():
            sys.exit(f"error: no results for row {name} ({path})")
        r = json.loads(path.read_text())
        s, commit = r["state"], r["environment"]["git_commit"]
        o = s["oneshot"]
        recs = sorted(s.get("recovered", {}).items(), key=lambda kv: tuple(map(int, kv[0].split("_seed"))))
        settings = ", ".join(f"{k}={v}" for k, v in (s.get("settings") or {}).items())
        extra = r.get("recovery_recipe") or {}
        base = [name, r["label"], settings + (f"; recovery {extra}" if extra else ""), f"{o['macs_fraction']:.3f}"]
        table.append([*base, 0, ci(o, "tune"), ci(o), f"{o.get('prune_s', 0):.0f}", commit[:7]])
        for key, rec in recs:
            if "top1_val" not in rec:
                continue
            rr = rec["recovery"]
            speed = f"{60 * rr['minutes']:.0f} ({rr['images_per_s']:.1f} img/s)"
            table.append([*base, key.replace("_seed", " seed "), ci(rec, "tune"), ci(rec), speed, commit[:7]])
        record.append({"row": name, "label": r["label"], "settings": s.get("settings"), "chosen_on": r["chosen_on"],
                       "oneshot": o, "recovered": dict(recs), "recovery_recipe": extra, "commit": commit})  # fmt: skip
    headers = ["row", "method", "settings", "MACs", "recovery images", "top-1 tuning", "top-1 val +- CI", "time s"]
    md = (
        f"# {args.title}\n\n"
        "Rows of `benchmarks/prune_recover.py` (each file `prune_recover_<row>.md` has its command); top-1 on the "
        "tuning split (2,000 training images, where settings are chosen) and on the full val set (reported, 95 % "
        "interval). Recovery 0 = one-shot (after reconstruction where set).\n\n"
        + markdown_table([*headers, "commit"], table)
        + "\n"
    )
    write_results(args.name, {"rows": record}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
