"""Deploy unstructured-sparse ViTs: compressed storage, CPU CSR linears, GPU 2:4 semi-structured linears.

- :func:`save_sparse` / :func:`load_sparse`: every weight whose compressed form is smaller is stored as a
  bitmask (``numpy.packbits`` of ``w != 0``, row-major) plus its non-zero values in the original dtype, in one
  ``safetensors`` file next to ``config.json``; everything else is stored dense. Reloading rebuilds the dense
  :class:`~vitprune.models.vit.ViT` bit for bit. Shrinks files at any sparsity above about 1/32 (fp32).
- :func:`convert_to_csr`: replaces ``nn.Linear`` layers above a sparsity threshold by :class:`CSRLinear`
  (``torch.sparse_csr_tensor`` weight, ``torch.sparse.mm``) for CPU inference. Whether that is faster than
  the dense matmul depends on sparsity, shapes and the machine: measure (METHODS.md section 5 saw a gain on
  2 cores only from about 85-90 %).
- :func:`to_semi_structured`: 2:4-sparse weights as ``torch.sparse.to_sparse_semi_structured`` tensors
  (fp16/bf16, CUDA GPUs with compute capability >= 8.0 only); elsewhere it raises a clear error.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from vitprune.errors import VitPruneError
from vitprune.models.config import ViTConfig
from vitprune.models.io import CONFIG_NAME, attach_gate, load_state_dict_strict
from vitprune.models.vit import GATE_NAMES, ViT
from vitprune.utils.fs import atomic_path

SPARSE_WEIGHTS_NAME = "model.sparse.safetensors"
FORMAT_TAG = "vitprune-sparse"
_MASK, _VALUES = ".__bitmask__", ".__values__"


def is_sparse_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file() and (p / SPARSE_WEIGHTS_NAME).is_file()


def compressed_bytes(t: Tensor) -> int:
    """Bytes of the bitmask + values form of ``t``."""
    return (t.numel() + 7) // 8 + int((t != 0).sum()) * t.element_size()


def save_sparse(model: ViT, directory: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """Write ``model`` compressed to ``directory`` (atomically); returns sizes and the compressed tensors."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors: dict[str, Tensor] = {}
    shapes: dict[str, list[int]] = {}
    compressed = []
    for key, value in state.items():
        if (
            value.is_floating_point()
            and value.ndim >= 2
            and compressed_bytes(value) < value.numel() * value.element_size()
        ):
            nz = value != 0
            tensors[key + _MASK] = torch.from_numpy(np.packbits(nz.flatten().numpy()))
            tensors[key + _VALUES] = value[nz].contiguous()
            shapes[key] = list(value.shape)
            compressed.append(key)
        else:
            tensors[key] = value
    meta = {"format": FORMAT_TAG, "shapes": json.dumps(shapes)}
    with atomic_path(directory, overwrite=overwrite, is_dir=True) as tmp:
        save_file(tensors, str(tmp / SPARSE_WEIGHTS_NAME), metadata=meta)
        (tmp / CONFIG_NAME).write_text(model.config.to_json() + "\n")
    dense_bytes = sum(v.numel() * v.element_size() for v in state.values())
    file_bytes = (Path(directory) / SPARSE_WEIGHTS_NAME).stat().st_size
    return {
        "path": str(directory),
        "file_bytes": file_bytes,
        "dense_bytes": dense_bytes,
        "compression": dense_bytes / file_bytes,
        "compressed_tensors": compressed,
    }


