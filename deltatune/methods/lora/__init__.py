"""LoRA (Hu et al., 2021) and its variants as one method: ``dt.LoRA(...)``.

- config.py: the ``LoRA`` config (rank, scaling, targets, DoRA, init, rank budget);
- layers.py: the wrappers for Linear / Conv1D / Embedding and the fused training product;
- dora.py: DoRA's wrappers (``dt.LoRA(dora=True)``), built on layers.py;
- eva.py: ``dt.eva_init``, A from the principal directions of a few batches of layer inputs;
- inits.py: PiSSA / OLoRA, which start A and B from W and leave the residual in the base weight;
- loftq.py: ``init="loftq"``, the factors started at a quantized base's quantization error;
- experts.py: per-expert LoRA on the fused 3-D expert weights of mixture-of-experts layers (``targets=["experts"]``);
- budget.py: the adaptive rank budget (``dt.RankBudget``), which prunes and truncates these wrappers.
This file picks a wrapper per layer and registers the attach rule.
"""

from __future__ import annotations

from torch import nn

from ...core.errors import ConfigError, TargetError
from ...core.inject import Attachment, DeltaWrapper, named_base_modules, wrap_module
from ...core.layers import ExpertBank, linear_types
from ...core.registry import register
from ...core.targets import find_targets
from .budget import RankAllocator, RankBudget
from .config import LoRA
from .dora import DoRAConv1D, DoRAEmbedding, DoRALinear
from .eva import eva_init
from .experts import LoRAExperts
from .inits import RESIDUAL_INITS, keep_original_weight
from .layers import LoRAConv1D, LoRAEmbedding, LoRALinear
from .loftq import init_loftq

__all__ = ["LoRA", "RankBudget", "LoRALinear", "LoRAConv1D", "LoRAEmbedding", "DoRALinear", "DoRAConv1D",
           "DoRAEmbedding", "LoRAExperts", "wrapper_class", "eva_init"]


def wrapper_class(layer: nn.Module, dora: bool = False) -> type[DeltaWrapper]:
    """The LoRA (or DoRA) wrapper for a base layer type (Conv1D checked first: it is not an nn.Linear)."""
    conv1d = linear_types()[1]
    if isinstance(layer, conv1d):
        return DoRAConv1D if dora else LoRAConv1D
    if isinstance(layer, nn.Embedding):
        return DoRAEmbedding if dora else LoRAEmbedding
    if isinstance(layer, ExpertBank):
        return LoRAExperts
    return DoRALinear if dora else LoRALinear


@register(LoRA)
def attach(model: nn.Module, cfg: LoRA, att: Attachment) -> None:
    paths = find_targets(model, cfg.targets, (*linear_types(), nn.Embedding, ExpertBank), cfg.layers, "lora")
    _check_expert_options(model, paths, cfg)
    if cfg.init in RESIDUAL_INITS:
        _keep_original_weights(model, paths, cfg.init, att)
    for path in paths:
        r, alpha = cfg.rank_and_alpha(path)

        def make(module: nn.Module, r: int = r, alpha: float = alpha) -> DeltaWrapper:
            layer = module.base_layer() if isinstance(module, DeltaWrapper) else module
            return wrapper_class(layer, cfg.dora)(module, r, alpha, cfg)

        att.modules[path] = wrap_module(model, path, make)
    if cfg.init == "loftq":
        init_loftq(model, att.modules)
    if cfg.adaptive is not None:
        att.controllers.append(RankAllocator(model, att, cfg.adaptive))


def _check_expert_options(model: nn.Module, paths: list[str], cfg: LoRA) -> None:
    """LoRA on fused expert weights (experts.py) is plain LoRA: the options that act on a layer's input or on a
    2-D weight are refused by name instead of being silently dropped."""
    layers = dict(named_base_modules(model))
    banks = [p for p in paths if isinstance(layers[p], ExpertBank)]
    if not banks:
        return
    unsupported = {"dora": cfg.dora, "dropout": cfg.dropout > 0, "adaptive": cfg.adaptive is not None,
                   "init": cfg.init not in ("kaiming", "gaussian")}
    for field, used in unsupported.items():
        if used:
            raise ConfigError(f"lora.{field}={getattr(cfg, field)!r} is not supported on the fused expert weights of "
                              f"{banks[0]} (per-expert LoRA is plain LoRA: kaiming/gaussian init, no dropout, DoRA or "
                              f"rank budget); leave the experts out of targets or drop lora.{field}")


def _keep_original_weights(model: nn.Module, paths: list[str], how: str, att: Attachment) -> None:
    """PiSSA / OLoRA rewrite W (inits.py): record every original first, so detach restores it bit for bit."""
    layers = dict(named_base_modules(model))
    embeddings = [p for p in paths if isinstance(layers[p], nn.Embedding)]
    if embeddings:
        raise TargetError(f"lora: init={how!r} works on Linear / Conv1D weights, not embeddings {embeddings[:3]}; "
                          f"leave them out of targets or use init='kaiming'")
    for path in paths:
        keep_original_weight(layers[path], att)
