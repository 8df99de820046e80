"""The ``search:`` section of a training YAML: what to search, checked in full before any trial runs.

    search:
      space:                               # parameter -> how to choose it
        method: [lora, adapter]            # which delta method (a choice of registry names)
        lora.r: [4, 8, 16]                 # <method>.<field>: only sampled when that method is in use
        lora.targets: [[query, value], [query, key, value]]   # choices may be lists (or mappings)
        adapter.bottleneck: {low: 8, high: 64, log: true}      # ints from int bounds
        train.learning_rate: {low: 1.0e-4, high: 3.0e-3, log: true}  # any training-config key
        data.max_length: 64                # a plain value: fixed for every trial
      metric: accuracy                     # default: train.metric; direction follows it (loss: minimize)
      pruner: median                       # median | halving | none: stop bad trials at their evaluations
      startup_trials: 2                    # median: trials that always run in full first
      warmup_steps: 0                      # no pruning before this many training steps
      sampler: tpe                         # tpe | random
      seed: 0                              # sampler seed
      enqueue: [{method: lora, lora.r: 8}] # configurations to try first (each at most once per study)

Without ``method`` the trials use the config's ``delta`` list and ``<method>.<field>`` values are set on its
entries. Every choice and both ends of every range are validated against the method config or the training
config here, so a typo or an impossible value fails before the first trial instead of in trial 17.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
from typing import Any

from pydantic import ValidationError

from ..core.config import config_from_dict
from ..core.errors import ConfigError
from ..methods import config_classes
from ..train.config import DEFAULT_DELTA, RunConfig, all_keys, apply_overrides, format_errors

OPTIONS = {"space", "metric", "direction", "pruner", "startup_trials", "warmup_steps", "sampler", "seed", "enqueue"}
PRUNERS = ("median", "halving", "none")
SAMPLERS = ("tpe", "random")
RANGE_KEYS = {"low", "high", "log", "step", "type"}
NO_SEARCH = ("delta", "methods", "output_dir", "run_name")  # set by the search itself, or via method / <method>.*
MINIMIZE = ("loss", "perplexity")


def _primitive(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


@dataclasses.dataclass(frozen=True)
class Param:
    """One searched (or fixed) value. ``kind``: categorical, int, float or fixed."""

    name: str
    kind: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    value: Any = None

    @property
    def method(self) -> str | None:
        """The method a ``<method>.<field>`` parameter belongs to (None for method / training keys)."""
        head, dot, _ = self.name.partition(".")
        return head if dot and head not in ("train", "data", "model") and self.name != "method" else None

    @property
    def field(self) -> str:
        return self.name.partition(".")[2]

    def labels(self) -> list:
        """What Optuna stores for the choices: the values themselves, or JSON text when one is a list/mapping
        (Optuna keeps only None, bool, int, float and str)."""
        if all(_primitive(c) for c in self.choices):
            return list(self.choices)
        return [json.dumps(c, sort_keys=True) for c in self.choices]

    def label(self, value: Any) -> Any:
        return self.labels()[self._index(value)]

    def _index(self, value: Any) -> int:
        """Position of ``value``, given as a choice itself or as its stored label."""
        for i, (choice, label) in enumerate(zip(self.choices, self.labels(), strict=True)):
            if choice == value or label == value:
                return i
        raise ConfigError(f"search: {value!r} is not one of the choices of {self.name} {list(self.choices)}")

    def suggest(self, trial: Any) -> Any:
        if self.kind == "fixed":
            return self.value
        if self.kind == "categorical":
            return self.choices[self._index(trial.suggest_categorical(self.name, self.labels()))]
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def probes(self) -> list:
        """Values that must all be valid: every choice, or both ends of the range."""
        if self.kind == "fixed":
            return [self.value]
        return list(self.choices) if self.kind == "categorical" else [self._cast(self.low), self._cast(self.high)]

    def _cast(self, value: float) -> Any:
        return int(value) if self.kind == "int" else float(value)


def parse_param(name: str, spec: Any) -> Param:
    """A list is a choice, ``{low, high[, log][, step][, type]}`` a range, ``{choices: [...]}`` a choice,
    anything else a fixed value."""
    where = f"search.space.{name}"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: the list of choices is empty; give at least one value")
        return Param(name, "categorical", tuple(_number(c) for c in spec))
    if isinstance(spec, dict) and set(spec) == {"choices"}:
        return parse_param(name, spec["choices"] if isinstance(spec["choices"], list) else [spec["choices"]])
    if not isinstance(spec, dict):
        return Param(name, "fixed", value=spec)
    unknown = sorted(set(spec) - RANGE_KEYS)
    if unknown or "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: a range is {{low: .., high: .., log: true|false, step: .., type: int|float}} "
                          f"(or {{choices: [...]}}); got keys {sorted(spec)}")
    return _range(name, spec, where)


def _number(value: Any) -> Any:
    """PyYAML reads ``1e-4`` (no dot) as the string "1e-4" (YAML 1.1); take such strings as numbers."""
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value.strip()):
        return int(value) if value.strip().lstrip("+-").isdigit() else float(value)
    return value


def _range(name: str, spec: dict, where: str) -> Param:
    low, high, step = _number(spec["low"]), _number(spec["high"]), _number(spec.get("step"))
    log = spec.get("log", False)
    numbers = [v for v in (low, high, step) if v is not None]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
        raise ConfigError(f"{where}: low, high and step must be finite numbers, got {spec}")
    inferred = "int" if all(isinstance(v, int) for v in numbers) else "float"
    kind = spec.get("type", inferred)
    if kind not in ("int", "float"):
        raise ConfigError(f"{where}.type must be int or float, got {kind!r}")
    if not low < high:
        raise ConfigError(f"{where}: low must be < high, got low={low}, high={high}")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {low}")
    if step is not None and (step <= 0 or log):
        raise ConfigError(f"{where}.step must be > 0 and cannot be combined with log: true, got {step}")
    if kind == "int" and not all(float(v).is_integer() for v in numbers):
        raise ConfigError(f"{where}: an int range needs whole numbers, got {spec}")
    return Param(name, kind, low=low, high=high, log=log, step=step)


@dataclasses.dataclass
class SearchSettings:
    """The parsed ``search:`` section (see the module doc)."""

    params: list[Param]
    base_delta: list[dict[str, Any]]
    metric: str | None = None
    direction: str | None = None
    pruner: str = "median"
    startup_trials: int = 2
    warmup_steps: int = 0
    sampler: str = "tpe"
    seed: int | None = None
    enqueue: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def method_param(self) -> Param | None:
        return next((p for p in self.params if p.name == "method"), None)

    def methods_in_use(self) -> set[str]:
        method = self.method_param
        return set(method.probes()) if method is not None else {d["method"] for d in self.base_delta}

    def sample(self, trial: Any) -> dict[str, Any]:
        """This trial's values (define-by-run: a method's fields are only sampled when it is chosen)."""
        values: dict[str, Any] = {}
        method = self.method_param
        if method is not None:
            values["method"] = method.suggest(trial)
        active = {values["method"]} if method is not None else self.methods_in_use()
        for param in self.params:
            if param.name != "method" and (param.method is None or param.method in active):
                values[param.name] = param.suggest(trial)
        return values

    def overrides(self, values: dict[str, Any]) -> list[tuple[str, Any]]:
        """``load_config`` overrides for one trial: the delta list, then training keys."""
        return [("delta", self.delta_for(values))] + [(k, v) for k, v in values.items()
                                                      if k != "method" and _param_method(k) is None]

    def delta_for(self, values: dict[str, Any]) -> list[dict[str, Any]]:
        chosen = values.get("method")
        if chosen is None:
            entries = [dict(d) for d in self.base_delta]
        else:  # the base config's entry for that method (if any) supplies the fields not searched
            entries = [dict(next((d for d in self.base_delta if d["method"] == chosen), {"method": chosen}))]
        for key, value in values.items():
            method = _param_method(key)
            for entry in entries:
                if method is not None and entry["method"] == method:
                    entry[key.partition(".")[2]] = value
        return entries

    def enqueued_params(self) -> list[dict[str, Any]]:
        """``enqueue`` entries as Optuna stores them (choice labels)."""
        by_name = {p.name: p for p in self.params}
        return [{k: by_name[k].label(v) if by_name[k].kind == "categorical" else v for k, v in entry.items()
                 if by_name[k].kind != "fixed"} for entry in self.enqueue]


def _param_method(name: str) -> str | None:
    return Param(name, "fixed").method


def split_sections(raw: dict[str, Any], *names: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The training config without the auto sections, and those sections by name."""
    base = {k: v for k, v in raw.items() if k not in names}
    if "methods" in base and "delta" not in base:
        base["delta"] = base.pop("methods")
    return base, {n: raw[n] for n in names if n in raw}