def load_sparse(directory: str | os.PathLike, map_location: str = "cpu") -> ViT:
    """Rebuild the dense :class:`ViT` saved by :func:`save_sparse` (identical tensors)."""
    d = Path(directory)
    if not is_sparse_dir(d):
        raise VitPruneError(
            f"not a vitprune sparse model directory (needs {CONFIG_NAME} and {SPARSE_WEIGHTS_NAME}): {d}"
        )
    cfg = ViTConfig.from_json((d / CONFIG_NAME).read_text())
    try:
        with safe_open(str(d / SPARSE_WEIGHTS_NAME), framework="pt", device=map_location) as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise VitPruneError(f"cannot read sparse weights {d / SPARSE_WEIGHTS_NAME}: {exc}") from None
    if meta.get("format") != FORMAT_TAG:
        raise VitPruneError(f"{d / SPARSE_WEIGHTS_NAME} is not a {FORMAT_TAG} file")
    shapes = json.loads(meta.get("shapes", "{}"))
    state = {k: v for k, v in raw.items() if not k.endswith((_MASK, _VALUES))}
    for key, shape in shapes.items():
        numel = int(np.prod(shape))
        bits = np.unpackbits(raw[key + _MASK].cpu().numpy(), count=numel).astype(bool)
        values = raw[key + _VALUES]
        if int(bits.sum()) != values.numel():
            raise VitPruneError(f"{d / SPARSE_WEIGHTS_NAME}: bitmask and values of {key} disagree")
        dense = torch.zeros(numel, dtype=values.dtype, device=values.device)
        dense[torch.from_numpy(bits).to(values.device)] = values
        state[key] = dense.view(shape)
    model = ViT(cfg)
    modules = dict(model.named_modules())
    for key, value in state.items():
        mod_name, _, leaf = key.rpartition(".")
        if leaf in GATE_NAMES and key not in model.state_dict():
            attach_gate(modules[mod_name], leaf, value)
    load_state_dict_strict(model, state, source=str(d))
    return model.eval()


class CSRLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held as a CSR sparse tensor (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            self.register_buffer("weight", linear.weight.detach().to_sparse_csr())
        self.register_buffer("bias", linear.bias.detach().clone() if linear.bias is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        y = torch.sparse.mm(self.weight, x.reshape(-1, self.in_features).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return f"in={self.in_features}, out={self.out_features}, density={nnz / max(self.weight.numel(), 1):.3f}"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def convert_to_csr(
    model: nn.Module, min_sparsity: float = 0.85, names: Iterable[str] | None = None, inplace: bool = False
) -> tuple[nn.Module, list[str]]:
    """Replace linears with weight sparsity ``>= min_sparsity`` by :class:`CSRLinear`; returns (model, names)."""
    if not 0.0 <= min_sparsity <= 1.0:
        raise VitPruneError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    out = model if inplace else copy.deepcopy(model)
    wanted = set(names) if names is not None else None
    replaced = []
    for name, mod in list(out.named_modules()):
        if not isinstance(mod, nn.Linear) or mod.weight.numel() == 0 or (wanted is not None and name not in wanted):
            continue
        sparsity = 1.0 - float((mod.weight != 0).float().mean())
        if sparsity >= min_sparsity:
            _set_module(out, name, CSRLinear(mod))
            replaced.append(name)
    return out.eval(), replaced


def semi_structured_status() -> tuple[bool, str]:
    """Whether 2:4 semi-structured kernels can run here, and why not."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return False, f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is available (2:4 sparse kernels need an NVIDIA GPU with compute capability >= 8.0)"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 0):
        name = torch.cuda.get_device_name()
        return False, f"{name} has compute capability {major}.{minor}; 2:4 sparse kernels need >= 8.0"
    return True, "ok"


def is_2to4(weight: Tensor) -> bool:
    """True when every group of 4 consecutive input weights has at most 2 non-zeros."""
    if weight.ndim != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def to_semi_structured(
    model: nn.Module, names: Iterable[str], dtype: torch.dtype = torch.float16, device: str = "cuda"
) -> nn.Module:
    """Copy of ``model`` in ``dtype`` on ``device`` whose named 2:4-sparse linears use semi-structured kernels."""
    ok, why = semi_structured_status()
    if not ok:
        raise VitPruneError(f"2:4 semi-structured sparse inference is unavailable: {why}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise VitPruneError(f"2:4 semi-structured kernels need float16 or bfloat16, got {dtype}")
    from torch.sparse import to_sparse_semi_structured

    out = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    modules = dict(out.named_modules())
    for name in names:
        lin = modules.get(name)
        if not isinstance(lin, nn.Linear):
            raise VitPruneError(f"{name} is not a linear layer of the model")
        if not is_2to4(lin.weight):
            raise VitPruneError(f"{name} is not 2:4 sparse (prune it with --nm 2:4 first)")
        try:
            lin.weight = nn.Parameter(to_sparse_semi_structured(lin.weight.detach()), requires_grad=False)
        except (RuntimeError, ValueError) as exc:
            raise VitPruneError(f"{name}: cannot use 2:4 kernels for shape {tuple(lin.weight.shape)}: {exc}") from None
    return out
