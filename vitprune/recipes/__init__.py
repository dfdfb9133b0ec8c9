"""Named, versioned pruning recipes: YAML files of settings for ``vitprune prune METHOD --recipe NAME|FILE``.

A recipe file (``vitprune/recipes/<name>.yaml`` ships with the package; any other path works too)::

    name: nvit-deit-imagenet        # must equal the file name (without .yaml) for packaged recipes
    version: 1                      # the recipe's own revision, a positive integer
    method: nvit                    # a registered method (``vitprune.pruners.available()``) or ``pipeline``
    description: one line
    sources: [METHODS.md section 2, ...]
    expected: {...}                 # optional, free-form: the published results this recipe aims at
    settings:                       # validated against the method's schema (the CLI's long option names)
      target_macs: 0.5
      lr: 1.0e-4
    stages:                         # only for ``method: pipeline``: methods run one after the other
      - {method: nvit, settings: {target_macs: 0.7}}
      - {method: obs, settings: {sparsity: [0.5]}}

Every ``settings`` key is a long option of ``vitprune prune METHOD`` with ``-`` written as ``_``
(``--finetune-steps`` -> ``finetune_steps``, VTP's ``--lambda`` -> ``lambda``): the schema is generated from
the method's config dataclass and :class:`~vitprune.pruners.run_options.RunOptions`, the fields the CLI options
come from. An unknown or mistyped key, a value of the wrong type or out of range is a :class:`VitPruneError`
naming the key and the recipe file.

On the command line, :func:`add_recipe_option` gives a prune parser ``--recipe``: the recipe's values become
the parser's *defaults*, so every flag given explicitly on the command line wins (argparse semantics).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from vitprune.errors import VitPruneError

PIPELINE = "pipeline"
TOP_LEVEL_KEYS = ("name", "version", "method", "description", "sources", "expected", "settings", "stages")
REQUIRED_KEYS = ("name", "version", "method", "settings")


# ------------------------------------------------------------------------------------------------ schema
def methods() -> list[str]:
    """Methods a recipe may name: the registry's, plus ``pipeline`` (stages of methods)."""
    from vitprune.pruners import available

    return [*available(), PIPELINE]


def schema(method: str, run_options: bool = True) -> dict[str, Any]:
    """``{recipe key: (field, Spec)}`` of ``method``: generated from its config dataclass (and the shared
    :class:`~vitprune.pruners.run_options.RunOptions`), the same fields the CLI options come from."""
    from vitprune.pruners import get
    from vitprune.pruners.run_options import RunOptions
    from vitprune.pruners.settings import schema_of

    classes = [get(method).Config] if method != PIPELINE else []
    return schema_of(*classes, *([RunOptions] if run_options else []))


def exclusive(method: str) -> dict[str, list[str]]:
    """Mutually exclusive groups of recipe keys (the CLI's target options)."""
    groups: dict[str, list[str]] = {}
    for key, (_, spec) in schema(method).items():
        if spec.group:
            groups.setdefault(spec.group, []).append(key)
    return groups


# ------------------------------------------------------------------------------------------------ recipes
@dataclass
class Recipe:
    """A validated recipe: ``settings`` hold YAML values checked against :func:`schema` ``(method)``;
    a ``pipeline`` recipe has ``stages``: ``[{"method": ..., "settings": {...}}, ...]``."""

    name: str
    version: int
    method: str
    settings: dict[str, Any]
    description: str = ""
    sources: list[str] = field(default_factory=list)
    expected: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly identification (for run reports); a pipeline's stages included."""
        out = {"name": self.name, "version": self.version, "method": self.method, "path": self.path}
        if self.stages:
            out["stages"] = self.stages
        return out


def recipes_dir() -> Path:
    """Folder of the packaged recipe files."""
    return Path(str(resources.files("vitprune") / "recipes"))


def list_recipes(method: str | None = None) -> list[str]:
    """Names of the packaged recipes (optionally only those of ``method``), sorted."""
    names = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
    if method is None:
        return names
    return [n for n in names if load_recipe(n).method == method]


