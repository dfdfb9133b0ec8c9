"""VTP: Vision Transformer Pruning with learned dimension gates and L1 sparsity (Zhu, Tang & Han, 2021).

The paper's pipeline (its Fig. 1 and method section; the seed text in shared/seeds has no equation numbers, so
the formulas are named by content), for every prunable dimension of a linear projection:

1. a learnable gate vector ``a`` (initialised to 1) multiplies the features, ``X* = X diag(a)``;
2. *sparsity training* minimises ``L(X; W, a) + lambda * sum_l ||a_l||_1``;
3. ONE global threshold ``tau`` on ``|a|`` keeps the dimensions with ``|a| >= tau`` and removes the rest; the
   surviving gate values are folded into the weights and the physically smaller model is built;
4. fine-tuning (here: distillation from the dense model).

Gates on a :class:`~vitprune.models.ViT` (kinds as in :mod:`vitprune.structures.groups`):

========  ======================================================================================================
``qk``    ``attn.qk_gate`` (qk_dim,): query dim j of every head (heads stay aligned); removing j drops q and k
          row j in every head. Folded into the q rows.
``v``     ``attn.v_gate`` (v_dim,): value dim j of every head; removing j drops v row j and the proj columns.
          Folded into the v rows.
``mlp``   ``mlp.gate`` (mlp_dim,): hidden neuron j after GELU; folded into fc2 column j.
``heads`` ``attn.head_gate`` (heads,), optional (the paper's future work): whole heads, folded into proj.
``emb``   optional: one gate per residual channel c, shared by every LayerNorm (norm1, norm2 of every block and
          the final norm) as a scale of its output, i.e. of its weight and bias (a ``torch.nn.utils.parametrize``
          parametrisation). In a pre-norm ViT the residual stream is read only through those LayerNorms, so the
          gate scales *every read* of channel c and folds exactly into the LayerNorm weights and biases.
========  ======================================================================================================

Q and K dims share one gate applied to q (the score ``(q*a) . k`` is bilinear, so one gate is enough and folds
into q alone); V dims have their own gate, so QK and V widths are pruned independently.

Exactness. After thresholding, removed gates are set to exactly 0 (for ``emb``: a 0/1 ``emb_mask``, which also
takes the removed channels out of the LayerNorm statistics) and :func:`~vitprune.structures.prune_model` folds
the kept gate values into the weights: the smaller model computes exactly what the gated model with its removed
gates at zero computes. For ``emb`` that equality holds for the *masked* gated model; the step from "gate -> 0"
to "channel removed" also drops the channel from the LayerNorm mean/variance, which a gate cannot express (a
channel's contribution to the statistics is not a foldable scale). That one-time change is what the
fine-tuning phase absorbs; it is why ``emb`` is off by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from vitprune.errors import VitPruneError
from vitprune.models.io import attach_gate
from vitprune.models.vit import KIND_GATES, ViT, carried_gates
from vitprune.pruners.base import Run
from vitprune.pruners.settings import setting
from vitprune.pruners.structural import StructuralConfig, StructuralPruner
from vitprune.structures.groups import unit_count, unit_key
from vitprune.structures.masks import StructuralMasks, apply_masks

GATE_KINDS = ("qk", "v", "mlp", "heads", "emb")
DEFAULT_GATES = ("qk", "v", "mlp")


# --------------------------------------------------------------------------------------------- embedding gate
EMB_GATE_NAME = "vtp_emb_gate"


class ScaleByGate(nn.Module):
    """Parametrisation ``w -> w * gate`` of a LayerNorm weight or bias.

    The gate is registered once, on the model (``model.vtp_emb_gate``); every LayerNorm's parametrisation holds
    an unregistered reference to it, so the state dict stores it once (safetensors refuses shared tensors) and
    ``copy.deepcopy`` keeps the sharing (one memo).
    """

    def __init__(self, gate: nn.Parameter) -> None:
        super().__init__()
        self.__dict__["_gate"] = gate  # not a submodule parameter: registered on the model only

    @property
    def gate(self) -> nn.Parameter:
        return self.__dict__["_gate"]

    def forward(self, value: Tensor) -> Tensor:
        return value * self.gate


def _layer_norms(model: ViT) -> list[nn.LayerNorm]:
    return [n for blk in model.blocks for n in (blk.norm1, blk.norm2)] + [model.norm]


def emb_gate(model: ViT) -> nn.Parameter | None:
    """The shared embedding-channel gate of ``model`` (None when not attached)."""
    return model._parameters.get(EMB_GATE_NAME)


def _attach_emb_gate(model: ViT) -> nn.Parameter:
    ref = model.pos_embed
    gate = nn.Parameter(torch.ones(model.embed_dim, device=ref.device, dtype=ref.dtype))
    model.register_parameter(EMB_GATE_NAME, gate)
    for norm in _layer_norms(model):
        for name in ("weight", "bias"):
            parametrize.register_parametrization(norm, name, ScaleByGate(gate))
    return gate


@torch.no_grad()
def fold_emb_gate(model: ViT) -> ViT:
    """Fold the embedding gate into every LayerNorm's weight and bias (exact), in place.

    Each parametrised LayerNorm is *replaced* by a plain one holding ``weight * a`` and ``bias * a``, rather than
    calling ``remove_parametrizations`` (which edits the parametrised class shared with any deep copy).
    """
    if emb_gate(model) is None:
        return model

    def plain(norm: nn.LayerNorm) -> nn.LayerNorm:
        w, b = norm.weight, norm.bias
        out = nn.LayerNorm(w.shape[0], eps=norm.eps, device=w.device, dtype=w.dtype)
        out.weight.copy_(w)
        out.bias.copy_(b)
        return out

    for blk in model.blocks:
        blk.norm1 = plain(blk.norm1)
        blk.norm2 = plain(blk.norm2)
    model.norm = plain(model.norm)
    del model._parameters[EMB_GATE_NAME]
    return model


# --------------------------------------------------------------------------------------------- gates
def _check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in GATE_KINDS]
    if bad:
        raise VitPruneError(f"unknown VTP gate kind(s): {', '.join(bad)} (expected some of {', '.join(GATE_KINDS)})")
    if not kinds:
        raise VitPruneError("no VTP gate kinds selected")
    return kinds


def attach_vtp_gates(model: ViT, kinds: Sequence[str] = DEFAULT_GATES) -> dict[str, nn.Parameter]:
    """Attach learnable gates (initialised to 1) of ``kinds`` to ``model`` in place (VTP: ``X* = X diag(a)``).

    Returns the gates keyed by :func:`vitprune.structures.groups.unit_key` (``"blocks.3.qk"``, ``"emb"``).
    Blocks whose branch is already empty (0 heads / 0 QK or V dims / 0 MLP neurons) get no gate of that kind.
    """
    kinds = _check_kinds(kinds)
    existing = carried_gates(model)
    if existing:
        raise VitPruneError(f"model already carries gates ({existing[0]}, ...): prune or remove them first")
    ref = model.pos_embed
    gates: dict[str, nn.Parameter] = {}
    for b, blk in enumerate(model.blocks):
        for kind in kinds:
            if kind == "emb":
                continue
            n = unit_count(model.config, kind, b)
            if n == 0:
                continue
            sub, name = KIND_GATES[kind]
            module = getattr(blk, sub)
            attach_gate(module, name, torch.ones(n, device=ref.device, dtype=ref.dtype), learnable=True)
            gates[unit_key(kind, b)] = module._parameters[name]
    if "emb" in kinds:
        gates["emb"] = _attach_emb_gate(model)
    return gates


def vtp_gates(model: ViT) -> dict[str, nn.Parameter]:
    """The learnable VTP gates present on ``model`` keyed by unit key (block kinds first, then ``emb``)."""
    gates: dict[str, nn.Parameter] = {}
    for b, blk in enumerate(model.blocks):
        for kind, (sub, name) in KIND_GATES.items():
            p = getattr(blk, sub)._parameters.get(name)
            if p is not None:
                gates[unit_key(kind, b)] = p
    g = emb_gate(model)
    if g is not None:
        gates["emb"] = g
    return gates


def l1_penalty(gates: dict[str, Tensor] | Iterable[Tensor]) -> Tensor:
    """``sum_l ||a_l||_1`` over every gate vector (the VTP sparsity term, multiplied by lambda by the caller)."""
    values = list(gates.values()) if isinstance(gates, dict) else list(gates)
    if not values:
        raise VitPruneError("no gates to regularise")
    return torch.stack([v.abs().sum() for v in values]).sum()


def gate_stats(gates: dict[str, Tensor], eps: float = 1e-2) -> dict[str, float]:
    """Summary of the gate magnitudes: mean, min, max |a| and the fraction below ``eps``."""
    flat = torch.cat([g.detach().abs().reshape(-1).float().cpu() for g in gates.values()])
    return {
        "mean": float(flat.mean()),
        "min": float(flat.min()),
        "max": float(flat.max()),
        f"frac_below_{eps:g}": float((flat < eps).float().mean()),
        "count": int(flat.numel()),
    }


# --------------------------------------------------------------------------------------------- fold + prune
@torch.no_grad()
def zero_removed_gates(model: ViT, masks: StructuralMasks) -> ViT:
    """Set the removed units' gates to exactly 0 (and a 0/1 ``emb_mask``): the gated model equals the pruned one."""
    gates = vtp_gates(model)
    g = gates.get("emb")
    if g is not None:
        g.mul_(masks.emb.to(device=g.device, dtype=g.dtype))
    apply_masks(model, masks)
    return model


