"""Calibration passes shared by the unstructured pruners (OBS, Wanda, SparseGPT) and their common result type.

- :func:`find_linears`: the prunable ``nn.Linear`` modules selected by name patterns;
- :func:`iter_gradients`: streams gradients of the loss w.r.t. those weights, either one per mini-batch (the
  paper's estimator) or one per *sample*. Per-sample gradients of a linear ``y = x W^T`` are exactly
  ``sum_t dy_t x_t^T`` over the sample's tokens, so they come from one batched backward (w.r.t. the linear
  outputs) plus one ``bmm`` per layer, with no per-sample loop;
- :func:`capture_block_inputs` / :func:`sequential_block_stats`: the layer-wise input statistics (``X^T X`` or
  squared column norms) of Wanda and SparseGPT, collected block by block so that each block sees the inputs
  produced by the already-pruned blocks before it (as in both papers).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitprune.errors import VitPruneError

DEFAULT_PATTERNS = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2")
LossFn = Callable[[Tensor, Tensor], Tensor]


def find_linears(model: nn.Module, patterns: Iterable[str] = DEFAULT_PATTERNS) -> dict[str, nn.Linear]:
    """``{module name: nn.Linear}`` whose name matches one of the ``fnmatch`` patterns (empty layers skipped)."""
    patterns = list(patterns)
    found = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and mod.weight.numel() > 0 and any(fnmatch.fnmatch(name, p) for p in patterns)
    }
    if not found:
        raise VitPruneError(f"no prunable linear layer matches {', '.join(patterns)}")
    return found


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(images, labels)`` from a loader batch (tuple/list or bare tensor)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise VitPruneError(f"unsupported batch type from the data loader: {type(batch).__name__}")


def take_batches(
    loader: Iterable, num_images: int, device: str | torch.device = "cpu"
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """``(images, labels)`` batches of ``loader`` on ``device`` until ``num_images`` images (the last batch cut)."""
    seen = 0
    for batch in loader:
        if seen >= num_images:
            return
        images, labels = split_batch(batch)
        k = min(images.shape[0], num_images - seen)
        seen += k
        yield images[:k].to(device), labels[:k].to(device) if labels is not None else None


def _default_loss(logits: Tensor, labels: Tensor | None, reduction: str) -> Tensor:
    if labels is None:
        raise VitPruneError("gradient calibration needs labelled data (the loader yields no labels)")
    return F.cross_entropy(logits, labels, reduction=reduction)


def iter_gradients(
    model: nn.Module,
    loader: Iterable,
    names: Iterable[str],
    num_grads: int,
    per_sample: bool = True,
    loss_fn: LossFn | None = None,
    device: str | torch.device = "cpu",
    labels: str = "data",
    seed: int = 0,
) -> Iterator[dict[str, Tensor]]:
    """Yield ``{name: (k, numel)}`` gradient chunks until ``num_grads`` gradients were produced (or data ends).

    ``per_sample``: one gradient per image of the loss of that image (``loss_fn(logits, labels)`` as a batch
    mean); otherwise one gradient per mini-batch of the mean loss. The model runs in eval mode; weights are
    untouched. ``loss_fn`` defaults to cross-entropy. ``labels="data"`` uses the loader's labels (the empirical
    Fisher of the papers); ``"model"`` draws each label from the model's own predictive distribution
    (``y ~ softmax(logits)``, seeded), whose gradient outer products average to the true Fisher.
    """
    if labels not in ("data", "model"):
        raise VitPruneError(f"gradient labels must be 'data' or 'model', got {labels!r}")
    gen = torch.Generator().manual_seed(seed)
    names = list(names)
    modules = dict(model.named_modules())
    linears = [modules[n] for n in names]
    was_training = model.training
    model.eval()
    produced = 0
    try:
        for batch in loader:
            if produced >= num_grads:
                break
            images, targets = split_batch(batch)
            images = images.to(device)
            targets = targets.to(device) if targets is not None and labels == "data" else None
            sampler = (lambda logits: _sample_labels(logits, gen)) if labels == "model" else None
            if per_sample:
                grads = _per_sample_grads(model, linears, names, images, targets, loss_fn, sampler)
            else:
                grads = _batch_grads(model, linears, names, images, targets, loss_fn, sampler)
            k = min(next(iter(grads.values())).shape[0], num_grads - produced)
            produced += k
            yield {n: g[:k] for n, g in grads.items()}
    finally:
        model.train(was_training)


def _sample_labels(logits: Tensor, gen: torch.Generator) -> Tensor:
    probs = torch.softmax(logits.detach().float(), dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=gen).squeeze(1).to(logits.device)


def _per_sample_grads(model, linears, names, images, labels, loss_fn, sampler=None) -> dict[str, Tensor]:
    inputs: dict[str, list[Tensor]] = {n: [] for n in names}
    outputs: dict[str, list[Tensor]] = {n: [] for n in names}

    def make_hook(name: str):
        def hook(_mod, args, out):
            inputs[name].append(args[0].detach())
            outputs[name].append(out)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in zip(names, linears, strict=True)]
    try:
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)  # makes every linear output part of the graph
            logits = model(x)
            if any(len(v) != 1 for v in outputs.values()):
                raise VitPruneError("a prunable linear was called more or less than once per forward pass")
            labels = sampler(logits) if sampler is not None else labels
            loss = loss_fn(logits, labels) * logits.shape[0] if loss_fn else _default_loss(logits, labels, "sum")
            dys = torch.autograd.grad(loss, [outputs[n][0] for n in names])
    finally:
        for h in handles:
            h.remove()
    b = images.shape[0]
    out = {}
    for name, dy in zip(names, dys, strict=True):
        xin = inputs[name][0].reshape(b, -1, inputs[name][0].shape[-1])
        dy = dy.reshape(b, -1, dy.shape[-1])
        out[name] = torch.bmm(dy.transpose(1, 2), xin).reshape(b, -1)
    return out


def _batch_grads(model, linears, names, images, labels, loss_fn, sampler=None) -> dict[str, Tensor]:
    weights = [m.weight for m in linears]
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            logits = model(images)
            labels = sampler(logits) if sampler is not None else labels
            loss = loss_fn(logits, labels) if loss_fn else _default_loss(logits, labels, "mean")
            grads = torch.autograd.grad(loss, weights)
    finally:
        for w, f in zip(weights, flags, strict=True):
            w.requires_grad_(f)
    return {n: g.reshape(1, -1) for n, g in zip(names, grads, strict=True)}


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, loader: Iterable, num_samples: int, device: str | torch.device = "cpu"
) -> tuple[Tensor, Tensor | None]:
    """Inputs of ``model.blocks[0]`` (tokens ``(N, T, D)``) for the first ``num_samples`` images, and the emb mask."""
    captured: list[Tensor] = []
    mask: list[Tensor | None] = [None]

    def pre_hook(_mod, args):
        captured.append(args[0].detach())
        mask[0] = args[1] if len(args) > 1 else None
        raise _Stop

    handle = model.blocks[0].register_forward_pre_hook(pre_hook)
    was_training = model.training
    model.eval()
    try:
        for images, _ in take_batches(loader, num_samples, device):
            with contextlib.suppress(_Stop):
                model(images)
    finally:
        handle.remove()
        model.train(was_training)
    if not captured:
        raise VitPruneError("the calibration loader yielded no images")
    return torch.cat(captured)[:num_samples], mask[0]


@dataclass
class InputStats:
    """Statistics of one linear's inputs over ``count`` rows (tokens): ``gram = X^T X`` and/or ``sqnorm``."""

    gram: Tensor | None = None
    sqnorm: Tensor | None = None
    count: int = 0


