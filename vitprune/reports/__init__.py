"""Pruning reports: per-block dims tables and plots, JSON reports (shared by NViT and VTP)."""

from vitprune.reports.blocks import arch_summary, block_dims, plot_block_dims, write_json_report

__all__ = ["arch_summary", "block_dims", "plot_block_dims", "write_json_report"]
