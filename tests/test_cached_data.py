"""CachedImageFolder (decode once, fingerprinted safetensors cache) and CachedTrainTransform (tensor augmentation)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

import vitprune.data.cached as cached
from vitprune.data.cached import CachedImageFolder, CachedTrainTransform
from vitprune.data.imagefolder import ImageFolderDataset
from vitprune.errors import VitPruneError
from vitprune.training.augment import build_train_transform


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "train"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["n02", "n01", "n03"]):
        (root / name).mkdir(parents=True)
        for i in range(3):
            base = np.linspace(0, 255, 24)[None, :, None] * np.ones((24, 1, 3))
            arr = np.clip(base * (0.4 + 0.3 * c) + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{name}_{i}.JPEG", quality=90)
    (tmp_path / "classes.txt").write_text("n03\nn01\nn02\n")
    return root


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    real = cached.decode_image

    def counting(path, size):
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(cached, "decode_image", counting)
    return calls


def test_built_once_then_reused(folder, tmp_path, count_decodes):
    first = CachedImageFolder(folder, classes_file=tmp_path / "classes.txt", cache_dir=tmp_path / "cache")
    assert first.built and len(count_decodes) == 9 and first.cache_path.is_file()
    count_decodes.clear()
    second = CachedImageFolder(folder, classes_file=tmp_path / "classes.txt", cache_dir=tmp_path / "cache")
    assert not second.built and count_decodes == []
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


def test_a_changed_file_invalidates_the_cache(folder, tmp_path, count_decodes):
    a = CachedImageFolder(folder, cache_dir=tmp_path / "cache")
    victim = folder / "n01" / "n01_1.JPEG"
    Image.fromarray(np.zeros((24, 24, 3), dtype=np.uint8)).save(victim)
    st = os.stat(victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    count_decodes.clear()
    b = CachedImageFolder(folder, cache_dir=tmp_path / "cache")
    assert b.built and len(count_decodes) == 9 and b.fingerprint != a.fingerprint
    assert int(b.images[a.samples.index((str(victim), 0))].max()) == 0
    assert list((tmp_path / "cache").glob("*.safetensors")) == [b.cache_path]  # the stale file is gone
    (folder / "n03" / "n03_0.JPEG").unlink()
    assert len(CachedImageFolder(folder, cache_dir=tmp_path / "cache")) == 8


def test_same_files_labels_and_pixels_as_image_folder(folder, tmp_path):
    ref = ImageFolderDataset(folder, None, tmp_path / "classes.txt", limit_per_class=2)
    ds = CachedImageFolder(folder, classes_file=tmp_path / "classes.txt", limit_per_class=2, cache_dir=tmp_path / "c")
    assert ds.samples == ref.samples and ds.classes == ref.classes == ["n03", "n01", "n02"]
    assert ds.targets == ref.targets and ds.num_classes == 3
    for i in range(len(ref)):
        img, label = ds[i]
        pil, ref_label = ref[i]
        assert label == ref_label and img.dtype == torch.uint8
        assert torch.equal(img, torch.from_numpy(np.array(pil)).permute(2, 0, 1))


def test_sizes_must_agree_unless_resized_on_decode(folder, tmp_path):
    Image.fromarray(np.zeros((30, 20, 3), dtype=np.uint8)).save(folder / "n02" / "odd.png")
    with pytest.raises(VitPruneError, match="size="):
        CachedImageFolder(folder, cache_dir=tmp_path / "cache")
    ds = CachedImageFolder(folder, cache_dir=tmp_path / "cache", size=16)
    assert ds.images.shape == (10, 3, 16, 16)


def test_tensor_augmentation_matches_the_pil_path(folder, tmp_path):
    mean, std = (0.5, 0.4, 0.3), (0.5, 0.25, 0.2)
    pil_tf = build_train_transform(56, mean=mean, std=std, scale=(0.25, 1.0), hflip=0.5, randaugment=None)
    ref = ImageFolderDataset(folder, pil_tf)
    ds = CachedImageFolder(
        folder, CachedTrainTransform(56, (0.25, 1.0), hflip=0.5, mean=mean, std=std), cache_dir=tmp_path
    )
    outs = {}
    for name, data in (("pil", ref), ("tensor", ds)):
        torch.manual_seed(3)
        outs[name] = torch.stack([data[i % len(data)][0] for i in range(36)])  # 4 random draws per image
    a, b = outs["pil"], outs["tensor"]
    assert a.shape == b.shape == (36, 3, 56, 56) and b.dtype == torch.float32
    assert (a - b).abs().max().item() < 1e-4  # the same crops and flips: equal up to float rounding
    assert abs(a.mean().item() - b.mean().item()) < 1e-5
    lo = (0 - torch.tensor(mean)) / torch.tensor(std)
    hi = (1 - torch.tensor(mean)) / torch.tensor(std)
    per_channel = b.transpose(0, 1).reshape(3, -1)
    assert bool((per_channel.amin(1) >= lo - 1e-5).all() and (per_channel.amax(1) <= hi + 1e-5).all())
    assert not torch.equal(b[0], b[9])  # the same image, another random crop


def test_tensor_augmentation_rejects_float_input():
    with pytest.raises(VitPruneError, match="uint8"):
        CachedTrainTransform(8)(torch.rand(3, 8, 8))


def test_recovery_loader_with_the_cache_gives_the_plain_loaders_batches(folder, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import _recovery as R

    kw = {"batch_size": 4, "img_size": 32, "seed": 1}
    plain = R.build_train_loader(folder, tmp_path / "classes.txt", cache=False, **kw)
    fast = R.build_train_loader(folder, tmp_path / "classes.txt", cache=True, cache_dir=tmp_path / "c", **kw)
    assert isinstance(fast.dataset, CachedImageFolder) and fast.dataset.augment["decoded_once"]
    torch.manual_seed(0)
    a = list(plain)
    torch.manual_seed(0)
    b = list(fast)
    assert len(a) == len(b) == 2
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(ya, yb) and (xa - xb).abs().max().item() < 1e-4
