import json
import math

import numpy as np
import pytest
import torch

from vitprune import VitPruneError
from vitprune.cli.main import main
from vitprune.latency.lut import (
    DEFAULT_GRID,
    LatencyTable,
    _interp,
    build_table,
    check_table,
    device_name,
    grid_for_config,
    parse_grid,
)
from vitprune.models import BlockConfig, ViTConfig, save

TINY_GRID = {"emb": [8, 16], "heads": [0, 2], "qk": [4, 8], "v": [4, 8], "mlp": [0, 16, 32]}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _meta(**kw):
    meta = {
        "device_type": "cpu",
        "device_name": device_name(torch.device("cpu")),
        "dtype": "float32",
        "batch_size": 4,
        "threads": 1,
        "tokens": 5,
        "img_size": 16,
        "patch_size": 8,
        "in_chans": 3,
        "prefix_tokens": 1,
        "num_classes": 3,
    }
    return meta | kw


def _linear_table():
    """A table whose entries are a known multilinear function: interpolation must reproduce it exactly."""
    g = TINY_GRID

    def attn(e, h, q, v):
        return 1 + 0.5 * e + 2 * h + 0.1 * h * q + 0.05 * e * h * v

    def mlp(e, m):
        return 0.3 + 0.01 * e * m + 0.2 * m

    a = np.array([[[[attn(e, h, q, v) for v in g["v"]] for q in g["qk"]] for h in g["heads"]] for e in g["emb"]])
    m = np.array([[mlp(e, x) for x in g["mlp"]] for e in g["emb"]])
    s = np.array([0.7 * e for e in g["emb"]])
    return LatencyTable(_meta(), {k: list(v) for k, v in g.items()}, a, m, s), attn, mlp


def test_multilinear_interpolation_is_exact_for_multilinear_data():
    table, attn, mlp = _linear_table()
    for point in [(8, 0, 4, 4), (12, 1, 6, 7), (16, 2, 8, 8), (10, 2, 5, 4), (16, 1, 2, 2)]:  # last: extrapolated
        e, h, q, v = point
        assert table.attn(e, BlockConfig(h, q, v, 0)) == pytest.approx(attn(*point))
    assert table.mlp(12, 24) == pytest.approx(mlp(12, 24))
    assert table.stem(12) == pytest.approx(8.4)
    grid = [[0, 1, 3]]
    assert _interp(grid, np.array([0.0, 1.0, 5.0]), (2,)) == pytest.approx(3.0)


def test_predict_sums_stem_and_blocks_and_refuses_out_of_grid():
    table, attn, mlp = _linear_table()
    cfg = ViTConfig(16, [BlockConfig(2, 8, 4, 16), BlockConfig(0, 0, 0, 32)], num_classes=3, img_size=16, patch_size=8)
    want = 0.7 * 16 + attn(16, 2, 8, 4) + mlp(16, 16) + table.attn(16, BlockConfig(0, 4, 4, 0)) + mlp(16, 32)
    assert table.predict(cfg) == pytest.approx(want)
    table.covers(cfg)
    with pytest.raises(VitPruneError, match="mlp=64 is above"):
        table.predict(ViTConfig(16, [BlockConfig(2, 8, 4, 64)], num_classes=3, img_size=16, patch_size=8))
    with pytest.raises(VitPruneError, match="tokens"):
        table.covers(ViTConfig(16, [BlockConfig(2, 8, 4, 16)], num_classes=3, img_size=32, patch_size=8))


def test_save_load_and_compatibility(tmp_path):
    table, _, _ = _linear_table()
    path = table.save(tmp_path / "lut.json")
    again = LatencyTable.load(path)
    assert again.grid == table.grid and np.allclose(again.attn_ms, table.attn_ms)
    with pytest.raises(VitPruneError, match="exists"):
        table.save(path)
    again.check_compatible("cpu", batch_size=4, dtype="float32", threads=1)
    with pytest.raises(VitPruneError, match=r"batch size 8 \(table: 4\).*dtype bfloat16"):
        again.check_compatible("cpu", batch_size=8, dtype="bfloat16", threads=1)
    with pytest.warns(UserWarning, match="another setting"):
        assert again.check_compatible("cpu", batch_size=8, threads=1, force=True)
    other = LatencyTable(_meta(device_name="Some Other CPU"), table.grid, table.attn_ms, table.mlp_ms, table.stem_ms)
    with pytest.raises(VitPruneError, match="Some Other CPU"):
        other.check_compatible("cpu", threads=1)
    bad = json.loads(path.read_text())
    bad["mlp_ms"] = bad["mlp_ms"][:1]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(VitPruneError, match="mlp_ms has shape"):
        LatencyTable.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(VitPruneError, match="not a vitprune latency table"):
        LatencyTable.load(tmp_path / "other.json")


