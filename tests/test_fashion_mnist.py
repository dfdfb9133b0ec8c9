"""Fashion-MNIST IDX reader: synthetic files for the format, the Debian package's files when installed."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from vitprune.data.fashion_mnist import CLASSES, DEFAULT_ROOT, FILES, MEAN, STD, FashionMNIST, read_idx
from vitprune.errors import VitPruneError


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_root(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 5)):
        img_name, lbl_name = FILES[split]
        _write_idx(tmp_path / img_name, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / lbl_name, np.arange(n) % 10)
    return tmp_path


def test_read_idx_round_trip_and_errors(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    raw = tmp_path / "raw"
    raw.write_bytes(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 5) + bytes(range(5)))
    assert read_idx(raw).tolist() == [0, 1, 2, 3, 4]
    (tmp_path / "short").write_bytes(struct.pack(">HBB", 0, 0x08, 1) + struct.pack(">I", 9) + b"\x00")
    with pytest.raises(VitPruneError, match="header says 9"):
        read_idx(tmp_path / "short")
    (tmp_path / "float").write_bytes(struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">I", 0))
    with pytest.raises(VitPruneError, match="unsigned-byte"):
        read_idx(tmp_path / "float")


def test_dataset_items_are_normalised_tensors(fake_root):
    ds = FashionMNIST(fake_root, "train")
    assert len(ds) == 12 and ds.classes == CLASSES and len(CLASSES) == 10
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3
    raw = torch.from_numpy(read_idx(fake_root / FILES["train"][0])[3].astype(np.float32)) / 255
    assert torch.allclose(x[0], (raw - MEAN) / STD)
    xs, ys = ds.tensors()
    assert xs.shape == (12, 1, 28, 28) and torch.allclose(xs[3], x) and ys.tolist() == list(np.arange(12) % 10)
    assert len(FashionMNIST(fake_root, "test", limit=3)) == 3


def test_transform_sees_unit_range_then_output_is_normalised(fake_root):
    seen = {}

    def tf(x):
        seen["range"] = (float(x.min()), float(x.max()))
        return torch.ones_like(x)

    x, _ = FashionMNIST(fake_root, "test", transform=tf)[0]
    assert seen["range"][0] >= 0.0 and seen["range"][1] <= 1.0
    assert torch.allclose(x, torch.full_like(x, (1 - MEAN) / STD))
    assert torch.equal(FashionMNIST(fake_root, "test", normalize=False)[0][0] * 255 % 1, torch.zeros(1, 28, 28))


def test_missing_data_errors_say_how_to_install(tmp_path):
    with pytest.raises(VitPruneError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "nowhere")
    with pytest.raises(VitPruneError, match=r"file missing.*apt-get install"):
        FashionMNIST(tmp_path)
    with pytest.raises(VitPruneError, match="split"):
        FashionMNIST(tmp_path, split="val")


@pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_package():
    test = FashionMNIST(split="test")
    assert len(test) == 10_000
    assert torch.bincount(test.targets).tolist() == [1000] * 10
    train = FashionMNIST(split="train", limit=2000)
    xs, _ = train.tensors()
    assert abs(xs.mean().item()) < 0.1 and abs(xs.std().item() - 1) < 0.1


@pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_cli_train_small_run(tmp_path):
    import json

    from vitprune.cli.main import main

    n = torch.get_num_threads()
    try:
        args = ["train", "--out", str(tmp_path / "run"), "--limit", "256", "--test-limit", "200", "--steps", "4"]
        args += ["--batch-size", "64", "--depth", "1", "--threads", "1", "--no-progress", "--ckpt-every", "2"]
        assert main(args) == 0
    finally:
        torch.set_num_threads(n)
    meta = json.loads((tmp_path / "run" / "model" / "meta.json").read_text())
    assert meta["test"]["n"] == 200 and meta["steps"] == 4 and meta["machine"]["cores"] >= 1
    assert meta["command"].startswith("vitprune train") and "loadavg_during" in meta
    assert meta["train_cpu_time_s"] > 0


def test_shipped_default_model_is_small_documented_and_accurate():
    from vitprune.training.default_model import default_model_dir, default_model_meta, load_default_model

    model = load_default_model()
    assert not model.training and model.config.in_chans == 1 and model.config.num_classes == 10
    assert model.config.blocks[0].heads >= 4 and model.config.embed_dim % 8 == 0
    assert (default_model_dir() / "model.safetensors").stat().st_size < 2_000_000
    meta = default_model_meta()
    assert meta["command"].startswith("vitprune train") and meta["test"]["n"] == 10_000
    assert meta["test"]["top1"] >= 88.0
    assert {"cpu", "cores", "torch"} <= set(meta["machine"]) and "loadavg_during" in meta
    if DEFAULT_ROOT.is_dir():  # re-measure on a slice of the test set
        x, y = FashionMNIST(split="test", limit=1000).tensors()
        with torch.inference_mode():
            acc = (model(x).argmax(1) == y).float().mean().item() * 100
        assert acc > 85.0
