"""How ``vitprune prune METHOD`` (and a recipe) feeds any pruner: inputs, data, output and runtime.

These are the settings every method shares on the command line; a method's own settings are its config
dataclass. Both are :func:`~vitprune.pruners.settings.setting` fields, so the CLI options and the recipe schema
come from the same declarations.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitprune.pruners.settings import OPTIONAL_COUNT, OPTIONAL_STR, setting, validate_settings


@dataclass
class RunOptions:
    """Inputs, data, output and runtime of one ``vitprune prune`` run (CLI / recipe only)."""

    data: str | None = setting(
        None, recipe=False, **OPTIONAL_STR, metavar="DIR", help="training images DIR/<class>/<img>"
    )
    val: str | None = setting(
        None, recipe=False, **OPTIONAL_STR, metavar="DIR", help="validation images: top-1 in report"
    )
    classes: str | None = setting(None, recipe=False, **OPTIONAL_STR, metavar="FILE", help="line i names output i")
    teacher: str | None = setting(
        None, recipe=False, **OPTIONAL_STR, help="distillation teacher (default: dense model)"
    )
    preset: str | None = setting(None, **OPTIONAL_STR, help="architecture of a checkpoint that has none")
    preprocess: str = setting("shared", help="preprocessing preset when the model records none")
    limit_per_class: int | None = setting(None, **OPTIONAL_COUNT, help="first N training images/class")
    val_limit_per_class: int | None = setting(None, **OPTIONAL_COUNT, help="first N val images/class")
    eval_batch_size: int = setting(64, low=1, help="batch size of evaluation")
    calib_images: int | None = setting(
        None, kind="int", low=1, nullable=True,
        help="calibration images drawn from --data (default: the method's; structural: stream the training data)",
    )  # fmt: skip
    calib_batch_size: int = setting(16, low=1, help="batch size of calibration subsets")
    batch_size: int = setting(64, low=1, help="global training batch size")
    augment: bool = setting(False, help="random resized crop + flip on training images")
    crop_scale: tuple[float, float] = setting(
        (0.35, 1.0), kind="pair", low=0.0, high=1.0, low_open=True, help="RandomResizedCrop area range LO,HI"
    )
    hflip: float = setting(0.5, low=0.0, high=1.0, help="horizontal flip probability with --augment")
    out: str | None = setting(
        None, recipe=False, **OPTIONAL_STR, metavar="DIR", help="run directory: model/, report.json"
    )
    resume: bool = setting(False, recipe=False, help="continue an interrupted run in --out")
    overwrite: bool = setting(False, recipe=False, help="replace an existing run in --out")
    compressed: bool = setting(False, help="unstructured: also store each model as bitmask + values")
    seed: int = setting(0, low=0, help="seed of the calibration subset, data order, scoring and training")
    workers: int = setting(0, recipe=False, low=0, help="data-loading worker processes")
    device: str = setting("auto", recipe=False, help="cpu, cuda, cuda:N or auto")
    threads: int | None = setting(None, recipe=False, **OPTIONAL_COUNT, help="torch CPU threads")

    def __post_init__(self) -> None:
        validate_settings(self)


__all__ = ["RunOptions"]
