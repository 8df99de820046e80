"""Train whole modules (a new classification head, say) as part of a delta, like PEFT's modules_to_save.

Each chosen module is wrapped by a ``ModuleCopy`` that holds a trainable copy; the original stays frozen
and untouched, so detaching or switching to another named delta brings the original back, every named
delta has its own head, and the checkpoint stores the copy under ``train:<path>.<param>``.
``dt.attach(..., train_modules=[...])`` adds this config for you; with the default ``"auto"`` it picks the
task head of a classification model (see ``core.targets.find_task_heads``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn

from ..core.config import DeltaConfig
from ..core.inject import Attachment, DeltaWrapper, wrap_module
from ..core.recipe import Recipe
from ..core.registry import register
from ..core.targets import find_modules


@dataclasses.dataclass
class TrainModules(DeltaConfig):
    method = "train"
    listed = False  # added by attach(..., train_modules=...), not named in a delta list
    mergeable = True  # merging writes the trained copy into the original
    trains_whole_modules = True
    recipe = Recipe(learning_rate=1e-2, head_learning_rate=1e-2)  # measured: BENCHMARKS.md "Defaults"

    modules: list[str] = dataclasses.field(default_factory=list)  # names (same syntax as targets) to train fully

    def validate(self) -> None:
        self._require(isinstance(self.modules, list) and all(isinstance(m, str) for m in self.modules),
                      "modules", "a list of module names")


class ModuleCopy(DeltaWrapper):
    """Runs a trainable copy of the wrapped module instead of it; merging writes the copy's weights into
    the original (and unmerging puts the originals back)."""

    mergeable = True
    routable = True  # with a scale set, the copy's change goes through ``scaled``

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.copy = copy.deepcopy(self.base_layer())
        self._originals: dict[str, torch.Tensor] = {}

    def own_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.copy.named_parameters()  # named like the original's: train:<path>.weight

    def attribute_source(self) -> nn.Module:
        # The copy is what runs: model code reaching into this module (say get_input_embeddings on a
        # trained embeddings block) must see the trained submodules, not the frozen originals.
        copied = self._modules.get("copy")
        return copied if copied is not None and self.uses_delta else self.base_layer()

    def forward(self, *args, **kwargs):
        if not self.uses_delta:
            return self.base(*args, **kwargs)
        stacked = isinstance(self.base, DeltaWrapper)
        if not stacked and self.sample_scale is None and self.gate_scale is None:
            return self.copy(*args, **kwargs)  # the common case: just run the copy
        # Additive like every other delta: base output + (copy - original), so stacked deltas add up.
        base = self.base(*args, **kwargs)
        original = self.base_layer()(*args, **kwargs) if stacked else base
        return base + self.scaled(self.copy(*args, **kwargs) - original)

    def delta_weight(self) -> torch.Tensor:
        """copy.weight - original.weight (what training changed), e.g. for task arithmetic."""
        return self.copy.weight - self.base_layer().weight

    @torch.no_grad()
    def merge(self) -> None:
        originals = dict(self.base_layer().named_parameters())
        self._originals = {n: p.detach().clone() for n, p in originals.items()}
        for name, param in self.copy.named_parameters():
            originals[name].copy_(param)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        for name, param in self.base_layer().named_parameters():
            param.copy_(self._originals[name])
        self._originals = {}
        self.merged = False


@register(TrainModules)
def attach(model: nn.Module, cfg: TrainModules, att: Attachment) -> None:
    for path in find_modules(model, cfg.modules):
        att.modules[path] = wrap_module(model, path, ModuleCopy)
