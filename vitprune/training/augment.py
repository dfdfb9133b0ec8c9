"""Training augmentation on tensors, without torchvision.

Choice: a small module of our own rather than a library. torchvision cannot be installed here; kornia 0.9
would install from PyPI without replacing torch (checked with ``pip install --dry-run kornia``), but it adds two
dependencies (kornia, kornia-rs) for the handful of ops a ViT recipe needs and its ops are batch-oriented. Every
op below is a few lines of torch, tested against PIL's reference implementations and closed forms in
``tests/test_augment.py``. All randomness comes from torch's global generator, so the training engine's
checkpoints (which save and restore it) make augmented runs resume bit-identically.

Per-sample ops take a float tensor ``(C, H, W)`` in ``[0, 1]`` (use :func:`to_tensor` for a PIL image) and are
usable as a dataset ``transform``: see :func:`build_train_transform`. Batch-level :class:`MixupCutmix` turns
``(images, labels)`` into mixed images and soft targets (Zhang et al. 2018; Yun et al. 2019); use it as the
engine's ``mixup``/``cutmix`` option or wrap a collate function with :class:`MixupCollate`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import default_collate

from vitprune.errors import VitPruneError

Transform = Callable[[Tensor], Tensor]


def _rand() -> float:
    return float(torch.rand(()))


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * _rand()


def to_tensor(img) -> Tensor:
    """PIL image (or ``H x W [x C]`` uint8 array) -> float tensor ``(C, H, W)`` in ``[0, 1]``."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.dtype != np.uint8:
        raise VitPruneError(f"to_tensor expects 8-bit images, got {arr.dtype}")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Normalize:
    """``(x - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float] | float, std: Sequence[float] | float) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def resize(x: Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> Tensor:
    """Resize ``(C, H, W)`` to ``size`` (antialiased when shrinking with bilinear/bicubic)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    kwargs = {"align_corners": False, "antialias": True} if interpolation in ("bilinear", "bicubic") else {}
    out = F.interpolate(x.unsqueeze(0), size=size, mode=interpolation, **kwargs).squeeze(0)
    return out.clamp_(0.0, 1.0)


