"""Every method selects the same masks and reaches the same logits (atol 1e-5) through the one pruning interface
as it did before the redesign (fixture recorded at 16d2a0c by tests/data/record_pruner_regression.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Subset

from vitprune import pruners

DATA = Path(__file__).parent / "data"
pytestmark = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)


@pytest.fixture(scope="module")
def recorded():
    meta = json.loads((DATA / "pruner_regression.json").read_text())
    return load_file(str(DATA / "pruner_regression.safetensors")), meta


@pytest.fixture(scope="module")
def setup():
    from vitprune.data.fashion_mnist import FashionMNIST
    from vitprune.training.default_model import load_default_model

    train = FashionMNIST(None, "train", limit=512)
    test = FashionMNIST(None, "test", limit=64)
    loader = DataLoader(train, batch_size=32, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:32].tolist()
    calib = DataLoader(Subset(train, idx), batch_size=16, shuffle=False)
    probe = torch.stack([test[i][0] for i in range(64)])
    return load_default_model().eval(), load_default_model().eval(), loader, calib, probe


def _logits(model, probe):
    model.eval()
    with torch.no_grad():
        return model(probe)


COMMON = {"seed": 0, "log_every": 0, "progress": False}
STRUCTURAL = {
    "nvit_macs": (
        "nvit",
        dict(
            target_macs=0.5,
            prune_steps=2,
            batches_per_step=2,
            train_steps_between=2,
            finetune_steps=2,
            lr=2e-4,
            criterion="saliency",
            reconstruct="off",
        ),  # recorded before these two defaults changed
    ),
    "nvit_params_per_cost": (
        "nvit",
        dict(
            target_params=0.6,
            prune_steps=2,
            batches_per_step=1,
            criterion="per_cost",
            kinds=("heads", "mlp", "emb"),
            reconstruct="off",
        ),
    ),
    "vtp": (
        "vtp",
        dict(target_macs=0.6, lam=1e-4, gate_lr=1e-2, sparsity_steps=3, finetune_steps=2, lr=2e-4, round_to=8),
    ),
    "l2_uniform": ("l2", dict(target_macs=0.6, round_to=8)),
}


@pytest.mark.parametrize("case", list(STRUCTURAL))
def test_structural_methods_unchanged(case, recorded, setup):
    tensors, meta = recorded
    dense, teacher, loader, _, probe = setup
    method, settings = STRUCTURAL[case]
    result = pruners.create(method, **settings, **COMMON).prune(dense, loader, teacher=teacher)
    config = result.model.config.to_dict()
    assert {k: v for k, v in config.items() if k != "extra"} == {
        k: v for k, v in meta[case]["config"].items() if k != "extra"
    }
    assert config["extra"]["kept_blocks"] == [b for b, bm in enumerate(result.masks.blocks) if bm.keep]  # new: the map
    if case.startswith("nvit"):  # NViT recorded the counts of its selection (before rounding)
        assert result.report["selected"] == meta[case]["masks"]
    else:  # VTP and L2 recorded their (rounded) masks
        assert result.masks.to_dict() == meta[case]["masks"]
    torch.testing.assert_close(_logits(result.model, probe), tensors[f"{case}/logits"], atol=1e-5, rtol=0)


UNSTRUCTURED = {
    "obs": ("obs", dict(sparsity=(0.5, 0.7), block_size=16, num_grads=32, max_memory_gb=2.0), True),
    "obs24": ("obs", dict(nm="2:4", block_size=16, num_grads=32), True),
    "gm": ("gm", dict(sparsity=(0.5,)), False),
    "um": ("um", dict(sparsity=(0.5,)), False),
    "wanda": ("wanda", dict(sparsity=(0.5,), num_samples=32), True),
    "sparsegpt": ("sparsegpt", dict(sparsity=(0.5,), num_samples=32, blocksize=16, damp=0.01), True),
}


def _unpack(bits: torch.Tensor, shape) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(bits.numpy())[:n].astype(bool)).view(shape)


@pytest.mark.parametrize("case", list(UNSTRUCTURED))
def test_unstructured_methods_unchanged(case, recorded, setup):
    tensors, meta = recorded
    dense, _, _, calib, probe = setup
    method, settings, data = UNSTRUCTURED[case]
    results = pruners.create(method, **settings).prune(dense, calib if data else None)
    assert results, "a sweep returns one result per target"
    for res in results:
        key = f"{case}@{res.target:.2f}"
        assert res.report["sparsity"] == pytest.approx(meta[key]["sparsity"], abs=1e-9)
        for name, mask in res.masks.items():
            assert torch.equal(mask.cpu(), _unpack(tensors[f"{key}/mask/{name}"], mask.shape)), name
        torch.testing.assert_close(_logits(res.model, probe), tensors[f"{key}/logits"], atol=1e-5, rtol=0)
