"""oViT / CAP correlation-aware second-order unstructured pruning: one-shot, one-pass sweep, N:M, gradual.

One-shot (METHODS.md section 4, oViT section 3):

1. empirical Fisher inverse per prunable linear in ``B x B`` diagonal blocks (:mod:`vitprune.scoring.fisher`);
2. per block, greedy correlated removal with OBS updates and inverse downdates, recording the removal order
   and the cumulative loss trace (:func:`vitprune.scoring.obs.greedy_obs`);
3. one global threshold on all traces (or one per layer) sets how many weights each block loses
   (:func:`vitprune.scoring.obs.allocate_counts`);
4. per block, the joint group-OBS update for the chosen prefix of its order. Sequential OBS removals with
   downdates *are* the joint solution, so the greedy pass records its downdate columns (which replace
   ``F^-1`` in memory: ``F^-1 = C^T C``) and the weights for any prefix are rebuilt with one ``bmm``
   (:func:`vitprune.scoring.obs.replay_prefix`, tested equal to :func:`~vitprune.scoring.obs.group_obs_update`).

Steps 1-2 run once; steps 3-4 cost one sort and one ``bmm`` per target, so :meth:`OBSPruner.prune` with several
targets (the *sweep*) reuses the same Fisher and traces for every target. N:M replaces steps 2-4 by a greedy
constrained to remove ``M - N`` weights of every ``M`` consecutive input weights (then the greedy's own weights
are the joint OBS solution).

Gradual pruning (:meth:`OBSPruner.gradual`): at each level of a schedule, a fresh Fisher and OBS step on the
current (masked) model, then masked recovery training with a fresh optimizer and learning-rate schedule
(restarted each cycle); the best checkpoint of each level is kept; finished levels are skipped on resume.
"""

from __future__ import annotations

import itertools
import json
import resource
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vitprune.errors import VitPruneError
from vitprune.pruners.base import PruneResult, Run, jsonable
from vitprune.pruners.calibration import (
    LossFn,
    SparsePruneResult,
    clone_model,
    find_linears,
    iter_gradients,
    sparsity_report,
)
from vitprune.pruners.settings import SPARSITIES, setting, validate_settings
from vitprune.pruners.unstructured import UnstructuredConfig, UnstructuredPruner
from vitprune.scoring.fisher import FISHER_MODES, BlockLayout, FisherInverses
from vitprune.scoring.obs import allocate_counts, greedy_obs, prefix_mask, replay_prefix
from vitprune.utils.fs import atomic_path, atomic_write_text

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class OBSConfig(UnstructuredConfig):
    """Settings of the OBS pruner (defaults measured on ViT-Tiny / 2-core CPU; see benchmarks/obs_oneshot.py).

    ``num_grads``: ``m``, the number of gradients in the Fisher (per sample with ``grad_mode='per_sample'``, per
    mini-batch of the loader with ``'batch'``). ``damp``: ``lambda`` of ``F = lambda I + (1/m) sum g g^T``, as a
    fraction of the layer's mean Fisher diagonal when ``damp_relative`` (else absolute, as in the paper).
    ``fisher_labels``: ``'data'`` (empirical Fisher) or ``'model'`` (labels drawn from the model).
    ``criterion``: the threshold is on each block's ``'cumulative'`` loss trace (paper) or on its ``'marginal'``
    cost per removal (made non-decreasing), which minimises the summed loss when the traces are convex.
    ``max_memory_gb``: refuse (or, with ``allow_smaller_blocks``, shrink ``block_size``) when the Fisher
    inverse would exceed it. ``allocation``: ``'global'`` threshold over all layers or ``'layer'`` (uniform).
    ``schedule``: gradual pruning (increasing sparsities, ``steps_per_level`` of masked recovery after each).
    """

    block_size: int = setting(128, low=1, help="Fisher block size B")
    num_grads: int = setting(1024, low=1, help="gradients m in the Fisher (= calibration images per sample)")
    grad_mode: str = setting("per_sample", choices=("per_sample", "batch"), help="one gradient per image or batch")
    damp: float = setting(0.3, low=0.0, low_open=True, help="Fisher lambda, x the layer's mean Fisher diagonal")
    damp_relative: bool = setting(True, flag="damp-absolute", invert=True, help="--damp is an absolute lambda")
    fisher_labels: str = setting("data", choices=("data", "model"), help="empirical (data) or true (model) Fisher")
    fisher_mode: str = setting("accumulate", choices=FISHER_MODES, help="Fisher inverse by accumulation or Woodbury")
    allocation: str = setting("global", choices=("global", "layer"), help="one threshold over all layers, or per layer")
    criterion: str = setting("cumulative", choices=("cumulative", "marginal"), help="threshold on the OBS loss trace")
    max_memory_gb: float | None = setting(
        8.0, kind="float", low=0.0, low_open=True, nullable=True, zero_is_none=True,
        help="refuse a bigger Fisher inverse (0: no limit)",
    )  # fmt: skip
    allow_smaller_blocks: bool = setting(False, flag="auto-block-size", help="shrink B to fit --max-memory-gb")
    greedy_dtype: str = setting("float32", choices=("float32", "float64"), help="precision of the greedy OBS pass")
    chunk_blocks: int = setting(128, low=1, help="Fisher blocks processed at once")
    schedule: tuple[float, ...] = setting(
        (), help="gradual pruning: increasing sparsities, e.g. 0.5 0.6 0.75 0.9", **(SPARSITIES | {"low_open": True})
    )
    steps_per_level: int = setting(500, low=1, help="gradual: masked recovery steps after each level")
    eval_every: int = setting(0, low=0, help="gradual: score the val set every N steps to keep the best")
    device: str = setting("cpu", cli=False, help="device of the Fisher and OBS computations")

    def check(self) -> None:
        if self.schedule:
            if any(b <= a for a, b in itertools.pairwise(self.schedule)):
                raise VitPruneError(
                    f"--schedule must be increasing sparsities, got {' '.join(map(str, self.schedule))}"
                )
            if self.nm is not None:
                raise VitPruneError("--schedule (gradual) is for unstructured OBS, not --nm")
            if not self.sparsity:
                self.sparsity = (self.schedule[-1],)
        super().check()
        if self.damp_relative and self.fisher_mode == "woodbury":
            raise VitPruneError("the woodbury Fisher needs an absolute dampening (--damp-absolute)")

    def validate(self) -> None:
        """Kept for callers of the pre-interface API: every check already ran at construction."""
        validate_settings(self)
        self.check()


