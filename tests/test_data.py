"""Preprocessing (checked against direct PIL/numpy arithmetic), image folders and loaders."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from vitprune.data import ImageFolderDataset, build_eval_transform, eval_transform_for, make_loader
from vitprune.data.imagefolder import ShardSampler
from vitprune.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from vitprune.errors import VitPruneError


def _image(w=64, h=64, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    return img.convert(mode) if mode != "RGB" else img


# ---------------------------------------------------------------------------------------------- transforms


def test_shared_preset_is_square_bilinear_256_crop_224_half_normalised():
    img = _image()
    x = build_eval_transform("shared")(img)
    big = np.asarray(img.resize((256, 256), Image.Resampling.BILINEAR), dtype=np.float64)
    ref = (big[16:240, 16:240] / 255.0 - 0.5) / 0.5
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert np.allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-6)


def test_imagenet_preset_resizes_shorter_side_bicubic_and_crops_centre():
    img = _image(w=100, h=80)  # shorter side 80 -> 256, longer int(256 * 100 / 80) = 320
    x = build_eval_transform("imagenet")(img)
    big = np.asarray(img.resize((320, 256), Image.Resampling.BICUBIC), dtype=np.float64)
    crop = big[16:240, 48:272] / 255.0  # top = round((256 - 224) / 2), left = round((320 - 224) / 2)
    ref = (crop - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-5)


def test_constant_image_gives_closed_form_values_and_grayscale_becomes_rgb():
    img = Image.new("L", (40, 30), color=51)  # 51 / 255 = 0.2
    x = build_eval_transform("inception", img_size=32)(img)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x, torch.full_like(x, (0.2 - 0.5) / 0.5), atol=1e-6)


def test_overrides_and_derived_resize():
    t = build_eval_transform("shared", img_size=32)
    assert t.resize == (36, 36) and t.img_size == 32  # int(32 / 0.875)
    t = build_eval_transform("imagenet", img_size=64, resize=(64, 80), interpolation="nearest", mean=(0, 0, 0))
    assert t.resize == (64, 80) and t.interpolation == "nearest" and t.mean == (0.0, 0.0, 0.0)
    assert t(_image(w=10, h=7)).shape == (3, 64, 64)
    small = build_eval_transform("shared", img_size=32, resize=20)  # smaller than the crop: zero padding
    x = small(Image.new("RGB", (20, 20), color=(255, 255, 255)))
    assert x.shape == (3, 32, 32) and x[0, 0, 0] == -1.0 and x[0, 16, 16] == 1.0
    restored = pickle.loads(pickle.dumps(t))
    assert torch.equal(restored(_image()), t(_image()))


def test_eval_transform_for_model_configs():
    assert eval_transform_for(None).resize == (256, 256)
    t = eval_transform_for({"preset": "imagenet"}, img_size=None)
    assert t.resize == 256 and t.interpolation == "bicubic"
    t = eval_transform_for({"preset": "imagenet", "resize": [32, 32], "img_size": 32}, interpolation="bilinear")
    assert t.resize == (32, 32) and t.interpolation == "bilinear"
    with pytest.raises(VitPruneError, match="unknown preprocessing keys in model config: crop"):
        eval_transform_for({"crop": 1})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"preset": "nope"}, "unknown preprocessing preset 'nope'"),
        ({"interpolation": "cubic"}, "unknown interpolation 'cubic'"),
        ({"mean": (0.5, 0.5)}, "mean and std need 3 values"),
        ({"std": (0.5, 0.0, 0.5)}, "std values must be positive"),
        ({"img_size": 0}, "image size must be positive"),
        ({"resize": (1, 2, 3)}, "resize must be an int or"),
    ],
)
def test_bad_transform_arguments(kwargs, match):
    with pytest.raises(VitPruneError, match=match):
        build_eval_transform(**kwargs)


# ------------------------------------------------------------------------------------------- image folders


def _tree(root, spec):
    """spec: {class: n_images}; images are 8x8 PNG/JPEG with pixel value = image index."""
    for cls, n in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            ext = ".png" if i % 2 else ".JPEG"
            Image.new("RGB", (8, 8), color=(i * 10, 0, 0)).save(root / cls / f"img_{i:02d}{ext}")
    return root


def _raw(img):
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())


def test_folder_order_labels_limit_and_nested_files(tmp_path):
    root = _tree(tmp_path / "d", {"b": 3, "a": 2, "c": 1})
    (root / "a" / "notes.txt").write_text("not an image")  # skipped by extension
    (root / "c" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(root / "c" / "sub" / "z.png")
    ds = ImageFolderDataset(root, transform=_raw)
    assert ds.classes == ["a", "b", "c"] and ds.num_classes == 3
    names = [(p.split("/d/")[1], y) for p, y in ds.samples]
    assert names == [
        ("a/img_00.JPEG", 0),
        ("a/img_01.png", 0),
        ("b/img_00.JPEG", 1),
        ("b/img_01.png", 1),
        ("b/img_02.JPEG", 1),
        ("c/img_00.JPEG", 2),
        ("c/sub/z.png", 2),
    ]
    assert ImageFolderDataset(root, transform=_raw).samples == ds.samples  # deterministic
    x, y = ds[3]
    assert y == 1 and x.shape == (8, 8, 3) and int(x[0, 0, 0]) == 10
    limited = ImageFolderDataset(root, transform=None, limit_per_class=1)
    assert [y for _, y in limited.samples] == [0, 1, 2]
    assert isinstance(limited[0][0], Image.Image) and limited[0][0].mode == "RGB"


def test_classes_file_maps_folders_to_outputs(tmp_path):
    root = _tree(tmp_path / "d", {"a": 1, "b": 1})
    classes = tmp_path / "classes.txt"
    classes.write_text("z\nb\na\n\n")
    ds = ImageFolderDataset(root, transform=_raw, classes_file=classes)
    assert ds.classes == ["z", "b", "a"] and ds.targets == [2, 1]
    classes.write_text("b\nz\n")
    with pytest.raises(VitPruneError, match=r"class folder 'a' .* is not listed in"):
        ImageFolderDataset(root, transform=_raw, classes_file=classes)
    classes.write_text("a\nb\na\n")
    with pytest.raises(VitPruneError, match="lists 'a' twice"):
        ImageFolderDataset(root, transform=_raw, classes_file=classes)
    classes.write_text("a\n\nb\n")
    with pytest.raises(VitPruneError, match="blank line at line 2"):
        ImageFolderDataset(root, transform=_raw, classes_file=classes)
    with pytest.raises(VitPruneError, match="classes file not found"):
        ImageFolderDataset(root, transform=_raw, classes_file=tmp_path / "missing.txt")


def test_corrupt_image_empty_and_missing_folders(tmp_path):
    root = _tree(tmp_path / "d", {"a": 2})
    bad = root / "a" / "zz_bad.JPEG"
    bad.write_bytes(b"this is not a jpeg")
    ds = ImageFolderDataset(root, transform=_raw)
    assert len(ds) == 3  # listing does not open files
    ds[0]
    with pytest.raises(VitPruneError, match=r"cannot read image .*zz_bad\.JPEG") as info:
        ds[2]
    assert "\n" not in str(info.value)
    truncated = root / "a" / "zz_trunc.JPEG"
    truncated.write_bytes((root / "a" / "img_00.JPEG").read_bytes()[:40])
    with pytest.raises(VitPruneError, match=r"zz_trunc\.JPEG"):
        ImageFolderDataset(root, transform=_raw)[3]
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(VitPruneError, match="no images found"):
        ImageFolderDataset(tmp_path / "empty", transform=_raw)
    with pytest.raises(VitPruneError, match="dataset folder not found"):
        ImageFolderDataset(tmp_path / "nope", transform=_raw)
    with pytest.raises(VitPruneError, match="limit_per_class must be positive"):
        ImageFolderDataset(root, transform=_raw, limit_per_class=0)


# ------------------------------------------------------------------------------------------------- loaders


class _Range(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i


def _order(loader):
    return [int(i) for _, ys in loader for i in ys]


def test_make_loader_order_seed_and_drop_last():
    ds = _Range(10)
    assert _order(make_loader(ds, 4)) == list(range(10))
    a, b = _order(make_loader(ds, 4, shuffle=True, seed=1)), _order(make_loader(ds, 4, shuffle=True, seed=1))
    assert a == b and sorted(a) == list(range(10)) and a != list(range(10))
    assert a != _order(make_loader(ds, 4, shuffle=True, seed=2))
    assert len(_order(make_loader(ds, 4, drop_last=True))) == 8
    with pytest.raises(VitPruneError, match="batch size must be a positive integer"):
        make_loader(ds, 0)
    with pytest.raises(VitPruneError, match="dataset is empty"):
        make_loader(_Range(0), 2)


def test_make_loader_with_worker_is_persistent_and_same_order(tmp_path):
    root = _tree(tmp_path / "d", {"a": 3, "b": 2})
    ds = ImageFolderDataset(root, transform=build_eval_transform("shared", img_size=8))
    loader = make_loader(ds, 2, workers=1)
    assert loader.persistent_workers
    batches = list(loader)
    assert [int(y) for _, ys in batches for y in ys] == [0, 0, 0, 1, 1]
    assert batches[0][0].shape == (2, 3, 8, 8)


def test_shard_sampler_covers_every_index_once():
    shards = [list(ShardSampler(10, r, 3)) for r in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(ShardSampler(10, r, 3)) for r in range(3)] == [4, 3, 3]


def test_distributed_loader_in_a_single_process_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ds = _Range(7)
        eval_loader = make_loader(ds, 3, distributed=True)
        assert isinstance(eval_loader.sampler, ShardSampler) and _order(eval_loader) == list(range(7))
        train_loader = make_loader(ds, 3, shuffle=True, distributed=True, seed=5)
        assert isinstance(train_loader.sampler, torch.utils.data.DistributedSampler)
        assert sorted(_order(train_loader)) == list(range(7))
    finally:
        dist.destroy_process_group()
