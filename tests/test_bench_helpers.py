"""Library-like logic of the benchmarks: TP baseline conversion/pruning/bisection, the shared recovery harness."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _recovery as R
import _structural_common as S
import tp_baseline as T
from conftest import SHARED_MODEL

from vitprune.errors import VitPruneError
from vitprune.metrics.flops import count_macs
from vitprune.models import BlockConfig, ViT, ViTConfig
from vitprune.training import WeightMasks
from vitprune.training.losses import kd_kl


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _x(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def dense() -> ViT:
    torch.manual_seed(0)
    cfg = ViTConfig.uniform(embed_dim=32, depth=2, heads=4, mlp_ratio=2.0, num_classes=10, img_size=32, patch_size=8)
    return ViT(cfg).eval()


# ------------------------------------------------------------------------------- plain module <-> our ViT
@pytest.mark.parametrize("fused", [True, False])
def test_plain_module_equals_dense_vit(dense, fused):
    plain = T.timm_vit_from_vit(dense, fused=fused)
    with torch.no_grad():
        torch.testing.assert_close(plain(_x()), dense(_x()), atol=1e-5, rtol=1e-5)
    assert T.vit_from_timm_vit(plain, dense.config).config.blocks == dense.config.blocks


def test_plain_module_refuses_ragged_or_gated(dense, ragged_config):
    with pytest.raises(VitPruneError, match="dense uniform"):
        T.timm_vit_from_vit(ViT(ragged_config))
    dense.blocks[0].mlp.gate = torch.ones(64)
    with pytest.raises(VitPruneError, match="gates"):
        T.timm_vit_from_vit(dense)


def _slice_head_dims(plain: T.TimmViT, keep: list[int]) -> None:
    """Brute-force head-dim pruning: keep dims ``keep`` of every head in q, k, v and proj's input."""
    for blk in plain.blocks:
        a = blk.attn
        h, hd, d = a.num_heads, a.head_dim, a.qkv.in_features
        rows = [p * h * hd + i * hd + j for p in range(3) for i in range(h) for j in keep]
        cols = [i * hd + j for i in range(h) for j in keep]
        qkv, proj = torch.nn.Linear(d, len(rows)), torch.nn.Linear(len(cols), d)
        with torch.no_grad():
            qkv.weight.copy_(a.qkv.weight[rows])
            qkv.bias.copy_(a.qkv.bias[rows])
            proj.weight.copy_(a.proj.weight[:, cols])
            proj.bias.copy_(a.proj.bias)
        a.qkv, a.proj, a.head_dim = qkv, proj, len(keep)


@pytest.mark.parametrize("fused", [True, False])
def test_conversion_of_pruned_head_dims_keeps_the_scale_the_plain_module_uses(dense, fused):
    plain = T.timm_vit_from_vit(dense, fused=fused)
    _slice_head_dims(plain, [0, 2, 3, 6, 7])  # head_dim 8 -> 5
    model = T.vit_from_timm_vit(plain, dense.config)
    expected = 5**-0.5 if fused else 8**-0.5  # SDPA default on the fused path, the stored scale otherwise
    assert all(b == BlockConfig(4, 5, 5, 64, scale=expected) for b in model.config.blocks)
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), plain(_x()), atol=1e-5, rtol=1e-5)
    # the reference: explicit softmax(q k^T * scale) v on block 0
    a, blk = plain.blocks[0].attn, model.blocks[0].attn
    x = torch.randn(1, 5, 32)
    q, k, v = a.qkv(x).reshape(1, 5, 3, 4, 5).permute(2, 0, 3, 1, 4)
    ref = a.proj((torch.softmax(q @ k.transpose(-2, -1) * expected, -1) @ v).transpose(1, 2).reshape(1, 5, 20))
    with torch.no_grad():
        torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- Torch-Pruning
needs_tp = pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None, reason="torch-pruning not installed")


def _grads(plain: T.TimmViT) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    return T.taylor_gradients(plain, batches)


