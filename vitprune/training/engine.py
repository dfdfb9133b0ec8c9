"""The one training engine every pruner uses: AdamW, warm-up + cosine, clipping, AMP, DDP, hooks, resume.

``Trainer(model, config, train_loader, ...).fit()`` runs ``config.steps`` optimizer steps (or
``config.epochs`` passes over the loader) and returns a summary dict. With ``out_dir`` it writes
``metrics.jsonl`` (and TensorBoard events when ``tensorboard`` is installed), an atomic ``checkpoint.pt``
every ``ckpt_every`` steps and at the end, the final model (``out_dir/model``, a vitprune model directory) and
``summary.json``. ``resume=True`` continues from the checkpoint and ends with the same weights as an
uninterrupted run (bit-identical on CPU with ``workers=0``).

Extension points for pruners:

- ``hooks``: ``hook(trainer, step)`` after every optimizer step (``step`` counts completed steps; the
  gradients of that step are still in ``p.grad``). A hook may set ``trainer.should_stop = True``, replace
  ``trainer.masks`` (a :class:`WeightMasks`, applied at once) and keep its schedule state in
  ``trainer.extra_state`` (plain data and tensors only), which checkpoints save and restore.
- ``pre_step_hooks``: ``hook(trainer, step)`` after backward (gradients unscaled and masked), before clipping
  and the optimizer step (for gradient statistics such as NViT's saliency).
- ``regularizer``: ``regularizer(model) -> Tensor`` added to the loss (e.g. VTP's L1 on gates).

With a teacher, the teacher runs under ``torch.inference_mode()`` (in ``teacher_amp`` precision when set) and
``feature_weight > 0`` adds feature distillation (:mod:`vitprune.training.features`): the MSE between the
student's and the teacher's residual streams after ``feature_blocks``, mapped through ``feature_block_map`` /
``feature_emb_index`` for students with fewer blocks or channels. Every default keeps the plain loss.

Data order: a loader with a random/sequential/distributed sampler is rebuilt with a
:class:`~vitprune.training.sampler.EpochSampler` (order = f(seed, epoch), sharded by rank under torchrun), so
a resume skips the consumed batches without loading them. The loader's ``batch_size`` is per process.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from tqdm.auto import tqdm

from vitprune.errors import VitPruneError
from vitprune.models.io import attach_gate
from vitprune.models.vit import GATE_NAMES, ViT
from vitprune.training import distributed as D
from vitprune.training.augment import MixupCutmix
from vitprune.training.checkpoint import (
    CHECKPOINT_NAME,
    capture_rng_state,
    config_differences,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from vitprune.training.features import FeatureDistillation
from vitprune.training.losses import DistillationLoss
from vitprune.training.masks import WeightMasks
from vitprune.training.sampler import EpochSampler
from vitprune.utils.fs import atomic_write_text

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "summary.json"
MODEL_DIRNAME = "model"
# Keys that do not change the trained weights: a resume may change them freely.
RUNTIME_KEYS = ("ckpt_every", "log_every", "eval_every", "progress", "resume", "overwrite", "tensorboard")
# Keys added after checkpoints were first written: a checkpoint without them had their defaults.
ADDED_KEYS = (
    "feature_weight",
    "feature_blocks",
    "feature_block_map",
    "feature_emb_index",
    "feature_norm",
    "teacher_amp",
)
NO_DECAY_NAMES = ("cls_token", "dist_token", "pos_embed", *GATE_NAMES)


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. ``steps`` (optimizer steps) wins over ``epochs`` when both are given."""

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 128  # global batch; the loader's batch_size is per process (batch_size / world size)
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    amp: str = "none"  # "none" | "bf16" (CPU or CUDA) | "fp16" (CUDA, with a GradScaler)
    drop_path: float | None = None  # None keeps the model's own stochastic-depth rates
    distill_alpha: float = 1.0  # used only with a teacher
    distill_temperature: float = 1.0
    label_smoothing: float = 0.0
    mixup: float = 0.0  # mixup Beta alpha; 0 disables
    cutmix: float = 0.0  # cutmix Beta alpha; 0 disables
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    seed: int = 0
    ckpt_every: int = 0  # 0: checkpoint only at the end
    log_every: int = 50
    eval_every: int = 0  # 0: evaluate only at the end (when an eval_fn is given)
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    tensorboard: bool = True  # write TensorBoard events when the package is installed
    # feature distillation (vitprune.training.features); weight 0 disables it
    feature_weight: float = 0.0
    feature_blocks: str | list[int] = "all"  # "all" | "last-k" | student block indices
    feature_block_map: list[int] | None = None  # teacher block of each student block (None: derived)
    feature_emb_index: list[int] | None = None  # teacher channel of each student channel (None: derived)
    feature_norm: str = "var"  # "var": MSE / teacher feature variance; "none": plain MSE
    teacher_amp: str | None = None  # None: as ``amp``; "none" | "bf16" | "fp16": the teacher's own precision

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if isinstance(self.feature_blocks, (list, tuple)):
            self.feature_blocks = [int(b) for b in self.feature_blocks]
        for name in ("feature_block_map", "feature_emb_index"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, [int(v) for v in (value.tolist() if isinstance(value, Tensor) else value)])
        if self.feature_weight < 0:
            raise VitPruneError(f"feature_weight must be non-negative, got {self.feature_weight}")
        if self.feature_norm not in ("var", "none"):
            raise VitPruneError(f"feature_norm must be 'var' or 'none', got {self.feature_norm!r}")
        if self.teacher_amp not in (None, "none", "bf16", "fp16"):
            raise VitPruneError(f"teacher_amp must be None, 'none', 'bf16' or 'fp16', got {self.teacher_amp!r}")
        if self.steps is None and self.epochs is None:
            raise VitPruneError("give the number of training steps or epochs")
        if self.steps is not None and self.steps <= 0:
            raise VitPruneError(f"steps must be positive, got {self.steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise VitPruneError(f"epochs must be positive, got {self.epochs}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise VitPruneError(f"amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise VitPruneError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr} min_lr={self.min_lr}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise VitPruneError("warmup_steps, grad_clip and weight_decay must be non-negative")
        if self.drop_path is not None and not 0.0 <= self.drop_path < 1.0:
            raise VitPruneError(f"drop_path must be in [0, 1), got {self.drop_path}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise VitPruneError(f"unknown training config keys: {', '.join(unknown)}")
        return cls(**data)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms, biases, tokens, position embeddings and gates (1-D or named)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or leaf in NO_DECAY_NAMES or name in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up from ``lr / warmup`` to ``lr``, then cosine decay to ``min_lr`` at ``total_steps``."""
    warmup = min(warmup_steps, max(total_steps - 1, 0))
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1), eta_min=min_lr)
    if warmup == 0:
        return cosine
    linear = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [linear, cosine], milestones=[warmup])


def _check_plain(obj: Any, where: str) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` could not read back."""
    if obj is None or isinstance(obj, (bool, int, float, str, Tensor)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise VitPruneError(f"{where}: keys must be str or int, got {type(k).__name__}")
            _check_plain(v, f"{where}.{k}")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise VitPruneError(f"{where} holds a {type(obj).__name__}: only tensors and plain data can be checkpointed")


class Trainer:
    """Train ``model`` on ``train_loader`` (batches ``(images, labels)`` or images only with a teacher)."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_loader: Iterable,
        teacher: nn.Module | None = None,
        masks: WeightMasks | None = None,
        out_dir: str | Path | None = None,
        device: str | torch.device = "cpu",
        hooks: Sequence[Callable[[Trainer, int], None]] = (),
        eval_fn: Callable[[nn.Module], dict[str, Any]] | None = None,
        pre_step_hooks: Sequence[Callable[[Trainer, int], None]] = (),
        regularizer: Callable[[nn.Module], Tensor] | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.model = model
        self.teacher = teacher
        self.train_loader = train_loader
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.hooks = list(hooks)
        self.pre_step_hooks = list(pre_step_hooks)
        self.eval_fn = eval_fn
        self.regularizer = regularizer
        self.criterion = DistillationLoss(
            alpha=config.distill_alpha if teacher is not None else 0.0,
            temperature=config.distill_temperature,
            label_smoothing=config.label_smoothing,
        )
        if config.feature_weight > 0 and teacher is None:
            raise VitPruneError("feature distillation (feature_weight > 0) needs a teacher")
        self.features: FeatureDistillation | None = None  # built in _setup when feature_weight > 0
        self.last_feature_loss: float | None = None
        self.extra_state: dict[str, Any] = {}
        self.should_stop = False
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.total_steps = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.ddp_model: nn.Module = model
        self.last_eval: dict[str, Any] | None = None
        self.last_loss: float | None = None
        self.last_grad_norm: float | None = None
        self._masks: WeightMasks | None = masks.validate(model) if masks is not None else None
        self._train_time_s = 0.0
        self._cpu_time_s = 0.0
        self._tb = None
        self._mixer: MixupCutmix | None = None

    # ------------------------------------------------------------------------------------------- masks
    @property
    def masks(self) -> WeightMasks | None:
        return self._masks

    @masks.setter
    def masks(self, masks: WeightMasks | None) -> None:
        """Replace the weight masks; they are applied to the weights and the optimizer state at once."""
        if masks is not None:
            masks.validate(self.model).apply(self.model)
            if self.optimizer is not None:
                masks.mask_optimizer_state(self.model, self.optimizer)
        self._masks = masks

    # -------------------------------------------------------------------------------------- helpers
    @property
    def is_main(self) -> bool:
        return D.rank() == 0

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else self.config.lr

    def _autocast(self):
        amp = self.config.amp
        if amp == "none":
            return contextlib.nullcontext()
        if amp == "fp16" and self.device.type != "cuda":
            raise VitPruneError("amp 'fp16' needs a CUDA device; use 'bf16' on CPU")
        dtype = torch.float16 if amp == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @contextlib.contextmanager
    def _teacher_mode(self):
        """The teacher's forward: no autograd at all (inference mode), in its own precision if ``teacher_amp``."""
        amp = self.config.teacher_amp
        with torch.inference_mode():
            if amp is None:
                yield
            elif amp == "none":
                with torch.autocast(device_type=self.device.type, enabled=False):
                    yield
            else:
                if amp == "fp16" and self.device.type != "cuda":
                    raise VitPruneError("teacher_amp 'fp16' needs a CUDA device; use 'bf16' on CPU")
                dtype = torch.float16 if amp == "fp16" else torch.bfloat16
                with torch.autocast(device_type=self.device.type, dtype=dtype):
                    yield

    def _num_classes(self) -> int:
        cfg = getattr(self.model, "config", None)
        n = getattr(cfg, "num_classes", 0)
        if not n:
            raise VitPruneError("mixup/cutmix needs a model with a classification head (config.num_classes)")
        return int(n)

    def _prepare_loader(self) -> None:
        """Rebuild a standard loader around an EpochSampler (resumable order, sharded by rank)."""
        loader = self.train_loader
        self._sampler: EpochSampler | None = None
        self._loader = loader
        if not isinstance(loader, DataLoader) or loader.batch_size is None:
            return
        s = loader.sampler
        if isinstance(s, EpochSampler):
            self._sampler = s
            return
        if isinstance(s, DistributedSampler):
            shuffle, replicas, rank, drop = s.shuffle, s.num_replicas, s.rank, s.drop_last
        elif isinstance(s, (RandomSampler, SequentialSampler)):
            shuffle, replicas, rank, drop = isinstance(s, RandomSampler), D.world_size(), D.rank(), False
        else:
            return
        self._sampler = EpochSampler(len(loader.dataset), shuffle, self.config.seed, replicas, rank, drop)
        kwargs: dict[str, Any] = {}
        if loader.num_workers > 0:
            kwargs = {"prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers}
        self._loader = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=self._sampler,
            num_workers=loader.num_workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            generator=torch.Generator().manual_seed(self.config.seed + 7919 * D.rank()),
            **kwargs,
        )

    def steps_per_epoch(self) -> int:
        if self._sampler is not None:
            self._sampler.set_start(0)
        try:
            n = len(self._loader)
        except TypeError:
            raise VitPruneError("the training loader has no length: give steps instead of epochs") from None
        if n == 0:
            raise VitPruneError("the training loader yields no batches (dataset smaller than one batch?)")
        return n

    def _epoch_batches(self) -> Iterable:
        """Batches of the current epoch from position ``batch_in_epoch`` on."""
        if isinstance(self._loader, DataLoader):
            # Iterator creation draws the worker base seed from the loader's generator (or, without one, from
            # the global RNG, which would shift every random stream on resume): make it a function of the epoch.
            if self._loader.generator is None:
                self._loader.generator = torch.Generator()
            self._loader.generator.manual_seed(self.config.seed + 7919 * D.rank() + 104729 * self.epoch)
        if self._sampler is not None:
            self._sampler.set_epoch(self.epoch)
            self._sampler.set_start(self.batch_in_epoch * self._loader.batch_size)
            return iter(self._loader)
        sampler = getattr(self._loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        it = iter(self._loader)
        return itertools.islice(it, self.batch_in_epoch, None)

    # --------------------------------------------------------------------------------- out_dir state
    def _prepare_out_dir(self) -> dict[str, Any] | None:
        """Check ``out_dir``; returns the checkpoint to resume from (None for a fresh run)."""
        if self.out_dir is None:
            if self.config.resume:
                raise VitPruneError("resume needs an output directory")
            return None
        ckpt_path = self.out_dir / CHECKPOINT_NAME
        decision: tuple[str, str] = ("fresh", "")
        if self.is_main:  # rank 0 decides (other nodes may not share the file system) and tells the others
            finished = (self.out_dir / SUMMARY_NAME).is_file()
            has_run = finished or ckpt_path.is_file() or (self.out_dir / METRICS_NAME).is_file()
            if self.config.resume and ckpt_path.is_file():
                decision = ("resume", "")
            elif has_run and not (self.config.overwrite or (self.config.resume and not finished)):
                what = "a finished run" if finished else "an unfinished run"
                decision = ("error", f"{self.out_dir} holds {what} (use resume or overwrite)")
            elif has_run:
                for name in (CHECKPOINT_NAME, SUMMARY_NAME, METRICS_NAME):
                    (self.out_dir / name).unlink(missing_ok=True)
                for name in (MODEL_DIRNAME, "tensorboard"):
                    shutil.rmtree(self.out_dir / name, ignore_errors=True)
        decision = D.broadcast_object(decision)
        if decision[0] == "error":
            raise VitPruneError(decision[1])
        if decision[0] == "fresh":
            return None
        return D.broadcast_object(load_checkpoint(ckpt_path) if self.is_main else None)

    def _checkpoint_state(self) -> dict[str, Any]:
        model_state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        learnable = [n for n, _ in self.model.named_parameters() if n.rsplit(".", 1)[-1] in GATE_NAMES]
        _check_plain(self.extra_state, "extra_state")
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "total_steps": self.total_steps,
            "world_size": D.world_size(),
            "model": model_state,
            "learnable_gates": learnable,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": D.all_gather_objects(capture_rng_state()),
            "masks": self._masks.state_dict() if self._masks is not None else None,
            "extra_state": self.extra_state,
            "config": self.config.to_dict(),
            "train_time_s": self._train_time_s,
            "cpu_time_s": self._cpu_time_s,
            "should_stop": self.should_stop,
        }

    def save_checkpoint(self) -> None:
        """Write ``out_dir/checkpoint.pt`` atomically (rank 0; every rank must call it: RNG states gather)."""
        if self.out_dir is None:
            return
        state = self._checkpoint_state()
        if self.is_main:
            save_checkpoint(self.out_dir / CHECKPOINT_NAME, state)
        D.barrier()

    def _restore_model(self, state: dict[str, Any]) -> None:
        defaults = {f.name: f.default for f in fields(TrainConfig) if f.name in ADDED_KEYS}
        diff = config_differences({**defaults, **state["config"]}, self.config.to_dict(), RUNTIME_KEYS)
        if diff:
            raise VitPruneError(f"cannot resume from {self.out_dir}: training config differs in {', '.join(diff)}")
        modules = dict(self.model.named_modules())
        own = self.model.state_dict()
        for key, value in state["model"].items():
            mod_name, _, leaf = key.rpartition(".")
            if leaf in GATE_NAMES and key not in own and mod_name in modules:
                attach_gate(modules[mod_name], leaf, value, learnable=key in state["learnable_gates"])
        own = self.model.state_dict()
        missing = sorted(set(own) - set(state["model"]))
        extra = sorted(set(state["model"]) - set(own))
        bad = [k for k in own if k in state["model"] and tuple(own[k].shape) != tuple(state["model"][k].shape)]
        if missing or extra or bad:
            detail = ", ".join((missing + extra + bad)[:5])
            raise VitPruneError(
                f"cannot resume from {self.out_dir}: the model differs from the checkpoint's ({detail})"
            )
        self.model.load_state_dict(state["model"])

    def _restore_training(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.extra_state = state["extra_state"]
        self._train_time_s = float(state.get("train_time_s", 0.0))
        self._cpu_time_s = float(state.get("cpu_time_s", 0.0))
        if state.get("masks") is not None:
            self._masks = WeightMasks(state["masks"]).validate(self.model)
        rngs = state["rng"]
        if int(state["world_size"]) == D.world_size():
            restore_rng_state(rngs[D.rank()])
        else:
            warnings.warn("resuming with a different world size: RNG streams are reseeded", stacklevel=2)
            seed_everything(self.config.seed + 1000003 * self.step + D.rank())
        if self.out_dir is not None and self.is_main:  # drop log lines written after the checkpoint
            path = self.out_dir / METRICS_NAME
            if path.is_file():
                path.write_text("".join(ln + "\n" for ln in path.read_text().splitlines() if self._keep_line(ln)))

    def _keep_line(self, line: str) -> bool:
        """A metrics line logged at or before the resumed step (a line torn by a kill is dropped)."""
        try:
            return int(json.loads(line)["step"]) <= self.step
        except (ValueError, KeyError, TypeError):
            return False

    # ------------------------------------------------------------------------------------------ logging
    def _log(self, record: dict[str, Any]) -> None:
        if self.out_dir is None or not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / METRICS_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, record["step"])
            for k, v in (record.get("eval") or {}).items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"eval/{k}", v, record["step"])

    def _open_tensorboard(self) -> None:
        if not (self.config.tensorboard and self.out_dir is not None and self.is_main):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def evaluate(self) -> dict[str, Any] | None:
        if self.eval_fn is None:
            return None
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            result = dict(self.eval_fn(self.model))
        self.model.train(was_training)
        self.last_eval = result
        self._log({"step": self.step, "eval": result})
        return result

    # --------------------------------------------------------------------------------------- training
    def _set_drop_path(self) -> list[tuple[nn.Module, float]]:
        saved = []
        if self.config.drop_path is None:
            return saved
        blocks = getattr(self.model, "blocks", [])
        n = len(blocks)
        for i, blk in enumerate(blocks):
            dp = getattr(blk, "drop_path", None)
            if dp is not None and hasattr(dp, "p"):
                saved.append((dp, dp.p))
                dp.p = self.config.drop_path * i / max(n - 1, 1)
        return saved

    def _split_batch(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, Tensor):
            return batch, None
        if isinstance(batch, (list, tuple)) and len(batch) >= 2:
            return batch[0], batch[1]
        if isinstance(batch, (list, tuple)) and len(batch) == 1:
            return batch[0], None
        raise VitPruneError("training batches must be (images, labels) or images")

    def train_step(self, batch: Any) -> float:
        """One optimizer step on ``batch``; returns the (all-rank mean) loss."""
        x, y = self._split_batch(batch)
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True) if y is not None else None
        if self._mixer is not None:
            if y is None:
                raise VitPruneError("mixup/cutmix needs labels")
            x, y = self._mixer(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        fd = self.features
        with self._autocast():
            with fd.capture_student(self.model) if fd is not None else contextlib.nullcontext() as s_feats:
                out = self.ddp_model(x)
            t_out = None
            if self.teacher is not None and (self.criterion.alpha > 0 or fd is not None):
                with self._teacher_mode(), fd.capture_teacher(self.teacher) if fd else contextlib.nullcontext() as t_f:
                    t_out = self.teacher(x)
            loss = self.criterion(out, y, t_out if self.criterion.alpha > 0 else None)
            if fd is not None:
                f_loss = fd.loss(self.model, s_feats, t_f)
                self.last_feature_loss = float(f_loss.detach())
                loss = loss + self.config.feature_weight * f_loss
            if self.regularizer is not None:
                loss = loss + self.regularizer(self.model)
        reduced = D.all_reduce_mean_(loss.detach().float().clone())
        if not torch.isfinite(reduced):
            where = self.out_dir / CHECKPOINT_NAME if self.out_dir is not None else "none"
            raise VitPruneError(
                f"non-finite loss ({reduced.item()}) at step {self.step + 1}; training stopped; "
                f"last good checkpoint: {where} (lower the learning rate or enable grad_clip)"
            )
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self._masks is not None:
            self._masks.mask_grads(self.model)
        for hook in self.pre_step_hooks:
            hook(self, self.step)
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self.last_grad_norm = float(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        if self._masks is not None:
            self._masks.apply(self.model)
        return float(reduced)

    def _setup(self) -> dict[str, Any] | None:
        cfg = self.config
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise VitPruneError("amp 'fp16' needs a CUDA device; use 'bf16' on CPU")
        self.model.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device).eval().requires_grad_(False)
        if cfg.feature_weight > 0:
            self.features = FeatureDistillation(
                self.model,
                self.teacher,
                cfg.feature_blocks,
                cfg.feature_block_map,
                cfg.feature_emb_index,
                cfg.feature_norm,
            )
        if self._masks is not None:
            self._masks.apply(self.model)
        state = self._prepare_out_dir()
        if state is not None:
            self._restore_model(state)
        else:
            seed_everything(cfg.seed + D.rank())
        self._prepare_loader()
        spe = self.steps_per_epoch()
        self.total_steps = cfg.steps if cfg.steps is not None else math.ceil(cfg.epochs * spe)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.warmup_steps, cfg.min_lr)
        if cfg.amp == "fp16":
            self.scaler = torch.amp.GradScaler("cuda")
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self._mixer = MixupCutmix(self._num_classes(), cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.mix_switch_prob)
        if state is not None:
            self._restore_training(state)
        if self._masks is not None:
            self._masks.apply(self.model)
            self._masks.mask_optimizer_state(self.model, self.optimizer)
        self.ddp_model = self.model
        if D.is_distributed():
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # fully pruned (zero-width) layers have parameters that never receive gradients
            unused = any(p.numel() == 0 for p in self.model.parameters() if p.requires_grad)
            self.ddp_model = DDP(self.model, device_ids=ids, find_unused_parameters=unused)
        if self.out_dir is not None and self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._open_tensorboard()
        return state

    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps`` (or until a hook sets ``should_stop``); returns the run summary."""
        if D.launched_by_torchrun():
            self.device = D.setup_distributed(self.device)
        resumable = self.out_dir is not None and self.config.resume
        if resumable and D.broadcast_object(self.is_main and (self.out_dir / SUMMARY_NAME).is_file()):
            return self._finished_summary()
        self._setup()
        cfg = self.config
        spe = self.steps_per_epoch()
        saved_dp = self._set_drop_path()
        self.model.train()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (cfg.progress and self.is_main),
            desc="train",
            dynamic_ncols=True,
        )
        window_loss, window_n, window_t0 = 0.0, 0, time.perf_counter()
        try:
            while self.step < self.total_steps and not self.should_stop:
                if self.batch_in_epoch >= spe:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                mark_t, mark_c = time.perf_counter(), time.process_time()
                for batch in self._epoch_batches():
                    loss = self.train_step(batch)
                    self.step += 1
                    self.batch_in_epoch += 1
                    self.last_loss = loss
                    window_loss, window_n = window_loss + loss, window_n + 1
                    for hook in self.hooks:
                        hook(self, self.step)
                    # training time includes data loading; evaluation and checkpointing are excluded
                    self._train_time_s += time.perf_counter() - mark_t
                    self._cpu_time_s += time.process_time() - mark_c
                    bar.update(1)
                    if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == self.total_steps):
                        dt = time.perf_counter() - window_t0
                        bs = len(self._split_batch(batch)[0]) * D.world_size()
                        rec = {
                            "step": self.step,
                            "epoch": round(self.step / spe, 4),
                            "loss": window_loss / window_n,
                            "lr": self.lr,
                            "grad_norm": self.last_grad_norm,
                            "img_per_s": round(bs * window_n / dt, 1) if dt > 0 else None,
                            "elapsed_s": round(self._train_time_s, 2),
                        }
                        if self.features is not None:
                            rec["feature_loss"] = self.last_feature_loss
                        self._log(rec)
                        bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}")
                        window_loss, window_n, window_t0 = 0.0, 0, time.perf_counter()
                    if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                        self.evaluate()
                    done = self.step >= self.total_steps or self.should_stop
                    if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and not done:
                        self.save_checkpoint()
                    if done:
                        break
                    mark_t, mark_c = time.perf_counter(), time.process_time()
                if self.batch_in_epoch >= spe and self.step < self.total_steps:
                    self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        finally:
            bar.close()
            for dp, p in saved_dp:
                dp.p = p
        self.model.eval()
        result = self.evaluate() if self.eval_fn is not None else None
        self.save_checkpoint()
        summary = {
            "steps": self.step,
            "total_steps": self.total_steps,
            "epochs": round(self.step / spe, 4),
            "images_seen": self._images_seen(),
            "final_loss": self.last_loss,
            "train_time_s": round(self._train_time_s, 2),
            "cpu_time_s": round(self._cpu_time_s, 2),
            "stopped_early": self.step < self.total_steps,
            "world_size": D.world_size(),
            "eval": result,
            "config": cfg.to_dict(),
        }
        self._finish(summary)
        return summary

    def _images_seen(self) -> int | None:
        bs = getattr(self._loader, "batch_size", None)
        return self.step * bs * D.world_size() if bs else None

    def _finish(self, summary: dict[str, Any]) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.out_dir is not None and self.is_main:
            if isinstance(self.model, ViT):
                from vitprune.models.io import save

                save(self.model, self.out_dir / MODEL_DIRNAME, overwrite=True, meta={"training": summary})
            atomic_write_text(self.out_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n", overwrite=True)
        D.barrier()

    def _finished_summary(self) -> dict[str, Any]:
        """A resume of a finished run: load its final weights and return its summary (no training)."""
        summary, state = None, None
        if self.is_main:  # rank 0 reads (other nodes may not share the file system) and tells the others
            summary = json.loads((self.out_dir / SUMMARY_NAME).read_text())
            ckpt = self.out_dir / CHECKPOINT_NAME
            state = load_checkpoint(ckpt) if ckpt.is_file() else None
        summary, state = D.broadcast_object((summary, state))
        if state is not None:
            self.model.to(self.device)
            self._restore_model(state)
            self.step = int(state["step"])
            self.extra_state = state["extra_state"]
        return summary
