"""Where one distillation recovery step's time goes on this CPU, and recovery images/s before vs after.

Setting: the real ViT-Tiny (Tiny-ImageNet) as the dense teacher, a student with 51 % of its MACs (every block
keeps half its MLP neurons and half its QK and V dims: ``StructuralMasks`` + ``prune_model``), the shared
recovery augmentation (random resized crop 0.25..1 to 224, flip, mean = std = 0.5), AdamW, grad clip 1, soft
distillation alpha = 1; batch 32, torch threads 2, loader workers 0 (as ``benchmarks/_recovery.py``).

1. **Profile** (``phases_s``): one step split into data (decode + augment + collate), teacher forward, student
   forward + loss, backward, clip + optimizer step, for the old and the new pipelines.
2. **Throughput** (``throughput``): engine steps (``Trainer.train_step`` on the engine's own resumable loader,
   data loading included), the variants alternating step by step (``--steps`` timed steps each after one
   untimed step), so the load drift of the shared machine hits all alike; the ratio to ``before`` is taken
   per cycle (median) and over the summed times.

   - ``before``: the engine as it was (teacher under ``no_grad``), JPEG decode + PIL-path augmentation;
   - ``cached``: :class:`~vitprune.data.CachedImageFolder` (decoded once) + tensor augmentation (same random
     draws), teacher under ``inference_mode``: the same numbers to float rounding;
   - ``cached + bf16 teacher``: also ``teacher_amp="bf16"`` (the teacher's matmuls on AMX; its logits are
     soft targets: see ``fidelity``);
   - ``cached + bf16 teacher + bf16 student``: also ``amp="bf16"`` (an existing engine option).
3. **Fidelity** (``fidelity``): on real batches, the bf16 teacher's logits against fp32 (top-1 agreement,
   ``KL(p_fp32 || p_bf16)``, next to the distillation loss the student is trained on), and the bf16 student's
   loss and gradient against fp32.

Usage: ``python benchmarks/recovery_throughput.py [--steps 12 --profile-steps 4 --threads 2 --batch-size 32]``.
Writes ``benchmarks/results/recovery_throughput.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
from _common import loadavg, markdown_table, shared_model, write_results
from _recovery import DEFAULTS, build_train_loader

from vitprune.metrics.flops import count_macs
from vitprune.models.checkpoints import load_model
from vitprune.structures.masks import StructuralMasks
from vitprune.structures.surgery import prune_model
from vitprune.training import TrainConfig, Trainer
from vitprune.training.engine import param_groups
from vitprune.training.losses import DistillationLoss, kd_kl
from vitprune.training.runinfo import machine_info

VARIANTS = {
    "before": {"cache": False, "old_teacher": True},
    "cached": {"cache": True},
    "cached + bf16 teacher": {"cache": True, "teacher_amp": "bf16"},
    "cached + bf16 teacher + bf16 student": {"cache": True, "teacher_amp": "bf16", "amp": "bf16"},
}


class OldEngine(Trainer):
    """The engine before this change: the teacher ran under ``torch.no_grad()`` (the same kernels otherwise)."""

    def _teacher_mode(self):
        return torch.no_grad()


def half_student(teacher):
    masks = StructuralMasks.all_kept(teacher.config)
    for bm in masks.blocks:
        bm.mlp[bm.mlp.numel() // 2 :] = False
        bm.qk[bm.qk.numel() // 2 :] = False
        bm.v[bm.v.numel() // 2 :] = False
    return prune_model(teacher, masks)


def _config(steps: int, batch_size: int, **kw: Any) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=DEFAULTS["lr"],
        min_lr=DEFAULTS["min_lr"],
        weight_decay=DEFAULTS["weight_decay"],
        grad_clip=DEFAULTS["grad_clip"],
        distill_alpha=1.0,
        log_every=0,
        progress=False,
        tensorboard=False,
        **kw,
    )


class PhaseStepper:
    """One step written out like the engine's ``train_step``, timed by phase (its own student copy and data)."""

    PHASES = ("data", "teacher_forward", "student_forward", "backward", "clip_optimizer")

    def __init__(self, student, teacher, loader, old: bool, teacher_amp=None, amp="none") -> None:
        self.student = copy.deepcopy(student).train()
        self.teacher, self.it = teacher, iter(loader)
        self.opt = torch.optim.AdamW(param_groups(self.student, 0.05), lr=DEFAULTS["lr"], weight_decay=0.05)
        self.crit = DistillationLoss(1.0)
        self.t_ctx = torch.no_grad if old else torch.inference_mode
        self.t_bf16, self.s_bf16 = (teacher_amp or amp) == "bf16", amp == "bf16"

    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        x, _ = next(self.it)
        t1 = time.perf_counter()
        with self.t_ctx(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.t_bf16):
            t_out = self.teacher(x)
        t2 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.s_bf16):
            loss = self.crit(self.student(x), None, t_out)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), DEFAULTS["grad_clip"])
        self.opt.step()
        t5 = time.perf_counter()
        return dict(zip(self.PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True))


