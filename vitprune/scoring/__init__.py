"""Saliency scores: NViT Hessian-aware group saliency (hessian.py), block Fisher inverses and OBS (fisher.py,
obs.py)."""
