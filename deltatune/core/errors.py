"""One exception family, so callers can catch ``DeltaError`` and still get the builtin kind they expect.

Every message says what was wrong *and* what to do about it; the model is never left half-modified.
"""

from __future__ import annotations


class DeltaError(Exception):
    """Base class of every error deltatune raises on purpose."""


class ConfigError(DeltaError, ValueError):
    """A method or training config has an impossible value (``lora.r must be > 0, got 0``)."""


class TargetError(DeltaError, LookupError):
    """Target names matched no module, or matched modules of a type the method can't wrap."""


class AttachError(DeltaError, ValueError):
    """The delta can't be attached as asked (already attached, name taken, nothing to train)."""


class StateError(DeltaError, ValueError):
    """An operation doesn't fit the delta's current state (merge while merged, use after detach)."""


class CheckpointError(DeltaError, ValueError):
    """A checkpoint is corrupt, from an unsupported format, or doesn't fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint directory or one of its files does not exist."""


class BaseModelMismatchError(CheckpointError):
    """The checkpoint was saved for a different base model (architecture or parameter shapes)."""


class DataError(DeltaError, ValueError):
    """The training data can't be used as configured (missing file or column, unknown label, empty split)."""
