"""Bad input and faults (issue #16): every command answers bad input with ONE ``error:`` line, exit status 2,
no traceback, and leaves the file system exactly as it was; a write that fails midway keeps the previous output.

Most cases run in-process through :func:`vitprune.cli.main.main` (fast); a handful run as real subprocesses
(they also see warnings and argparse's own output). The ``prune`` commands' cases live with those commands.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from vitprune.cli.main import main
from vitprune.errors import VitPruneError
from vitprune.models import ViT, ViTConfig, save
from vitprune.models.presets import get_preset

REPO = Path(__file__).resolve().parents[1]


class Evil:
    """Unpickling this would run a shell command: loaders must refuse it (it is never executed here)."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/vitprune-pwned",))


def _images(root: Path, classes: list[str], per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@dataclass
class World:
    """Inputs shared by every case (built once); cases add their own files under their ``case`` folder."""

    root: Path
    model: Path  # vitprune dir, 10 classes, 32 px, patch 8
    model2: Path  # 2 classes
    data: Path  # 2 class folders x 2 images
    data_run: Path  # the data of the finished run
    run: Path  # a finished `finetune` run (checkpoint.pt, summary.json, model/, fingerprint.json)
    timm: Path  # deit_tiny layout .pth (5 classes, 32 px)
    afile: Path  # a plain file (a parent that is a file)
    lut: Path  # a valid latency table


def _finetune_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune", str(model), "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2",
        "--no-progress", "--skip-eval-before", "--threads", "1", "--warmup-steps", "0", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad-input")
    torch.manual_seed(0)
    cfg = ViTConfig.uniform(embed_dim=16, depth=2, heads=2, mlp_ratio=2.0, num_classes=10, img_size=32, patch_size=8)
    model = save(ViT(cfg), root / "model")
    cfg2 = ViTConfig.uniform(embed_dim=16, depth=2, heads=2, mlp_ratio=2.0, num_classes=2, img_size=32, patch_size=8)
    model2 = save(ViT(cfg2), root / "model2")
    data = _images(root / "data", ["a", "b"])
    data_run = _images(root / "data_run", ["a", "b"])
    run = root / "run"
    assert main(_finetune_argv(model, data_run, run)) == 0
    tcfg = get_preset("deit_tiny_patch16_224").config(num_classes=5, img_size=32)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ViT(tcfg).state_dict().items()}
    timm = root / "deit.pth"
    torch.save({k: torch.zeros(s) for k, s in shapes.items()}, timm)
    afile = root / "afile"
    afile.write_text("just a file\n")
    lut = root / "table.lut.json"
    assert main(["lut", "build", "--batch", "1", "--grid", "emb=16;heads=0,2;qk=8;v=8;mlp=0,32", "--runs", "1",
                 "--warmup", "0", "--img-size", "32", "--patch-size", "8", "--num-classes", "10", "--quiet",
                 "--out", str(lut)]) == 0  # fmt: skip
    return World(root, model, model2, data, data_run, run, timm, afile, lut)


