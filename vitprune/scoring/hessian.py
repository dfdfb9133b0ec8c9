"""NViT Hessian-aware structural saliency, accumulated over batches for every prunable group of a ViT.

NViT (Yang et al., "Global Vision Transformer Pruning with Hessian-Aware Saliency", CVPR 2023, arXiv 2110.04869,
Sec. 3.2; METHODS.md section 2): the second-order loss change of removing group S (``w_S -> 0``) is
``dL = -g_S.w_S + 1/2 w_S^T H w_S``; with the Fisher approximation ``H ~ E[g g^T]`` over mini-batches the
group saliency is

    I(S) = 1/2 E_batch[(sum_{i in S} g_i w_i)^2]

where the sum runs over every element the group removes in all linked tensors (structures/groups.py). It is an
estimate of a loss change, so scores of different kinds and blocks are comparable (one global ranking).

Computation: one backward per batch, then per parameter the product ``g * w`` is reduced along the group axes
(row sums of qkv / fc1, column sums of proj / fc2, channel sums along every embedding axis) with a handful of
tensor ops per block - no Python loop over groups. Squares are accumulated in float64; the sums and the batch
count are all-reduced across ranks (``vitprune.training.distributed.all_reduce_sum_``) when scores are read.

Gradient sources:

- ``"labels"``: cross-entropy on the data labels (empirical Fisher);
- ``"distill"``: no labels; cross-entropy on labels *sampled* from the dense teacher's softmax. Its expectation
  is the gradient of ``KL(teacher || student)``, and its second moment is the true Fisher, which at the dense
  point (student = teacher) equals the Hessian of that distillation loss exactly - where the plain KL gradient
  is identically zero and would give no signal.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from vitprune.errors import VitPruneError
from vitprune.models.vit import GATE_NAMES, logits_of
from vitprune.structures.groups import block_param_names, emb_axes, unit_key
from vitprune.training.distributed import all_reduce_sum_

MODES = ("labels", "distill")


def _gw(model: nn.Module, grads: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``g * w`` per (non-gate) parameter, from ``grads`` or from ``param.grad``."""
    out = {}
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in GATE_NAMES:
            continue
        g = grads.get(name) if grads is not None else p.grad
        out[name] = torch.zeros_like(p) if g is None else g.detach() * p.detach()
    return out