class GateOptimizerHook:
    """Post-step hook giving the gates their own AdamW (no weight decay) at ``gate_lr`` (x the run's schedule).

    The Trainer's optimizer updates every parameter at one learning rate; with Adam a gate then moves by at most
    about ``lr`` per step, so at fine-tuning rates (1e-4) gates barely leave 1 within a short budget. This hook
    takes one extra step on the gates with the same gradient (``p.grad`` of the step, which holds the L1 term
    ``lambda * sign(a)`` because the regulariser is in the loss). Its state lives in ``trainer.extra_state`` and is
    checkpointed, so a resumed run continues bit-identically.
    """

    KEY = "vtp_gate_optimizer"

    def __init__(self, gates: dict[str, nn.Parameter], gate_lr: float, base_lr: float) -> None:
        self.gates = list(gates.values())
        self.gate_lr = gate_lr
        self.base_lr = base_lr
        self.optimizer: torch.optim.Optimizer | None = None

    def __call__(self, trainer: Any, step: int) -> None:
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(self.gates, lr=self.gate_lr, weight_decay=0.0)
            saved = trainer.extra_state.get(self.KEY)
            if saved is not None:
                self.optimizer.load_state_dict(saved)
        for group in self.optimizer.param_groups:
            group["lr"] = self.gate_lr * trainer.lr / self.base_lr
        self.optimizer.step()
        trainer.extra_state[self.KEY] = self.optimizer.state_dict()


