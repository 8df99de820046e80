"""Method racing: train several candidate deltas on the same data, keep the best by successive halving.

Successive halving (Jamieson & Talwalkar, 2016, arXiv:1502.07943; Li et al., 2017 Hyperband): every
candidate trains to a small step budget, the best 1/eta by the validation metric go on to eta times more
steps, and so on until one is left, which trains to the full budget. With 4 candidates and eta 2 that is
2x the cost of one full run instead of 4x. Candidates continue where they stopped (their loops stay in
memory), so a survivor's run is exactly the run it would have been alone.

    race:
      candidates:                       # name -> a method mapping or a list of them (a combination)
        lora-r8: {method: lora, r: 8}
        houlsby: {method: adapter, kind: houlsby, bottleneck: 32}
        prefix: {method: prefix, num_tokens: 10}
        bitfit: {method: bitfit}
      eta: 2                            # keep 1/eta per rung
      metric: accuracy                  # default: train.metric

Without a ``race:`` section the four candidates above race (with their method's default sizes).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from ..core.config import config_from_dict
from ..core.errors import ConfigError, DeltaError
from ..methods import config_classes
from ..train.config import read_yaml
from ..train.loop import MetricsLog, TrainingDivergedError
from .report import publish_best, write_race_report
from .runs import DataCache, config_with, finish_run, maximize, metric_key, require_evaluation, start_run, total_steps
from .space import split_sections

log = logging.getLogger(__name__)
DEFAULT_CANDIDATES: dict[str, list[dict[str, Any]]] = {
    "lora-r8": [{"method": "lora", "r": 8}], "houlsby": [{"method": "adapter", "kind": "houlsby"}],
    "prefix": [{"method": "prefix"}], "bitfit": [{"method": "bitfit"}],
}


# -- the schedule (pure) ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rung:
    steps: int   # every candidate still in the race has trained this many steps at the end of the rung
    alive: int   # candidates training in this rung
    keep: int    # how many of them go on to the next rung


def halving_plan(n: int, max_steps: int, eta: int = 2) -> list[Rung]:
    """Rungs for ``n`` candidates: alive n, ceil(n/eta), ... 1; steps grow by eta and end at the full budget
    (rounded down to a multiple of the first rung, so that every rung ends on an evaluation)."""
    if n < 1:
        raise ConfigError("race: there are no candidates to race")
    if not isinstance(eta, int) or eta < 2:
        raise ConfigError(f"race.eta must be an integer >= 2, got {eta!r}")
    alive = [n]
    while alive[-1] > 1:
        alive.append(math.ceil(alive[-1] / eta))
    first = max_steps // eta ** (len(alive) - 1)
    if first < 1:
        raise ConfigError(f"race: {max_steps} training steps are too few for {n} candidates with eta {eta} "
                          f"({len(alive)} rungs need at least {eta ** (len(alive) - 1)} steps); raise "
                          f"train.max_steps or train.epochs")
    return [Rung(first * eta ** k, a, alive[k + 1] if k + 1 < len(alive) else 1) for k, a in enumerate(alive)]


def select(scores: dict[str, float | None], keep: int, maximize: bool) -> list[str]:
    """The ``keep`` best names (failed runs, None or NaN, last; ties go to the earlier candidate)."""
    order = list(scores)

    def key(name: str) -> tuple:
        value = scores[name]
        bad = value is None or math.isnan(value)
        return (bad, 0.0 if bad else (-value if maximize else value), order.index(name))

    return sorted(order, key=key)[:keep]


def parse_candidates(section: Any) -> dict[str, list[dict[str, Any]]]:
    """``race.candidates`` (a mapping name -> delta, or a list of deltas), each checked as a method config."""
    if section is None:
        return {k: [dict(d) for d in v] for k, v in DEFAULT_CANDIDATES.items()}
    if isinstance(section, list):
        section = {_name(entry, i): entry for i, entry in enumerate(section)}
    if not isinstance(section, dict) or not section:
        raise ConfigError("race.candidates must be a non-empty mapping of name -> method config (or a list)")
    out = {}
    for name, delta in section.items():
        entries = [delta] if isinstance(delta, dict) else delta
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries) or not entries:
            raise ConfigError(f"race.candidates.{name} must be a method mapping ({{method: lora, r: 8}}) or a list")
        for entry in entries:
            try:
                config_from_dict(entry, config_classes(listed_only=True))
            except (ConfigError, TypeError) as e:
                raise ConfigError(f"race.candidates.{name}: {e}") from None
        out[str(name)] = [dict(e) for e in entries]
    return out


def _name(entry: Any, i: int) -> str:
    entries = entry if isinstance(entry, list) else [entry]
    return "+".join(str(e.get("method", "?")) for e in entries if isinstance(e, dict)) + f"-{i}"


def parse_race(section: Any) -> tuple[dict[str, list[dict[str, Any]]], int, str | None]:
    section = section or {}
    if not isinstance(section, dict):
        raise ConfigError(f"race: must be a mapping (candidates, eta, metric), got {type(section).__name__}")
    unknown = sorted(set(section) - {"candidates", "eta", "metric"})
    if unknown:
        raise ConfigError(f"race: unknown option(s) {unknown}; allowed: candidates, eta, metric")
    return parse_candidates(section.get("candidates")), section.get("eta", 2), section.get("metric")


# -- the race -----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Entry:
    """One candidate's record in the race."""

    delta: list[dict[str, Any]]
    run_dir: str
    trainable_params: int | None = None
    scores: list[float | None] = dataclasses.field(default_factory=list)  # at the end of each rung it ran
    steps: int = 0
    best_metric: float | None = None
    out_at_rung: int | None = None       # None: the winner (or still running)
    error: str | None = None


