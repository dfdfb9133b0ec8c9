import json

import numpy as np
import pytest
import torch
from PIL import Image

import vitprune
from vitprune import VitPruneError
from vitprune.cli.main import main
from vitprune.latency.lut import LatencyTable
from vitprune.metrics.cost import CostModel
from vitprune.metrics.flops import count_macs, count_params
from vitprune.models import ViT, ViTConfig, load, save
from vitprune.pruners.nvit import NViTConfig, NViTPruner
from vitprune.pruners.selection import greedy_select as select_removals
from vitprune.structures import StructuralMasks, apply_masks, prune_model
from vitprune.structures.groups import unit_key


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _config():
    return ViTConfig.uniform(embed_dim=64, depth=3, heads=4, mlp_ratio=2.0, num_classes=5, img_size=16, patch_size=8)


def _model(seed=0):
    torch.manual_seed(seed)
    return ViT(_config()).eval()


def _data(n=2, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 16, 16, generator=g), torch.randint(0, 5, (bs,), generator=g)) for _ in range(n)]


def _flat_scores(config, value=1.0):
    scores = {"emb": torch.full((config.embed_dim,), value, dtype=torch.float64)}
    for b, blk in enumerate(config.blocks):
        for kind, n in (("heads", blk.heads), ("qk", blk.qk_dim), ("v", blk.v_dim), ("mlp", blk.mlp_dim)):
            scores[unit_key(kind, b)] = torch.full((n,), value, dtype=torch.float64)
        scores[unit_key("block", b)] = torch.tensor([1e6], dtype=torch.float64)
    return scores


def test_global_ranking_removes_lowest_chunks_across_kinds_and_blocks():
    config = _config()
    scores = _flat_scores(config)
    scores["blocks.1.mlp"][:32] = 1e-4  # cheapest: two MLP chunks of block 1
    scores["blocks.2.qk"][8:] = 1e-3  # then the last 8 QK dims of block 2 (one chunk)
    scores["emb"][:16] = 1e-2  # then one embedding chunk
    settings = NViTConfig(target_macs=0.5, round_to=None)
    cost = CostModel(config, "macs")
    masks = StructuralMasks.all_kept(config)
    dense = cost.total(config.embed_dim, config.blocks)
    removed, _ = select_removals(config, masks, scores, settings, cost, 0.9 * dense)
    order = [(r["kind"], r["block"], r["units"]) for r in removed[:4]]
    assert order == [("mlp", 1, 16), ("mlp", 1, 16), ("qk", 2, 8), ("emb", None, 16)]
    assert masks.blocks[1].mlp[:32].sum() == 0 and masks.blocks[1].mlp[32:].all()
    assert masks.blocks[2].qk.tolist() == [True] * 8 + [False] * 8
    assert masks.emb[:16].sum() == 0
    arch_cost = cost.total(int(masks.emb.sum()), [_cfg_after(config, masks, b) for b in range(3)])
    assert arch_cost <= 0.9 * dense


def _cfg_after(config, masks, b):
    from vitprune.structures import architecture_after

    return architecture_after(config, masks).blocks[b]


def test_whole_block_removed_when_cheapest():
    config = _config()
    scores = _flat_scores(config)
    scores["blocks.0.block"][:] = 1e-9
    masks = StructuralMasks.all_kept(config)
    cost = CostModel(config, "params")
    dense = cost.total(config.embed_dim, config.blocks)
    removed, _ = select_removals(config, masks, scores, NViTConfig(target_params=0.8), cost, 0.8 * dense)
    assert removed[0]["kind"] == "block" and removed[0]["block"] == 0 and not masks.blocks[0].keep


def _lut(config, mlp_cost=10.0):
    """A synthetic table where MLP neurons are very slow and attention nearly free."""
    grid = {"emb": [16, 64], "heads": [0, 4], "qk": [8, 16], "v": [8, 16], "mlp": [0, 128]}
    attn = np.full((2, 2, 2, 2), 0.01)
    mlp = np.array([[0.0, mlp_cost], [0.0, 4 * mlp_cost]])
    meta = {"device_type": "cpu", "device_name": "x", "dtype": "float32", "batch_size": 1, "threads": 1}
    meta |= {"tokens": config.num_prefix_tokens + config.num_patches}
    return LatencyTable(meta, grid, attn, mlp, np.array([0.1, 0.1]))


