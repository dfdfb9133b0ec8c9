"""Trainer: optimizer groups, schedule, hooks, logging, run-directory safety, failure handling."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitprune.errors import VitPruneError
from vitprune.models import ViT, ViTConfig, attach_gate
from vitprune.models.io import load
from vitprune.training import DistillationLoss, TrainConfig, Trainer
from vitprune.training.engine import build_scheduler, param_groups
from vitprune.training.sampler import EpochSampler

CFG = ViTConfig.uniform(embed_dim=16, depth=2, heads=2, mlp_ratio=2.0, num_classes=3, img_size=16, patch_size=8)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest (and are not slowed by a busy machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(n: int = 48, seed: int = 0) -> TensorDataset:
    """Three separable classes: the image mean is -1, 0 or +1 plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = (y.float() - 1.0).view(-1, 1, 1, 1) + 0.3 * torch.randn(n, 3, 16, 16, generator=g)
    return TensorDataset(x, y)


def _loader(batch: int = 8, n: int = 48) -> DataLoader:
    return DataLoader(_data(n), batch_size=batch, shuffle=True)


def _model(seed: int = 0, cfg: ViTConfig = CFG) -> ViT:
    torch.manual_seed(seed)
    return ViT(cfg)


def _cfg(**kw) -> TrainConfig:
    base = {"steps": 12, "lr": 3e-3, "progress": False, "log_every": 4}
    base.update(kw)
    return TrainConfig(**base)


def test_param_groups_exclude_norms_biases_tokens_and_gates_from_decay():
    model = _model()
    attach_gate(model.blocks[0].mlp, "gate", torch.ones(32), learnable=True)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "blocks.0.mlp.gate"} <= nd
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"} <= d
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_schedule_is_linear_warmup_then_cosine_closed_form():
    p = torch.nn.Parameter(torch.zeros(1))
    lr, min_lr, warm, total = 1e-2, 1e-4, 5, 25
    opt = torch.optim.AdamW([p], lr=lr)
    sched = build_scheduler(opt, total, warm, min_lr)
    for s in range(total):
        if s <= warm:
            expect = lr * (1 / warm + (1 - 1 / warm) * s / warm)
        else:
            expect = min_lr + (lr - min_lr) * (1 + math.cos(math.pi * (s - warm) / (total - warm))) / 2
        assert opt.param_groups[0]["lr"] == pytest.approx(expect, rel=1e-9), s
        opt.step()
        sched.step()


def test_training_learns_and_logs(tmp_path):
    model = _model()
    calls = []
    held_out_x, held_out_y = _data(30, seed=1).tensors

    def eval_fn(m):
        return {"top1": float((m(held_out_x).argmax(1) == held_out_y).float().mean() * 100)}

    trainer = Trainer(
        model,
        _cfg(steps=40, warmup_steps=4, grad_clip=1.0, eval_every=20),
        _loader(),
        out_dir=tmp_path / "run",
        hooks=[lambda t, s: calls.append(s)],
        eval_fn=eval_fn,
    )
    summary = trainer.fit()
    assert calls == list(range(1, 41))
    assert summary["steps"] == 40 and summary["images_seen"] == 320 and not summary["stopped_early"]
    assert summary["eval"]["top1"] > 80
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 10 and losses[-1] < losses[0]
    assert any("eval" in r and r["step"] == 20 for r in lines)
    assert all(r["grad_norm"] is not None for r in lines if "loss" in r)
    saved = load(tmp_path / "run" / "model")
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), model.state_dict().values(), strict=True))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 40


def test_hook_stops_training_and_extra_state_round_trips(tmp_path):
    def hook(trainer: Trainer, step: int) -> None:
        trainer.extra_state["seen"] = step
        trainer.extra_state["scores"] = torch.full((3,), float(step))
        if step == 5:
            trainer.should_stop = True

    t = Trainer(_model(), _cfg(), _loader(), out_dir=tmp_path / "r", hooks=[hook])
    s = t.fit()
    assert s["steps"] == 5 and s["stopped_early"]
    again = Trainer(_model(1), _cfg(resume=True), _loader(), out_dir=tmp_path / "r")
    assert again.fit()["steps"] == 5  # a finished run is not retrained
    assert again.extra_state["seen"] == 5 and torch.equal(again.extra_state["scores"], torch.full((3,), 5.0))
    assert all(torch.equal(a, b) for a, b in zip(again.model.parameters(), t.model.parameters(), strict=True))


