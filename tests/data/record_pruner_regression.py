"""Record the masks and logits every pruner gives on the embedded Fashion-MNIST model (fixed seeds).

Run once BEFORE the pruning-interface redesign (issue #12, at commit 16d2a0c) with the pre-redesign API:
``python tests/data/record_pruner_regression.py``; ``tests/test_pruner_regression.py`` runs the same cases through
the new interface and compares with ``pruner_regression.safetensors`` / ``pruner_regression.json`` (atol 1e-5).
Kept for provenance: it imports the old entry points and is not run by the suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset, TensorDataset

HERE = Path(__file__).resolve().parent


def data():
    from vitprune.data.fashion_mnist import FashionMNIST

    train = FashionMNIST(None, "train", limit=512)
    test = FashionMNIST(None, "test", limit=64)
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(train, batch_size=32, shuffle=True, drop_last=True, generator=g)
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:32].tolist()
    calib = DataLoader(Subset(train, idx), batch_size=16, shuffle=False)
    probe = TensorDataset(*test.tensors()).tensors[0]
    return loader, calib, probe


def pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as bits (numpy packbits of the flattened mask)."""
    import numpy as np

    return torch.from_numpy(np.packbits(mask.flatten().numpy().astype(bool)))


def main() -> None:
    from vitprune.demo import uniform_l2_masks
    from vitprune.pruners.nvit import NViTPruner
    from vitprune.pruners.obs import OBSConfig, prune_unstructured
    from vitprune.pruners.vtp import VTPPruner
    from vitprune.structures.masks import StructuralMasks
    from vitprune.structures.surgery import prune_model
    from vitprune.training.default_model import load_default_model

    torch.set_num_threads(1)
    loader, calib, probe = data()
    dense = load_default_model().eval()
    teacher = load_default_model().eval()
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}

    def logits(name: str, model) -> None:
        model.eval()
        with torch.no_grad():
            tensors[f"{name}/logits"] = model(probe).contiguous()

    common = {"seed": 0, "log_every": 0, "progress": False}
    small, rep = NViTPruner(
        target_macs=0.5,
        prune_steps=2,
        batches_per_step=2,
        train_steps_between=2,
        finetune_steps=2,
        lr=2e-4,
        **common,
        criterion="saliency",
        reconstruct="off",  # the defaults when this was recorded
    ).prune(dense, loader, teacher=teacher)
    meta["nvit_macs"] = {"masks": json.loads(json.dumps(rep["masks"])), "config": small.config.to_dict()}
    logits("nvit_macs", small)

    small, rep = NViTPruner(
        target_params=0.6,
        prune_steps=2,
        batches_per_step=1,
        criterion="per_cost",
        kinds=("heads", "mlp", "emb"),
        reconstruct="off",
        **common,
    ).prune(dense, loader, teacher=teacher)
    meta["nvit_params_per_cost"] = {"masks": rep["masks"], "config": small.config.to_dict()}
    logits("nvit_params_per_cost", small)

    small, rep = VTPPruner(
        target_macs=0.6, lam=1e-4, gate_lr=1e-2, sparsity_steps=3, finetune_steps=2, lr=2e-4, round_to=8, **common
    ).prune(dense, loader, teacher=teacher)
    meta["vtp"] = {"masks": rep["masks"], "config": small.config.to_dict()}
    logits("vtp", small)

    masks, scores, r = uniform_l2_masks(dense, 0.6, round_to=8)
    small = prune_model(dense, masks, round_to=8, scores=scores)
    meta["l2_uniform"] = {"masks": masks.to_dict(), "config": small.config.to_dict(), "kept_fraction": r}
    logits("l2_uniform", small)
    assert isinstance(masks, StructuralMasks)

    def unstructured(name: str, results) -> None:
        for target, res in results.items():
            key = f"{name}@{target:.2f}"
            for p, m in res.masks.items():
                tensors[f"{key}/mask/{p}"] = pack(m)
            logits(key, res.model)
            meta[key] = {"sparsity": res.report["sparsity"]}

    obs_cfg = OBSConfig(block_size=16, num_grads=32, max_memory_gb=2.0)
    unstructured("obs", prune_unstructured(dense, "obs", [0.5, 0.7], calib, obs_cfg))
    unstructured(
        "obs24", prune_unstructured(dense, "obs", [], calib, OBSConfig(block_size=16, num_grads=32, nm=(2, 4)))
    )
    unstructured("gm", prune_unstructured(dense, "gm", [0.5], None))
    unstructured("um", prune_unstructured(dense, "um", [0.5], None))
    unstructured("wanda", prune_unstructured(dense, "wanda", [0.5], calib, num_samples=32))
    unstructured(
        "sparsegpt", prune_unstructured(dense, "sparsegpt", [0.5], calib, num_samples=32, blocksize=16, damp=0.01)
    )
    save_file(tensors, str(HERE / "pruner_regression.safetensors"))
    (HERE / "pruner_regression.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(meta)} cases, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
