"""The base class of every method config: a plain dataclass that validates itself and round-trips via dicts."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from .errors import ConfigError


@dataclasses.dataclass
class DeltaConfig:
    """A method's hyperparameters. Subclasses set ``method`` (the registry name) and add fields."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field, the value and what is allowed. Subclasses extend this."""

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def describe(self) -> str:
        """Short one-line form for summaries: ``lora(r=8, alpha=16)`` with non-default fields only."""
        defaults = type(self)()
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != getattr(defaults, f.name)]
        return f"{self.method}({', '.join(changed)})"

    # -- helpers for validate() ------------------------------------------------------------------
    def _require(self, ok: bool, field: str, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{self.method}.{field} must be {allowed}, got {getattr(self, field)!r}")


def config_from_dict(data: dict[str, Any], registry: dict[str, type[DeltaConfig]]) -> DeltaConfig:
    """Build a config from its dict form, naming unknown methods and unknown fields."""
    data = dict(data)
    name = data.pop("method", None)
    if name not in registry:
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(sorted(registry))}")
    cls = registry[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{name}: unknown field(s) {unknown}; allowed: {sorted(fields)}")
    return cls(**data)
