"""A real training process killed with SIGKILL after its first checkpoint resumes to the same final weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import sys
    import time

    import torch
    from torch.utils.data import DataLoader, Dataset

    from vitprune.models import ViT, ViTConfig
    from vitprune.training import TrainConfig, Trainer
    from vitprune.training.augment import build_train_transform


    class Synthetic(Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.x = torch.rand(40, 3, 16, 16, generator=g)
            self.y = torch.arange(40) % 4
            self.tf = build_train_transform(16, mean=(0.5,) * 3, std=(0.5,) * 3, scale=(0.5, 1.0),
                                            randaugment="rand-m5-n1")

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.tf(self.x[i]), int(self.y[i])


    def run(out, resume=False, delay=0.0):
        torch.set_num_threads(1)
        torch.manual_seed(0)
        cfg = ViTConfig.uniform(embed_dim=16, depth=2, heads=2, mlp_ratio=2.0, num_classes=4, img_size=16,
                                patch_size=8)
        model = ViT(cfg)
        loader = DataLoader(Synthetic(), batch_size=8, shuffle=True)
        config = TrainConfig(steps=24, lr=3e-3, warmup_steps=3, grad_clip=1.0, drop_path=0.1, mixup=0.4,
                             cutmix=1.0, label_smoothing=0.1, ckpt_every=4, log_every=2, progress=False,
                             resume=resume)
        slow = [lambda trainer, step: time.sleep(delay)] if delay else []
        return Trainer(model, config, loader, out_dir=out, hooks=slow).fit()


    if __name__ == "__main__":
        run(sys.argv[1], resume="--resume" in sys.argv, delay=0.25 if "--slow" in sys.argv else 0.0)
    """
)


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(tmp_path), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_after_first_checkpoint_then_resume_matches_uninterrupted(tmp_path):
    worker = tmp_path / "resume_worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(worker), str(out), "--slow"], env=_env(tmp_path))
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, "the worker ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists(), "the run must have been killed before finishing"

    done = subprocess.run(
        [sys.executable, str(worker), str(out), "--resume"], env=_env(tmp_path), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]

    sys.path.insert(0, str(tmp_path))
    try:
        import resume_worker
    finally:
        sys.path.remove(str(tmp_path))
    summary = resume_worker.run(tmp_path / "uninterrupted")
    assert summary["steps"] == 24

    resumed = load_file(str(out / "model" / "model.safetensors"))
    reference = load_file(str(tmp_path / "uninterrupted" / "model" / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert resumed[name].equal(tensor), f"{name} differs after resume"
