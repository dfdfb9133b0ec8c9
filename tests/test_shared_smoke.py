"""Real-model pruning smoke test (issue #13): NViT and OBS on the shared ViT-Tiny, a few calibration batches, top-1
above floors recorded from a run of this code (2-core CPU, 1 thread; 200 val images = the first per class:
dense 65.5 %, NViT at 0.9 of the MACs 58.5 %, OBS at 30 % sparsity 66.5 %). The floors leave room for other
BLAS builds, not for a broken pruner."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_DATA, SHARED_MODEL
from torch.utils.data import Subset

from vitprune import pruners
from vitprune.data.imagefolder import ImageFolderDataset, make_loader
from vitprune.data.transforms import build_eval_transform
from vitprune.metrics.evaluate import evaluate

pytestmark = [pytest.mark.shared, pytest.mark.slow]


@pytest.fixture(scope="module")
def real():
    from vitprune.models.checkpoints import load_model

    torch.manual_seed(0)
    model = load_model(SHARED_MODEL / "model.safetensors")
    tf, classes = build_eval_transform("shared"), SHARED_MODEL / "classes.txt"
    val = make_loader(ImageFolderDataset(SHARED_DATA / "val", tf, classes, limit_per_class=1), 50)
    train = ImageFolderDataset(SHARED_DATA / "train", tf, classes, limit_per_class=1)
    calib = make_loader(Subset(train, list(range(0, 200, 5))), 8)  # 40 training images, never val
    return model, val, calib


def test_nvit_and_obs_on_the_real_model(real):
    model, val, calib = real
    assert evaluate(model, val, progress=False)["top1"] == pytest.approx(65.5, abs=1.0)
    res = pruners.create("nvit", target_macs=0.9, prune_steps=1, batches_per_step=2, progress=False).prune(model, calib)
    assert res.report["pruned"]["fraction"]["macs"] <= 0.9
    assert evaluate(res.model, val, progress=False)["top1"] >= 52.0
    (obs,) = pruners.create("obs", sparsity=(0.3,), num_grads=32, block_size=64).prune(model, calib)
    assert obs.report["sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert evaluate(obs.model, val, progress=False)["top1"] >= 62.0
