"""LoRA (Hu et al., 2021) and its variants as one method: ``dt.LoRA(...)``.

- config.py: the ``LoRA`` config (rank, scaling, targets, DoRA, init, rank budget);
- layers.py: the wrappers for Linear / Conv1D / Embedding and the fused training product;
- dora.py: DoRA's wrappers (``dt.LoRA(dora=True)``), built on layers.py;
- budget.py: the adaptive rank budget (``dt.RankBudget``), which prunes and truncates these wrappers;
- loftq.py: ``init="loftq"``, the factors started at a quantized base's quantization error.
This file picks a wrapper per layer and registers the attach rule.
"""

from __future__ import annotations

from torch import nn

from ...core.inject import Attachment, DeltaWrapper, wrap_module
from ...core.layers import linear_types
from ...core.registry import register
from ...core.targets import find_targets
from .budget import RankAllocator, RankBudget
from .config import LoRA
from .dora import DoRAConv1D, DoRAEmbedding, DoRALinear
from .layers import LoRAConv1D, LoRAEmbedding, LoRALinear
from .loftq import init_loftq

__all__ = ["LoRA", "RankBudget", "LoRALinear", "LoRAConv1D", "LoRAEmbedding", "DoRALinear", "DoRAConv1D",
           "DoRAEmbedding", "wrapper_class"]


def wrapper_class(layer: nn.Module, dora: bool = False) -> type[DeltaWrapper]:
    """The LoRA (or DoRA) wrapper for a base layer type (Conv1D checked first: it is not an nn.Linear)."""
    conv1d = linear_types()[1]
    if isinstance(layer, conv1d):
        return DoRAConv1D if dora else LoRAConv1D
    if isinstance(layer, nn.Embedding):
        return DoRAEmbedding if dora else LoRAEmbedding
    return DoRALinear if dora else LoRALinear


@register(LoRA)
def attach(model: nn.Module, cfg: LoRA, att: Attachment) -> None:
    for path in find_targets(model, cfg.targets, (*linear_types(), nn.Embedding), cfg.layers, "lora"):
        r, alpha = cfg.rank_and_alpha(path)

        def make(module: nn.Module, r: int = r, alpha: float = alpha) -> DeltaWrapper:
            layer = module.base_layer() if isinstance(module, DeltaWrapper) else module
            return wrapper_class(layer, cfg.dora)(module, r, alpha, cfg)

        att.modules[path] = wrap_module(model, path, make)
    if cfg.init == "loftq":
        init_loftq(model, att.modules)
    if cfg.adaptive is not None:
        att.controllers.append(RankAllocator(model, att, cfg.adaptive))
