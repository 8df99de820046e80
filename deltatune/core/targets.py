"""Which modules a delta goes on: one matcher for every method.

A target is a module-name suffix (``"query"`` matches ``...attention.self.query``), a full dotted name,
a regex prefixed with ``re:`` (full match against the dotted name), or the preset ``"all-linear"``
(every Linear/Conv1D of the backbone, i.e. not the task head or the output embeddings).
``layers`` keeps only modules whose first integer path component (``layer.3``, ``layers.3``, ``h.3``)
is listed, which works for any transformers model without knowing its attribute names.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterable, Sequence

from torch import nn

from .errors import TargetError
from .inject import DeltaModule, DeltaWrapper, named_base_modules
from .layers import ExpertBank, linear_types

Targets = str | Sequence[str]
ALL_LINEAR = "all-linear"

log = logging.getLogger(__name__)


def layer_index(name: str) -> int | None:
    """The first integer component of a dotted module path (the transformer block index), if any."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _as_list(targets: Targets) -> list[str]:
    return [targets] if isinstance(targets, str) else list(targets)


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def _backbone_prefix(model: nn.Module) -> str | None:
    """Dotted name of the backbone inside a task model (``bert``, ``model``), or None if it is the model."""
    base = getattr(model, "base_model", model)
    if base is model:
        return None
    for name, module in model.named_modules():
        if module is base:
            return name
    return None


