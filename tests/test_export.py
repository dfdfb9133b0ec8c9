"""ONNX export of dense, ragged and gated ViTs, checked with onnxruntime; atomic, refuses to overwrite."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from vitprune.errors import VitPruneError
from vitprune.models import BlockConfig, ViT, ViTConfig, attach_gate

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from vitprune.export.onnx import export_onnx  # noqa: E402


@pytest.fixture
def hard_model() -> ViT:
    """Every per-block shape the ViT supports: ragged heads/QK/V/MLP, zero heads, zero MLP, zero QK, zero V."""
    blocks = [
        BlockConfig(4, 8, 8, 64),
        BlockConfig(2, 4, 12, 40),
        BlockConfig(0, 0, 0, 24),  # attention removed
        BlockConfig(3, 8, 4, 0),  # MLP removed
        BlockConfig(2, 0, 4, 8),  # no QK dims: uniform attention
        BlockConfig(2, 4, 0, 8),  # no V dims: attention adds its bias only
    ]
    torch.manual_seed(0)
    model = ViT(ViTConfig(embed_dim=24, blocks=blocks, num_classes=7, img_size=32, patch_size=8, distilled=True))
    with torch.no_grad():  # non-zero biases so the emptied branches matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def test_ragged_model_exports_and_matches(hard_model, tmp_path):
    out = tmp_path / "m.onnx"
    res = export_onnx(hard_model, out)
    assert res["path"] == str(out) and out.is_file()
    assert res["onnx_file_bytes"] == out.stat().st_size > 0
    assert res["max_abs_diff"] < 1e-4
    # an independent check with another batch size (dynamic batch axis)
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        ref = hard_model(x)
    assert torch.allclose(run_onnx(out, x), ref, atol=1e-4, rtol=0)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert ViTConfig.from_dict(json.loads(meta["vitprune_config"])) == hard_model.config
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left


def test_gated_model_and_fixed_batch(tiny_model, tmp_path):
    attach_gate(tiny_model.blocks[1].attn, "head_gate", torch.tensor([1.0, 0.0, 1.0, 0.5]))
    attach_gate(tiny_model.blocks[2].mlp, "gate", (torch.arange(64) % 3 != 0).float(), learnable=True)
    attach_gate(tiny_model, "emb_mask", (torch.arange(32) % 4 != 1).float())
    tiny_model.train()
    out = tmp_path / "sub" / "gated.onnx"
    res = export_onnx(tiny_model, out, batch_size=2, dynamic_batch=False, opset=14)
    assert res["max_abs_diff"] < 1e-4 and res["opset"] == 14 and not res["dynamic_batch"]
    assert tiny_model.training  # mode restored
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 32, 32]
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(run_onnx(out, x), tiny_model.eval()(x), atol=1e-4, rtol=0)


def test_other_image_size(hard_model, tmp_path):
    res = export_onnx(hard_model, tmp_path / "m48.onnx", img_size=48)
    assert res["img_size"] == 48 and res["max_abs_diff"] < 1e-4


def test_refuses_existing_output_unless_overwrite(tiny_model, tmp_path):
    out = tmp_path / "m.onnx"
    out.write_text("keep me")
    with pytest.raises(VitPruneError, match="output exists"):
        export_onnx(tiny_model, out)
    assert out.read_text() == "keep me"
    export_onnx(tiny_model, out, overwrite=True, check=False)
    assert onnx.load(str(out)).graph.output[0].name == "logits"


def test_failed_check_writes_nothing(tiny_model, tmp_path):
    out = tmp_path / "m.onnx"
    with pytest.raises(VitPruneError, match="differ from PyTorch"):
        export_onnx(tiny_model, out, atol=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_names_the_extra(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(VitPruneError, match=r"pip install vitprune\[onnx\]"):
        export_onnx(tiny_model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tiny_model, tmp_path):
    with pytest.raises(VitPruneError, match="batch_size"):
        export_onnx(tiny_model, tmp_path / "m.onnx", batch_size=0)
    with pytest.raises(VitPruneError, match="opset 13 is not supported: use 14 to"):
        export_onnx(tiny_model, tmp_path / "m.onnx", opset=13)
    assert list(tmp_path.iterdir()) == []