def test_latency_aware_ranking_prefers_slow_structures():
    config = _config()
    scores = _flat_scores(config)
    base_masks, lat_masks = StructuralMasks.all_kept(config), StructuralMasks.all_kept(config)
    cost = CostModel(config, "macs")
    target = 0.8 * cost.total(config.embed_dim, config.blocks)
    torch.manual_seed(0)
    for key in scores:
        scores[key] = scores[key] * (1 + torch.rand_like(scores[key]))
    settings = NViTConfig(target_macs=0.8, round_to=None, kinds=("heads", "qk", "v", "mlp"))
    select_removals(config, base_masks, scores, settings, cost, target)
    latency = CostModel(config, "latency", _lut(config))
    _, eta = select_removals(config, lat_masks, scores, settings, cost, target, latency=latency)
    assert eta > 0
    mlp_removed = [sum(int((~m.mlp).sum()) for m in ms.blocks) for ms in (base_masks, lat_masks)]
    assert mlp_removed[1] > mlp_removed[0]


def test_config_validation_and_unreachable_target_refused(tmp_path):
    with pytest.raises(VitPruneError, match="exactly one target"):
        NViTPruner(target_macs=0.5, target_params=0.5)
    with pytest.raises(VitPruneError, match="needs a latency lookup table"):
        NViTPruner(target_latency=0.5)
    with pytest.raises(VitPruneError, match=r"--target-macs must be in \(0, 1\], got 1.5"):
        NViTPruner(target_macs=1.5)
    with pytest.raises(VitPruneError, match="'block' is not one of emb, heads, qk, v, mlp"):
        NViTPruner(target_macs=0.5, chunks={"block": 2})
    with pytest.raises(VitPruneError, match="unknown nvit setting"):
        NViTPruner(target_macs=0.5, bogus=1)
    model = _model()
    out = tmp_path / "run"
    pruner = NViTPruner(target_macs=0.2, kinds=("mlp",), progress=False)
    macs = count_macs(model)
    floor = 1 - sum(b["mlp"] for b in macs["per_block"]) / macs["total"]
    assert pruner.min_fraction(model.config, pruner.cost_model(model.config)) == pytest.approx(floor)
    with pytest.raises(VitPruneError, match=rf"unreachable.*leaves {floor:.4f}"):
        vitprune.prune(model, "nvit", _data(), out=out, target_macs=0.2, kinds=("mlp",), progress=False)
    assert not out.exists()
    lut_pruner = NViTPruner(target_latency=0.5, lut=_lut(_config(), 1.0), progress=False)
    big = ViT(ViTConfig.uniform(96, 1, 4, num_classes=5, img_size=16, patch_size=8))
    with pytest.raises(VitPruneError, match="above the latency table's grid"):
        lut_pruner.check(big)


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_prune_reaches_target_and_pruned_model_matches_masks(metric):
    model = _model(1)
    dense_logits = model(_data()[0][0])
    pruner = NViTPruner(**{f"target_{metric}": 0.5}, prune_steps=3, batches_per_step=2, round_to=None, progress=False)
    res = pruner.prune(model, _data())
    small, report = res.model, res.report
    assert torch.equal(model(_data()[0][0]), dense_logits)  # the input model is left unchanged
    frac = report["pruned"]["fraction"][metric]
    assert 0.4 < frac <= 0.5
    assert [h["target_fraction"] for h in report["history"]] == pytest.approx([5 / 6, 4 / 6, 0.5], abs=1e-5)
    assert all(h["fraction"] <= h["target_fraction"] + 1e-9 for h in report["history"])
    exact = count_macs(small)["total"] / count_macs(model)["total"] if metric == "macs" else None
    if exact is not None:
        assert frac == pytest.approx(exact)
    else:
        assert frac == pytest.approx(count_params(small) / count_params(model))
    assert len(report["dense"]["blocks"]) == 3 and "blocks" in report["pruned"]


def test_round_to_8_gives_multiples_of_8_and_still_meets_target():
    model = _model(2)
    pruner = NViTPruner(
        target_macs=0.6, prune_steps=2, batches_per_step=1, chunks={"qk": 3, "mlp": 5, "emb": 6}, progress=False
    )
    res = pruner.prune(model, _data(1))
    small, report = res.model, res.report
    c = small.config
    assert c.embed_dim % 8 == 0
    assert all(b.qk_dim % 8 == 0 and b.v_dim % 8 == 0 and b.mlp_dim % 8 == 0 for b in c.blocks)
    assert report["pruned"]["fraction"]["macs"] <= 0.6 + 1e-9


