"""An image folder decoded once into a uint8 tensor file, and training augmentation on those tensors.

:class:`CachedImageFolder` lists ``root/<class>/<image>`` exactly like
:class:`~vitprune.data.imagefolder.ImageFolderDataset` (same files, order and labels), decodes every image once
(RGB) into one ``N x 3 x H x W`` uint8 tensor and saves it with safetensors under ``cache_dir``, keyed by a
fingerprint of the file list, labels, file sizes and modification times: a later run loads the tensor file
instead of decoding JPEGs, and any added, removed, renamed, resized or touched file rebuilds it. Tiny-ImageNet
(64 x 64) is 245 MB for its 20,000 training images.

:class:`CachedTrainTransform` is the recovery/fine-tuning augmentation of
:func:`~vitprune.training.augment.build_train_transform` without RandAugment (random resized crop, horizontal
flip, normalisation) on those uint8 tensors. It draws the same random numbers in the same order from torch's
global generator as the PIL path (crop parameters, then the flip), so with the same seed it yields the same
crops; the outputs agree to float rounding (about 1e-5: the flip is applied to the small crop before resizing
and ``/255`` is folded into the normalisation, which saves two full-size passes per image).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset

from vitprune.data.imagefolder import IMG_EXTENSIONS, ImageFolderDataset
from vitprune.errors import VitPruneError
from vitprune.utils.fs import atomic_path

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$VITPRUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/vitprune/images`` (``~/.cache/vitprune/images``)."""
    if os.environ.get("VITPRUNE_CACHE_DIR"):
        return Path(os.environ["VITPRUNE_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vitprune" / "images"


def folder_fingerprint(root: Path, samples: Sequence[tuple[str, int]], size: tuple[int, int] | None) -> str:
    """sha256 of the cache version, decode size and every ``(relative path, label, bytes, mtime_ns)``."""
    h = hashlib.sha256(f"vitprune-image-cache-{CACHE_VERSION};size={size}\n".encode())
    for path, label in samples:
        st = os.stat(path)
        rel = Path(path).relative_to(root).as_posix()
        h.update(f"{rel}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def decode_image(path: str, size: tuple[int, int] | None) -> np.ndarray:
    """``H x W x 3`` uint8 RGB (resized bilinearly to ``size`` = (h, w) when given and different)."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), resample=Image.Resampling.BILINEAR)
            return np.array(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise VitPruneError(f"cannot read image {path}: {exc}") from None


class CachedImageFolder(Dataset):
    """``root/<class>/**/<image>`` -> ``(transform(uint8 C x H x W tensor), label)``, decoded once (module doc).

    ``size`` (an int or ``(h, w)``) resizes every image on decode; without it all images must have the size of
    the first one (Tiny-ImageNet: 64 x 64). ``transform=None`` returns the uint8 tensor itself. After
    construction ``built`` tells whether this call decoded the images (False: loaded from ``cache_path``).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Tensor], Any] | None = None,
        classes_file: str | os.PathLike | None = None,
        limit_per_class: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        size: int | tuple[int, int] | None = None,
        extensions: tuple[str, ...] = IMG_EXTENSIONS,
        progress: bool = False,
    ) -> None:
        listing = ImageFolderDataset(root, None, classes_file, limit_per_class, extensions)
        self.root = listing.root.resolve()
        self.classes, self.class_to_idx = listing.classes, listing.class_to_idx
        self.samples = listing.samples
        self.transform = transform
        self.size = (size, size) if isinstance(size, int) else (tuple(int(s) for s in size) if size else None)
        self.fingerprint = folder_fingerprint(listing.root, self.samples, self.size)
        directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        listing_key = f"{self.root}|{classes_file}|{limit_per_class}|{self.size}|{extensions}"
        key = hashlib.sha256(listing_key.encode()).hexdigest()[:8]  # one live cache file per listing
        self._prefix = f"{self.root.name}-{key}-"
        self.cache_path = directory / f"{self._prefix}{self.fingerprint[:20]}.safetensors"
        self.built = False
        loaded = self._load()
        if loaded is None:
            loaded = self._build(progress)
            self.built = True
        self.images, self.labels = loaded

    # ------------------------------------------------------------------------------------------- cache
    def _load(self) -> tuple[Tensor, Tensor] | None:
        if not self.cache_path.is_file():
            return None
        try:
            with safe_open(str(self.cache_path), framework="pt") as f:
                meta = f.metadata() or {}
            if meta.get("fingerprint") != self.fingerprint:
                return None
            tensors = load_file(str(self.cache_path))
        except Exception:  # a torn or foreign file: rebuild it
            return None
        images, labels = tensors.get("images"), tensors.get("labels")
        if images is None or labels is None or len(images) != len(self.samples):
            return None
        return images, labels

    def _build(self, progress: bool) -> tuple[Tensor, Tensor]:
        from tqdm.auto import tqdm

        size = self.size
        first = decode_image(self.samples[0][0], size)
        h, w = first.shape[:2]
        images = torch.empty((len(self.samples), 3, h, w), dtype=torch.uint8)
        for i, (path, _) in enumerate(tqdm(self.samples, desc="decode", disable=not progress)):
            arr = first if i == 0 else decode_image(path, size)
            if arr.shape[:2] != (h, w):
                raise VitPruneError(
                    f"{path} is {arr.shape[1]}x{arr.shape[0]}, the first image {w}x{h}: give size= to resize on decode"
                )
            images[i] = torch.from_numpy(arr).permute(2, 0, 1)
        labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        meta = {
            "fingerprint": self.fingerprint,
            "root": str(self.root),
            "classes": json.dumps(self.classes),
            "version": str(CACHE_VERSION),
        }
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.cache_path, overwrite=True) as tmp:
            save_file({"images": images, "labels": labels}, str(tmp), metadata=meta)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # safetensors writes a private file; the cache may be shared
        for old in self.cache_path.parent.glob(f"{self._prefix}*.safetensors"):  # stale versions of this folder
            if old != self.cache_path:
                old.unlink(missing_ok=True)
        return images, labels

    # ----------------------------------------------------------------------------------------- dataset
    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.images[index]
        label = int(self.labels[index])
        return (self.transform(img) if self.transform is not None else img), label


