"""Multi-process training with ``torchrun``: process-group setup and collectives (no-ops when single-process).

``setup_distributed()`` initialises ``torch.distributed`` from the ``env://`` variables that ``torchrun`` sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL when the device is CUDA,
gloo on CPU. Pruners call :func:`all_reduce_sum_` / :func:`all_reduce_mean_` on every statistic they
accumulate over batches, so that every rank ranks and removes the same structures. See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from vitprune.errors import VitPruneError


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_distributed(device: str | torch.device = "cpu", timeout_s: float = 1800.0) -> torch.device:
    """Initialise the process group when launched by torchrun; returns this process's device.

    On CUDA each process uses GPU ``LOCAL_RANK``. Without torchrun (``WORLD_SIZE`` unset or 1) this does
    nothing and returns ``device``.
    """
    dev = torch.device(device)
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        if dev.type == "cuda" and dev.index is None and dist.is_available() and dist.is_initialized():
            dev = torch.device("cuda", local_rank())
        return dev
    if not dist.is_available():
        raise VitPruneError("this torch build has no torch.distributed support")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VitPruneError("device 'cuda' requested but no CUDA GPU is available")
        dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    from datetime import timedelta

    try:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as exc:
        raise VitPruneError(f"cannot initialise torch.distributed ({backend}): {exc}") from None
    return dev


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum_(t: Tensor) -> Tensor:
    """Sum ``t`` over all ranks in place (returns ``t``); identity when not distributed."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_(t: Tensor) -> Tensor:
    """Average ``t`` over all ranks in place (returns ``t``); identity when not distributed."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, exchanged between our own processes only) as a list by rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
