"""evaluate(): top-k and loss against brute force; distributed sum; real-model subset accuracy."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SHARED_DATA, SHARED_MODEL
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from vitprune.data import ImageFolderDataset, build_eval_transform, make_loader
from vitprune.errors import VitPruneError
from vitprune.metrics import evaluate, topk_correct


def _brute_topk(logits, targets, k):
    """Count of rows whose target's logit is among the k largest (sorted in Python)."""
    hits = 0
    for row, t in zip(logits.tolist(), targets.tolist(), strict=True):
        order = sorted(range(len(row)), key=lambda j: -row[j])
        hits += int(t in order[:k])
    return hits


def _brute_ce(logits, targets):
    total = 0.0
    for row, t in zip(logits.tolist(), targets.tolist(), strict=True):
        m = max(row)
        total += m + math.log(sum(math.exp(v - m) for v in row)) - row[t]
    return total / len(row and targets)


class _Fixed(torch.nn.Module):
    """Returns precomputed logits for input i (the input is the sample index)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.logits[x.long().view(-1)]


def _data(n=23, c=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)


def test_topk_correct_matches_brute_force_and_caps_k():
    logits, targets = _data(50, 7)
    assert topk_correct(logits, targets, (1, 3, 5)) == [_brute_topk(logits, targets, k) for k in (1, 3, 5)]
    small, t = _data(10, 3)
    assert topk_correct(small, t, (1, 5)) == [_brute_topk(small, t, 1), 10]  # fewer than 5 classes


def test_evaluate_matches_brute_force():
    logits, targets = _data()
    loader = DataLoader(TensorDataset(torch.arange(23.0), targets), batch_size=5)
    model = _Fixed(logits).train()
    res = evaluate(model, loader, progress=False)
    assert res["n"] == 23
    assert res["top1"] == pytest.approx(100.0 * _brute_topk(logits, targets, 1) / 23)
    assert res["top5"] == pytest.approx(100.0 * _brute_topk(logits, targets, 5) / 23)
    assert res["loss"] == pytest.approx(_brute_ce(logits, targets), rel=1e-5)
    assert model.training  # mode restored


def test_evaluate_three_classes_top5_is_100_and_tuple_outputs_are_averaged():
    logits, targets = _data(8, 3)

    class Pair(torch.nn.Module):
        def forward(self, x):
            i = x.long().view(-1)
            return logits[i] + 1.0, logits[i] - 1.0  # average == logits

    res = evaluate(Pair(), DataLoader(TensorDataset(torch.arange(8.0), targets), batch_size=3), progress=False)
    assert res["top5"] == 100.0
    assert res["top1"] == pytest.approx(100.0 * _brute_topk(logits, targets, 1) / 8)


def test_evaluate_bad_labels_and_empty_loader():
    logits, _ = _data(4, 3)
    bad = DataLoader(TensorDataset(torch.arange(4.0), torch.tensor([0, 1, 2, 3])), batch_size=4)
    with pytest.raises(VitPruneError, match="label 3 out of range for a model with 3 classes"):
        evaluate(_Fixed(logits), bad, progress=False)
    with pytest.raises(VitPruneError, match="evaluation data is empty"):
        evaluate(_Fixed(logits), [], progress=False)


def test_worker_error_is_one_line_and_names_the_file(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "broken.JPEG").write_bytes(b"garbage")
    ds = ImageFolderDataset(tmp_path, build_eval_transform("shared", img_size=8))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2))
    with pytest.raises(VitPruneError, match=r"^cannot read image .*broken\.JPEG") as info:
        evaluate(model, make_loader(ds, 1, workers=1), progress=False)
    assert "\n" not in str(info.value)


def test_evaluate_all_reduces_in_a_process_group(tmp_path):
    import torch.distributed as dist

    logits, targets = _data()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        loader = make_loader(TensorDataset(torch.arange(23.0), targets), 4, distributed=True)
        res = evaluate(_Fixed(logits), loader, progress=False)
    finally:
        dist.destroy_process_group()
    assert res["n"] == 23 and res["top1"] == pytest.approx(100.0 * _brute_topk(logits, targets, 1) / 23)


# Correct top-1 predictions of the shared ViT-Tiny on the first 2 val images (sorted names) of each of the
# 200 classes with the "shared" preprocessing, recorded from a run of this code.
SHARED_SUBSET_CORRECT = 265  # 66.25 %


@pytest.mark.shared
def test_shared_model_subset_accuracy_is_reproduced():
    from vitprune.models.checkpoints import load_model

    model = load_model(SHARED_MODEL / "model.safetensors")
    ds = ImageFolderDataset(
        SHARED_DATA / "val", build_eval_transform("shared"), SHARED_MODEL / "classes.txt", limit_per_class=2
    )
    res = evaluate(model, make_loader(ds, 50), progress=False)
    assert res["n"] == 400
    assert round(res["top1"] * res["n"] / 100) == SHARED_SUBSET_CORRECT
