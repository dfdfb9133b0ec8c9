"""Evaluation preprocessing without torchvision: PIL resize, centre crop, to tensor, normalise.

Presets (all produce ``img_size`` x ``img_size`` float tensors, channels first):

- ``shared``: RGB, bilinear resize to exactly 256x256, centre crop 224, ``(x/255 - 0.5) / 0.5``
  (the preprocessing the shared Tiny-ImageNet ViT-Tiny was trained and measured with);
- ``imagenet``: timm/DeiT eval: shorter side to ``int(224 / 0.875)`` bicubic, centre crop 224, ImageNet mean/std;
- ``inception``: timm augreg ViT eval: shorter side to ``int(224 / 0.9)`` bicubic, centre crop 224, mean=std=0.5.

Resizing and cropping follow torchvision's ``Resize``/``CenterCrop`` arithmetic on PIL images exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from vitprune.errors import VitPruneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# crop_pct: resize target = int(img_size / crop_pct); square=True resizes both sides, else the shorter side.
PREPROCESS_PRESETS: dict[str, dict[str, Any]] = {
    "shared": {"crop_pct": 0.875, "square": True, "interpolation": "bilinear", "mean": HALF, "std": HALF},
    "imagenet": {
        "crop_pct": 0.875,
        "square": False,
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    },
    "inception": {"crop_pct": 0.9, "square": False, "interpolation": "bicubic", "mean": HALF, "std": HALF},
}


def resize_image(img: Image.Image, size: int | Sequence[int], interpolation: str = "bilinear") -> Image.Image:
    """torchvision ``Resize``: an int sets the shorter side (aspect kept, long side truncated); (h, w) is exact."""
    resample = INTERPOLATIONS[interpolation]
    w, h = img.size
    if isinstance(size, int):
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    else:
        new_h, new_w = int(size[0]), int(size[1])
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample=resample)


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``CenterCrop`` on an ``(H, W, C)`` array (zero-padded first if smaller than ``size``)."""
    h, w = arr.shape[:2]
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))
        arr = np.pad(arr, pad)
        h, w = arr.shape[:2]
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return arr[top : top + size, left : left + size]


class EvalTransform:
    """``PIL.Image -> Tensor (3, img_size, img_size)``; picklable, so it works in DataLoader workers."""

    def __init__(
        self,
        img_size: int,
        resize: int | tuple[int, int],
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.img_size = int(img_size)
        self.resize = resize
        self.interpolation = interpolation
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean).view(-1, 1, 1)
        self._std = torch.tensor(self.std).view(-1, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = resize_image(img.convert("RGB"), self.resize, self.interpolation)
        arr = center_crop(np.asarray(img, dtype=np.uint8), self.img_size)
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)
        return (x - self._mean) / self._std

    def __repr__(self) -> str:
        return (
            f"EvalTransform(img_size={self.img_size}, resize={self.resize}, interpolation={self.interpolation!r}, "
            f"mean={self.mean}, std={self.std})"
        )


def build_eval_transform(
    preset: str = "shared",
    img_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    resize: int | Sequence[int] | None = None,
    interpolation: str | None = None,
) -> EvalTransform:
    """The named preprocessing with explicit overrides.

    ``resize`` is an int (shorter side, aspect kept) or ``(h, w)`` (exact); by default it is derived from the
    preset's crop fraction, e.g. 256 (or 256x256 for ``shared``) for ``img_size=224``.
    """
    if preset not in PREPROCESS_PRESETS:
        raise VitPruneError(f"unknown preprocessing preset {preset!r}; known: {', '.join(sorted(PREPROCESS_PRESETS))}")
    p = PREPROCESS_PRESETS[preset]
    size = 224 if img_size is None else int(img_size)
    if size <= 0:
        raise VitPruneError(f"image size must be positive, got {img_size}")
    if resize is None:
        target = int(size / p["crop_pct"])
        resize_arg: int | tuple[int, int] = (target, target) if p["square"] else target
    elif isinstance(resize, int):
        resize_arg = resize
    else:
        resize_arg = tuple(int(r) for r in resize)  # type: ignore[assignment]
        if len(resize_arg) != 2:
            raise VitPruneError(f"resize must be an int or (height, width), got {resize!r}")
    if min([resize_arg] if isinstance(resize_arg, int) else resize_arg) <= 0:
        raise VitPruneError(f"resize must be positive, got {resize!r}")
    interp = p["interpolation"] if interpolation is None else interpolation
    if interp not in INTERPOLATIONS:
        raise VitPruneError(f"unknown interpolation {interp!r}; known: {', '.join(INTERPOLATIONS)}")
    mean = p["mean"] if mean is None else mean
    std = p["std"] if std is None else std
    if len(mean) != 3 or len(std) != 3:
        raise VitPruneError(f"mean and std need 3 values (RGB), got mean={mean!r} std={std!r}")
    if any(s <= 0 for s in std):
        raise VitPruneError(f"std values must be positive, got {std!r}")
    return EvalTransform(size, resize_arg, interp, mean, std)


def eval_transform_for(preprocess: dict[str, Any] | None, default: str = "shared", **overrides: Any) -> EvalTransform:
    """Build the transform a model config records (``config.preprocess``, e.g. ``{"preset": "imagenet"}``).

    Falls back to the ``default`` preset when the config records nothing; non-None ``overrides`` win.
    """
    kwargs: dict[str, Any] = {"preset": default}
    if preprocess:
        unknown = set(preprocess) - {"preset", "img_size", "mean", "std", "resize", "interpolation"}
        if unknown:
            raise VitPruneError(f"unknown preprocessing keys in model config: {', '.join(sorted(unknown))}")
        kwargs.update(preprocess)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return build_eval_transform(**kwargs)
