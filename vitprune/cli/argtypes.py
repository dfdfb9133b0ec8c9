"""argparse types and validators for numeric options, with messages in CLI terms.

Types (``type=positive_int``) check one value as argparse parses it; argparse prefixes the option name, so
``--batch-size 0`` reads ``error: argument --batch-size: must be a positive integer, got 0``. Validators
(:func:`check_range`, :func:`check_img_size`) run after parsing, when a check needs more than one value, and
raise :class:`VitPruneError` naming the flag.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from vitprune.errors import VitPruneError


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer > 0."""
    v = int(_number(text, int))
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return v


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    v = int(_number(text, int))
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0."""
    v = float(_number(text, float))
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return v


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    v = float(_number(text, float))
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {text}")
    return v


def probability(text: str) -> float:
    """A number in [0, 1]."""
    v = float(_number(text, float))
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return v


def float_in(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """A type for a number in the interval ``[lo, hi]`` (``(`` / ``)`` with ``lo_open`` / ``hi_open``)."""
    shown = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        v = float(_number(text, float))
        if v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi):
            raise argparse.ArgumentTypeError(f"must be in {shown}, got {text}")
        return v

    parse.__name__ = f"number in {shown}"
    return parse


def ordered_pair(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False) -> Callable[[str], tuple]:
    """A type for ``A,B``: two numbers with ``lo <= A <= B <= hi`` (``lo < A`` with ``lo_open``)."""
    shown = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"

    def parse(text: str) -> tuple[float, float]:
        parts = text.split(",")
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"expected two numbers 'LO,HI', got {text!r}")
        a, b = (float(_number(p.strip(), float)) for p in parts)
        if a > b:
            raise argparse.ArgumentTypeError(f"LO must not exceed HI, got {text}")
        if a < lo or b > hi or (lo_open and a == lo):
            raise argparse.ArgumentTypeError(f"both values must be in {shown}, got {text}")
        return a, b

    parse.__name__ = "pair LO,HI"
    return parse


def check_range(flag: str, value: float | None, lo: float | None = None, hi: float | None = None) -> None:
    """Raise ``--flag must be in [lo, hi], got V`` (one-sided with ``None``); ``None`` values pass."""
    if value is None:
        return
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if hi is None:
            raise VitPruneError(f"{flag} must be >= {lo:g}, got {value:g}")
        if lo is None:
            raise VitPruneError(f"{flag} must be <= {hi:g}, got {value:g}")
        raise VitPruneError(f"{flag} must be in [{lo:g}, {hi:g}], got {value:g}")


def check_img_size(img_size: int | None, patch_size: int, flag: str = "--img-size") -> None:
    """``img_size`` must be a positive multiple of the model's patch size (None: the model's own size)."""
    if img_size is None:
        return
    if img_size <= 0 or img_size % patch_size:
        raise VitPruneError(f"{flag} must be a positive multiple of the patch size {patch_size}, got {img_size}")


__all__ = [
    "check_img_size",
    "check_range",
    "float_in",
    "nonneg_float",
    "nonneg_int",
    "ordered_pair",
    "positive_float",
    "positive_int",
    "probability",
    "set_type",
]


def set_type(parser: argparse.ArgumentParser, flag: str, kind: Callable[[str], object]) -> None:
    """Give the already-added option ``flag`` of ``parser`` the argparse type ``kind`` (for shared option
    blocks that are added with a plain ``int``/``float`` type)."""
    parser._option_string_actions[flag].type = kind
