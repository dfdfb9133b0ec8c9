"""Small shared helpers (filesystem safety, devices)."""