def tree_hash(root: Path) -> str:
    """Names, kinds, sizes and contents of everything under ``root``."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames):
            h.update(f"D {os.path.relpath(os.path.join(dirpath, name), root)}\n".encode())
        for name in sorted(filenames):
            p = os.path.join(dirpath, name)
            h.update(f"F {os.path.relpath(p, root)} {os.path.getsize(p)}\n".encode())
            with open(p, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def run_cli(argv: list[str]) -> int:
    return main(argv)


def assert_one_error(code: int, err: str, expect: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert expect in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------ case builders
# Each builder gets (world, case folder) and returns argv; it may create inputs under the case folder.
Prep = Callable[[World, Path], list[str]]


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _evil_pt(c: Path) -> Path:
    p = c / "evil.pt"
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": Evil()}, p)
    return p


def _evil_raw(c: Path) -> Path:
    p = c / "evil_raw.pth"
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as f:
        pickle.dump({"weight": Evil()}, f)
    return p


def _module_pt(c: Path) -> Path:
    p = c / "module.pth"
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.nn.Linear(2, 2), p)
    return p


def _truncated(w: World, c: Path) -> Path:
    return _write(c / "trunc.pth", w.timm.read_bytes()[:5000])


def _model_variant(w: World, c: Path, edit: Callable[[dict], None]) -> Path:
    d = c / "m"
    shutil.copytree(w.model, d)
    sd = load_file(str(d / "model.safetensors"))
    edit(sd)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "vitprune"})
    return d


def _timm_variant(w: World, c: Path, edit: Callable[[dict], None]) -> Path:
    sd = torch.load(w.timm, weights_only=True)
    edit(sd)
    p = c / "deit_bad.pth"
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, p)
    return p


def _shape(key: str, shape: tuple[int, ...]) -> Callable[[dict], None]:
    return lambda sd: sd.__setitem__(key, torch.zeros(shape))


def _foreign_dir(c: Path, name: str = "mine") -> Path:
    d = c / name
    _write(d / "notes.txt", "precious\n")
    _write(d / "sub" / "more.txt", "more\n")
    return d


def _copy_run(w: World, c: Path) -> Path:
    d = c / "run"
    shutil.copytree(w.run, d)
    return d


def _classes(c: Path, names: list[str]) -> Path:
    return _write(c / "classes.txt", "".join(f"{n}\n" for n in names))


def _ft(w: World, out: Path, *extra: str, model: Path | None = None, data: Path | None = None) -> list[str]:
    return _finetune_argv(model or w.model, data or w.data, out, *extra)


def _train(out: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(out), "--steps", "1", "--limit", "8", "--test-limit", "8", "--no-progress", *extra]


def _lut_build(out: Path, *extra: str) -> list[str]:
    return ["lut", "build", "--batch", "1", "--quiet", "--out", str(out), *extra]


def _changed_data_run(w: World, c: Path) -> list[str]:
    """A finished run whose data then gained an image: resuming it must refuse."""
    data = _images(c / "data", ["a", "b"])
    out = c / "run"
    assert run_cli(_ft(w, out, data=data)) == 0
    shutil.copy(data / "a" / "0.png", data / "a" / "9.png")
    return _ft(w, out, "--resume", data=data)


CASES: list[tuple[str, Prep, str]] = [
    # ---- top level / argparse
    ("no-command", lambda w, c: [], "required: COMMAND"),
    ("unknown-command", lambda w, c: ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("info-no-model", lambda w, c: ["info"], "vitprune info: the following arguments are required: MODEL"),
    ("info-unknown-flag", lambda w, c: ["info", str(w.model), "--bogus"], "unrecognized arguments: --bogus"),
    # ---- info: models and checkpoints
    ("info-missing", lambda w, c: ["info", str(c / "nope.pth")], "not found"),
    (
        "info-random-bytes",
        lambda w, c: ["info", str(_write(c / "x.pth", bytes(range(256)) * 2))],
        "corrupt or not a torch",
    ),
    ("info-truncated", lambda w, c: ["info", str(_truncated(w, c))], "corrupt or not a torch checkpoint"),
    ("info-pickled-code", lambda w, c: ["info", str(_evil_pt(c))], "it contains pickled code"),
    ("info-pickled-code-raw", lambda w, c: ["info", str(_evil_raw(c))], "refusing to load"),
    ("info-pickled-module", lambda w, c: ["info", str(_module_pt(c))], "it pickles torch.nn.modules.linear.Linear"),
    ("info-bad-safetensors", lambda w, c: ["info", str(_write(c / "x.safetensors", b"\x10garbage"))], "cannot read"),
    ("info-bad-extension", lambda w, c: ["info", str(_write(c / "x.txt", "hi"))], "unsupported checkpoint extension"),
    ("info-empty-state-dict", lambda w, c: ["info", str(_timm_variant(w, c, dict.clear))], "not a state dict"),
    (
        "info-dir-no-weights",
        lambda w, c: ["info", str(_write(c / "m" / "config.json", (w.model / "config.json").read_text()).parent)],
        "model.safetensors",
    ),
    ("info-dir-bad-config", lambda w, c: ["info", str(_write(c / "m" / "config.json", "{nope").parent)], "config"),
    (
        "info-wrong-shape",
        lambda w, c: ["info", str(_model_variant(w, c, _shape("blocks.0.mlp.fc1.weight", (32, 5))))],
        "shape mismatch for blocks.0.mlp.fc1.weight",
    ),
    (
        "info-missing-key",
        lambda w, c: ["info", str(_model_variant(w, c, lambda sd: sd.pop("blocks.1.norm2.bias")))],
        "missing keys: blocks.1.norm2.bias",
    ),
    (
        "info-extra-key",
        lambda w, c: ["info", str(_model_variant(w, c, _shape("blocks.0.surprise", (3,))))],
        "unexpected keys: blocks.0.surprise",
    ),
    (
        "info-timm-fc1-weight-shape",
        lambda w, c: [
            "info",
            str(_timm_variant(w, c, _shape("blocks.3.mlp.fc1.weight", (700, 192)))),
            "--preset",
            "deit_tiny_patch16_224",
        ],
        "shape mismatch for blocks.3.mlp.fc1.weight",
    ),
    (
        "info-timm-no-heads",
        lambda w, c: ["info", str(w.timm)],
        "the number of attention heads cannot be inferred",
    ),
    ("info-unknown-preset", lambda w, c: ["info", str(w.timm), "--preset", "nope_vit"], "nope_vit"),
    ("info-img-size-17", lambda w, c: ["info", str(w.model), "--img-size", "17"], "multiple of the patch size 8"),
    ("info-img-size-0", lambda w, c: ["info", str(w.model), "--img-size", "0"], "--img-size must be a positive"),
    ("info-img-size-text", lambda w, c: ["info", str(w.model), "--img-size", "big"], "expected an integer"),
    # ---- eval: data and classes
    ("eval-no-data", lambda w, c: ["eval", str(w.model), "--data", str(c / "nope")], "dataset folder not found"),
    (
        "eval-empty-data",
        lambda w, c: ["eval", str(w.model), "--data", str(_write(c / "d" / "a" / "x.txt", "").parent.parent)],
        "no images found",
    ),
    (
        "eval-corrupt-image",
        lambda w, c: ["eval", str(w.model), "--data", str(_write(c / "d" / "a" / "0.png", b"not a png").parent.parent)],
        "cannot read image",
    ),
    (
        "eval-classes-file-too-many",
        lambda w, c: ["eval", str(w.model), "--data", str(w.data), "--classes", str(_classes(c, list("abcdefghijkl")))],
        "lists 12 classes",
    ),
    (
        "eval-classes-empty",
        lambda w, c: ["eval", str(w.model), "--data", str(w.data), "--classes", str(_classes(c, []))],
        "classes file is empty",
    ),
    (
        "eval-classes-twice",
        lambda w, c: ["eval", str(w.model), "--data", str(w.data), "--classes", str(_classes(c, ["a", "b", "a"]))],
        "twice",
    ),
    (
        "eval-classes-unlisted",
        lambda w, c: ["eval", str(w.model), "--data", str(w.data), "--classes", str(_classes(c, ["a"]))],
        "is not listed",
    ),
    (
        "eval-classes-missing",
        lambda w, c: ["eval", str(w.model), "--data", str(w.data), "--classes", str(c / "no.txt")],
        "classes file not found",
    ),
    (
        "eval-more-folders-than-classes",
        lambda w, c: ["eval", str(w.model2), "--data", str(_images(c / "d", ["a", "b", "c"], 1))],
        "has 3 class folders but the model has 2",
    ),
    (
        "eval-batch-0",
        lambda w, c: ["eval", str(w.model), "--data", str(w.data), "--batch-size", "0"],
        "--batch-size must be a positive",
    ),
    (
        "eval-workers-neg",
        lambda w, c: ["eval", str(w.model), "--data", str(w.data), "--workers", "-1"],
        "--workers must be a non-negative",
    ),
    (
        "eval-limit-0",
        lambda w, c: ["eval", str(w.model), "--data", str(w.data), "--limit-per-class", "0"],
        "--limit-per-class must be",
    ),
    (
        "eval-bad-preprocess",
        lambda w, c: ["eval", str(w.model), "--data", str(w.data), "--preprocess", "x"],
        "--preprocess: invalid choice",
    ),
    # ---- bench
    ("bench-runs-0", lambda w, c: ["bench", str(w.model), "--runs", "0"], "--runs must be a positive"),
    ("bench-warmup-neg", lambda w, c: ["bench", str(w.model), "--warmup", "-1"], "--warmup must be a non-negative"),
    ("bench-threads-0", lambda w, c: ["bench", str(w.model), "--threads", "0"], "--threads must be a positive"),
    ("bench-img-size-20", lambda w, c: ["bench", str(w.model), "--img-size", "20"], "multiple of the patch size 8"),
    ("bench-vs-missing", lambda w, c: ["bench", str(w.model), "--vs", str(c / "nope")], "not found"),
    ("bench-bad-dtype", lambda w, c: ["bench", str(w.model), "--dtype", "int3"], "--dtype: invalid choice"),
    # ---- export: output targets
    (
        "export-parent-is-file",
        lambda w, c: ["export", str(w.model), "--onnx", str(w.afile / "m.onnx")],
        "afile is a file",
    ),
    (
        "export-exists",
        lambda w, c: ["export", str(w.model), "--onnx", str(_write(c / "m.onnx", "old"))],
        "use --overwrite to replace it",
    ),
    (
        "export-dir-overwrite",
        lambda w, c: ["export", str(w.model), "--onnx", str(_foreign_dir(c)), "--overwrite"],
        "it is a directory",
    ),
    ("export-proc", lambda w, c: ["export", str(w.model), "--onnx", "/proc/vitprune-test/m.onnx"], "not writable"),
    (
        "export-opset-0",
        lambda w, c: ["export", str(w.model), "--onnx", str(c / "m.onnx"), "--opset", "0"],
        "--opset must be",
    ),
    (
        "export-batch-0",
        lambda w, c: ["export", str(w.model), "--onnx", str(c / "m.onnx"), "--batch-size", "0"],
        "--batch-size must",
    ),
    ("export-bad-model", lambda w, c: ["export", str(_evil_pt(c)), "--onnx", str(c / "m.onnx")], "pickled code"),
    # ---- train: values and outputs
    ("train-hflip-2", lambda w, c: _train(c / "o", "--hflip", "2"), "--hflip must be in [0, 1], got 2"),
    ("train-mixup-neg", lambda w, c: _train(c / "o", "--mixup", "-1"), "--mixup must be non-negative, got -1"),
    ("train-lr-0", lambda w, c: _train(c / "o", "--lr", "0"), "--lr must be positive"),
    ("train-steps-0", lambda w, c: _train(c / "o", "--steps", "0"), "--steps must be a positive integer"),
    ("train-drop-path-1", lambda w, c: _train(c / "o", "--drop-path", "1"), "--drop-path must be in [0, 1)"),
    ("train-smoothing", lambda w, c: _train(c / "o", "--label-smoothing", "1.5"), "--label-smoothing must be in"),
    ("train-epochs-nan", lambda w, c: _train(c / "o", "--epochs", "nan"), "expected a finite number"),
    ("train-patch-5", lambda w, c: _train(c / "o", "--patch-size", "5"), "--patch-size must divide"),
    ("train-heads", lambda w, c: _train(c / "o", "--embed-dim", "30", "--heads", "4"), "multiple of --heads"),
    ("train-out-under-file", lambda w, c: _train(w.afile / "o"), "afile is a file"),
    ("train-out-foreign", lambda w, c: _train(_foreign_dir(c)), "not a vitprune run directory"),
    ("train-out-foreign-overwrite", lambda w, c: _train(_foreign_dir(c), "--overwrite"), "not a vitprune run"),
    ("train-out-run-exists", lambda w, c: _train(_copy_run(w, c)), "use --overwrite to replace it or --resume"),
    ("train-resume-missing", lambda w, c: _train(c / "nope", "--resume"), "cannot resume"),
    (
        "train-resume-empty",
        lambda w, c: _train(_write(c / "e" / ".keep", "").parent, "--resume"),
        "holds no vitprune run",
    ),
    (
        "train-export-foreign",
        lambda w, c: _train(c / "o", "--export", str(_foreign_dir(c)), "--overwrite"),
        "not a vitprune output directory",
    ),
    ("train-export-is-out", lambda w, c: _train(c / "o", "--export", str(c / "o")), "--export must differ from --out"),
    ("train-no-data", lambda w, c: _train(c / "o", "--data-root", str(c / "nope")), "or pass --data-root DIR"),
    # ---- finetune: values, outputs, resume
    ("ft-crop-reversed", lambda w, c: _ft(w, c / "o", "--crop-scale", "0.9,0.3"), "LO must not exceed HI"),
    ("ft-crop-zero", lambda w, c: _ft(w, c / "o", "--crop-scale", "0,1"), "must be in (0, 1]"),
    ("ft-crop-one-number", lambda w, c: _ft(w, c / "o", "--crop-scale", "0.5"), "expected two numbers"),
    ("ft-alpha-2", lambda w, c: _ft(w, c / "o", "--distill-alpha", "2"), "--distill-alpha must be in [0, 1]"),
    ("ft-temperature-0", lambda w, c: _ft(w, c / "o", "--distill-temperature", "0"), "--distill-temperature must"),
    ("ft-batch-0", lambda w, c: _ft(w, c / "o", "--batch-size", "0"), "--batch-size must be a positive"),
    ("ft-img-size-17", lambda w, c: _ft(w, c / "o", "--img-size", "17"), "multiple of the patch size 8"),
    ("ft-missing-model", lambda w, c: _ft(w, c / "o", model=c / "nope"), "not found"),
    ("ft-pickled-model", lambda w, c: _ft(w, c / "o", model=_evil_pt(c)), "pickled code"),
    ("ft-teacher-classes", lambda w, c: _ft(w, c / "o", "--teacher", str(w.model2)), "teacher has 2 classes"),
    (
        "ft-classes-file-too-many",
        lambda w, c: _ft(w, c / "o", "--classes", str(_classes(c, list("abcdefghijkl")))),
        "the classes file",
    ),
    ("ft-no-data", lambda w, c: _ft(w, c / "o", data=c / "nope"), "dataset folder not found"),
    ("ft-out-foreign", lambda w, c: _ft(w, _foreign_dir(c)), "not a vitprune run directory"),
    ("ft-out-foreign-overwrite", lambda w, c: _ft(w, _foreign_dir(c), "--overwrite"), "not a vitprune run"),
    ("ft-out-foreign-model", lambda w, c: _ft(w, _foreign_dir(c / "o", "model").parent), "not a vitprune run"),
    ("ft-out-exists", lambda w, c: _ft(w, _copy_run(w, c), data=w.data_run), "--overwrite to replace it or --resume"),
    ("ft-resume-missing", lambda w, c: _ft(w, c / "nope", "--resume"), "cannot resume"),
    ("ft-resume-other-data", lambda w, c: _ft(w, _copy_run(w, c), "--resume", data=w.data), "--data differs (was"),
    (
        "ft-resume-other-model",
        lambda w, c: _ft(w, _copy_run(w, c), "--resume", model=w.model2, data=w.data_run),
        "MODEL differs (was",
    ),
    (
        "ft-resume-other-lr",
        lambda w, c: _ft(w, _copy_run(w, c), "--resume", "--lr", "0.5", data=w.data_run),
        "--lr differs (was 0.0001, now 0.5)",
    ),
    ("ft-resume-data-changed", _changed_data_run, "the files of --data"),
    (
        "ft-resume-pickled-checkpoint",
        lambda w, c: _ft(w, _evil_ckpt(w, c), "--resume", data=w.data_run),
        "refusing to load",
    ),
    (
        "ft-resume-truncated-checkpoint",
        lambda w, c: _ft(w, _trunc_ckpt(w, c), "--resume", data=w.data_run),
        "corrupt or not a torch checkpoint",
    ),
    # ---- lut build / check
    ("lut-batch-0", lambda w, c: _lut_build(c / "t.json", "--batch", "0"), "--batch must be a positive"),
    ("lut-runs-0", lambda w, c: _lut_build(c / "t.json", "--runs", "0"), "--runs must be a positive"),
    ("lut-img-size-17", lambda w, c: _lut_build(c / "t.json", "--img-size", "17"), "multiple of the patch size 16"),
    ("lut-out-under-file", lambda w, c: _lut_build(w.afile / "t.json"), "afile is a file"),
    ("lut-out-proc", lambda w, c: _lut_build(Path("/proc/vitprune-test/t.json")), "not writable"),
    ("lut-out-exists", lambda w, c: _lut_build(_write(c / "t.json", "{}")), "use --overwrite"),
    ("lut-out-dir-overwrite", lambda w, c: _lut_build(_foreign_dir(c), "--overwrite"), "it is a directory"),
    ("lut-model-bad", lambda w, c: _lut_build(c / "t.json", "--model", str(_evil_pt(c))), "pickled code"),
    ("lut-check-missing", lambda w, c: ["lut", "check", str(c / "nope.json"), "--quiet"], "not found"),
    ("lut-check-corrupt", lambda w, c: ["lut", "check", str(_write(c / "t.json", "{oops")), "--quiet"], "t.json"),
    ("lut-check-archs-neg", lambda w, c: ["lut", "check", str(w.lut), "--archs", "-1"], "--archs must be a non-neg"),
    ("lut-check-depth-0", lambda w, c: ["lut", "check", str(w.lut), "--depth", "0"], "--depth must be a positive"),
    (
        "lut-check-json-under-file",
        lambda w, c: ["lut", "check", str(w.lut), "--json", str(w.afile / "r.json"), "--quiet"],
        "afile is a file",
    ),
    (
        "lut-check-json-exists",
        lambda w, c: ["lut", "check", str(w.lut), "--json", str(_write(c / "r.json", "{}")), "--quiet"],
        "use --overwrite",
    ),
    # ---- recipes
    ("recipes-unknown", lambda w, c: ["recipes", "no-such-recipe"], "unknown recipe 'no-such-recipe'"),
    (
        "recipes-malicious-yaml",
        lambda w, c: ["recipes", str(_write(c / "r.yaml", "!!python/object/apply:os.system ['echo pwned']\n"))],
        "is not valid YAML",
    ),
    ("recipes-bad-yaml", lambda w, c: ["recipes", str(_write(c / "r.yaml", "a: [1, 2\n"))], "is not valid YAML"),
    ("recipes-not-mapping", lambda w, c: ["recipes", str(_write(c / "r.yaml", "- a\n- b\n"))], "r.yaml"),
    # ---- demo
    (
        "demo-target-0",
        lambda w, c: ["demo", "--out", str(c / "d"), "--target-macs", "0"],
        "--target-macs must be in (0, 1)",
    ),
    (
        "demo-sparsity-1",
        lambda w, c: ["demo", "--out", str(c / "d"), "--sparsity", "1"],
        "--sparsity must be in (0, 1), got 1",
    ),
    ("demo-threads-0", lambda w, c: ["demo", "--out", str(c / "d"), "--threads", "0"], "--threads must be a positive"),
    ("demo-out-foreign", lambda w, c: ["demo", "--out", str(_foreign_dir(c)), "--overwrite"], "not a vitprune output"),
    ("demo-out-file", lambda w, c: ["demo", "--out", str(w.afile)], "it is a file"),
    ("demo-out-under-file", lambda w, c: ["demo", "--out", str(w.afile / "d")], "afile is a file"),
    ("demo-no-data", lambda w, c: ["demo", "--out", str(c / "d"), "--data", str(c / "nope")], "pass --data DIR"),
    ("demo-bad-model", lambda w, c: ["demo", "--out", str(c / "d"), "--model", str(_evil_pt(c))], "pickled code"),
]


def _evil_ckpt(w: World, c: Path) -> Path:
    run = _copy_run(w, c)
    torch.save({"format_version": 1, "x": Evil()}, run / "checkpoint.pt")
    return run


def _trunc_ckpt(w: World, c: Path) -> Path:
    run = _copy_run(w, c)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    return run


def test_enough_cases():
    assert len(CASES) >= 60 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "prep", "expect"), CASES, ids=[name for name, _, _ in CASES])
def test_bad_input(world, name, prep, expect, capsys, monkeypatch):
    case = world.root / "cases" / name
    case.mkdir(parents=True)
    monkeypatch.chdir(case)
    argv = prep(world, case)
    capsys.readouterr()
    before = tree_hash(world.root)
    code = run_cli(argv)
    err = capsys.readouterr().err
    assert_one_error(code, err, expect)
    assert tree_hash(world.root) == before, "the file system changed"
    assert not Path("/tmp/vitprune-pwned").exists()


# ------------------------------------------------------------------------------------------ real subprocesses
SUBPROCESS_CASES = ["info-pickled-code-raw", "train-hflip-2", "export-parent-is-file", "recipes-malicious-yaml"]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_subprocess(world, name):
    """Real processes: also warnings (torch's pickle-protocol warning) and argparse usage would show here."""
    prep, expect = {n: (p, e) for n, p, e in CASES}[name]
    case = world.root / "subprocess" / name
    case.mkdir(parents=True)
    argv = prep(world, case)
    before = tree_hash(world.root)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-m", "vitprune.cli.main", *argv], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert_one_error(res.returncode, res.stderr, expect)
    assert res.stdout == ""
    assert tree_hash(world.root) == before


def test_help_still_shows_usage(capsys):
    assert main(["export", "--help"]) == 0
    assert "usage:" in capsys.readouterr().out


# -------------------------------------------------------------------------------------------------- faults
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_text_write_keeps_the_previous_file(tmp_path, monkeypatch):
    from vitprune.utils import fs

    target = tmp_path / "report.json"
    target.write_text("previous\n")
    real = Path.write_text

    def half_then_full(self, text, *a, **k):
        real(self, text[: len(text) // 2])
        _enospc()

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(VitPruneError, match=r"cannot write .*report\.json: No space left on device"):
        fs.atomic_write_text(target, "new content\n", overwrite=True)
    monkeypatch.undo()
    assert target.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary left


def test_failed_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from vitprune.training import checkpoint as ck

    path = tmp_path / "checkpoint.pt"
    ck.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    real = torch.save

    def partial(obj, f, *a, **k):
        real({"partial": torch.zeros(1)}, f)
        _enospc()

    monkeypatch.setattr(torch, "save", partial)
    with pytest.raises(VitPruneError, match="No space left on device"):
        ck.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_failed_model_save_keeps_the_previous_model_dir(tmp_path, monkeypatch):
    from vitprune.models import io

    cfg = ViTConfig.uniform(embed_dim=8, depth=1, heads=2, mlp_ratio=1.0, num_classes=3, img_size=16, patch_size=8)
    first = ViT(cfg)
    io.save(first, tmp_path / "model")
    before = tree_hash(tmp_path)
    monkeypatch.setattr(io, "save_file", _enospc)
    with pytest.raises(VitPruneError, match="No space left on device"):
        io.save(ViT(cfg), tmp_path / "model", overwrite=True)
    monkeypatch.undo()
    assert tree_hash(tmp_path) == before
    # the final rename failing too: the previous directory is put back
    monkeypatch.setattr(os, "replace", _enospc)
    with pytest.raises(VitPruneError, match="No space left on device"):
        io.save(ViT(cfg), tmp_path / "model", overwrite=True)
    monkeypatch.undo()
    assert tree_hash(tmp_path) == before


def test_read_only_directory_is_refused_before_work(tmp_path, monkeypatch, capsys):
    """As root ``os.access`` says yes everywhere: simulate a read-only directory."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == ro else real(p, mode, **k))
    code = run_cli(["lut", "build", "--batch", "1", "--out", str(ro / "t.json")])
    assert_one_error(code, capsys.readouterr().err, f"cannot write {ro / 't.json'}: {ro} is not writable")
    assert list(ro.iterdir()) == []


def test_stale_temporaries_of_a_killed_write_are_removed(world, tmp_path, capsys):
    """A checkpoint write killed with SIGKILL leaves ``.checkpoint.pt.tmp<pid>.*``; the next start removes it."""
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    killed = (
        "import os, signal, sys\n"
        "from vitprune.utils.fs import atomic_path\n"
        "with atomic_path(sys.argv[1], overwrite=True) as tmp:\n"
        "    tmp.write_bytes(bytes(10**6))\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", killed, str(run / "checkpoint.pt")], env=env, cwd=REPO)
    assert res.returncode == -9
    (stale,) = run.glob(".checkpoint.pt.tmp*")
    alive = run / f".summary.json.tmp{os.getpid()}.xyz"  # a write in progress (this process) is left alone
    alive.write_text("")
    assert main([*_finetune_argv(world.model, world.data_run, run), "--resume"]) == 0
    capsys.readouterr()
    assert not stale.exists() and alive.exists()


def test_resume_of_the_same_setup_is_accepted(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    assert main([*_finetune_argv(world.model, world.data_run, run), "--resume", "--log-every", "7"]) == 0
    saved = json.loads((run / "fingerprint.json").read_text())
    assert saved["settings"]["data"] == str(world.data_run) and saved["models"]["model"]["path"] == str(world.model)


def test_recipe_errors_are_one_line(tmp_path, capsys):
    """The recipe mix-in subclasses the sub-parser's own class, so its errors are one line too."""
    bad = _write(tmp_path / "r.yaml", "name: r\nversion: 1\nmethod: nvit\nsettings:\n  warmup: 3\n")
    for recipe in ("no-such-recipe", str(bad)):
        code = main(["prune", "nvit", "m", "--data", "d", "--out", str(tmp_path / "o"), "--recipe", recipe])
        assert_one_error(code, capsys.readouterr().err, "recipe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_argtypes():
    import argparse

    from vitprune.cli import argtypes as A

    assert A.ordered_pair(0, 1, lo_open=True)("0.2,1") == (0.2, 1.0)
    assert A.probability("0") == 0.0 and A.nonneg_int("0") == 0 and A.positive_float("1e-3") == 1e-3
    assert A.float_in(0, 1, hi_open=True)("0.5") == 0.5
    for kind, text in [
        (A.positive_int, "0"),
        (A.positive_int, "1.5"),
        (A.nonneg_float, "-0.1"),
        (A.probability, "inf"),
        (A.float_in(0, 1, hi_open=True), "1"),
        (A.ordered_pair(0, 1), "0.5,0.2"),
        (A.ordered_pair(0, 1), "0.5,2"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError):
            kind(text)
    A.check_range("--x", None, 0, 1)
    with pytest.raises(VitPruneError, match=r"--x must be in \[0, 1\], got 2"):
        A.check_range("--x", 2, 0, 1)
    with pytest.raises(VitPruneError, match="--x must be >= 0, got -1"):
        A.check_range("--x", -1, 0)
    A.check_img_size(None, 16)
    A.check_img_size(32, 16)
    with pytest.raises(VitPruneError, match="multiple of the patch size 16, got 17"):
        A.check_img_size(17, 16)


def test_check_output_kinds(tmp_path):
    from vitprune.utils.fs import check_output

    f = _write(tmp_path / "f.json", "{}")
    assert check_output(f, "file", overwrite=True) == f
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output(empty, "run_dir") == empty  # an empty directory holds nothing to lose
    run = _write(tmp_path / "run" / "summary.json", "{}").parent
    assert check_output(run, "run_dir", overwrite=True) == run
    assert check_output(run, "run_dir", resume=True) == run
    model = save(
        ViT(ViTConfig.uniform(embed_dim=8, depth=1, heads=2, num_classes=3, img_size=16, patch_size=8)),
        tmp_path / "model",
    )
    assert check_output(model, "dir", overwrite=True) == model
    with pytest.raises(VitPruneError, match="use --overwrite to replace it"):
        check_output(model, "dir")
    with pytest.raises(VitPruneError, match=r"cannot write .*: it is a file"):
        check_output(f, "run_dir", overwrite=True)
    with pytest.raises(VitPruneError, match="is not a vitprune output directory"):
        check_output(_foreign_dir(tmp_path), "dir", overwrite=True)


def test_finetune_overwrite_replaces_its_own_run(world, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    assert main([*_finetune_argv(world.model, world.data, run), "--overwrite"]) == 0
    capsys.readouterr()
    assert json.loads((run / "fingerprint.json").read_text())["settings"]["data"] == str(world.data)


def test_remove_stale_temps_puts_a_moved_aside_output_back(tmp_path):
    from vitprune.utils.fs import remove_stale_temps

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write(tmp_path / f".model.old{dead.pid}.q1w2e3" / "config.json", "{}")  # killed between the two renames
    _write(tmp_path / f".model.tmp{dead.pid}.r4t5y6" / "config.json", "{}")  # the new, unfinished output
    _write(tmp_path / f".report.json.tmp{dead.pid}.u7i8o9", "{")
    _write(tmp_path / ".hidden.tmp.notes", "user file")  # not a vitprune temporary
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [f".model.tmp{dead.pid}.r4t5y6", f".report.json.tmp{dead.pid}.u7i8o9"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden.tmp.notes", "model"]


def test_an_os_error_mid_run_is_one_line(world, tmp_path, monkeypatch, capsys):
    """No space while the trainer appends to metrics.jsonl: one line, exit 2 (the safety net in main)."""
    import builtins

    real_open = builtins.open

    def full_disk(file, mode="r", *a, **k):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", full_disk)
    code = main([*_finetune_argv(world.model, world.data, tmp_path / "run"), "--log-every", "1"])
    monkeypatch.undo()
    assert_one_error(code, capsys.readouterr().err, "metrics.jsonl: No space left on device")
