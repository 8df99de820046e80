"""The layer types deltas know how to wrap, in one place (targets, structure and the wrappers all ask here)."""

from __future__ import annotations

import functools

from torch import nn


@functools.cache
def linear_types() -> tuple[type[nn.Module], ...]:
    """nn.Linear plus transformers' Conv1D (GPT-2 stores its projections transposed). Subclasses of nn.Linear
    (bitsandbytes' quantized layers, for one) match too, through isinstance."""
    from transformers.pytorch_utils import Conv1D  # transformers is heavy: imported on first use

    return (nn.Linear, Conv1D)
