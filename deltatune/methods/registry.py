"""The method registry: name -> (config class, attach rule). The only module-level mutable state.

A method file defines a ``DeltaConfig`` subclass and decorates its attach rule with ``@register(Config)``;
importing ``deltatune.methods`` imports every method file, so adding a method is adding a file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import nn

from ..core.config import DeltaConfig
from ..core.inject import Attachment

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
    from ..core.errors import ConfigError

    if not isinstance(config, DeltaConfig) or config.method not in METHODS:
        raise ConfigError(f"{config!r} is not a delta method config; use one of "
                          f"{sorted(m.config.__name__ for m in METHODS.values())} (e.g. dt.LoRA(r=8))")
    return METHODS[config.method]


def config_classes() -> dict[str, type[DeltaConfig]]:
    return {name: m.config for name, m in METHODS.items()}
