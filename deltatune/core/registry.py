"""The method registry: name -> (config class, attach rule). The only module-level mutable state.

A method file under ``deltatune/methods/`` defines a ``DeltaConfig`` subclass and decorates its attach rule
with ``@register(Config)``; importing ``deltatune.methods`` imports every method file, so adding a method is
adding a file. The registry lives in the core so that the core can answer questions about methods (which
are mergeable, which names users may write) without importing them; what it answers comes from the config
classes' own declarations (``DeltaConfig.listed``, ``.mergeable``, ``.trains_whole_modules``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from .config import DeltaConfig
from .errors import ConfigError
from .inject import Attachment

# A rule fills in the Attachment as it goes, so a failure half-way can be undone from the record.
AttachRule = Callable[[nn.Module, DeltaConfig, Attachment], None]


@dataclasses.dataclass(frozen=True)
class Method:
    config: type[DeltaConfig]
    attach: AttachRule
    # The rule acts on the other methods of its delta (gates): it is called last, with one more argument,
    # the list of the delta's other Attachments.
    sees_delta: bool = False


METHODS: dict[str, Method] = {}


def register(config_cls: type[DeltaConfig], sees_delta: bool = False) -> Callable[[AttachRule], AttachRule]:
    """Register ``rule(model, config, attachment)`` as the way to attach ``config_cls``
    (``rule(model, config, attachment, other_attachments)`` with ``sees_delta=True``)."""

    def deco(rule: AttachRule) -> AttachRule:
        if config_cls.method in METHODS:
            raise ValueError(f"method {config_cls.method!r} registered twice")
        METHODS[config_cls.method] = Method(config_cls, rule, sees_delta)
        return rule

    return deco


def method_for(config: DeltaConfig) -> Method:
    if not isinstance(config, DeltaConfig) or config.method not in METHODS:
        raise ConfigError(f"{config!r} is not a delta method config; use one of "
                          f"{sorted(m.config.__name__ for m in METHODS.values() if m.config.listed)} "
                          f"(e.g. dt.LoRA(r=8))")
    return METHODS[config.method]


def config_classes(listed_only: bool = False) -> dict[str, type[DeltaConfig]]:
    """Config class by method name: every registered one (what a checkpoint may hold), or with
    ``listed_only`` those users name themselves (not ``train``/``gates``, which attach adds for them)."""
    return {name: m.config for name, m in METHODS.items() if m.config.listed or not listed_only}


def mergeable_methods() -> list[str]:
    """Names of the methods ``Delta.merge`` can fold into the base weights, for messages."""
    return sorted(name for name, m in METHODS.items() if m.config.mergeable and m.config.listed)