@needs_tp
def test_taylor_gradients_sum_over_batches(dense):
    plain = T.timm_vit_from_vit(dense)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(3, 3, 32, 32, generator=g), torch.randint(0, 10, (3,), generator=g)) for _ in range(2)]
    grads = T.taylor_gradients(plain, batches)
    w = plain.head.weight
    ref = sum(torch.autograd.grad(torch.nn.functional.cross_entropy(plain(x), y), w)[0] for x, y in batches)
    torch.testing.assert_close(grads["head.weight"], ref, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in plain.parameters())
    with pytest.raises(VitPruneError, match="no batches"):
        T.taylor_gradients(plain, [])


@needs_tp
@pytest.mark.parametrize(("importance", "scope"), [("l2", "uniform"), ("l2", "global"), ("taylor", "uniform")])
def test_tp_prune_converts_with_equal_logits(dense, importance, scope):
    plain = T.timm_vit_from_vit(dense)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    grads = _grads(plain) if importance == "taylor" else None
    pruned = T.tp_prune(plain, importance, scope, 0.25, "dims", grads)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in before.items())  # the dense module is untouched
    model = T.vit_from_timm_vit(pruned, dense.config)
    assert T.max_logit_difference(pruned, model, 32) < 1e-5
    c = model.config
    assert count_macs(model)["total"] < count_macs(dense)["total"]
    for blk, b in zip(pruned.blocks, c.blocks, strict=True):
        assert b.heads == 4 and b.qk_dim == b.v_dim == blk.attn.head_dim
        assert b.scale == pytest.approx(b.qk_dim**-0.5)  # SDPA default scale, as the TP example under timm
    if scope == "uniform":  # 25 % of every group: embedding 32 -> 24, head dim 8 -> 6, MLP 64 -> 48
        assert c.embed_dim == 24
        assert all((b.qk_dim, b.mlp_dim) == (6, 48) for b in c.blocks)
    # kept MLP neurons are rows of the dense fc1 restricted to the kept embedding channels (pure selection)
    w_dense, w = plain.blocks[0].mlp.fc1.weight, pruned.blocks[0].mlp.fc1.weight
    emb = [int((plain.cls_token[0, 0] == v).nonzero()[0]) for v in pruned.cls_token[0, 0]]
    rows = _matching_rows(w_dense[:, emb], w)
    assert len(set(rows)) == len(rows) == w.shape[0]
    torch.testing.assert_close(w, w_dense[:, emb][rows], atol=0, rtol=0)


def _matching_rows(full: torch.Tensor, sub: torch.Tensor) -> list[int]:
    return [int((full - r).abs().sum(1).argmin()) for r in sub]


@needs_tp
def test_tp_prune_on_the_non_fused_path_keeps_the_original_scale(dense):
    pruned = T.tp_prune(T.timm_vit_from_vit(dense, fused=False), "l2", "uniform", 0.25)
    model = T.vit_from_timm_vit(pruned, dense.config)
    assert all((b.qk_dim, b.scale) == (6, 8**-0.5) for b in model.config.blocks)
    assert T.max_logit_difference(pruned, model, 32) < 1e-5
    example = T.with_scale(model, "example", dense.config)
    assert all(b.scale == pytest.approx(6**-0.5) for b in example.config.blocks)
    assert T.with_scale(example, "original", dense.config).config == model.config
    with pytest.raises(VitPruneError, match="scale mode"):
        T.with_scale(model, "pruned", dense.config)


@needs_tp
def test_tp_prune_heads_mode_removes_whole_heads(dense):
    pruned = T.tp_prune(T.timm_vit_from_vit(dense), "l2", "uniform", 0.25, "heads")
    model = T.vit_from_timm_vit(pruned, dense.config)
    assert all((b.heads, b.qk_dim) == (3, 8) for b in model.config.blocks)
    assert T.max_logit_difference(pruned, model, 32) < 1e-5


