"""Bottleneck adapters: h + s * W_up act(W_down h), a small MLP inserted into every transformer block.

- ``houlsby`` (Houlsby et al., 2019, arXiv:1902.00751): a sequential adapter after the attention output
  projection and after the FFN output projection, i.e. on the sublayer output *before* the residual add
  and LayerNorm (BERT: inside ``attention.output`` / ``output`` right after ``dense``).
- ``pfeiffer`` (Pfeiffer et al., 2021, arXiv:2005.00247): one sequential adapter, after the FFN output.
- ``parallel`` (He et al., 2022, arXiv:2110.04366): the adapter reads the FFN *input* and its scaled output
  is added to the FFN output, running alongside the FFN instead of after it (their best placement).
  On models whose FFN is not one module (BERT: ``intermediate`` + ``output``), the FFN input is taken
  with a forward pre-hook on the FFN's first Linear and added at its last Linear.

In a mixture-of-experts block the feed-forward sublayer is the MoE module (``mlp``: router + fused experts,
core/structure.py): the adapter goes after it (houlsby / pfeiffer) or alongside it (parallel), so one adapter
serves every expert; the experts' own weights are reached by ``dt.LoRA(targets=["experts"])``.

Placement comes from the model's structure (core/structure.py), not from per-architecture tables;
``targets=`` overrides it (any module holding a Linear/Conv1D: sequential after it, or parallel to it).
W_up starts at zero, so the model is unchanged at attach.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core import quant
from ..core.config import DeltaConfig
from ..core.errors import ConfigError, TargetError
from ..core.inject import Attachment, DeltaWrapper, named_base_modules, wrap_module
from ..core.layers import linear_types
from ..core.recipe import Recipe
from ..core.registry import register
from ..core.structure import features, transformer_blocks
from ..core.targets import Targets, find_targets

KINDS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


@dataclasses.dataclass
class Adapter(DeltaConfig):
    method = "adapter"
    recipe = Recipe(learning_rate=1e-3, head_learning_rate=1e-3)  # measured: BENCHMARKS.md "Defaults"

    kind: str = "houlsby"        # houlsby: after attention and FFN; pfeiffer: after FFN only (half the size);
    #                              parallel: alongside the FFN (He et al.'s best single placement)
    bottleneck: int = 64         # adapter width: size and capacity grow linearly; must be <= the hidden size
    activation: str = "relu"     # nonlinearity between the down and up projections
    scale: float = 1.0           # multiplies the adapter output; He et al. use 4 for the parallel adapter
    targets: Targets | None = None   # None: placed from the structure; else modules to put an adapter on
    layers: list[int] | None = None  # keep only these transformer blocks (None: all)

    def validate(self) -> None:
        self._require(self.kind in KINDS, "kind", f"one of {list(KINDS)}")
        self._require(isinstance(self.bottleneck, int) and not isinstance(self.bottleneck, bool)
                      and self.bottleneck > 0, "bottleneck", "a positive integer (the adapter's hidden width)")
        self._require(self.activation in ACTIVATIONS, "activation", f"one of {sorted(ACTIVATIONS)}")
        self._require(isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale != 0,
                      "scale", "a finite non-zero number")


class BottleneckAdapter(DeltaWrapper):
    """Wraps a module f. Sequential: y = f(x) + s * up(act(down(f(x)))). Parallel: y = f(x) + s * up(act(down(x))),
    where x is f's input, or the input captured at another module (``source``) for a split FFN.

    Tuple outputs (attention modules) get the adapter on their first element.
    """

    routable = True  # the adapter's output goes through ``scaled``
    wraps_quantized = True  # tests/quant

    def __init__(self, base: nn.Module, dims: tuple[int, int], cfg: Adapter, parallel: bool,
                 source: str | None = None) -> None:
        super().__init__(base)
        dtype, device = quant.float_dtype(self.base_layer())  # not a quantized weight's integer dtype
        options = {"dtype": dtype, "device": device}
        self.down = nn.Linear(dims[0], cfg.bottleneck, **options)
        self.up = nn.Linear(cfg.bottleneck, dims[1], **options)
        with torch.no_grad():  # zero up-projection: the adapter adds exactly 0 at attach
            self.up.weight.zero_()
            self.up.bias.zero_()
        self.activation, self.act = cfg.activation, ACTIVATIONS[cfg.activation]
        self.scale, self.parallel, self.source = cfg.scale, parallel, source
        self.captured: torch.Tensor | None = None  # the source module's input, set by its pre-hook

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        return self.scaled(self.scale * self.up(self.act(self.down(h))))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        captured, self.captured = self.captured, None  # consume it: never reuse an older call's input
        if not self.uses_delta:
            return out
        if not self.parallel:
            return _add(out, self.adapter(_main(out)))
        if self.source is None:
            return _add(out, self.adapter(_first_tensor(args, kwargs)))
        if captured is None:
            raise RuntimeError(f"parallel adapter: {self.source} did not run before the module this adapter wraps; "
                               f"call the whole model (or block), not the FFN output projection alone")
        return _add(out, self.adapter(captured))

    def extra_summary(self) -> str:
        where = f"parallel to the FFN from {self.source}" if self.source else ("parallel" if self.parallel
                                                                                 else "sequential")
        return f"{where}, bottleneck {self.down.out_features}, {self.activation}, scale {self.scale:g}"


def _main(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _add(out: Any, delta: torch.Tensor) -> Any:
    return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta


def _first_tensor(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The module's main input: its first positional argument, else its first tensor keyword argument
    (transformers 5 calls attention modules with ``hidden_states=...``)."""
    if args:
        return args[0]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def _capture(wrapper: BottleneckAdapter) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if wrapper.uses_delta:
            wrapper.captured = _first_tensor(args, kwargs)

    return hook


