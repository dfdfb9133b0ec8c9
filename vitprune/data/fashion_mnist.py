"""Fashion-MNIST from its IDX ``.gz`` files (Debian package ``dataset-fashion-mnist``, MIT licence).

``FashionMNIST(root, split)[i]`` is ``(image, label)``: ``image`` a float tensor ``(1, 28, 28)`` normalised
with the training-set mean and standard deviation. An optional ``transform`` (for example
:func:`vitprune.training.augment.build_train_transform`) is applied to the ``[0, 1]`` tensor *before* the
normalisation, so augmentations see the usual pixel range.
"""

from __future__ import annotations

import gzip
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vitprune.errors import VitPruneError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Statistics of the 60,000 training images in [0, 1].
MEAN = 0.2860
STD = 0.3530
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_INSTALL_HINT = "install it with `apt-get install dataset-fashion-mnist` or pass root=DIR"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes into an array of its stated shape."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise VitPruneError(f"cannot read IDX file {p}: {exc}") from None
    if len(data) < 4:
        raise VitPruneError(f"not an IDX file (too short): {p}")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise VitPruneError(f"not an unsigned-byte IDX file: {p}")
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(shape)) if shape else 0
    if len(data) - header != count:
        raise VitPruneError(f"IDX file {p} holds {len(data) - header} bytes, its header says {count}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class FashionMNIST(Dataset):
    """The 60,000 training or 10,000 test images of Fashion-MNIST, with labels and class names."""

    classes = CLASSES
    mean = MEAN
    std = STD

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        transform: Callable[[Tensor], Tensor] | None = None,
        normalize: bool = True,
        limit: int | None = None,
    ) -> None:
        if split not in FILES:
            raise VitPruneError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        self.root = Path(root) if root is not None else DEFAULT_ROOT
        if not self.root.is_dir():
            raise VitPruneError(f"Fashion-MNIST not found at {self.root}: {_INSTALL_HINT}")
        img_file, lbl_file = (self.root / name for name in FILES[split])
        for f in (img_file, lbl_file):
            if not f.is_file():
                raise VitPruneError(f"Fashion-MNIST file missing: {f}: {_INSTALL_HINT}")
        images = read_idx(img_file)
        labels = read_idx(lbl_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise VitPruneError(f"Fashion-MNIST files in {self.root} have inconsistent shapes")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.split = split
        self.images = torch.from_numpy(images.copy())  # (N, 28, 28) uint8
        self.targets = torch.from_numpy(labels.astype(np.int64))
        self.transform = transform
        self.normalize = normalize

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.images[index].unsqueeze(0).float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        if self.normalize:
            x = (x - MEAN) / STD
        return x, int(self.targets[index])

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All images as one normalised float tensor ``(N, 1, 28, 28)`` and the labels (no transform)."""
        x = self.images.unsqueeze(1).float().div_(255.0)
        if self.normalize:
            x = (x - MEAN) / STD
        return x, self.targets.clone()