@needs_tp
def test_tp_prune_rejects_bad_arguments(dense):
    plain = T.timm_vit_from_vit(dense)
    with pytest.raises(VitPruneError, match="gradients"):
        T.tp_prune(plain, "taylor", "uniform", 0.2)
    with pytest.raises(VitPruneError, match="scope"):
        T.tp_prune(plain, "l2", "layer", 0.2)
    with pytest.raises(VitPruneError, match="ratio"):
        T.tp_prune(plain, "l2", "uniform", 1.0)


def test_bisect_ratio_finds_the_closest_step():
    steps = np.linspace(1.0, 0.0, 201)  # a step function: fraction drops by 0.005 every 0.005 of ratio

    def frac(r: float) -> float:
        return float(steps[min(int(r / 0.005), 200)])

    ratio, f, trials = T.bisect_ratio(frac, 0.7, tol=0.0)
    assert f == pytest.approx(0.7) and frac(ratio) == f
    assert len(trials) <= 16
    ratio, f, _ = T.bisect_ratio(frac, 0.7012, tol=0.0)
    assert f == pytest.approx(0.7)  # closest reachable value
    assert T.bisect_ratio(frac, 1.0)[0] == 0.0
    with pytest.raises(VitPruneError, match="even pruning ratio"):
        T.bisect_ratio(lambda r: 0.9, 0.5)


@needs_tp
def test_prune_to_macs_lands_on_target(dense):
    model, plain, info = T.prune_to_macs(dense, T.timm_vit_from_vit(dense), 0.6, "l2", "uniform", tol=0.01)
    frac = count_macs(model)["total"] / count_macs(dense)["total"]
    assert frac == pytest.approx(info["macs_fraction"]) and abs(frac - 0.6) < 0.03
    assert T.max_logit_difference(plain, model, 32) < 1e-5


@needs_tp
@pytest.mark.shared
def test_real_model_round_trip_through_torch_pruning():
    dense = S.load_dense(SHARED_MODEL / "model.safetensors")
    plain = T.timm_vit_from_vit(dense)
    assert T.max_logit_difference(plain, dense, 224, n=1) < 1e-4
    pruned = T.tp_prune(plain, "l2", "uniform", 0.1)
    model = T.vit_from_timm_vit(pruned, dense.config)
    c = model.config  # TP keeps int(n * (1 - r)) of every group
    assert (c.embed_dim, c.blocks[0].qk_dim, c.blocks[0].mlp_dim) == (int(192 * 0.9), int(64 * 0.9), int(768 * 0.9))
    assert T.max_logit_difference(pruned, model, 224, n=1) < 1e-4


# ------------------------------------------------------------------------------------------- recovery
def test_budget_lr_closed_form():
    lr, lo, w = 1e-3, 1e-5, 0.1
    assert R.budget_lr(0.0, lr, lo, w) == 0.0
    assert R.budget_lr(0.05, lr, lo, w) == pytest.approx(lr / 2)
    assert R.budget_lr(w, lr, lo, w) == pytest.approx(lr)
    assert R.budget_lr(w + (1 - w) / 2, lr, lo, w) == pytest.approx((lr + lo) / 2)
    assert R.budget_lr(1.0, lr, lo, w) == pytest.approx(lo)
    assert R.budget_lr(3.0, lr, lo, w) == pytest.approx(lo)
    p = np.linspace(w, 1, 50)
    vals = [R.budget_lr(float(x), lr, lo, w) for x in p]
    assert all(a >= b for a, b in itertools.pairwise(vals))
    assert R.budget_lr(0.5, lr, lo, 0.0) == pytest.approx(lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * 0.5)))


def _loader(n: int = 64, bs: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True)


def _kl(student: ViT, teacher: ViT) -> float:
    x = _x(16, seed=5)
    with torch.no_grad():
        return float(kd_kl(student(x), teacher(x)))


def test_recover_stops_on_images_and_distils(dense):
    torch.manual_seed(1)
    student = ViT(dense.config).eval()
    kl0 = _kl(student, dense)
    res = R.recover(student, dense, _loader(), budget_images=100, lr=3e-3, warmup_frac=0.1, grad_clip=0.0)
    assert (res["images_seen"], res["steps"], res["stopped_by"]) == (96, 12, "images")  # 100 // 8 full batches
    assert res["minutes"] > 0 and res["hyper"]["lr"] == 3e-3
    assert _kl(student, dense) < 0.7 * kl0


