"""DoRA: W' = m * (W + s B A) / ||W + s B A|| (Liu et al., 2024, arXiv:2402.09353), used as ``dt.LoRA(dora=True)``.

The weight is split into a magnitude m (one number per output feature, the norm over the input dim, as in
PEFT) and a direction trained with LoRA. m starts at ||W||, so the model is unchanged at attach. The forward
pass is PEFT's (peft/tuners/lora/dora.py), so adapters move both ways without changing outputs:

    y = W x + b + (m / n - 1) * W x + (m / n) * s * B A x,    n = ||W + s B A||, detached

(computed as W x + b + (m / n) (W x + s B A x) - W x, which keeps one activation for backward, not two;
on a plain frozen layer without dropout as b + (m / n) (x W'^T), W' = W + s B A, through LoRA's fused product).

Detaching n from the graph is the paper's sec. 4.3 ("treat ||V + dV||_c as a constant"): m and the LoRA
factors still get gradients, at LoRA's memory cost. With dropout active (training, p > 0) both W x and
B A x read the dropped input, again as PEFT. Merging writes m / n * (W + s B A) into W and keeps m / n so
that unmerge divides it back out (exact up to float rounding). The bias is neither scaled nor merged.
These wrappers extend the LoRA ones (same A, B, init and PEFT names) and are chosen by ``wrapper_class``
(methods/lora/__init__.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...core import quant
from ...core.merge_on_the_fly import folding_pays, linear_forward
from .config import LoRA
from .layers import LoRAConv1D, LoRAEmbedding, LoRALinear


def magnitude_over_norm(delta: DoRALinear | DoRAEmbedding) -> torch.Tensor:
    """m / n for the forward, n detached (the paper's sec. 4.3): m gets a gradient, n is a constant."""
    return delta.magnitude / delta._norm(delta._lora_weight().detach()).detach()


class DoRALinear(LoRALinear):
    """DoRA on nn.Linear; ``magnitude`` has shape (out_features,)."""

    def __init__(self, base: nn.Module, r: int, alpha: float, cfg: LoRA) -> None:
        super().__init__(base, r, alpha, cfg)
        self._merge_factor: torch.Tensor | None = None
        with torch.no_grad():  # B = 0, so this is exactly the norm forward computes: m / n == 1 at attach
            self.magnitude = nn.Parameter(self._norm(self._lora_weight()))

    def _weight(self) -> torch.Tensor:
        """The base weight as (out, in) (a view: writing to it writes the layer's weight). A quantized base
        gives a dequantized copy, made per call and never kept (merging into it is refused by Delta.merge)."""
        layer = self.base_layer()
        return quant.dequantized_weight(layer) if quant.is_quantized(layer) else layer.weight

    def _lora_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def _norm(self, lora_weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(self._weight() + lora_weight, dim=1)

    def _dora_change(self) -> torch.Tensor:
        """W' - W as (out, in), from the current weight whether merged or not."""
        weight, lora = self._weight().detach(), self._lora_weight().detach()
        if self.merged:
            weight = weight / self._merge_factor.view(-1, 1) - lora
        factor = self.magnitude.detach().view(-1, 1) / torch.linalg.norm(weight + lora, dim=1, keepdim=True)
        # (m/n - 1) W + (m/n) s B A, not m/n (W + s B A) - W: exactly 0 at attach (m/n == 1, B == 0), and no
        # cancellation between two weight-sized terms while m/n is near 1
        return (factor - 1) * weight + factor * lora

    def delta_weight(self) -> torch.Tensor:
        """The additive change W' - W this DoRA makes (not s B A): what weight arithmetic must see."""
        return self._dora_change()

    def folds_per_sample(self) -> bool:
        return False  # LoRA's fold (W + s B A) is not DoRA's W'; routed, DoRA keeps the masked path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_delta and self._may_fuse(x) and not self._dropout_on():
            return self._fused_forward(x)
        out = self.base(x)
        if not self.uses_delta:
            return out
        factor = magnitude_over_norm(self)
        dropout_on = self._dropout_on()
        x = self.drop(x) if dropout_on else x
        layer = self.base_layer()
        if self.base is layer and not dropout_on:  # reuse the base output, as PEFT does
            wx = out if layer.bias is None else out - layer.bias
        else:
            wx = F.linear(x, self._weight())
        # (factor - 1) W x + factor s B A x, written as factor (W x + s B A x) - W x: autograd then keeps one
        # activation-sized tensor for backward (the sum) instead of two (W x and B A x)
        combined = wx + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
        return out + self.scaled(factor * combined - wx)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function, for a plain frozen layer and no dropout: y = b + (m / n) * (x W'^T), W' = W + s B A,
        with x W'^T from LoRA's fused product (one product with W' where folding pays, LoRA's fast gradient
        layouts) and one multiply-add on the output, where the general path in ``forward`` makes five passes
        over the output (measured: BENCHMARKS.md, "DoRA")."""
        layer = self.base
        fold = folding_pays(x, layer)
        if fold and not torch.is_grad_enabled():  # inference: one product with the DoRA weight
            return linear_forward(layer, x, layer.weight + self.delta_weight(), layer.bias)
        factor = magnitude_over_norm(self)
        directed = self._fused(x, None, None, fold)
        return directed * factor if layer.bias is None else torch.addcmul(layer.bias, directed, factor)

    @torch.no_grad()
    def merge(self) -> None:
        weight = self._weight()
        combined = weight + self._lora_weight().to(weight.dtype)
        factor = self.magnitude.to(weight.dtype) / torch.linalg.norm(combined, dim=1)
        weight.copy_(factor.view(-1, 1) * combined)
        self._merge_factor = factor
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self._weight()
        weight.copy_(weight / self._merge_factor.view(-1, 1) - self._lora_weight().to(weight.dtype))
        self._merge_factor = None
        self.merged = False

    def extra_summary(self) -> str:
        return "dora"


class DoRAConv1D(DoRALinear, LoRAConv1D):
    """DoRA on transformers' Conv1D (GPT-2): the weight is stored (in, out), so it is used transposed.
    Also a LoRAConv1D, so code that asks "is this the GPT-2 layout?" (PEFT export) gets it right."""

    def _weight(self) -> torch.Tensor:
        return self.base_layer().weight.T

    def delta_weight(self) -> torch.Tensor:
        return self._dora_change().T


class DoRAEmbedding(LoRAEmbedding):
    """DoRA on nn.Embedding, as PEFT: ``magnitude`` is per embedding dimension, the norm runs over the vocabulary,
    and out = m / n * (E[ids] + s * (B A)^T[ids])."""

    def __init__(self, base: nn.Module, r: int, alpha: float, cfg: LoRA) -> None:
        super().__init__(base, r, alpha, cfg)
        self._merge_factor: torch.Tensor | None = None
        with torch.no_grad():
            self.magnitude = nn.Parameter(self._norm(self._lora_weight()))

    def _lora_weight(self) -> torch.Tensor:
        return LoRAEmbedding.delta_weight(self)  # (B A)^T * s, as (vocab, dim)

    def _norm(self, lora_weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(self.base_layer().weight + lora_weight, dim=0)

    def delta_weight(self) -> torch.Tensor:
        """The additive change E' - E this DoRA makes (not (B A)^T s), from the current weight."""
        weight, lora = self.base_layer().weight.detach(), self._lora_weight().detach()
        if self.merged:
            weight = weight / self._merge_factor.view(1, -1) - lora
        combined = weight + lora
        return self.magnitude.detach() * combined / torch.linalg.norm(combined, dim=0) - weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        if not self.uses_delta:
            return out
        layer = self.base_layer()
        rows = out if self.base is layer else layer(ids)
        factor = magnitude_over_norm(self)
        combined = rows + (F.embedding(ids, self.lora_A.T, padding_idx=layer.padding_idx) @ self.lora_B.T) * self.scale
        return out + self.scaled(factor * combined - rows)  # one saved activation, as in DoRALinear

    @torch.no_grad()
    def merge(self) -> None:
        weight = self.base_layer().weight
        combined = weight + self._lora_weight().to(weight.dtype)
        factor = self.magnitude.to(weight.dtype) / torch.linalg.norm(combined, dim=0)
        weight.copy_(factor.view(1, -1) * combined)
        self._merge_factor = factor
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.base_layer().weight
        weight.copy_(weight / self._merge_factor.view(1, -1) - self._lora_weight().to(weight.dtype))
        self._merge_factor = None
        self.merged = False

    def extra_summary(self) -> str:
        return "dora"
