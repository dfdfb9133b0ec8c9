"""Torch-Pruning 1.6.1 side by side: GroupTaylor / GroupMagnitude (L2) importance, global and uniform scope.

Follows Torch-Pruning's ViT example (``examples/transformers/prune_timm_vit.py``) on the shared ViT-Tiny: the
model is rebuilt as a minimal timm-compatible module (:class:`TimmViT`: ``Attention`` with ``qkv``,
``num_heads``, ``head_dim``, ``proj`` and the example's patched forward that reshapes with ``num_heads``),
pruned by ``tp.pruner.BasePruner`` (``MetaPruner`` is its alias) with ``num_heads={attn.qkv: heads}``,
``ignored_layers=[head]``, ``global_pruning``, ``round_to=1``, ``iterative_steps=1`` and no ``forward_fn``
(the example's settings), then ``num_heads`` / ``head_dim`` are fixed up afterwards as the example does. The
pruned plain module is converted into our :class:`~vitprune.models.ViT` (equal logits are checked) and
evaluated, counted and timed with vitprune's own metrics, side by side with the dense model.

What Torch-Pruning prunes here (its ``pruning_ratio`` ``r``): the residual embedding channels (one coupled
group: patch projection, tokens, position embedding, every LayerNorm, qkv/fc1 inputs, proj/fc2 outputs, the
head's input), the MLP hidden neurons of every block and the per-head dims (``--attn dims``, the example's
default ``prune_head_dims=True``: the same dims in every head and in q, k and v); ``--attn heads`` prunes whole
heads instead (``prune_num_heads=True``, ``head_pruning_ratio = r``). Uniform scope prunes ``r`` of every
group; global scope ranks all groups' (mean-normalised) importances together. ``r`` is found by bisection so
that the pruned model's analytic MACs (:func:`vitprune.metrics.flops.count_macs`) land on the target fraction.

Attention scale: the example's patched forward calls ``F.scaled_dot_product_attention(q, k, v)`` when timm's
``fused_attn`` is on (timm's default), i.e. the softmax temperature becomes ``pruned_head_dim ** -0.5``; its
non-fused branch multiplies by ``self.scale``, which the fix-up leaves at the ORIGINAL ``head_dim ** -0.5``.
``--attn-scale example`` (default) replicates timm's default path, ``--attn-scale original`` the other one.
Both are one config field (``BlockConfig.scale``) in our representation.

Taylor importance needs gradients: cross-entropy on ``--taylor-batches`` real training batches of
``--taylor-batch-size`` images (eval preprocessing, as in the example), accumulated once and reused by every
bisection trial.

Dependency (benchmark only, see benchmarks/requirements.txt): ``pip install --no-deps torch-pruning==1.6.1``.

    python benchmarks/tp_baseline.py --macs 0.7 --val-limit-per-class 5 --recover-minutes 0   # quick, one-shot
    python benchmarks/tp_baseline.py --recover-minutes 30 --recover-images 30000   # the full side-by-side run

The recovery (``--recover-minutes`` > 0) is :func:`_recovery.recover`, the budget every benchmark shares.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from _common import markdown_table, shared_data, shared_model, write_results  # _common puts the repo on sys.path
from torch import Tensor, nn

from vitprune.errors import VitPruneError
from vitprune.models import BlockConfig, ViT, ViTConfig
from vitprune.models.vit import GATE_NAMES

IMPORTANCES = ("taylor", "l2")
SCOPES = ("global", "uniform")
ATTN_MODES = ("dims", "heads")
SCALE_MODES = ("example", "original")  # example: SDPA default (pruned dim); original: dense head dim


# ------------------------------------------------------------------------------ minimal timm-compatible ViT
class TimmAttention(nn.Module):
    """timm ``Attention`` with Torch-Pruning's patched forward (output width ``num_heads * head_dim``).

    ``fused=True`` is timm's default path (``F.scaled_dot_product_attention`` with its default scale
    ``q.size(-1) ** -0.5``); ``fused=False`` multiplies by ``self.scale`` (set once at construction).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(b, n, -1)  # the example's fix: not reshape(B, N, C)
        return self.proj(x)


class TimmMlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, eps: float, qkv_bias: bool, fused: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = TimmAttention(dim, num_heads, qkv_bias, fused)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = TimmMlp(dim, hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmViT(nn.Module):
    """timm ``VisionTransformer`` (class token, token pooling, pre-norm blocks) with timm parameter names."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        num_classes: int,
        eps: float = 1e-6,
        qkv_bias: bool = True,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.blocks = nn.Sequential(
            *(TimmBlock(embed_dim, num_heads, mlp_dim, eps, qkv_bias, fused) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def timm_vit_from_vit(model: ViT, fused: bool = True) -> TimmViT:
    """The dense plain module holding ``model``'s weights (a uniform ViT without gates or distillation token)."""
    c = model.config
    b0 = c.blocks[0] if c.blocks else None
    if b0 is None or not c.is_uniform() or b0.qk_dim != b0.v_dim or b0.heads * b0.qk_dim != c.embed_dim:
        raise VitPruneError("Torch-Pruning's ViT example needs a dense uniform ViT (heads * head_dim == embed_dim)")
    if c.distilled or not c.class_token or c.global_pool != "token" or c.pos_grid != c.img_size // c.patch_size:
        raise VitPruneError("Torch-Pruning's ViT example needs a class-token ViT without a distillation token")
    if abs(b0.scale - b0.qk_dim**-0.5) > 1e-12:
        raise VitPruneError(f"the dense model's attention scale {b0.scale} is not head_dim ** -0.5")
    if any(b is not None for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in GATE_NAMES):
        raise VitPruneError("the model carries gates; fold or remove them before Torch-Pruning")
    plain = TimmViT(
        c.img_size, c.patch_size, c.in_chans, c.embed_dim, c.depth, b0.heads, b0.mlp_dim, c.num_classes,
        c.norm_eps, c.qkv_bias, fused,
    )  # fmt: skip
    state = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in GATE_NAMES}
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def vit_from_timm_vit(plain: TimmViT, like: ViTConfig) -> ViT:
    """Our ViT computing exactly what the (pruned) plain module computes.

    Per block ``BlockConfig(num_heads, head_dim, head_dim, mlp)`` with the scale the plain attention applies:
    ``head_dim ** -0.5`` of its (pruned) width on the fused path (SDPA's default), its stored ``scale`` (the
    original head dim's) on the non-fused path. Other fields (image size, eps, preprocessing...) from ``like``.
    """
    blocks = []
    for i, blk in enumerate(plain.blocks):
        a = blk.attn
        h, hd = int(a.num_heads), int(a.head_dim)
        if a.qkv.out_features != 3 * h * hd or a.proj.in_features != h * hd:
            raise VitPruneError(f"block {i}: qkv/proj widths do not match num_heads={h}, head_dim={hd}")
        scale = (hd**-0.5 if hd > 0 else 1.0) if a.fused_attn else float(a.scale)
        blocks.append(BlockConfig(h, hd, hd, int(blk.mlp.fc1.out_features), scale=scale))
    fields = {k: v for k, v in like.to_dict().items() if k != "blocks"}
    fields.update(
        embed_dim=int(plain.patch_embed.proj.out_channels),
        num_classes=int(plain.head.out_features),
        extra={**like.extra, "pruned_by": "torch-pruning"},
    )
    model = ViT(ViTConfig(**fields, blocks=blocks))
    model.load_state_dict(plain.state_dict(), strict=True)
    return model.eval()


def with_scale(model: ViT, mode: str, dense: ViTConfig) -> ViT:
    """A copy of ``model`` whose attention scales follow ``mode``: ``example`` = ``qk_dim ** -0.5`` of the pruned
    width (SDPA's default, timm's fused path), ``original`` = the dense model's scale (timm's non-fused path)."""
    if mode not in SCALE_MODES:
        raise VitPruneError(f"scale mode must be one of {', '.join(SCALE_MODES)}, got {mode!r}")
    fields = model.config.to_dict()
    for b, d in zip(fields["blocks"], dense.blocks, strict=True):
        b["scale"] = d.scale if mode == "original" else (b["qk_dim"] ** -0.5 if b["qk_dim"] > 0 else 1.0)
    out = ViT(ViTConfig.from_dict(fields))
    out.load_state_dict(model.state_dict(), strict=True)
    return out.eval()


# ------------------------------------------------------------------------------------------ Torch-Pruning
def _tp():
    try:
        import torch_pruning as tp
    except ImportError:  # pragma: no cover - environment dependent
        raise VitPruneError(
            "torch-pruning is not installed: pip install --no-deps torch-pruning==1.6.1 (benchmarks/requirements.txt)"
        ) from None
    return tp


def make_importance(name: str):
    """The example's criteria: ``taylor`` -> GroupTaylorImportance(), ``l2`` -> GroupMagnitudeImportance(p=2)."""
    tp = _tp()
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    raise VitPruneError(f"importance must be one of {', '.join(IMPORTANCES)}, got {name!r}")


