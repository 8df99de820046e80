"""Putting deltas into a model in place, and taking them out again.

Two kinds of delta modules live inside the user's model:
- a ``DeltaWrapper`` replaces a module at its path and keeps the original as its ``base`` child, so
  detaching puts back the very same object (bit for bit); wrappers may nest (several named deltas,
  or two methods on one module);
- a plain ``DeltaModule`` is *added* at a new path (e.g. prefix key/values next to an attention module).

Every attach returns an ``Attachment`` record; detach, save and inspect read it, nothing is re-discovered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from . import quant
from .config import DeltaConfig
from .errors import AttachError, StateError
from .layers import linear_types


def broadcast_scale(scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Shape a per-sample (batch,) or per-token (batch, seq) multiplier to multiply ``out`` (batch, ...).

    A per-token scale applies token by token when ``out`` is (batch, seq, features) with the same seq;
    otherwise (e.g. prefix key/values, which have no token axis of the input) its mean over tokens is used.
    """
    if out.shape[0] != scale.shape[0]:
        raise StateError(f"a per-sample scale (dt.route or gates) was set for a batch of {scale.shape[0]}, but a "
                         f"delta module got a batch of {out.shape[0]}; give dt.route exactly one name per sample")
    if scale.dim() == 2 and not (out.dim() == 3 and out.shape[1] == scale.shape[1]):
        scale = scale.mean(dim=1)
    return scale.to(out.dtype).view(*scale.shape, *([1] * (out.dim() - scale.dim())))


