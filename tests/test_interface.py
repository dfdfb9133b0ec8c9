"""The one pruning interface: registry, settings as dataclass fields (validation, CLI, recipes), a new method
added with one module + one registry line, masked == pruned for every structural method, and composition."""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass, replace

import pytest
import torch

import vitprune
from vitprune import pruners
from vitprune.cli.main import main
from vitprune.errors import VitPruneError
from vitprune.models import ViT, ViTConfig, save
from vitprune.pruners.base import PruneResult
from vitprune.pruners.settings import add_options, schema_of, setting, validate_settings, values_from_args
from vitprune.structures.masks import apply_masks, architecture_after


def _batches(model, n=2, bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(n * bs, c.in_chans, c.img_size, c.img_size, generator=g)
    y = torch.randint(0, c.num_classes, (n * bs,), generator=g)
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, n * bs, bs)]


# ------------------------------------------------------------------------------------------------ registry
def test_registry_lists_and_builds_every_method():
    names = pruners.available()
    assert names[:2] == ["nvit", "vtp"] and {"l2", "taylor", "obs", "gm", "um", "wanda", "sparsegpt"} <= set(names)
    assert set(pruners.available("structural")) == {"nvit", "vtp", "l2", "taylor"}
    for name in names:
        cls = pruners.get(name)
        assert cls.name == name and cls.label and cls.paper and cls.summary()
        assert cls.kind in ("structural", "unstructured")
    with pytest.raises(VitPruneError, match="unknown pruning method 'magic'"):
        pruners.get("magic")


# ------------------------------------------------------------------------------------------------ settings
@dataclass
class _Toy:
    rate: float = setting(0.5, low=0.0, high=1.0, help="a probability")
    steps: int = setting(3, low=1, help="a count")
    width: int | None = setting(8, kind="int", low=1, nullable=True, zero_is_none=True, help="0: off")
    names: tuple[str, ...] = setting(("a",), kind="strs", choices=("a", "b"), help="some names")
    pair: tuple[float, float] = setting((0.1, 0.9), kind="pair", low=0.0, high=1.0, help="LO,HI")
    fast: bool = setting(False, help="a switch")
    slow: bool = setting(True, flag="no-slow", help="inverted switch")
    hidden: int = setting(1, cli=False, help="library only")

    def __post_init__(self):
        validate_settings(self)


