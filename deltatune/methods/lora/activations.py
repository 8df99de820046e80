"""Feeding a few batches through the model to collect statistics of the LoRA layers' inputs: shared by the
data-driven initialisations (EVA, CorDA), which differ only in what their hooks accumulate."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ...core.delta import Delta


def feed(delta: Delta, wrappers: Mapping[str, nn.Module], hook_for: Callable[[str], Callable],
         batches: Iterable[Mapping[str, Any]], mask: list[torch.Tensor | None], eval_mode: bool = False) -> None:
    """Run ``batches`` through ``delta.model`` under no_grad with ``hook_for(path)`` as a forward pre-hook on
    each wrapper; ``mask[0]`` holds the current batch's attention mask for the hooks. ``eval_mode``: no
    dropout while feeding (the model's mode is restored). The hooks are removed whatever happens."""
    hooks = [w.register_forward_pre_hook(hook_for(p)) for p, w in wrappers.items()]
    training = delta.model.training
    try:
        if eval_mode:
            delta.model.eval()
        with torch.no_grad():
            for batch in batches:
                mask[0] = batch.get("attention_mask")
                delta.model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
        delta.model.train(training)