class RandomResizedCrop:
    """Crop a random area fraction ``scale`` and aspect ``ratio``, resize to ``size`` (Szegedy et al. 2015).

    Sampling follows the usual Inception recipe: 10 tries, then a central crop of the clamped aspect.
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
    ) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale, self.ratio, self.interpolation = scale, ratio, interpolation

    def get_params(self, height: int, width: int) -> tuple[int, int, int, int]:
        area = height * width
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(log_lo, log_hi))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, ()))
                left = int(torch.randint(0, width - w + 1, ()))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, x: Tensor) -> Tensor:
        top, left, h, w = self.get_params(x.shape[-2], x.shape[-1])
        return resize(x[..., top : top + h, left : left + w], self.size, self.interpolation)


class RandomCrop:
    """Pad by ``padding`` (with ``fill``) and take a random ``size`` crop (the CIFAR/MNIST recipe)."""

    def __init__(self, size: int, padding: int = 0, fill: float = 0.0) -> None:
        self.size, self.padding, self.fill = size, padding, fill

    def __call__(self, x: Tensor) -> Tensor:
        p = self.padding
        if p:
            x = F.pad(x, (p, p, p, p), value=self.fill)
        h, w = x.shape[-2:]
        if h < self.size or w < self.size:
            raise VitPruneError(f"cannot crop {self.size}px from a {h}x{w} image")
        top = int(torch.randint(0, h - self.size + 1, ()))
        left = int(torch.randint(0, w - self.size + 1, ()))
        return x[..., top : top + self.size, left : left + self.size]


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: Tensor) -> Tensor:
        return x.flip(-1) if _rand() < self.p else x


# ---------------------------------------------------------------------------------------------- RandAugment ops
def affine(x: Tensor, matrix: Sequence[float], fill: float = 0.0, mode: str = "nearest") -> Tensor:
    """Apply the inverse pixel map ``(u, v) = M (i, j, 1)`` (pixel coordinates about the image centre).

    ``matrix`` is the 2x3 map from an *output* pixel position to the *input* position it samples, in pixels
    measured from the image centre; pixels sampled from outside the image get ``fill``.
    """
    c, h, w = x.shape
    a, b, tx, d, e, ty = (float(v) for v in matrix)
    # grid_sample works in normalised coordinates [-1, 1] with align_corners=False: u_norm = 2 u / w.
    theta = torch.tensor([[a, b * h / w, 2 * tx / w], [d * w / h, e, 2 * ty / h]], dtype=x.dtype)
    grid = F.affine_grid(theta.unsqueeze(0), [1, c, h, w], align_corners=False)
    ones = torch.ones(1, 1, h, w, dtype=x.dtype)
    src = torch.cat([x.unsqueeze(0), ones], dim=1)
    out = F.grid_sample(src, grid, mode=mode, padding_mode="zeros", align_corners=False).squeeze(0)
    img, valid = out[:c], out[c:]
    return img * valid + fill * (1.0 - valid)


def rotate(x: Tensor, degrees: float, fill: float = 0.0) -> Tensor:
    """Rotate counter-clockwise by ``degrees`` about the centre."""
    t = math.radians(degrees)
    cos, sin = math.cos(t), math.sin(t)
    # output (x, y) samples input R^-1 (x, y); image y points down, so CCW on screen is R(-t) in (x, y).
    return affine(x, [cos, -sin, 0.0, sin, cos, 0.0], fill)


def shear_x(x: Tensor, factor: float, fill: float = 0.0) -> Tensor:
    return affine(x, [1.0, factor, 0.0, 0.0, 1.0, 0.0], fill)


def shear_y(x: Tensor, factor: float, fill: float = 0.0) -> Tensor:
    return affine(x, [1.0, 0.0, 0.0, factor, 1.0, 0.0], fill)


def translate(x: Tensor, dx: float, dy: float, fill: float = 0.0) -> Tensor:
    """Shift content by ``(dx, dy)`` pixels (right/down positive)."""
    return affine(x, [1.0, 0.0, -dx, 0.0, 1.0, -dy], fill)


def _grayscale(x: Tensor) -> Tensor:
    if x.shape[0] == 1:
        return x
    r, g, b = x[0], x[1], x[2]
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(0)


def blend(a: Tensor, b: Tensor, factor: float) -> Tensor:
    """``b + factor * (a - b)`` clamped to [0, 1] (PIL ImageEnhance semantics: factor 1 returns ``a``)."""
    return (b + factor * (a - b)).clamp(0.0, 1.0)


def brightness(x: Tensor, factor: float) -> Tensor:
    return blend(x, torch.zeros_like(x), factor)


def contrast(x: Tensor, factor: float) -> Tensor:
    return blend(x, _grayscale(x).mean().expand_as(x), factor)


def color(x: Tensor, factor: float) -> Tensor:
    return blend(x, _grayscale(x).expand_as(x), factor)


def sharpness(x: Tensor, factor: float) -> Tensor:
    """Blend with PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13), border pixels unchanged."""
    c = x.shape[0]
    kernel = torch.ones(3, 3, dtype=x.dtype)
    kernel[1, 1] = 5.0
    kernel = (kernel / 13.0).expand(c, 1, 3, 3)
    smooth = x.clone()
    smooth[:, 1:-1, 1:-1] = F.conv2d(x.unsqueeze(0), kernel, groups=c).squeeze(0)
    return blend(x, smooth, factor)


def solarize(x: Tensor, threshold: float) -> Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


def posterize(x: Tensor, bits: int) -> Tensor:
    """Keep the top ``bits`` bits of each 8-bit value."""
    q = (x * 255.0).round().to(torch.uint8)
    mask = (0xFF << (8 - bits)) & 0xFF
    return (q & mask).float() / 255.0


def autocontrast(x: Tensor) -> Tensor:
    """Stretch each channel to the full [0, 1] range."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp_min(1e-12), torch.ones_like(hi))
    return torch.where(hi > lo, (x - lo) * scale, x).clamp(0.0, 1.0)


def _signed(v: float) -> float:
    return v if _rand() < 0.5 else -v


class RandAugment:
    """RandAugment (Cubuk et al. 2020): ``num_ops`` ops drawn uniformly, each at ``magnitude`` of 10.

    Op subset: identity, autocontrast, brightness, color, contrast, sharpness, posterize, solarize, rotate
    (30 deg at M=10), shear x/y (0.3), translate x/y (0.45 of the size). Magnitudes follow torchvision's
    scale (31 bins mapped onto M in [0, 10]); signed ops pick a random sign.
    """

    OPS = (
        "identity",
        "autocontrast",
        "brightness",
        "color",
        "contrast",
        "sharpness",
        "posterize",
        "solarize",
        "rotate",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
    )

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, fill: float = 0.0, ops: Sequence[str] = OPS):
        unknown = sorted(set(ops) - set(self.OPS))
        if unknown:
            raise VitPruneError(f"unknown RandAugment ops: {', '.join(unknown)}")
        if not 0 <= magnitude <= 10:
            raise VitPruneError(f"RandAugment magnitude must be in [0, 10], got {magnitude}")
        self.num_ops, self.magnitude, self.fill, self.ops = num_ops, float(magnitude), fill, tuple(ops)

    def apply_op(self, x: Tensor, op: str, m: float) -> Tensor:
        """Apply ``op`` at magnitude fraction ``m`` in [0, 1]."""
        h, w = x.shape[-2:]
        if op == "identity":
            return x
        if op == "autocontrast":
            return autocontrast(x)
        if op in ("brightness", "color", "contrast", "sharpness"):
            fn = {"brightness": brightness, "color": color, "contrast": contrast, "sharpness": sharpness}[op]
            return fn(x, 1.0 + _signed(0.9 * m))
        if op == "posterize":
            return posterize(x, 8 - round(4 * m))
        if op == "solarize":
            return solarize(x, 1.0 - m)
        if op == "rotate":
            return rotate(x, _signed(30.0 * m), self.fill)
        if op == "shear_x":
            return shear_x(x, _signed(0.3 * m), self.fill)
        if op == "shear_y":
            return shear_y(x, _signed(0.3 * m), self.fill)
        if op == "translate_x":
            return translate(x, _signed(0.45 * m * w), 0.0, self.fill)
        if op == "translate_y":
            return translate(x, 0.0, _signed(0.45 * m * h), self.fill)
        raise VitPruneError(f"unknown RandAugment op {op!r}")

    def __call__(self, x: Tensor) -> Tensor:
        m = self.magnitude / 10.0
        for _ in range(self.num_ops):
            op = self.ops[int(torch.randint(0, len(self.ops), ()))]
            x = self.apply_op(x, op, m)
        return x


