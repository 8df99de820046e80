"""Reports of races and searches: report.md with tables, PNG plots (matplotlib, no display needed), and the
winner as a ready-to-run config. Every file is written atomically (several search workers may finish at
the same time and each rewrites the report from the shared study)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..core.checkpoint import atomic_directory
from ..train.loop import MetricsLog


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _pyplot():
    # matplotlib is imported on first plot (slow to import; the Agg backend must be chosen before pyplot)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=100)
    _pyplot().close(fig)
    os.replace(tmp, path)
    return path


def write_best_config(source: Path, target: Path, run_name: str) -> None:
    """The winning run's resolved config, with a fresh output directory: ``deltatune train target``."""
    data = yaml.safe_load(source.read_text())
    data["run_name"], data["output_dir"] = run_name, str(Path("runs") / run_name)
    header = f"# the best configuration found by deltatune ({source.parent}); train it with: deltatune train {target}\n"
    _write(target, header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100))


def publish_best(run_dir: Path, out: Path) -> None:
    """best_config.yaml (the winner's resolved config, ready for ``deltatune train``) and best_delta/ (its best
    checkpoint, else its last)."""
    write_best_config(run_dir / "config.yaml", out / "best_config.yaml", out.name + "-best")
    source = run_dir / "best" if (run_dir / "best").exists() else run_dir / "last"
    with atomic_directory(out / "best_delta") as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


@contextlib.contextmanager
def results_lock(out: Path):
    """One writer of the results at a time (search workers on one machine finishing together)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".results.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pareto_front(points: Sequence[tuple[float, float]], maximize: bool) -> list[int]:
    """Indices of the points (size, metric) that no other point beats on both: no smaller-or-equal size
    with a better metric. Sorted by size."""
    sign = 1.0 if maximize else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if sign * points[i][1] > best:
            front.append(i)
            best = sign * points[i][1]
    return front


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# -- search -------------------------------------------------------------------------------------------------

def plot_history(rows: list[dict[str, Any]], path: Path, metric: str, maximize: bool) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for state, style in (("COMPLETE", "o"), ("PRUNED", "x")):
        shown = [r for r in rows if r["state"] == state and r["value"] is not None]
        ax.plot([r["number"] for r in shown], [r["value"] for r in shown], style, label=state.lower())
    done = sorted((r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None), key=lambda r: r["number"])
    best, xs, ys = None, [], []
    for r in done:
        best = r["value"] if best is None else (max if maximize else min)(best, r["value"])
        xs.append(r["number"])
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", label="best so far")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_xlabel("trial")
    ax.set_ylabel(metric + " (pruned: last evaluation)")
    ax.set_title("optimization history")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_importances(importances: dict[str, float], path: Path) -> Path:
    plt = _pyplot()
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5))
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel("importance (fANOVA, share of variance)")
    ax.set_title("parameter importances")
    return _save(fig, path)


def plot_pareto(rows: list[dict[str, Any]], path: Path, metric: str, maximize: bool) -> Path:
    plt = _pyplot()
    done = [r for r in rows if r["state"] == "COMPLETE" and r.get("trainable_params") and r["value"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    points = [(r["trainable_params"], r["value"]) for r in done]
    ax.plot([p[0] for p in points], [p[1] for p in points], "o", alpha=0.5, label="trial")
    front = [points[i] for i in pareto_front(points, maximize)]
    ax.plot([p[0] for p in front], [p[1] for p in front], "o-", color="C3", label="Pareto front")
    for i in pareto_front(points, maximize):
        ax.annotate(str(done[i]["number"]), points[i], textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def write_search_report(out: Path, summary: dict[str, Any], rows: list[dict[str, Any]],
                        importances: dict[str, float] | None, note: str | None) -> Path:
    metric, maximize = summary["metric"], summary["direction"] == "maximize"
    images = [plot_history(rows, out / "history.png", metric, maximize)]
    if importances:
        images.append(plot_importances(importances, out / "importance.png"))
    if any(r["state"] == "COMPLETE" and r.get("trainable_params") for r in rows):
        images.append(plot_pareto(rows, out / "pareto.png", metric, maximize))
    best = summary.get("best")
    parts = [f"# deltatune search: {summary['study']}", "",
             f"{summary['counts']} trials ({summary['metric']}, {summary['direction']}); "
             f"storage `{summary['storage']}`", ""]
    if best:
        parts += [f"**Best: trial {best['number']}**, {metric} {best['value']:.4f}, {_fmt(best['trainable_params'])} "
                  f"trainable parameters, `{best['methods']}`. Config: `best_config.yaml`, delta: `best_delta/`.", ""]
    parts += ["| trial | state | " + metric + " | trainable params | steps | parameters |", "|---|---|---|---|---|---|"]
    parts += [f"| {r['number']} | {r['state'].lower()} | {_fmt(r['value'])} | {_fmt(r.get('trainable_params'))} | "
              f"{_fmt(r.get('steps'))} | {json.dumps(r['params'])} |" for r in rows]
    if importances:
        parts += ["", "## Parameter importances (fANOVA)", ""]
        parts += [f"- {k}: {v:.3f}" for k, v in importances.items()]
    if note:
        parts += ["", note]
    parts += [""] + [f"![{p.stem}]({p.name})" for p in images]
    _write(out / "report.md", "\n".join(parts) + "\n")
    _write(out / "search.json", json.dumps({**summary, "trials": rows, "importances": importances}, indent=2) + "\n")
    return out / "report.md"


# -- race ---------------------------------------------------------------------------------------------------

def plot_race(result: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    key = f"eval_{result['metric']}"
    for name, entry in result["candidates"].items():
        evals = [r for r in MetricsLog.read(Path(entry["run_dir"]) / "metrics.jsonl") if r.get("type") == "eval"]
        if evals:
            ax.plot([r["step"] for r in evals], [r.get(key) for r in evals], "o-", label=name)
    for rung in result["rungs"][:-1]:
        ax.axvline(rung["steps"], color="grey", alpha=0.3, linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel(result["metric"])
    ax.set_title("race (dashed: end of a rung)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def write_race_report(out: Path, result: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    image = plot_race(result, out / "race.png")
    metric = result["metric"]
    rungs = result["rungs"]
    parts = [f"# deltatune race: {out.name}", "",
             f"Successive halving on {metric} ({result['direction']}), rungs at steps "
             f"{', '.join(str(r['steps']) for r in rungs)}.", ""]
    if result["winner"]:
        parts += [f"**Winner: {result['winner']}**. Config: `best_config.yaml`, delta: `best_delta/`.", ""]
    head = " | ".join(f"{metric} @ {r['steps']}" for r in rungs)
    parts += [f"| candidate | trainable params | {head} | best {metric} | result |",
              "|---" * (len(rungs) + 4) + "|"]
    for name, e in result["candidates"].items():
        scores = [_fmt(s) for s in e["scores"]] + ["-"] * (len(rungs) - len(e["scores"]))
        outcome = e["error"] or ("winner" if name == result["winner"] else f"out after rung {e['out_at_rung']}")
        parts.append(f"| {name} | {_fmt(e['trainable_params'])} | {' | '.join(scores)} | {_fmt(e['best_metric'])} | "
                     f"{' '.join(str(outcome).split())} |")
    parts += ["", f"![race]({image.name})"]
    _write(out / "race.json", json.dumps(result, indent=2) + "\n")
    _write(out / "report.md", "\n".join(parts) + "\n")
    return out / "report.md"


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator  # see _pyplot

    return MaxNLocator(integer=True)