def parse_search(section: Any, base: dict[str, Any]) -> SearchSettings:
    """Validate a ``search:`` section against the method registry and the training config schema."""
    if not isinstance(section, dict) or not isinstance(section.get("space"), dict) or not section["space"]:
        raise ConfigError("search: needs a 'space' mapping of parameters, e.g. search: {space: {lora.r: [4, 8, 16], "
                          "train.learning_rate: {low: 1.0e-4, high: 3.0e-3, log: true}}}")
    unknown = sorted(set(section) - OPTIONS)
    if unknown:
        raise ConfigError(f"search: unknown option(s) {unknown}; allowed: {sorted(OPTIONS)} (parameters go under "
                          f"search.space)")
    delta = base.get("delta", DEFAULT_DELTA)
    delta = [delta] if isinstance(delta, dict) else delta
    settings = SearchSettings([parse_param(str(k), v) for k, v in section["space"].items()], [dict(d) for d in delta])
    _options(settings, section)
    for param in settings.params:
        _check_param(param, settings, base)
    _check_enqueue(settings)
    return settings


def _options(settings: SearchSettings, section: dict[str, Any]) -> None:
    s = settings
    s.metric, s.direction = section.get("metric"), section.get("direction")
    s.pruner, s.sampler = section.get("pruner", s.pruner), section.get("sampler", s.sampler)
    s.startup_trials, s.warmup_steps = section.get("startup_trials", 2), section.get("warmup_steps", 0)
    s.seed, s.enqueue = section.get("seed"), section.get("enqueue") or []
    checks = [(s.pruner in PRUNERS, "pruner", f"one of {PRUNERS}"),
              (s.sampler in SAMPLERS, "sampler", f"one of {SAMPLERS}"),
              (s.direction in (None, "maximize", "minimize"), "direction", "maximize or minimize"),
              (isinstance(s.startup_trials, int) and s.startup_trials >= 0, "startup_trials", "an integer >= 0"),
              (isinstance(s.warmup_steps, int) and s.warmup_steps >= 0, "warmup_steps", "an integer >= 0"),
              (s.seed is None or isinstance(s.seed, int), "seed", "an integer"),
              (isinstance(s.enqueue, list) and all(isinstance(e, dict) for e in s.enqueue), "enqueue",
               "a list of {parameter: value} mappings")]
    for ok, key, allowed in checks:
        if not ok:
            raise ConfigError(f"search.{key} must be {allowed}, got {section.get(key)!r}")