def taylor_gradients(plain: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Gradients of the mean cross-entropy summed over ``batches`` (the example's Taylor accumulation loop)."""
    plain.zero_grad(set_to_none=True)
    plain.eval()
    n = 0
    with torch.enable_grad():
        for images, labels in batches:
            F.cross_entropy(plain(images), labels).backward()
            n += 1
    if n == 0:
        raise VitPruneError("no batches to accumulate Taylor gradients on")
    grads = {name: p.grad.detach().clone() for name, p in plain.named_parameters() if p.grad is not None}
    plain.zero_grad(set_to_none=True)
    return grads


def tp_prune(
    dense_plain: TimmViT,
    importance: str,
    scope: str,
    ratio: float,
    attn: str = "dims",
    grads: dict[str, Tensor] | None = None,
    steps: int = 1,
    grads_fn: Callable[[TimmViT, int], dict[str, Tensor]] | None = None,
) -> TimmViT:
    """A pruned copy of ``dense_plain`` (the original is untouched), exactly as the TP example does it.

    ``steps`` > 1: Torch-Pruning's ``iterative_steps`` (the ratio reached in equal steps); ``grads_fn(model, k)``
    then gives fresh Taylor gradients of the partly pruned model before step ``k`` (re-scoring, as NViT's rounds),
    else the ``grads`` of the dense model are used for the first step only."""
    if scope not in SCOPES:
        raise VitPruneError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if attn not in ATTN_MODES:
        raise VitPruneError(f"attn must be one of {', '.join(ATTN_MODES)}, got {attn!r}")
    if not 0.0 <= ratio < 1.0:
        raise VitPruneError(f"pruning ratio must be in [0, 1), got {ratio}")
    if importance == "taylor" and grads is None and grads_fn is None:
        raise VitPruneError("Taylor importance needs gradients (taylor_gradients)")
    tp = _tp()
    model = copy.deepcopy(dense_plain).eval()
    if ratio == 0.0:
        return model
    if grads is not None:
        for name, p in model.named_parameters():
            p.grad = grads[name].clone() if name in grads else None
    num_heads = {blk.attn.qkv: blk.attn.num_heads for blk in model.blocks}
    size = model.pos_embed.shape[1] - 1
    side = math.isqrt(size) * model.patch_embed.proj.kernel_size[0]
    example = torch.randn(1, model.patch_embed.proj.in_channels, side, side)
    with warnings.catch_warnings():  # "Unwrapped parameters detected: cls_token, pos_embed" (last dim pruned)
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = _base_pruner(tp, model, example, importance, scope, ratio, attn, num_heads, steps)
    for k in range(steps):
        if grads_fn is not None:
            fresh = grads_fn(model, k)
            for name, p in model.named_parameters():
                p.grad = fresh.get(name)
        for group in pruner.step(interactive=True):
            group.prune()
        for blk in model.blocks:  # the example's fix-up of num_heads / head_dim (after every step)
            a = blk.attn
            a.num_heads = pruner.num_heads[a.qkv]
            a.head_dim = a.qkv.out_features // (3 * a.num_heads) if a.num_heads > 0 else 0
    model.zero_grad(set_to_none=True)
    return model.eval()


def _base_pruner(
    tp, model: TimmViT, example: Tensor, importance: str, scope: str, ratio: float, attn: str, num_heads, steps: int = 1
):
    """``tp.pruner.BasePruner`` with the example's arguments (``iterative_steps`` = ``steps``, the example: 1)."""
    return tp.pruner.BasePruner(
        model,
        example,
        importance=make_importance(importance),
        global_pruning=scope == "global",
        pruning_ratio=ratio,
        iterative_steps=steps,
        ignored_layers=[model.head],
        num_heads=num_heads,
        prune_num_heads=attn == "heads",
        prune_head_dims=attn == "dims",
        head_pruning_ratio=ratio if attn == "heads" else 0.0,
        round_to=1,
    )


def bisect_ratio(
    fraction_of: Callable[[float], float],
    target: float,
    lo: float = 0.0,
    hi: float = 0.95,
    guess: float | None = None,
    iters: int = 14,
    tol: float = 0.003,
) -> tuple[float, float, list[dict[str, float]]]:
    """The ratio whose (non-increasing, step-wise) MACs fraction is closest to ``target``.

    Safeguarded bisection (regula falsi with the Illinois rule) on ``[lo, hi]`` assuming ``fraction_of``
    decreases with the ratio. The first interior probe is ``guess`` (default the midpoint); each later probe
    interpolates inside the bracket, clamped to its middle 80 % so the bracket shrinks by at least 10 % per
    probe. Stops once a probe is within ``tol`` of the target, after ``iters`` interior probes, or when the
    bracket is narrower than 1e-4. Returns ``(ratio, fraction, trials)`` of the closest probe.
    """
    if not 0.0 < target <= 1.0:
        raise VitPruneError(f"target MACs fraction must be in (0, 1], got {target}")
    trials: list[dict[str, float]] = []

    def probe(r: float) -> float:
        f = fraction_of(r)
        trials.append({"ratio": r, "fraction": f})
        return f

    g_lo = probe(lo) - target
    if g_lo <= tol:
        return lo, trials[0]["fraction"], trials
    mid = guess if guess is not None and lo < guess < hi else (lo + hi) / 2
    g_hi: float | None = None  # hi is probed only when the guess lands above the target
    side = 0
    for _ in range(iters):
        g = probe(mid) - target
        if abs(g) <= tol:
            break
        if g > 0:
            lo, g_lo = mid, g
            if side == 1 and g_hi is not None:
                g_hi /= 2  # Illinois: the retained endpoint's value is halved
            side = 1
        else:
            hi, g_hi = mid, g
            if side == -1:
                g_lo /= 2
            side = -1
        if g_hi is None:
            g_hi = probe(hi) - target
            if g_hi > tol:
                raise VitPruneError(f"even pruning ratio {hi} leaves {trials[-1]['fraction']:.3f} (target {target})")
            if abs(g_hi) <= tol:
                break
        if hi - lo < 1e-4:
            break
        t = g_lo / (g_lo - g_hi) if g_lo > g_hi else 0.5
        mid = lo + (hi - lo) * min(max(t, 0.1), 0.9)
    best = min(trials, key=lambda t: (abs(t["fraction"] - target), t["ratio"]))
    return best["ratio"], best["fraction"], trials


def prune_to_macs(
    dense: ViT,
    dense_plain: TimmViT,
    target: float,
    importance: str,
    scope: str,
    attn: str = "dims",
    grads: dict[str, Tensor] | None = None,
    tol: float = 0.003,
) -> tuple[ViT, TimmViT, dict[str, Any]]:
    """Bisect Torch-Pruning's ratio until the converted model's MACs are ``target`` of ``dense``'s.

    Returns ``(our ViT, the pruned plain module, info)`` with ``info = {"ratio", "macs_fraction", "trials"}``.
    """
    from vitprune.metrics.flops import count_macs

    dense_macs = count_macs(dense)["total"]
    cache: dict[float, tuple[ViT, TimmViT]] = {}

    def fraction(ratio: float) -> float:
        plain = tp_prune(dense_plain, importance, scope, ratio, attn, grads)
        model = vit_from_timm_vit(plain, dense.config)
        cache.clear()  # keep only the latest two
        cache[ratio] = (model, plain)
        return count_macs(model)["total"] / dense_macs

    guess = 1.0 - math.sqrt(target)  # uniform width pruning: MACs ~ (1 - r)^2
    ratio, frac, trials = bisect_ratio(fraction, target, guess=guess, tol=tol)
    if ratio not in cache:
        fraction(ratio)
    model, plain = cache[ratio]
    return model, plain, {"ratio": ratio, "macs_fraction": frac, "trials": trials}


def max_logit_difference(a: nn.Module, b: nn.Module, img_size: int, n: int = 2, seed: int = 0) -> float:
    x = torch.randn(n, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


def _taylor_batches(args: argparse.Namespace) -> list[tuple[Tensor, Tensor]]:
    """``--taylor-batches`` shuffled training batches with eval preprocessing (as the TP example)."""
    from vitprune.data import ImageFolderDataset, build_eval_transform, make_loader

    ds = ImageFolderDataset(shared_data() / "train", build_eval_transform("shared"), shared_model() / "classes.txt")
    loader = make_loader(ds, args.taylor_batch_size, workers=args.workers, shuffle=True, seed=args.seed)
    out = []
    for images, labels in loader:
        out.append((images, labels))
        if len(out) >= args.taylor_batches:
            break
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--macs", type=float, nargs="+", default=[0.9, 0.7, 0.5], help="target fractions of dense MACs")
    ap.add_argument("--importance", nargs="+", choices=IMPORTANCES, default=list(IMPORTANCES))
    ap.add_argument("--scope", nargs="+", choices=SCOPES, default=list(SCOPES))
    ap.add_argument("--attn", choices=ATTN_MODES, default="dims", help="prune head dims (example default) or heads")
    ap.add_argument("--attn-scale", choices=SCALE_MODES, default="example", help="see the module docstring")
    ap.add_argument("--eval-other-scale", action="store_true", help="also evaluate one-shot with the other scale")
    ap.add_argument("--val-limit-per-class", type=int, default=None, help="first N val images per class")
    ap.add_argument("--taylor-batches", type=int, default=10, help="the example's taylor_batchs")
    ap.add_argument("--taylor-batch-size", type=int, default=64, help="the example's train_batch_size")
    ap.add_argument("--recover-minutes", type=float, default=0.0, help="0: one-shot only")
    ap.add_argument("--recover-images", type=int, default=60000, help="image budget of the recovery")
    ap.add_argument("--recover-batch-size", type=int, default=64)
    ap.add_argument("--recover-lr", type=float, default=None, help="default: _recovery.DEFAULTS['lr']")
    ap.add_argument("--speed-batch-sizes", type=int, nargs="+", default=[32, 1])
    ap.add_argument("--speed-runs", type=int, default=None, help="rounds per batch size (default 8 / 30 at b1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for everything (default: torch's)")
    ap.add_argument("--workers", type=int, default=0, help="data-loader workers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-dir", default=None, help="save each pruned (and recovered) model under this folder")
    ap.add_argument("--out-name", default="tp_baseline", help="results file stem under benchmarks/results/")
    args = ap.parse_args(argv)
    if any(not 0.0 < m <= 1.0 for m in args.macs):
        ap.error("--macs fractions must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import _structural_common as S

    tp = _tp()
    t_start = time.perf_counter()
    dense = S.load_dense()
    dense_plain = timm_vit_from_vit(dense, fused=args.attn_scale == "example")
    val = S.val_loader(args.val_limit_per_class, workers=args.workers)
    dense_eval = S.top1(dense, val)
    dense_info = S.describe(dense, None)
    print(f"dense: top-1 {dense_eval['top1']:.2f} on {dense_eval['n']} val images", flush=True)
    grads = None
    if "taylor" in args.importance:
        t0 = time.perf_counter()
        grads = taylor_gradients(dense_plain, _taylor_batches(args))
        n_img = args.taylor_batches * args.taylor_batch_size
        print(f"Taylor gradients: {n_img} training images, {time.perf_counter() - t0:.0f} s", flush=True)

    train_loader = None
    if args.recover_minutes > 0:
        from _recovery import build_train_loader

        train_loader = build_train_loader(batch_size=args.recover_batch_size, workers=args.workers, seed=args.seed)

    rows: list[dict[str, Any]] = []
    models: dict[str, nn.Module] = {"dense": dense}
    for imp in args.importance:
        for scope in args.scope:
            for target in args.macs:
                name = f"{imp}-{scope}-{target:g}"
                t0 = time.perf_counter()
                model, plain, info = prune_to_macs(dense, dense_plain, target, imp, scope, args.attn, grads)
                diff = max_logit_difference(plain, model, dense.config.img_size)
                row: dict[str, Any] = {
                    "name": name,
                    "importance": imp,
                    "scope": scope,
                    "target_macs_fraction": target,
                    "tp_pruning_ratio": info["ratio"],
                    "bisection_trials": info["trials"],
                    **S.describe(model, dense_info["macs"]),
                    "max_logit_diff_vs_tp_module": diff,
                    "prune_s": time.perf_counter() - t0,
                }
                row["oneshot"] = S.top1(model, val)
                if args.eval_other_scale:
                    other = SCALE_MODES[1 - SCALE_MODES.index(args.attn_scale)]
                    row[f"oneshot_scale_{other}"] = S.top1(with_scale(model, other, dense.config), val)
                    print(f"{name}: one-shot top-1 with the {other} scale {row[f'oneshot_scale_{other}']['top1']:.2f}")
                msg = f"ratio {info['ratio']:.4f} -> MACs {row['macs_fraction']:.3f}"
                print(f"{name}: {msg}, one-shot top-1 {row['oneshot']['top1']:.2f} (|dlogit| {diff:.1e})", flush=True)
                if args.save_dir:
                    from vitprune.models import save

                    save(model, f"{args.save_dir}/{name}", overwrite=True, meta={"tp_baseline": row})
                if train_loader is not None:
                    from _recovery import DEFAULTS, recover

                    lr = args.recover_lr or DEFAULTS["lr"]
                    row["recovery"] = recover(
                        model, dense, train_loader, args.recover_images, args.recover_minutes, lr=lr, seed=args.seed
                    )
                    row["recovered"] = S.top1(model, val)
                    rec = row["recovery"]
                    msg = f"recovered top-1 {row['recovered']['top1']:.2f} after {rec['images_seen']} images"
                    print(f"{name}: {msg} / {rec['minutes']:.1f} min", flush=True)
                    if args.save_dir:
                        save(model, f"{args.save_dir}/{name}-recovered", overwrite=True, meta={"tp_baseline": row})
                models[name] = model
                rows.append(row)

    runs = {bs: args.speed_runs for bs in args.speed_batch_sizes} if args.speed_runs else None
    speed = S.speed_side_by_side(models, "dense", args.speed_batch_sizes, runs=runs)
    for row in rows:
        row["speedup"] = {str(bs): speed[bs]["models"][row["name"]]["speedup"] for bs in speed}
    record = {
        "benchmark": "Torch-Pruning side-by-side baseline (examples/transformers/prune_timm_vit.py settings)",
        "torch_pruning": getattr(tp, "__version__", None),
        "torch_pruning_dist": _dist_version("torch-pruning"),
        "settings": {
            "attn": args.attn,
            "attn_scale": args.attn_scale,
            "eval_other_scale": args.eval_other_scale,
            "round_to": 1,
            "iterative_steps": 1,
            "ignored_layers": ["head"],
            "taylor": {"batches": args.taylor_batches, "batch_size": args.taylor_batch_size, "loss": "cross-entropy"},
            "val_limit_per_class": args.val_limit_per_class,
            "val_images": dense_eval["n"],
            "recover_minutes": args.recover_minutes,
            "recover_images": args.recover_images if args.recover_minutes > 0 else 0,
        },
        "dense": {**dense_info, "top1": dense_eval["top1"], "eval": dense_eval},
        "results": rows,
        "speed": {str(bs): v for bs, v in speed.items()},
        "wall_s": time.perf_counter() - t_start,
    }
    bs_cols = [f"speed-up b{bs}" for bs in args.speed_batch_sizes]
    other = SCALE_MODES[1 - SCALE_MODES.index(args.attn_scale)]
    other_cols = [f"one-shot top-1 % ({other} scale)"] if args.eval_other_scale else []
    dash = ["-"] * len(other_cols)
    table_rows = [
        ["dense", "-", "1.000", dense_info["params"], dense_eval["top1"], *dash, "-", *["1.00"] * len(bs_cols)]
    ]
    for r in rows:
        rec = r.get("recovered", {}).get("top1", "-")
        alt = [r[f"oneshot_scale_{other}"]["top1"]] if other_cols else []
        speeds = [r["speedup"][str(bs)] for bs in args.speed_batch_sizes]
        macs = f"{r['macs_fraction']:.3f}"
        table_rows.append([r["importance"], r["scope"], macs, r["params"], r["oneshot"]["top1"], *alt, rec, *speeds])
    headers = ["importance", "scope", "MACs fraction", "params", "one-shot top-1 %", *other_cols, "recovered top-1 %"]
    table = markdown_table([*headers, *bs_cols], table_rows)
    budget = (
        f"recovery: distillation from the dense model, at most {args.recover_images} images or "
        f"{args.recover_minutes:g} min per model (whichever first; see the JSON for what each consumed)"
        if args.recover_minutes > 0
        else "no recovery (one-shot only)"
    )
    md = (
        "# Torch-Pruning 1.6.1 baseline on the shared ViT-Tiny (Tiny-ImageNet)\n\n"
        f"{table}\n\n"
        f"- val images: {dense_eval['n']}"
        + (f" (first {args.val_limit_per_class} per class)" if args.val_limit_per_class else "")
        + f"; attention pruning: {args.attn}; attention scale: {args.attn_scale}; Taylor gradients from "
        f"{args.taylor_batches} x {args.taylor_batch_size} training images (cross-entropy)\n"
        f"- {budget}\n"
        f"- speed: every model timed round-robin with the dense one in one run per batch size; speed-up = dense "
        f"median / model median\n"
    )
    path = write_results(args.out_name, record, md)
    print(f"-> {path} ({record['wall_s'] / 60:.1f} min)")
    return 0


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except VitPruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
