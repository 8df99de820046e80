"""The handle ``dt.attach`` returns: one delta (one or several methods) on one model.

It knows everything the attach did (its ``Attachment`` records), so it can count, merge, save and detach
without searching the model by name. Several named deltas can live on one model; the model keeps a small
table of them in ``model.__dict__['_deltatune']`` (a plain attribute: not a module, not in state_dict).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import quant
from .checkpoint import atomic_directory, check_keys, save_checkpoint
from .errors import StateError
from .inject import (
    Attachment,
    DeltaWrapper,
    base_state_dict,
    named_base_modules,
    named_base_parameters,
    remove_module,
)
from .registry import mergeable_methods
from .version import VERSION


def deltas_of(model: nn.Module) -> dict[str, Delta]:
    """The named deltas attached to ``model`` (created on first use)."""
    return model.__dict__.setdefault("_deltatune", {})


class Delta:
    """One attached delta. Created by ``dt.attach`` / ``dt.load``; not constructed by users."""

    def __init__(self, model: nn.Module, name: str, attachments: list[Attachment], base_fingerprint: dict[str, Any],
                 requires_grad_before: dict[str, bool]) -> None:
        self.model = model
        self.name = name
        self.attachments = attachments
        self.base_fingerprint = base_fingerprint
        self._requires_grad_before = requires_grad_before
        self.attached = True
        self._merged = False  # merge() ran; also covers deltas with nothing to fold (BitFit: the biases are W)

    # -- what it is --------------------------------------------------------------------------------
    @property
    def configs(self) -> list:
        return [a.config for a in self.attachments]

    @property
    def train_modules(self) -> dict[str, nn.Module]:
        """The whole modules this delta trains (as copies; see methods/train_modules.py), by path."""
        return {p: m for a in self.attachments if a.config.trains_whole_modules for p, m in a.modules.items()}

    def wrappers(self) -> list[DeltaWrapper]:
        return [w for a in self.attachments for w in a.wrappers().values()]

    def parameters(self, whole_modules: bool | None = None) -> dict[str, nn.Parameter]:
        """Every tensor this delta trains, keyed ``<slot>:<path>.<param>`` (``train:`` for train_modules).

        ``whole_modules=True`` keeps only the trained copies of whole modules (``train_modules``: a task head,
        which trains at its own learning rate), ``False`` only the rest; None: all."""
        return {f"{a.slot}:{key}": p for a in self.attachments for key, p in a.parameters().items()
                if whole_modules is None or a.config.trains_whole_modules == whole_modules}

    def num_trainable(self) -> int:
        """Number of scalars this delta trains (delta parameters plus ``train_modules``)."""
        return sum(p.numel() for p in self.parameters().values())

    def num_total(self) -> int:
        """Base model parameters plus this delta's own parameters."""
        own = sum(p.numel() for a in self.attachments for m in a.modules.values() for _, p in m.own_parameters())
        unique = {id(p): quant.numel(p) for _, p in named_base_parameters(self.model)}  # tied weights count once
        return sum(unique.values()) + own

    def summary(self) -> str:
        n, total = self.num_trainable(), self.num_total()
        return f"trainable {n:,} / total {total:,} ({100 * n / max(total, 1):.3f}%)"

    def __repr__(self) -> str:
        methods = " + ".join(c.describe() for c in self.configs)
        state = "merged" if self.is_merged else ("attached" if self.attached else "detached")
        return f"Delta({self.name!r}, {methods}, {state}; {self.summary()})"

    def modules(self) -> list:
        return [m for a in self.attachments for m in a.modules.values()]

    @property
    def is_active(self) -> bool:
        return self.attached and all(m.active for m in self.modules())

    def set_active(self, active: bool) -> None:
        """Switch this delta's effect on or off without touching any weight."""
        self._check_attached("activate" if active else "deactivate")
        if not active and self.is_merged:
            raise StateError(f"delta {self.name!r} is merged into the base weights; unmerge() it before "
                             f"deactivating or switching to another delta")
        for module in self.modules():
            module.active = active

    # -- controllers (things that change the delta while it trains, e.g. an adaptive rank budget) -----
    def step(self, step: int | None = None) -> None:
        """Tell the delta's controllers that an optimizer step finished (``step``: its 0-based index;
        None: the next one). A no-op for deltas without controllers (plain methods)."""
        self._check_attached("step")
        for att in self.attachments:
            for controller in att.controllers:
                controller.step(step)

    def finalize(self) -> None:
        """Let every controller put the delta into its final, plain form now (e.g. truncate adaptive
        LoRA ranks to the budget). A no-op for deltas without controllers."""
        self._check_attached("finalize")
        for att in self.attachments:
            for controller in att.controllers:
                controller.finalize()

    # -- merge ---------------------------------------------------------------------------------------
    @property
    def is_merged(self) -> bool:
        return self._merged or any(w.merged for w in self.wrappers())

    def _check_attached(self, what: str) -> None:
        if not self.attached:
            raise StateError(f"cannot {what} delta {self.name!r}: it was detached; attach or load it again")

    def merge(self) -> None:
        """Fold every delta weight into the base weights: the forward pass then runs no extra modules."""
        self._check_attached("merge")
        if self.is_merged:
            raise StateError(f"delta {self.name!r} is already merged; call unmerge() first")
        quant.check_mergeable(self.name, [w.base_layer() for w in self.wrappers()])
        unmergeable = sorted({a.config.method for a in self.attachments if not _foldable(a)})
        if unmergeable:
            raise StateError(f"delta {self.name!r} contains methods that cannot be merged into weights: "
                             f"{unmergeable}. Mergeable methods: {', '.join(mergeable_methods())}.")
        inactive = [w for w in self.wrappers() if not w.active]
        if inactive:
            raise StateError(f"delta {self.name!r} is not active; activate it before merging")
        self._check_no_tied_weights()
        self._check_alone_on_modules()
        done: list[DeltaWrapper] = []
        try:
            for wrapper in self.wrappers():
                wrapper.merge()
                done.append(wrapper)
        except BaseException:  # a wrapper refused (e.g. an IA3 scale ~0): take the merged ones back out
            for wrapper in reversed(done):
                wrapper.unmerge()
            raise
        self._merged = True

    def _check_alone_on_modules(self) -> None:
        """Merge only a delta that is alone in effect on its modules, and not routed per sample: a second
        merged delta on one weight makes unmerge order-dependent (DoRA, IA3), and merging a routed delta
        would apply it to every sample."""
        if any(m.sample_scale is not None for m in self.modules()):
            raise StateError(f"delta {self.name!r} is routed per sample (dt.route); call dt.activate(model, "
                             f"{self.name!r}) before merging")
        mine = {id(w.base_layer()): path for a in self.attachments for path, w in a.wrappers().items()}
        for other in deltas_of(self.model).values():
            shared = sorted({mine[id(w.base_layer())] for w in other.wrappers()
                             if w.active and id(w.base_layer()) in mine})
            if other is not self and shared:
                state = "merged into" if other.is_merged else "active on"
                raise StateError(f"cannot merge delta {self.name!r}: delta {other.name!r} is also {state} "
                                 f"{shared[:3]}; unmerge/deactivate it first (one delta in effect per merged weight)")

    def _check_no_tied_weights(self) -> None:
        """Merging into a weight shared with another module (tied input/output embeddings) would change
        that module too, so the merged model would differ from the unmerged one: refuse instead."""
        holders: dict[int, list[str]] = {}
        for path, module in named_base_modules(self.model):
            for name, param in module.named_parameters(recurse=False):
                holders.setdefault(id(param), []).append(f"{path}.{name}")
        for att in self.attachments:
            for path, wrapper in att.wrappers().items():
                weight = getattr(wrapper.base_layer(), "weight", None)
                shared = [h for h in holders.get(id(weight), []) if h != f"{path}.weight"]
                if shared:
                    raise StateError(f"cannot merge {att.slot} on {path}: its weight is tied to {shared}, so merging "
                                     f"would change those too. Keep this delta unmerged, or untie the weights "
                                     f"(e.g. load the model with tie_word_embeddings=False) before attaching.")

    def unmerge(self) -> None:
        """Take the delta weights back out of the base weights (exact up to float rounding)."""
        self._check_attached("unmerge")
        if not self.is_merged:
            raise StateError(f"delta {self.name!r} is not merged; nothing to unmerge")
        for wrapper in reversed(self.wrappers()):
            wrapper.unmerge()
        self._merged = False

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds (detached; folded forms where a method saves one)."""
        state: dict[str, torch.Tensor] = {}
        for att in self.attachments:
            for path, module in att.modules.items():
                state.update({f"{att.slot}:{att.state_path(path)}.{k}": t for k, t in module.saved_state().items()})
            state.update({f"{att.slot}:{k}": p.detach() for k, p in att.existing.items()})
        return state

    def load_state_dict(self, tensors: dict[str, torch.Tensor], where: Path | str = "state") -> None:
        """Copy ``tensors`` into this delta after checking keys and shapes (nothing copied on mismatch)."""
        check_keys(self.state_dict(), tensors, Path(where))
        with torch.no_grad():
            for att in self.attachments:
                for path, module in att.modules.items():
                    prefix = f"{att.slot}:{att.state_path(path)}."
                    module.load_saved_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
                for key, param in att.existing.items():
                    param.copy_(tensors[f"{att.slot}:{key}"])

    def metadata(self) -> dict[str, Any]:
        return {"deltatune_version": VERSION, "name": self.name,
                "methods": [{"slot": a.slot, "config": a.config.to_dict()} for a in self.attachments],
                "train_modules": list(self.train_modules), "base_model": self.base_fingerprint,
                "base_quantization": quant.model_quantization(self.model)}

    def save(self, directory: str | os.PathLike, merged: bool = False) -> Path:
        """Write a delta-only checkpoint (safetensors + JSON), atomically.

        With ``merged=True`` write instead a standalone model with the delta folded in, loadable by plain
        ``transformers.AutoModel*.from_pretrained`` (see ``dt.merge_and_save``).
        """
        self._check_attached("save")
        if merged:
            return self.save_merged(directory)
        return save_checkpoint(directory, self.state_dict(), self.metadata())

    def save_merged(self, directory: str | os.PathLike, **save_kwargs: Any) -> Path:
        """Write base + delta as a standalone model that plain ``from_pretrained`` loads (no deltatune needed),
        atomically. The delta is merged for the write and returned to its previous state afterwards."""
        self._check_attached("save")
        if not hasattr(self.model, "save_pretrained"):
            raise StateError("merge_and_save needs a transformers PreTrainedModel (it writes with save_pretrained)")
        was_merged = self.is_merged
        if not was_merged:
            self.merge()
        try:
            with atomic_directory(Path(directory)) as tmp:
                self.model.save_pretrained(tmp, state_dict=base_state_dict(self.model), **save_kwargs)
        finally:
            if not was_merged:
                self.unmerge()
        return Path(directory)

    # -- detach --------------------------------------------------------------------------------------
    def detach(self) -> nn.Module:
        """Remove the delta: the model gets back its original module objects and requires_grad flags.

        A merged delta is unmerged first, so the base weights are the original ones again.
        """
        self._check_attached("detach")
        if self.is_merged:
            self.unmerge()
        for att in reversed(self.attachments):
            undo_attachment(self.model, att)
        table = deltas_of(self.model)
        table.pop(self.name, None)
        if not table:
            quant.release_gradients(self.model)
            for name, param in named_base_parameters(self.model):
                param.requires_grad_(self._requires_grad_before.get(name, param.requires_grad))
        self.attached = False
        return self.model


def _foldable(att: Attachment) -> bool:
    """Whether merge can fold this attachment away: all its modules are mergeable wrappers and it has no hooks.
    One that only trains existing parameters (BitFit) qualifies trivially: they already are base weights."""
    wrappers = att.wrappers()
    return not att.hooks and len(wrappers) == len(att.modules) and all(w.mergeable for w in wrappers.values())


def undo_attachment(model: nn.Module, att: Attachment) -> None:
    """Remove hooks, modules and extra state an attach rule recorded, last first."""
    for handle in att.hooks:
        handle.remove()
    for path, module in reversed(list(att.modules.items())):
        remove_module(model, path, module)
    for undo in reversed(att.on_detach):
        undo()
    for param in att.existing.values():
        param.requires_grad_(False)
