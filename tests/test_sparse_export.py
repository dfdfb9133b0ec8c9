"""Compressed sparse storage (exact reload), CSR linears and the 2:4 GPU path's guard."""

import pytest
import torch
from torch import nn

from vitprune.errors import VitPruneError
from vitprune.export.sparse import (
    SPARSE_WEIGHTS_NAME,
    CSRLinear,
    convert_to_csr,
    is_2to4,
    load_sparse,
    save_sparse,
    semi_structured_status,
    to_semi_structured,
)
from vitprune.models import ViT, attach_gate, save
from vitprune.pruners.baselines import magnitude_masks, nm_mask
from vitprune.pruners.calibration import find_linears


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: one thread is fastest, and avoids spin-waiting on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sparsify(model, sparsity, nm=None):
    linears = find_linears(model)
    keep = magnitude_masks({n: m.weight.detach() for n, m in linears.items()}, sparsity, "layer", nm)
    with torch.no_grad():
        for n, m in linears.items():
            m.weight.mul_(keep[n])
    return model


def test_save_load_exact_and_smaller(tiny_model, tmp_path):
    model = _sparsify(tiny_model, 0.7)
    info = save_sparse(model, tmp_path / "sparse")
    again = load_sparse(tmp_path / "sparse")
    assert again.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again(x), model(x))
    save(model, tmp_path / "dense")
    dense_file = (tmp_path / "dense" / "model.safetensors").stat().st_size
    assert info["file_bytes"] == (tmp_path / "sparse" / SPARSE_WEIGHTS_NAME).stat().st_size
    assert info["file_bytes"] < 0.6 * dense_file
    assert "blocks.0.mlp.fc1.weight" in info["compressed_tensors"]
    assert "pos_embed" not in info["compressed_tensors"]  # dense tensors stay dense


def test_gates_and_ragged_roundtrip(ragged_config, tmp_path):
    torch.manual_seed(0)
    model = _sparsify(ViT(ragged_config).eval(), 0.5)
    attach_gate(model.blocks[0].attn, "head_gate", torch.tensor([1.0, 0.0, 1.0, 1.0]))
    save_sparse(model, tmp_path / "m")
    again = load_sparse(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again(x), model(x))


def test_refuses_overwrite_and_bad_dirs(tiny_model, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(VitPruneError, match="exists"):
        save_sparse(tiny_model, target)
    assert (target / "keep.txt").read_text() == "x"
    with pytest.raises(VitPruneError, match="not a vitprune sparse model"):
        load_sparse(target)


def test_csr_linear_matches_dense():
    torch.manual_seed(1)
    lin = nn.Linear(16, 12)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) > 0.8)
    csr = CSRLinear(lin)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(csr(x), lin(x), rtol=1e-5, atol=1e-6)


def test_convert_to_csr_threshold(tiny_model):
    model = _sparsify(tiny_model, 0.9)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight.normal_()  # dense again: must stay nn.Linear
    converted, names = convert_to_csr(model, min_sparsity=0.85)
    assert "blocks.0.mlp.fc1" not in names and "blocks.0.mlp.fc2" in names and len(names) == 15
    assert isinstance(converted.blocks[0].mlp.fc2, CSRLinear) and isinstance(model.blocks[0].mlp.fc2, nn.Linear)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)


def test_is_2to4():
    w = torch.randn(4, 8)
    assert not is_2to4(w)
    assert is_2to4(w * nm_mask(w.abs(), (2, 4)))
    assert not is_2to4(torch.zeros(4, 6))


@pytest.mark.skipif(semi_structured_status()[0], reason="a 2:4-capable GPU is present")
def test_semi_structured_reports_unavailable(tiny_model):
    ok, why = semi_structured_status()
    assert not ok and why
    with pytest.raises(VitPruneError, match="unavailable"):
        to_semi_structured(tiny_model, ["blocks.0.mlp.fc1"])


@pytest.mark.skipif(not semi_structured_status()[0], reason="needs a CUDA GPU with compute capability >= 8.0")
def test_semi_structured_on_gpu():
    torch.manual_seed(2)
    from vitprune.models import ViTConfig

    cfg = ViTConfig.uniform(embed_dim=128, depth=2, heads=2, num_classes=10, img_size=32, patch_size=8)
    model = _sparsify(ViT(cfg).eval(), 0.5, nm=(2, 4))
    names = list(find_linears(model))
    fast = to_semi_structured(model, names)
    x = torch.randn(4, 3, 32, 32)
    ref = model.cuda().half()(x.cuda().half())
    torch.testing.assert_close(fast(x.cuda().half()), ref, rtol=2e-2, atol=2e-2)
    with pytest.raises(VitPruneError, match="not 2:4"):
        to_semi_structured(_sparsify(ViT(cfg).eval(), 0.5), names)
