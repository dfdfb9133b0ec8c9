"""ONNX models as MODEL: ONNX Runtime (and OpenVINO) sessions in eval / bench, INT8 export through the CLI, ORT
latency tables, and the one-line errors of bad deploy requests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitprune.cli.main import main
from vitprune.errors import VitPruneError
from vitprune.models import ViT, ViTConfig, save

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from vitprune.latency.lut import LatencyTable, build_table, check_table  # noqa: E402
from vitprune.models.checkpoints import load_model  # noqa: E402
from vitprune.runtime.ort import OrtModel  # noqa: E402

GRID = "emb=16,32;heads=0,2;qk=8,16;v=8,16;mlp=0,64"


def _model() -> ViT:
    torch.manual_seed(0)
    cfg = ViTConfig.uniform(embed_dim=32, depth=2, heads=4, mlp_ratio=2.0, num_classes=3, img_size=32, patch_size=8)
    return ViT(cfg).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved model, its fp32 ONNX (exported with the 'imagenet' preprocessing recorded), an image folder."""
    root = tmp_path_factory.mktemp("ort")
    model = _model()
    model_dir = save(model, root / "model")
    fp32 = root / "m.onnx"
    assert main(["export", str(model_dir), "--onnx", str(fp32), "--preprocess", "imagenet"]) == 0
    with pytest.warns(DeprecationWarning):  # a graph made elsewhere: no vitprune metadata
        torch.onnx.export(
            torch.nn.Conv2d(3, 2, 3), (torch.randn(1, 3, 8, 8),), str(root / "foreign.onnx"), dynamo=False
        )
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (root / "data" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "data" / c / f"{i}.png")
    return {"root": root, "model": model_dir, "fp32": fp32, "data": root / "data", "foreign": root / "foreign.onnx"}


def run_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_ort_model_matches_torch_and_reads_metadata(files):
    runner = OrtModel(files["fp32"], threads=1)
    assert runner.vit_config == _model().config and runner.preprocess == {"preset": "imagenet"}
    assert runner.int8 is None and runner.img_size == 32 and runner.threads == 1
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(runner(x), _model()(x), atol=1e-4)


def test_eval_onnx_uses_recorded_preprocessing_and_matches_torch(files, capsys):
    ref = run_json(capsys, ["eval", str(files["model"]), "--data", str(files["data"]), "--preprocess", "imagenet"])
    got = run_json(capsys, ["eval", str(files["fp32"]), "--data", str(files["data"])])
    assert got["runtime"] == "onnxruntime" and got["preprocess"] == ref["preprocess"]
    assert got["n"] == 9 and got["top1"] == ref["top1"] and abs(got["loss"] - ref["loss"]) < 1e-4
    # torch-side INT8 dynamic evaluates the same way
    q = run_json(capsys, ["eval", str(files["model"]), "--data", str(files["data"]), "--int8", "dynamic"])
    assert q["runtime"] == "torch" and q["int8"]["mode"] == "dynamic" and abs(q["loss"] - ref["loss"]) < 0.05


def test_export_int8_cli_dynamic_and_static(files, tmp_path, capsys):
    dyn = run_json(capsys, ["export", str(files["model"]), "--onnx", str(tmp_path / "d.onnx"), "--int8", "dynamic"])
    assert dyn["mode"] == "dynamic" and dyn["int8_file_bytes"] == (tmp_path / "d.onnx").stat().st_size
    argv = ["export", str(files["fp32"]), "--onnx", str(tmp_path / "s.onnx"), "--int8", "static"]
    st = run_json(capsys, [*argv, "--calib", str(files["data"]), "--calib-images", "5", "--keep-fp32", "none"])
    assert st["mode"] == "static" and st["calib_images"] == 5 and st["excluded_nodes"] == []
    assert main(["export", str(files["model"]), "--onnx", str(tmp_path / "t.onnx"), "--int8", "dynamic"]) == 0
    out = capsys.readouterr().out
    assert "INT8 dynamic" in out and "size on disk" in out and "compressed" in out
    # the INT8 file carries the preprocessing and evaluates through the CLI
    res = run_json(capsys, ["eval", str(tmp_path / "s.onnx"), "--data", str(files["data"])])
    assert res["int8"]["mode"] == "static" and res["n"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "s.onnx", "t.onnx"]