class GateLogHook:
    """Post-step hook recording ``sum |a|`` and gate statistics every ``every`` steps in ``extra_state``."""

    KEY = "vtp_gate_log"

    def __init__(self, gates: dict[str, nn.Parameter], every: int) -> None:
        self.gates = gates
        self.every = max(int(every), 1)

    def __call__(self, trainer: Any, step: int) -> None:
        if step % self.every and step != trainer.total_steps:
            return
        with torch.no_grad():
            rec = {"step": int(step), "l1": float(l1_penalty(self.gates))} | gate_stats(self.gates)
        trainer.extra_state.setdefault(self.KEY, []).append(rec)


# --------------------------------------------------------------------------------------------- pruner
@dataclass
class VTPConfig(StructuralConfig):
    """Settings of one VTP run (see :class:`VTPPruner`); one global threshold on ``|a|`` by default."""

    kinds: tuple[str, ...] = setting(
        DEFAULT_GATES, kind="strs", choices=GATE_KINDS, flag="gates", help="gated kinds: qk,v,mlp plus heads, emb"
    )
    selection: str = setting("threshold", choices=("greedy", "threshold", "uniform"), help="global selection rule")
    lam: float = setting(1e-4, low=0.0, flag="lambda", help="L1 weight lambda on the gates")
    sparsity_steps: int = setting(1000, low=0, help="steps of L1 sparsity training of weights and gates")
    finetune_steps: int = setting(1000, low=0, help="distillation fine-tuning steps after surgery (0: none)")
    gate_lr: float | None = setting(
        1e-2, kind="float", low=0.0, low_open=True, nullable=True, zero_is_none=True,
        help="extra AdamW step on the gates at this rate (0: none, as the paper)",
    )  # fmt: skip
    grad_clip: float = setting(0.0, low=0.0, help="gradient-norm clipping (0: off)")

    def check(self) -> None:
        super().check()
        _check_kinds(self.kinds)


