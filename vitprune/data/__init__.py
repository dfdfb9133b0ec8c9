"""Datasets, preprocessing and loaders."""

from vitprune.data.cached import CachedImageFolder, CachedTrainTransform
from vitprune.data.imagefolder import ImageFolderDataset, make_loader, read_classes_file
from vitprune.data.transforms import build_eval_transform, eval_transform_for

__all__ = [
    "CachedImageFolder",
    "CachedTrainTransform",
    "ImageFolderDataset",
    "build_eval_transform",
    "eval_transform_for",
    "make_loader",
    "read_classes_file",
]
