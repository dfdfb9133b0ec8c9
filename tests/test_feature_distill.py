"""Feature distillation: the loss, its gradients, block / channel maps of pruned students, the engine and resume."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from vitprune.errors import VitPruneError
from vitprune.models import ViT, ViTConfig
from vitprune.structures.masks import StructuralMasks, apply_masks
from vitprune.structures.surgery import prune_model
from vitprune.training import DistillationLoss, TrainConfig, Trainer
from vitprune.training.checkpoint import load_checkpoint, save_checkpoint
from vitprune.training.engine import build_scheduler, param_groups
from vitprune.training.features import (
    FeatureDistillation,
    feature_map_from_masks,
    parse_feature_blocks,
    record_feature_map,
    resolve_feature_map,
)

CFG = ViTConfig.uniform(embed_dim=16, depth=2, heads=2, mlp_ratio=2.0, num_classes=3, img_size=16, patch_size=8)


def _model(seed: int, cfg: ViTConfig = CFG) -> ViT:
    torch.manual_seed(seed)
    return ViT(cfg)


def _feature_loss(fd: FeatureDistillation, student: ViT, teacher: ViT, x: torch.Tensor) -> torch.Tensor:
    with fd.capture_student(student) as s:
        student(x)
    with torch.inference_mode(), fd.capture_teacher(teacher) as t:
        teacher(x)
    return fd.loss(student, s, t)


def _pruned_pair(tiny_model: ViT) -> tuple[ViT, ViT, StructuralMasks]:
    """A pruned student (block 1 removed, 24 of 32 channels, half the MLP) and the teacher masked the same way:
    the masked teacher computes exactly what the student computes, so matched features are equal."""
    masks = StructuralMasks.all_kept(tiny_model.config)
    masks.blocks[1].keep = False
    masks.emb[torch.tensor([0, 3, 5, 9, 17, 20, 30, 31])] = False
    for bm in masks.blocks:
        bm.mlp[::2] = False
    student = prune_model(tiny_model, masks)
    teacher = apply_masks(copy.deepcopy(tiny_model), masks)
    return student, teacher, masks


def test_parse_feature_blocks():
    assert parse_feature_blocks("all", 4) == [0, 1, 2, 3]
    assert parse_feature_blocks("last-2", 4) == [2, 3]
    assert parse_feature_blocks([3, -1, 0], 4) == [0, 3]
    assert parse_feature_blocks("1, 2", 4) == [1, 2]
    for bad in ("last-0", "last-5", "first-2", [4]):
        with pytest.raises(VitPruneError):
            parse_feature_blocks(bad, 4)


def test_zero_when_student_equals_teacher(tiny_model):
    x = torch.randn(2, 3, 32, 32)
    for norm in ("var", "none"):
        fd = FeatureDistillation(tiny_model, copy.deepcopy(tiny_model), "all", norm=norm)
        assert _feature_loss(fd, tiny_model, copy.deepcopy(tiny_model), x).item() == 0.0
    other = _model(5, tiny_model.config)
    assert _feature_loss(fd, other, tiny_model, x).item() > 0


def test_gradient_reaches_only_the_student_blocks_before_the_chosen_one(tiny_model):
    student = _model(3, tiny_model.config).train()
    teacher = copy.deepcopy(tiny_model).requires_grad_(False)
    fd = FeatureDistillation(student, teacher, [1])
    _feature_loss(fd, student, teacher, torch.randn(2, 3, 32, 32)).backward()
    assert all(p.grad is None for p in teacher.parameters())
    for name, p in student.named_parameters():
        upstream = name.startswith(("blocks.0.", "blocks.1.", "patch_embed", "cls_token", "pos_embed"))
        has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert has_grad == upstream, name


def test_block_map_and_emb_index_of_a_pruned_student(tiny_model):
    student, teacher, masks = _pruned_pair(tiny_model)
    x = torch.randn(3, 3, 32, 32)
    fmap = feature_map_from_masks(masks)
    assert fmap.block_map == [0, 2, 3] and fmap.emb_index.numel() == 24
    right = FeatureDistillation(student, teacher, "all", fmap.block_map, fmap.emb_index)
    assert _feature_loss(right, student, teacher, x).item() < 1e-9
    wrong_blocks = FeatureDistillation(student, teacher, "all", [0, 1, 2], fmap.emb_index)
    assert _feature_loss(wrong_blocks, student, teacher, x).item() > 1e-6
    wrong_channels = FeatureDistillation(student, teacher, "all", fmap.block_map, torch.arange(24))
    assert _feature_loss(wrong_channels, student, teacher, x).item() > 1e-6
    with pytest.raises(VitPruneError, match="feature_block_map"):
        resolve_feature_map(student, teacher)
    with pytest.raises(VitPruneError, match="feature_emb_index"):
        resolve_feature_map(student, teacher, block_map=[0, 2, 3])
    with pytest.raises(VitPruneError, match="teacher blocks"):
        resolve_feature_map(student, teacher, block_map=[0, 2, 4], emb_index=fmap.emb_index)
    record_feature_map(student, fmap)  # saved in config.json: finetune finds it
    derived = FeatureDistillation(student, teacher, "last-2")
    assert derived.teacher_blocks == [2, 3]
    assert _feature_loss(derived, student, teacher, x).item() < 1e-9


def test_masked_full_width_student_is_compared_on_kept_channels(tiny_model):
    masks = StructuralMasks.all_kept(tiny_model.config)
    masks.emb[:8] = False
    student = apply_masks(copy.deepcopy(tiny_model), masks)
    fd = FeatureDistillation(student, tiny_model)
    s_sel, t_sel = fd.channels(student, torch.device("cpu"))
    assert s_sel.tolist() == t_sel.tolist() == list(range(8, 32))


def _data(n: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    return TensorDataset((y.float() - 1.0).view(-1, 1, 1, 1) + 0.3 * torch.randn(n, 3, 16, 16, generator=g), y)


def _cfg(**kw) -> TrainConfig:
    base = {"steps": 4, "lr": 3e-3, "min_lr": 3e-3, "log_every": 0, "progress": False, "tensorboard": False}
    return TrainConfig(**{**base, **kw})


def test_default_config_gives_the_losses_of_the_plain_distillation_step():
    batches = [(x, y) for x, y in DataLoader(_data(), batch_size=8)]
    teacher = _model(1)
    got = []
    trainer = Trainer(_model(0), _cfg(), batches, teacher=teacher, hooks=[lambda t, s: got.append(t.last_loss)])
    trainer.fit()
    assert trainer.features is None
    # the engine's step before feature distillation: no_grad teacher, DistillationLoss, AdamW, scheduler
    torch.manual_seed(0)
    model = _model(0).train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=3e-3, weight_decay=0.05)
    sched = build_scheduler(opt, 4, 0, 3e-3)
    crit, want = DistillationLoss(1.0), []
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        with torch.no_grad():
            t_out = teacher(x)
        loss = crit(out, y, t_out)
        loss.backward()
        opt.step()
        sched.step()
        want.append(float(loss.detach()))
    assert got == want
    again = []
    off = _cfg(feature_weight=0.0, feature_blocks="last-1", feature_norm="none")
    Trainer(_model(0), off, batches, teacher=teacher, hooks=[lambda t, s: again.append(t.last_loss)]).fit()
    assert again == want


def test_engine_feature_distillation_trains_and_logs(tmp_path, tiny_model):
    student, teacher, masks = _pruned_pair(tiny_model)
    fmap = feature_map_from_masks(masks)
    x = torch.randn(16, 3, 32, 32)
    loader = DataLoader(TensorDataset(x, torch.zeros(16, dtype=torch.long)), batch_size=8, shuffle=True)
    cfg = _cfg(steps=3, log_every=1, feature_weight=2.0, feature_block_map=fmap.block_map)
    cfg.feature_emb_index = fmap.emb_index.tolist()
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = Trainer(copy.deepcopy(student), cfg, loader, teacher=teacher, out_dir=tmp_path / "run")
    trainer.fit()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_before.items())
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["feature_loss"] < 1e-8 for r in lines if "feature_loss" in r][:1] == [True]  # equal at the start
    with pytest.raises(VitPruneError, match="needs a teacher"):
        Trainer(student, cfg, loader)
    with pytest.raises(VitPruneError, match="feature_block_map"):
        Trainer(copy.deepcopy(student), _cfg(feature_weight=1.0), loader, teacher=teacher).fit()
    for bad in ({"feature_weight": -1.0}, {"feature_norm": "l1"}, {"teacher_amp": "int8"}):
        with pytest.raises(VitPruneError):
            _cfg(**bad)


def test_teacher_amp_bf16_runs_the_teacher_in_bf16():
    seen = []
    teacher = _model(1)
    teacher.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batches = [(x, y) for x, y in DataLoader(_data(16), batch_size=8)]
    Trainer(_model(0), _cfg(steps=1, teacher_amp="bf16", feature_weight=0.5), batches, teacher=teacher).fit()
    assert seen == [torch.bfloat16]


class _Crash(Exception):
    pass


def _resume_run(out, resume: bool = False, crash_at: int | None = None, **kw) -> None:
    def crash(trainer, step):
        if step == crash_at:
            raise _Crash

    loader = DataLoader(_data(), batch_size=8, shuffle=True)
    cfg = _cfg(steps=8, ckpt_every=3, drop_path=0.1, feature_weight=1.0, feature_blocks=[0, 1], resume=resume, **kw)
    Trainer(_model(0), cfg, loader, teacher=_model(1), out_dir=out, hooks=[crash]).fit()


def test_resume_with_feature_distillation_is_bit_identical(tmp_path):
    _resume_run(tmp_path / "ref")
    with pytest.raises(_Crash):
        _resume_run(tmp_path / "run", crash_at=5)  # checkpoint at step 3
    with pytest.raises(VitPruneError, match="feature_weight"):
        loader = DataLoader(_data(), batch_size=8, shuffle=True)
        Trainer(_model(0), _cfg(steps=8, resume=True), loader, teacher=_model(1), out_dir=tmp_path / "run").fit()
    _resume_run(tmp_path / "run", resume=True)
    ref = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    got = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_checkpoint_without_the_new_keys_still_resumes(tmp_path):
    loader = DataLoader(_data(), batch_size=8, shuffle=True)
    with pytest.raises(_Crash):
        Trainer(
            _model(0), _cfg(steps=6, ckpt_every=2), loader, teacher=_model(1), out_dir=tmp_path, hooks=[_crash3]
        ).fit()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    for key in ("feature_weight", "feature_blocks", "feature_block_map", "feature_emb_index", "feature_norm"):
        del state["config"][key]
    del state["config"]["teacher_amp"]
    state.pop("format_version")
    save_checkpoint(tmp_path / "checkpoint.pt", state)
    summary = Trainer(_model(0), _cfg(steps=6, resume=True), loader, teacher=_model(1), out_dir=tmp_path).fit()
    assert summary["steps"] == 6


def _crash3(trainer, step):
    if step == 3:
        raise _Crash


def test_cli_finetune_feature_flags(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from vitprune.cli.main import main
    from vitprune.models import save

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (data / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / name / f"{i}.png")
    cfg = ViTConfig.uniform(embed_dim=16, depth=3, heads=2, mlp_ratio=2.0, num_classes=3, img_size=32, patch_size=8)
    small = ViTConfig.uniform(embed_dim=16, depth=2, heads=2, mlp_ratio=2.0, num_classes=3, img_size=32, patch_size=8)
    save(_model(0, small), tmp_path / "student")
    save(_model(1, cfg), tmp_path / "teacher")
    base = ["finetune", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--data", str(data)]
    base += ["--img-size", "32", "--steps", "2", "--batch-size", "3", "--no-progress", "--threads", "1"]
    assert main([*base, "--feature-distill", "1.0", "--out", str(tmp_path / "bad")]) == 2
    assert "--feature-block-map" in capsys.readouterr().err
    assert main([*base, "--feature-distill", "1", "--feature-blocks", "first-2", "--out", str(tmp_path / "b2")]) == 2
    assert "feature blocks" in capsys.readouterr().err
    flags = ["--feature-distill", "0.5", "--feature-blocks", "last-1", "--feature-block-map", "0,2"]
    assert main([*base, *flags, "--teacher-amp", "bf16", "--out", str(tmp_path / "run")]) == 0
    training = json.loads((tmp_path / "run" / "model" / "meta.json").read_text())["training"]
    assert training["feature_weight"] == 0.5 and training["feature_block_map"] == [0, 2]
    assert training["feature_blocks"] == "last-1" and training["teacher_amp"] == "bf16"
