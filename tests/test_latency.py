"""Latency measurement: statistics, alternation, thread/mode restoration; peak-memory measurement."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch import nn

from vitprune.errors import VitPruneError
from vitprune.metrics.latency import (
    _percentile,
    compare_latency,
    compare_many,
    measure_latency,
    model_on,
    num_threads,
    summarize_times,
)
from vitprune.metrics.memory import measure_peak_memory


class Sleeper(nn.Module):
    """Takes ``ms`` milliseconds per call and records the order of calls."""

    def __init__(self, name: str, ms: float, log: list[str]) -> None:
        super().__init__()
        self.name, self.ms, self.log = name, ms, log
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(self.name)
        time.sleep(self.ms / 1000)
        return x * self.scale


def test_summary_statistics_match_numpy():
    rng = np.random.default_rng(0)
    values = list(rng.uniform(1, 10, size=11))
    s = summarize_times(values, batch_size=4)
    assert s["median_ms"] == pytest.approx(np.median(values))
    assert s["mean_ms"] == pytest.approx(np.mean(values))
    assert s["p10_ms"] == pytest.approx(np.percentile(values, 10))
    assert s["p90_ms"] == pytest.approx(np.percentile(values, 90))
    assert s["std_ms"] == pytest.approx(np.std(values, ddof=1))
    assert s["min_ms"] == min(values)
    assert s["images_per_s"] == pytest.approx(4000 / np.median(values))
    for q in (0, 25, 50, 73, 100):
        assert _percentile(sorted(values), q) == pytest.approx(np.percentile(values, q))


def test_measure_latency_on_vit(tiny_model):
    tiny_model.train()
    before_threads = torch.get_num_threads()
    res = measure_latency(tiny_model, batch_size=2, threads=1, warmup=1, runs=4)
    assert res["threads"] == 1 and res["batch_size"] == 2 and res["runs"] == 4 and res["img_size"] == 32
    assert res["device"] == "cpu" and res["dtype"] == "float32"
    assert 0 < res["min_ms"] <= res["p10_ms"] <= res["median_ms"] <= res["p90_ms"]
    assert res["images_per_s"] == pytest.approx(2000 / res["median_ms"])
    assert torch.get_num_threads() == before_threads  # restored
    assert tiny_model.training  # mode restored


def test_measure_latency_other_dtype_does_not_touch_model(tiny_model):
    res = measure_latency(tiny_model, batch_size=1, warmup=0, runs=2, dtype=torch.bfloat16, img_size=48)
    assert res["dtype"] == "bfloat16" and res["img_size"] == 48
    assert all(p.dtype == torch.float32 for p in tiny_model.parameters())


def test_model_on_copies_only_when_it_must(tiny_model):
    cpu = torch.device("cpu")
    assert model_on(tiny_model, cpu, torch.float32) is tiny_model
    half = model_on(tiny_model, cpu, torch.bfloat16)
    assert half is not tiny_model and half.head.weight.dtype == torch.bfloat16
    assert tiny_model.head.weight.dtype == torch.float32


def test_compare_alternates_and_reports_ratio():
    log: list[str] = []
    slow, fast = Sleeper("slow", 24.0, log), Sleeper("fast", 6.0, log)
    res = compare_latency(slow, fast, batch_size=1, img_size=4, warmup=1, runs=5)
    assert log == ["slow", "fast"] * 6  # warm-up round then 5 timed rounds, strictly alternating
    assert res["a"]["median_ms"] > res["b"]["median_ms"]
    assert 2.5 < res["ratio"] < 4.5  # 24 ms / 6 ms = 4, minus timer/sleep overhead on a busy machine
    assert res["ratio_p10"] <= res["ratio_p90"]
    assert res["ratio"] == pytest.approx(res["a"]["median_ms"] / res["b"]["median_ms"])


def test_compare_many_round_robin_and_baseline():
    log: list[str] = []
    models = {"x": Sleeper("x", 2.0, log), "y": Sleeper("y", 1.0, log), "z": Sleeper("z", 4.0, log)}
    res = compare_many(models, batch_size=1, img_size=4, warmup=0, runs=3, baseline="y")
    assert log == ["x", "y", "z"] * 3
    assert res["baseline"] == "y" and res["models"]["y"]["speedup"] == 1.0
    assert len(res["models"]["z"]["times_ms"]) == 3
    assert res["models"]["z"]["speedup"] < 1.0 < res["models"]["y"]["speedup"] / res["models"]["z"]["speedup"]


def test_bad_arguments(tiny_model):
    with pytest.raises(VitPruneError, match="img_size is required"):
        measure_latency(nn.Linear(2, 2), runs=1)
    with pytest.raises(VitPruneError, match="runs >= 1"):
        measure_latency(tiny_model, runs=0)
    with pytest.raises(VitPruneError, match="baseline"):
        compare_many({"a": tiny_model}, baseline="b", runs=1)
    with pytest.raises(VitPruneError, match="threads"), num_threads(0):
        pass
    if not torch.cuda.is_available():
        with pytest.raises(VitPruneError, match="cuda"):
            measure_latency(tiny_model, device="cuda", runs=1)


class TwoLayer(nn.Module):
    """fc1 -> GELU -> fc2: the forward holds fc1's output and GELU's output at the same time."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def test_peak_memory_closed_form():
    """Peak = fc1 output + GELU output (both alive at once), retained = the logits; exact, in bytes."""
    model = TwoLayer(64, 512, 10)
    res = measure_peak_memory(model, batch_size=16, input_shape=(64,))
    assert res["peak_bytes"] == 2 * 16 * 512 * 4
    assert res["retained_bytes"] == 16 * 10 * 4
    assert res["param_bytes"] == sum(p.numel() for p in model.parameters()) * 4
    assert res["input_bytes"] == 16 * 64 * 4
    assert res["device"] == "cpu"


def test_peak_memory_vit_is_linear_in_batch(tiny_model):
    """Activation memory is per image: doubling the batch doubles the peak exactly (batch >= 2; batch 1 takes
    another attention kernel)."""
    two = measure_peak_memory(tiny_model, batch_size=2)
    four = measure_peak_memory(tiny_model, batch_size=4)
    assert two["peak_bytes"] > 2 * 17 * 32 * 4  # more than the residual stream of 17 tokens x 32 channels
    assert two["retained_bytes"] == 2 * 10 * 4  # the logits
    assert four["peak_bytes"] == 2 * two["peak_bytes"]


def test_peak_memory_bad_input():
    with pytest.raises(VitPruneError, match="input_shape"):
        measure_peak_memory(nn.Linear(2, 2))
