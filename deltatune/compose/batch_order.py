"""One forward call with its batch sorted by route, and its outputs put back in the caller's order.

Why: under hard routing at inference, every LoRA layer runs each delta's samples through its own folded
weight (core/routed_fold.py). In a mixed batch those samples are scattered, so every layer gathers each
group's rows and scatters its outputs back: activation-sized copies at every layer, 9-14% of a routed
MiniLM forward (BENCHMARKS.md, "Learned routing"). With the batch sorted once by route, each group is a run
of consecutive rows: layers read views and write the products in place, and the copies are made twice per
call (inputs in, outputs out) instead of twice per layer. Every op of a transformer outside the batch
dimension is per sample, so sorting the batch changes nothing but the order (and the summation order of a
mean loss over it).

Only inputs known to lead with the batch are sorted (``BATCH_INPUTS``); a call with any other tensor, or with
a filled cache (decoding: the samples' cache rows are where the prompt left them), is left as it is, which is
exact too, just slower. A cache the call fills (prompt processing) is put back in the caller's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

BATCH_INPUTS = frozenset({
    "input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "labels", "pixel_values",
    "decoder_input_ids", "decoder_attention_mask", "decoder_inputs_embeds"})
NOT_BATCH_INPUTS = frozenset({"cache_position"})  # tensors along the sequence: passed as they are
CACHE_INPUTS = frozenset({"past_key_values", "cache"})  # "cache" since transformers 5.24


class BatchOrder:
    """The permutation that sorts a batch by route; ``inputs`` applies it, ``outputs`` undoes it."""

    def __init__(self, order: Sequence[int]) -> None:
        self.size = len(order)
        self.order = torch.tensor(list(order))
        self.inverse = torch.argsort(self.order)

    @staticmethod
    def for_routes(routes: Sequence[int]) -> BatchOrder | None:
        """The stable sort of sample indices by route; None when the batch is already in route order."""
        order = sorted(range(len(routes)), key=routes.__getitem__)
        return None if order == list(range(len(routes))) else BatchOrder(order)

    def sort(self, routes: Sequence[Any]) -> list[Any]:
        return [routes[i] for i in self.order.tolist()]

    def inputs(self, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """``inputs`` (the call's arguments by name) in route order; None when the call cannot be sorted."""
        sorted_inputs = {}
        for name, value in inputs.items():
            if self._leads_with_batch(name, value):
                value = value.index_select(0, self.order.to(value.device))
            elif not self._passes_as_is(name, value):
                return None
            sorted_inputs[name] = value
        return sorted_inputs

    def _leads_with_batch(self, name: str, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and name in BATCH_INPUTS and value.dim() > 0 and len(value) == self.size

    @staticmethod
    def _passes_as_is(name: str, value: Any) -> bool:
        """Whether an input that is not sorted is the same for every order of the batch."""
        if isinstance(value, torch.Tensor):  # along the sequence, or broadcast over the batch (position_ids (1, T))
            return name in NOT_BATCH_INPUTS or (name in BATCH_INPUTS and value.dim() > 0 and len(value) == 1)
        if name in CACHE_INPUTS:
            return value is None or _empty_cache(value)  # a filled cache holds rows in the caller's order
        return value is None or isinstance(value, bool | int | float | str)

    def outputs(self, output: Any) -> Any:
        """``output`` with every batch-leading tensor (and a cache the call filled) back in the caller's order."""
        if isinstance(output, torch.Tensor):
            if output.dim() and len(output) == self.size:
                return output.index_select(0, self.inverse.to(output.device))
            return output
        if hasattr(output, "reorder_cache"):
            output.reorder_cache(self.inverse)
            return output
        if isinstance(output, dict):  # transformers' ModelOutput is a dict: set items so its attributes follow
            for key in list(output.keys()):
                output[key] = self.outputs(output[key])
            return output
        if type(output) in (tuple, list):
            return type(output)(self.outputs(v) for v in output)
        return output


def _empty_cache(value: Any) -> bool:
    """A transformers Cache with nothing in it yet (generation's first call), which can be put back in order."""
    length = getattr(value, "get_seq_length", None)
    return callable(length) and hasattr(value, "reorder_cache") and length() == 0
