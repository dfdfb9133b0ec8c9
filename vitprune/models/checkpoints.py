"""Load real checkpoints into the one :class:`ViT` representation.

Sources: a vitprune model directory, a timm/DeiT state dict (``.pth``/``.pt``/``.bin`` read with
``torch.load(weights_only=True)``, or ``.safetensors``), a timm Hugging Face Hub directory (``config.json`` with
``architecture``), a Hugging Face ``ViTForImageClassification`` / ``DeiTForImageClassificationWithTeacher``
directory, or a live timm model object.

The architecture is inferred from tensor shapes (embed dim, depth, per-block attention and MLP widths, patch
size, image size, class / distillation tokens, number of classes). Only the number of heads cannot be read
from shapes: it comes from a preset, a ``heads=`` argument, the checkpoint's own config, or safetensors
metadata naming a known architecture.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from vitprune.errors import VitPruneError, torch_load_error
from vitprune.models import io
from vitprune.models.config import BlockConfig, ViTConfig
from vitprune.models.presets import PRESETS, Preset, get_preset
from vitprune.models.vit import GATE_NAMES, ViT

TORCH_EXTENSIONS = (".pth", ".pt", ".bin")
NESTED_KEYS = ("state_dict", "model", "model_state_dict")
STRIP_PREFIXES = ("module.", "_orig_mod.")
DIR_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")

# timm keys this representation cannot express (layer scale ``ls1/ls2.gamma`` is folded instead).
_UNSUPPORTED = {
    "fc_norm.": "global-pool LayerNorm (fc_norm)",
    "norm_pre.": "pre-norm before the blocks (norm_pre)",
    "pre_logits.": "a pre-logits layer (representation_size)",
    "reg_token": "register tokens",
    "attn_pool.": "attention pooling (global_pool='map')",
}
_UNSUPPORTED_BLOCK = {
    "attn.q_norm.": "QK normalisation",
    "attn.k_norm.": "QK normalisation",
    "attn.q_bias": "separate q/v biases (BEiT style)",
    "attn.norm.": "attention output norm",
}

_HF_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


# ---------------------------------------------------------------------------------------------------- helpers


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    """Accept ``sd``, ``{"model": sd}``, ``{"state_dict": sd}`` (other entries ignored); strip wrapper prefixes."""
    if isinstance(obj, Mapping) and not _is_tensor_dict(obj):
        for key in NESTED_KEYS:
            if key in obj and _is_tensor_dict(obj[key]):
                obj = obj[key]
                break
    if not _is_tensor_dict(obj) or not obj:
        raise VitPruneError(f"{source}: not a state dict (expected a mapping of parameter names to tensors)")
    return strip_prefixes(obj)


def strip_prefixes(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    out = {}
    for key, value in sd.items():
        changed = True
        while changed:
            changed = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def _require(sd: Mapping[str, Tensor], key: str, source: str, ndim: int | None = None) -> Tensor:
    if key not in sd:
        raise VitPruneError(f"{source}: missing key {key}")
    t = sd[key]
    if ndim is not None and t.ndim != ndim:
        raise VitPruneError(f"{source}: {key} should have {ndim} dimensions, has shape {tuple(t.shape)}")
    return t


def _resolve_preset(preset: str | Preset | None) -> Preset | None:
    if preset is None or isinstance(preset, Preset):
        return preset
    return get_preset(preset)


def _check_num_classes(found: int, requested: int | None, source: str) -> None:
    if requested is not None and requested != found:
        raise VitPruneError(f"{source}: checkpoint head has {found} classes but num_classes={requested} was requested")


def _attach_gates(model: ViT, sd: Mapping[str, Tensor]) -> None:
    own = set(model.state_dict())
    modules = dict(model.named_modules())
    for key, value in sd.items():
        mod_name, _, leaf = key.rpartition(".")
        if leaf in GATE_NAMES and key not in own and mod_name in modules:
            io.attach_gate(modules[mod_name], leaf, value)


def _fold_layer_scale(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fold timm LayerScale (``blocks.N.ls1.gamma`` / ``ls2.gamma``, DeiT-III) into ``attn.proj`` / ``mlp.fc2``.

    ``gamma * (W x + b) = (diag(gamma) W) x + gamma * b`` exactly.
    """
    out = dict(sd)
    for key in [k for k in sd if re.fullmatch(r"blocks\.\d+\.ls[12]\.gamma", k)]:
        prefix = key.rsplit(".", 2)[0]
        target = f"{prefix}.attn.proj" if key.endswith("ls1.gamma") else f"{prefix}.mlp.fc2"
        gamma = out.pop(key)
        w = out.get(f"{target}.weight")
        if w is None:
            raise VitPruneError(f"missing key {target}.weight (needed to fold {key})")
        out[f"{target}.weight"] = w * gamma.to(w.dtype).unsqueeze(1)
        if f"{target}.bias" in out:
            out[f"{target}.bias"] = out[f"{target}.bias"] * gamma.to(w.dtype)
    return out


