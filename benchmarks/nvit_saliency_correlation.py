"""Does the NViT saliency I(S) = 1/2 E[(sum_S g w)^2] rank groups by their true loss change? (real model + data)

On the shared ViT-Tiny (Tiny-ImageNet 200): accumulate I(S) over training batches (cross-entropy on labels),
then remove sampled groups of every kind one at a time (heads, QK dims, V dims, MLP neurons, embedding channels,
whole blocks) and measure the loss change on a fixed held-out set (the val images, ``--val-per-class`` per class).
Reports Spearman rank correlations overall and per kind, against the signed and the absolute loss change, and the
same for a magnitude baseline (squared L2 norm of the group's weights).

Block inputs of the held-out set are cached, so removing a group of block b only re-runs blocks b..11.

With ``--compensated`` (#14): for heads, V dims and MLP neurons also the loss change when the removal is compensated
in closed form - the group-OBS update of the layer the group feeds (``proj`` / ``fc2``, bias included; ZipLM eq. 3,
:func:`vitprune.pruners.reconstruct.group_obs_update`, the layer Hessian ``X^T X`` from ``--calib-images`` other
training images) - and how the reconstruction-aware score (ZipLM eq. 4, the cost of removal WITH compensation,
:func:`vitprune.pruners.reconstruct.reconstruction_scores`) ranks against both loss changes, next to I(S).
``--held-out tune`` measures the loss on the tuning split (the first training images of every class, never the
saliency or calibration images) instead of val images.

    python benchmarks/nvit_saliency_correlation.py --threads 2
    python benchmarks/nvit_saliency_correlation.py --threads 2 --compensated --held-out tune --per-kind 24 \
        --name nvit_saliency_correlation_compensated
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time

import torch
import torch.nn.functional as F
from _common import markdown_table, shared_data, shared_model, write_results
from _recovery import split_train
from scipy.stats import spearmanr
from torch.utils.data import Subset

from vitprune.data import ImageFolderDataset, build_eval_transform, make_loader
from vitprune.models.checkpoints import load_model
from vitprune.pruners.reconstruct import group_obs_update, reconstruction_scores
from vitprune.scoring.hessian import compute_saliency
from vitprune.structures import KINDS, enumerate_groups, group_slices, zero_group
from vitprune.structures.groups import proj_cols


def _tail_logits(model, x, start: int) -> torch.Tensor:
    """Logits from the input of block ``start`` on (no masks)."""
    for blk in model.blocks[start:]:
        x = blk(x)
    return model.forward_head(model.norm(x))


class Compensation:
    """Layer Hessians of every ``proj`` / ``fc2`` (augmented with the bias column) and the ZipLM scores."""

    kinds = ("heads", "v", "mlp")

    def __init__(self, model, loader, num_images: int, damping: float) -> None:
        self.model, self.damping = model, damping
        self.scores = reconstruction_scores(model, loader, num_images=num_images, damping=damping)
        names = [f"blocks.{b}.{n}" for b in range(len(model.blocks)) for n in ("attn.proj", "mlp.fc2")]
        mods = dict(model.named_modules())
        self.grams = {n: torch.zeros(mods[n].in_features + 1, mods[n].in_features + 1, dtype=torch.float64)
                      for n in names}  # fmt: skip

        def hook(name):
            def fn(_mod, inputs, _out):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
                self.grams[name] += x.T @ x

            return fn

        handles = [mods[n].register_forward_hook(hook(n)) for n in names]
        seen = 0
        try:
            with torch.inference_mode():
                for images, _ in loader:
                    model(images)
                    seen += len(images)
                    if seen >= num_images:
                        break
        finally:
            for h in handles:
                h.remove()

    def loss(self, g, block_input, y) -> float:
        """Held-out loss with group ``g`` removed AND its layer re-solved (restored afterwards)."""
        cfg = self.model.config.blocks[g.block]
        blk = self.model.blocks[g.block]
        lin, name = (blk.mlp.fc2, f"blocks.{g.block}.mlp.fc2") if g.kind == "mlp" else (
            blk.attn.proj, f"blocks.{g.block}.attn.proj")  # fmt: skip
        if g.kind == "mlp":
            cols = torch.tensor([g.index])
        elif g.kind == "heads":
            cols = proj_cols(cfg, torch.tensor([g.index]))
        else:
            cols = proj_cols(cfg, None, torch.tensor([g.index]))
        remove = torch.zeros(lin.in_features + 1, dtype=torch.bool)
        remove[cols] = True
        w_aug = torch.cat([lin.weight.detach(), lin.bias.detach()[:, None]], 1)
        new = group_obs_update(w_aug, self.grams[name], remove, self.damping).to(w_aug.dtype)
        saved = (lin.weight.detach().clone(), lin.bias.detach().clone())
        with torch.no_grad():
            lin.weight.copy_(new[:, :-1])
            lin.bias.copy_(new[:, -1])
            logits = _tail_logits(self.model, block_input, g.block)
            lin.weight.copy_(saved[0])
            lin.bias.copy_(saved[1])
        return F.cross_entropy(logits, y).item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(shared_model() / "model.safetensors"))
    ap.add_argument("--classes", default=str(shared_model() / "classes.txt"))
    ap.add_argument("--train", default=str(shared_data() / "train"))
    ap.add_argument("--val", default=str(shared_data() / "val"))
    ap.add_argument("--batches", type=int, default=8, help="saliency batches")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--val-per-class", type=int, default=1, help="held-out images per class for the loss")
    ap.add_argument("--per-kind", type=int, default=12, help="groups sampled per kind (all blocks: 12)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compensated", action="store_true", help="also the compensated loss change and ZipLM score")
    ap.add_argument("--calib-images", type=int, default=256, help="images of the layer Hessians (--compensated)")
    ap.add_argument("--damping", type=float, default=1e-3, help="relative damping of the compensation")
    ap.add_argument("--held-out", choices=("val", "tune"), default="val", help="images the loss is measured on")
    ap.add_argument("--name", default="nvit_saliency_correlation")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    torch.manual_seed(args.seed)

    model = load_model(args.model).eval()
    tf = build_eval_transform("shared")
    train = ImageFolderDataset(args.train, tf, args.classes)
    loader = make_loader(train, args.batch_size, shuffle=True, seed=args.seed, drop_last=True)
    if args.held_out == "tune":  # saliency and calibration from the other training images
        loader = make_loader(Subset(train, split_train(train.samples, args.val_per_class)[1]), args.batch_size,
                             shuffle=True, seed=args.seed, drop_last=True)  # fmt: skip
    t0 = time.perf_counter()
    scores = compute_saliency(model, loader, args.batches, mode="labels", progress=sys.stderr.isatty())
    t_sal = time.perf_counter() - t0
    comp = Compensation(model, loader, args.calib_images, args.damping) if args.compensated else None

    if args.held_out == "tune":  # the first files of every class (disjoint from the saliency images)
        held = Subset(train, split_train(train.samples, args.val_per_class)[0])
    else:
        held = ImageFolderDataset(args.val, tf, args.classes, limit_per_class=args.val_per_class)
    xs, ys = zip(*[held[i] for i in range(len(held))], strict=True)
    x, y = torch.stack(xs), torch.tensor(ys)
    with torch.inference_mode():
        h = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([model.cls_token.expand(len(x), -1, -1), h], 1) + model.pos_embed
        cached = []
        for blk in model.blocks:
            cached.append(h)
            h = blk(h)
        base_loss = F.cross_entropy(model.forward_head(model.norm(h)), y).item()

    rng = random.Random(args.seed)
    groups = []
    for kind in KINDS:
        pool = enumerate_groups(model.config, kinds=[kind])
        groups += rng.sample(pool, min(args.per_kind, len(pool)))
    params = dict(model.named_parameters())
    rows = []
    t0 = time.perf_counter()
    for i, g in enumerate(groups):
        m = copy.deepcopy(model) if g.kind == "emb" else model
        saved = []
        if g.kind == "emb":
            zero_group(m, g)
        else:  # zero in place, restore after
            for s in group_slices(model.config, g):
                saved.append((s, params[s.name].detach().index_select(s.dim, s.index).clone()))
            zero_group(m, g)
        with torch.inference_mode():
            logits = m(x) if g.kind == "emb" else _tail_logits(m, cached[g.block], g.block)
            loss = F.cross_entropy(logits, y).item()
        with torch.no_grad():
            for s, value in saved:
                params[s.name].index_copy_(s.dim, s.index, value)
        magnitude = sum(
            float(params[s.name].detach().index_select(s.dim, s.index).double().square().sum())
            for s in group_slices(model.config, g)
        )
        row = {
            "kind": g.kind,
            "block": g.block,
            "index": g.index,
            "saliency": float(scores[g.key][g.index]),
            "loss_change": loss - base_loss,
            "magnitude": magnitude,
        }
        if comp is not None and g.kind in comp.kinds:
            row["ziplm"] = float(comp.scores[g.key][g.index])
            row["loss_change_compensated"] = comp.loss(g, cached[g.block], y) - base_loss
        rows.append(row)
        if sys.stderr.isatty():
            print(f"\r{i + 1}/{len(groups)} groups", end="", file=sys.stderr)
    t_loss = time.perf_counter() - t0

    def rho(sel, key, target, loss="loss_change"):
        sel = [r for r in sel if key in r and loss in r]
        a = [r[key] for r in sel]
        b = [abs(r[loss]) if target == "abs" else r[loss] for r in sel]
        return float(spearmanr(a, b)[0]) if len(sel) > 2 else float("nan")

    summary = {}
    for kind in ("all", *KINDS):
        sel = rows if kind == "all" else [r for r in rows if r["kind"] == kind]
        summary[kind] = {
            "n": len(sel),
            "spearman_saliency_vs_dloss": rho(sel, "saliency", "signed"),
            "spearman_saliency_vs_abs_dloss": rho(sel, "saliency", "abs"),
            "spearman_magnitude_vs_dloss": rho(sel, "magnitude", "signed"),
            "mean_dloss": sum(r["loss_change"] for r in sel) / max(len(sel), 1),
        }
        if comp is not None:
            cs = [r for r in sel if "ziplm" in r]
            summary[kind] |= {
                "n_compensated": len(cs),
                "spearman_saliency_vs_dloss_compensated": rho(sel, "saliency", "signed", "loss_change_compensated"),
                "spearman_ziplm_vs_dloss_compensated": rho(sel, "ziplm", "signed", "loss_change_compensated"),
                "spearman_ziplm_vs_dloss": rho(sel, "ziplm", "signed"),
                "mean_dloss_compensated": sum(r["loss_change_compensated"] for r in cs) / max(len(cs), 1),
            }
    record = {
        "model": args.model,
        "saliency": {"mode": "labels", "batches": args.batches, "batch_size": args.batch_size, "time_s": t_sal},
        "held_out": {
            "images": len(x),
            "per_class": args.val_per_class,
            "dense_loss": base_loss,
            "split": args.held_out,
        },
        "compensation": None if comp is None else {"calib_images": args.calib_images, "damping": args.damping},
        "per_kind_sampled": args.per_kind,
        "summary": summary,
        "groups": rows,
        "time_s": {"saliency": t_sal, "loss_changes": t_loss, "total": time.perf_counter() - t_start},
    }
    table = markdown_table(
        ["groups", "n", "Spearman I(S) vs dL", "Spearman I(S) vs abs(dL)", "Spearman w^2 vs dL", "mean dL"],
        [
            [
                k,
                s["n"],
                s["spearman_saliency_vs_dloss"],
                s["spearman_saliency_vs_abs_dloss"],
                s["spearman_magnitude_vs_dloss"],
                round(s["mean_dloss"], 4),
            ]
            for k, s in summary.items()
        ],
    )
    where = "val images" if args.held_out == "val" else "training images of the tuning split"
    md = (
        "# NViT saliency vs true loss change (shared ViT-Tiny, Tiny-ImageNet)\n\n"
        f"I(S) from {args.batches} training batches of {args.batch_size} (cross-entropy on labels); loss change of "
        f"removing each group measured on {len(x)} held-out {where} (dense loss {base_loss:.4f}).\n\n{table}\n"
    )
    if comp is not None:
        ctable = markdown_table(
            ["groups", "n", "I(S) vs dL", "ZipLM vs dL", "I(S) vs dL compensated", "ZipLM vs dL compensated",
             "mean dL", "mean dL compensated"],
            [[k, s["n_compensated"], s["spearman_saliency_vs_dloss"], s["spearman_ziplm_vs_dloss"],
              s["spearman_saliency_vs_dloss_compensated"], s["spearman_ziplm_vs_dloss_compensated"],
              round(s["mean_dloss"], 4), round(s["mean_dloss_compensated"], 4)]
             for k, s in summary.items() if s.get("n_compensated")],
        )  # fmt: skip
        md += (
            "\nWith closed-form compensation (heads, V dims, MLP neurons): the group removed, then the layer it feeds "
            f"(proj / fc2, bias included) re-solved by the group-OBS update (layer Hessian from {args.calib_images} "
            f"training images, damping {args.damping:g} x mean diagonal); ZipLM = the cost of removal with that "
            f"compensation (eq. 4). Spearman correlations (signed loss change):\n\n{ctable}\n"
        )
    path = write_results(args.name, record, md)
    print(table)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
