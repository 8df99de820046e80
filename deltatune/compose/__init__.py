"""Unifying deltas: combinations and gates, presets, named deltas and per-sample routing, delta algebra.

Deliberately import-free: ``deltatune.api`` imports ``compose.presets`` while it is being imported itself,
so the public names are re-exported from the submodules by ``deltatune/__init__.py``.
"""