def input_stats_hook(stats: InputStats, gram: bool):
    def hook(_mod, args, _out):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        if gram:
            stats.gram = x.T @ x if stats.gram is None else stats.gram.addmm_(x.T, x)
        sq = x.pow(2).sum(0)
        stats.sqnorm = sq if stats.sqnorm is None else stats.sqnorm.add_(sq)
        stats.count += x.shape[0]

    return hook


@torch.no_grad()
def sequential_block_stats(
    model: nn.Module,
    tokens: Tensor,
    emb_mask: Tensor | None,
    names: Iterable[str],
    prune_layers: Callable[[dict[str, tuple[nn.Linear, InputStats]]], None],
    gram: bool = True,
    batch_size: int = 32,
) -> None:
    """Block by block: collect input statistics of the selected linears, call ``prune_layers``, move on.

    ``tokens`` are the inputs of block 0 (:func:`capture_block_inputs`). For block ``i`` the statistics of all of
    its selected linears come from one pass of the (still dense) block over the current tokens; after
    ``prune_layers({name: (linear, stats)})`` has changed the weights, the pruned block's outputs become the
    next block's inputs. Selected linears outside ``model.blocks`` are not handled here.
    """
    names = set(names)
    modules = dict(model.named_modules())
    x = tokens.clone()
    for i, block in enumerate(model.blocks):
        own = sorted(n for n in names if n.startswith(f"blocks.{i}."))
        stats = {n: InputStats() for n in own}
        handles = [modules[n].register_forward_hook(input_stats_hook(stats[n], gram)) for n in own]
        try:
            for s in range(0, x.shape[0], batch_size):
                block(x[s : s + batch_size], emb_mask)
        finally:
            for h in handles:
                h.remove()
        if own:
            prune_layers({n: (modules[n], stats[n]) for n in own})
        x = torch.cat([block(x[s : s + batch_size], emb_mask) for s in range(0, x.shape[0], batch_size)])


@dataclass
class SparsePruneResult:
    """A pruned copy of the model, its unstructured masks (True = kept) and a JSON-able report."""

    model: nn.Module
    masks: dict[str, Tensor]
    report: dict[str, Any] = field(default_factory=dict)


def sparsity_report(masks: dict[str, Tensor]) -> dict[str, Any]:
    """Per-layer and total sparsity of ``masks`` (fraction of False)."""
    layers = {n: 1.0 - m.float().mean().item() for n, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    return {"sparsity": pruned / max(total, 1), "prunable_weights": total, "layer_sparsity": layers}


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def parse_nm(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)`` (keep N of every M); validates ``0 < N < M``."""
    if text is None:
        return None
    if isinstance(text, tuple):
        n, m = text
    else:
        try:
            n, m = (int(v) for v in str(text).split(":"))
        except ValueError:
            raise VitPruneError(f"N:M pattern must look like 2:4, got {text!r}") from None
    if not 0 < n < m:
        raise VitPruneError(f"N:M pattern needs 0 < N < M, got {n}:{m}")
    return n, m
