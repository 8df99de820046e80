"""Unifying deltas: presets, named deltas and per-sample routing, delta algebra, extraction.

Built on the public verbs (``deltatune.api``); gates are a method (methods/gates.py), presets return configs.
"""

from .algebra import combine
from .extract import extract_lora
from .named import activate, active, deactivate, deltas, load_all, save_all
from .presets import MAM, UniPELT
from .router import Router, attach_router, load_router
from .routing import route

__all__ = ["MAM", "Router", "UniPELT", "activate", "active", "attach_router", "combine", "deactivate", "deltas",
           "extract_lora", "load_all", "load_router", "route", "save_all"]