def test_recover_stops_on_minutes_and_anneals(dense):
    student = ViT(dense.config)
    sched = []
    orig = R.BudgetSchedule.post_step

    def spy(self, trainer, step):
        orig(self, trainer, step)
        sched.append(trainer.optimizer.param_groups[0]["lr"])

    R.BudgetSchedule.post_step = spy
    try:
        res = R.recover(student, dense, _loader(), budget_images=10_000, budget_minutes=0.3 / 60, lr=1e-3, min_lr=0.0)
    finally:
        R.BudgetSchedule.post_step = orig
    assert res["stopped_by"] == "minutes" and res["steps"] < 10_000 // 8
    assert res["images_seen"] == 8 * res["steps"] and res["minutes"] >= 0.3 / 60
    assert sched[-1] == pytest.approx(0.0, abs=1e-9)  # progress reached 1: fully annealed


def test_recover_holds_masks_and_validates(dense):
    student = ViT(dense.config)
    w = student.blocks[0].mlp.fc1.weight
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    R.recover(student, dense, _loader(), budget_images=24, masks=WeightMasks({"blocks.0.mlp.fc1.weight": mask}))
    assert torch.all(student.blocks[0].mlp.fc1.weight[~mask] == 0)
    with pytest.raises(VitPruneError, match="budget_images"):
        R.recover(student, dense, _loader(), budget_images=0)
    with pytest.raises(VitPruneError, match="budget_minutes"):
        R.recover(student, dense, _loader(), budget_images=8, budget_minutes=0)