def group_sums(model: nn.Module, grads: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Per group ``sum_{i in S} g_i w_i`` for every group (NViT Sec. 3.2 inner sum), keyed by
    ``groups.unit_key``: ``"emb"`` (D,), ``"blocks.b.heads"`` (H,), ``.qk`` (dq,), ``.v`` (dv,), ``.mlp`` (M,),
    ``.block`` (1,). ``grads`` maps parameter names to gradients (default: ``param.grad``)."""
    config = model.config
    gw = _gw(model, grads)
    d = config.embed_dim
    emb = torch.zeros(d, dtype=torch.float64, device=model.pos_embed.device)
    for name, dim in emb_axes(config):
        t = gw[name]
        emb += t.movedim(dim, 0).reshape(d, -1).sum(1, dtype=torch.float64)
    out: dict[str, Tensor] = {"emb": emb}
    for b, cfg in enumerate(config.blocks):
        p = f"blocks.{b}."
        h, dq, dv = cfg.heads, cfg.qk_dim, cfg.v_dim
        rows = gw[p + "attn.qkv.weight"].sum(1, dtype=torch.float64)
        if config.qkv_bias:
            rows = rows + gw[p + "attn.qkv.bias"].double()
        q = rows[: h * dq].view(h, dq)
        k = rows[h * dq : 2 * h * dq].view(h, dq)
        v = rows[2 * h * dq :].view(h, dv)
        cols = gw[p + "attn.proj.weight"].sum(0, dtype=torch.float64).view(h, dv)
        out[unit_key("heads", b)] = q.sum(1) + k.sum(1) + v.sum(1) + cols.sum(1)
        out[unit_key("qk", b)] = q.sum(0) + k.sum(0)
        out[unit_key("v", b)] = v.sum(0) + cols.sum(0)
        out[unit_key("mlp", b)] = (
            gw[p + "mlp.fc1.weight"].sum(1, dtype=torch.float64)
            + gw[p + "mlp.fc1.bias"].double()
            + gw[p + "mlp.fc2.weight"].sum(0, dtype=torch.float64)
        )
        total = sum(gw[n].sum(dtype=torch.float64) for n in block_param_names(config, b))
        out[unit_key("block", b)] = torch.as_tensor(total, dtype=torch.float64).reshape(1)
    return out


class HessianSaliency:
    """Accumulate ``I(S) = 1/2 E_batch[(sum_S g w)^2]`` over batches for every group of ``model``.

    Call :meth:`accumulate` after each backward (or :meth:`accumulate_grads` with explicit gradients), then
    :meth:`scores`. The state is a plain dict (:meth:`state_dict`) for resumable pruners.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sumsq: dict[str, Tensor] = {}
        self.batches = 0

    def reset(self) -> None:
        self.sumsq, self.batches = {}, 0

    def accumulate_grads(self, grads: dict[str, Tensor] | None = None) -> None:
        for key, s in group_sums(self.model, grads).items():
            sq = s.square()
            if key in self.sumsq and self.sumsq[key].shape == sq.shape:
                self.sumsq[key] += sq
            else:
                self.sumsq[key] = sq
        self.batches += 1

    accumulate = accumulate_grads

    def scores(self) -> dict[str, Tensor]:
        """``I(S)`` per group (float64, on CPU), summed over all ranks' batches."""
        if not self.sumsq:
            raise VitPruneError("no saliency accumulated yet (no batches seen)")
        keys = sorted(self.sumsq)
        flat = torch.cat(
            [self.sumsq[k].reshape(-1) for k in keys] + [torch.tensor([float(self.batches)]).to(self.sumsq[keys[0]])]
        )
        all_reduce_sum_(flat)
        n = float(flat[-1])
        out, i = {}, 0
        for k in keys:
            m = self.sumsq[k].numel()
            out[k] = (0.5 * flat[i : i + m] / n).reshape(self.sumsq[k].shape).cpu()
            i += m
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sumsq": {k: v.cpu() for k, v in self.sumsq.items()}, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sumsq = {k: v.clone() for k, v in state["sumsq"].items()}
        self.batches = int(state["batches"])


def _split(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0], batch[1] if len(batch) > 1 else None
    raise VitPruneError("batches must be images or (images, labels)")


def saliency_loss(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | None,
    mode: str = "labels",
    teacher: nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The loss whose gradients feed the saliency (see the module docstring for the two modes)."""
    logits = logits_of(model(images))
    if mode == "labels":
        if labels is None:
            raise VitPruneError("saliency mode 'labels' needs labelled batches (or use mode 'distill')")
        return F.cross_entropy(logits.float(), labels)
    if mode == "distill":
        if teacher is None:
            raise VitPruneError("saliency mode 'distill' needs the dense teacher model")
        with torch.no_grad():
            t = logits_of(teacher(images))
            probs = torch.softmax(t.float(), dim=-1)
            sampled = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)
        return F.cross_entropy(logits.float(), sampled)
    raise VitPruneError(f"unknown saliency mode {mode!r} (expected one of {', '.join(MODES)})")


def compute_saliency(
    model: nn.Module,
    batches: Iterable,
    num_batches: int | None = None,
    mode: str = "labels",
    teacher: nn.Module | None = None,
    device: str | torch.device = "cpu",
    accumulator: HessianSaliency | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Run ``num_batches`` batches (all when None) through ``model`` (in eval mode: no drop-path), backprop the
    saliency loss and accumulate ``I(S)``; returns :meth:`HessianSaliency.scores`. Gradients are taken with
    ``torch.autograd.grad``, so ``param.grad`` (and any optimizer state) is left untouched."""
    if mode not in MODES:
        raise VitPruneError(f"unknown saliency mode {mode!r} (expected one of {', '.join(MODES)})")
    acc = accumulator if accumulator is not None else HessianSaliency(model)
    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher.eval()
    names = [n for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] not in GATE_NAMES and p.requires_grad]
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(total=num_batches, desc="saliency", disable=not progress, dynamic_ncols=True, leave=False)
    try:
        for i, batch in enumerate(batches):
            if num_batches is not None and i >= num_batches:
                break
            x, y = _split(batch)
            x = x.to(device)
            y = y.to(device) if y is not None else None
            loss = saliency_loss(model, x, y, mode, teacher, gen)
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            acc.accumulate_grads({n: g for n, g in zip(names, grads, strict=True) if g is not None})
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    if acc.batches == 0:
        raise VitPruneError("no batches for the saliency (empty data loader?)")
    return acc.scores()