def run_race(config: str | Path, output_dir: str | Path | None = None,
             overrides: list[tuple[str, Any]] | None = None, eta: int | None = None) -> dict[str, Any]:
    """Race the candidates of ``config``'s ``race:`` section; writes race.json, report.md, race.png,
    best_config.yaml and best_delta/ into the output directory. Returns race.json's content."""
    base, sections = split_sections(read_yaml(config), "race", "search")
    candidates, eta_cfg, metric = parse_race(sections.get("race"))
    out = Path(output_dir or Path("races") / Path(config).stem)
    overrides = list(overrides or [])
    probe = config_with(base, overrides + [("output_dir", str(out / "candidates"))])
    require_evaluation(probe, "race")
    metric = metric_key(probe, metric)
    data = DataCache()
    plan = halving_plan(len(candidates), total_steps(probe, data.get(probe)[1]), eta or eta_cfg)
    log.info("race of %d candidates on %s: rungs at steps %s", len(candidates), metric, [r.steps for r in plan])
    race = _Race(base, overrides, out, data, plan, metric, maximize(metric))
    race.start(candidates)
    race.run()
    result = race.result()
    write_race_report(out, result)
    return result


class _Race:
    def __init__(self, base, overrides, out: Path, data, plan: list[Rung], metric: str, higher: bool) -> None:
        self.base, self.overrides, self.out, self.data = base, overrides, out, data
        self.plan, self.metric, self.higher = plan, metric, higher
        self.entries: dict[str, Entry] = {}
        self.loops: dict[str, Any] = {}

    def start(self, candidates: dict[str, list[dict[str, Any]]]) -> None:
        for name, delta in candidates.items():
            run_dir = self.out / "candidates" / name
            self.entries[name] = entry = Entry(delta, str(run_dir))
            cfg = config_with(self.base, self.overrides + [
                ("delta", delta), ("output_dir", str(run_dir)), ("run_name", name),
                ("train.max_steps", self.plan[-1].steps), ("train.eval_every", self.plan[0].steps),
                ("train.metric", self.metric)])
            try:
                self.loops[name] = start_run(cfg, self.data)
            except DeltaError as e:  # e.g. a bottleneck wider than this model: out of the race, reported
                entry.error, entry.out_at_rung = str(e), 0
                log.warning("race: candidate %s cannot run: %s", name, e)
                continue
            entry.trainable_params = self.loops[name].s.delta.num_trainable()

    def run(self) -> None:
        alive = list(self.loops)
        for k, rung in enumerate(self.plan):
            scores = {name: self._train(name, rung.steps) for name in alive}
            last = k + 1 == len(self.plan)
            kept = [] if last else [n for n in select(scores, rung.keep, self.higher) if self.entries[n].error is None]
            log.info("race rung %d (%d steps): %s; %s", k, rung.steps, _fmt(scores),
                     "done" if last else f"kept {kept}")
            for name in alive:
                if name not in kept:
                    self._retire(name, None if last and self.entries[name].error is None else k)
            alive = kept

    def _train(self, name: str, steps: int) -> float | None:
        """Train one candidate up to ``steps``; its metric there (None when it diverged)."""
        loop, entry = self.loops[name], self.entries[name]
        try:
            loop.run_until(steps)
            score = self._last_eval(loop)
        except TrainingDivergedError as e:
            entry.error, score = str(e), None
        entry.scores.append(score)
        entry.steps = loop.progress.step
        return score

    def _last_eval(self, loop) -> float | None:
        evals = [r for r in MetricsLog.read(loop.s.run_dir / "metrics.jsonl") if r.get("type") == "eval"]
        return evals[-1].get(f"eval_{self.metric}") if evals else None

    def _retire(self, name: str, rung: int | None) -> None:
        """Write the candidate's summary and report and free its model."""
        loop, entry = self.loops.pop(name), self.entries[name]
        entry.out_at_rung = rung
        entry.best_metric = finish_run(loop).get("best_metric")

    def result(self) -> dict[str, Any]:
        finished = [n for n, e in self.entries.items() if e.out_at_rung is None and e.error is None]
        winner = finished[0] if finished else None
        if winner is not None:
            publish_best(Path(self.entries[winner].run_dir), self.out)
        return {"metric": self.metric, "direction": "maximize" if self.higher else "minimize",
                "rungs": [dataclasses.asdict(r) for r in self.plan], "winner": winner,
                "candidates": {n: dataclasses.asdict(e) for n, e in self.entries.items()}}


def _fmt(scores: dict[str, float | None]) -> str:
    return ", ".join(f"{n} {'failed' if v is None else f'{v:.4f}'}" for n, v in scores.items())