def _image_folder(root: Path, classes: tuple[str, ...], per_class: int = 3) -> None:
    """``root/<class>/<i>.png`` random 20 x 20 images and ``root/classes.txt`` in ``classes`` order."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir()
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))


def test_build_train_loader_augments_a_folder(tmp_path):
    _image_folder(tmp_path, ("b", "a"))
    loader = R.build_train_loader(tmp_path, tmp_path / "classes.txt", batch_size=4, img_size=16)
    batches = list(loader)
    assert len(batches) == 1 and batches[0][0].shape == (4, 3, 16, 16)  # drop_last: 6 images -> one batch
    assert batches[0][0].min() >= -1 and batches[0][0].max() <= 1  # (x - 0.5) / 0.5
    assert loader.dataset.augment["random_resized_crop"]["scale"] == list(R.DEFAULTS["crop_scale"])
    assert sorted(set(loader.dataset.targets)) == [0, 1] and loader.dataset.classes == ["b", "a"]
    with pytest.raises(VitPruneError, match="fewer than one batch"):
        R.build_train_loader(tmp_path, tmp_path / "classes.txt", batch_size=64, img_size=16)


@needs_tp
# ---------------------------------------------------------------------------------- structural helpers
def test_describe_and_speed_side_by_side(dense):
    small = T.vit_from_timm_vit(T.tp_prune(T.timm_vit_from_vit(dense), "l2", "uniform", 0.5), dense.config)
    d = S.describe(small, count_macs(dense)["total"])
    assert d["embed_dim"] == 16 and d["blocks"][0] == [4, 4, 4, 32] and 0 < d["macs_fraction"] < 0.5
    res = S.speed_side_by_side({"dense": dense, "small": small}, batch_sizes=(4, 1), runs={4: 2, 1: 2}, warmup=1)
    assert set(res) == {4, 1}
    assert res[4]["models"]["dense"]["speedup"] == 1.0 and res[1]["batch_size"] == 1
    assert "times_ms" not in res[4]["models"]["small"] and res[4]["models"]["small"]["speedup"] > 0


def test_split_train_keeps_the_first_files_of_each_class():
    samples = [("a0", 0), ("b0", 1), ("a1", 0), ("a2", 0), ("b1", 1)]
    assert R.split_train(samples, 2) == ([0, 1, 2, 4], [3])
    assert R.split_train(samples, 0) == ([], [0, 1, 2, 3, 4])


def test_build_train_loader_never_trains_on_the_tuning_split(tmp_path):
    _image_folder(tmp_path, ("a", "b"))
    loader = R.build_train_loader(tmp_path, tmp_path / "classes.txt", batch_size=2, img_size=16, tune_per_class=1)
    ds = loader.dataset
    assert len(ds) == 4 and ds.augment["excluded_tuning_split"] == 2
    used = {Path(ds.dataset.samples[i][0]).name for i in ds.indices}
    assert used == {"1.png", "2.png"}  # 0.png of every class is the tuning split


@needs_tp
def test_tp_prune_rescores_between_iterative_steps(dense):
    plain = T.timm_vit_from_vit(dense)
    seen = []

    def fresh(model, k):  # the partly pruned model is scored again before each step
        seen.append((k, model.blocks[0].mlp.fc1.out_features, model.cls_token.shape[-1]))
        return _grads(model)

    pruned = T.tp_prune(plain, "taylor", "global", 0.4, "dims", None, steps=2, grads_fn=fresh)
    assert [k for k, _, _ in seen] == [0, 1]
    assert seen[0][1:] == (64, 32) and (seen[1][1] < 64 or seen[1][2] < 32)  # step 2 saw step 1's pruning
    model = T.vit_from_timm_vit(pruned, dense.config)
    assert T.max_logit_difference(pruned, model, 32) < 1e-5
    assert count_macs(model)["total"] < count_macs(dense)["total"]


def test_matched_latency_targets_read_off_the_rows():
    """The three #13 targets: gap outside both intervals, VTP within 2 at 0.7x, ORT speed-up vs MACs."""
    import matched_latency as ML

    def row(method, level, top1, ci, ort=None, label="vitprune"):
        return {"method": method, "level": level, "top1_recovered": top1, "ci95": ci, "label": label,
                "ort_speedup_over_macs": ort}  # fmt: skip

    rows = [row("nvit", 0.7, 60.0, 1.3, 0.95), row("tp-l2-global", 0.7, 55.0, 1.4, 0.80, "Torch-Pruning"),
            row("tp-taylor-global", 0.7, 56.0, 1.4, 1.0, "Torch-Pruning"), row("vtp", 0.7, 57.5, 1.4),
            row("nvit", 0.5, 50.0, 1.4), row("tp-taylor-global", 0.5, 48.0, 1.4, label="Torch-Pruning")]  # fmt: skip
    lines = ML.targets(rows, [0.7, 0.5])
    assert "gap +4.00" in lines[0] and lines[0].endswith("met")  # 4 > 3 and > 1.3 + 1.4
    assert "gap +2.00" in lines[1] and lines[1].endswith("MISSED")
    assert "-2.50" in lines[2] and lines[2].endswith("MISSED")
    assert "2 of 3 models" in lines[3] and "tp-l2-global@0.7 0.80" in lines[3]
    assert "not measured yet" in ML.targets([], [0.5])[0]
    # the best baseline is the tuning split's choice; the val-best is named beside it when it differs
    rows[1]["top1_recovered_tune"], rows[2]["top1_recovered_tune"] = 70.0, 69.0
    line = ML.targets(rows, [0.7])[0]
    assert "(tp-l2-global, of 2 chosen on the tuning split) 55.00" in line and "gap +5.00" in line
    assert "best on val: tp-taylor-global 56.00, gap +4.00" in line
    # the paper's NViT gets its own line beside the default's, against the same baseline
    lines = ML.targets([*rows, row("nvit-paper", 0.7, 57.0, 1.3)], [0.7])
    assert lines[0].startswith("- 0.7x: NViT 60.00") and lines[1].startswith("- 0.7x: paper NViT")
    assert "(tp-l2-global, of 2 chosen on the tuning split) 55.00" in lines[1] and lines[1].count("gap +2.00")


