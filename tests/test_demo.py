"""``vitprune demo``: the counting helpers, and the whole demo end to end with ``--quick`` (every registered
method in the table, report files, plots, refusal to overwrite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitprune import pruners
from vitprune.cli.main import main
from vitprune.demo import DemoConfig, format_table, run_demo, summary_json
from vitprune.errors import VitPruneError
from vitprune.metrics.sparsity import nonzero_params, prunable_weights, sparsity_vs_dense
from vitprune.models.io import is_model_dir, load, save
from vitprune.models.vit import ViT
from vitprune.training.default_model import default_model_dir, fashion_mnist_config

METHODS = ("dense", *(pruners.get(n).label for n in pruners.available()))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_counting_helpers(tiny_model):
    total = prunable_weights(tiny_model)
    assert total == sum(
        p.numel()
        for n, p in tiny_model.named_parameters()
        if n.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")) and "patch" not in n
    )
    m = ViT(tiny_model.config)
    m.load_state_dict(tiny_model.state_dict())
    with torch.no_grad():
        m.blocks[0].mlp.fc1.weight[:5] = 0.0  # 5 rows of 32
    assert sparsity_vs_dense(m, total) == pytest.approx(5 * 32 / total)
    assert nonzero_params(m) == nonzero_params(tiny_model) - 5 * 32
    assert "dense" in format_table(
        [
            {
                "method": "dense",
                "type": "-",
                "params_nonzero": 10,
                "macs": 5,
                "sparsity": 0.0,
                "top1": 50.0,
                "top1_before_recovery": None,
                "train_steps": 0,
            }
        ]
    )


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture
def demo_model_args(tmp_path) -> list[str]:
    """The shipped model when the package has it; else a small untrained Fashion-MNIST ViT (same pipeline)."""
    if is_model_dir(default_model_dir()):
        return []
    torch.manual_seed(0)
    path = tmp_path / "fm_model"
    save(ViT(fashion_mnist_config(embed_dim=32, depth=2, heads=2)), path)
    return ["--model", str(path)]


def test_demo_quick_end_to_end(tmp_path, demo_model_args, capsys):
    out = tmp_path / "report"
    code = main(["demo", "--quick", "--quiet", "--threads", "1", "--out", str(out), *demo_model_args])
    assert code == 0
    stdout = capsys.readouterr().out
    table = stdout.split("\n\n")[0].splitlines()
    assert table[0].split()[:2] == ["method", "type"]
    for method in METHODS:
        assert any(line.startswith(method + " ") for line in table), method

    report = json.loads((out / "report.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert tuple(rows) == METHODS
    dense = rows["dense"]
    assert dense["speedup"] == pytest.approx(1.0) and dense["sparsity"] == 0.0
    structural = [pruners.get(n).label for n in pruners.available("structural")]
    unstructured = [pruners.get(n).label for n in pruners.available("unstructured")]
    for name in structural:
        assert rows[name]["type"] == "structural"
        assert rows[name]["macs"] < dense["macs"] and rows[name]["params"] < dense["params"]
        assert rows[name]["macs"] <= rows["NViT"]["macs"] + 1  # the others are pruned to NViT's MACs
    for name in unstructured:
        assert rows[name]["type"] == "unstructured"
        assert rows[name]["sparsity"] == pytest.approx(DemoConfig().sparsity, abs=5e-3)  # Wanda: per-row counts
        assert rows[name]["macs"] == dense["macs"] and rows[name]["params_nonzero"] < dense["params_nonzero"]
    for r in rows.values():
        assert 0.0 <= r["top1"] <= 100.0 and r["latency_ms"] > 0 and r["speedup"] > 0
    assert report["latency"]["baseline"] == "dense" and report["timings"]["total"]["cpu_s"] > 0
    assert json.loads(summary_json(report))["rows"] == report["rows"]

    md = (out / "report.md").read_text()
    assert "| method | type |" in md and all(f"| {m} |" in md for m in METHODS)
    slugs = {"dims_" + "".join(c if c.isalnum() else "_" for c in n.lower()).strip("_") for n in structural}
    assert set(report["plots"]) == {"top1_vs_params", "top1_vs_latency", *slugs}
    for name in report["plots"].values():
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        assert f"]({name})" in md
    for slug in ("nvit", "vtp", "l2_magnitude", "ovit_obs", "global_magnitude"):
        model = load(out / "models" / slug)
        assert model.config.num_classes == 10
    assert (out / "report.json").stat().st_mode & 0o044  # readable by others (umask permitting), not 0600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]  # no temporary left

    # an existing report directory is never replaced without --overwrite, and nothing runs
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    code = main(["demo", "--quick", "--quiet", "--out", str(out), *demo_model_args])
    assert code == 2
    assert "output exists" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_demo_failure_writes_nothing(tmp_path, demo_model_args, capsys):
    out = tmp_path / "report"
    code = main(
        ["demo", "--quick", "--quiet", "--out", str(out), "--data", str(tmp_path / "no-data"), *demo_model_args]
    )
    assert code == 2
    assert "Fashion-MNIST not found" in capsys.readouterr().err
    code = main(["demo", "--quick", "--quiet", "--out", str(out), "--sparsity", "1.5", *demo_model_args])
    assert code == 2
    assert "sparsity must be in (0, 1), got 1.5" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [p for p in tmp_path.iterdir() if p.name == "fm_model"]


def test_demo_rejects_a_model_of_another_task(tiny_model, tmp_path):
    with pytest.raises(VitPruneError, match="28x28 grey images"):
        run_demo(tmp_path / "x", quick=True, model=tiny_model)
    assert not (tmp_path / "x").exists()


def test_quick_config_is_small_and_validated():
    q = DemoConfig.quick()
    assert q.recovery_steps <= 5 and q.test_limit and q.train_limit
    with pytest.raises(VitPruneError, match="sparsity"):
        DemoConfig(sparsity=1.0).validate()
    assert isinstance(Path(default_model_dir()), Path)
