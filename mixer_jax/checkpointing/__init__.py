"""Orbax checkpoints of training runs: saving, resuming, preemption, integrity checks.
"""