def test_extra_state_must_be_plain_data(tmp_path):
    def hook(trainer: Trainer, step: int) -> None:
        trainer.extra_state["bad"] = object()

    with pytest.raises(VitPruneError, match=r"extra_state\.bad"):
        Trainer(_model(), _cfg(steps=2), _loader(), out_dir=tmp_path / "r", hooks=[hook]).fit()


def test_in_process_resume_is_bit_identical(tmp_path):
    kw = {"steps": 14, "drop_path": 0.2, "mixup": 0.4, "cutmix": 1.0, "label_smoothing": 0.1, "ckpt_every": 4}
    full = Trainer(_model(), _cfg(**kw), _loader(batch=10), out_dir=tmp_path / "a")
    full.fit()

    def stop(trainer: Trainer, step: int) -> None:
        trainer.should_stop = step == 9  # checkpoints at 4 and 8; the final one at 9

    Trainer(_model(), _cfg(**kw), _loader(batch=10), out_dir=tmp_path / "b", hooks=[stop]).fit()
    (tmp_path / "b" / "summary.json").unlink()  # pretend the stop was a crash after the final checkpoint
    resumed = Trainer(_model(7), _cfg(**kw, resume=True), _loader(batch=10), out_dir=tmp_path / "b")
    assert resumed.fit()["steps"] == 14
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_run_directory_is_protected(tmp_path):
    out = tmp_path / "r"
    Trainer(_model(), _cfg(steps=2), _loader(), out_dir=out).fit()
    with pytest.raises(VitPruneError, match="finished run"):
        Trainer(_model(), _cfg(steps=2), _loader(), out_dir=out).fit()
    with pytest.raises(VitPruneError, match=r"config differs in lr, steps"):
        Trainer(_model(), _cfg(steps=3, lr=1e-3, resume=True), _loader(), out_dir=out).fit()
    s = Trainer(_model(), _cfg(steps=3, overwrite=True), _loader(), out_dir=out).fit()
    assert s["steps"] == 3
    other = ViTConfig.uniform(embed_dim=8, depth=1, heads=2, num_classes=3, img_size=16, patch_size=8)
    (out / "summary.json").unlink()
    with pytest.raises(VitPruneError, match="model differs"):
        Trainer(_model(cfg=other), _cfg(steps=3, resume=True), _loader(), out_dir=out).fit()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def reg(model):
        reg.calls += 1
        return torch.tensor(float("nan")) if reg.calls == 7 else torch.zeros(())

    reg.calls = 0
    out = tmp_path / "r"
    with pytest.raises(VitPruneError, match=r"non-finite loss .* at step 7.*checkpoint"):
        Trainer(_model(), _cfg(ckpt_every=3), _loader(), out_dir=out, regularizer=reg).fit()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "summary.json").exists()


def test_distillation_from_teacher_without_labels():
    teacher = _model(3)
    with torch.no_grad():
        teacher.head.weight.mul_(100.0)  # confident teacher: a clear target distribution
    x = _data().tensors[0]
    loader = DataLoader(TensorDataset(x), batch_size=8, shuffle=True)
    student = _model(4)
    kd = DistillationLoss(alpha=1.0)
    with torch.no_grad():
        kl0 = kd(student(x), None, teacher(x)).item()
    Trainer(student, _cfg(steps=30, lr=5e-3), loader, teacher=teacher).fit()
    with torch.no_grad():
        assert kd(student.eval()(x), None, teacher(x)).item() < kl0 / 3
    bad_teacher = ViT(ViTConfig.uniform(embed_dim=16, depth=1, heads=2, num_classes=5, img_size=16, patch_size=8))
    with pytest.raises(VitPruneError, match="teacher has 5 classes"):
        Trainer(_model(), _cfg(steps=1), loader, teacher=bad_teacher).fit()


def test_bf16_autocast_on_cpu_and_drop_path_restored():
    model = _model()
    s = Trainer(model, _cfg(steps=3, amp="bf16", drop_path=0.3), _loader()).fit()
    assert math.isfinite(s["final_loss"])
    assert all(b.drop_path.p == 0.0 for b in model.blocks)
    with pytest.raises(VitPruneError, match="fp16"):
        Trainer(_model(), _cfg(steps=1, amp="fp16"), _loader()).fit()


