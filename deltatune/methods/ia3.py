"""IA3: learned rescaling vectors on keys, values and FFN activations (Liu et al., 2022, arXiv:2205.05638).

K' = l_k * K, V' = l_v * V (per output feature of the key / value projections) and the FFN down projection
reads l_ff * act(W_1 x) (per input feature). Every l starts at 1, so the model is unchanged at attach.
It is the smallest delta here (a few thousand numbers on MiniLM) and merges exactly into the weights:
output scaling multiplies the weight's output rows and the bias, input scaling the weight's input columns.

Default placement comes from the model's structure (core/structure.py): BERT ``key``/``value``/
``output.dense``, Llama ``k_proj``/``v_proj``/``down_proj``, GPT-2 ``c_attn``/``mlp.c_proj``. A fused
q/k/v projection (GPT-2 ``c_attn``) gets one vector over all its outputs, as PEFT does: the extra query
scaling multiplies into the key scaling in q.k, and it is correct whatever the q/k/v layout is (Phi-3 ``qkv_proj``).
In a mixture-of-experts block the FFN down projections are the experts' fused 3-D ``down_proj`` (E, H, I):
``IA3Experts`` gives each expert its own l_ff (E, I) on the input of its down projection, applied as a scaled
weight inside the experts module's own forward and merged exactly the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..core.config import DeltaConfig
from ..core.errors import ConfigError, StateError
from ..core.inject import Attachment, DeltaWrapper, wrap_module
from ..core.layers import expert_weights, linear_types
from ..core.merge_on_the_fly import linear_forward, merges_pay
from ..core.recipe import Recipe
from ..core.registry import register
from ..core.structure import features, transformer_blocks
from ..core.targets import Targets, find_targets

# Below this a scale can't be divided back out exactly, so unmerge would not restore the weight.
_MIN_MERGE_SCALE = 1e-6


@dataclasses.dataclass
class IA3(DeltaConfig):
    method = "ia3"
    mergeable = True
    recipe = Recipe(learning_rate=3e-3, head_learning_rate=1e-2)  # measured: BENCHMARKS.md "Defaults"

    targets: Targets | None = None      # None: keys, values and FFN down projections found from the structure
    feedforward: Targets | None = None  # which of `targets` scale their input (FFN activations), as PEFT's
    #                                     feedforward_modules; only with explicit targets (None: none of them)
    layers: list[int] | None = None     # keep only these transformer blocks (None: all)

    def validate(self) -> None:
        self._require(self.feedforward is None or self.targets is not None, "feedforward",
                      "None unless targets is given too (the default placement already knows the FFN)")


class IA3Linear(DeltaWrapper):
    """Rescales a Linear/Conv1D: y = l * (W x + b) (keys, values) or y = W (l * x) + b (FFN); l starts at 1."""

    mergeable = True
    routable = True
    wraps_quantized = True  # tests/quant

    def __init__(self, base: nn.Module, on_input: bool) -> None:
        super().__init__(base)
        layer = self.base_layer()
        in_features, out_features = features(layer)
        self.on_input = on_input
        self.conv1d = not isinstance(layer, nn.Linear)  # Conv1D stores its weight as (in, out)
        self.l = nn.Parameter(torch.ones(in_features if on_input else out_features, **self.tensor_options()))

    def _rescale(self, t: torch.Tensor) -> torch.Tensor:
        if self.sample_scale is None and self.gate_scale is None:
            return t * self.l
        return t + self.scaled(t * (self.l - 1))  # routing/gates scale the change, so 0 gives the base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_delta:
            return self.base(x)
        layer = self.base
        if self.base_is_plain_linear() and merges_pay(x, layer):
            # inference over many tokens: scale the weight once instead of the activations (merge_on_the_fly.py)
            bias = layer.bias if self.on_input or layer.bias is None else layer.bias * self.l
            return linear_forward(layer, x, layer.weight * self._weight_view(), bias)
        if self.on_input:
            return self.base(self._rescale(x))
        return self._rescale(self.base(x))

    def _weight_view(self) -> torch.Tensor:
        """l shaped to multiply the base weight along the axis it scales."""
        out_axis = 1 if self.conv1d else 0
        axis = 1 - out_axis if self.on_input else out_axis
        return self.l.view(-1, 1) if axis == 0 else self.l.view(1, -1)

    @torch.no_grad()
    def merge(self) -> None:
        if self.l.abs().min() < _MIN_MERGE_SCALE:
            raise StateError(f"ia3: a scale is below {_MIN_MERGE_SCALE:g} in absolute value, so merging could not be "
                             f"undone exactly; keep this delta unmerged")
        layer = self.base_layer()
        layer.weight.mul_(self._weight_view().to(layer.weight.dtype))
        if not self.on_input and layer.bias is not None:
            layer.bias.mul_(self.l.to(layer.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        layer = self.base_layer()
        layer.weight.div_(self._weight_view().to(layer.weight.dtype))
        if not self.on_input and layer.bias is not None:
            layer.bias.div_(self.l.to(layer.bias.dtype))
        self.merged = False

    def extra_summary(self) -> str:
        return "scales input (FFN activations)" if self.on_input else "scales output"


class IA3Experts(DeltaWrapper):
    """IA3's FFN scaling for routed experts: expert e's down projection reads l_e * act(...), i.e. uses the weight
    W_down[e] * l_e (columns scaled); l (E, I) starts at 1. The down projection is the experts module's last 3-D
    weight (``down_proj``), as the last Linear is the FFN output elsewhere."""

    mergeable = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.weight_name, weight = list(expert_weights(self.base_layer()).items())[-1]
        self.l = nn.Parameter(torch.ones(weight.shape[0], weight.shape[2], dtype=weight.dtype, device=weight.device))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.uses_delta:
            return self.base(*args, **kwargs)
        prefix, layer = "", self.base
        while isinstance(layer, DeltaWrapper):  # parameter names through stacked wrappers
            prefix, layer = prefix + "base.", layer.base
        weight = getattr(self.base_layer(), self.weight_name)
        return functional_call(self.base, {prefix + self.weight_name: weight * self.l.unsqueeze(1)}, args, kwargs,
                               strict=False)

    @torch.no_grad()
    def merge(self) -> None:
        if self.l.abs().min() < _MIN_MERGE_SCALE:
            raise StateError(f"ia3: a scale is below {_MIN_MERGE_SCALE:g} in absolute value, so merging could not be "
                             f"undone exactly; keep this delta unmerged")
        getattr(self.base_layer(), self.weight_name).mul_(self.l.unsqueeze(1))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        getattr(self.base_layer(), self.weight_name).div_(self.l.unsqueeze(1))
        self.merged = False

    def extra_summary(self) -> str:
        return f"scales the input of each expert's {self.weight_name}"


def _plan(model: nn.Module, cfg: IA3) -> dict[str, bool]:
    """Module path -> whether its input (True) or output (False) is rescaled."""
    if cfg.targets is None:
        plan: dict[str, bool] = {}
        for block in transformer_blocks(model, "ia3", cfg.layers):
            plan.update({p: False for p in (*block.keys, *block.values, *block.fused_qkv)})
            plan[block.experts or block.ffn_output] = True
        return plan
    paths = find_targets(model, cfg.targets, linear_types(), cfg.layers, "ia3")
    ffn = find_targets(model, cfg.feedforward, linear_types(), cfg.layers, "ia3") if cfg.feedforward else []
    stray = sorted(set(ffn) - set(paths))
    if stray:
        raise ConfigError(f"ia3.feedforward must select a subset of targets; not in targets: {stray[:3]}")
    return {p: p in ffn for p in paths}


@register(IA3)
def attach(model: nn.Module, cfg: IA3, att: Attachment) -> None:
    for path, on_input in _plan(model, cfg).items():

        def make(module: nn.Module, on_input: bool = on_input) -> DeltaWrapper:
            layer = module.base_layer() if isinstance(module, DeltaWrapper) else module
            return IA3Linear(module, on_input) if isinstance(layer, linear_types()) else IA3Experts(module)

        att.modules[path] = wrap_module(model, path, make)
