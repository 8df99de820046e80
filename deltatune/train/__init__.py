"""The training workflow behind the ``deltatune`` CLI: config, data, loop, checkpoints, reports.

Entry points for code: ``load_config`` (YAML + overrides -> validated RunConfig) and ``jobs.train``.
"""

from .config import RunConfig, load_config

__all__ = ["RunConfig", "load_config"]
