"""``vitprune info | eval | bench | export`` in-process, and the one-line error path as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, SHARED_DATA, SHARED_MODEL
from PIL import Image

from vitprune.cli.main import main
from vitprune.data.transforms import build_eval_transform
from vitprune.metrics.flops import count_macs, count_params
from vitprune.models import ViT, attach_gate, save
from vitprune.models.presets import get_preset


@pytest.fixture
def ragged_dir(ragged_config, tmp_path):
    torch.manual_seed(0)
    model = ViT(ragged_config)
    attach_gate(model.blocks[0].attn, "head_gate", torch.tensor([1.0, 1.0, 0.0, 1.0]))
    return save(model, tmp_path / "ragged")


@pytest.fixture
def dense_dir(tiny_model, tmp_path):
    return save(tiny_model, tmp_path / "dense")


def run_json(capsys, argv: list[str]) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_table_and_json(ragged_dir, ragged_config, capsys):
    assert main(["info", str(ragged_dir)]) == 0
    out = capsys.readouterr().out
    assert "heads" in out and "MACs" in out and f"{count_params(ragged_config):,}" in out
    assert len([line for line in out.splitlines() if line.strip().split(" ")[0].isdigit()]) == 4  # one row a block
    info = run_json(capsys, ["info", str(ragged_dir)])
    macs = count_macs(ragged_config)
    assert info["params"] == count_params(ragged_config) and info["macs"] == macs["total"]
    assert [b["heads"] for b in info["blocks"]] == [4, 2, 0, 3]
    assert [b["mlp_dim"] for b in info["blocks"]] == [64, 40, 24, 0]
    assert [b["macs"] for b in info["blocks"]] == [b["total"] for b in macs["per_block"]]
    assert info["gates"] == ["blocks.0.attn.head_gate"]
    assert run_json(capsys, ["info", str(ragged_dir), "--img-size", "64"])["tokens"] == 2 + 64


def test_info_timm_checkpoint_with_preset(tmp_path, capsys):
    cfg = get_preset("deit_tiny_patch16_224").config(num_classes=5, img_size=32)
    with torch.device("meta"):  # shapes only: no time spent initialising 5.5 M weights
        shapes = {k: v.shape for k, v in ViT(cfg).state_dict().items()}
    path = tmp_path / "deit.pth"
    torch.save({k: torch.zeros(s) for k, s in shapes.items()}, path)
    info = run_json(capsys, ["info", str(path), "--preset", "deit_tiny_patch16_224"])
    assert info["params"] == count_params(cfg) and [b["heads"] for b in info["blocks"]] == [3] * 12


def _image_folder(root, classes: list[str], per_class: int = 2):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _reference_accuracy(model: ViT, root, classes: list[str]) -> float:
    """Brute force: load each image, preprocess ('shared' preset at the model's size), compare argmax."""
    tf = build_eval_transform("shared", img_size=model.config.img_size)
    hits = total = 0
    model.eval()
    for folder in sorted(root.iterdir()):
        label = classes.index(folder.name)
        for f in sorted(folder.iterdir()):
            with torch.inference_mode():
                logits = model(tf(Image.open(f).convert("RGB"))[None])
            hits += int(logits.argmax(-1).item() == label)
            total += 1
    return 100.0 * hits / total


def test_eval_matches_brute_force_and_uses_classes_file(tiny_model, tmp_path, capsys):
    # 10-class model, 3 folders; classes.txt next to the model puts them at outputs 7, 2 and 5
    data = _image_folder(tmp_path / "data", ["a", "b", "c"])
    order = ["x0", "x1", "b", "x3", "x4", "c", "x6", "a", "x8", "x9"]
    torch.manual_seed(1)
    with torch.no_grad():
        tiny_model.head.bias.copy_(torch.zeros(10))
        tiny_model.head.bias[[7, 2, 5]] = torch.tensor([0.1, 0.05, 0.0])  # not a constant prediction
    model_dir = save(tiny_model, tmp_path / "m")
    (model_dir / "classes.txt").write_text("\n".join(order) + "\n")
    res = run_json(capsys, ["eval", str(model_dir), "--data", str(data), "--batch-size", "4"])
    assert res["n"] == 6 and res["classes_file"] == str(model_dir / "classes.txt")
    assert res["top1"] == pytest.approx(_reference_accuracy(tiny_model, data, order))
    assert res["top5"] >= res["top1"]
    limited = run_json(capsys, ["eval", str(model_dir), "--data", str(data), "--limit-per-class", "1"])
    assert limited["n"] == 3
    assert main(["eval", str(model_dir), "--data", str(data), "--preprocess", "imagenet"]) == 0
    assert "top1" in capsys.readouterr().out


def test_bench_single_and_side_by_side(dense_dir, ragged_dir, tiny_config, capsys):
    common = ["--batch-size", "2", "--runs", "3", "--warmup", "1", "--threads", "1"]
    single = run_json(capsys, ["bench", str(dense_dir), *common])
    assert single["threads"] == 1 and single["runs"] == 3 and single["median_ms"] > 0
    assert single["model_macs"] == count_macs(tiny_config)["total"]
    pair = run_json(capsys, ["bench", str(dense_dir), "--vs", str(ragged_dir), *common, "--memory"])
    assert pair["ratio"] == pytest.approx(pair["a"]["median_ms"] / pair["b"]["median_ms"])
    assert pair["model_peak_memory_bytes"] > 0 and pair["vs_peak_memory_bytes"] > 0
    assert main(["bench", str(dense_dir), "--vs", str(ragged_dir), *common]) == 0
    assert "speed-up of vs over model" in capsys.readouterr().out


def test_export_and_refuse_overwrite(ragged_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    res = run_json(capsys, ["export", str(ragged_dir), "--onnx", str(out)])
    assert out.is_file() and res["max_abs_diff"] < 1e-4 and res["onnx_file_bytes"] == out.stat().st_size
    before = out.read_bytes()
    assert main(["export", str(ragged_dir), "--onnx", str(out)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: output exists")
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "{model}", "--data", "{tmp}/nodata"],
        ["eval", "{model}", "--data", "{tmp}", "--classes", "{tmp}/none.txt"],
        ["bench", "{model}", "--runs", "0"],
        ["bench", "{model}", "--device", "nonsense"],
        ["info", "{model}", "--img-size", "3"],
        ["export", "{model}", "--onnx", "{tmp}/x.onnx", "--opset", "1"],
    ],
)
def test_bad_input_is_one_error_line(argv, dense_dir, tmp_path, capsys):
    (tmp_path / "cls").mkdir()
    argv = [a.format(model=dense_dir, tmp=tmp_path) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "vitprune.cli.main", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_subprocess_bad_model_path(tmp_path):
    out = tmp_path / "out.onnx"
    proc = _cli("export", str(tmp_path / "missing_model"), "--onnx", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: model path not found: {tmp_path / 'missing_model'}"
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


@pytest.mark.shared
def test_shared_model_info_and_eval(capsys, tmp_path):
    info = run_json(capsys, ["info", str(SHARED_MODEL)])
    assert info["params"] == 5_563_016 and info["num_classes"] == 200 and info["macs"] == 1_253_529_600
    # 40 classes x 1 image (symlinks), so the test stays fast on 2 busy cores; the head's order comes from the
    # classes.txt next to the model, found automatically
    val = SHARED_DATA / "val"
    for wnid in sorted(d.name for d in val.iterdir())[::5]:
        (tmp_path / wnid).mkdir()
        first = sorted((val / wnid).iterdir())[0]
        (tmp_path / wnid / first.name).symlink_to(first)
    res = run_json(capsys, ["eval", str(SHARED_MODEL), "--data", str(tmp_path)])
    assert res["n"] == 40 and res["classes_file"] == str(SHARED_MODEL / "classes.txt")
    assert res["top1"] >= 40.0  # 69.46 % on all 5,000 images; P(<= 16/40 correct) ~ 1e-4


def test_prune_uses_the_classes_file_next_to_the_model(tiny_model, tmp_path):
    """prune (like eval) maps folders through the model's own classes.txt when --classes is not given."""
    data = _image_folder(tmp_path / "data", ["a", "b", "c"])
    order = ["x0", "x1", "b", "x3", "x4", "c", "x6", "a", "x8", "x9"]
    with torch.no_grad():
        tiny_model.head.bias.copy_(torch.zeros(10))
        tiny_model.head.bias[7] = 50.0  # always output 7 = folder "a" through classes.txt, "x7" in sorted order
    model_dir = save(tiny_model, tmp_path / "m")
    (model_dir / "classes.txt").write_text("\n".join(order) + "\n")
    out = tmp_path / "run"
    argv = ["prune", "l2", str(model_dir), "--data", str(data), "--val", str(data), "--out", str(out),
            "--target-macs", "0.9", "--batch-size", "2", "--calib-batch-size", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dense"]["eval"]["top1"] == pytest.approx(100 / 3)  # the "a" images only
    assert report["dense"]["eval"]["top1"] == pytest.approx(_reference_accuracy(tiny_model, data, order))