def _check_supported(sd: Mapping[str, Tensor], source: str) -> None:
    for key in sd:
        for prefix, what in _UNSUPPORTED.items():
            if key.startswith(prefix):
                raise VitPruneError(f"{source}: unsupported architecture feature: {what} (key {key})")
        m = re.match(r"blocks\.\d+\.(.*)", key)
        if m:
            for prefix, what in _UNSUPPORTED_BLOCK.items():
                if m.group(1).startswith(prefix):
                    raise VitPruneError(f"{source}: unsupported architecture feature: {what} (key {key})")


def _check_mlp_widths(sd: Mapping[str, Tensor], i: int, embed_dim: int, source: str) -> None:
    """The MLP width is read from ``fc1.weight``; name the tensor that disagrees with the block's others."""
    pre = f"blocks.{i}.mlp."
    widths = {pre + "fc1.weight": int(sd[pre + "fc1.weight"].shape[0])}
    if pre + "fc1.bias" in sd and sd[pre + "fc1.bias"].ndim == 1:
        widths[pre + "fc1.bias"] = int(sd[pre + "fc1.bias"].shape[0])
    if pre + "fc2.weight" in sd and sd[pre + "fc2.weight"].ndim == 2:
        widths[pre + "fc2.weight"] = int(sd[pre + "fc2.weight"].shape[1])
    values = list(widths.values())
    if len(set(values)) <= 1:
        in_dim = int(sd[pre + "fc1.weight"].shape[1])
        if in_dim != embed_dim:
            raise VitPruneError(
                f"{source}: shape mismatch for {pre}fc1.weight: {tuple(sd[pre + 'fc1.weight'].shape)} "
                f"(its inputs should be the embedding width {embed_dim})"
            )
        return
    common = max(set(values), key=values.count)
    odd = [k for k, v in widths.items() if v != common] if values.count(common) > 1 else [pre + "fc1.weight"]
    others = common if values.count(common) > 1 else ", ".join(f"{k} {v}" for k, v in widths.items())
    raise VitPruneError(
        f"{source}: shape mismatch for {odd[0]}: {tuple(sd[odd[0]].shape)} does not fit the block's MLP width "
        f"({others})"
    )


def _square_side(n: int) -> int | None:
    side = math.isqrt(n) if n >= 0 else -1
    return side if side > 0 and side * side == n else None


# ------------------------------------------------------------------------------------------------- timm layout


