"""BitFit: train only the model's own bias terms (Ben Zaken et al., 2022, arXiv:2106.10199).

Nothing is wrapped or added: the attach rule marks existing ``bias`` parameters trainable (the
Attachment's ``existing``), so freezing, counting and saving go through the core like any other delta,
and a checkpoint holds just those biases. Which biases comes from the model's structure:
``all`` (every bias of the backbone), ``attention`` (q/k/v/output projections), ``ffn`` (feed-forward
projections), ``norm`` (LayerNorm-style layers), or a list of these; ``targets=`` names modules instead.
The task head is not included: train it with ``train_modules=["classifier"]``, as the paper does.

The original bias values are kept at attach and put back by ``detach``, so detaching gives back the base
model. Merging is a no-op: the trained biases already are the model's weights.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..core.config import DeltaConfig
from ..core.errors import AttachError
from ..core.inject import Attachment, named_base_modules
from ..core.recipe import Recipe
from ..core.registry import register
from ..core.structure import transformer_blocks
from ..core.targets import Targets, _backbone_prefix, find_targets, layer_index

SUBSETS = ("all", "attention", "ffn", "norm")


@dataclasses.dataclass
class BitFit(DeltaConfig):
    method = "bitfit"
    mergeable = True  # nothing to fold: the trained biases are the base's own
    recipe = Recipe(learning_rate=3e-3, head_learning_rate=1e-3)  # measured: BENCHMARKS.md "Defaults"

    which: str | list[str] = "all"   # bias subset(s): all, attention, ffn, norm; fewer biases, fewer numbers
    targets: Targets | None = None   # modules whose biases (recursively) train; replaces `which` when set
    layers: list[int] | None = None  # keep only biases in these transformer blocks (None: all)

    def validate(self) -> None:
        names = [self.which] if isinstance(self.which, str) else list(self.which)
        self._require(bool(names) and all(n in SUBSETS for n in names), "which",
                      f"one of {list(SUBSETS)} or a non-empty list of them")

    def subsets(self) -> list[str]:
        return [self.which] if isinstance(self.which, str) else list(self.which)


def _biases(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """Every ``bias`` parameter of the backbone: full name -> (module path, parameter)."""
    prefix = _backbone_prefix(model)
    found = {}
    for path, module in named_base_modules(model):
        bias = dict(module.named_parameters(recurse=False)).get("bias")
        if isinstance(bias, nn.Parameter) and (prefix is None or path.startswith(prefix + ".")):
            found[f"{path}.bias"] = (path, bias)
    return found


def _in_subset(path: str, module: nn.Module, subset: str, attention: set[str], ffn: set[str]) -> bool:
    if subset == "all":
        return True
    if subset == "attention":
        return path in attention
    if subset == "ffn":
        return path in ffn
    return "norm" in type(module).__name__.lower()  # LayerNorm, RMSNorm, GroupNorm, T5LayerNorm...


def _select(model: nn.Module, cfg: BitFit) -> dict[str, nn.Parameter]:
    biases = _biases(model)
    modules = dict(named_base_modules(model))
    if cfg.targets is not None:
        roots = find_targets(model, cfg.targets, (nn.Module,), None, "bitfit")
        keep = {n for n, (path, _) in biases.items() if any(path == r or path.startswith(r + ".") for r in roots)}
    else:
        subsets = cfg.subsets()
        attention: set[str] = set()
        ffn: set[str] = set()
        if {"attention", "ffn"} & set(subsets):
            blocks = transformer_blocks(model, "bitfit")
            attention = {p for b in blocks for p in b.attention_linears}
            ffn = {p for b in blocks for p in b.ffn}
        keep = {n for n, (path, _) in biases.items()
                if any(_in_subset(path, modules[path], s, attention, ffn) for s in subsets)}
    if cfg.layers is not None:
        keep = {n for n in keep if layer_index(n) in set(cfg.layers)}
    return {n: biases[n][1] for n in biases if n in keep}


@register(BitFit)
def attach(model: nn.Module, cfg: BitFit, att: Attachment) -> None:
    selected = _select(model, cfg)
    if not selected:
        what = f"targets={cfg.targets!r}" if cfg.targets is not None else f"which={cfg.which!r}"
        raise AttachError(f"bitfit: {type(model).__name__} has no bias parameters for {what}"
                          f"{f' in layers {cfg.layers}' if cfg.layers is not None else ''}; BitFit trains only bias "
                          f"terms (models built without biases, e.g. Llama, need another method such as dt.IA3 or "
                          f"dt.LoRA)")
    originals = {name: p.detach().clone() for name, p in selected.items()}

    def restore() -> None:
        with torch.no_grad():
            for name, param in selected.items():
                param.copy_(originals[name])

    att.existing.update(selected)
    att.on_detach.append(restore)
