"""``vitprune demo``: the structural L2 baseline against brute force, the counting helpers, and the whole demo
end to end with ``--quick`` (table, report files, plots, refusal to overwrite)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vitprune.cli.main import main
from vitprune.demo import (
    DemoConfig,
    format_table,
    l2_group_scores,
    nonzero_params,
    prunable_weights,
    run_demo,
    sparsity_vs_dense,
    summary_json,
    uniform_l2_masks,
)
from vitprune.errors import VitPruneError
from vitprune.metrics.flops import count_macs
from vitprune.models.io import is_model_dir, load, save
from vitprune.models.vit import ViT
from vitprune.structures.masks import architecture_after, uniform_masks
from vitprune.structures.surgery import prune_model, round_masks
from vitprune.training.default_model import default_model_dir, fashion_mnist_config

METHODS = ("dense", "NViT", "VTP", "L2 magnitude", "oViT/OBS", "global magnitude")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- L2 baseline
def test_l2_group_scores_match_brute_force(tiny_model):
    """||w_S||_2 over the METHODS.md section 1 slices, computed by hand for one unit of every kind."""
    m, cfg = tiny_model, tiny_model.config
    scores = l2_group_scores(m, kinds=("heads", "qk", "v", "mlp", "emb"))
    b, blk = 2, m.blocks[2]
    h, dq, dv = cfg.blocks[b].heads, cfg.blocks[b].qk_dim, cfg.blocks[b].v_dim
    w, bias = blk.attn.qkv.weight.detach(), blk.attn.qkv.bias.detach()

    def norm(*parts: torch.Tensor) -> float:
        return math.sqrt(sum(float(p.double().pow(2).sum()) for p in parts))

    j = 3  # QK dim j: row j of q and of k in every head
    rows = [hh * dq + j for hh in range(h)] + [h * dq + hh * dq + j for hh in range(h)]
    assert scores[f"blocks.{b}.qk"][j].item() == pytest.approx(norm(w[rows], bias[rows]), rel=1e-5)
    j = 5  # V dim j: v rows in every head and the matching proj columns
    rows = [2 * h * dq + hh * dv + j for hh in range(h)]
    cols = [hh * dv + j for hh in range(h)]
    expect = norm(w[rows], bias[rows], blk.attn.proj.weight.detach()[:, cols])
    assert scores[f"blocks.{b}.v"][j].item() == pytest.approx(expect, rel=1e-5)
    hh = 1  # head: its q, k, v rows and its proj columns
    rows = [*range(hh * dq, (hh + 1) * dq), *range(h * dq + hh * dq, h * dq + (hh + 1) * dq)]
    rows += list(range(2 * h * dq + hh * dv, 2 * h * dq + (hh + 1) * dv))
    expect = norm(w[rows], bias[rows], blk.attn.proj.weight.detach()[:, hh * dv : (hh + 1) * dv])
    assert scores[f"blocks.{b}.heads"][hh].item() == pytest.approx(expect, rel=1e-5)
    j = 7  # MLP neuron: fc1 row and bias, fc2 column
    fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
    expect = norm(fc1.weight.detach()[j], fc1.bias.detach()[j : j + 1], fc2.weight.detach()[:, j])
    assert scores[f"blocks.{b}.mlp"][j].item() == pytest.approx(expect, rel=1e-5)
    c = 4  # embedding channel: column/row c of every tensor on the residual stream
    sq = sum(
        float(p.detach().double().select(p.dim() - 1 if n in ("cls_token", "pos_embed") else 0, c).pow(2).sum())
        for n, p in m.named_parameters()
        if n in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")
    )
    sq += sum(
        float(p.detach().double()[c].pow(2).sum())
        for n, p in m.named_parameters()
        if n.endswith(("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.bias", "mlp.fc2.bias"))
        or n in ("norm.weight", "norm.bias")
        or n.endswith(("attn.proj.weight", "mlp.fc2.weight"))
    )
    sq += sum(
        float(p.detach().double()[:, c].pow(2).sum())
        for n, p in m.named_parameters()
        if n.endswith(("attn.qkv.weight", "mlp.fc1.weight")) or n == "head.weight"
    )
    assert scores["emb"][c].item() == pytest.approx(math.sqrt(sq), rel=1e-5)


def test_uniform_l2_masks_meet_the_target_maximally(tiny_model):
    cfg = tiny_model.config
    dense = count_macs(cfg)["total"]
    masks, scores, r = uniform_l2_masks(tiny_model, 0.6, round_to=None)
    frac = count_macs(architecture_after(cfg, masks))["total"] / dense
    assert frac <= 0.6
    bigger = uniform_masks(cfg, qk=min(r + 1e-3, 1.0), v=min(r + 1e-3, 1.0), mlp=min(r + 1e-3, 1.0), scores=scores)
    assert count_macs(architecture_after(cfg, bigger))["total"] / dense > 0.6  # r is the largest such fraction
    for b, bm in enumerate(masks.blocks):  # the kept units are the highest-norm ones
        s = scores[f"blocks.{b}.mlp"]
        assert s[bm.mlp].min() >= s[~bm.mlp].max()
    masks8, scores8, _ = uniform_l2_masks(tiny_model, 0.6, round_to=8)
    rounded, _ = round_masks(cfg, masks8, 8, scores8)
    small = prune_model(tiny_model, masks8, round_to=8, scores=scores8)
    assert small.config == architecture_after(cfg, rounded)
    assert count_macs(small.config)["total"] / dense <= 0.6
    assert all(b.mlp_dim % 8 == 0 for b in small.config.blocks)
    with pytest.raises(VitPruneError, match="unreachable"):
        uniform_l2_masks(tiny_model, 0.01)


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
    for name in ("NViT", "VTP", "L2 magnitude"):
        assert rows[name]["type"] == "structural"
        assert rows[name]["macs"] < dense["macs"] and rows[name]["params"] < dense["params"]
        assert rows[name]["macs"] <= rows["NViT"]["macs"] + 1  # VTP and L2 are pruned to NViT's MACs
    for name in ("oViT/OBS", "global magnitude"):
        assert rows[name]["type"] == "unstructured"
        assert rows[name]["sparsity"] == pytest.approx(DemoConfig().sparsity, abs=1e-3)
        assert rows[name]["macs"] == dense["macs"] and rows[name]["params_nonzero"] < dense["params_nonzero"]
    for r in rows.values():
        assert 0.0 <= r["top1"] <= 100.0 and r["latency_ms"] > 0 and r["speedup"] > 0
    assert report["latency"]["baseline"] == "dense" and report["timings"]["total"]["cpu_s"] > 0
    assert json.loads(summary_json(report))["rows"] == report["rows"]

    md = (out / "report.md").read_text()
    assert "| method | type |" in md and all(f"| {m} |" in md for m in METHODS)
    assert set(report["plots"]) == {"top1_vs_params", "top1_vs_latency", "dims_nvit", "dims_vtp", "dims_l2_magnitude"}
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