def from_timm_state_dict(
    sd: Mapping[str, Tensor],
    preset: str | Preset | None = None,
    num_classes: int | None = None,
    heads: int | Sequence[int] | None = None,
    norm_eps: float | None = None,
    global_pool: str | None = None,
    no_embed_class: bool | None = None,
    source: str = "state dict",
) -> ViT:
    """Build a :class:`ViT` from a timm-layout state dict, inferring the architecture from tensor shapes.

    ``heads`` (an int or one per block) or ``preset`` gives the number of heads. ``no_embed_class`` (timm
    models whose ``pos_embed`` has no prefix-token rows, e.g. DeiT-III) is inferred from shapes when None:
    zero rows are prepended, which is exact. LayerScale is folded into the preceding linear layer.
    Per-block q/k, v and MLP widths may differ (a pruned model in timm layout), but the attention scale is
    taken as ``qk_dim ** -0.5``: a model whose QK dims were pruned keeps its scale only in a vitprune directory.
    """
    p = _resolve_preset(preset)
    sd = _fold_layer_scale(strip_prefixes(sd))
    _check_supported(sd, source)

    pw = _require(sd, "patch_embed.proj.weight", source, ndim=4)
    embed_dim, in_chans, patch_size = int(pw.shape[0]), int(pw.shape[1]), int(pw.shape[2])
    if pw.shape[2] != pw.shape[3]:
        raise VitPruneError(f"{source}: non-square patches {tuple(pw.shape[2:])} are not supported")
    class_token = "cls_token" in sd
    distilled = "dist_token" in sd
    prefix = int(class_token) + int(distilled)
    pos = _require(sd, "pos_embed", source, ndim=3)
    n_pos = int(pos.shape[1])
    grid = _square_side(n_pos - prefix)
    if no_embed_class is None:
        no_embed_class = grid is None and prefix > 0 and _square_side(n_pos) is not None
    if no_embed_class and prefix:
        grid = _square_side(n_pos)
        sd = dict(sd)
        sd["pos_embed"] = torch.cat([pos.new_zeros(1, prefix, pos.shape[2]), pos], dim=1)
    if grid is None:
        raise VitPruneError(f"{source}: pos_embed has {n_pos} rows: not {prefix} prefix tokens plus a square grid")

    depth_ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    depth = max(depth_ids) + 1 if depth_ids else 0
    for i in range(depth):
        if i not in depth_ids:
            raise VitPruneError(f"{source}: missing keys for block {i} (found blocks up to {depth - 1})")

    if p is not None:
        found = {"embed_dim": embed_dim, "depth": depth, "patch_size": patch_size, "distilled": distilled}
        for name, value in found.items():
            if getattr(p, name) != value:
                raise VitPruneError(
                    f"{source}: checkpoint does not match preset {p.name}: {name} is {value} "
                    f"in the checkpoint but {getattr(p, name)} in the preset"
                )
    if heads is None and p is not None:
        heads = p.heads
    if heads is None:
        raise VitPruneError(
            f"{source}: the number of attention heads cannot be inferred from tensor shapes; "
            "name the architecture with --preset (e.g. --preset vit_tiny_patch16_224)"
        )
    head_list = [int(heads)] * depth if isinstance(heads, int) else [int(h) for h in heads]
    if len(head_list) != depth:
        raise VitPruneError(f"{source}: got {len(head_list)} head counts for {depth} blocks")

    blocks = []
    for i, h in enumerate(head_list):
        qkv = _require(sd, f"blocks.{i}.attn.qkv.weight", source, ndim=2)
        proj = _require(sd, f"blocks.{i}.attn.proj.weight", source, ndim=2)
        fc1 = _require(sd, f"blocks.{i}.mlp.fc1.weight", source, ndim=2)
        inner_v, rest = int(proj.shape[1]), int(qkv.shape[0]) - int(proj.shape[1])
        if rest < 0 or rest % 2:
            raise VitPruneError(
                f"{source}: block {i}: qkv has {qkv.shape[0]} outputs, inconsistent with proj input {inner_v}"
            )
        inner_qk = rest // 2
        if inner_v == 0 and inner_qk == 0:
            h = 0
        if (h == 0 and (inner_v or inner_qk)) or (h and (inner_qk % h or inner_v % h)):
            raise VitPruneError(
                f"{source}: block {i}: q/k width {inner_qk} and v width {inner_v} are not divisible by {h} heads"
            )
        _check_mlp_widths(sd, i, embed_dim, source)
        blocks.append(BlockConfig(h, inner_qk // h if h else 0, inner_v // h if h else 0, int(fc1.shape[0])))

    n_cls = int(_require(sd, "head.weight", source, ndim=2).shape[0]) if "head.weight" in sd else 0
    _check_num_classes(n_cls, num_classes, source)
    if global_pool is None:
        global_pool = (p.global_pool if p is not None else "token") if class_token else "avg"
    if global_pool not in ("token", "avg"):
        raise VitPruneError(f"{source}: unsupported global pooling {global_pool!r} (supported: token, avg)")
    eps = norm_eps if norm_eps is not None else (p.norm_eps if p is not None else 1e-6)
    preprocess = {"preset": p.preprocess} if p is not None and n_cls == p.num_classes else None
    config = ViTConfig(
        embed_dim=embed_dim,
        blocks=blocks,
        num_classes=n_cls,
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=in_chans,
        class_token=class_token,
        distilled=distilled,
        global_pool=global_pool,
        norm_eps=eps,
        qkv_bias="blocks.0.attn.qkv.bias" in sd if depth else True,
        preprocess=preprocess,
        name=p.name if p is not None else "vit",
    )
    return _build(config, sd, source)


def _build(config: ViTConfig, sd: Mapping[str, Tensor], source: str) -> ViT:
    """Instantiate on the meta device (no random init) and assign float32 copies of the checkpoint tensors."""
    with torch.device("meta"):
        model = ViT(config)
    state = {k: v.detach().to(torch.float32, copy=True) if v.is_floating_point() else v for k, v in sd.items()}
    _attach_gates(model, state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    for what, keys in (("missing", missing), ("unexpected", extra)):
        if keys:
            raise VitPruneError(f"{source}: {what} keys: {', '.join(keys[:5])}" + (" ..." if len(keys) > 5 else ""))
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise VitPruneError(
                f"{source}: shape mismatch for {k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def from_timm_model(module: torch.nn.Module, num_classes: int | None = None) -> ViT:
    """Convert a live timm ``VisionTransformer`` (duck-typed: timm itself is never imported).

    Heads come from ``blocks[i].attn.num_heads``, LayerNorm eps from ``norm.eps``, pooling from ``global_pool``.
    """
    blocks = getattr(module, "blocks", None)
    if blocks is None or not all(hasattr(getattr(b, "attn", None), "num_heads") for b in blocks):
        raise VitPruneError(f"{type(module).__name__} is not a timm VisionTransformer (needs blocks[i].attn.num_heads)")
    for i, blk in enumerate(blocks):
        act = getattr(getattr(blk, "mlp", None), "act", None)
        if not isinstance(act, torch.nn.GELU) or act.approximate != "none":
            raise VitPruneError(f"block {i}: unsupported MLP activation {act!r} (exact GELU required)")
    norm = getattr(module, "norm", None)
    eps = float(norm.eps) if isinstance(norm, torch.nn.LayerNorm) else 1e-6
    pool = getattr(module, "global_pool", "token") or ""
    return from_timm_state_dict(
        module.state_dict(),
        num_classes=num_classes,
        heads=[int(b.attn.num_heads) for b in blocks],
        norm_eps=eps,
        global_pool=pool,
        no_embed_class=bool(getattr(module, "no_embed_class", False)),
        source=type(module).__name__,
    )


# ---------------------------------------------------------------------------------------------- Hugging Face

_HF_LAYER = {
    "attention.output.dense": "attn.proj",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_HF_HEADS = {"classifier": "head", "cls_classifier": "head", "distillation_classifier": "head_dist"}
_HF_IGNORED = ("pooler.", "embeddings.mask_token")  # unused by image classification


def hf_to_timm_keys(sd: Mapping[str, Tensor], source: str = "state dict") -> dict[str, Tensor]:
    """Rename Hugging Face ViT/DeiT keys to timm's; q, k, v are concatenated into ``attn.qkv`` in that order."""
    base = next((b for b in ("vit.", "deit.", "") if f"{b}embeddings.patch_embeddings.projection.weight" in sd), None)
    if base is None:
        raise VitPruneError(f"{source}: missing key vit.embeddings.patch_embeddings.projection.weight")
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key in _HF_HEADS or key.split(".")[0] in _HF_HEADS:
            name, _, leaf = key.partition(".")
            out[f"{_HF_HEADS[name]}.{leaf}"] = value
            continue
        if not key.startswith(base):
            raise VitPruneError(f"{source}: unexpected key {key}")
        rest = key[len(base) :]
        if rest.startswith(_HF_IGNORED):
            continue
        if rest in _HF_TOP:
            out[_HF_TOP[rest]] = value
            continue
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", rest)
        if not m:
            raise VitPruneError(f"{source}: unexpected key {key}")
        i, mod, leaf = int(m.group(1)), m.group(2), m.group(3)
        if mod in ("attention.attention.query", "attention.attention.key", "attention.attention.value"):
            qkv.setdefault((i, leaf), {})[mod.rsplit(".", 1)[1]] = value
        elif mod in _HF_LAYER:
            out[f"blocks.{i}.{_HF_LAYER[mod]}.{leaf}"] = value
        else:
            raise VitPruneError(f"{source}: unexpected key {key}")
    for (i, leaf), parts in sorted(qkv.items()):
        for part in ("query", "key", "value"):
            if part not in parts:
                raise VitPruneError(f"{source}: missing key {base}encoder.layer.{i}.attention.attention.{part}.{leaf}")
        out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def from_hf_state_dict(
    sd: Mapping[str, Tensor],
    hf_config: Mapping[str, Any],
    num_classes: int | None = None,
    source: str = "Hugging Face checkpoint",
) -> ViT:
    """Build a :class:`ViT` from a Hugging Face ``ViTForImageClassification`` (or DeiT-with-teacher) state dict."""
    act = hf_config.get("hidden_act", "gelu")
    if act != "gelu":
        raise VitPruneError(f"{source}: unsupported hidden_act {act!r} (exact 'gelu' required)")
    if "num_attention_heads" not in hf_config:
        raise VitPruneError(f"{source}: config has no num_attention_heads")
    timm_sd = hf_to_timm_keys(strip_prefixes(sd), source)
    if "dist_token" in timm_sd and "head_dist.weight" not in timm_sd and "head.weight" in timm_sd:
        raise VitPruneError(f"{source}: DeiT with a distillation token but no distillation classifier is not supported")
    model = from_timm_state_dict(
        timm_sd,
        num_classes=num_classes,
        heads=int(hf_config["num_attention_heads"]),
        norm_eps=float(hf_config.get("layer_norm_eps", 1e-12)),
        global_pool="token",
        no_embed_class=False,
        source=source,
    )
    hidden = hf_config.get("hidden_size")
    if hidden is not None and int(hidden) != model.embed_dim:
        raise VitPruneError(f"{source}: config hidden_size {hidden} but weights have width {model.embed_dim}")
    model.config.name = str(hf_config.get("_name_or_path") or hf_config.get("model_type") or "vit")
    return model


def hf_preprocess(pp: Mapping[str, Any]) -> dict[str, Any]:
    """``preprocessor_config.json`` (ViT/DeiT image processor) -> ``build_eval_transform`` arguments."""

    def hw(value: Any) -> tuple[int, int]:
        if isinstance(value, Mapping):
            if "height" in value:
                return int(value["height"]), int(value["width"])
            return int(value["shortest_edge"]), int(value["shortest_edge"])
        return int(value), int(value)

    out: dict[str, Any] = {"preset": "imagenet"}
    size = hw(pp.get("size", 224))
    if pp.get("do_resize", True):
        out["resize"] = size
    out["img_size"] = hw(pp["crop_size"])[0] if pp.get("do_center_crop") and "crop_size" in pp else size[0]
    if "resample" in pp:
        out["interpolation"] = _HF_RESAMPLE.get(int(pp["resample"]), "bilinear")
    if pp.get("do_normalize", True):
        out["mean"] = list(pp.get("image_mean", (0.5, 0.5, 0.5)))
        out["std"] = list(pp.get("image_std", (0.5, 0.5, 0.5)))
    else:
        out["mean"], out["std"] = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return out


# ------------------------------------------------------------------------------------------------- file I/O


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a ``.safetensors`` or torch (``weights_only``) file: ``(state dict, safetensors metadata)``."""
    p = Path(path)
    if not p.exists():
        raise VitPruneError(f"checkpoint not found: {p}")
    ext = p.suffix.lower()
    if ext == ".safetensors":
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return strip_prefixes(load_file(str(p))), meta
        except (SafetensorError, OSError, ValueError) as exc:
            raise VitPruneError(f"cannot read safetensors file {p}: {exc}") from None
    if ext in TORCH_EXTENSIONS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
                obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt zip, truncated file, a pickle of arbitrary objects, ...
            raise VitPruneError(torch_load_error(p, exc)) from None
        return _unwrap_state_dict(obj, str(p)), {}
    raise VitPruneError(
        f"unsupported checkpoint extension {p.suffix!r} for {p} (expected .pth, .pt, .bin, .safetensors "
        "or a model directory)"
    )


def _looks_hf(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("vit.embeddings.", "deit.embeddings.")) for k in sd)


def _load_file(
    path: Path,
    preset: str | Preset | None,
    num_classes: int | None,
    heads: int | Sequence[int] | None,
) -> ViT:
    sd, meta = read_state_dict(path)
    if preset is None and heads is None:
        arch = str(meta.get("architecture", "")).split(".", 1)[0]
        if arch in PRESETS:
            preset = arch
    if _looks_hf(sd):
        p = _resolve_preset(preset)
        h = heads if heads is not None else (p.heads if p is not None else None)
        if h is None:
            raise VitPruneError(f"{path}: Hugging Face weights without config.json: pass a preset or heads=")
        return from_hf_state_dict(sd, {"num_attention_heads": h}, num_classes=num_classes, source=str(path))
    return from_timm_state_dict(sd, preset=preset, num_classes=num_classes, heads=heads, source=str(path))


def _dir_weights(directory: Path) -> Path:
    for name in DIR_WEIGHTS:
        if (directory / name).is_file():
            return directory / name
    if any(directory.glob("*.index.json")):
        raise VitPruneError(f"{directory}: sharded checkpoints are not supported")
    raise VitPruneError(f"{directory}: no model weights found (looked for {', '.join(DIR_WEIGHTS)})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise VitPruneError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise VitPruneError(f"{path} is not a JSON object")
    return data


def load_model(
    path: str | os.PathLike,
    preset: str | None = None,
    num_classes: int | None = None,
    heads: int | Sequence[int] | None = None,
) -> ViT:
    """Load any supported checkpoint (see the module docstring) as a :class:`ViT` in eval mode.

    ``preset``/``heads`` supply the head count for timm state dicts (ignored for sources that record it);
    ``num_classes``, when given, must equal the checkpoint head's class count.
    """
    p = Path(path)
    if not p.exists():
        raise VitPruneError(f"model path not found: {p}")
    if p.is_file() and p.suffix.lower() == ".onnx":
        raise VitPruneError(
            f"{p.name} is an ONNX file: it can be evaluated and benchmarked (eval, bench) but not loaded for "
            "training/pruning"
        )
    if p.is_file():
        return _load_file(p, preset, num_classes, heads)
    p = io.resolve_model_dir(p)  # the model of a prune / finetune / train run directory
    cfg_path = p / io.CONFIG_NAME
    if not cfg_path.is_file():  # a bare directory holding a timm state dict
        return _load_file(_dir_weights(p), preset, num_classes, heads)
    cfg = _read_json(cfg_path)
    if "embed_dim" in cfg and "blocks" in cfg:  # vitprune
        model = io.load(p)
        _check_num_classes(model.config.num_classes, num_classes, str(p))
        return model.eval()
    if "architecture" in cfg:  # timm Hugging Face Hub layout
        model = _load_file(_dir_weights(p), preset or cfg["architecture"], num_classes, heads)
        pcfg = cfg.get("pretrained_cfg") or {}
        if "mean" in pcfg and "input_size" in pcfg:
            size = int(pcfg["input_size"][-1])
            model.config.preprocess = {
                "preset": "imagenet",
                "img_size": size,
                "resize": int(size / float(pcfg.get("crop_pct", 0.875))),
                "interpolation": str(pcfg.get("interpolation", "bicubic")),
                "mean": list(pcfg["mean"]),
                "std": list(pcfg["std"]),
            }
        return model
    if cfg.get("model_type") in ("vit", "deit") or "num_attention_heads" in cfg:  # Hugging Face transformers
        weights = _dir_weights(p)
        sd, _ = read_state_dict(weights)
        model = from_hf_state_dict(sd, cfg, num_classes=num_classes, source=str(weights))
        pp_path = p / "preprocessor_config.json"
        if pp_path.is_file():
            model.config.preprocess = hf_preprocess(_read_json(pp_path))
        return model
    raise VitPruneError(f"{cfg_path}: not a vitprune, timm or Hugging Face ViT config")
