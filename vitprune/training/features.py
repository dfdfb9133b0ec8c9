"""Feature distillation: match the student's residual stream after chosen blocks to the teacher's.

For each chosen student block ``i`` (``feature_blocks``: ``"all"``, ``"last-k"`` or a list of indices) the
output of ``student.blocks[i]`` (the residual stream, i.e. the input of the next block or of the final norm)
is compared with the output of ``teacher.blocks[block_map[i]]`` on the student's channels only:

``L_feat = mean_i  mean((s_i - t_i[..., emb_index])^2) / d_i``, with ``d_i = mean_c Var(t_i[..., c])`` (the
teacher feature's variance, ``norm="var"``, so the term is scale-free and comparable across blocks) or
``d_i = 1`` (``norm="none"``, plain MSE). This is the hidden-state MSE of TinyBERT (Jiao et al. 2020, eq. 7)
and of the ViT feature-distillation recipes, without a learned projection: a pruned student keeps a subset of
the teacher's channels, so no projection is needed.

A pruned student may have fewer blocks (NViT removes whole blocks) and fewer embedding channels:

- ``block_map[i]``: the teacher block that student block ``i`` came from (default: identity when the depths
  are equal, else ``config.extra["kept_blocks"]`` of the student, else an error asking for it);
- ``emb_index[j]``: the teacher channel that student channel ``j`` came from (default: ``config.extra
  ["emb_index"]``, else all channels when the widths are equal, else an error). A masked full-width student
  (``emb_mask``) is compared on its unmasked channels.

:func:`record_feature_map` stores both in a pruned model's ``config.extra`` (saved in ``config.json``), so
``vitprune finetune`` finds them. Features are collected with forward hooks on ``model.blocks[i]`` during the
one forward pass each model makes; the teacher runs without autograd.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vitprune.errors import VitPruneError

FEATURE_NORMS = ("var", "none")


def parse_feature_blocks(spec: str | Sequence[int], depth: int) -> list[int]:
    """``"all"`` | ``"last-k"`` | indices (a list or ``"0,3,-1"``; negative counts from the end) -> sorted indices."""
    if depth <= 0:
        raise VitPruneError("feature distillation needs a model with at least one block")
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text == "all":
            return list(range(depth))
        if text.startswith("last-"):
            try:
                k = int(text[5:])
            except ValueError:
                raise VitPruneError(f"feature blocks {spec!r}: expected 'last-K' with an integer K") from None
            if not 1 <= k <= depth:
                raise VitPruneError(f"feature blocks {spec!r}: K must be in 1..{depth} (the student's depth)")
            return list(range(depth - k, depth))
        try:
            spec = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            msg = f"feature blocks must be 'all', 'last-K' or indices like '0,5,11', got {spec!r}"
            raise VitPruneError(msg) from None
    out = []
    for v in spec:
        i = int(v)
        if not -depth <= i < depth:
            raise VitPruneError(f"feature block {i} is out of range for a student with {depth} blocks")
        out.append(i % depth)
    if not out:
        raise VitPruneError("feature blocks: no block chosen")
    return sorted(set(out))


@dataclass
class FeatureMap:
    """Where each student block / embedding channel came from in the teacher."""

    block_map: list[int]  # teacher block of each student block
    emb_index: Tensor | None  # teacher channel of each student channel (None: the same channels)


def feature_map_from_masks(masks) -> FeatureMap:
    """The map of the model :func:`~vitprune.structures.surgery.prune_model` builds from ``masks`` (after any
    rounding: pass the masks the surgery actually applied)."""
    kept = [b for b, bm in enumerate(masks.blocks) if bm.keep]
    return FeatureMap(kept, torch.nonzero(masks.emb).flatten().long())


def record_feature_map(model: nn.Module, fmap: FeatureMap) -> None:
    """Store ``fmap`` in ``model.config.extra`` (``kept_blocks``, ``emb_index``) so that it is saved with the model."""
    extra = model.config.extra
    extra["kept_blocks"] = [int(b) for b in fmap.block_map]
    if fmap.emb_index is not None:
        extra["emb_index"] = [int(c) for c in fmap.emb_index.tolist()]


def _depth(model: nn.Module, who: str) -> int:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise VitPruneError(f"feature distillation needs the {who} to have .blocks (a vitprune ViT)")
    return len(blocks)


def _width(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "embed_dim", None)


def resolve_feature_map(
    student: nn.Module,
    teacher: nn.Module,
    block_map: Sequence[int] | None = None,
    emb_index: Tensor | Sequence[int] | None = None,
) -> FeatureMap:
    """Explicit maps win; then the student's ``config.extra`` (``kept_blocks``, ``emb_index``); then identity
    where the shapes agree; otherwise a :class:`VitPruneError` saying what to give."""
    s_depth, t_depth = _depth(student, "student"), _depth(teacher, "teacher")
    extra = getattr(getattr(student, "config", None), "extra", None) or {}
    if block_map is None and "kept_blocks" in extra:
        block_map = extra["kept_blocks"]
    if block_map is None:
        if s_depth != t_depth:
            raise VitPruneError(
                f"the student has {s_depth} blocks and the teacher {t_depth}: give feature_block_map (the teacher "
                "block of each student block, e.g. --feature-block-map 0,1,3,...) or store config.extra['kept_blocks']"
            )
        block_map = list(range(s_depth))
    block_map = [int(b) for b in block_map]
    if len(block_map) != s_depth:
        raise VitPruneError(f"feature_block_map has {len(block_map)} entries but the student has {s_depth} blocks")
    bad = [b for b in block_map if not 0 <= b < t_depth]
    if bad:
        raise VitPruneError(f"feature_block_map names teacher blocks {bad} but the teacher has {t_depth} blocks")

    s_width, t_width = _width(student), _width(teacher)
    if emb_index is None and "emb_index" in extra:
        emb_index = extra["emb_index"]
    if emb_index is None:
        if s_width != t_width:
            raise VitPruneError(
                f"the student has {s_width} embedding channels and the teacher {t_width}: give feature_emb_index "
                "(the teacher channel of each student channel) or store config.extra['emb_index']"
            )
        return FeatureMap(block_map, None)
    index = torch.as_tensor(emb_index, dtype=torch.long).flatten()
    if s_width is not None and index.numel() != s_width:
        raise VitPruneError(f"feature_emb_index has {index.numel()} entries but the student has {s_width} channels")
    if t_width is not None and index.numel() and (int(index.min()) < 0 or int(index.max()) >= t_width):
        raise VitPruneError(f"feature_emb_index must lie in 0..{t_width - 1} (the teacher's channels)")
    if index.unique().numel() != index.numel():
        raise VitPruneError("feature_emb_index repeats a teacher channel")
    if s_width == t_width and torch.equal(index, torch.arange(index.numel())):
        return FeatureMap(block_map, None)
    return FeatureMap(block_map, index)


@contextlib.contextmanager
def capture_block_outputs(model: nn.Module, indices: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """Within the block, ``out[i]`` is the output of ``model.blocks[i]`` from the latest forward pass."""
    out: dict[int, Tensor] = {}
    handles = []
    for i in indices:
        handles.append(model.blocks[i].register_forward_hook(lambda _m, _inp, y, i=i: out.__setitem__(i, y)))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def feature_mse(student_feat: Tensor, teacher_feat: Tensor, norm: str = "var", eps: float = 1e-6) -> Tensor:
    """``mean((s - t)^2)`` (``norm="none"``) or that divided by the mean per-channel variance of ``t`` (``"var"``)."""
    if norm not in FEATURE_NORMS:
        raise VitPruneError(f"feature norm must be one of {FEATURE_NORMS}, got {norm!r}")
    s, t = student_feat.float(), teacher_feat.detach().float()
    if s.shape != t.shape:
        raise VitPruneError(f"student features {tuple(s.shape)} and teacher features {tuple(t.shape)} differ")
    loss = (s - t).pow(2).mean()
    if norm == "var":
        dims = tuple(range(t.ndim - 1))
        loss = loss / (t.var(dim=dims, unbiased=False).mean() + eps)
    return loss


class FeatureDistillation:
    """Collects block outputs of student and teacher and computes the feature loss (see the module doc)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        blocks: str | Sequence[int] = "all",
        block_map: Sequence[int] | None = None,
        emb_index: Tensor | Sequence[int] | None = None,
        norm: str = "var",
    ) -> None:
        if norm not in FEATURE_NORMS:
            raise VitPruneError(f"feature norm must be one of {FEATURE_NORMS}, got {norm!r}")
        self.fmap = resolve_feature_map(student, teacher, block_map, emb_index)
        self.student_blocks = parse_feature_blocks(blocks, _depth(student, "student"))
        self.teacher_blocks = [self.fmap.block_map[i] for i in self.student_blocks]
        self.norm = norm

    def capture_student(self, model: nn.Module) -> contextlib.AbstractContextManager[dict[int, Tensor]]:
        return capture_block_outputs(model, self.student_blocks)

    def capture_teacher(self, model: nn.Module) -> contextlib.AbstractContextManager[dict[int, Tensor]]:
        return capture_block_outputs(model, sorted(set(self.teacher_blocks)))

    def channels(self, student: nn.Module, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """(student channels, teacher channels) to compare; None means all."""
        s_sel, t_sel = None, self.fmap.emb_index
        mask = getattr(student, "emb_mask", None)
        if mask is not None and not bool((mask != 0).all()):
            s_sel = torch.nonzero(mask.detach().flatten() != 0).flatten().to(device)
            t_sel = s_sel if t_sel is None else t_sel.to(device)[s_sel]
        return s_sel, (t_sel.to(device) if t_sel is not None else None)

    def loss(self, student: nn.Module, s_feats: dict[int, Tensor], t_feats: dict[int, Tensor]) -> Tensor:
        """Mean over the chosen blocks of :func:`feature_mse` on the mapped channels."""
        terms = []
        for si, ti in zip(self.student_blocks, self.teacher_blocks, strict=True):
            s, t = s_feats[si], t_feats[ti]
            if s.shape[:-1] != t.shape[:-1]:
                raise VitPruneError(
                    f"student block {si} gives {tuple(s.shape)} tokens but teacher block {ti} {tuple(t.shape)}"
                )
            s_sel, t_sel = self.channels(student, s.device)
            if s_sel is not None:
                s = s.index_select(-1, s_sel)
            if t_sel is not None:
                t = t.index_select(-1, t_sel)
            terms.append(feature_mse(s, t, self.norm))
        return torch.stack(terms).mean()