def parse_randaugment(spec: str | None) -> RandAugment | None:
    """``"rand-m9-n2"`` (timm's notation) -> ``RandAugment(num_ops=2, magnitude=9)``; None/"" -> None."""
    if not spec or spec == "none":
        return None
    parts = spec.split("-")
    if parts[0] != "rand":
        raise VitPruneError(f"RandAugment spec must look like 'rand-m9-n2', got {spec!r}")
    kwargs = {"num_ops": 2, "magnitude": 9.0}
    for part in parts[1:]:
        key, val = part[:1], part[1:]
        try:
            if key == "m":
                kwargs["magnitude"] = float(val)
            elif key == "n":
                kwargs["num_ops"] = int(val)
            else:
                raise ValueError
        except ValueError:
            raise VitPruneError(f"bad RandAugment spec part {part!r} in {spec!r}") from None
    return RandAugment(**kwargs)


def build_train_transform(
    img_size: int,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    scale: tuple[float, float] | None = (0.08, 1.0),
    crop_padding: int = 0,
    hflip: float = 0.5,
    randaugment: str | None = "rand-m9-n2",
    interpolation: str = "bilinear",
) -> Compose:
    """The per-sample training pipeline: [PIL -> tensor] -> crop -> flip -> RandAugment -> [normalise].

    ``scale=None`` with ``crop_padding > 0`` uses a padded random crop instead of RandomResizedCrop; both
    ``None``/``0`` only resize. ``mean``/``std`` None skips normalisation (e.g. when the dataset normalises, as
    :class:`~vitprune.data.fashion_mnist.FashionMNIST` does).
    """
    steps: list[Callable] = [_ensure_tensor]
    if scale is not None:
        steps.append(RandomResizedCrop(img_size, scale=scale, interpolation=interpolation))
    elif crop_padding > 0:
        steps += [_Resize(img_size, interpolation), RandomCrop(img_size, crop_padding)]
    else:
        steps.append(_Resize(img_size, interpolation))
    if hflip > 0:
        steps.append(RandomHorizontalFlip(hflip))
    ra = parse_randaugment(randaugment)
    if ra is not None:
        steps.append(ra)
    if mean is not None and std is not None:
        steps.append(Normalize(mean, std))
    return Compose(steps)


def _ensure_tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else to_tensor(x)


class _Resize:
    def __init__(self, size: int, interpolation: str) -> None:
        self.size, self.interpolation = (size, size), interpolation

    def __call__(self, x: Tensor) -> Tensor:
        return resize(x, self.size, self.interpolation)


# -------------------------------------------------------------------------------------------- mixup / cutmix
def one_hot(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A box of area ``(1 - lam) H W`` centred uniformly at random, clipped to the image (Yun et al. 2019)."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy = int(torch.randint(0, height, ()))
    cx = int(torch.randint(0, width, ()))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return y0, y1, x0, x1


class MixupCutmix:
    """Batch-level mixup (Zhang et al. 2018) / cutmix (Yun et al. 2019) producing soft targets.

    With probability ``prob`` a batch is mixed with its reversed order (as timm does); when both are enabled
    cutmix is chosen with probability ``switch_prob``. Mixup: ``x = lam x + (1 - lam) x_rev``; cutmix pastes a
    box of ``x_rev`` and sets ``lam`` to the exact unpasted area fraction. Targets:
    ``lam * onehot(y) + (1 - lam) * onehot(y_rev)``.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.0,
    ) -> None:
        if num_classes <= 0:
            raise VitPruneError("mixup/cutmix needs the number of classes")
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise VitPruneError("mixup/cutmix alpha must be non-negative")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        targets = y.float() if y.ndim == 2 else one_hot(y, self.num_classes, self.label_smoothing).to(x.device)
        if not self.enabled or _rand() >= self.prob:
            return x, targets
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or _rand() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        x_rev = x.flip(0)
        if use_cutmix:
            h, w = x.shape[-2:]
            y0, y1, x0, x1 = cutmix_box(h, w, lam)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x_rev[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
        else:
            x = lam * x + (1.0 - lam) * x_rev
        return x, lam * targets + (1.0 - lam) * targets.flip(0)


class MixupCollate:
    """``default_collate`` followed by :class:`MixupCutmix` (for a DataLoader's ``collate_fn``)."""

    def __init__(self, mix: MixupCutmix) -> None:
        self.mix = mix

    def __call__(self, batch):
        x, y = default_collate(batch)
        return self.mix(x, y)