def test_latency_probe_times_a_saved_model_in_a_fresh_process(tmp_path):
    """The matched-latency probe: a new process loads the dense and the saved model, returns their ratio."""
    import latency_probe as LP

    from vitprune.models import save

    torch.manual_seed(0)
    cfg = ViTConfig.uniform(32, 2, 2, num_classes=3, img_size=16, patch_size=8)
    small = ViTConfig(embed_dim=32, blocks=[BlockConfig(1, 8, 8, 16)] * 2, num_classes=3, img_size=16, patch_size=8)
    save(ViT(cfg), tmp_path / "dense")
    save(ViT(small), tmp_path / "small")
    res = LP.probe(tmp_path / "small", tmp_path / "dense", "torch", threads=1, runs=2, batch=2)
    assert res["ratio"] > 0 and res["dense_ms"] > 0 and res["runs"] == 2
    with pytest.raises(VitPruneError, match=r"latency probe of .*missing failed"):
        LP.probe(tmp_path / "missing", tmp_path / "dense", "torch", threads=1, runs=1, batch=2)


def test_matched_latency_repeats_fresh_probes_and_keeps_the_median(monkeypatch):
    """One fresh probe is noisier than the 3 % tolerance: the match reads the median of ``--probe-repeats``."""
    import argparse

    import matched_latency as ML

    seen = iter([{"ratio": 0.74, "model_ms": 300.0, "dense_ms": 405.0},
                 {"ratio": 0.69, "model_ms": 280.0, "dense_ms": 406.0},
                 {"ratio": 0.70, "model_ms": 290.0, "dense_ms": 414.0}])  # fmt: skip
    calls = []
    monkeypatch.setattr(ML, "probe", lambda *a: calls.append(a) or next(seen))
    monkeypatch.setattr(ML, "shared_model", lambda: "dense")
    args = argparse.Namespace(threads=2, latency_runs=5, probe_repeats=3)
    res = ML.repeated_probe("m", "torch", args)
    assert len(calls) == 3 and all(c == ("m", "dense", "torch", 2, 5) for c in calls)
    assert res["ratio"] == 0.70 and res["ratios"] == [0.74, 0.69, 0.70]
    assert res["model_ms"] == 290.0 and res["dense_ms"] == 406.0


@pytest.mark.parametrize("flag", ["--probe-repeats", "--latency-runs"])
def test_matched_latency_refuses_fewer_than_one_probe(flag, capsys):
    import matched_latency as ML

    with pytest.raises(SystemExit) as exc:
        ML.parse_args([flag, "0"])
    assert exc.value.code == 2 and f"{flag} must be >= 1 (got 0)" in capsys.readouterr().err


def test_matched_latency_curve_and_seeds_tabulate_the_recovered_budgets():
    """Items 4-5: one line per curve row with every budget (0 = one-shot), and each row's seeds with their spread."""
    import matched_latency as ML

    nv = {
        "method": "nvit",
        "level": 0.5,
        "top1_oneshot": 20.0,
        "recovery_images": 15360,
        "ci95": 1.4,
        "curve": {"5120": 35.0, "15360": 44.0, "46080": 50.5, "15360_seed1": 43.0},
    }
    tp = {
        "method": "tp-taylor-global",
        "level": 0.5,
        "top1_oneshot": 2.0,
        "recovery_images": 15360,
        "ci95": 1.2,
        "curve": {"15360": 25.0},
    }
    lines = ML.curve_and_seeds([nv, tp])
    assert lines[0] == "| row | 0 (one-shot) | 5120 | 15360 | 46080 |"
    assert lines[2] == "| nvit@0.5 | 20.00 | 35.00 | 44.00 | 50.50 |"
    assert not any(line.startswith("| tp-taylor-global") for line in lines)  # one budget is not a curve
    assert lines[-1] == ("- nvit@0.5, 15360 images: seed 0 44.00, seed 1 43.00 (spread 1.00; one run's 95 % "
                         "interval 1.40)")  # fmt: skip
    assert ML.curve_and_seeds([tp]) == []
