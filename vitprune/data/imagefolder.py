"""Image-folder datasets (one sub-folder per class) and the DataLoader factory every command uses."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from vitprune.errors import VitPruneError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def read_classes_file(path: str | os.PathLike) -> list[str]:
    """Line ``i`` is the class name of output ``i``; trailing blank lines are ignored."""
    p = Path(path)
    if not p.is_file():
        raise VitPruneError(f"classes file not found: {p}")
    names = [line.strip() for line in p.read_text().splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise VitPruneError(f"classes file is empty: {p}")
    if "" in names:
        raise VitPruneError(f"classes file has a blank line at line {names.index('') + 1}: {p}")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise VitPruneError(f"classes file lists {name!r} twice: {p}")
        seen.add(name)
    return names


def _image_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Image files under ``folder`` (recursively, symlinks followed) in a deterministic sorted order."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(extensions))
    return sorted(files, key=lambda f: f.relative_to(folder).as_posix())


class ImageFolderDataset(Dataset):
    """``root/<class>/**/<image>`` -> ``(transform(image), label)``.

    Labels follow ``classes_file`` (line ``i`` names output ``i``; every folder must be listed there) or the
    sorted folder names. Files are in sorted order; ``limit_per_class`` keeps the first N of each class.
    ``transform`` is any callable taking a ``PIL.Image`` (RGB); an unreadable file raises
    :class:`VitPruneError` naming it when it is loaded.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None,
        classes_file: str | os.PathLike | None = None,
        limit_per_class: int | None = None,
        extensions: tuple[str, ...] = IMG_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise VitPruneError(f"dataset folder not found: {self.root}")
        if limit_per_class is not None and limit_per_class <= 0:
            raise VitPruneError(f"limit_per_class must be positive, got {limit_per_class}")
        self.transform = transform
        folders = sorted(d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if classes_file is not None:
            self.classes = read_classes_file(classes_file)
            index = {name: i for i, name in enumerate(self.classes)}
            for name in folders:
                if name not in index:
                    raise VitPruneError(f"class folder {name!r} in {self.root} is not listed in {classes_file}")
        else:
            self.classes = folders
        self.classes_file = None if classes_file is None else str(classes_file)
        self.num_folders = len(folders)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        exts = tuple(e.lower() for e in extensions)
        self.samples: list[tuple[str, int]] = []
        for name in folders:
            files = _image_files(self.root / name, exts)
            if limit_per_class is not None:
                files = files[:limit_per_class]
            self.samples.extend((str(f), self.class_to_idx[name]) for f in files)
        if not self.samples:
            raise VitPruneError(f"no images found in {self.root} (expected {self.root}/<class>/<image>)")

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_count_text(self) -> str:
        """Where :attr:`num_classes` comes from, for messages: ``the classes file F lists 200 classes (DIR has 4
        class folders)`` or ``DIR has 4 class folders``."""
        if self.classes_file is not None:
            return (
                f"the classes file {self.classes_file} lists {self.num_classes} classes "
                f"({self.root} has {self.num_folders} class folders)"
            )
        return f"{self.root} has {self.num_folders} class folders"

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")  # forces a full decode: truncated files fail here
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise VitPruneError(f"cannot read image {path}: {exc}") from None

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.load_image(index)
        label = self.samples[index][1]
        return (self.transform(img) if self.transform is not None else img), label


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``w`` takes indices ``r, r + w, ...`` in order, without padding: every sample is seen once."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def _seed_worker(worker_id: int) -> None:
    """Seed numpy/random in a worker from torch's per-worker seed (itself derived from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int = 0,
    shuffle: bool = False,
    distributed: bool = False,
    drop_last: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader with reproducible order (``seed``) and persistent workers when ``workers > 0``.

    With ``distributed=True`` and an initialised process group: a ``DistributedSampler`` when shuffling
    (call ``loader.sampler.set_epoch(epoch)`` each epoch), else a :class:`ShardSampler` so that evaluation
    sees each sample exactly once across ranks.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise VitPruneError(f"batch size must be a positive integer, got {batch_size!r}")
    if not isinstance(workers, int) or workers < 0:
        raise VitPruneError(f"workers must be a non-negative integer, got {workers!r}")
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise VitPruneError("dataset is empty")
    generator = torch.Generator().manual_seed(seed)
    sampler: Sampler | None = None
    if distributed and dist.is_available() and dist.is_initialized():
        if shuffle:
            sampler = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=drop_last)
        else:
            sampler = ShardSampler(len(dataset), dist.get_rank(), dist.get_world_size())  # type: ignore[arg-type]
        shuffle = False
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_seed_worker if workers > 0 else None,
        generator=generator,
    )
