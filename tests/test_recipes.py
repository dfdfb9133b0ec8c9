"""Recipes: every packaged file loads and matches its CLI; bad files fail with the key and file named; on the
command line the recipe sets defaults and explicit flags win."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from vitprune import pruners
from vitprune.cli.main import build_parser, main
from vitprune.errors import VitPruneError
from vitprune.recipes import (
    add_recipe_option,
    apply_recipe,
    list_recipes,
    load_recipe,
    recipe_defaults,
    recipes_dir,
    schema,
    validate_recipe,
)

METHODS = [*pruners.available(), "pipeline"]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise AssertionError("no sub-commands")


@pytest.fixture
def prune_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The real ``vitprune`` parser with ``--recipe`` on every ``prune METHOD`` parser."""
    top = build_parser()
    methods = _subparsers(_subparsers(top)["prune"])
    for name, p in methods.items():
        if name in METHODS:
            add_recipe_option(p, name)
    return top, methods


def _write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = """
name: mine
version: 2
method: nvit
settings:
  target_macs: 0.5
  lr: 3.0e-4
  finetune_steps: 7
  chunks: {mlp: 32}
"""


# --------------------------------------------------------------------------------------------- packaged files
def test_packaged_recipes_load_and_cover_every_method():
    names = list_recipes()
    assert {"nvit-deit-imagenet", "nvit-cpu", "ovit-deit-imagenet", "ovit-cpu", "vtp-deit-imagenet", "vtp-cpu"} <= set(
        names
    )
    for name in names:
        r = load_recipe(name)
        assert r.name == name and r.version >= 1 and r.method in METHODS and (r.settings or r.stages)
        assert r.sources, f"{name} cites no source"
        assert Path(r.path).parent == recipes_dir()
    assert {load_recipe(n).method for n in names} >= {"nvit", "obs", "vtp", "pipeline"}
    assert set(list_recipes("vtp")) == {"vtp-cpu", "vtp-deit-imagenet"}


def test_paper_defaults_are_those_of_methods_md():
    ovit = load_recipe("ovit-deit-imagenet").settings
    assert (ovit["block_size"], ovit["num_grads"], ovit["damp"], ovit["damp_absolute"]) == (192, 4096, 1e-8, True)
    assert ovit["schedule"] == (0.5, 0.6, 0.75, 0.9)
    assert load_recipe("vtp-deit-imagenet").settings["lambda"] == pytest.approx(1e-4)
    nvit = load_recipe("nvit-deit-imagenet").settings
    assert nvit["chunks"] == {"emb": 16, "heads": 2, "qk": 8, "v": 8, "mlp": 16}
    assert nvit["lr"] == pytest.approx(1e-4) and nvit["distill_alpha"] == 1.0


def test_recipe_schema_and_cli_options_are_the_same_settings(prune_parsers):
    """Both are generated from the config dataclasses: every recipe key is an option and every option a key."""
    _, methods = prune_parsers
    for method in METHODS:
        run_flags = {"--data", "--val", "--classes", "--teacher", "--out", "--resume", "--overwrite", "--workers"}
        run_flags |= {"--device", "--threads", "--help", "--recipe"}  # what and where, not how: not in recipes
        options = {o for o in methods[method]._option_string_actions if o.startswith("--")} - run_flags
        keys = {"--" + k.replace("_", "-") for k in schema(method)}
        assert keys == options, f"vitprune prune {method}: {sorted(keys ^ options)}"


def test_every_packaged_recipe_converts_for_its_parser(prune_parsers):
    _, methods = prune_parsers
    for name in list_recipes():
        r = load_recipe(name)
        values = recipe_defaults(methods[r.method], r)
        assert values, name
    vtp = recipe_defaults(methods["vtp"], load_recipe("vtp-cpu"))
    assert vtp["lam"] == pytest.approx(1e-4) and vtp["kinds"] == ("qk", "v", "mlp") and vtp["crop_scale"] == (0.35, 1.0)


