"""Settings as dataclass fields with metadata: ONE source for validation, CLI options and recipe schemas.

A pruner's config is a dataclass whose fields are declared with :func:`setting`::

    lam: float = setting(1e-4, low=0.0, flag="lambda", help="L1 weight on the gates")

The field's :class:`Spec` (help, type, range, choices, CLI flag) drives

- :func:`validate_settings`: every value checked (type, range, choices) with a message naming the CLI flag;
- :func:`add_options` / :func:`values_from_args`: the ``vitprune prune METHOD`` options, generated from the fields;
- :func:`schema_of`: the recipe schema (``vitprune.recipes``), keyed by the flag with ``-`` written ``_``;

so a setting cannot exist in the CLI and be missing from a recipe, or the reverse.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass
from typing import Any

from vitprune.errors import VitPruneError

KINDS = ("float", "int", "bool", "str", "strs", "floats", "int_map", "pair")


@dataclass(frozen=True)
class Spec:
    """Type, range and CLI form of one setting.

    ``kind``: ``float``, ``int``, ``bool``, ``str``, ``strs`` / ``floats`` (lists; ``a,b,c`` on the CLI, or
    ``nargs="+"``), ``int_map`` (``k=v,...``) or ``pair`` (``LO,HI``, ordered). ``low``/``high`` bound numbers (and
    list items); ``choices`` restricts strings (and list items / map keys); ``nullable`` allows ``None`` (and
    an empty list).
    ``flag``: the long option without ``--`` (default: the field name with ``-``); ``invert``: a bool whose flag
    stores ``False`` (``--damp-absolute`` for ``damp_relative``); ``zero_is_none``: ``0`` on the CLI means
    ``None`` (``--round-to 0`` = off); ``cli=False``: library-only; ``group``: mutually exclusive group name;
    ``metavar``: shown in ``--help``; ``recipe=False``: a run flag a recipe may not set (paths, resume, device).
    """

    kind: str
    help: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    nullable: bool = False
    flag: str | None = None
    invert: bool = False
    zero_is_none: bool = False
    cli: bool = True
    nargs: str | None = None
    group: str | None = None
    metavar: str | None = None
    recipe: bool = True  # False: a CLI-only run flag (paths, resume, device), not a recipe setting

    def option(self, name: str) -> str:
        """The long option (``--finetune-steps``)."""
        return "--" + (self.flag or name.replace("_", "-"))

    def key(self, name: str) -> str:
        """The recipe key (the option with ``_``: ``finetune_steps``, ``lambda``)."""
        return (self.flag or name).replace("-", "_")


def _kind_of(default: Any) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, str):
        return "str"
    if isinstance(default, (tuple, list)) and default and all(isinstance(v, str) for v in default):
        return "strs"
    raise TypeError(f"cannot infer the kind of default {default!r}: pass kind=")


def setting(
    default: Any = MISSING,
    *,
    help: str = "",
    kind: str | None = None,
    default_factory: Callable[[], Any] | Any = MISSING,
    **spec: Any,
) -> Any:
    """A dataclass field carrying a :class:`Spec` (see the module docstring)."""
    if kind is None:
        value = default_factory() if default_factory is not MISSING else default
        kind = _kind_of(value)
    if kind not in KINDS:
        raise ValueError(f"unknown setting kind {kind!r}")
    meta = {"spec": Spec(kind=kind, help=help, **spec)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# spec fragments shared by many settings: ``setting(None, help=..., **FRACTION)``
FRACTION = {"kind": "float", "low": 0.0, "high": 1.0, "low_open": True, "nullable": True}  # in (0, 1] or None
OPTIONAL_STR = {"kind": "str", "nullable": True}
OPTIONAL_COUNT = {"kind": "int", "low": 1, "nullable": True}  # a positive integer or None
SPARSITIES = {"kind": "floats", "nargs": "+", "low": 0.0, "high": 1.0, "high_open": True, "nullable": True}


def specs_of(cls_or_obj: Any) -> dict[str, Spec]:
    """``{field name: Spec}`` of the fields declared with :func:`setting`, in declaration order."""
    return {f.name: f.metadata["spec"] for f in dataclasses.fields(cls_or_obj) if "spec" in f.metadata}


# ------------------------------------------------------------------------------------------------ values
def _interval(spec: Spec) -> str:
    lo = "(-inf" if spec.low is None else f"{'(' if spec.low_open else '['}{spec.low:g}"
    hi = "inf)" if spec.high is None else f"{spec.high:g}{')' if spec.high_open else ']'}"
    return f"{lo}, {hi}"


def _number(value: Any, kind: str, where: str) -> float | int:
    if isinstance(value, bool):
        raise VitPruneError(f"{where} must be a number, got {value!r}")
    if kind == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise VitPruneError(f"{where} must be an integer, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise VitPruneError(f"{where} must be a number, got {value!r}")


def _check_range(x: float, spec: Spec, where: str) -> None:
    if not math.isfinite(x):
        raise VitPruneError(f"{where} must be finite, got {x!r}")
    low_bad = spec.low is not None and (x <= spec.low if spec.low_open else x < spec.low)
    high_bad = spec.high is not None and (x >= spec.high if spec.high_open else x > spec.high)
    if low_bad or high_bad:
        raise VitPruneError(f"{where} must be in {_interval(spec)}, got {x:g}")


def _check_choice(x: str, spec: Spec, where: str) -> None:
    if spec.choices is not None and x not in spec.choices:
        raise VitPruneError(f"{where}: {x!r} is not one of {', '.join(spec.choices)}")


def check_value(value: Any, spec: Spec, where: str) -> Any:
    """The validated value of ``spec`` (numbers normalised to int/float, lists to tuples, maps to dicts)."""
    if spec.zero_is_none and not isinstance(value, bool) and value == 0:
        return None
    if value is None:
        if spec.nullable:
            return None
        raise VitPruneError(f"{where} must be set (got null)")
    kind = spec.kind
    if kind in ("float", "int"):
        x = _number(value, kind, where)
        _check_range(x, spec, where)
        return x
    if kind == "bool":
        if not isinstance(value, bool):
            raise VitPruneError(f"{where} must be true or false, got {value!r}")
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise VitPruneError(f"{where} must be a string, got {value!r}")
        _check_choice(value, spec, where)
        return value
    if kind in ("floats", "strs", "pair"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if spec.nullable and isinstance(value, (list, tuple)) and not value:
            return ()
        if not isinstance(value, (list, tuple)) or not value:
            raise VitPruneError(f"{where} must be a non-empty list, got {value!r}")
        if kind == "pair" and len(value) != 2:
            raise VitPruneError(f"{where} must be two numbers LO,HI, got {value!r}")
        out: list[Any] = []
        for i, item in enumerate(value):
            if kind == "strs":
                if not isinstance(item, str):
                    raise VitPruneError(f"{where}[{i}] must be a string, got {item!r}")
                _check_choice(item, spec, where)
                out.append(item)
            else:
                x = _number(item, "float", f"{where}[{i}]")
                _check_range(x, spec, where)
                out.append(x)
        if kind == "pair" and out[0] > out[1]:
            raise VitPruneError(f"{where} must be ordered LO,HI, got {out[0]:g},{out[1]:g}")
        return tuple(out)
    if kind == "int_map":
        if not isinstance(value, dict):
            raise VitPruneError(f"{where} must be a mapping KIND=N, got {value!r}")
        out_map = {}
        for k, v in value.items():
            _check_choice(str(k), spec, where)
            x = _number(v, "int", f"{where}[{k}]")
            _check_range(x, spec, f"{where}[{k}]")
            out_map[str(k)] = x
        return out_map
    raise AssertionError(f"unknown kind {kind}")


def validate_settings(obj: Any) -> None:
    """Check (and normalise in place) every :func:`setting` field of the dataclass instance ``obj``."""
    for name, spec in specs_of(obj).items():
        value = getattr(obj, name)
        where = spec.option(name) if spec.cli else name
        object.__setattr__(obj, name, check_value(value, spec, where))


def setting_dict(obj: Any) -> dict[str, Any]:
    """JSON-friendly ``{field: value}`` of a config (tuples as lists)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


