"""Pruning methods: NViT (nvit.py), oViT/CAP (obs.py), VTP (vtp.py) and baselines (baselines.py)."""
