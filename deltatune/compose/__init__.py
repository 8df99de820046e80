"""Unifying deltas: presets, named deltas and per-sample routing, delta algebra, extraction.

Built on the public verbs (``deltatune.api``); gates are a method (methods/gates.py), presets return configs.
"""

from .algebra import combine
from .extract import extract_lora
from .named import activate, active, deactivate, deltas, load_all, save_all
from .presets import MAM, UniPELT
from .routing import route

__all__ = ["MAM", "UniPELT", "activate", "active", "combine", "deactivate", "deltas", "extract_lora", "load_all",
           "route", "save_all"]