# ------------------------------------------------------------------------------------------------ CLI
def _cli_parse(spec: Spec, name: str) -> Callable[[str], Any]:
    """argparse ``type`` for one token: the value's type only (``KIND=N,...`` maps, ``LO,HI`` pairs, ``0`` = off
    where ``zero_is_none``). Ranges and choices are checked by the config itself (:func:`validate_settings`), so
    the CLI, the API and recipes give the same one-line message."""
    where = spec.option(name)

    def parse(text: str) -> Any:
        try:
            if spec.kind == "int_map":
                value: Any = {}
                for part in filter(None, (p.strip() for p in text.split(","))):
                    key, sep, number = part.partition("=")
                    if not sep:
                        raise VitPruneError(f"expects KIND=N,..., got {text!r}")
                    value[key.strip()] = _int_text(number.strip(), where)
                return value
            if spec.kind == "int":
                value = _int_text(text, where)
            elif spec.kind in ("float", "floats"):
                value = _float_text(text, where)
            elif spec.kind in ("strs", "pair"):
                items = [v.strip() for v in text.split(",") if v.strip()]
                value = tuple(_float_text(v, where) for v in items) if spec.kind == "pair" else tuple(items)
            else:
                value = text
            if spec.zero_is_none and value == 0:
                return None
            return value
        except VitPruneError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{where} ").strip()) from None

    parse.__name__ = spec.kind
    return parse


