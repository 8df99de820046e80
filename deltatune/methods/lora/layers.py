"""LoRA's modules: h = W x + (alpha / r) * B A x  (Hu et al., 2021, arXiv:2106.09685).

A starts random (Kaiming-uniform like nn.Linear, or Gaussian), B starts at zero, so the model is
unchanged at attach time. Dropout acts on the LoRA path's input only. Works on nn.Linear, transformers'
Conv1D (transposed weight) and nn.Embedding. The config is in config.py, DoRA's wrappers in dora.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...core import onednn
from ...core.inject import DeltaWrapper
from ...core.merge_on_the_fly import folding_pays, linear_forward
from ...core.routed_fold import routed_forward
from .config import LoRA
from .inits import DATA_RESIDUAL_INITS, RESIDUAL_INITS, WEIGHT_INITS, residual_factors


class LoRALinear(DeltaWrapper):
    """Rank-r update on a frozen nn.Linear: y = W x + b + scale * B(A(dropout(x))).

    Three ways to compute it, chosen per call: training on a plain frozen layer runs ``FusedLoRALinear``;
    inference over many tokens multiplies by W + scale * B A built for the call (``core.merge_on_the_fly``);
    anything else (hooks, routing, stacked deltas, autocast) runs the two paths separately."""

    mergeable = True
    routable = True  # the LoRA path goes through ``scaled`` (or the fused path, taken only when no scale is set)
    wraps_quantized = True  # tests/quant

    def __init__(self, base: nn.Module, r: int, alpha: float, cfg: LoRA) -> None:
        super().__init__(base)
        layer = self.base_layer()
        in_features, out_features = self.features(layer)
        options = self.tensor_options()  # a quantized base stores integers: the factors train in its compute dtype
        self.r, self.alpha, self.scale = r, alpha, cfg.scaling(r, alpha)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **options))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, **options))
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.rslora = cfg.rslora
        self.residual = cfg.init in RESIDUAL_INITS
        self.saves_start = cfg.init in DATA_RESIDUAL_INITS  # A0, B0 come from data: the checkpoint must hold them
        if cfg.init in WEIGHT_INITS:
            self._start_from_weight(cfg.init)
        else:
            init_a(self.lora_A, cfg.init)
        if self.saves_start:  # a zero start (B0 A0 = 0, W untouched) until dt.eva_init sets it from data
            self.register_buffer("init_A", torch.zeros_like(self.lora_A, requires_grad=False), persistent=False)
            self.register_buffer("init_B", torch.zeros_like(self.lora_B, requires_grad=False), persistent=False)

    @staticmethod
    def features(layer: nn.Module) -> tuple[int, int]:
        return layer.in_features, layer.out_features

    @torch.no_grad()
    def _start_from_weight(self, how: str) -> None:
        """PiSSA / OLoRA (inits.py): A, B from W, and W <- W - s B0 A0; B0, A0 kept as buffers (not saved)."""
        weight = self.base_layer().weight
        conv1d = isinstance(self, LoRAConv1D)
        a0, b0 = residual_factors(weight.T if conv1d else weight, self.r, self.scale, how)
        self.lora_A.copy_(a0)
        self.lora_B.copy_(b0)
        self.register_buffer("init_A", self.lora_A.detach().clone(), persistent=False)
        self.register_buffer("init_B", self.lora_B.detach().clone(), persistent=False)
        update = (b0 @ a0) * self.scale
        weight.sub_((update.T if conv1d else update).to(weight.dtype))

    @torch.no_grad()
    def move_start(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """CorDA (corda.py) and loading its checkpoint: the start becomes (A0, B0) and the base weight its
        residual, W <- W + s B0' A0' - s B0 A0 (B0' A0' the previous start, zero after attach). A and B are set
        to the start too; a load then overwrites them with the trained ones."""
        weight = self.base_layer().weight
        conv1d = isinstance(self, LoRAConv1D)
        change = (self.init_B.float() @ self.init_A.float() - b0.float() @ a0.float()) * self.scale
        weight.add_((change.T if conv1d else change).to(weight.dtype))
        for name, value in (("init_A", a0), ("init_B", b0), ("lora_A", a0), ("lora_B", b0)):
            getattr(self, name).copy_(value)

    def saved_state(self) -> dict[str, torch.Tensor]:
        state = super().saved_state()
        if self.saves_start:
            state.update(init_A=self.init_A.detach(), init_B=self.init_B.detach())
        return state

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.saves_start:
            self.move_start(state["init_A"], state["init_B"])
        super().load_saved_state({k: v for k, v in state.items() if k not in ("init_A", "init_B")})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sample_scale is not None:  # hard routing at inference: one folded product per group of samples
            out = routed_forward(self, x)
            if out is not None:
                return out
        if self.residual and not self.merged and (not self.active or self.sample_scale is not None
                                                  or self.gate_scale is not None):
            return self._residual_forward(x)
        if self.uses_delta and self._may_fuse(x):
            layer = self.base
            fold = folding_pays(x, layer) and not self._dropout_on()  # core/merge_on_the_fly.py: why and when
            if fold and not torch.is_grad_enabled():
                return linear_forward(layer, x, layer.weight + self.delta_weight(), layer.bias)
            return self._fused(x, self.drop(x) if self._dropout_on() else None, layer.bias, fold)
        out = self.base(x)
        if not self.uses_delta:
            return out
        hidden = F.linear(self.drop(x).to(self.lora_A.dtype), self.lora_A)  # a no-op unless the base casts
        if self._may_add_in_place(out, hidden):
            # out += scale * hidden @ B^T as one fused addmm: no full-size temporaries (speed, peak memory).
            # Safe: a Linear's backward never needs its output, and autograd's version counter would
            # raise if anything had saved it.
            flat = out.view(-1, out.shape[-1])
            flat.addmm_(hidden.reshape(-1, self.r), self.lora_B.T, alpha=self.scale)
            return out
        return out + self.scaled(F.linear(hidden, self.lora_B) * self.scale).to(out.dtype)

    def _residual_forward(self, x: torch.Tensor) -> torch.Tensor:
        """PiSSA / OLoRA switched off or routed: the base weight holds W - s B0 A0, so the original W x is
        base(x) + s B0 A0 x, and what routing or a gate scales is the change s (B A x - B0 A0 x)."""
        initial = F.linear(F.linear(x, self.init_A), self.init_B) * self.scale
        out = self.base(x) + initial
        if not self.active:
            return out
        trained = F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B) * self.scale
        return out + self.scaled(trained - initial)

    def _may_add_in_place(self, out: torch.Tensor, hidden: torch.Tensor) -> bool:
        """In place only when nobody else sees ``out`` (no routing/gate scaling, no forward hooks on the base
        layer: a user's activation-caching hook must keep the output it was given) and all dtypes agree
        (in-place ops are not autocast: under bf16 autocast ``out`` is bf16 while B stays fp32)."""
        return (self.sample_scale is None and self.gate_scale is None and out.is_contiguous()
                and not self.base._forward_hooks and not isinstance(self.base, DeltaWrapper)
                and out.dtype == hidden.dtype == self.lora_B.dtype)

    def _may_fuse(self, x: torch.Tensor) -> bool:
        """The one-kernel-per-product path (``FusedLoRALinear``): a plain frozen nn.Linear that nobody observes,
        all in one dtype, no autocast (which would change the dtypes under us)."""
        if not self.base_is_plain_linear():
            return False
        layer = self.base
        frozen = not layer.weight.requires_grad and (layer.bias is None or not layer.bias.requires_grad)
        return (frozen and not torch.is_autocast_enabled(x.device.type)
                and x.dtype == layer.weight.dtype == self.lora_A.dtype == self.lora_B.dtype)

    def _fused(self, x: torch.Tensor, x_drop: torch.Tensor | None, bias: torch.Tensor | None,
               fold: bool) -> torch.Tensor:
        """``FusedLoRALinear`` on this (plain, frozen) layer: x W^T + bias + s (x_drop A^T) B^T."""
        layer = self.base
        weight_t = layer.weight if isinstance(self, LoRAConv1D) else layer.weight.T  # (in, out) either way
        return FusedLoRALinear.apply(x, x_drop, weight_t, bias, self.lora_A, self.lora_B, self.scale, fold,
                                     onednn.routes(layer, x))

    def _dropout_on(self) -> bool:
        return self.training and not isinstance(self.drop, nn.Identity)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def folds_per_sample(self) -> bool:
        """Plain LoRA in eval (no dropout), factors in the layer's dtype: y = x (W + s B A)^T + b exactly. PiSSA /
        OLoRA keep their own routed path (their base weight holds W - s B0 A0)."""
        weight = self.base_layer().weight
        return (not self.residual and not self.merged and not self._dropout_on() and not self.quantized_base
                and self.lora_A.dtype == self.lora_B.dtype == weight.dtype)

    def fold_into(self, weight: torch.Tensor) -> torch.Tensor:
        # one addmm: W + s B A without a separate delta tensor and scaling pass
        return torch.addmm(weight, self.lora_B, self.lora_A, alpha=self.scale)

    def add_delta_into(self, out: torch.Tensor, x: torch.Tensor) -> None:
        # out += s (x A^T) B^T: two rank-r products, the second accumulating into out (Linear and Conv1D alike)
        out.addmm_(F.linear(x, self.lora_A), self.lora_B.T, alpha=self.scale)

    def plain_factors(self) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """(A, B, r, alpha) of a plain LoRA against the original base weight, for export (PEFT).

        PiSSA / OLoRA: W_res + s B A = W + s (B A - B0 A0), a LoRA of rank 2r with A' = [A; A0], B' = [B, -B0]
        and alpha chosen so that the scale s is unchanged (x2 for alpha / r, x sqrt(2) for rslora's alpha / sqrt r)."""
        a, b = self.lora_A.detach(), self.lora_B.detach()
        if not self.residual:
            return a, b, self.r, self.alpha
        alpha = self.alpha * (math.sqrt(2.0) if self.rslora else 2.0)
        return torch.cat([a, self.init_A]), torch.cat([b, -self.init_B], dim=1), 2 * self.r, alpha


class FusedLoRALinear(torch.autograd.Function):
    """y = x W^T + b + s (x_d A^T) B^T for a frozen W (given as ``weight_t`` = W^T, as Conv1D stores it),
    with a hand-written backward.

    Why: autograd would run the base layer and the LoRA path as separate graphs: backward then makes a
    second full-size input gradient and adds the two, and an in-place add into a view of the output
    costs a full copy. Here the output is one buffer and the input gradient one product. With ``fold``
    (no dropout, and enough tokens that a weight-sized sum is cheaper than an activation-sized one:
    ``core.merge_on_the_fly.folding_pays``) both use W' = W + s B A, built per call and never stored:
    y = x W'^T + b and dL/dx = g W'. Otherwise the LoRA term is accumulated in place (``addmm_``).
    Saves the LoRA input (for dA) and the rank-r activation h (for dB), as autograd would. ``x_drop`` is
    ``x_d``, or None when it is ``x`` itself (no dropout; torch.compile cannot trace one tensor passed twice).
    With ``use_onednn`` the output's product runs on oneDNN (``core.onednn``: the layer opted in).
    """

    @staticmethod
    def forward(ctx, x, x_drop, weight_t, bias, lora_a, lora_b, scale, fold, use_onednn=False):
        same = x_drop is None
        fold = fold and same  # with dropout the LoRA term reads another input: it cannot be folded
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        flat_drop = flat if same else x_drop.reshape(-1, shape[-1])
        hidden = flat_drop @ lora_a.T
        weight_used = folded(weight_t, lora_a, lora_b, scale) if fold else weight_t
        if use_onednn:
            out = onednn.matmul_t(flat, weight_used.T, bias)
        else:
            out = torch.addmm(bias, flat, weight_used) if bias is not None else flat @ weight_used
        if not fold:
            out.addmm_(hidden, lora_b.T, alpha=scale)
        ctx.save_for_backward(flat_drop, hidden, weight_t, lora_a, lora_b)
        ctx.scale, ctx.shape, ctx.same, ctx.fold = scale, shape, same, fold
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        flat_drop, hidden, weight_t, lora_a, lora_b = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        # Operand layouts matter on CPU: (N, out) @ (out, r) runs ~2x faster with the small right operand
        # column-major, and dB as (h^T g)^T 5-6x faster than g^T h (oneDNN, 2 threads, N = 4096;
        # BENCHMARKS.md "Where LoRA's training time goes"). The copies are r x out.
        g_hidden = (g @ lora_b.T.contiguous().T).mul_(ctx.scale)          # dL/dh, (N, r)
        grad_a = over_tokens(g_hidden, flat_drop) if ctx.needs_input_grad[4] else None
        grad_b = over_tokens(hidden, g).mul_(ctx.scale).T.contiguous() if ctx.needs_input_grad[5] else None
        grad_x = grad_drop = None
        if ctx.needs_input_grad[0]:
            if ctx.fold:
                grad_x = g @ folded(weight_t, lora_a, lora_b, ctx.scale).T
            else:
                grad_x = g @ weight_t.T
                if ctx.same:
                    grad_x.addmm_(g_hidden, lora_a)
            grad_x = grad_x.view(ctx.shape)
        if ctx.needs_input_grad[1] and not ctx.same:
            grad_drop = (g_hidden @ lora_a).view(ctx.shape)
        return grad_x, grad_drop, None, None, grad_a, grad_b, None, None, None


def over_tokens(a: torch.Tensor, b: torch.Tensor, parts: int = 4) -> torch.Tensor:
    """a^T b for a (N, r) and b (N, d): a weight gradient, summed over the N tokens.

    Why in ``parts``: with r small, one (r, N) @ (N, d) product parallelises poorly on CPU; four batched
    products over N/4 tokens each, then a sum, ran 1.5x faster inside a training step (N = 4096)."""
    n = a.shape[0]
    chunk = n // parts
    if chunk < 256:
        return a.T @ b
    even = chunk * parts
    out = torch.bmm(a[:even].reshape(parts, chunk, -1).transpose(1, 2), b[:even].reshape(parts, chunk, -1)).sum(0)
    if even < n:
        out.addmm_(a[even:].T, b[even:])
    return out


def folded(weight_t: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W'^T = W^T + s (B A)^T, in ``weight_t``'s memory layout (products run at the base layer's speed)."""
    # (B A)^T is column-major, A^T B^T row-major: pick the one laid out like weight_t, and the sum keeps that
    # layout (no `out=` into a strided buffer: torch.compile cannot trace it)
    delta_t = (lora_b @ lora_a).T if weight_t.stride(0) == 1 else lora_a.T @ lora_b.T
    return torch.add(weight_t, delta_t, alpha=scale)


class LoRAConv1D(LoRALinear):
    """LoRA on transformers' Conv1D (GPT-2), whose weight is stored (in, out): the merge transposes."""

    @staticmethod
    def features(layer: nn.Module) -> tuple[int, int]:
        return layer.weight.shape[0], layer.weight.shape[1]

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight().T

    def fold_into(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.addmm(weight, self.lora_A.T, self.lora_B.T, alpha=self.scale)  # (in, out) layout


class LoRAEmbedding(DeltaWrapper):
    """LoRA on nn.Embedding: a rank-r correction to the looked-up rows, delta = (B A)^T of shape (vocab, dim)."""

    mergeable = True
    routable = True  # the LoRA path goes through ``scaled``

    def __init__(self, base: nn.Module, r: int, alpha: float, cfg: LoRA) -> None:
        super().__init__(base)
        layer = self.base_layer()
        weight = layer.weight
        self.r, self.alpha, self.scale = r, alpha, cfg.scaling(r, alpha)
        self.lora_A = nn.Parameter(torch.empty(r, layer.num_embeddings, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(layer.embedding_dim, r, dtype=weight.dtype, device=weight.device))
        init_a(self.lora_A, cfg.init)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(ids)
        if not self.uses_delta:
            return out
        rows = F.embedding(ids, self.lora_A.T, padding_idx=self.base_layer().padding_idx)
        return out + self.scaled(rows @ self.lora_B.T * self.scale)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).T * self.scale

    def plain_factors(self) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """(A, B, r, alpha) for export (PEFT); an embedding LoRA always starts plain."""
        return self.lora_A.detach(), self.lora_B.detach(), self.r, self.alpha


def init_a(weight: nn.Parameter, how: str) -> None:
    with torch.no_grad():
        if how == "gaussian":
            nn.init.normal_(weight, std=1.0 / weight.shape[0])
        else:
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
