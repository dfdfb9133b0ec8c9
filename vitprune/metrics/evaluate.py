"""Top-1 / top-5 accuracy and mean cross-entropy of a classifier over a DataLoader."""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from vitprune.errors import VitPruneError
from vitprune.models.vit import logits_of

_ERROR_PREFIX = "vitprune.errors.VitPruneError: "


def _one_line(exc: VitPruneError) -> VitPruneError:
    """A VitPruneError re-raised from a DataLoader worker carries the worker's traceback: keep its last line."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return exc
    last = lines[-1].strip()
    return VitPruneError(last[len(_ERROR_PREFIX) :] if last.startswith(_ERROR_PREFIX) else last)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def topk_correct(logits: Tensor, targets: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the ``k`` highest logits, for each ``k`` (``k`` capped at C)."""
    kmax = min(max(ks), logits.shape[-1])
    top = logits.topk(kmax, dim=-1).indices  # (B, kmax), highest first
    hits = top.eq(targets.view(-1, 1))
    return [int(hits[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, float]:
    """Accuracy of ``model`` on ``loader`` batches ``(images, labels)``.

    Returns ``top1``/``top5`` in percent, mean cross-entropy ``loss``, the sample count ``n`` and ``seconds``.
    Runs in eval mode under ``torch.inference_mode`` (the previous train/eval mode is restored). Under
    ``torch.distributed`` the counts are summed over ranks, so every rank returns the global result.
    """
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    stats = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, n
    show = progress and (not _distributed() or dist.get_rank() == 0)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            bar = tqdm(loader, desc="eval", unit="batch", disable=not show, leave=False)
            for images, targets in bar:
                images = images.to(device, non_blocking=True)
                targets = torch.as_tensor(targets).to(device, non_blocking=True)
                logits = logits_of(model(images))  # a distilled model's (cls, dist) pair averaged
                c = logits.shape[-1]
                if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= c):
                    raise VitPruneError(
                        f"label {int(targets.max())} out of range for a model with {c} classes "
                        "(check the classes file / --num-classes)"
                    )
                c1, c5 = topk_correct(logits, targets)
                loss = F.cross_entropy(logits.float(), targets, reduction="sum")
                stats += torch.tensor([c1, c5, float(loss), targets.numel()], dtype=torch.float64)
                if show:
                    bar.set_postfix(top1=f"{100.0 * stats[0].item() / max(stats[3].item(), 1):.2f}")
    except VitPruneError as exc:
        raise _one_line(exc) from None
    finally:
        model.train(was_training)
    if _distributed():
        backend = dist.get_backend()
        buf = stats.to(device) if backend == "nccl" else stats
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        stats = buf.cpu()
    n = int(stats[3].item())
    if n == 0:
        raise VitPruneError("evaluation data is empty")
    return {
        "top1": 100.0 * stats[0].item() / n,
        "top5": 100.0 * stats[1].item() / n,
        "loss": stats[2].item() / n,
        "n": n,
        "seconds": time.perf_counter() - start,
    }
