"""Benchmarks, all in one place: `farm bench` (render.py), `farm bench submit` (submit.py), the GPU script (gpu.py)."""
