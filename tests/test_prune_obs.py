"""OBS (the OBSSolver machinery and the OBSPruner in the one interface: one-shot, sweep, N:M, memory guard, gradual
with resume), calibration gradients and the CLI."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import vitprune.pruners.obs as obs_mod
from vitprune.cli.main import main
from vitprune.errors import VitPruneError
from vitprune.models import ViT, ViTConfig, load, save
from vitprune.pruners.baselines import prune_baseline
from vitprune.pruners.calibration import find_linears, iter_gradients
from vitprune.pruners.obs import OBSConfig, OBSSolver


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny tensors: one thread is fastest, and avoids spin-waiting on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(n=32, batch=8, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    cfg = ViTConfig.uniform(embed_dim=32, depth=2, heads=4, mlp_ratio=2.0, num_classes=10, img_size=32, patch_size=8)
    return ViT(cfg).eval()


def _cfg(**kw):
    base = dict(block_size=32, num_grads=32, damp=1e-4, chunk_blocks=16)
    base.update(kw)
    return OBSConfig(**base)


def test_per_sample_gradients_match_torch_func(small_model):
    from torch.func import functional_call, grad, vmap

    x, y = _data(n=5, batch=5)[0]
    names = ["blocks.1.mlp.fc2", "blocks.0.attn.qkv"]  # not in execution order
    params = {k: v.detach() for k, v in small_model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(small_model, p, (xi[None],)), yi[None])

    with pytest.warns(UserWarning):  # torch.func falls back to a per-sample loop for SDPA on CPU
        ref = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    got = next(iter_gradients(small_model, [(x, y)], names, 5, per_sample=True))
    batch = next(iter_gradients(small_model, [(x, y)], names, 1, per_sample=False))
    for n in names:
        torch.testing.assert_close(got[n], ref[f"{n}.weight"].reshape(5, -1), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(batch[n][0], got[n].mean(0), rtol=1e-4, atol=1e-6)
    assert sum(g[names[0]].shape[0] for g in iter_gradients(small_model, _data(), names, 20)) == 20


def test_oneshot_sweep_exact_sparsity_and_beats_magnitude(small_model):
    data = _data()
    pruner = OBSSolver(small_model, _cfg())
    results = pruner.prune(data, [0.5, 0.7])
    total = sum(m.weight.numel() for m in find_linears(small_model).values())
    gm = prune_baseline(small_model, "gm", [0.5])[0.5]
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        dense = small_model(x)
        err_obs = (results[0.5].model(x) - dense).pow(2).mean()
        err_gm = (gm.model(x) - dense).pow(2).mean()
    assert err_obs < 0.5 * err_gm
    for t, res in results.items():
        pruned = sum(int((~m).sum()) for m in res.masks.values())
        assert pruned == round(t * total)
        params = dict(res.model.named_parameters())
        for name, keep in res.masks.items():
            assert torch.all(params[name][~keep] == 0)
        rep = res.report
        assert rep["sparsity"] == pytest.approx(t, abs=1 / total) and rep["block_size"] == 32
        assert set(rep["timings_s"]) >= {"fisher_s", "traces_s", "update_s"} and rep["fisher_bytes"] > 0
    assert torch.equal(small_model.blocks[0].mlp.fc1.weight, small_model.blocks[0].mlp.fc1.weight)


def test_sweep_reuses_one_fisher_and_trace_pass(small_model, monkeypatch):
    calls = {"fisher": 0, "greedy": 0}
    real_estimate, real_greedy = OBSSolver.estimate_fisher, obs_mod.greedy_obs

    def count_estimate(self, loader):
        calls["fisher"] += 1
        return real_estimate(self, loader)

    def count_greedy(*a, **k):
        calls["greedy"] += 1
        return real_greedy(*a, **k)

    monkeypatch.setattr(OBSSolver, "estimate_fisher", count_estimate)
    monkeypatch.setattr(obs_mod, "greedy_obs", count_greedy)
    pruner = OBSSolver(small_model, _cfg())
    sweep = pruner.prune(_data(), [0.4, 0.5, 0.6, 0.8])
    after_sweep = dict(calls)
    single = pruner.models_for([0.6])[0.6]
    assert calls == after_sweep and calls["fisher"] == 1
    for name, p in single.model.named_parameters():
        assert torch.equal(p, dict(sweep[0.6].model.named_parameters())[name])
    # nested: every weight pruned at 0.4 stays pruned at 0.8 (prefixes of the same removal orders)
    for name in sweep[0.4].masks:
        assert not torch.any(~sweep[0.4].masks[name] & sweep[0.8].masks[name])


def test_per_layer_allocation(small_model):
    res = OBSSolver(small_model, _cfg(allocation="layer")).prune(_data(), [0.6])[0.6]
    for name, keep in res.masks.items():
        assert (~keep).sum() == pytest.approx(0.6 * keep.numel(), abs=len(keep.flatten()) // 32 + 1), name


def test_nm_2_4(small_model):
    res = OBSSolver(small_model, _cfg(nm=(2, 4))).prune(_data(), [])
    ((target, r),) = res.items()
    assert target == 0.5
    for keep in r.masks.values():
        assert torch.all(keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2)
    with pytest.raises(VitPruneError, match="multiple of 4"):
        OBSSolver(small_model, _cfg(nm=(2, 4), block_size=30)).estimate_fisher(_data())


def test_memory_guard_refuses_before_any_work(small_model):
    class Exploding:
        def __iter__(self):
            raise AssertionError("data was read")

    with pytest.raises(VitPruneError, match="GiB"):
        OBSSolver(small_model, _cfg(max_memory_gb=1e-4)).estimate_fisher(Exploding())
    pruner = OBSSolver(small_model, _cfg(max_memory_gb=1e-4, allow_smaller_blocks=True))
    pruner.estimate_fisher(_data())
    assert pruner.fisher.block_size < 32 and pruner.fisher.nbytes <= 1e-4 * 2**30


def test_existing_masks_stay_pruned(small_model):
    first = prune_baseline(small_model, "gm", [0.3])[0.3]
    res = OBSSolver(first.model, _cfg()).prune(_data(), [0.5], masks=first.masks)[0.5]
    for name, keep in first.masks.items():
        assert not torch.any(res.masks[name] & ~keep)


def test_bad_settings(small_model):
    with pytest.raises(VitPruneError, match="--grad-mode"):
        OBSSolver(small_model, _cfg(grad_mode="x"))
    with pytest.raises(VitPruneError, match="sparsity"):
        OBSSolver(small_model, _cfg()).prune(_data(), [1.2])
    with pytest.raises(VitPruneError, match="absolute dampening"):
        OBSSolver(small_model, _cfg(fisher_mode="woodbury"))
    with pytest.raises(VitPruneError, match="needs 100 gradients"):
        OBSSolver(small_model, _cfg(fisher_mode="woodbury", num_grads=100, damp_relative=False)).estimate_fisher(
            _data()
        )


def test_gradual_levels_best_checkpoints_and_resume(small_model, tmp_path, monkeypatch):
    from vitprune.training.engine import TrainConfig

    data = _data()
    x, y = data[0]

    def score(m):
        with torch.no_grad():
            return -F.cross_entropy(m(x), y).item()

    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-4, progress=False, tensorboard=False)
    out = tmp_path / "run"
    res = OBSSolver(small_model, _cfg()).gradual(data, data, [0.3, 0.5], cfg, out, eval_fn=score, eval_every=1)
    levels = res["report"]["levels"]
    assert [lv["target"] for lv in levels] == [0.3, 0.5]
    first = {k: v.bool() for k, v in load_file(str(out / "level_0_s0.30" / "best" / "masks.safetensors")).items()}
    for name, keep in res["masks"].items():
        assert not torch.any(keep & ~first[name])  # pruned at 0.3 stays pruned at 0.5
    pruned = sum(int((~k).sum()) for k in res["masks"].values())
    assert pruned == round(0.5 * sum(k.numel() for k in res["masks"].values()))
    final = load(out / "level_1_s0.50" / "best" / "model")
    params = dict(final.named_parameters())
    for name, keep in res["masks"].items():
        assert torch.all(params[name][~keep] == 0)  # masks held through training
    assert levels[1]["best_score"] == max(s for _, s in levels[1]["scores"])
    assert json.loads((out / "gradual_report.json").read_text())["schedule"] == [0.3, 0.5]

    # resume: finished levels are loaded, nothing recomputed
    monkeypatch.setattr(OBSSolver, "estimate_fisher", lambda *a, **k: pytest.fail("recomputed a finished level"))
    again = OBSSolver(small_model, _cfg()).gradual(data, data, [0.3, 0.5], cfg, out, eval_fn=score, eval_every=1)
    assert again["report"]["levels"][1]["best_score"] == levels[1]["best_score"]


def _image_folder(root, classes=3, per_class=4):
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_cli_oneshot_sweep_and_refusals(small_model, tmp_path, capsys):
    save(small_model, tmp_path / "model")
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "out"
    base = ["prune", "obs", str(tmp_path / "model"), "--data", str(data), "--out", str(out)]
    args = [*base, "--sparsity", "0.5", "0.6", "--num-grads", "12", "--block-size", "32", "--calib-batch-size", "4"]
    assert main([*args, "--compressed", "--val", str(data), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["targets"]) == {"0.50", "0.60"}
    assert report["targets"]["0.50"]["num_grads"] == 12 and "eval" in report["targets"]["0.60"]
    m = load(out / "s0.60" / "model")
    masks = load_file(str(out / "s0.60" / "masks.safetensors"))
    assert (masks["blocks.0.mlp.fc1.weight"] == 0).float().mean() > 0.3
    assert torch.all(m.blocks[0].mlp.fc1.weight[masks["blocks.0.mlp.fc1.weight"] == 0] == 0)
    assert (out / "s0.60" / "sparse" / "model.sparse.safetensors").is_file()
    assert "top-1" in capsys.readouterr().out
    before = (out / "report.json").read_text()
    assert main(args) == 2  # exists, no --overwrite
    assert "output exists" in capsys.readouterr().err and (out / "report.json").read_text() == before
    wanda = ["prune", "wanda", *base[2:], "--overwrite", "--sparsity", "0.5", "--num-samples", "8"]
    assert main(wanda) == 0  # a baseline is its own sub-command
    assert json.loads((out / "report.json").read_text())["method"] == "wanda"
    assert main([*base, "--overwrite", "--nm", "3:2"]) == 2
    assert "N:M" in capsys.readouterr().err
    assert main(["prune", "magic", *base[2:], "--sparsity", "0.5"]) == 2
    assert "invalid choice: 'magic'" in capsys.readouterr().err


def test_marginal_criterion_minimises_summed_loss_on_convex_traces():
    import itertools

    from vitprune.pruners.obs import marginal_costs
    from vitprune.scoring.obs import allocate_counts

    g = torch.Generator().manual_seed(3)
    inc = torch.rand(3, 4, generator=g).sort(dim=1).values * torch.tensor([[1.0], [3.0], [0.3]])
    traces = inc.cumsum(1)  # convex cumulative losses
    (counts,) = allocate_counts([marginal_costs(traces)], [5 / 12])
    loss = sum(traces[i, k - 1].item() for i, k in enumerate(counts[0].tolist()) if k)
    best = min(
        sum(traces[i, k - 1].item() for i, k in enumerate(ks) if k)
        for ks in itertools.product(range(5), repeat=3)
        if sum(ks) == 5
    )
    assert loss == pytest.approx(best)
    wavy = torch.tensor([[1.0, 1.5, 1.7, 3.0]])
    assert torch.all(torch.diff(marginal_costs(wavy)) >= 0)


def test_cli_gradual_and_resume(small_model, tmp_path, capsys):
    save(small_model, tmp_path / "model")
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "grad"
    args = ["prune", "obs", str(tmp_path / "model"), "--data", str(data), "--out", str(out)]
    args += ["--schedule", "0.3", "0.5", "--steps-per-level", "1", "--batch-size", "4", "--num-grads", "8"]
    args += ["--block-size", "32", "--calib-batch-size", "4", "--val", str(data), "--no-progress"]
    args += ["--distill-alpha", "0.5"]
    assert main(args) == 0
    report = json.loads((out / "gradual" / "gradual_report.json").read_text())
    assert [lv["target"] for lv in report["levels"]] == [0.3, 0.5]
    assert (out / "gradual" / "level_1_s0.50" / "best" / "model" / "config.json").is_file()
    assert (out / "s0.50" / "model" / "config.json").is_file()  # the final level, like any sweep target
    assert json.loads((out / "report.json").read_text())["targets"]["0.50"]["schedule"] == [0.3, 0.5]
    assert main(args) == 2 and "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # finished levels are reloaded