def test_bench_onnxruntime_side_by_side(files, capsys):
    common = ["--batch-size", "2", "--runs", "3", "--warmup", "1", "--threads", "1"]
    res = run_json(capsys, ["bench", str(files["model"]), "--vs", str(files["fp32"]), *common])
    assert res["model_runtime"] == "torch" and res["vs_runtime"] == "onnxruntime" and res["ratio"] > 0
    assert res["vs_params"] == res["model_params"] and res["onnxruntime"]
    argv = ["bench", str(files["model"]), "--vs", str(files["model"]), "--runtime", "onnxruntime"]
    res = run_json(capsys, [*argv, "--int8", "dynamic", *common])
    assert res["model_int8"]["mode"] == res["vs_int8"]["mode"] == "dynamic"
    assert res["model_onnx_file_bytes"] > 0 and res["rounds"] == 3 and res["threads"] == 1
    assert main(["bench", str(files["fp32"]), *common]) == 0  # an .onnx MODEL implies onnxruntime
    assert "onnxruntime fp32" in capsys.readouterr().out
    # an fp32 .onnx is quantized on request; the torch MODEL with --int8 dynamic stays in torch
    res = run_json(capsys, ["bench", str(files["fp32"]), "--vs", str(files["model"]), "--int8", "dynamic", *common])
    assert res["model_int8"]["mode"] == "dynamic" and res["model_runtime"] == "onnxruntime"
    assert res["vs_runtime"] == "torch" and res["vs_int8"]["backend"] in ("torchao", "torch.ao")