def test_parse_and_derive_grid():
    g = parse_grid("emb=8,16;heads=0,2")
    assert g["emb"] == [8, 16] and g["mlp"] == DEFAULT_GRID["mlp"]
    for bad in ("emb=16,8", "depth=3", "qk=0,8", "mlp=a"):
        with pytest.raises(VitPruneError):
            parse_grid(bad)
    cfg = ViTConfig.uniform(192, 12, 3, num_classes=200)
    g = grid_for_config(cfg)
    assert g["emb"][-1] == 192 and g["heads"] == [0, 1, 2, 3] and g["mlp"][0] == 0 and g["mlp"][-1] == 768
    assert all(v % 8 == 0 for v in g["emb"] + g["qk"] + g["v"] + g["mlp"])


def test_build_and_check_tiny_table():
    table = build_table(
        batch_size=2,
        threads=1,
        grid=TINY_GRID,
        img_size=16,
        patch_size=8,
        num_classes=3,
        warmup=0,
        runs=1,
        progress=False,
    )
    assert table.attn_ms.shape == (2, 2, 2, 2) and table.mlp_ms.shape == (2, 3) and table.stem_ms.shape == (2,)
    assert (table.attn_ms > 0).all() and (table.mlp_ms > 0).all()
    for key in ("device_name", "dtype", "batch_size", "threads", "tokens", "torch", "date"):
        assert table.meta[key] is not None
    assert table.meta["tokens"] == 5 and table.meta["stat"] == "median"
    with pytest.raises(VitPruneError, match="unknown timing statistic"):
        build_table(grid=TINY_GRID, img_size=16, patch_size=8, stat="mean", progress=False)
    base = ViTConfig.uniform(16, 2, 2, mlp_ratio=2.0, num_classes=3, img_size=16, patch_size=8)
    result = check_table(table, base, num_archs=2, warmup=0, runs=1, progress=False)
    assert len(result["archs"]) == 3
    assert all(math.isfinite(r["rel_error"]) and r["measured_ms"] > 0 for r in result["archs"])
    assert result["max_rel_error"] >= result["median_rel_error"]


def test_cli_build_and_check(tmp_path, capsys, tiny_model):
    out = tmp_path / "lut.json"
    grid = "emb=16,32;heads=0,4;qk=4,8;v=4,8;mlp=0,64"
    save(tiny_model, tmp_path / "m")
    args = ["lut", "build", "--batch", "2", "--threads", "1", "--grid", grid, "--runs", "1", "--warmup", "0"]
    args += ["--model", str(tmp_path / "m"), "--out", str(out), "--quiet"]
    assert main(args) == 0
    table = LatencyTable.load(out)
    assert table.meta["tokens"] == 17 and table.meta["num_classes"] == 10
    assert main(args) == 2  # refuses to overwrite
    assert "exists" in capsys.readouterr().err
    check = ["lut", "check", str(out), "--model", str(tmp_path / "m"), "--archs", "1", "--runs", "1", "--quiet"]
    assert main([*check, "--json", str(tmp_path / "check.json")]) == 0
    assert "relative error: median" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "check.json").read_text())["archs"]) == 2
    data = json.loads(out.read_text())
    data["meta"]["device_name"] = "Another CPU"
    out.write_text(json.dumps(data))
    assert main(check) == 2
    assert "Another CPU" in capsys.readouterr().err
    with pytest.warns(UserWarning):
        assert main([*check, "--force"]) == 0


def test_calibrated_table_predicts_its_model_and_keeps_ratios(tmp_path):
    """``calibrate``: the table predicts the calibration model's measured latency, ratios are unchanged."""
    base = ViTConfig.uniform(16, 2, 2, mlp_ratio=2.0, num_classes=3, img_size=16, patch_size=8)
    kw = {"batch_size": 2, "threads": 1, "grid": TINY_GRID, "img_size": 16, "patch_size": 8, "num_classes": 3}
    table = build_table(**kw, warmup=0, runs=1, progress=False, calibrate=base)
    cal = table.meta["calibration"]
    assert table.scale == pytest.approx(cal["measured_ms"] / cal["branches_ms"], rel=1e-4)
    assert table.predict(base) == pytest.approx(cal["measured_ms"], rel=1e-4)
    small = ViTConfig(embed_dim=8, blocks=[BlockConfig(1, 4, 4, 16)], num_classes=3, img_size=16, patch_size=8)
    raw = LatencyTable(dict(table.meta, scale=1.0), table.grid, table.attn_ms, table.mlp_ms, table.stem_ms)
    assert table.predict(small) / table.predict(base) == pytest.approx(raw.predict(small) / raw.predict(base))
    path = table.save(tmp_path / "lut.json")
    assert LatencyTable.load(path).predict(base) == pytest.approx(table.predict(base))
    too_wide = ViTConfig.uniform(32, 1, 2, num_classes=3, img_size=16, patch_size=8)
    with pytest.raises(VitPruneError, match="above the latency table's grid"):
        build_table(**kw, warmup=0, runs=1, progress=False, calibrate=too_wide)
