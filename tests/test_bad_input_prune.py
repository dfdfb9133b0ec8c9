"""Bad input to ``vitprune prune METHOD`` (issue #16, the commands of the one pruning interface): one ``error:``
line, exit 2, no traceback, the file system unchanged; resume under a changed set-up is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_bad_input as B
import torch
from test_bad_input import World, _evil_pt, _foreign_dir, _write, assert_one_error, tree_hash

from vitprune.cli.main import main
from vitprune.models import ViT, ViTConfig, save

world = B.world  # the shared inputs of the bad-input suite (a module fixture)
FAST = ["--prune-steps", "1", "--batches-per-step", "1", "--batch-size", "2", "--no-progress", "--threads", "1"]


def nvit(w: World, out: Path, *extra: str, data: Path | None = None) -> list[str]:
    return ["prune", "nvit", str(w.model), "--data", str(data or w.data), "--out", str(out), *FAST, *extra]


def obs(w: World, out: Path, *extra: str) -> list[str]:
    return [
        "prune",
        "obs",
        str(w.model),
        "--data",
        str(w.data),
        "--out",
        str(out),
        "--num-grads",
        "4",
        "--block-size",
        "16",
        "--no-progress",
        "--threads",
        "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def prune_run(world) -> Path:
    """A finished NViT run (the resume cases compare against it)."""
    out = world.root / "prune_run"
    assert main(nvit(world, out, "--target-macs", "0.8")) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _other_classes_teacher(c: Path) -> Path:
    cfg = ViTConfig.uniform(embed_dim=16, depth=2, heads=2, mlp_ratio=2.0, num_classes=3, img_size=32, patch_size=8)
    return save(ViT(cfg), c / "teacher")


CASES = [
    # ---- command line shape
    ("prune-no-method", lambda w, c, r: ["prune"], "METHOD"),
    ("prune-unknown-method", lambda w, c, r: ["prune", "magic", str(w.model)], "invalid choice: 'magic'"),
    (
        "nvit-no-target",
        lambda w, c, r: ["prune", "nvit", str(w.model), "--data", str(w.data), "--out", str(c / "o")],
        "--target-macs",
    ),
    (
        "nvit-two-targets",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", "--target-params", "0.5"),
        "not allowed with",
    ),
    (
        "nvit-no-data",
        lambda w, c, r: ["prune", "nvit", str(w.model), "--out", str(c / "o"), "--target-macs", "0.5"],
        "--data is required",
    ),
    (
        "nvit-no-out",
        lambda w, c, r: ["prune", "nvit", str(w.model), "--data", str(w.data), "--target-macs", "0.5"],
        "--out is required",
    ),
    ("nvit-unknown-flag", lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", "--bogus"), "--bogus"),
    # ---- values (ranges checked by the config dataclasses: the same message as the API and recipes)
    (
        "nvit-target-above-1",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "1.5"),
        "--target-macs must be in (0, 1], got 1.5",
    ),
    ("nvit-target-0", lambda w, c, r: nvit(w, c / "o", "--target-params", "0"), "--target-params must be in (0, 1]"),
    ("nvit-target-text", lambda w, c, r: nvit(w, c / "o", "--target-macs", "half"), "--target-macs"),
    (
        "nvit-round-to-negative",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", "--round-to", "-8"),
        "--round-to must be in [1, inf), got -8",
    ),
    (
        "nvit-prune-steps-0",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", "--prune-steps", "0"),
        "--prune-steps must be in [1, inf)",
    ),
    (
        "nvit-kinds-unknown",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", "--kinds", "mlp,rows"),
        "'rows' is not one of",
    ),
    (
        "nvit-chunks-unknown",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", "--chunks", "block=2"),
        "'block' is not one of",
    ),
    (
        "nvit-chunks-0",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", "--chunks", "mlp=0"),
        "--chunks[mlp] must be in [1, inf)",
    ),
    (
        "nvit-chunks-malformed",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", "--chunks", "mlp"),
        "KIND=N",
    ),
    (
        "nvit-criterion-unknown",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", "--criterion", "gut"),
        "'gut' is not one of saliency, per_cost",
    ),
    (
        "nvit-hflip-2",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", "--hflip", "2"),
        "--hflip must be in [0, 1], got 2",
    ),
    (
        "nvit-crop-scale-reversed",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", "--crop-scale", "0.9,0.2"),
        "--crop-scale must be ordered LO,HI",
    ),
    (
        "nvit-batch-size-0",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", "--batch-size", "0"),
        "--batch-size must be in [1, inf)",
    ),
    (
        "nvit-distill-alpha-2",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", "--distill-alpha", "2"),
        "--distill-alpha must be in [0, 1], got 2",
    ),
    (
        "nvit-unreachable",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.01", "--kinds", "mlp"),
        "is unreachable",
    ),
    # ---- the latency table
    ("nvit-latency-no-lut", lambda w, c, r: nvit(w, c / "o", "--target-latency", "0.5"), "latency lookup table"),
    (
        "nvit-lut-missing",
        lambda w, c, r: nvit(w, c / "o", "--target-latency", "0.5", "--lut", str(c / "no.json")),
        "no.json",
    ),
    (
        "nvit-lut-corrupt",
        lambda w, c, r: nvit(w, c / "o", "--target-latency", "0.5", "--lut", str(_write(c / "t.json", "{oops"))),
        "t.json",
    ),
    (
        "nvit-lut-other-batch",
        lambda w, c, r: nvit(w, c / "o", "--target-latency", "0.5", "--lut", str(w.lut), "--lut-batch", "8"),
        "(--force-lut)",
    ),
    # ---- inputs
    (
        "nvit-model-missing",
        lambda w, c, r: [
            "prune",
            "nvit",
            str(c / "nope"),
            "--data",
            str(w.data),
            "--out",
            str(c / "o"),
            "--target-macs",
            "0.5",
        ],
        "model path not found",
    ),
    (
        "nvit-model-pickled",
        lambda w, c, r: [
            "prune",
            "nvit",
            str(_evil_pt(c)),
            "--data",
            str(w.data),
            "--out",
            str(c / "o"),
            "--target-macs",
            "0.5",
        ],
        "pickled code",
    ),
    ("nvit-data-missing", lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", data=c / "nope"), "nope"),
    (
        "nvit-data-empty",
        lambda w, c, r: nvit(
            w, c / "o", "--target-macs", "0.5", data=_write(c / "e" / "a" / "x.txt", "x").parent.parent
        ),
        "no images",
    ),
    (
        "nvit-classes-too-many",
        lambda w, c, r: nvit(
            w,
            c / "o",
            "--target-macs",
            "0.5",
            "--classes",
            str(_write(c / "cls.txt", "\n".join(f"c{i}" for i in range(12)) + "\n")),
        ),
        "classes",
    ),
    (
        "nvit-teacher-other-classes",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", "--teacher", str(_other_classes_teacher(c))),
        "teacher has 3 classes",
    ),
    (
        "nvit-bad-recipe-key",
        lambda w, c, r: nvit(
            w,
            c / "o",
            "--recipe",
            str(_write(c / "r.yaml", "name: r\nversion: 1\nmethod: nvit\nsettings: {warmup: 3}\n")),
        ),
        "unknown nvit setting 'warmup'",
    ),
    ("nvit-recipe-other-method", lambda w, c, r: nvit(w, c / "o", "--recipe", "vtp-cpu"), "not 'nvit'"),
    # ---- outputs
    ("nvit-out-under-file", lambda w, c, r: nvit(w, w.afile / "o", "--target-macs", "0.5"), "afile is a file"),
    ("nvit-out-is-file", lambda w, c, r: nvit(w, w.afile, "--target-macs", "0.5"), "is a file"),
    (
        "nvit-out-foreign",
        lambda w, c, r: nvit(w, _foreign_dir(c), "--target-macs", "0.5", "--overwrite"),
        "is not a vitprune run directory",
    ),
    ("nvit-out-exists", lambda w, c, r: nvit(w, _copy(r, c / "run"), "--target-macs", "0.8"), "use --overwrite"),
    (
        "nvit-resume-nothing",
        lambda w, c, r: nvit(w, c / "o", "--target-macs", "0.5", "--resume"),
        "it does not exist (drop --resume",
    ),
    # ---- resume under a changed set-up
    (
        "nvit-resume-other-target",
        lambda w, c, r: nvit(w, _copy(r, c / "run"), "--target-macs", "0.6", "--resume"),
        "--target-macs differs",
    ),
    (
        "nvit-resume-other-data",
        lambda w, c, r: nvit(w, _copy(r, c / "run"), "--target-macs", "0.8", "--resume", data=w.data_run),
        "--data differs",
    ),
    (
        "nvit-resume-other-model",
        lambda w, c, r: [
            "prune",
            "nvit",
            str(w.model2),
            *nvit(w, _copy(r, c / "run"), "--target-macs", "0.8", "--resume")[3:],
        ],
        "MODEL differs",
    ),
    # ---- other methods
    (
        "vtp-lambda-negative",
        lambda w, c, r: [
            "prune",
            "vtp",
            str(w.model),
            "--data",
            str(w.data),
            "--out",
            str(c / "o"),
            "--target-macs",
            "0.7",
            "--lambda",
            "-1",
        ],
        "--lambda must be in [0, inf), got -1",
    ),
    (
        "vtp-gate-lr-negative",
        lambda w, c, r: [
            "prune",
            "vtp",
            str(w.model),
            "--data",
            str(w.data),
            "--out",
            str(c / "o"),
            "--target-macs",
            "0.7",
            "--gate-lr",
            "-1",
        ],
        "--gate-lr must be in (0, inf)",
    ),
    (
        "vtp-gates-unknown",
        lambda w, c, r: [
            "prune",
            "vtp",
            str(w.model),
            "--data",
            str(w.data),
            "--out",
            str(c / "o"),
            "--target-macs",
            "0.7",
            "--gates",
            "qk,rows",
        ],
        "'rows' is not one of",
    ),
    (
        "l2-kinds-block",
        lambda w, c, r: [
            "prune",
            "l2",
            str(w.model),
            "--data",
            str(w.data),
            "--out",
            str(c / "o"),
            "--target-macs",
            "0.7",
            "--kinds",
            "block",
        ],
        "'block' is not one of",
    ),
    ("obs-no-target", lambda w, c, r: obs(w, c / "o"), "give --sparsity"),
    ("obs-sparsity-1", lambda w, c, r: obs(w, c / "o", "--sparsity", "0.5", "1.0"), "--sparsity must be in [0, 1)"),
    ("obs-nm-bad", lambda w, c, r: obs(w, c / "o", "--nm", "3:2"), "N:M"),
    ("obs-nm-text", lambda w, c, r: obs(w, c / "o", "--nm", "half"), "N:M"),
    (
        "obs-max-memory-negative",
        lambda w, c, r: obs(w, c / "o", "--sparsity", "0.5", "--max-memory-gb", "-1"),
        "--max-memory-gb must be in (0, inf)",
    ),
    ("obs-damp-0", lambda w, c, r: obs(w, c / "o", "--sparsity", "0.5", "--damp", "0"), "--damp must be in (0, inf)"),
    ("obs-grad-mode", lambda w, c, r: obs(w, c / "o", "--sparsity", "0.5", "--grad-mode", "x"), "'x' is not one of"),
    (
        "obs-schedule-decreasing",
        lambda w, c, r: obs(w, c / "o", "--schedule", "0.6", "0.5"),
        "--schedule must be increasing",
    ),
    (
        "obs-woodbury-relative",
        lambda w, c, r: obs(w, c / "o", "--sparsity", "0.5", "--fisher-mode", "woodbury"),
        "--damp-absolute",
    ),
    (
        "wanda-num-samples-0",
        lambda w, c, r: [
            "prune",
            "wanda",
            str(w.model),
            "--data",
            str(w.data),
            "--out",
            str(c / "o"),
            "--sparsity",
            "0.5",
            "--num-samples",
            "0",
        ],
        "--num-samples must be in [1, inf)",
    ),
    (
        "pipeline-no-recipe",
        lambda w, c, r: ["prune", "pipeline", str(w.model), "--data", str(w.data), "--out", str(c / "o")],
        "needs --recipe FILE",
    ),
    (
        "pipeline-bad-stage",
        lambda w, c, r: [
            "prune",
            "pipeline",
            str(w.model),
            "--data",
            str(w.data),
            "--out",
            str(c / "o"),
            "--recipe",
            str(
                _write(
                    c / "p.yaml",
                    "name: p\nversion: 1\nmethod: pipeline\nsettings: {}\nstages: [{method: magic, settings: {}}]\n",
                )
            ),
        ],
        "stage 1: unknown method 'magic'",
    ),
]


def test_enough_prune_cases():
    assert len(CASES) >= 50 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "prep", "expect"), CASES, ids=[name for name, _, _ in CASES])
def test_prune_bad_input(world, prune_run, name, prep, expect, capsys, monkeypatch):
    case = world.root / "prune-cases" / name
    case.mkdir(parents=True)
    monkeypatch.chdir(case)
    argv = prep(world, case, prune_run)
    capsys.readouterr()
    before = tree_hash(world.root)
    code = main(argv)
    err = capsys.readouterr().err
    assert_one_error(code, err, expect)
    assert tree_hash(world.root) == before, "the file system changed"


def test_resume_of_the_same_prune_is_accepted_and_overwrite_replaces_only_run_files(world, prune_run, tmp_path):
    run = _copy(prune_run, tmp_path / "run")
    (run / "notes.txt").write_text("mine\n")
    assert main(nvit(world, run, "--target-macs", "0.8", "--resume")) == 0
    assert main(nvit(world, run, "--target-macs", "0.7", "--overwrite")) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["target"]["fraction"] == 0.7 and (run / "notes.txt").read_text() == "mine\n"
    assert json.loads((run / "fingerprint.json").read_text())["settings"]["target_macs"] == 0.7
    assert torch.load(run / "state.pt", weights_only=True)["round"] == 1
