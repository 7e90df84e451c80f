"""Orbax checkpoints: saving, resuming, preemption, integrity checks."""