class VTPPruner(StructuralPruner):
    """VTP: learned dimension gates with L1 sparsity, one global threshold, fine-tuning.

    Gates -> L1 sparsity training (:meth:`prepare`) -> scores = ``|a|`` -> one global threshold ->
    gates folded into the weights (:meth:`before_surgery`) -> surgery -> fine-tuning.

    With a ``workdir`` the gate training is a resumable Trainer run in ``workdir/sparsity``.
    """

    Config: ClassVar[type[VTPConfig]] = VTPConfig

    @classmethod
    def budget_settings(cls, steps: int, rounds: int) -> dict[str, Any]:
        """VTP spends its training budget on the gates (L1 sparsity training), then selects once."""
        return {"prune_steps": 1, "train_steps_between": 0, "sparsity_steps": steps}

    def prepare(self, student: ViT, run: Run) -> dict[str, Any]:
        from vitprune.training.engine import Trainer

        cfg = self.config
        self._gates = gates = attach_vtp_gates(student, cfg.kinds)
        if cfg.sparsity_steps <= 0:
            return {}
        hooks: list[Callable] = []
        if cfg.gate_lr is not None:
            hooks.append(GateOptimizerHook(gates, cfg.gate_lr, cfg.lr))
        hooks.append(GateLogHook(gates, cfg.log_every))
        lam = float(cfg.lam)
        trainer = Trainer(
            student,
            cfg.trainer_config(cfg.sparsity_steps, cfg.lr, cfg.ckpt_every, run.resume, True),
            run.data.train,
            teacher=run.teacher,
            out_dir=run.sub("sparsity"),
            device=run.device,
            hooks=hooks,
            regularizer=lambda _m: lam * l1_penalty(gates),
        )
        summary = {k: v for k, v in trainer.fit().items() if k != "config"}
        student.eval()
        return {"sparsity": summary, "gate_log": trainer.extra_state.get(GateLogHook.KEY, [])}

    def scores(self, student: ViT, batches: Iterator, step: int, run: Run) -> dict[str, Tensor]:
        gates = getattr(self, "_gates", None) or vtp_gates(student)  # attach order: ties spread as in the paper code
        return {k: g.detach() for k, g in gates.items()}

    def before_surgery(self, student: ViT, masks: StructuralMasks, run: Run) -> Any:
        gates = vtp_gates(student)
        stats = {
            key: {"kept": int(masks.get(key).sum()), "total": int(g.numel())} | gate_stats({key: g})
            for key, g in gates.items()
        }
        probe = _first_images(run.data.train, run.device)
        zero_removed_gates(student, masks)
        with torch.no_grad():
            gated_out = student(probe) if probe is not None else None
        fold_emb_gate(student)
        return {"gates": stats, "probe": probe, "gated_out": gated_out}

    def after_surgery(self, small: ViT, state: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"gates": state["gates"]}
        if state["probe"] is not None:
            with torch.no_grad():
                diff = (small.eval()(state["probe"]) - state["gated_out"]).abs().max()
            out["fold_check"] = {"max_abs_logit_diff": float(diff), "images": int(state["probe"].shape[0])}
        return out


def _first_images(loader: Iterable, device: torch.device, n: int = 8) -> Tensor | None:
    """A few images from the loader, to check that the pruned model equals the gated one on real data."""
    try:
        batch = next(iter(loader))
    except (StopIteration, TypeError):
        return None
    x = batch if isinstance(batch, Tensor) else batch[0]
    return x[:n].to(device)


__all__ = [
    "DEFAULT_GATES",
    "GATE_KINDS",
    "GateLogHook",
    "GateOptimizerHook",
    "VTPConfig",
    "VTPPruner",
    "attach_vtp_gates",
    "fold_emb_gate",
    "gate_stats",
    "l1_penalty",
    "vtp_gates",
    "zero_removed_gates",
]
