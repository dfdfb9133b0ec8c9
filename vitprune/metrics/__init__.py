"""Accuracy, compute and speed measurements."""

from vitprune.metrics.evaluate import evaluate, topk_correct

__all__ = ["evaluate", "topk_correct"]