def _is_path(ref: str) -> bool:
    return ref.endswith((".yaml", ".yml")) or os.sep in ref or "/" in ref or Path(ref).is_file()


def _resolve(ref: str | os.PathLike) -> tuple[Path, bool]:
    """(file, packaged?) for a recipe name or path."""
    text = str(ref)
    if _is_path(text):
        p = Path(text)
        if not p.is_file():
            raise VitPruneError(f"recipe file not found: {p}")
        return p, False
    p = recipes_dir() / f"{text}.yaml"
    if not p.is_file():
        raise VitPruneError(f"unknown recipe {text!r} (packaged recipes: {', '.join(list_recipes()) or 'none'})")
    return p, True


def load_recipe(name_or_path: str | os.PathLike, method: str | None = None) -> Recipe:
    """Read and validate a recipe by packaged name (``nvit-cpu``) or file path; ``method`` must match if given."""
    path, packaged = _resolve(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise VitPruneError(f"cannot read recipe {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise VitPruneError(f"recipe {path} is not valid YAML: {' '.join(str(exc).split())}") from None
    recipe = validate_recipe(data, source=str(path))
    if packaged and recipe.name != path.stem:
        raise VitPruneError(f"recipe {path}: name {recipe.name!r} differs from its file name {path.stem!r}")
    if method is not None and recipe.method != method:
        raise VitPruneError(f"recipe {path} is for method {recipe.method!r}, not {method!r}")
    return recipe


def validate_recipe(data: Any, source: str = "<recipe>") -> Recipe:
    """Check a parsed recipe document; every problem is a :class:`VitPruneError` naming the key and ``source``."""
    if not isinstance(data, dict):
        raise VitPruneError(f"recipe {source}: expected a mapping at the top level, got {type(data).__name__}")
    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise VitPruneError(
            f"recipe {source}: unknown top-level key {unknown[0]!r} (allowed: {', '.join(TOP_LEVEL_KEYS)})"
        )
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise VitPruneError(f"recipe {source}: missing key {missing[0]!r}")
    name, version, method = data["name"], data["version"], data["method"]
    if not isinstance(name, str) or not name.strip():
        raise VitPruneError(f"recipe {source}: 'name' must be a non-empty string")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise VitPruneError(f"recipe {source}: 'version' must be a positive integer, got {version!r}")
    if method not in methods():
        raise VitPruneError(f"recipe {source}: unknown method {method!r} (expected one of {', '.join(methods())})")
    checked = _check_settings(data["settings"], method, f"recipe {source}", run_options=True)
    stages: list[dict[str, Any]] = []
    if method == PIPELINE:
        raw = data.get("stages")
        if not isinstance(raw, list) or not raw:
            raise VitPruneError(f"recipe {source}: a pipeline needs 'stages': a list of {{method, settings}}")
        for i, stage in enumerate(raw):
            where = f"recipe {source}: stage {i + 1}"
            if not isinstance(stage, dict) or set(stage) - {"method", "settings"} or "method" not in stage:
                raise VitPruneError(f"{where} must be a mapping with 'method' and 'settings'")
            if stage["method"] not in methods() or stage["method"] == PIPELINE:
                raise VitPruneError(f"{where}: unknown method {stage['method']!r}")
            settings = _check_settings(stage.get("settings") or {}, stage["method"], where, run_options=False)
            stages.append({"method": stage["method"], "settings": _fields(settings, stage["method"])})
    elif "stages" in data:
        raise VitPruneError(f"recipe {source}: 'stages' is only for method 'pipeline'")
    sources = data.get("sources", [])
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise VitPruneError(f"recipe {source}: 'sources' must be a list of strings")
    expected = data.get("expected") or {}
    if not isinstance(expected, dict):
        raise VitPruneError(f"recipe {source}: 'expected' must be a mapping")
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise VitPruneError(f"recipe {source}: 'description' must be a string")
    return Recipe(name, version, method, checked, description.strip(), sources, expected, source, stages)


def _check_settings(settings: Any, method: str, where: str, run_options: bool) -> dict[str, Any]:
    """Validated ``{recipe key: value}``: every key must be a setting of ``method`` (or a run option)."""
    from vitprune.pruners.settings import check_value

    if not isinstance(settings, dict):
        raise VitPruneError(f"{where}: 'settings' must be a mapping")
    keys = schema(method, run_options)
    checked = {}
    for key, value in settings.items():
        if key not in keys:
            hint = _close_match(str(key), keys)
            raise VitPruneError(
                f"{where}: unknown {method} setting {key!r}" + (f" (did you mean {hint!r}?)" if hint else "")
            )
        checked[key] = check_value(value, keys[key][1], f"{where}: setting {key!r}")
    for group in exclusive(method).values():
        given = [k for k in group if checked.get(k) is not None]
        if len(given) > 1:
            raise VitPruneError(f"{where}: settings {' and '.join(map(repr, given))} exclude each other")
    return checked


def _fields(settings: dict[str, Any], method: str) -> dict[str, Any]:
    """Recipe keys -> config field names (``lambda`` -> ``lam``, ``damp_absolute: true`` -> ``damp_relative``)."""
    keys = schema(method, run_options=False)
    out = {}
    for key, value in settings.items():
        name, spec = keys[key]
        if spec.kind == "bool" and spec.invert:
            value = not value
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _close_match(key: str, keys: dict[str, Any]) -> str | None:
    import difflib

    hits = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.75)
    return hits[0] if hits else None


# ------------------------------------------------------------------------------------------------ CLI
def _long_option(key: str) -> str:
    return "--" + key.replace("_", "-")


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings}


