"""Two gloo processes under torchrun train to the same weights as one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from vitprune.models.io import load
from vitprune.training import Trainer
from vitprune.training import distributed as D

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8
STEPS = 6

COMMON = textwrap.dedent(
    """
    import torch
    from vitprune.models import ViT, ViTConfig

    CFG = ViTConfig.uniform(embed_dim=16, depth=2, heads=2, mlp_ratio=2.0, num_classes=3, img_size=16, patch_size=8)

    def data():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 3, 16, 16, generator=g)
        return x, torch.arange(40) % 3

    def model():
        torch.manual_seed(0)
        return ViT(CFG)

    def config(**kw):
        from vitprune.training import TrainConfig
        return TrainConfig(steps=6, lr=3e-3, warmup_steps=2, grad_clip=1.0, weight_decay=0.05, label_smoothing=0.1,
                           progress=False, ckpt_every=3, log_every=2, **kw)
    """
)

WORKER = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    from torch.utils.data import DataLoader, TensorDataset
    from vitprune.training import Trainer
    from vitprune.training import distributed as D
    from common import config, data, model

    D.setup_distributed("cpu")
    assert D.is_distributed() and D.world_size() == 2
    t = torch.tensor([D.rank() + 1.0])
    D.all_reduce_sum_(t)
    m = torch.tensor([2.0 * D.rank()])
    D.all_reduce_mean_(m)
    assert t.item() == 3.0 and m.item() == 1.0, (t, m)
    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8 // D.world_size(), shuffle=True)
    summary = Trainer(model(), config(), loader, out_dir=sys.argv[1]).fit()
    assert summary["world_size"] == 2 and summary["images_seen"] == 6 * 8
    D.cleanup_distributed()
    """
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_helpers_are_no_ops_without_a_process_group():
    t = torch.tensor([2.0, 3.0])
    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1
    assert torch.equal(D.all_reduce_sum_(t), torch.tensor([2.0, 3.0]))
    assert torch.equal(D.all_reduce_mean_(t), torch.tensor([2.0, 3.0]))
    assert D.all_gather_objects({"a": 1}) == [{"a": 1}] and D.broadcast_object(5) == 5
    assert D.setup_distributed("cpu") == torch.device("cpu")
    D.barrier()


def test_two_process_gloo_run_equals_single_process_run(tmp_path):
    (tmp_path / "common.py").write_text(COMMON)
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(tmp_path), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(tmp_path / "worker.py"), str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    sys.path.insert(0, str(tmp_path))
    try:
        import common
    finally:
        sys.path.remove(str(tmp_path))
    x, y = common.data()
    single = common.model()
    loader = DataLoader(TensorDataset(x, y), batch_size=GLOBAL_BATCH, shuffle=True)
    Trainer(single, common.config(), loader, out_dir=tmp_path / "single").fit()
    ddp = load(tmp_path / "ddp" / "model")
    start = common.model()
    moved = False
    for (name, a), b, c in zip(
        single.state_dict().items(), ddp.state_dict().values(), start.state_dict().values(), strict=True
    ):
        if name.endswith("attn.qkv.bias"):
            # The key bias has an exactly-zero true gradient (softmax is shift invariant): AdamW turns its
            # rounding noise into +-lr steps, so only the query and value parts are comparable.
            d = a.shape[0] // 3
            a, b, c = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]]), torch.cat([c[:d], c[2 * d :]])
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
        moved = moved or not torch.allclose(a, c)
    with torch.no_grad():
        assert torch.allclose(single.eval()(x), ddp.eval()(x), atol=1e-4)
    assert moved, "training must have changed the weights"
    ckpt = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2 and ckpt["step"] == STEPS
