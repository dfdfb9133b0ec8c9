"""Latency lookup tables (lut.py): build on the target device, interpolate, check against measurements."""
