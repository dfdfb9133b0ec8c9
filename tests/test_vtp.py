"""VTP: learnable dimension gates, L1 sparsity, one global threshold, exact fold + surgery, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import vitprune
from vitprune import VitPruneError
from vitprune.metrics.cost import CostModel
from vitprune.metrics.flops import count_macs, count_params
from vitprune.models import ViT, ViTConfig, num_params
from vitprune.pruners.selection import GlobalThreshold as _GT
from vitprune.pruners.vtp import (
    VTPPruner,
    attach_vtp_gates,
    emb_gate,
    fold_emb_gate,
    l1_penalty,
    vtp_gates,
    zero_removed_gates,
)
from vitprune.structures import StructuralMasks, architecture_after, prune_model

ALL = ("qk", "v", "mlp", "heads", "emb")


def GlobalThreshold(config, scores, metric, round_to=None):
    return _GT(config, scores, CostModel(config, metric), round_to)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is faster than two, above all on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomise(gates, seed=0, low=-0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gates.values():
            p.copy_(torch.rand(p.shape, generator=g) * (1.5 - low) + low)


def test_gates_attached_trainable_and_identity_at_init(tiny_model):
    x = torch.randn(2, 3, 32, 32)
    before = tiny_model(x)
    gates = attach_vtp_gates(tiny_model, ALL)
    cfg = tiny_model.config
    assert set(gates) == {f"blocks.{b}.{k}" for b in range(cfg.depth) for k in ("qk", "v", "mlp", "heads")} | {"emb"}
    assert tiny_model.blocks[1].attn.qk_gate is gates["blocks.1.qk"]
    assert tiny_model.blocks[1].attn.qk_gate.shape == (cfg.blocks[1].qk_dim,)
    assert tiny_model.blocks[2].mlp.gate.shape == (cfg.blocks[2].mlp_dim,)
    assert emb_gate(tiny_model) is gates["emb"] and gates["emb"].shape == (cfg.embed_dim,)
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in gates.values())
    assert all(bool((p == 1).all()) for p in gates.values())
    torch.testing.assert_close(tiny_model(x), before, atol=1e-6, rtol=0)  # init 1 = the dense model
    # every gate is a trainable parameter of the model and receives a gradient
    names = {id(p) for p in tiny_model.parameters()}
    assert all(id(p) in names for p in gates.values())
    tiny_model(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.values())
    assert vtp_gates(tiny_model).keys() == gates.keys()


def test_attach_refuses_unknown_kind_and_existing_gates(tiny_model):
    with pytest.raises(VitPruneError, match="unknown VTP gate"):
        attach_vtp_gates(tiny_model, ("qk", "rows"))
    attach_vtp_gates(tiny_model, ("qk",))
    with pytest.raises(VitPruneError, match="already carries gates"):
        attach_vtp_gates(tiny_model, ("v",))


def test_l1_penalty_is_sum_of_abs(tiny_model):
    gates = attach_vtp_gates(tiny_model, ALL)
    _randomise(gates)
    ref = sum(float(v.detach().abs().sum()) for v in gates.values())
    assert float(l1_penalty(gates).detach()) == pytest.approx(ref, rel=1e-6)
    l1_penalty(gates).backward()
    for p in gates.values():  # d/da sum|a| = sign(a)
        assert torch.equal(p.grad, torch.sign(p.detach()))


def _brute_force_k(config, scores, metric, target):
    """Remove units one by one in ascending |a| order (emb: never the largest) until the cost meets the target."""
    units = []
    for key, s in scores.items():
        s = s.detach().abs()
        for i in range(s.numel()):
            if key == "emb" and i == int(torch.argmax(s)):
                continue
            units.append((float(s[i]), key, i))
    units.sort(key=lambda u: u[0])
    cost = count_macs if metric == "macs" else count_params

    def total(c):
        return cost(c)["total"] if metric == "macs" else cost(c)

    dense = total(config)
    masks = StructuralMasks.all_kept(config)
    for k in range(len(units) + 1):
        if total(architecture_after(config, masks)) <= target * dense:
            return k, masks
        _, key, i = units[k]
        masks.get(key)[i] = False
    raise AssertionError("unreachable")


@pytest.mark.parametrize(("metric", "target", "kinds"), [("macs", 0.6, ALL), ("params", 0.45, ("qk", "v", "mlp"))])
def test_global_threshold_meets_target_like_brute_force(tiny_model, metric, target, kinds):
    gates = attach_vtp_gates(tiny_model, kinds)
    _randomise(gates, seed=3)
    cfg = tiny_model.config
    k, masks, info = GlobalThreshold(cfg, gates, metric).select(target)
    k_ref, masks_ref = _brute_force_k(cfg, gates, metric, target)
    assert k == k_ref and masks == masks_ref
    gt = GlobalThreshold(cfg, gates, metric)
    assert gt.cost(k) <= target * gt.dense_cost < gt.cost(k - 1)  # fewest removals that meet the target
    assert info["achieved_fraction"] <= target
    # one global threshold: every removed |a| <= every kept candidate |a|
    removed, kept = [], []
    for key, keep in masks.items():
        if key in gates:
            a = gates[key].detach().abs()
            removed += a[~keep].tolist()
            kept += a[keep].tolist() if key != "emb" else sorted(a[keep].tolist())[:-1]
    assert max(removed) <= min(kept)
    assert info["threshold"] == pytest.approx(max(removed))
    pruned_cfg = architecture_after(cfg, masks)
    measured = count_macs(pruned_cfg)["total"] if metric == "macs" else count_params(pruned_cfg)
    assert measured == info["pruned_cost"]


def test_global_threshold_spreads_exact_ties_evenly(tiny_model):
    gates = attach_vtp_gates(tiny_model, ("qk", "v", "mlp"))  # untrained: every gate is exactly 1
    gt = GlobalThreshold(tiny_model.config, gates, "params")
    _, masks, _ = gt.select(0.6)
    kept = [float(masks.get(key).float().mean()) for key in gates]
    assert max(kept) - min(kept) <= 0.15  # every block loses about the same share, not block after block


def test_global_threshold_rounding_keeps_multiples(tiny_model):
    gates = attach_vtp_gates(tiny_model, ("qk", "v", "mlp"))
    _randomise(gates, seed=5)
    gt = GlobalThreshold(tiny_model.config, gates, "macs", round_to=4)
    _, masks, info = gt.select(0.5)
    assert info["achieved_fraction"] <= 0.5
    for key, keep in masks.items():
        if key != "emb" and not key.endswith("heads"):
            assert int(keep.sum()) % 4 == 0
    costs = [gt.cost(i) for i in range(0, gt.num_candidates + 1, 7)]
    assert costs == sorted(costs, reverse=True)  # monotone, so the binary search is valid


def test_unreachable_target_and_bad_fraction(tiny_model):
    gates = attach_vtp_gates(tiny_model, ("mlp",))
    gt = GlobalThreshold(tiny_model.config, gates, "macs")
    assert 0 < gt.min_fraction < 1
    with pytest.raises(VitPruneError, match="unreachable"):
        gt.select(gt.min_fraction * 0.9)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(VitPruneError, match=r"\(0, 1\]"):
            gt.select(bad)
    assert gt.select(1.0)[0] == 0


@pytest.mark.parametrize("kinds", [("qk", "v", "mlp"), ALL])
@pytest.mark.parametrize("config_name", ["tiny_config", "ragged_config"])
def test_fold_and_prune_equals_gated_model_with_zeros(request, kinds, config_name):
    cfg = request.getfixturevalue(config_name)
    torch.manual_seed(0)
    model = ViT(cfg).eval()
    for p in model.parameters():  # non-trivial LayerNorm affine, biases
        p.data.add_(0.05 * torch.randn_like(p))
    gates = attach_vtp_gates(model, kinds)
    _randomise(gates, seed=1)
    _, masks, _ = GlobalThreshold(cfg, gates, "macs").select(0.55)
    zero_removed_gates(model, masks)
    x = torch.randn(3, 3, 32, 32)
    gated = model(x)
    # the removed gates really are 0 on the gated model
    for key, keep in masks.items():
        if key in gates:
            assert bool((gates[key].detach()[~keep] == 0).all())
    ref = copy.deepcopy(model)
    fold_emb_gate(model)
    assert emb_gate(model) is None
    torch.testing.assert_close(model(x), gated, atol=1e-5, rtol=0)  # folding the emb gate is exact
    small = prune_model(model, masks).eval()
    assert small.config == architecture_after(cfg, masks)
    assert num_params(small) == count_params(small.config) < num_params(ViT(cfg))
    torch.testing.assert_close(small(x), gated, atol=1e-5, rtol=0)
    torch.testing.assert_close(small(x), ref(x), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- pipeline
@pytest.fixture
def micro_model() -> ViT:
    """A 2-block ViT on 16x16 inputs (4 patches): fast enough for whole pruning runs in a test."""
    torch.manual_seed(0)
    return ViT(
        ViTConfig.uniform(embed_dim=16, depth=2, heads=2, mlp_ratio=2.0, num_classes=5, img_size=16, patch_size=8)
    )


class _Images(torch.utils.data.Dataset):
    """Random images + labels; ``fail_after`` raises (an interruption) once that many items were read."""

    def __init__(self, n=32, classes=5, fail_after=None):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.fail_after, self.reads = fail_after, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        return self.x[i], self.y[i]


def _loader(ds, bs=8):
    return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(0))


SMALL = {"sparsity_steps": 6, "finetune_steps": 3, "lr": 1e-3, "progress": False, "log_every": 2}


def test_l1_drives_gates_down(micro_model):
    runs = {}
    for lam in (0.0, 5e-3):
        pruner = VTPPruner(target_macs=0.7, lam=lam, gate_lr=2e-2, **SMALL)
        report = pruner.prune(micro_model, _loader(_Images())).report
        runs[lam] = report["gate_log"]
    n = runs[0.0][0]["count"]
    # with lambda > 0 the L1 norm of the gates falls well below its initial value n (all gates start at 1) ...
    assert runs[5e-3][-1]["l1"] < 0.95 * n
    assert [r["l1"] for r in runs[5e-3]] == sorted((r["l1"] for r in runs[5e-3]), reverse=True)
    # ... and far below the run without the L1 term (distillation alone keeps the gates near 1)
    assert runs[5e-3][-1]["l1"] < runs[0.0][-1]["l1"] - 0.03 * n
    assert abs(runs[0.0][-1]["l1"] - n) < 0.05 * n


def test_paper_mode_trains_gates_with_the_trainer_optimizer_only(micro_model):
    pruner = VTPPruner(target_params=0.8, lam=1e-2, gate_lr=None, **SMALL)
    res = pruner.prune(micro_model, _loader(_Images()))
    small, report = res.model, res.report
    log = report["gate_log"]
    assert log[-1]["l1"] < log[0]["count"]  # AdamW at lr 1e-3 moves each gate by <= ~1e-3 per step
    assert log[0]["count"] - log[-1]["l1"] <= log[0]["count"] * 1.5e-3 * SMALL["sparsity_steps"]
    assert report["pruned"]["fraction"]["params"] <= 0.8
    assert count_params(small.config) == num_params(small)


def test_prune_end_to_end_report_and_input_untouched(micro_model, tmp_path):
    before = copy.deepcopy(micro_model.state_dict())
    ds = _Images()
    evals = []

    def eval_fn(m):
        evals.append(type(m).__name__)
        return {"top1": 0.0, "n": 1}

    res = vitprune.prune(
        micro_model, "vtp", _loader(ds), out=tmp_path / "run", eval_fn=eval_fn,
        target_macs=0.5, lam=1e-3, kinds=ALL, round_to=2, **SMALL,
    )  # fmt: skip
    small, report = res.model, res.report
    assert report["pruned"]["fraction"]["macs"] <= 0.5
    assert report["selection"]["achieved_fraction"] == pytest.approx(report["pruned"]["fraction"]["macs"])
    assert report["fold_check"]["max_abs_logit_diff"] < 1e-5  # pruned == gated-with-zeros on real batches
    assert len(evals) == 4 and {"dense", "pruned", "masked_eval"} <= set(report) and "eval" in report["pruned"]
    assert report["sparsity"]["steps"] == 6 and report["finetune"]["steps"] == 3
    for b in small.config.blocks:
        assert b.scale == pytest.approx(8**-0.5)  # original softmax temperature kept
        assert all(w % 2 == 0 for w in (b.qk_dim, b.v_dim, b.mlp_dim))
    # the input model is unchanged (weights, trainability) and the outputs are on disk
    assert all(torch.equal(before[k], v) for k, v in micro_model.state_dict().items())
    assert all(p.requires_grad for p in micro_model.parameters())
    from vitprune.models import load

    again = load(tmp_path / "run" / "model").eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(again(x), small(x), atol=0, rtol=0)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["pruned"]["macs"] == count_macs(small.config)["total"]
    assert (tmp_path / "run" / "state.pt").is_file() and (tmp_path / "run" / "masks.json").is_file()
    assert (tmp_path / "run" / "dims.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_after_interruption_matches_uninterrupted_run(micro_model, tmp_path):
    settings = dict(target_macs=0.6, lam=5e-3, ckpt_every=2, **SMALL)
    full = vitprune.prune(micro_model, "vtp", _loader(_Images()), out=tmp_path / "a", **settings).model
    # interrupted during sparsity training (after the step-4 checkpoint), then resumed
    with pytest.raises(KeyboardInterrupt):
        vitprune.prune(micro_model, "vtp", _loader(_Images(fail_after=8 * 5 + 4)), out=tmp_path / "b", **settings)
    assert (tmp_path / "b" / "sparsity" / "checkpoint.pt").is_file()
    assert not (tmp_path / "b" / "model").exists()
    res = vitprune.prune(micro_model, "vtp", _loader(_Images()), out=tmp_path / "b", resume=True, **settings)
    resumed, report = res.model, res.report
    assert resumed.config == full.config
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=0, rtol=0)
    assert report["sparsity"]["steps"] == 6
    # a finished run resumes to the same model without training
    again = vitprune.prune(micro_model, "vtp", _loader(_Images()), out=tmp_path / "b", resume=True, **settings).model
    assert all(torch.equal(again.state_dict()[k], v) for k, v in full.state_dict().items())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_macs": 0.5, "lam": -1e-4}, "--lambda must be in"),
        ({"target_macs": 0.0}, r"\(0, 1\]"),
        ({"target_params": 1.5}, r"\(0, 1\]"),
        ({"target_macs": 0.5, "target_params": 0.5}, "exactly one target"),
        ({}, "exactly one target"),
        ({"target_macs": 0.5, "kinds": ("qk", "rows")}, "'rows' is not one of"),
        ({"target_macs": 0.5, "sparsity_steps": -1}, "--sparsity-steps"),
        ({"target_macs": 0.5, "lr": 0.0}, "--lr"),
        ({"target_macs": 0.5, "round_to": -8}, "--round-to"),
        ({"target_macs": 0.5, "gate_lr": -1.0}, "--gate-lr"),
        ({"target_macs": 0.5, "bogus": 1}, "unknown vtp setting"),
    ],
)
def test_bad_settings_raise_one_line_errors(kwargs, match):
    with pytest.raises(VitPruneError, match=match) as info:
        VTPPruner(**kwargs)
    assert "\n" not in str(info.value)


def test_unreachable_target_fails_before_training_or_writing(micro_model, tmp_path):
    # with MLP gates only, attention + patch embedding + head stay: 10 % of the MACs is out of reach
    ds = _Images()
    with pytest.raises(VitPruneError, match="unreachable") as info:
        vitprune.prune(micro_model, "vtp", _loader(ds), out=tmp_path / "run", target_macs=0.1, kinds=("mlp",), **SMALL)
    assert "\n" not in str(info.value)
    assert ds.reads == 0 and not (tmp_path / "run").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("x")
    with pytest.raises(VitPruneError, match="is not a vitprune run directory"):
        vitprune.prune(micro_model, "vtp", _loader(ds), out=tmp_path / "old", overwrite=True, target_macs=0.7, **SMALL)
    with pytest.raises(VitPruneError, match=r"cannot resume .* it does not exist"):
        vitprune.prune(micro_model, "vtp", _loader(ds), out=tmp_path / "none", resume=True, target_macs=0.7, **SMALL)
    assert ds.reads == 0 and (tmp_path / "old" / "keep.txt").read_text() == "x"


# --------------------------------------------------------------------------------------------- CLI
def _image_folder(root, classes=3, per_class=4):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / f"c{c}" / f"{i}.png")
    return root


def test_cli_smoke_and_errors(micro_model, tmp_path, capsys):
    from vitprune.cli.main import main
    from vitprune.models import load, save

    save(micro_model, tmp_path / "dense")
    data = _image_folder(tmp_path / "data")
    base = ["prune", "vtp", str(tmp_path / "dense"), "--data", str(data), "--device", "cpu", "--no-progress"]
    run = ["--sparsity-steps", "3", "--finetune-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--log-every", "1"]
    rc = main(
        [*base, "--target-macs", "0.6", "--lambda", "1e-3", *run, "--val", str(data), "--out", str(tmp_path / "o")]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "VTP: kept" in out and "top-1" in out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["pruned"]["fraction"]["macs"] <= 0.6 and "command" in report["run"]
    assert report["pruned"]["eval"]["n"] == 12
    cfg = load(tmp_path / "o" / "model").config
    assert [[b.heads, b.qk_dim, b.v_dim, b.mlp_dim] for b in cfg.blocks] == [
        [b["heads"], b["qk_dim"], b["v_dim"], b["mlp_dim"]] for b in report["pruned"]["blocks"]
    ]
    # bad input: one line on stderr, exit 2, nothing written
    for extra, msg in (
        (["--target-macs", "0.5", "--lambda", "-1"], "--lambda"),
        (["--target-params", "1.2"], "(0, 1]"),
        (["--target-macs", "0.01", "--gates", "mlp"], "unreachable"),
    ):
        rc = main([*base, *extra, *run, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error:") and msg in err and "\n" not in err
        assert not (tmp_path / "bad").exists()