class DeltaModule(nn.Module):
    """Base of every module deltatune adds to a model. All its own parameters are delta parameters.

    ``active`` switches the module's effect off (named deltas, ``dt.deactivate``) without touching weights.
    ``sample_scale`` (per-sample routing, (batch,)) and ``gate_scale`` (gates, (batch,) or (batch, seq)) are
    multipliers of the delta path set per call by deltatune.compose; a module whose forward passes its whole
    effect through ``scaled`` (so scale 0 gives exactly the base output) sets ``routable = True``. It is opt-in:
    a module that forgets it is refused by routing and left ungated by gates, loudly, instead of silently
    ignoring the scales (the contract test routes every routable method and checks the result).
    """

    routable: bool = False

    @property
    def gateable(self) -> bool:
        """Whether a continuous multiplier (gates' ``gate_scale``) scales the effect: true for deltas added through
        ``scaled``; a module that can only be switched per sample (prefix slots, prompts) sets it False."""
        return self.routable

    def __init__(self) -> None:
        super().__init__()
        self.active = True
        self.sample_scale: torch.Tensor | None = None
        self.gate_scale: torch.Tensor | None = None

    def scaled(self, delta_out: torch.Tensor) -> torch.Tensor:
        """Multiply the delta path's output (batch, ...) by the routing mask and the gate, where set."""
        for scale in (self.sample_scale, self.gate_scale):
            if scale is not None:
                delta_out = delta_out * broadcast_scale(scale, delta_out)
        return delta_out

    def own_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.named_parameters()

    def saved_state(self) -> dict[str, torch.Tensor]:
        """Tensors a checkpoint stores for this module; override to save a folded form (prefix MLP)."""
        return {name: p.detach() for name, p in self.own_parameters()}

    def load_saved_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of ``saved_state``; keys and shapes were checked by the caller."""
        with torch.no_grad():
            for name, param in self.own_parameters():
                param.copy_(state[name])


class DeltaWrapper(DeltaModule):
    """Wraps ``base`` (the original module, or another wrapper) and adds a delta to its output.

    Subclasses implement ``forward`` and, when mergeable, ``delta_weight`` (in the base layer's weight
    layout). ``active`` switches the delta path off without touching weights; ``merged`` says the delta
    currently lives inside the base weight.
    """

    mergeable: bool = False
    # opt-in, like ``routable``: the wrapper takes its dtype from ``quant.compute_dtype`` and never reads the integer
    # weight, so it trains on a quantized base layer (tested in tests/quant); others are refused at attach
    wraps_quantized: bool = False

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.merged = False
        # decided once (the innermost layer never changes): torch.compile cannot trace the class check
        self.quantized_base = quant.is_quantized(self.base_layer())
        if self.quantized_base and not self.wraps_quantized:
            raise AttachError(f"{type(self).__name__} cannot train on the quantized layer "
                              f"{quant.describe(self.base_layer())}: it builds its parameters or its update from a "
                              f"floating-point weight. Load the base in full precision for this method, leave the "
                              f"quantized layers out of its targets, or use a method that trains on quantized bases "
                              f"(docs/quantized.md)")

    def tensor_options(self) -> dict[str, Any]:
        """dtype and device for the delta's new tensors: the base layer's compute dtype (a quantized layer
        stores integers; the delta trains in the dtype the layer computes in, as QLoRA's does)."""
        layer = self.base_layer()
        return {"dtype": quant.compute_dtype(layer), "device": layer.weight.device}

    def own_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.named_parameters():
            if not name.startswith("base."):
                yield name, param

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks come from the module it stands in for, so model code that reaches
        into a wrapped module (``get_input_embeddings`` reading ``embeddings.word_embeddings``,
        ``q_proj.weight.dtype``, ``in_features``) keeps working."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules", {})
            if name.startswith("__") or "base" not in modules:  # not set up yet: no forwarding
                raise
            return getattr(self.attribute_source(), name)

    def attribute_source(self) -> nn.Module:
        """Where ``__getattr__`` forwards to: the original module, not a wrapper in between (forwarding to a
        stacked wrapper would make ``register_parameter`` see its ``lora_A`` as taken); a ``ModuleCopy``
        forwards to its copy."""
        return self.base_layer()

    def base_is_plain_linear(self) -> bool:
        """Whether the base is an nn.Linear/Conv1D that nobody observes (not a stacked wrapper, a quantised or
        custom layer; no hooks) and no routing or gate scales the delta: then a method may compute the layer's
        output its own way (fused, or with a folded weight) instead of calling it."""
        layer = self.base
        return (type(layer) in linear_types() and not self.quantized_base  # torchao's is an nn.Linear
                and self.sample_scale is None and self.gate_scale is None
                and not layer._forward_hooks and not layer._forward_pre_hooks)

    def base_layer(self) -> nn.Module:
        """The innermost original module, through any nested wrappers."""
        layer = self.base
        while isinstance(layer, DeltaWrapper):
            layer = layer.base
        return layer

    @property
    def uses_delta(self) -> bool:
        """Whether forward must compute the delta path (active and not already folded into W)."""
        return self.active and not self.merged

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} is not mergeable")

    def folds_per_sample(self) -> bool:
        """Whether, right now, this wrapper computes exactly its base layer with weight ``fold_into(W)``, so hard
        routing at inference may run its samples as one folded product (core.routed_fold). Opt-in: False."""
        return False

    def fold_into(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (the base layer's layout) plus this delta, as a new tensor."""
        return weight + self.delta_weight().to(weight.dtype)

    def add_delta_into(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """``out`` (rows, out_features) += this delta's share of the layer's output for inputs ``x`` (rows,
        in_features), in place: what routing adds to a group of samples' base output when folding per group
        does not pay (core.routed_fold). Needed with ``folds_per_sample``; the default multiplies by the
        weight-sized ``delta_weight`` (a low-rank method does it through its factors)."""
        delta = self.delta_weight().to(out.dtype)  # the base layer's layout: (out, in) for nn.Linear, else (in, out)
        out.addmm_(x, delta.T if isinstance(self.base_layer(), nn.Linear) else delta)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the delta into the base weight: W <- W + delta_weight()."""
        weight = self.base_layer().weight
        weight.add_(self.delta_weight().to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``: W <- W - delta_weight() (exact up to float rounding)."""
        weight = self.base_layer().weight
        weight.sub_(self.delta_weight().to(weight.dtype))
        self.merged = False


@dataclasses.dataclass
class Attachment:
    """What one method config did to the model: the record detach, save and inspect work from.

    modules: delta modules by the dotted path they occupy (wrappers replace the module there,
        other DeltaModules were added there).
    existing: original parameters the method made trainable (BitFit biases), by original name.
    hooks: handles of forward hooks, removed at detach.
    on_detach: extra undo steps (run last-in first-out).
    state_paths: checkpoint path of an added module whose leaf was renamed because another named delta
        holds the usual one (see ``add_free_module``), so checkpoint keys don't depend on what else is attached.
    controllers: objects that change the delta while it trains (e.g. an adaptive rank budget); each has
        ``step(step: int | None)`` and ``finalize()``, called by ``Delta.step`` / ``Delta.finalize``.
    """

    slot: str
    config: DeltaConfig
    modules: dict[str, DeltaModule] = dataclasses.field(default_factory=dict)
    existing: dict[str, nn.Parameter] = dataclasses.field(default_factory=dict)
    hooks: list[Any] = dataclasses.field(default_factory=list)
    on_detach: list[Callable[[], None]] = dataclasses.field(default_factory=list)
    state_paths: dict[str, str] = dataclasses.field(default_factory=dict)
    controllers: list[Any] = dataclasses.field(default_factory=list)

    def state_path(self, path: str) -> str:
        """The path a module's tensors are saved under: its usual path, even when placed elsewhere."""
        return self.state_paths.get(path, path)

    def wrappers(self) -> dict[str, DeltaWrapper]:
        return {p: m for p, m in self.modules.items() if isinstance(m, DeltaWrapper)}

    def parameters(self) -> dict[str, nn.Parameter]:
        """Trainable tensors of this attachment, keyed ``<path>.<param>`` (stable across nesting)."""
        params = {f"{self.state_path(path)}.{n}": p for path, m in self.modules.items() for n, p in m.own_parameters()}
        params.update(self.existing)
        return params


# -- walking the model as the user sees it (wrappers transparent) ---------------------------------

def named_base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` of the original model: wrappers are replaced by their base layer and
    modules deltatune added are skipped, so names and types are what the user knows."""
    yield prefix, model
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, DeltaWrapper):
            child = child.base_layer()
        elif isinstance(child, DeltaModule):
            continue
        yield from named_base_modules(child, path)


def named_base_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``named_parameters`` of the original model under their original names (no delta parameters)."""
    for path, module in named_base_modules(model):
        for name, param in module.named_parameters(recurse=False):
            yield (f"{path}.{name}" if path else name), param


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` of the original model (original key names, no delta tensors), e.g. for save_pretrained."""
    state = {}
    for path, module in named_base_modules(model):
        prefix = f"{path}." if path else ""
        state.update({prefix + n: p.detach() for n, p in module._parameters.items() if p is not None})
        state.update({prefix + n: b for n, b in module._buffers.items()
                      if b is not None and n not in module._non_persistent_buffers_set})
    return state


def _split(path: str) -> tuple[str, str]:
    parent, _, leaf = path.rpartition(".")
    return parent, leaf


def _logical_parent(model: nn.Module, parent_path: str) -> nn.Module:
    """Resolve a dotted path through wrappers (``a.query.x`` works even when ``query`` is wrapped)."""
    module = model
    for part in parent_path.split(".") if parent_path else []:
        module = getattr(module, part)
        if isinstance(module, DeltaWrapper):
            module = module.base_layer()
    return module


def wrap_module(model: nn.Module, path: str, make: Callable[[nn.Module], DeltaWrapper]) -> DeltaWrapper:
    """Replace the module at ``path`` (which may already be a wrapper) by ``make(module)``, in the module's
    train/eval mode (a new module starts in training mode: attached to a model in eval mode, its dropout
    would be on)."""
    parent_path, leaf = _split(path)
    parent = _logical_parent(model, parent_path)
    original = getattr(parent, leaf)
    wrapper = make(original)
    wrapper.train(original.training)
    setattr(parent, leaf, wrapper)
    return wrapper


def add_module(model: nn.Module, path: str, module: DeltaModule) -> None:
    """Register a new delta module at ``path`` (its parent must exist, the leaf must be free)."""
    parent_path, leaf = _split(path)
    parent = _logical_parent(model, parent_path)
    if hasattr(parent, leaf):
        raise ValueError(f"internal: {path} already exists")
    module.train(parent.training)  # as the model around it (see wrap_module)
    parent.add_module(leaf, module)


def add_free_module(model: nn.Module, att: Attachment, path: str, module: DeltaModule) -> str:
    """``add_module`` at ``path``, or at ``path_2``, ``path_3``... when that leaf is taken (another named delta
    added the same kind of module there). Records the module in ``att`` with ``path`` as its checkpoint path,
    so a delta saved while sharing the model loads onto a fresh one. Returns the path actually used."""
    parent = _logical_parent(model, _split(path)[0])
    used, n = path, 1
    while hasattr(parent, _split(used)[1]):
        n += 1
        used = f"{path}_{n}"
    add_module(model, used, module)
    att.modules[used] = module
    if used != path:
        att.state_paths[used] = path
    return used


def remove_module(model: nn.Module, path: str, module: DeltaModule) -> None:
    """Undo ``wrap_module`` / ``add_module`` for ``module``, even when other wrappers nest around it."""
    parent_path, leaf = _split(path)
    parent = _logical_parent(model, parent_path)
    current = getattr(parent, leaf)
    if not isinstance(module, DeltaWrapper):
        delattr(parent, leaf)
        return
    if current is module:
        setattr(parent, leaf, module.base)
        return
    while isinstance(current, DeltaWrapper) and current.base is not module:
        current = current.base
    if not isinstance(current, DeltaWrapper):
        raise RuntimeError(f"internal: wrapper for {path} is no longer in the model")
    current.base = module.base