@dataclasses.dataclass(frozen=True)
class _Spot:
    path: str
    dims: tuple[int, int]  # (in, out) features of the adapter
    parallel: bool
    source: str | None = None


def _dims(module: nn.Module, path: str) -> tuple[int, int]:
    """(in, out) of a Linear/Conv1D, or of a module from its first and last linear layers."""
    if isinstance(module, linear_types()):
        return features(module)
    linears = [m for m in module.modules() if isinstance(m, linear_types())]
    if not linears:
        raise TargetError(f"adapter: target {path} ({type(module).__name__}) holds no Linear/Conv1D, so its hidden "
                          f"size is unknown; target a projection layer or the module that contains it")
    return features(linears[0])[0], features(linears[-1])[1]


def _square(layer: nn.Module) -> tuple[int, int]:
    """A sequential adapter reads and writes the layer's output."""
    out = features(layer)[1]
    return out, out


def _plan(model: nn.Module, cfg: Adapter, modules: dict[str, nn.Module]) -> list[_Spot]:
    parallel = cfg.kind == "parallel"
    if cfg.targets is not None:
        paths = find_targets(model, cfg.targets, (nn.Module,), cfg.layers, "adapter")
        dims = {p: _dims(modules[p], p) for p in paths}
        return [_Spot(p, dims[p] if parallel else (dims[p][1], dims[p][1]), parallel) for p in paths]
    spots = []
    for block in transformer_blocks(model, "adapter", cfg.layers):
        if cfg.kind == "houlsby":
            spots.extend(_Spot(p, _square(modules[p]), False) for p in block.attention_outputs)
        if block.moe is not None:  # the MoE module maps hidden -> hidden: wrap it whole
            hidden = features(modules[block.attention_outputs[0]])[1]
            spots.append(_Spot(block.moe, (hidden, hidden), parallel))
        elif parallel:
            dims = (features(modules[block.ffn_input])[0], features(modules[block.ffn_output])[1])
            spots.append(_Spot(block.ffn_output, dims, True, block.ffn_input))
        else:
            spots.append(_Spot(block.ffn_output, _square(modules[block.ffn_output]), False))
    return spots


def _check_bottleneck(cfg: Adapter, spots: list[_Spot]) -> None:
    for spot in spots:
        hidden = spot.dims[1] if not spot.parallel else min(spot.dims)
        if cfg.bottleneck > hidden:
            raise ConfigError(f"adapter.bottleneck must be <= the hidden size ({hidden}) at {spot.path}, got "
                              f"{cfg.bottleneck}; a bottleneck wider than the layer it adapts is not a bottleneck")


@register(Adapter)
def attach(model: nn.Module, cfg: Adapter, att: Attachment) -> None:
    modules = dict(named_base_modules(model))
    spots = _plan(model, cfg, modules)
    _check_bottleneck(cfg, spots)  # every check before the first change: a bad config leaves the model as it was
    for spot in spots:

        def make(module: nn.Module, spot: _Spot = spot) -> DeltaWrapper:
            return BottleneckAdapter(module, spot.dims, cfg, spot.parallel, spot.source)

        wrapper = wrap_module(model, spot.path, make)
        att.modules[spot.path] = wrapper
        if spot.source is not None:
            att.hooks.append(modules[spot.source].register_forward_pre_hook(_capture(wrapper), with_kwargs=True))
