"""``deltatune serve``: one process holds the base model once and answers HTTP requests for many named deltas,
batching concurrent requests for different deltas into one forward with per-sample routing.

A layer above the library, beside the CLI: the library never imports it (tests/test_layering.py).
Needs the ``serve`` extra (fastapi, uvicorn). Guide: docs/serving-server.md.
"""

from .app import ServeSettings, create_app
from .batcher import Batcher
from .engine import BASE_NAME, Engine, Row, Sampling
from .load import load_engine, parse_deltas

__all__ = ["BASE_NAME", "Batcher", "Engine", "Row", "Sampling", "ServeSettings", "create_app", "load_engine",
           "parse_deltas"]
