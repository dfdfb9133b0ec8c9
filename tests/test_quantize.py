"""INT8: ONNX Runtime dynamic / static (QDQ) quantization of exported ViTs, zeros kept, fp32 exclusions; torch
dynamic quantization."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vitprune.errors import VitPruneError
from vitprune.models import ViT, ViTConfig

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from onnx import numpy_helper  # noqa: E402

from vitprune.export.onnx import export_onnx  # noqa: E402
from vitprune.export.quantize import calibration_batches, find_images, quantize_onnx  # noqa: E402
from vitprune.export.torch_int8 import quantize_torch_dynamic  # noqa: E402
from vitprune.runtime.ort import OrtModel  # noqa: E402


def _model(sparsity: float = 0.0) -> ViT:
    torch.manual_seed(0)
    cfg = ViTConfig.uniform(embed_dim=32, depth=2, heads=4, mlp_ratio=2.0, num_classes=10, img_size=32, patch_size=8)
    model = ViT(cfg).eval()
    if sparsity:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and name.startswith("blocks."):
                    thr = p.abs().flatten().kthvalue(int(sparsity * p.numel())).values
                    p[p.abs() <= thr] = 0.0
    return model


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "fp32.onnx"
    export_onnx(_model(), path)
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _transform():
    from vitprune.data.transforms import build_eval_transform

    return build_eval_transform("shared", img_size=32)


def _close_to_fp32(int8_path, x: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    got = OrtModel(int8_path, threads=1)(x)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= rel * ref.abs().max()


def test_dynamic_int8_close_to_fp32_and_smaller(fp32_file, tmp_path):
    out = tmp_path / "d.onnx"
    res = quantize_onnx(fp32_file, out, "dynamic")
    assert res["mode"] == "dynamic" and res["nodes_quantized"] == 8  # qkv, proj, fc1, fc2 of 2 blocks
    assert res["quant_ops"]["MatMulInteger"] == 8
    assert res["excluded_nodes"] == ["/proj/Conv", "/head/Gemm"]
    assert res["int8_file_bytes"] == out.stat().st_size < res["fp32_file_bytes"]
    assert res["int8_deflate_bytes"] < res["int8_file_bytes"]
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        ref = _model()(x)
    _close_to_fp32(out, x, ref, 0.05)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert "vitprune_config" in meta and json.loads(meta["vitprune_int8"])["mode"] == "dynamic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx"]


def test_static_int8_calibrated_on_images(fp32_file, calib, tmp_path):
    batches = calibration_batches(calib, _transform(), num_images=6, batch_size=4)
    assert [b.shape for b in batches] == [(4, 3, 32, 32), (2, 3, 32, 32)]
    out = tmp_path / "s.onnx"
    res = quantize_onnx(fp32_file, out, "static", calib=batches)
    assert res["calib_images"] == 6 and res["quant_ops"]["QuantizeLinear"] > 0
    assert res["nodes_quantized"] == 10  # 8 linears + 2 x 2 attention MatMuls, less fc2 (kept fp32 by default)
    assert res["excluded"] == ["patch_embed", "head", "mlp_fc2"]
    assert res["excluded_nodes"] == ["/proj/Conv", "/head/Gemm", "/blocks.0/mlp/fc2/MatMul", "/blocks.1/mlp/fc2/MatMul"]
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        ref = _model()(x)
    _close_to_fp32(out, x, ref, 0.15)
    # attention kept in fp32 on request; 'none' quantizes the patch embedding and head too
    res = quantize_onnx(fp32_file, tmp_path / "s2.onnx", "static", calib=batches, exclude=("attention",))
    assert res["nodes_quantized"] == 10 and any(n.endswith("/attn/Softmax") for n in res["excluded_nodes"])
    res = quantize_onnx(fp32_file, tmp_path / "s4.onnx", "dynamic", exclude=("*/blocks.1/*",))
    assert res["nodes_quantized"] == 4 + 2  # block 0's linears, the patch embedding and the head
    assert all(n.startswith("/blocks.1/") for n in res["excluded_nodes"]) and len(res["excluded_nodes"]) > 4
    res = quantize_onnx(fp32_file, tmp_path / "s3.onnx", "static", calib=batches, exclude=(), per_channel=False)
    assert res["nodes_quantized"] == 14 and res["excluded_nodes"] == []


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_sparse_zeros_stay_exact_zeros(mode, calib, tmp_path):
    model = _model(sparsity=0.6)
    fp32 = tmp_path / "sparse.onnx"
    export_onnx(model, fp32)
    batches = calibration_batches(calib, _transform(), num_images=4) if mode == "static" else None
    out = tmp_path / "int8.onnx"
    res = quantize_onnx(fp32, out, mode, calib=batches, graph_prep=False)
    assert res["zeros_kept"] and res["zero_weights_fp32"] >= 0.6 * (6 if mode == "static" else 8) * 32 * 32
    # independent check on the files: every int8 weight is zero wherever its fp32 source is
    src = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(fp32)).graph.initializer}
    dst = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    checked = 0
    for name, q in dst.items():
        if name.endswith("_quantized") and q.dtype == np.int8:
            w = src[name.removesuffix("_quantized")]
            assert np.all(q[w == 0] == 0)
            checked += int((w == 0).sum())
    assert checked == res["zero_weights_fp32"]
    assert res["int8_bitmask_bytes"] < res["int8_file_bytes"]  # bitmask + non-zero values beat dense int8


def test_bad_requests_are_errors_and_write_nothing(fp32_file, tmp_path):
    with pytest.raises(VitPruneError, match="static needs calibration"):
        quantize_onnx(fp32_file, tmp_path / "a.onnx", "static")
    with pytest.raises(VitPruneError, match="neither a node"):
        quantize_onnx(fp32_file, tmp_path / "a.onnx", "dynamic", exclude=("nope",))
    with pytest.raises(VitPruneError, match="unknown INT8 mode"):
        quantize_onnx(fp32_file, tmp_path / "a.onnx", "int4")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(VitPruneError, match="has no images"):
        find_images(tmp_path / "empty")
    (tmp_path / "exists.onnx").write_text("keep")
    with pytest.raises(VitPruneError, match="output exists"):
        quantize_onnx(fp32_file, tmp_path / "exists.onnx", "dynamic")
    assert (tmp_path / "exists.onnx").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "exists.onnx"]


def test_quantization_missing_is_one_error(monkeypatch, fp32_file, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime.quantization", None)
    with pytest.raises(VitPruneError, match=r"needs onnxruntime\.quantization"):
        quantize_onnx(fp32_file, tmp_path / "a.onnx", "dynamic")


@pytest.mark.parametrize("backend", ["torch.ao", "torchao"])
def test_torch_dynamic_int8(backend):
    if backend == "torchao":
        pytest.importorskip("torchao")
    model = _model()
    q = quantize_torch_dynamic(model, backend)
    assert q.int8 == {"mode": "dynamic", "backend": backend, "layers": 8}
    assert type(model.blocks[0].mlp.fc1) is torch.nn.Linear  # the original is untouched
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        ref, got = model(x), q(x)
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()
    assert type(q.head) is torch.nn.Linear  # the classifier stays fp32
