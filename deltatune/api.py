"""The public verbs: attach, load, detach, merge_and_save. Everything else hangs off the Delta handle."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from .core import quant
from .core.checkpoint import check_fingerprint, read_meta, read_tensors
from .core.checkpoint import fingerprint as base_fingerprint
from .core.config import DeltaConfig, config_from_dict
from .core.delta import Delta, deltas_of, undo_attachment
from .core.errors import AttachError, CheckpointError, ConfigError, StateError
from .core.inject import Attachment, named_base_parameters
from .core.recipe import Recipe, recipe_for
from .core.registry import config_classes, method_for
from .core.targets import Targets, find_modules, find_task_heads
from .methods.gates import with_gates
from .methods.train_modules import TrainModules

DEFAULT_NAME = "default"


def _slots(configs: Sequence[DeltaConfig]) -> list[str]:
    """Stable per-method slot names inside one delta: lora, ia3, lora_1, ..."""
    seen: dict[str, int] = {}
    slots = []
    for cfg in configs:
        n = seen.get(cfg.method, 0)
        seen[cfg.method] = n + 1
        slots.append(cfg.method if n == 0 else f"{cfg.method}_{n}")
    return slots


def expand_configs(configs: Sequence[DeltaConfig | Sequence[DeltaConfig]],
                   gates: bool | DeltaConfig = False) -> tuple[DeltaConfig, ...]:
    """Flatten preset lists (``dt.MAM()``) into one tuple of configs and add the ``Gates`` config when asked for."""
    flat: list[DeltaConfig] = []
    for cfg in configs:
        if isinstance(cfg, (list, tuple)):
            flat.extend(expand_configs(cfg))
        else:
            flat.append(cfg)
    return tuple(with_gates(flat, gates))


def _check_request(model: nn.Module, configs: Sequence[DeltaConfig], name: str) -> None:
    if not isinstance(model, nn.Module):
        raise AttachError(f"dt.attach expects a torch nn.Module (a transformers model), got {type(model).__name__}")
    if not configs:
        raise ConfigError("dt.attach needs at least one method config, e.g. dt.attach(model, dt.LoRA(r=8))")
    for cfg in configs:
        method_for(cfg)
        cfg.check()  # fields may have been changed since construction
    if name in deltas_of(model):
        raise AttachError(f"a delta named {name!r} is already attached to this model; pass name='...' to add "
                          f"another one, or detach the existing one first (attached: {sorted(deltas_of(model))})")


def _check_no_tensor_twice(delta: Delta) -> None:
    """Two methods (two BitFit configs, or BitFit targets and train_modules) marking the same existing
    tensor would count it twice and make the checkpoint unwritable (safetensors refuses shared tensors)."""
    seen: dict[int, str] = {}
    for key, param in delta.parameters().items():
        if id(param) in seen:
            raise AttachError(f"delta {delta.name!r} would train the same tensor twice, as {seen[id(param)]!r} and "
                              f"{key!r}; drop the duplicate method config or the overlapping train_modules")
        seen[id(param)] = key


def _train_modules_config(model: nn.Module, train_modules: Targets | None) -> list[DeltaConfig]:
    """``train_modules`` as a config: "auto" picks a classification model's new head, None/[] nothing."""
    if isinstance(train_modules, str) and train_modules == "auto":
        names = find_task_heads(model)
    else:
        names = find_modules(model, train_modules or [])
    return [TrainModules(modules=names)] if names else []


