"""Gated combination (UniPELT, Mao et al., 2022, arXiv:2110.07577): a learned gate per layer per method.

For every transformer layer and every method of the delta with modules in that layer, a gate
``g = sigmoid(w . h + b)`` is computed from the layer's input ``h`` (one value per token) and multiplies
that method's delta path in that layer, so training can turn a method up or down per layer and per input.

Mechanics: a forward pre-hook on the layer computes ``g`` and sets it as ``gate_scale`` on the gated
modules, which apply it through ``DeltaModule.scaled`` (the same hook point as per-sample routing); a
forward hook clears it. The gates are ``Gate`` DeltaModules recorded in the delta's ``gates`` Attachment,
so they train, count, save, load, detach and show in ``dt.inspect`` like any delta module.
Gates start with w = 0 and b = logit(init): a delta whose methods are identity at init stays identity.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..core import quant
from ..core.config import DeltaConfig
from ..core.errors import AttachError, ConfigError, StateError
from ..core.inject import Attachment, DeltaModule, add_free_module
from ..core.registry import register

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Gates(DeltaConfig):
    method = "gates"

    init: float = 0.5                  # gate value at step 0 (w = 0, b = logit(init)); 1.0 would be ungated
    methods: list[str] | None = None   # slots to gate ("lora", "adapter", ...); None: every method in a layer

    def validate(self) -> None:
        self._require(0.0 < self.init < 1.0, "init", "in (0, 1) (the gate is a sigmoid)")
        self._require(self.methods is None or (isinstance(self.methods, list) and len(self.methods) > 0),
                      "methods", "None or a non-empty list of method slots")


class Gate(DeltaModule):
    """One sigmoid gate: scales the delta path of ``gated`` (one method's modules in one layer)."""

    routable = True  # it adds nothing itself; routing masks act on the modules it gates

    def __init__(self, hidden_size: int, init: float, like: torch.Tensor, slot: str,
                 gated: list[DeltaModule]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size, dtype=like.dtype, device=like.device))
        self.bias = nn.Parameter(torch.full((1,), math.log(init / (1 - init)), dtype=like.dtype, device=like.device))
        self.slot = slot
        self.gated = list(gated)  # a plain list: not submodules, so their parameters are not counted twice

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Gate values, shape (batch, seq), from the layer input (batch, seq, hidden)."""
        return torch.sigmoid(hidden.to(self.weight.dtype) @ self.weight + self.bias)

    def open(self, hidden: torch.Tensor) -> None:
        value = self(hidden) if self.active else None
        for module in self.gated:
            module.gate_scale = value

    def close(self) -> None:
        for module in self.gated:
            module.gate_scale = None

    def extra_summary(self) -> str:
        return f"sigmoid gate on {self.slot} ({len(self.gated)} module(s))"


def with_gates(configs: Sequence[DeltaConfig], gates: bool | DeltaConfig) -> list[DeltaConfig]:
    """The configs with one ``Gates`` config last (added for ``gates=True``; gates act on the others)."""
    if isinstance(gates, Gates):
        configs = [*configs, gates]
    elif gates is True:
        configs = [*configs, Gates()]
    elif gates not in (False, None):
        raise ConfigError(f"gates must be True, False or a dt.Gates(...) config, got {gates!r}")
    found = [c for c in configs if isinstance(c, Gates)]
    if len(found) > 1:
        raise ConfigError("a delta takes at most one Gates config (pass gates=True or one dt.Gates(...))")
    if found and len(found) == len(configs):
        raise ConfigError("Gates alone gate nothing: attach them together with methods, e.g. "
                          "dt.attach(model, dt.LoRA(...), dt.Adapter(...), gates=True)")
    return [c for c in configs if not isinstance(c, Gates)] + found


def _block_of(path: str) -> str | None:
    """The transformer layer holding ``path``: the prefix up to its first integer component."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def _hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(size, int):
        return size
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.embedding_dim
    raise AttachError("gates need the layer width: the model has neither config.hidden_size nor input embeddings")


def _gateable(att: Attachment) -> dict[str, list[DeltaModule]]:
    """The attachment's modules grouped by layer; what cannot be gated is logged and left ungated."""
    groups: dict[str, list[DeltaModule]] = {}
    for path, module in att.modules.items():
        block = _block_of(path)
        if block is None or not module.gateable:
            why = "it is outside the transformer layers" if block is None else "its effect cannot be scaled"
            log.warning("gates: %s on %s is not gated: %s", att.slot, path, why)
            continue
        groups.setdefault(block, []).append(module)
    if att.existing:
        log.warning("gates: %s trains existing parameters (%d), which cannot be gated", att.slot, len(att.existing))
    return groups


def _hook(block: nn.Module, gate: Gate) -> list:
    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise StateError(f"gate on {gate.slot}: the layer {type(module).__name__} was called without "
                             f"hidden states as first argument or 'hidden_states' keyword")
        gate.open(hidden)

    def after(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        gate.close()

    return [block.register_forward_pre_hook(before, with_kwargs=True),
            block.register_forward_hook(after, with_kwargs=True)]


@register(Gates, sees_delta=True)
def attach(model: nn.Module, cfg: Gates, att: Attachment, others: list[Attachment]) -> None:
    slots = [a.slot for a in others]
    unknown = sorted(set(cfg.methods or []) - set(slots))
    if unknown:
        raise ConfigError(f"gates.methods names {unknown}, but this delta's methods are {slots}")
    hidden = _hidden_size(model)
    for other in others:
        if cfg.methods is not None and other.slot not in cfg.methods:
            continue
        for block, modules in _gateable(other).items():
            dtype, device = quant.float_dtype(model.get_submodule(block))  # a quantized block's weights are ints
            like = torch.empty(0, dtype=dtype, device=device)
            gate = Gate(hidden, cfg.init, like, other.slot, modules)
            add_free_module(model, att, f"{block}.gate_{other.slot}", gate)  # stable checkpoint keys
            att.hooks.extend(_hook(model.get_submodule(block), gate))
            att.on_detach.append(gate.close)
    if not att.modules:
        raise AttachError(f"gates: none of the methods {slots} has modules inside a transformer layer that can "
                          f"be gated; attach without gates")
