"""LoRA on the routed experts of a mixture-of-experts layer (``dt.LoRA(targets=["experts"])``).

transformers 5 stores a MoE layer's experts fused, as 3-D parameters of one module (Mixtral / Qwen3-MoE
``experts.gate_up_proj`` (E, 2I, H) and ``experts.down_proj`` (E, H, I)), not as Linear layers, so the
Linear wrappers cannot reach them. ``LoRAExperts`` wraps that module and gives every expert of every 3-D weight
its own rank-r pair: W_e + (alpha / r) B_e A_e, A (E, r, in) random, B (E, out, r) zero, so the model is
unchanged at attach.

The forward runs the experts module's own code (whichever experts implementation the config picks: eager,
grouped_mm, batched_mm) with W + dW substituted for W through ``torch.func.functional_call``: the routing,
activation and top-k weighting stay transformers'. The price is one dense dW (the size of the expert weights)
per layer per call, as PEFT's ``target_parameters`` pays; a per-token product would have to re-implement the
routing. Merge adds dW to the 3-D weights exactly (and unmerge subtracts it). Not routable per sample: the update
is applied as a weight, shared by the batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ...core.inject import DeltaWrapper
from ...core.layers import expert_weights
from .config import LoRA
from .layers import init_a


class LoRAExperts(DeltaWrapper):
    """Per-expert LoRA on each 3-D expert weight of a MoE experts module (``lora_A.<weight>`` (E, r, in),
    ``lora_B.<weight>`` (E, out, r))."""

    mergeable = True

    def __init__(self, base: nn.Module, r: int, alpha: float, cfg: LoRA) -> None:
        super().__init__(base)
        weights = expert_weights(self.base_layer())
        self.r, self.alpha, self.scale = r, alpha, cfg.scaling(r, alpha)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, w in weights.items():
            experts, out_features, in_features = w.shape
            options = {"dtype": w.dtype, "device": w.device}
            a = nn.Parameter(torch.empty(experts, r, in_features, **options))
            for expert in a:  # each expert's A as nn.Linear would start it
                init_a(expert, cfg.init)
            self.lora_A[name] = a
            self.lora_B[name] = nn.Parameter(torch.zeros(experts, out_features, r, **options))

    def delta(self, name: str) -> torch.Tensor:
        """dW for one 3-D weight: scale * B_e @ A_e for every expert e, (E, out, in)."""
        return torch.bmm(self.lora_B[name], self.lora_A[name]) * self.scale

    def _path_to_bank(self) -> str:
        """Parameter-name prefix from ``self.base`` to the experts module (``base.`` per stacked wrapper)."""
        prefix, layer = "", self.base
        while isinstance(layer, DeltaWrapper):
            prefix, layer = prefix + "base.", layer.base
        return prefix

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.uses_delta:
            return self.base(*args, **kwargs)
        bank, prefix = self.base_layer(), self._path_to_bank()
        weights = {prefix + name: getattr(bank, name) + self.delta(name).to(getattr(bank, name).dtype)
                   for name in self.lora_A}
        return functional_call(self.base, weights, args, kwargs, strict=False)

    @torch.no_grad()
    def merge(self) -> None:
        bank = self.base_layer()
        for name in self.lora_A:
            getattr(bank, name).add_(self.delta(name).to(getattr(bank, name).dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        bank = self.base_layer()
        for name in self.lora_A:
            getattr(bank, name).sub_(self.delta(name).to(getattr(bank, name).dtype))
        self.merged = False

    def extra_summary(self) -> str:
        shapes = ", ".join(f"{n} {'x'.join(map(str, getattr(self.base_layer(), n).shape))}" for n in self.lora_A)
        return f"per-expert LoRA r={self.r} on {shapes}"