def _all_linear(model: nn.Module, types: tuple[type[nn.Module], ...]) -> list[str]:
    prefix = _backbone_prefix(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, module in named_base_modules(model):
        if not isinstance(module, linear_types()) or not isinstance(module, types) or module is head:
            continue
        if prefix is None or name.startswith(prefix + "."):
            found.append(name)
    return found


def unreached_expert_banks(model: nn.Module) -> list[str]:
    """Paths of mixture-of-experts expert modules (fused 3-D weights, ``core.layers.ExpertBank``) that no delta
    wraps: "all-linear" and Linear-only methods pass them by, so say so instead of training attention alone."""
    return [name for name, module in named_base_modules(model) if isinstance(module, ExpertBank)
            and not _is_wrapped(model, name)]


def _is_wrapped(model: nn.Module, path: str) -> bool:
    module = model
    for part in path.split("."):
        module = getattr(module, part)
    return isinstance(module, DeltaWrapper)


def _warn_unreached_experts(model: nn.Module, types: tuple[type[nn.Module], ...], selected: set[str]) -> None:
    banks = [n for n, m in named_base_modules(model) if isinstance(m, ExpertBank) and n not in selected]
    if banks:
        how = ("add 'experts' to targets" if ExpertBank in types
               else "use dt.LoRA(targets=['all-linear', 'experts']), this method wraps Linear layers only")
        log.warning("'all-linear' reaches only Linear layers: the routed experts of %d mixture-of-experts layers "
                    "(e.g. %s) are fused 3-D weights and stay untouched; to train them (per-expert LoRA) %s",
                    len(banks), banks[0], how)


def _leaf_names(model: nn.Module, types: tuple[type[nn.Module], ...]) -> list[str]:
    """Distinct last path components of modules of the given types: what a user would type."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in named_base_modules(model) if isinstance(m, types) and name})


def _type_names(types: Iterable[type]) -> str:
    return ", ".join(t.__name__ for t in types)


def find_targets(model: nn.Module, targets: Targets, types: tuple[type[nn.Module], ...],
                 layers: Sequence[int] | None = None, method: str = "delta",
                 skip: Iterable[str] = ()) -> list[str]:
    """Dotted names of the modules of ``types`` that ``targets`` selects, in model order.

    Raises TargetError when a pattern matches nothing (with close matches and the available names),
    or matches only modules of other types (with the types found).
    """
    skip = set(skip)
    patterns = _as_list(targets)
    if not patterns:
        raise TargetError(f"{method}: targets is empty; give module names such as {_leaf_names(model, types)[:6]}")
    modules = dict(named_base_modules(model))
    selected: set[str] = set()
    for pattern in patterns:
        if pattern == ALL_LINEAR:
            hits = _all_linear(model, types)
        else:
            matched = [n for n in modules if n and _matches(n, pattern)]
            hits = [n for n in matched if isinstance(modules[n], types)]
            if matched and not hits:
                kinds = sorted({type(modules[n]).__name__ for n in matched})
                if any(isinstance(modules[n], ExpertBank) for n in matched):
                    kinds.append("fused mixture-of-experts weights, which only dt.LoRA reaches")
                raise TargetError(f"{method}: target {pattern!r} matches modules of type {kinds}, but {method} "
                                  f"wraps only {_type_names(types)}; name a submodule instead, e.g. "
                                  f"{_close_or_some(pattern, _leaf_names(model, types))}")
        if not hits:
            raise TargetError(_no_match_message(model, pattern, types, method))
        selected.update(hits)
    if ALL_LINEAR in patterns:
        _warn_unreached_experts(model, types, selected)
    if layers is not None:
        selected = {n for n in selected if layer_index(n) in set(layers)}
        if not selected:
            found = sorted({i for i in map(layer_index, modules) if i is not None})
            raise TargetError(f"{method}: layers={list(layers)} selects none of the matched modules; "
                              f"this model has layers {found[:1]}..{found[-1:]}")
    return [n for n in modules if n in selected and n not in skip]


def _close_or_some(pattern: str, names: list[str]) -> list[str]:
    close = difflib.get_close_matches(pattern.rsplit(".", 1)[-1], names, n=3, cutoff=0.5)
    return close or names[:8]


def _no_match_message(model: nn.Module, pattern: str, types: tuple[type[nn.Module], ...], method: str) -> str:
    names = _leaf_names(model, types)
    close = difflib.get_close_matches(pattern.rsplit(".", 1)[-1], names, n=3, cutoff=0.5)
    hint = f" Did you mean {close}?" if close else ""
    return (f"{method}: target {pattern!r} matched no module.{hint} Module names this method can wrap "
            f"({_type_names(types)}): {names}. Use a suffix ('query'), a full dotted name, 're:<regex>' "
            f"or 'all-linear'.")


def find_task_heads(model: nn.Module) -> list[str]:
    """Top-level modules outside the backbone that end in ``config.num_labels`` outputs: the freshly
    initialised head of a classification / token-classification / QA model (``classifier``, ``score``,
    ``qa_outputs``). Causal and masked LMs have none (their output layer is the pretrained embeddings)."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    prefix = _backbone_prefix(model)
    if num_labels is None or prefix is None:
        return []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for name, child in model.named_children():
        if isinstance(child, DeltaWrapper):  # another named delta already trains a copy of it
            child = child.base_layer()
        if name == prefix or child is head or isinstance(child, DeltaModule):
            continue
        if any(isinstance(m, nn.Linear) and m.out_features == num_labels for m in child.modules()):
            found.append(name)
    return found


def find_modules(model: nn.Module, names: Targets, what: str = "train_modules") -> list[str]:
    """Resolve module names of any type (for ``train_modules``); same syntax as targets, no type filter."""
    found: list[str] = []
    modules = dict(named_base_modules(model))
    for pattern in _as_list(names):
        hits = [n for n in modules if n and _matches(n, pattern)]
        # keep only outermost matches: 'classifier' must not also pick 'classifier.dense' separately
        hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]
        if not hits:
            top = sorted({n.split(".")[0] for n in modules if n})
            close = difflib.get_close_matches(pattern, [n.rsplit(".", 1)[-1] for n in modules if n], n=3)
            raise TargetError(f"{what}: {pattern!r} matched no module. Close names: {close or 'none'}; "
                              f"top-level modules: {top}")
        found.extend(h for h in hits if h not in found)
    return found