def test_settings_validate_with_cli_terms():
    assert _Toy(width=0).width is None and _Toy(names=["b"]).names == ("b",)
    for kwargs, msg in [
        ({"rate": 1.5}, "--rate must be in [0, 1], got 1.5"),
        ({"steps": 0}, "--steps must be in [1, inf), got 0"),
        ({"steps": 2.5}, "--steps must be an integer"),
        ({"names": ("c",)}, "--names: 'c' is not one of a, b"),
        ({"pair": (0.9, 0.1)}, "--pair must be ordered LO,HI"),
        ({"hidden": "x"}, "hidden must be an integer"),
    ]:
        with pytest.raises(VitPruneError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            _Toy(**kwargs)


def test_cli_options_and_recipe_schema_come_from_the_fields():
    p = argparse.ArgumentParser()
    add_options(p, _Toy)
    args = p.parse_args(["--rate", "0.25", "--width", "0", "--names", "a,b", "--pair", "0.2,0.3", "--no-slow"])
    values = values_from_args(_Toy, args)
    assert values == {"rate": 0.25, "steps": 3, "width": None, "names": ("a", "b"), "pair": (0.2, 0.3),
                      "fast": False, "slow": False}  # fmt: skip
    assert _Toy(**values).rate == 0.25
    assert "--hidden" not in p._option_string_actions
    assert set(schema_of(_Toy)) == {"rate", "steps", "width", "names", "pair", "fast", "no_slow"}


# ------------------------------------------------------------------------------------------------ a new method
def test_a_new_method_is_one_module_and_one_registry_line(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(pruners.REGISTRY, "random", ("toy_method:RandomPruner", "Random", "none (a toy)"))
    import importlib

    import toy_method

    importlib.reload(toy_method)  # registered after the registry line exists: takes its name and label
    assert pruners.get("random").name == "random" and pruners.get("random").label == "Random"
    res = vitprune.prune(tiny_model, "random", _batches(tiny_model), target_macs=0.8, progress=False)
    assert res.report["pruned"]["fraction"]["macs"] <= 0.8
    # ... and the CLI, with its generated options, without any edit to the CLI
    from PIL import Image

    save(tiny_model, tmp_path / "m")
    for c in range(2):
        (tmp_path / "d" / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), (40 * c, 7 * i, 90)).save(tmp_path / "d" / f"c{c}" / f"{i}.png")
    argv = ["prune", "random", str(tmp_path / "m"), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
            "--target-macs", "0.8", "--salt", "3", "--batch-size", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["method"] == "random" and report["settings"]["salt"] == 3


# ------------------------------------------------------------------------------------------------ contract
@pytest.mark.parametrize("method", ["nvit", "l2", "taylor"])
def test_structural_result_masks_describe_the_pruned_model(tiny_model, method):
    """For methods that neither train nor re-solve the weights, the masked dense model computes what the result
    computes (NViT's default reconstruction off)."""
    res = pruners.create(method, target_macs=0.6, progress=False, reconstruct="off").prune(
        tiny_model, _batches(tiny_model)
    )
    assert isinstance(res, PruneResult) and res.kind == "structural"
    assert replace(res.model.config, extra={}) == architecture_after(tiny_model.config, res.masks)
    masked = apply_masks(copy.deepcopy(tiny_model), res.masks).eval()
    x = _batches(tiny_model, n=1, seed=3)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(res.model.eval()(x), masked(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["obs", "gm", "um", "wanda", "sparsegpt"])
def test_unstructured_sweep_gives_one_result_per_target(tiny_model, method):
    settings = {"obs": {"num_grads": 8, "block_size": 16}, "wanda": {"num_samples": 8}}.get(method, {})
    settings |= {"sparsegpt": {"num_samples": 8, "blocksize": 16}}.get(method, {})
    results = pruners.create(method, sparsity=(0.3, 0.6), **settings).prune(tiny_model, _batches(tiny_model))
    assert [r.target for r in results] == [0.3, 0.6]
    for r in results:
        params = dict(r.model.named_parameters())
        assert all(torch.all(params[n][~m] == 0) for n, m in r.masks.items())
        assert r.report["sparsity"] == pytest.approx(r.target, abs=0.02)


# ------------------------------------------------------------------------------------------------ composition
def test_pipeline_nvit_then_obs_with_recovery_after_each(tmp_path):
    torch.manual_seed(0)
    cfg = ViTConfig.uniform(embed_dim=32, depth=3, heads=2, mlp_ratio=2.0, num_classes=5, img_size=16, patch_size=8)
    dense = ViT(cfg).eval()
    data = _batches(dense, n=3)
    stages = [
        ("nvit", {"target_macs": 0.7, "prune_steps": 2, "batches_per_step": 1, "finetune_steps": 2, "progress": False}),
        ("obs", {"sparsity": (0.5,), "num_grads": 8, "block_size": 16, "finetune_steps": 2, "progress": False}),
    ]
    (res,) = vitprune.prune(dense, stages, data, out=tmp_path / "run")
    assert res.report["pipeline"] == ["nvit", "obs"] and res.report["stages"][0]["method"] == "nvit"
    assert res.report["stages"][0]["pruned"]["fraction"]["macs"] <= 0.7
    assert res.model.config.embed_dim <= cfg.embed_dim and res.model.config != cfg  # structurally smaller ...
    params = dict(res.model.named_parameters())
    assert all(torch.all(params[n][~m] == 0) for n, m in res.masks.items())  # ... and sparse, zeros held
    assert res.report["finetune"]["steps"] == 2 and res.report["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert (tmp_path / "run" / "s0.50" / "model" / "config.json").is_file()
    assert (tmp_path / "run" / "stages" / "1-nvit" / "state.pt").is_file()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["targets"]["0.50"]["stages"][0]["method"] == "nvit"
    with pytest.raises(VitPruneError, match="only the last stage may be one"):
        vitprune.prune(dense, [("obs", {"sparsity": (0.3, 0.5), "num_grads": 8, "block_size": 16}), stages[0]], data)


def test_structural_recovery_with_feature_distillation_through_the_recorded_map(tiny_model):
    """The pruned model records which teacher block / channel each of its own is; fine-tuning with feature
    distillation uses that map (here with a block and embedding channels removed)."""
    res = pruners.create(
        "nvit", target_macs=0.5, kinds=("block", "emb", "mlp"), chunks={"emb": 8}, prune_steps=2, batches_per_step=1,
        finetune_steps=2, feature_weight=1.0, progress=False,
    ).prune(tiny_model, _batches(tiny_model))  # fmt: skip
    extra = res.model.config.extra
    assert extra["kept_blocks"] == [b for b, bm in enumerate(res.masks.blocks) if bm.keep]
    assert extra["emb_index"] == torch.nonzero(res.masks.emb).flatten().tolist()
    assert res.report["finetune"]["steps"] == 2 and res.report["settings"]["feature_weight"] == 1.0


# ------------------------------------------------------------------------------------------------ reconstruction
def _logit_gap(a, b, x):
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).pow(2).mean())


@pytest.mark.parametrize("method", ["nvit", "l2"])
def test_reconstruct_setting_brings_structural_results_closer_to_dense(tiny_model, method):
    data = _batches(tiny_model, n=4, bs=8)
    common = {"target_macs": 0.5, "progress": False, "reconstruct_images": 32}
    plain = pruners.create(method, reconstruct="off", **common).prune(tiny_model, data)
    recon = pruners.create(method, reconstruct="sequential", **common).prune(tiny_model, data)
    assert recon.masks == plain.masks and recon.model.config == plain.model.config  # same selection ...
    x = torch.cat([b[0] for b in data])
    assert _logit_gap(recon.model, tiny_model, x) < _logit_gap(plain.model, tiny_model, x)  # ... better weights
    assert recon.report["reconstruction"]["mode"] == "sequential" and recon.report["reconstruction"]["layers"]
    with pytest.raises(VitPruneError, match="--reconstruct-target self is for unstructured"):
        pruners.create(method, reconstruct="sequential", reconstruct_target="self", target_macs=0.5)


def test_reconstruct_setting_keeps_unstructured_masks(tiny_model):
    data = _batches(tiny_model, n=4, bs=8)
    (plain,) = pruners.create("gm", sparsity=(0.6,)).prune(tiny_model, data)
    (recon,) = pruners.create("gm", sparsity=(0.6,), reconstruct="sequential", reconstruct_images=32).prune(
        tiny_model, data
    )
    for name, keep in recon.masks.items():
        assert torch.equal(keep, plain.masks[name])
        assert torch.all(dict(recon.model.named_parameters())[name][~keep] == 0)
    x = torch.cat([b[0] for b in data])
    assert _logit_gap(recon.model, tiny_model, x) < _logit_gap(plain.model, tiny_model, x)


def test_nvit_reconstruction_scoring(tiny_model):
    res = pruners.create(
        "nvit", target_macs=0.7, scoring="reconstruction", kinds=("heads", "v", "mlp"), prune_steps=2,
        reconstruct_images=16, progress=False,
    ).prune(tiny_model, _batches(tiny_model, n=4, bs=8))  # fmt: skip
    assert res.report["pruned"]["fraction"]["macs"] <= 0.7
    with pytest.raises(VitPruneError, match="pass --kinds heads,v,mlp"):
        pruners.create("nvit", target_macs=0.7, scoring="reconstruction")


def test_parse_text_reads_settings_as_the_cli_does():
    from vitprune.pruners.settings import parse_text

    cfg = pruners.get("nvit").Config
    assert parse_text(cfg, "target_macs", "0.5") == 0.5
    assert parse_text(cfg, "kinds", "heads,v,mlp") == ("heads", "v", "mlp")
    assert parse_text(cfg, "chunks", "emb=16,heads=1") == {"emb": 16, "heads": 1}
    assert parse_text(cfg, "force_lut", "true") is True
    assert parse_text(pruners.get("obs").Config, "sparsity", "0.5,0.75") == (0.5, 0.75)
    with pytest.raises(VitPruneError, match="unknown setting 'nope'"):
        parse_text(cfg, "nope", "1")
    with pytest.raises(VitPruneError, match="true or false"):
        parse_text(cfg, "force_lut", "yes")
