"""Save and reload a vitprune model: ``model.safetensors`` + ``config.json`` in one directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vitprune.errors import VitPruneError
from vitprune.models.config import ViTConfig
from vitprune.models.vit import GATE_NAMES, ViT
from vitprune.utils.fs import atomic_path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "vitprune"


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The model directory behind ``path``: ``path`` itself, or the model of a run directory written by
    ``vitprune prune`` / ``finetune`` / ``train`` (``RUN/model/``; a sweep with one target: ``RUN/s0.50/model/``)."""
    p = Path(path)
    if not p.is_dir() or is_model_dir(p):
        return p
    if is_model_dir(p / "model"):
        return p / "model"
    sweep = sorted(c for c in p.glob("s*.*/model") if is_model_dir(c))
    if len(sweep) == 1:
        return sweep[0]
    if len(sweep) > 1:
        names = ", ".join(str(c) for c in sweep)
        raise VitPruneError(f"{p} holds a sweep of {len(sweep)} models: give one of {names}")
    return p


def save(model: ViT, directory: str | os.PathLike, overwrite: bool = False, meta: dict | None = None) -> Path:
    """Write ``model`` to ``directory`` atomically; refuse to replace an existing path unless ``overwrite``."""
    with atomic_path(directory, overwrite=overwrite, is_dir=True) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT_TAG})
        (tmp / CONFIG_NAME).write_text(model.config.to_json() + "\n")
        if meta:
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return Path(directory)


def attach_gate(module: torch.nn.Module, name: str, value: torch.Tensor, learnable: bool = False) -> None:
    """Set gate ``name`` on ``module`` as a buffer (mask) or a learnable parameter."""
    if name in module._parameters:
        del module._parameters[name]
    if name in module._buffers:
        del module._buffers[name]
    if learnable:
        module.register_parameter(name, torch.nn.Parameter(value.clone()))
    else:
        module.register_buffer(name, value.clone())


def load(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> ViT:
    """Rebuild a model saved by :func:`save` (or the model of a run directory); the logits are identical to the
    saved model's."""
    d = resolve_model_dir(directory)
    if not d.exists():
        raise VitPruneError(f"model path not found: {d}")
    if not is_model_dir(d):
        raise VitPruneError(f"not a vitprune model directory (needs {CONFIG_NAME} and {WEIGHTS_NAME}): {d}")
    cfg = ViTConfig.from_json((d / CONFIG_NAME).read_text())
    model = ViT(cfg)
    try:
        state = load_file(str(d / WEIGHTS_NAME), device=str(map_location))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise VitPruneError(f"cannot read weights {d / WEIGHTS_NAME}: {exc}") from None
    modules = dict(model.named_modules())
    for key in list(state):
        mod_name, _, leaf = key.rpartition(".")
        if leaf in GATE_NAMES and key not in model.state_dict():
            attach_gate(modules[mod_name], leaf, state[key])
    load_state_dict_strict(model, state, source=str(d))
    return model


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` requiring exactly the model's keys and shapes; errors name the first problem."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing:
        raise VitPruneError(f"{source}: missing keys: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    if extra:
        raise VitPruneError(f"{source}: unexpected keys: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""))
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise VitPruneError(
                f"{source}: shape mismatch for {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            )
    model.load_state_dict(state, strict=True)