def profile_phases(student, teacher, loaders, steps: int) -> dict[str, dict[str, float]]:
    """Median seconds per phase and variant, the variants alternating step by step (first step untimed)."""
    steppers = {
        name: PhaseStepper(
            student,
            teacher,
            loaders[spec["cache"]],
            spec.get("old_teacher", False),
            spec.get("teacher_amp"),
            spec.get("amp", "none"),
        )
        for name, spec in VARIANTS.items()
    }
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for i in range(steps + 1):
        for name, stepper in steppers.items():
            times = stepper.step()
            if i:
                samples[name].append(times)
    out = {}
    for name, rows in samples.items():
        med = {k: statistics.median(r[k] for r in rows) for k in PhaseStepper.PHASES}
        med["total"] = sum(med.values())
        out[name] = med
    return out


def throughput(student, teacher, loaders, batch_size: int, steps: int, warmup: int = 1) -> dict[str, Any]:
    """Engine steps (``Trainer.train_step`` on the engine's own loader, data loading included), the variants
    alternating step by step; images/s per variant and, per cycle, the ratio to ``before``."""
    trainers, batches = {}, {}
    for name, spec in VARIANTS.items():
        cfg = _config(steps + warmup, batch_size, teacher_amp=spec.get("teacher_amp"), amp=spec.get("amp", "none"))
        cls = OldEngine if spec.get("old_teacher") else Trainer
        trainer = cls(copy.deepcopy(student), cfg, loaders[spec["cache"]], teacher=teacher)
        trainer._setup()  # what fit() does before its loop: optimizer, schedule, the resumable loader
        trainer.model.train()
        trainers[name], batches[name] = trainer, iter(trainer._epoch_batches())
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    cpu: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for i in range(steps + warmup):
        for name, trainer in trainers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            trainer.train_step(next(batches[name]))
            if i >= warmup:
                seconds[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        line = ", ".join(f"{n}: {batch_size / s[-1]:.1f}" for n, s in seconds.items() if s)
        print(f"cycle {i + 1}/{steps + warmup} img/s {line} (load {loadavg()})", flush=True)
    out: dict[str, Any] = {}
    for name, values in seconds.items():
        ratios = [b / v for v, b in zip(values, seconds["before"], strict=True)]
        out[name] = {
            "images_per_s": [batch_size / v for v in values],
            "images_per_s_median": batch_size / statistics.median(values),
            "images_per_s_total": batch_size * len(values) / sum(values),
            "ratio_per_cycle": ratios,
            "ratio_median": statistics.median(ratios),
            "ratio_total": sum(seconds["before"]) / sum(values),
            "cpu_s_per_step": cpu[name],
            "cpu_ratio_total": sum(cpu["before"]) / sum(cpu[name]),
        }
    return out


def fidelity(student, teacher, loader, batches: int = 2) -> dict[str, Any]:
    """bf16 teacher vs fp32 teacher, and bf16-autocast student loss / gradient vs fp32, on real batches."""
    agree, kl_t, kd, loss_rel, cos = [], [], [], [], []
    s = copy.deepcopy(student).train()
    crit = DistillationLoss(1.0)
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        with torch.inference_mode():
            t32 = teacher(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                t16 = teacher(x).float()
        agree.append(float((t32.argmax(1) == t16.argmax(1)).float().mean()))
        kl_t.append(float(kd_kl(t16, t32)))
        grads = []
        losses = []
        for bf16 in (False, True):
            s.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = crit(s(x), None, t32.clone())
            loss.backward()
            losses.append(float(loss.detach()))
            grads.append(torch.cat([p.grad.flatten() for p in s.parameters() if p.grad is not None]))
        kd.append(losses[0])
        loss_rel.append(abs(losses[1] - losses[0]) / losses[0])
        cos.append(float(torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)))
    return {
        "batches": batches,
        "bf16_teacher_top1_agreement": statistics.mean(agree),
        "bf16_teacher_kl_to_fp32": statistics.mean(kl_t),
        "distillation_loss_fp32_student": statistics.mean(kd),
        "bf16_student_loss_relative_error": statistics.mean(loss_rel),
        "bf16_student_grad_cosine": statistics.mean(cos),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=12, help="timed engine steps per variant (alternating)")
    p.add_argument("--profile-steps", type=int, default=4, help="timed phase-profile steps per variant")
    p.add_argument("--cache-dir", default=None, help="image cache (default: $VITPRUNE_CACHE_DIR or ~/.cache)")
    p.add_argument("--out-name", default="recovery_throughput")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_start = loadavg()
    teacher = load_model(str(shared_model())).eval().requires_grad_(False)
    student = half_student(teacher)
    macs = count_macs(student)["total"] / count_macs(teacher)["total"]
    t0 = time.perf_counter()
    cached = build_train_loader(batch_size=args.batch_size, cache=True, cache_dir=args.cache_dir)
    cache_s = time.perf_counter() - t0
    plain = build_train_loader(batch_size=args.batch_size, cache=False)
    loaders = {True: cached, False: plain}
    ds = cached.dataset
    print(
        f"student {macs:.3f} of the MACs; cache {ds.cache_path} ({'built' if ds.built else 'loaded'} {cache_s:.1f} s)"
    )

    phases = profile_phases(student, teacher, loaders, args.profile_steps)
    for name, ph in phases.items():
        print(name, {k: round(v, 3) for k, v in ph.items()}, flush=True)
    tp = throughput(student, teacher, loaders, args.batch_size, args.steps)
    fid = fidelity(student, teacher, cached)
    record = {
        "setting": {
            "teacher": str(shared_model()),
            "student_macs_fraction": macs,
            "student_blocks": [[b.heads, b.qk_dim, b.v_dim, b.mlp_dim] for b in student.config.blocks],
            "batch_size": args.batch_size,
            "threads": torch.get_num_threads(),
            "workers": 0,
            "timed_steps_per_variant": args.steps,
            "profile_steps_per_variant": args.profile_steps,
            "augment": cached.dataset.augment,
            "cache_path": str(ds.cache_path),
            "cache_built_this_run": ds.built,
            "cache_seconds": cache_s,
        },
        "phases_s": phases,
        "throughput": tp,
        "fidelity": fid,
        "machine_info": machine_info(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
    }
    rows = []
    for name, v in tp.items():
        ratios = [f"{v[k]:.2f}x" for k in ("ratio_median", "ratio_total", "cpu_ratio_total")]
        rows.append([name, f"{v['images_per_s_median']:.1f}", *ratios])
    phase_rows = [
        [name]
        + [f"{ph[k]:.3f}" for k in ("data", "teacher_forward", "student_forward", "backward", "clip_optimizer")]
        + [f"{ph['total']:.3f}"]
        for name, ph in phases.items()
    ]
    md = (
        f"# Recovery throughput: ViT-Tiny teacher, {macs:.0%}-MACs student, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads\n\n"
        f"Engine steps (`Trainer.train_step`, data loading included), the variants alternating step by step, "
        f"{args.steps} timed steps each; ratio = time of the `before` step / time of the variant's step in the "
        "same cycle; the CPU-time ratio (process time of all threads) is the cross-check least affected by other "
        "jobs on a shared machine:\n\n"
        + markdown_table(
            ["variant", "img/s (median step)", "ratio (median cycle)", "ratio (total time)", "ratio (CPU time)"], rows
        )
        + f"\n\nMedian seconds per step by phase ({args.profile_steps} steps each, alternating; one step written "
        "out like the engine's):\n\n"
        + markdown_table(["variant", "data", "teacher fwd", "student fwd", "backward", "clip+opt", "total"], phase_rows)
        + "\n\nFidelity of the bf16 options (real batches): "
        f"bf16 teacher top-1 agreement {fid['bf16_teacher_top1_agreement']:.3f}, "
        f"KL(fp32 teacher || bf16 teacher) {fid['bf16_teacher_kl_to_fp32']:.2e} "
        f"vs distillation loss {fid['distillation_loss_fp32_student']:.3f}; "
        f"bf16 student: loss relative error {fid['bf16_student_loss_relative_error']:.2e}, "
        f"gradient cosine {min(fid['bf16_student_grad_cosine'], 1.0):.4f}.\n\n"
        f"Load average at start {load_start}, at end {loadavg()} (the machine is shared: absolute img/s drift, "
        "the side-by-side ratios are the result).\n"
    )
    path = write_results(args.out_name, record, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