def test_train_between_steps_and_distill_saliency():
    model = _model(3)
    pruner = NViTPruner(
        target_params=0.7,
        prune_steps=2,
        batches_per_step=1,
        train_steps_between=2,
        finetune_steps=2,
        saliency_mode="distill",
        progress=False,
    )
    report = pruner.prune(model, [x for x, _ in _data()]).report
    assert "train_loss" in report["history"][0] and "train_loss" not in report["history"][1]
    assert report["finetune"]["steps"] == 2
    assert report["pruned"]["fraction"]["params"] <= 0.7


def test_resume_continues_interrupted_run(tmp_path):
    data = _data(2)
    settings = {"target_macs": 0.5, "prune_steps": 3, "batches_per_step": 2, "progress": False, "round_to": None}
    ref = vitprune.prune(_model(4), "nvit", data, out=tmp_path / "a", **settings).model

    class Interrupt(Exception):
        pass

    class Loader:  # the same two batches per pass, crashing on the 5th batch (steps 1 and 2 done)
        seen = 0

        def __iter__(self):
            for batch in data:
                Loader.seen += 1
                if Loader.seen == 5:
                    raise Interrupt
                yield batch

    with pytest.raises(Interrupt):
        vitprune.prune(_model(4), "nvit", Loader(), out=tmp_path / "b", **settings)
    assert (tmp_path / "b" / "state.pt").is_file() and not (tmp_path / "b" / "model").exists()
    with pytest.raises(VitPruneError, match="output exists"):
        vitprune.prune(_model(4), "nvit", data, out=tmp_path / "b", **settings)
    small = vitprune.prune(_model(4), "nvit", data, out=tmp_path / "b", resume=True, **settings).model
    assert small.config == ref.config
    assert json.loads((tmp_path / "b" / "masks.json").read_text()) == json.loads(
        (tmp_path / "a" / "masks.json").read_text()
    )
    x = data[0][0]
    torch.testing.assert_close(small(x), ref(x))
    with pytest.raises(VitPruneError, match="settings differ"):
        vitprune.prune(_model(4), "nvit", data, out=tmp_path / "b", resume=True, **(settings | {"target_macs": 0.4}))


def test_default_ranks_per_cost_and_reconstructs_the_paper_settings_do_neither():
    """The library default is the configuration the tuning split chose (per MAC saved + reconstruction); the
    reconstruction re-solves the weights only: same selection as ``per_cost`` without it, logits nearer dense."""
    data, common = _data(2, bs=8), {"target_macs": 0.5, "prune_steps": 1, "batches_per_step": 1, "progress": False}
    default = NViTPruner(**common).prune(_model(5), data)
    paper = NViTPruner(**common, **NViTConfig.PAPER).prune(_model(5), data)
    unfit = NViTPruner(**common, reconstruct="off").prune(_model(5), data)
    assert default.report["settings"]["criterion"] == "per_cost" and "reconstruction" in default.report
    assert paper.report["settings"]["criterion"] == "saliency" and "reconstruction" not in paper.report
    assert default.masks == unfit.masks and default.model.config == unfit.model.config
    x, dense = torch.cat([b[0] for b in data]), _model(5).eval()
    with torch.no_grad():
        gap = {k: float((r.model.eval()(x) - dense(x)).pow(2).mean()) for k, r in (("fit", default), ("unfit", unfit))}
    assert gap["fit"] < gap["unfit"]