def attach(model: nn.Module, *configs: DeltaConfig | Sequence[DeltaConfig], name: str = DEFAULT_NAME,
           train_modules: Targets | None = "auto", gates: bool | DeltaConfig = False) -> Delta:
    """Attach one or several delta methods to ``model`` in place and freeze everything else.

    Only the new delta's parameters and the ``train_modules`` (e.g. ``["classifier"]``, same name syntax
    as targets) require grad afterwards. ``train_modules`` are trained as copies held by the delta (the
    originals stay untouched); the default ``"auto"`` trains the task head of a classification model
    (``classifier``, ``score``, ...) and nothing on other models; ``None`` trains no whole module.
    The new delta becomes the active one. On any error the model is left exactly as it was. A config may
    be a preset's list of configs (``dt.MAM()``); ``gates=True`` (or a ``dt.Gates(...)``) adds a learned
    per-layer gate per method (UniPELT, see methods/gates.py).

    Raises:
        ConfigError: a config field is invalid. TargetError: targets match nothing usable.
        AttachError: the name is taken, or the delta would train nothing.
    """
    configs = expand_configs(configs, gates)
    _check_request(model, configs, name)
    configs = [*configs, *_train_modules_config(model, train_modules)]
    flags = {n: p.requires_grad for n, p in named_base_parameters(model)}
    fingerprint = base_fingerprint(model)
    attachments: list[Attachment] = []
    try:
        for slot, cfg in zip(_slots(configs), configs, strict=True):
            attachments.append(Attachment(slot, cfg))
            method = method_for(cfg)
            method.attach(model, cfg, attachments[-1], *([attachments[:-1]] if method.sees_delta else []))
        delta = Delta(model, name, attachments, fingerprint, flags)
        if delta.num_trainable() == 0:
            raise AttachError(f"delta {name!r} ({', '.join(c.describe() for c in configs)}) has no trainable "
                              f"parameters on this model; check its targets or add train_modules")
        _check_no_tensor_twice(delta)
    except BaseException:
        for att in reversed(attachments):
            undo_attachment(model, att)
        for n, param in named_base_parameters(model):  # undo freezes what a method marked (BitFit biases)
            param.requires_grad_(flags.get(n, param.requires_grad))
        raise
    for other in deltas_of(model).values():
        if not other.is_merged:
            other.set_active(False)
    model.requires_grad_(False)
    for param in delta.parameters().values():
        param.requires_grad_(True)
    deltas_of(model)[name] = delta
    quant.guard_gradients(model)  # bitsandbytes' packed CPU layers give no input gradient (core/quant.py)
    return delta


def detach(model: nn.Module, name: str | None = None) -> nn.Module:
    """Detach the named delta (or every delta when ``name`` is None); returns the model."""
    table = deltas_of(model)
    names = list(table) if name is None else [name]
    for n in names:
        if n not in table:
            raise StateError(f"no delta named {n!r} on this model; attached: {sorted(table)}")
        table[n].detach()
    return model


def load(model: nn.Module, directory: str | os.PathLike, name: str | None = None,
         check_base: bool = True) -> Delta:
    """Attach the delta saved in ``directory`` to ``model`` and load its weights.

    The checkpoint's fingerprint must match the model (``check_base=False`` skips that when you know
    the delta's shapes still fit, e.g. a fine-tuned variant of the base). On error nothing is attached.
    """
    where, meta = read_meta(directory)
    if check_base:
        check_fingerprint(meta.get("base_model", {}), model, where)
    quant.note_quantization(meta.get("base_quantization"), model, where)
    try:
        configs = [config_from_dict(m["config"], config_classes()) for m in meta["methods"]]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: malformed method list in delta_config.json ({e})") from e
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from e
    tensors = read_tensors(where, meta)
    delta = attach(model, *configs, name=name or meta.get("name", DEFAULT_NAME), train_modules=None)
    try:
        delta.load_state_dict(tensors, where)
    except BaseException:
        delta.detach()
        raise
    return delta


def merge_and_save(delta: Delta, directory: str | os.PathLike, **save_kwargs) -> Path:
    """Write base + delta as a standalone model that plain ``from_pretrained`` loads (no deltatune needed).

    The delta is merged for the write and returned to its previous state afterwards (``Delta.save_merged``).
    ``dt.merge_and_save`` is ``interop.merged.merge_and_save``: this plus ``dtype=`` and quantized bases.
    """
    return delta.save_merged(directory, **save_kwargs)


def recipe(*configs: DeltaConfig | Delta) -> Recipe:
    """The training settings ``deltatune train`` uses for these methods when you set none.

    ``dt.recipe(dt.LoRA()).learning_rate`` (or pass an attached ``Delta``): use it with your own loop or
    ``Trainer``; ``.for_batch(global_batch)`` applies the batch-size rule (see docs/choosing.md).
    """
    flat: list[DeltaConfig] = []
    for item in configs:
        flat.extend(item.configs if isinstance(item, Delta) else expand_configs([item]))
    if not all(isinstance(c, DeltaConfig) for c in flat):
        raise ConfigError(f"dt.recipe takes method configs (dt.LoRA(), ...) or a Delta, got {configs!r}")
    return recipe_for(flat)
