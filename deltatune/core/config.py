"""The base class of every method config: a plain dataclass that validates itself and round-trips via dicts."""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
import types
import typing
from typing import Any, ClassVar, Literal, Union

from .errors import ConfigError
from .recipe import DEFAULT as DEFAULT_RECIPE
from .recipe import Recipe


@dataclasses.dataclass
class DeltaConfig:
    """A method's hyperparameters. Subclasses set ``method`` (the registry name) and add fields."""

    method: ClassVar[str] = ""
    recipe: ClassVar[Recipe] = DEFAULT_RECIPE  # training defaults measured for this method (core/recipe.py)
    # What the core asks a method instead of testing its name (checked against behaviour by the contract test):
    listed: ClassVar[bool] = True      # users name it in a ``delta:`` list (False: attach adds it, e.g. gates)
    mergeable: ClassVar[bool] = False  # ``delta.merge()`` folds it into the base weights
    trains_whole_modules: ClassVar[bool] = False  # it trains copies of whole modules (``train_modules``)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Check every field against its type annotation, then ``validate()``: a wrong type (``r="8"``,
        ``alpha=nan``, ``targets=5``) is a ConfigError naming the field, never a TypeError from deep inside."""
        hints = _field_types(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in hints and not _conforms(value, hints[f.name]):
                raise ConfigError(f"{self.method}.{f.name} must be {_describe(hints[f.name])}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field, the value and what is allowed. Subclasses extend this
        (``check()`` has already verified the field types, so ``self.r > 0`` is safe here)."""

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
    if not isinstance(data, dict):
        raise ConfigError(f"a method config must be a mapping with a 'method' key, got {data!r}")
    data = dict(data)
    name = data.pop("method", None)
    if not isinstance(name, str) or name not in registry:
        known = sorted(n for n, c in registry.items() if c.listed)
        raise ConfigError(f"unknown method {name!r}; known methods: {', '.join(known)}")
    cls = registry[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - fields))
    if unknown:
        raise ConfigError(f"{name}: unknown field(s) {unknown}; allowed: {sorted(fields)}")
    return cls(**data)


# -- the type check behind DeltaConfig.check() ----------------------------------------------------
# Covers what config annotations use: int, float, bool, str, None, Any, unions, Literal, list/tuple/
# Sequence[...] and dict[...]. Other annotations (a class) are checked with isinstance.

@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Resolved field annotations (``from __future__ import annotations`` leaves them as strings)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation only importable under TYPE_CHECKING: validate() alone
        return {}


def _conforms(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:  # bool is an int subclass, but r=True is a mistake
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # ints are fine; NaN and inf never make sense as a hyperparameter
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if origin in (list, tuple, collections.abc.Sequence):
        return (isinstance(value, (list, tuple)) and
                all(_conforms(v, args[0] if args else Any) for v in value))
    if origin in (dict, collections.abc.Mapping):
        key, val = args or (Any, Any)
        return isinstance(value, dict) and all(_conforms(k, key) and _conforms(v, val) for k, v in value.items())
    return not isinstance(tp, type) or isinstance(value, tp)


def _describe(tp: Any) -> str:
    """``int`` -> "an integer", ``str | list[str] | None`` -> "a string, a list of strings or None"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in args]
        return ", ".join(parts[:-1]) + " or " + parts[-1]
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {_plural(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping):
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}" if args else "a mapping"
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
             type(None): "None"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _plural(tp: Any) -> str:
    """"integers" for int, "finite numbers" for float (the article dropped, an s added)."""
    single = _describe(tp)
    return single.split(" ", 1)[1] + "s" if single.startswith(("a ", "an ")) else single