def test_pre_step_hook_and_regularizer():
    model = _model()
    attach_gate(model.blocks[0].mlp, "gate", torch.ones(32), learnable=True)
    grads = []
    reg = lambda m: 0.5 * m.blocks[0].mlp.gate.abs().sum()  # noqa: E731
    pre = lambda t, s: grads.append(t.model.blocks[0].mlp.gate.grad.clone())  # noqa: E731
    Trainer(model, _cfg(steps=3, weight_decay=0.0), _loader(), pre_step_hooks=[pre], regularizer=reg).fit()
    assert len(grads) == 3 and all(g.mean() > 0.2 for g in grads)  # the L1 term dominates: +0.5 per gate
    assert model.blocks[0].mlp.gate.detach().mean() < 1.0


def test_config_validation():
    for kw in ({}, {"steps": 0}, {"steps": 1, "amp": "fp8"}, {"steps": 1, "min_lr": 1.0}, {"steps": 1, "drop_path": 1}):
        with pytest.raises(VitPruneError):
            TrainConfig(**kw)
    c = TrainConfig(epochs=2)
    assert TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(VitPruneError, match="unknown training config keys: foo"):
        TrainConfig.from_dict({"steps": 1, "foo": 2})


def test_epochs_and_epoch_sampler_order():
    t = Trainer(_model(), _cfg(steps=None, epochs=1.5), _loader(batch=8))  # 6 batches per epoch
    assert t.fit()["steps"] == 9
    s = EpochSampler(10, shuffle=True, seed=3)
    s.set_epoch(1)
    first = list(s)
    s.set_start(4)
    assert list(s) == first[4:] and len(s) == 6
    s.set_epoch(2)
    s.set_start(0)
    assert sorted(s) == list(range(10)) and list(s) != first
    shards = [EpochSampler(10, True, 3, num_replicas=3, rank=r) for r in range(3)]
    for sh in shards:
        sh.set_epoch(1)
    assert sorted(i for sh in shards for i in sh)[:10] != [] and all(len(sh) == 4 for sh in shards)
    assert set(i for sh in shards for i in sh) == set(range(10))


def test_cli_finetune_with_teacher_on_image_folder(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from vitprune.cli.main import main
    from vitprune.models import save

    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b", "c"]):
        (data / name).mkdir(parents=True)
        for i in range(4):
            arr = np.clip(rng.normal(60 + 70 * c, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(data / name / f"{i}.png")
    cfg = ViTConfig.uniform(embed_dim=16, depth=2, heads=2, mlp_ratio=2.0, num_classes=3, img_size=32, patch_size=8)
    save(_model(0, cfg), tmp_path / "student")
    save(_model(1, cfg), tmp_path / "teacher")
    args = ["finetune", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--data", str(data)]
    args += ["--val", str(data), "--img-size", "32", "--steps", "3", "--batch-size", "4", "--no-progress"]
    args += ["--threads", "1", "--out", str(tmp_path / "run"), "--export", str(tmp_path / "exported")]
    assert main(args) == 0
    meta = json.loads((tmp_path / "exported" / "meta.json").read_text())
    assert meta["eval_before"]["n"] == 12 and meta["eval"]["n"] == 12 and meta["steps"] == 3
    assert meta["command"].startswith("vitprune finetune")
    assert load(tmp_path / "run" / "model").config.num_classes == 3
    assert main(args) == 2  # the finished run and the export are not overwritten
    assert "exists" in capsys.readouterr().err
    other = ViTConfig.uniform(embed_dim=16, depth=1, heads=2, num_classes=5, img_size=32, patch_size=8)
    save(_model(2, other), tmp_path / "teacher5")
    bad = ["finetune", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher5"), "--data", str(data)]
    assert main([*bad, "--img-size", "32", "--steps", "1", "--out", str(tmp_path / "run2")]) == 2
    assert "teacher has 5 classes" in capsys.readouterr().err


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # killed before its first checkpoint
    with pytest.raises(VitPruneError, match="unfinished run"):
        Trainer(_model(), _cfg(steps=2), _loader(), out_dir=out).fit()
    assert Trainer(_model(), _cfg(steps=2, resume=True), _loader(), out_dir=out).fit()["steps"] == 2
    assert all(json.loads(x)["loss"] != 9.0 for x in (out / "metrics.jsonl").read_text().splitlines())