def parse_text(cls: type, name: str, text: str) -> Any:
    """Setting ``name`` of config class ``cls`` from text as the CLI reads it (``a,b`` for every list,
    ``true`` / ``false`` for bools): for scripts that take ``KEY=VALUE`` settings (``benchmarks/``)."""
    spec = specs_of(cls).get(name)
    if spec is None:
        raise VitPruneError(f"unknown setting {name!r} (known: {', '.join(specs_of(cls))})")
    if spec.kind == "bool":
        if text.lower() not in ("true", "false"):
            raise VitPruneError(f"{name} must be true or false, got {text!r}")
        return text.lower() == "true"
    if spec.kind == "floats":
        return tuple(_float_text(v.strip(), spec.option(name)) for v in text.split(",") if v.strip())
    try:
        return _cli_parse(spec, name)(text)
    except argparse.ArgumentTypeError as exc:
        raise VitPruneError(f"{name}: {exc}") from None


def _int_text(text: Any, where: str) -> int:
    try:
        return int(str(text))
    except ValueError:
        raise VitPruneError(f"{where} must be an integer, got {text!r}") from None


def _float_text(text: Any, where: str) -> float:
    try:
        return float(str(text))
    except ValueError:
        raise VitPruneError(f"{where} must be a number, got {text!r}") from None


def _help(spec: Spec, default: Any) -> str:
    text = spec.help
    if spec.kind != "bool" and default not in (None, MISSING) and "default" not in text:
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
        if isinstance(default, dict):
            shown = ",".join(f"{k}={v}" for k, v in default.items())
        text += f" (default {shown})" if text else f"default {shown}"
    return text


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: Iterable[str] = (),
    title: str | None = None,
    groups: dict[str, Any] | None = None,
) -> None:
    """Add one option per CLI :func:`setting` of dataclass ``cls`` (options already present are left alone).

    Fields sharing a ``group`` go into one mutually exclusive group (required when no field of it has a
    default). ``groups`` collects those argparse groups by name (to share them between calls).
    """
    skip = set(skip)
    root = parser
    existing = set(getattr(parser, "_option_string_actions", {}))
    target = parser.add_argument_group(title) if title and hasattr(parser, "add_argument_group") else parser
    groups = {} if groups is None else groups
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("spec")
        if spec is None or not spec.cli or f.name in skip:
            continue
        opt = spec.option(f.name)
        if opt in existing:
            continue
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        where = target
        if spec.group:
            if spec.group not in groups:
                groups[spec.group] = root.add_mutually_exclusive_group(required=True)
            where = groups[spec.group]
        kw: dict[str, Any] = {"dest": f.name, "help": _help(spec, default)}
        if spec.metavar:
            kw["metavar"] = spec.metavar
        if spec.kind == "bool":
            kw["action"] = "store_false" if (spec.invert or default is True) else "store_true"
            kw["default"] = default
            where.add_argument(opt, **kw)
            continue
        kw["type"] = _cli_parse(spec, f.name)
        kw["default"] = default
        if spec.nargs:
            kw["nargs"] = spec.nargs
        where.add_argument(opt, **kw)


def values_from_args(cls: type, args: argparse.Namespace, *, skip: Iterable[str] = ()) -> dict[str, Any]:
    """``{field: value}`` of the CLI settings of ``cls`` present in ``args`` (lists as tuples)."""
    skip = set(skip)
    out = {}
    for name, spec in specs_of(cls).items():
        if not spec.cli or name in skip or not hasattr(args, name):
            continue
        value = getattr(args, name)
        out[name] = tuple(value) if isinstance(value, list) else value
    return out


def schema_of(*classes: type) -> dict[str, tuple[str, Spec]]:
    """Recipe schema: ``{recipe key: (field name, Spec)}`` of the CLI settings of ``classes``."""
    out: dict[str, tuple[str, Spec]] = {}
    for cls in classes:
        for name, spec in specs_of(cls).items():
            if spec.cli and spec.recipe:
                out.setdefault(spec.key(name), (name, spec))
    return out


__all__ = [
    "Spec",
    "add_options",
    "check_value",
    "schema_of",
    "setting",
    "setting_dict",
    "specs_of",
    "validate_settings",
    "values_from_args",
]