def test_ort_latency_table_build_check_and_runtime_refusal(tmp_path, capsys):
    shape = {"img_size": 32, "patch_size": 8, "num_classes": 10}
    grid = {"emb": [16, 32], "heads": [0, 2], "qk": [8, 16], "v": [8, 16], "mlp": [0, 64]}
    table = build_table(
        batch_size=2, threads=1, grid=grid, runs=2, warmup=1, progress=False, runtime="onnxruntime", **shape
    )
    assert table.runtime == "onnxruntime" and table.meta["onnxruntime"] and (table.attn_ms > 0).all()
    base = ViTConfig.uniform(embed_dim=32, depth=2, heads=2, mlp_ratio=2.0, num_classes=10, img_size=32, patch_size=8)
    base.blocks = [type(b)(2, 16, 16, 64) for b in base.blocks]
    res = check_table(table, base, num_archs=2, runs=2, progress=False)
    assert res["runtime"] == "onnxruntime" and len(res["archs"]) == 3
    with pytest.raises(VitPruneError, match="runtime torch"):
        table.check_compatible("cpu", threads=1, runtime="torch")
    assert table.check_compatible("cpu", threads=1, runtime="onnxruntime") == []
    with pytest.warns(UserWarning, match="runtime torch"):
        table.check_compatible("cpu", threads=1, runtime="torch", force=True)
    # a table saved before the runtime entry existed is a torch table
    old = table.to_dict()
    del old["meta"]["runtime"]
    assert LatencyTable.from_dict(old).runtime == "torch"
    # the CLI
    lut = tmp_path / "ort.lut.json"
    argv = ["lut", "build", "--runtime", "onnxruntime", "--batch", "2", "--threads", "1", "--img-size", "32"]
    assert (
        main(
            [
                *argv,
                "--patch-size",
                "8",
                "--num-classes",
                "10",
                "--grid",
                GRID,
                "--runs",
                "2",
                "--out",
                str(lut),
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads(lut.read_text())["meta"]["runtime"] == "onnxruntime"
    check = ["lut", "check", str(lut), "--depth", "2", "--archs", "1", "--runs", "2", "--quiet"]
    assert main([*check, "--json", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["runtime"] == "onnxruntime"
    capsys.readouterr()
    assert main([*check, "--runtime", "torch"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: latency table does not match this setting: runtime torch (table: onnxruntime) (--force)"
    )


def test_load_model_refuses_onnx(files):
    with pytest.raises(VitPruneError, match=r"m\.onnx is an ONNX file: it can be evaluated and benchmarked"):
        load_model(files["fp32"])


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "{model}", "--onnx", "{tmp}/x.onnx", "--int8", "static"],  # no --calib
        ["export", "{model}", "--onnx", "{tmp}/x.onnx", "--int8", "static", "--calib", "{tmp}/empty"],
        ["export", "{model}", "--onnx", "{tmp}/exists.onnx", "--int8", "dynamic"],
        ["export", "{fp32}", "--onnx", "{tmp}/x.onnx"],  # already ONNX, no --int8
        ["export", "{model}", "--onnx", "{tmp}/x.onnx", "--int8", "dynamic", "--keep-fp32", "nonode"],
        ["info", "{fp32}"],  # an ONNX file where a training model is needed
        ["prune", "obs", "{fp32}", "--data", "{data}", "--sparsity", "0.5", "--out", "{tmp}/obs"],
        ["lut", "build", "--batch", "1", "--model", "{fp32}", "--out", "{tmp}/x.json"],
        ["bench", "{fp32}", "--runtime", "torch"],
        ["bench", "{model}", "--runtime", "torch", "--int8", "static", "--calib", "{data}"],
        ["bench", "{model}", "--runtime", "onnxruntime", "--memory"],
        ["eval", "{model}", "--data", "{data}", "--int8", "static"],
        ["eval", "{foreign}", "--data", "{data}"],  # no vitprune metadata, no --preprocess
    ],
)
def test_bad_deploy_input_is_one_error_line(argv, files, tmp_path, capsys):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "exists.onnx").write_text("keep")
    fmt = {**files, "tmp": tmp_path}
    argv = [a.format(**fmt) for a in argv]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    assert (tmp_path / "exists.onnx").read_text() == "keep"


def test_int8_without_quantization_package_is_one_error(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    assert main(["export", str(files["model"]), "--onnx", str(tmp_path / "x.onnx"), "--int8", "dynamic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --int8 needs onnxruntime.quantization")
    assert list(tmp_path.iterdir()) == []


OPENVINO_CHECK = """
import json, sys, torch
from vitprune.cli.main import main
from vitprune.runtime.ort import load_runner
fp32, model_dir, data, ref = sys.argv[1:5]
runner = load_runner(fp32, "openvino", threads=1)
x = torch.load(ref, weights_only=True)
assert torch.allclose(runner(x["x"]), x["y"], atol=1e-3)
assert main(["eval", fp32, "--data", data, "--runtime", "openvino", "--json"]) == 0
common = ["--batch-size", "2", "--runs", "2", "--warmup", "1", "--threads", "1", "--json"]
assert main(["bench", model_dir, "--vs", fp32, "--runtime", "openvino", *common]) == 0
"""


def test_openvino_runtime(files, tmp_path):
    """In a child process: OpenVINO's libraries loaded into the pytest process made a later torch training test
    crash (segfault), so they never are."""
    import importlib.util
    import os
    import subprocess

    if importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.save({"x": x, "y": _model()(x)}, tmp_path / "ref.pt")
    repo = str(Path(__file__).resolve().parents[1])
    args = [str(files["fp32"]), str(files["model"]), str(files["data"]), str(tmp_path / "ref.pt")]
    proc = subprocess.run(
        [sys.executable, "-c", OPENVINO_CHECK, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": repo},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    eval_json, bench_json = proc.stdout.split("\n}\n", 1)
    res = json.loads(eval_json + "}")
    assert res["runtime"] == "openvino" and res["n"] == 9
    res = json.loads(bench_json)
    assert res["model_runtime"] == res["vs_runtime"] == "openvino" and res["ratio"] > 0
