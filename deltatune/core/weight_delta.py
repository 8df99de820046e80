"""The wrapper shape shared by methods whose delta is a whole weight-shaped dW built from their own factors at
each call (LoHa's Hadamard product, LoKr's Kronecker product, SparseFT's scattered values): y = f(x) + x dW^T.
W + dW is never built for the forward, so the base layer may be quantized (bitsandbytes, torchao).

A method subclasses ``WeightDeltaWrapper`` and defines ``update()``; forward, merging (dW added to W in the base
layer's own layout, transposed for transformers' Conv1D) and routing come from here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .inject import DeltaWrapper


class WeightDeltaWrapper(DeltaWrapper):
    """A frozen Linear / Conv1D plus x dW^T, dW = ``update()`` in (out, in) layout."""

    mergeable = True
    routable = True  # the whole delta path goes through ``scaled``
    # x dW^T is added to the base layer's output, never to its weight: a quantized layer runs as it is (tests/quant)
    wraps_quantized = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.conv1d = not isinstance(self.base_layer(), nn.Linear)  # Conv1D stores its weight (in, out)

    def update(self) -> torch.Tensor:
        """dW in (out, in) layout, whatever the base layer stores."""
        raise NotImplementedError(f"{type(self).__name__} must define update()")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.uses_delta:
            return out
        return out + self.scaled(F.linear(x, self.update()))

    def delta_weight(self) -> torch.Tensor:
        return self.update().T if self.conv1d else self.update()