def test_pruner_output_equals_masked_model():
    model = _model(5)
    paper = NViTPruner.Config.PAPER  # surgery only: the default's reconstruction re-solves proj / fc2
    res = NViTPruner(target_macs=0.6, prune_steps=1, batches_per_step=1, progress=False, **paper).prune(model, _data(1))
    masked = apply_masks(_model(5), res.masks)  # the result's masks describe the (rounded) pruned model exactly
    x = _data(1, seed=9)[0][0]
    torch.testing.assert_close(res.model(x), masked(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prune_model(masked, res.masks)(x), res.model(x), atol=1e-5, rtol=1e-5)


def _image_folder(root, classes=5, per_class=4):
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_cli_end_to_end(tmp_path, capsys):
    model = _model(6)
    model.config.preprocess = {"preset": "shared", "img_size": 16}
    save(model, tmp_path / "m")
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    args = ["prune", "nvit", str(tmp_path / "m"), "--data", str(data), "--target-macs", "0.6", "--out", str(out)]
    args += ["--prune-steps", "2", "--batches-per-step", "1", "--batch-size", "4", "--finetune-steps", "1"]
    args += ["--device", "cpu", "--no-progress", "--val", str(data), "--eval-batch-size", "10"]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "NViT: kept" in printed and "top-1" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["pruned"]["fraction"]["macs"] <= 0.6
    assert report["run"]["machine"]["torch"] == torch.__version__
    assert (out / "dims.png").stat().st_size > 1000
    small = load(out / "model")
    assert small.config.embed_dim == report["pruned"]["embed_dim"]
    # refusals: existing output, latency target without a table, unreachable target (nothing written)
    assert main(args) == 2
    assert "output exists" in capsys.readouterr().err
    bad = [*args[:5], "--target-latency", "0.5", "--out", str(tmp_path / "x")]
    assert main(bad) == 2
    assert "latency lookup table" in capsys.readouterr().err
    bad = [*args[:5], "--target-macs", "0.01", "--out", str(tmp_path / "y"), "--kinds", "mlp,heads"]
    assert main(bad) == 2
    assert "unreachable" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_per_cost_criterion_weighs_saliency_by_cost_saved():
    config = _config()
    scores = _flat_scores(config, 1e3)
    scores["blocks.0.mlp"][:16] = 0.4 / 16  # lowest saliency, saves fc1+fc2 of 16 neurons
    scores["blocks.1.qk"][:8] = 0.5 / 8  # a bit more saliency, saves twice the MACs (q and k rows, scores)
    cost = CostModel(config, "macs")
    dense = cost.total(config.embed_dim, config.blocks)
    first = {}
    for criterion in ("saliency", "per_cost"):
        masks = StructuralMasks.all_kept(config)
        settings = NViTConfig(target_macs=0.99, criterion=criterion, round_to=None)
        removed, _ = select_removals(config, masks, scores, settings, cost, dense - 1)
        first[criterion] = (removed[0]["kind"], removed[0]["block"])
    assert first == {"saliency": ("mlp", 0), "per_cost": ("qk", 1)}


def test_cli_latency_target_with_lut(tmp_path, capsys):
    from vitprune.latency.lut import device_name

    model = _model(7)
    model.config.preprocess = {"preset": "shared", "img_size": 16}
    save(model, tmp_path / "m")
    data = _image_folder(tmp_path / "data", per_class=2)
    table = _lut(model.config, mlp_cost=1.0)  # synthetic (monotone) timings, this machine's CPU
    table.meta |= {"device_name": device_name(torch.device("cpu")), "batch_size": 2, "threads": 1}
    table.attn_ms[:, 1] = 0.5  # heads cost something
    table.save(tmp_path / "lut.json")
    args = ["prune", "nvit", str(tmp_path / "m"), "--data", str(data), "--target-latency", "0.7", "--device", "cpu"]
    args += ["--lut", str(tmp_path / "lut.json"), "--prune-steps", "2", "--batches-per-step", "1", "--batch-size", "2"]
    args += ["--no-progress", "--threads", "1"]
    assert main([*args, "--lut-batch", "4", "--out", str(tmp_path / "bad")]) == 2
    assert "batch size 4 (table: 2)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main([*args, "--lut-batch", "2", "--out", str(tmp_path / "ok")]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "ok" / "report.json").read_text())
    assert report["pruned"]["fraction"]["latency_pred"] <= 0.7 + 1e-9
    assert StructuralMasks.from_json((tmp_path / "ok" / "masks.json").read_text()).validate(model.config) is None
    assert report["eta"] is not None and report["lut"]["batch_size"] == 2
    assert "of LUT latency" in capsys.readouterr().out


def test_frozen_input_model_is_scored_and_left_frozen():
    """A model whose parameters do not require grad (e.g. after evaluation tooling froze it) still prunes."""
    model = _model(2).requires_grad_(False)
    report = NViTPruner(target_macs=0.7, prune_steps=2, batches_per_step=1, progress=False).prune(model, _data()).report
    assert report["pruned"]["fraction"]["macs"] <= 0.7
    assert not any(p.requires_grad for p in model.parameters())  # the caller's flags are restored