def _rand() -> float:
    return float(torch.rand(()))


class CachedTrainTransform:
    """uint8 ``(C, H, W)`` -> random resized crop to ``img_size``, flip, ``(x / 255 - mean) / std`` (float32).

    The random draws equal those of ``build_train_transform(img_size, mean, std, scale, hflip=hflip,
    randaugment=None, interpolation=...)`` on the decoded image (see the module doc).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int],
        scale: tuple[float, float] | None = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        from vitprune.training.augment import RandomResizedCrop

        self.size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.crop = (
            RandomResizedCrop(self.size, scale=scale, ratio=ratio, interpolation=interpolation) if scale else None
        )
        self.hflip, self.interpolation = float(hflip), interpolation
        mean = (0.0, 0.0, 0.0) if mean is None else mean
        std = (1.0, 1.0, 1.0) if std is None else std
        m = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * s), m / s  # (x / 255 - m) / s = x * scale - shift

    def __call__(self, img: Tensor) -> Tensor:
        if img.dtype != torch.uint8 or img.ndim != 3:
            raise VitPruneError(f"CachedTrainTransform expects a uint8 (C, H, W) tensor, got {img.dtype} {img.ndim}-D")
        if self.crop is not None:
            top, left, h, w = self.crop.get_params(img.shape[-2], img.shape[-1])
            img = img[:, top : top + h, left : left + w]
        if self.hflip > 0 and _rand() < self.hflip:
            img = img.flip(-1)  # flip commutes with resizing; on the crop it is cheaper
        x = img.float()
        if tuple(x.shape[-2:]) != self.size:
            mode = self.interpolation
            kwargs = {"align_corners": False, "antialias": True} if mode in ("bilinear", "bicubic") else {}
            x = F.interpolate(x.unsqueeze(0), size=self.size, mode=mode, **kwargs).squeeze(0)
            if mode == "bicubic":
                x = x.clamp_(0.0, 255.0)
        return x.mul_(self._scale).sub_(self._shift)