def _cli_text(value: Any) -> str:
    """How a user would type ``value`` on the command line."""
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _convert(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` as argparse would store it for ``action`` had the user typed it (same type function)."""
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise VitPruneError(f"{where} must be true or false")
        return value if isinstance(action, argparse._StoreTrueAction) else not value
    convert = action.type or (lambda s: s)

    def one(text: str) -> Any:
        try:
            out = convert(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise VitPruneError(f"{where}: {exc}") from None
        if action.choices is not None and out not in action.choices:
            raise VitPruneError(f"{where}: {out!r} is not one of {', '.join(map(str, action.choices))}")
        return out

    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [one(str(v)) for v in items]
    return one(_cli_text(value))


def _given_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the options present in ``argv`` (exact or unambiguous ``--prefix``, ``--opt=value``)."""
    actions = _option_actions(parser)
    longs = [o for o in actions if o.startswith("--")]
    dests = set()
    for token in argv:
        if token == "--":
            break
        if not token.startswith("-") or token == "-":
            continue
        opt = token.split("=", 1)[0]
        if opt in actions:
            dests.add(actions[opt].dest)
        elif opt.startswith("--") and parser.allow_abbrev:
            hits = [o for o in longs if o.startswith(opt)]
            if len({actions[o].dest for o in hits}) == 1:
                dests.add(actions[hits[0]].dest)
    return dests


def recipe_defaults(parser: argparse.ArgumentParser, recipe: Recipe, given: set[str] | None = None) -> dict[str, Any]:
    """``{dest: parsed value}`` of ``recipe`` for ``parser`` (a ``vitprune prune METHOD`` parser).

    A recipe key of a mutually exclusive group is dropped when ``given`` (destinations present on the command
    line) holds another member of that group: the command line wins.
    """
    actions = _option_actions(parser)
    given = given or set()
    out: dict[str, Any] = {}
    for key, value in recipe.settings.items():
        where = f"recipe {recipe.path or recipe.name}: setting {key!r}"
        action = actions.get(_long_option(key))
        if action is None:
            raise VitPruneError(f"{where} has no option {_long_option(key)} in 'vitprune prune {recipe.method}'")
        groups = [g for g in parser._mutually_exclusive_groups if action in g._group_actions]
        if any(a.dest in given and a is not action for g in groups for a in g._group_actions):
            continue
        out[action.dest] = _convert(action, value, where)
    return out


def apply_recipe(args: Sequence[str], recipe: Recipe, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse ``args`` with ``parser`` whose defaults are ``recipe``'s settings: explicit flags win.

    Required mutually exclusive groups (the targets) count as satisfied when the recipe sets one member.
    """
    ns, extras = _parse_with_recipe(parser, list(args), recipe, None)
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return ns


def _raw_parse_known(parser: argparse.ArgumentParser, args: list[str], namespace: Any) -> Any:
    if isinstance(parser, _RecipeParserMixin):
        return super(_RecipeParserMixin, parser).parse_known_args(args, namespace)
    return parser.parse_known_args(args, namespace)


def _parse_with_recipe(
    parser: argparse.ArgumentParser, args: list[str], recipe: Recipe, namespace: Any
) -> tuple[argparse.Namespace, list[str]]:
    """``parse_known_args`` with the recipe's values as temporary defaults (restored afterwards)."""
    defaults = recipe_defaults(parser, recipe, _given_options(parser, args))
    actions = [a for a in parser._actions if a.dest in defaults]
    saved = [(a, a.default) for a in actions]
    relaxed = []
    for g in parser._mutually_exclusive_groups:
        if g.required and any(defaults.get(a.dest) is not None for a in g._group_actions):
            relaxed.append(g)
            g.required = False
    try:
        for a in actions:
            a.default = defaults[a.dest]
        return _raw_parse_known(parser, args, namespace)
    finally:
        for a, default in saved:
            a.default = default
        for g in relaxed:
            g.required = True


def _recipe_ref(args: Sequence[str]) -> str | None:
    ref = None
    it = iter(args)
    for token in it:
        if token == "--":
            break
        if token == "--recipe":
            ref = next(it, None)
        elif token.startswith("--recipe="):
            ref = token.split("=", 1)[1]
    return ref


class _RecipeParserMixin:
    """Parser mix-in: a ``--recipe`` found in the arguments sets the defaults before parsing."""

    recipe_method: str = ""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        ref = _recipe_ref(args)
        if not ref:
            return super().parse_known_args(args, namespace)
        try:
            recipe = load_recipe(ref, method=self.recipe_method)
            ns, extras = _parse_with_recipe(self, args, recipe, namespace)
        except VitPruneError as exc:
            self.error(str(exc))
        ns.recipe_info = recipe.summary()
        return ns, extras


def add_recipe_option(parser: argparse.ArgumentParser, method: str) -> argparse.ArgumentParser:
    """Give a ``vitprune prune METHOD`` parser ``--recipe NAME|FILE``; call it once all options are added.

    Recipe values become defaults (explicit flags win); the parsed namespace gets ``recipe`` (as given) and
    ``recipe_info`` (name, version, method, path) when a recipe was used. Every recipe key must name one of the
    parser's options (checked when the recipe is applied).
    """
    if method not in methods():
        raise ValueError(f"unknown recipe method {method!r}")
    if "--recipe" not in parser._option_string_actions:  # idempotent
        names = ", ".join(list_recipes()) or "none"
        parser.add_argument(
            "--recipe",
            default=None,
            metavar="NAME|FILE",
            help=f"settings from a recipe (explicit flags win); packaged: {names}; see docs/RECIPES.md",
        )
    parser.set_defaults(recipe_info=None)
    cls = type(parser)
    if not issubclass(cls, _RecipeParserMixin):
        parser.__class__ = type(f"Recipe{cls.__name__}", (_RecipeParserMixin, cls), {})
    parser.recipe_method = method  # type: ignore[attr-defined]
    return parser


__all__ = [
    "PIPELINE",
    "Recipe",
    "add_recipe_option",
    "apply_recipe",
    "list_recipes",
    "load_recipe",
    "recipe_defaults",
    "recipes_dir",
    "schema",
    "validate_recipe",
]