# --------------------------------------------------------------------------------------------- validation
def test_load_from_file_and_numbers_normalised(tmp_path):
    r = load_recipe(_write(tmp_path, GOOD + "  min_lr: 1e-6\n"))  # YAML 1.1 reads 1e-6 (no dot) as a string
    assert (r.name, r.version, r.method) == ("mine", 2, "nvit")
    assert r.settings["min_lr"] == pytest.approx(1e-6) and isinstance(r.settings["min_lr"], float)
    assert r.settings["finetune_steps"] == 7 and r.settings["chunks"] == {"mlp": 32}
    assert r.settings["min_lr"] == pytest.approx(1e-6)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ("  learning_rate: 0.1\n", "'learning_rate'"),
        ("  finetune_step: 3\n", "did you mean 'finetune_steps'"),
        ("  prune_steps: 2.5\n", "'prune_steps' must be an integer"),
        ("  lr: fast\n", "'lr' must be a number"),
        ("  lr: -1.0\n", "'lr' must be in (0, inf)"),
        ("  hflip: 2\n", "'hflip' must be in [0, 1]"),
        ("  crop_scale: [0.9, 0.2]\n", "'crop_scale' must be ordered LO,HI"),
        ("  augment: 1\n", "'augment' must be true or false"),
        ("  saliency: hessian\n", "'hessian' is not one of labels, distill"),
        ("  kinds: [heads, rows]\n", "'rows' is not one of"),
        ("  chunks: {mlp: 0}\n", "'chunks'[mlp] must be in [1, inf)"),
        ("  batch_size: null\n", "'batch_size' must be set"),
        ("  target_params: 0.4\n", "'target_macs' and 'target_params' exclude each other"),
        ("  distill_alpha: 1.5\n", "'distill_alpha' must be in [0, 1]"),
    ],
)
def test_bad_settings_name_the_key_and_the_file(tmp_path, extra, needle):
    path = _write(tmp_path, GOOD + extra)
    with pytest.raises(VitPruneError) as err:
        load_recipe(path)
    assert needle in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (GOOD.replace("version: 2", "version: two"), "'version' must be a positive integer"),
        (GOOD.replace("version: 2", "version: 0"), "'version' must be a positive integer"),
        (GOOD.replace("version: 2\n", ""), "missing key 'version'"),
        (GOOD.replace("method: nvit", "method: magic"), "unknown method 'magic'"),
        (GOOD + "author: me\n", "unknown top-level key 'author'"),
        (GOOD.replace("settings:\n", "settings: 3\nx:\n"), "unknown top-level key 'x'"),
        ("- a\n- b\n", "expected a mapping at the top level"),
        ("name: [unclosed\n", "is not valid YAML"),
        (GOOD.replace("method: nvit", "method: obs"), "unknown obs setting 'target_macs'"),
    ],
)
def test_bad_documents(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(VitPruneError) as err:
        load_recipe(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_unknown_name_missing_file_and_method_mismatch(tmp_path):
    with pytest.raises(VitPruneError, match=r"unknown recipe 'nope'.*nvit-cpu"):
        load_recipe("nope")
    with pytest.raises(VitPruneError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")
    with pytest.raises(VitPruneError, match="is for method 'nvit', not 'vtp'"):
        load_recipe("nvit-cpu", method="vtp")


def test_validate_recipe_without_a_file():
    r = validate_recipe({"name": "x", "version": 1, "method": "obs", "settings": {"sparsity": [0.5, 0.7]}})
    assert r.settings["sparsity"] == (0.5, 0.7) and r.path == "<recipe>"
    with pytest.raises(VitPruneError, match=r"'sparsity' must be in \[0, 1\)"):
        validate_recipe({"name": "x", "version": 1, "method": "obs", "settings": {"sparsity": [0.5, 1.0]}})


# --------------------------------------------------------------------------------------------- command line
BASE = ["prune", "nvit", "model", "--data", "d", "--out", "o"]


def test_recipe_sets_defaults_and_explicit_flags_win(prune_parsers):
    top, _ = prune_parsers
    args = top.parse_args([*BASE, "--recipe", "nvit-cpu", "--lr", "3e-4", "--finetune-st", "9"])
    assert args.lr == pytest.approx(3e-4)  # explicit (also before --recipe) wins
    assert args.finetune_steps == 9  # an abbreviated explicit option wins too
    assert args.prune_steps == 5 and args.batch_size == 32 and args.augment is True  # from the recipe
    assert args.kinds == ("heads", "qk", "v", "mlp", "emb") and args.chunks["heads"] == 1
    assert args.target_macs == 0.5 and args.target_params is None
    assert args.recipe == "nvit-cpu" and args.recipe_info["version"] == 2
    assert args.criterion == "per_cost"  # version 2 of the recipe
    before = top.parse_args([*BASE, "--lr", "3e-4", "--recipe=nvit-cpu"])
    assert before.lr == pytest.approx(3e-4) and before.prune_steps == 5


def test_explicit_target_replaces_the_recipe_target(prune_parsers):
    top, _ = prune_parsers
    args = top.parse_args([*BASE, "--recipe", "nvit-cpu", "--target-params", "0.4"])
    assert args.target_params == 0.4 and args.target_macs is None


def test_parser_defaults_are_restored_after_a_recipe(prune_parsers):
    top, _ = prune_parsers
    top.parse_args([*BASE, "--recipe", "nvit-cpu"])
    plain = top.parse_args([*BASE, "--target-macs", "0.3"])
    assert plain.prune_steps == 10 and plain.recipe is None and plain.recipe_info is None
    with pytest.raises(SystemExit):  # without a recipe the target is required again
        top.parse_args(BASE)


def test_bad_recipe_on_the_command_line_is_a_one_line_error(prune_parsers, tmp_path, capsys):
    top, _ = prune_parsers
    path = _write(tmp_path, GOOD + "  warmup: 3\n")
    with pytest.raises(SystemExit) as exc:
        top.parse_args([*BASE, "--recipe", str(path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown nvit setting 'warmup'" in err and str(path) in err
    with pytest.raises(SystemExit):
        top.parse_args(["prune", "vtp", "m", "--data", "d", "--out", "o", "--recipe", "nvit-cpu"])
    assert "is for method 'nvit', not 'vtp'" in capsys.readouterr().err


def test_apply_recipe_and_idempotent_option():
    p = argparse.ArgumentParser()
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-macs", type=float)
    g.add_argument("--target-params", type=float)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--kinds", type=lambda s: tuple(s.split(",")), default=("heads",))
    add_recipe_option(p, "nvit")
    add_recipe_option(p, "nvit")  # a second call changes nothing
    r = validate_recipe(
        {"name": "t", "version": 1, "method": "nvit", "settings": {"target_macs": 0.5, "lr": 2.0, "kinds": ["qk"]}}
    )
    ns = apply_recipe(["--lr", "3"], r, p)
    assert (ns.target_macs, ns.lr, ns.kinds) == (0.5, 3.0, ("qk",))
    assert p.parse_args(["--target-params", "0.2"]).lr == 1.0  # defaults restored
    bad = validate_recipe({"name": "t", "version": 1, "method": "nvit", "settings": {"prune_steps": 3}})
    with pytest.raises(VitPruneError, match="has no option --prune-steps"):
        apply_recipe([], bad, p)


def test_recipes_command_lists_and_prints(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in list_recipes())
    assert main(["recipes", "vtp-cpu"]) == 0
    assert "lambda: 1.0e-4" in capsys.readouterr().out
    assert main(["recipes", "nope"]) == 2