def _check_param(param: Param, settings: SearchSettings, base: dict[str, Any]) -> None:
    methods = config_classes(listed_only=True)
    where = f"search.space.{param.name}"
    if param.name == "method":
        bad = [m for m in param.probes() if m not in methods]
        if bad:
            raise ConfigError(f"{where}: unknown method(s) {bad}; known: {sorted(methods)}")
    elif param.method is not None:
        _check_method_field(param, settings, methods, where)
    else:
        _check_training_key(param, base, where)


def _check_method_field(param: Param, settings: SearchSettings, methods: dict, where: str) -> None:
    name = param.method
    if name not in methods:
        close = difflib.get_close_matches(param.name.partition(".")[0], ["train", "data", "model", *methods], n=1)
        raise ConfigError(f"{where}: {name!r} is neither a method nor a config section"
                          + (f"; did you mean {close[0]!r}?" if close else f" (methods: {sorted(methods)})"))
    fields = [f.name for f in dataclasses.fields(methods[name])]
    if param.field not in fields:
        close = difflib.get_close_matches(param.field, fields, n=1)
        hint = f" (did you mean {name}.{close[0]}?)" if close else ""
        raise ConfigError(f"{where}: {name} has no field {param.field!r}{hint}. Fields: {', '.join(fields)}")
    if name not in settings.methods_in_use():
        raise ConfigError(f"{where}: method {name!r} is never used: add it to search.space.method or to delta")
    base = next((d for d in settings.base_delta if d["method"] == name), {"method": name})
    for value in param.probes():
        try:
            config_from_dict({**base, param.field: value}, methods)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{where}: the value {value!r} is not valid: {e}") from None


def _check_training_key(param: Param, base: dict[str, Any], where: str) -> None:
    keys = all_keys()
    leaves = [k for k in keys if not any(o.startswith(k + ".") for o in keys)]
    if param.name.split(".")[0] in NO_SEARCH or param.name not in leaves:
        close = _suggest(param.name, leaves)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{where}: not a searchable key{hint}. Search a training-config key (train.learning_rate, "
                          f"data.max_length, ...), 'method', or '<method>.<field>' (lora.r)")
    for value in param.probes():
        try:
            RunConfig.model_validate(apply_overrides(base, [(param.name, value)]))
        except ValidationError as e:
            raise ConfigError(f"{where}: the value {value!r} is not valid: {format_errors(e, 'config')}") from None


def _suggest(name: str, keys: list[str]) -> list[str]:
    """Close keys: an abbreviation by initials first (train.lr -> train.learning_rate), else difflib's."""
    section, _, leaf = name.rpartition(".")
    initials = [k for k in keys if k.rpartition(".")[0] == section
                and "".join(w[:1] for w in k.rpartition(".")[2].split("_")) == leaf]
    return initials[:1] or difflib.get_close_matches(name, keys, n=1)


def _check_enqueue(settings: SearchSettings) -> None:
    names = {p.name: p for p in settings.params}
    for i, entry in enumerate(settings.enqueue):
        unknown = sorted(set(entry) - set(names))
        if unknown:
            raise ConfigError(f"search.enqueue[{i}]: {unknown} are not parameters of search.space")
        for key, value in entry.items():
            param = names[key]
            if param.kind == "categorical":
                param.label(value)  # raises when not a choice
            elif param.kind in ("int", "float") and not (isinstance(value, int | float) and
                                                         param.low <= value <= param.high):
                raise ConfigError(f"search.enqueue[{i}].{key}: {value!r} is outside [{param.low}, {param.high}]")