def marginal_costs(trace: Tensor) -> Tensor:
    """Per-removal loss increments of cumulative traces ``(n, b)``, made non-decreasing (running max) so that
    thresholding them still removes a prefix of every block's order."""
    inc = torch.diff(trace, dim=1, prepend=torch.zeros_like(trace[:, :1]))
    return torch.cummax(inc, dim=1).values


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (``ru_maxrss``)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@dataclass
class _LayerTrace:
    layout: BlockLayout
    orders: list[Tensor]
    traces: list[Tensor]
    alphas: list[Tensor] | None = None  # unstructured: replay coefficients (factors live in the Fisher storage)
    weights: list[Tensor] | None = None  # N:M: the greedy's final weights


@dataclass
class OBSSolver:
    """The oViT machinery over the linears of ``model`` matching ``config.patterns`` (Fisher, traces, sweep
    updates, gradual); :class:`OBSPruner` is its face in the one pruning interface."""

    model: nn.Module
    config: OBSConfig = field(default_factory=OBSConfig)
    loss_fn: LossFn | None = None

    def __post_init__(self) -> None:
        self.names = list(find_linears(self.model, self.config.patterns))
        self.fisher: FisherInverses | None = None
        self.fisher_consumed = False
        self.layer_traces: dict[str, _LayerTrace] = {}
        self.timings: dict[str, float] = {}
        self.info: dict[str, Any] = {}
        if self.config.nm_pair is not None:
            for name, lin in find_linears(self.model, self.names).items():
                if lin.in_features % self.config.nm_pair[1]:
                    raise VitPruneError(
                        f"N:M {self.config.nm} needs input widths divisible by "
                        f"{self.config.nm_pair[1]}; {name} has {lin.in_features}"
                    )

    # ---------------------------------------------------------------- step 1: Fisher
    def estimate_fisher(self, loader: Iterable) -> FisherInverses:
        """Build ``F^-1`` of every prunable linear from ``config.num_grads`` gradients on ``loader``."""
        cfg = self.config
        linears = find_linears(self.model, self.names)
        multiple = cfg.nm_pair[1] if cfg.nm_pair is not None else 1
        max_bytes = cfg.max_memory_gb * 2**30 if cfg.max_memory_gb is not None else None
        if cfg.fisher_mode == "woodbury":
            available = _available_grads(loader, cfg.grad_mode)
            if available is not None and available < cfg.num_grads:
                raise VitPruneError(
                    f"woodbury Fisher needs {cfg.num_grads} gradients but the data gives {available} "
                    "(lower --num-grads or use the accumulate mode)"
                )
        self.fisher, self.layer_traces = None, {}  # free the previous estimate before allocating a new one
        t0 = time.perf_counter()
        self.fisher = FisherInverses.create(
            {n: lin.weight.numel() for n, lin in linears.items()},
            cfg.block_size,
            cfg.num_grads,
            cfg.damp,
            mode=cfg.fisher_mode,
            max_bytes=max_bytes,
            allow_smaller=cfg.allow_smaller_blocks,
            multiple_of=multiple,
            device=cfg.device,
            relative=cfg.damp_relative,
        )
        for grads in iter_gradients(
            self.model,
            loader,
            self.names,
            cfg.num_grads,
            cfg.grad_mode == "per_sample",
            self.loss_fn,
            cfg.device,
            labels=cfg.fisher_labels,
            seed=cfg.seed,
        ):
            self.fisher.add(grads)
            del grads
        count = self.fisher.count
        if cfg.fisher_mode == "woodbury" and count != cfg.num_grads:
            raise VitPruneError(f"woodbury Fisher needs {cfg.num_grads} gradients, the data gave {count}")
        self.fisher.finalize()
        self.timings["fisher_s"] = time.perf_counter() - t0
        self.info.update(
            block_size=self.fisher.block_size,
            num_grads=count,
            fisher_bytes=self.fisher.nbytes,
            grad_mode=cfg.grad_mode,
            fisher_mode=cfg.fisher_mode,
            fisher_labels=cfg.fisher_labels,
            damp=cfg.damp,
            damp_relative=cfg.damp_relative,
            lambda_per_layer={n: f.lam for n, f in self.fisher.items()},
        )
        self.layer_traces = {}
        self.fisher_consumed = False
        return self.fisher

    # ---------------------------------------------------------------- step 2: greedy traces
    @torch.no_grad()
    def compute_traces(self, masks: dict[str, Tensor] | None = None) -> None:
        """Greedy OBS removal order and loss trace of every block (``masks``: True = kept; False go first)."""
        if self.fisher is None or self.fisher_consumed:
            raise VitPruneError("estimate the Fisher before computing OBS traces (each trace pass consumes it)")
        cfg = self.config
        dtype = _DTYPES[cfg.greedy_dtype]
        t0 = time.perf_counter()
        linears = find_linears(self.model, self.names)
        for name, lin in linears.items():
            est = self.fisher[name]
            flat = lin.weight.detach().flatten().to(cfg.device)
            pruned = None
            if masks is not None and f"{name}.weight" in masks:
                pruned = ~masks[f"{name}.weight"].flatten().to(cfg.device)
            w_parts = est.layout.split(flat)
            p_parts = est.layout.split(pruned) if pruned is not None else [None] * len(w_parts)
            orders, traces, alphas, weights = [], [], [], []
            for w, f, p in zip(w_parts, est.blocks, p_parts, strict=True):
                parts = []
                for s in range(0, w.shape[0], cfg.chunk_blocks):
                    e = s + cfg.chunk_blocks
                    res = greedy_obs(
                        w[s:e],
                        f[s:e],
                        pruned=p[s:e] if p is not None else None,
                        nm=cfg.nm_pair,
                        dtype=dtype,
                        factors=cfg.nm_pair is None,
                    )
                    if res.factors is not None:  # F^-1 = factors^T factors: the factors replace it in place
                        f[s:e].copy_(res.factors)
                        res.factors = None
                    parts.append(res)
                orders.append(torch.cat([c.order for c in parts]))
                traces.append(torch.cat([c.trace for c in parts]).float())
                if cfg.nm_pair is None:
                    alphas.append(torch.cat([c.alphas for c in parts]).to(f.dtype))
                else:
                    weights.append(torch.cat([c.weights for c in parts]))
            self.layer_traces[name] = _LayerTrace(
                est.layout, orders, traces, alphas if cfg.nm_pair is None else None, weights if cfg.nm_pair else None
            )
        self.fisher_consumed = True
        self.timings["traces_s"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- steps 3-4: allocation and updates
    @torch.no_grad()
    def models_for(self, targets: Sequence[float]) -> dict[float, SparsePruneResult]:
        """Pruned copies of the model for each target sparsity from the stored Fisher and traces (the sweep)."""
        if not self.layer_traces:
            raise VitPruneError("compute the OBS traces before building pruned models")
        cfg = self.config
        if cfg.nm_pair is not None:
            n, m = cfg.nm_pair
            return {(m - n) / m: self._nm_model()}
        targets = [float(t) for t in targets]
        for t in targets:
            if not 0.0 <= t < 1.0:
                raise VitPruneError(f"sparsity must be in [0, 1), got {t}")
        t0 = time.perf_counter()
        flat_traces, groups = [], []
        for li, name in enumerate(self.names):
            for tr in self.layer_traces[name].traces:
                flat_traces.append(marginal_costs(tr) if cfg.criterion == "marginal" else tr)
                groups.append(li if cfg.allocation == "layer" else 0)
        counts = allocate_counts(flat_traces, targets, groups)
        self.timings["allocation_s"] = time.perf_counter() - t0
        out = {}
        for ti, target in enumerate(targets):
            t1 = time.perf_counter()
            model = clone_model(self.model)
            linears = find_linears(model, self.names)
            masks = {}
            pos = 0
            for name in self.names:
                lt = self.layer_traces[name]
                lin = linears[name]
                w_parts = lt.layout.split(lin.weight.detach().flatten().to(cfg.device))
                new_parts, remove_parts = [], []
                for w, fac, order, alpha in zip(w_parts, self.fisher[name].blocks, lt.orders, lt.alphas, strict=True):
                    c = counts[ti][pos]
                    pos += 1
                    new = torch.empty_like(w)
                    for s in range(0, w.shape[0], cfg.chunk_blocks):
                        e = s + cfg.chunk_blocks
                        new[s:e] = replay_prefix(w[s:e], order[s:e], fac[s:e], alpha[s:e], c[s:e])
                    new_parts.append(new)
                    remove_parts.append(prefix_mask(order, c, w.shape[1]))
                lin.weight.copy_(lt.layout.merge(new_parts).view_as(lin.weight))
                masks[f"{name}.weight"] = ~lt.layout.merge(remove_parts).view(lin.weight.shape).cpu()
            report = self._report(target, masks, time.perf_counter() - t1)
            out[target] = SparsePruneResult(model, masks, report)
        return out

    def _nm_model(self) -> SparsePruneResult:
        t0 = time.perf_counter()
        model = clone_model(self.model)
        linears = find_linears(model, self.names)
        masks = {}
        for name in self.names:
            lt = self.layer_traces[name]
            lin = linears[name]
            lin.weight.copy_(lt.layout.merge(lt.weights).view_as(lin.weight))
            removed = [
                prefix_mask(o, torch.full((o.shape[0],), o.shape[1]), w.shape[1])
                for o, w in zip(lt.orders, lt.weights, strict=True)
            ]
            masks[f"{name}.weight"] = ~lt.layout.merge(removed).view(lin.weight.shape).cpu()
        n, m = self.config.nm_pair
        return SparsePruneResult(model, masks, self._report((m - n) / m, masks, time.perf_counter() - t0))

    def _report(self, target: float, masks: dict[str, Tensor], update_s: float) -> dict[str, Any]:
        cfg = self.config
        rep: dict[str, Any] = {
            "method": "obs",
            "target": target,
            "nm": cfg.nm,
            "allocation": cfg.allocation,
            "criterion": cfg.criterion,
            **self.info,
            "timings_s": {**self.timings, "update_s": update_s},
            "peak_rss_bytes": peak_rss_bytes(),
        }
        rep.update(sparsity_report(masks))
        return rep

    # ---------------------------------------------------------------- all together
    def prune(
        self, loader: Iterable, targets: Sequence[float], masks: dict[str, Tensor] | None = None
    ) -> dict[float, SparsePruneResult]:
        """One-shot OBS for one or several targets (one Fisher, one set of traces, one model per target)."""
        self.estimate_fisher(loader)
        self.compute_traces(masks)
        return self.models_for(targets)

    # ---------------------------------------------------------------- gradual
    def gradual(
        self,
        calib_loader: Iterable,
        train_loader: Iterable,
        schedule: Sequence[float],
        train_config: Any,
        out_dir: str | Path,
        teacher: nn.Module | None = None,
        eval_fn: Callable[[nn.Module], float] | None = None,
        eval_every: int = 0,
        device: str = "cpu",
    ) -> dict[str, Any]:
        """Gradual OBS pruning over ``schedule`` (increasing sparsities) with masked recovery between levels.

        Per level ``i`` (directory ``out_dir/level_<i>_s<sparsity>``): a fresh Fisher and OBS step on the current
        model, keeping already pruned weights pruned (saved to ``obs/``: model + masks); then recovery training
        with ``Trainer(masks=WeightMasks(...))`` and a new optimizer and learning-rate schedule (the restart
        each cycle); ``eval_fn(model) -> score`` (higher is better) picks the best of {right after the OBS step,
        every ``eval_every`` steps, the end of training}; the best is saved to ``best/`` (model, masks, report)
        and starts the next level. Re-running with the same ``out_dir`` resumes: finished levels are loaded,
        a level interrupted during training reloads its ``obs/`` state and the Trainer resumes from its
        checkpoint.
        """
        import dataclasses

        from vitprune.training.checkpoint import CHECKPOINT_NAME
        from vitprune.training.engine import Trainer
        from vitprune.training.masks import WeightMasks

        schedule = [float(s) for s in schedule]
        if not schedule or any(b <= a for a, b in itertools.pairwise(schedule)) or not 0 < schedule[-1] < 1:
            raise VitPruneError(f"the gradual schedule must be increasing sparsities in (0, 1), got {schedule}")
        if self.config.nm_pair is not None:
            raise VitPruneError("gradual pruning is for unstructured sparsity; run N:M one-shot")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        masks: dict[str, Tensor] | None = None
        levels = []
        for i, target in enumerate(schedule):
            level_dir = out / f"level_{i}_s{target:.2f}"
            if (level_dir / "best").is_dir():  # finished on an earlier run
                self.model, masks = _load_state(level_dir / "best")
                levels.append(json.loads((level_dir / "best" / "report.json").read_text()))
                continue
            t0 = time.perf_counter()
            if (level_dir / "obs").is_dir():  # interrupted during recovery training
                model, masks = _load_state(level_dir / "obs")
                obs_report = json.loads((level_dir / "obs" / "report.json").read_text())
            else:
                res = self.prune(calib_loader, [target], masks)[target]
                model, masks, obs_report = res.model, res.masks, res.report
                _save_state(level_dir / "obs", model, masks, obs_report)
            keeper = _BestKeeper(eval_fn, eval_every, level_dir / "candidate")
            keeper.consider(model, step=0)
            has_ckpt = (level_dir / "train" / CHECKPOINT_NAME).is_file()
            cfg = dataclasses.replace(train_config, resume=has_ckpt, overwrite=not has_ckpt)
            trainer = Trainer(
                model,
                cfg,
                train_loader,
                teacher=teacher,
                masks=WeightMasks(masks),
                out_dir=level_dir / "train",
                device=device,
                hooks=(keeper,),
            )
            fit = trainer.fit()
            model = trainer.model.cpu().eval()
            keeper.consider(model, step=fit.get("steps", -1))
            best = keeper.best(model)
            report = {
                "level": i,
                "target": target,
                "obs": obs_report,
                "level_s": time.perf_counter() - t0,
                "train": jsonable(fit),
                "best_score": keeper.best_score,
                "best_step": keeper.best_step,
                "scores": keeper.history,
            }
            _save_state(level_dir / "best", best, masks, report)
            self.model = best
            levels.append(report)
        summary = {"schedule": schedule, "levels": levels, "config": jsonable(asdict(self.config))}
        atomic_write_text(out / "gradual_report.json", json.dumps(jsonable(summary), indent=2) + "\n", overwrite=True)
        return {"model": self.model, "masks": masks, "report": summary}


class _BestKeeper:
    """Trainer hook: every ``every`` steps score the model with ``eval_fn``; the best is saved to ``directory``
    (so an interrupted level still knows its best candidate when it resumes)."""

    def __init__(self, eval_fn: Callable[[nn.Module], float] | None, every: int, directory: Path) -> None:
        self.eval_fn, self.every, self.directory = eval_fn, every, Path(directory)
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.history: list[list[float]] = []
        if (self.directory / "report.json").is_file():
            rec = json.loads((self.directory / "report.json").read_text())
            self.best_score, self.best_step = rec["score"], rec["step"]

    def __call__(self, trainer: Any, step: int) -> None:
        if self.every and step % self.every == 0:
            self.consider(trainer.model, step)

    @torch.no_grad()
    def consider(self, model: nn.Module, step: int) -> None:
        if self.eval_fn is None:
            return
        was = model.training
        model.eval()
        score = float(self.eval_fn(model))
        model.train(was)
        self.history.append([step, score])
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_step = score, step
            _save_state(self.directory, model, None, {"score": score, "step": step}, overwrite=True)

    def best(self, current: nn.Module) -> nn.Module:
        """The best model seen (``current`` when nothing was scored)."""
        if self.eval_fn is None or not (self.directory / "model").is_dir():
            return current
        from vitprune.models.io import load

        return load(self.directory / "model").eval()


def _save_state(
    directory: Path, model: nn.Module, masks: dict[str, Tensor] | None, report: dict[str, Any], overwrite: bool = False
) -> None:
    """Atomically write ``model/`` (vitprune format), ``masks.safetensors`` and ``report.json``."""
    from vitprune.models.io import save

    with atomic_path(directory, overwrite=overwrite, is_dir=True) as tmp:
        save(clone_model(model).cpu(), tmp / "model")
        if masks is not None:
            save_file({k: v.to(torch.uint8).contiguous() for k, v in masks.items()}, str(tmp / "masks.safetensors"))
        (tmp / "report.json").write_text(json.dumps(jsonable(report), indent=2) + "\n")


def _load_state(directory: Path) -> tuple[nn.Module, dict[str, Tensor]]:
    from vitprune.models.io import load

    model = load(directory / "model").eval()
    masks = {k: v.bool() for k, v in load_file(str(directory / "masks.safetensors")).items()}
    return model, masks


def _available_grads(loader: Iterable, grad_mode: str) -> int | None:
    try:
        return len(loader.dataset) if grad_mode == "per_sample" else len(loader)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None


class OBSPruner(UnstructuredPruner):
    """oViT/OBS: second-order unstructured pruning (block Fisher inverse, global threshold, sweep, N:M, gradual)."""

    Config: ClassVar[type[OBSConfig]] = OBSConfig

    def calibration_images(self) -> int | None:
        return self.config.num_grads

    def solver(self, model: nn.Module, device: str | torch.device = "cpu") -> OBSSolver:
        return OBSSolver(model, replace(self.config, device=str(device)), self.loss_fn)

    loss_fn: LossFn | None = None

    def sparsify(self, model: nn.Module, run: Run) -> dict[float, Any]:
        if run.data.calib is None:
            raise VitPruneError("obs needs calibration data")
        return self.solver(model, run.device).prune(run.data.calib, self.config.targets)

    def run(self, model: nn.Module, run: Run) -> list[PruneResult]:
        """One-shot sweep (the base), or gradual pruning over ``schedule`` with masked recovery per level."""
        cfg = self.config
        if not cfg.schedule:
            return super().run(model, run)
        if run.workdir is None:
            raise VitPruneError("gradual OBS (--schedule) needs a run directory (--out) to resume from")
        t0 = time.perf_counter()
        train_cfg = cfg.trainer_config(cfg.steps_per_level, cfg.finetune_lr, cfg.ckpt_every)
        top1 = (lambda m: float(run.eval_fn(m)["top1"])) if run.eval_fn is not None else None
        out = self.solver(model, run.device).gradual(
            run.data.calib,
            run.data.train,
            cfg.schedule,
            train_cfg,
            run.workdir / "gradual",
            teacher=run.teacher,
            eval_fn=top1,
            eval_every=cfg.eval_every,
            device=str(run.device),
        )
        final = out["model"].eval()
        report = self.header() | {"schedule": list(cfg.schedule), "levels": out["report"]["levels"]}
        report |= sparsity_report(out["masks"])
        if run.eval_fn is not None:
            report["dense_eval"] = run.eval(model)
            report["eval"] = run.eval(final)
        report["time_s"] = round(time.perf_counter() - t0, 2)
        return [PruneResult(final, out["masks"], jsonable(report), cfg.schedule[-1])]


__all__ = ["OBSConfig", "OBSPruner", "OBSSolver", "marginal_costs", "peak_rss_bytes"]
