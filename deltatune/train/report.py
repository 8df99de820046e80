"""The run report: loss and eval-metric plots (PNG, matplotlib) and ``report.md`` with a summary table.

Built only from files in the run directory (``metrics.jsonl``, ``summary.json``), so ``deltatune report
RUN_DIR`` can rebuild it at any time, also for a run that was interrupted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import CheckpointNotFoundError
from .loop import MetricsLog

METRICS_FILE = "metrics.jsonl"


def _read(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    if not (run_dir / METRICS_FILE).exists():
        raise CheckpointNotFoundError(f"{run_dir} has no {METRICS_FILE}; pass the directory of a training run "
                                      f"(e.g. runs/default)")
    records = MetricsLog.read(run_dir / METRICS_FILE)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return records, summary


def _finish(fig, ax, path: Path) -> Path:
    """Common axis labels, legend and grid; write the figure as PNG and free it."""
    import matplotlib.pyplot as plt  # already loaded by plot(); imported lazily to keep start-up fast

    ax.set_xlabel("step")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot(records: list[dict[str, Any]], run_dir: Path) -> list[Path]:
    """loss.png (training and eval loss by step) and eval.png (every other eval metric by step)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_ylabel("loss")
    written.append(_finish(fig, ax, run_dir / "loss.png"))
    names = sorted({k for r in evals for k in r if k.startswith("eval_") and k != "eval_loss"})
    if names:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in names:
            ax.plot([r["step"] for r in evals], [r[name] for r in evals], "o-", label=name[5:])
        written.append(_finish(fig, ax, run_dir / "eval.png"))
    return written


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def table(summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    evals = [r for r in records if r.get("type") == "eval"]
    metric = summary.get("metric")
    best = summary.get("best_metric")
    rows = [
        ("method", summary.get("methods", "-")),
        ("model", summary.get("model", "-")),
        ("trainable params", f"{summary['trainable_params']:,} ({summary['trainable_percent']:.3f}%)"
         if "trainable_params" in summary else "-"),
        ("checkpoint size", _size(summary.get("checkpoint_bytes"))),
        ("time", f"{summary['train_time_s']:.1f} s" if "train_time_s" in summary else "-"),
        ("steps", summary.get("steps", max((r.get("step", 0) for r in records), default=0))),
        (f"best {metric}" if metric else "best metric",
         f"{best:.4f} (step {summary.get('best_step')})" if best is not None else "-"),
        ("evaluations", len(evals)),
    ]
    lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def samples_section(records: list[dict[str, Any]]) -> list[str]:
    """The generation samples of the first and the last evaluation (language models), as markdown lines."""
    kept = [r for r in records if r.get("type") == "samples"]
    if not kept:
        return []
    lines = ["## Generation samples", ""]
    for record in kept[:1] + kept[1:][-1:]:
        lines += [f"Step {record['step']}:", ""]
        for sample in record["samples"]:
            completion = sample["completion"].strip().replace("\n", " ") or "(nothing)"
            lines.append(f"- **{sample['prompt']}** {completion}")
        lines.append("")
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Write the plots and ``report.md`` into ``run_dir``; returns the report's path."""
    run_dir = Path(run_dir)
    records, summary = _read(run_dir)
    images = plot(records, run_dir)
    errors = [r["message"] for r in records if r.get("type") == "error"]
    evals = [r for r in records if r.get("type") == "eval"]
    parts = [f"# deltatune run: {run_dir.name}", "", table(summary, records), ""]
    if not summary:
        parts += ["The run has not finished (no summary.json): the numbers above are from metrics.jsonl so far.", ""]
    if errors:
        parts += ["## Stopped", "", errors[-1], ""]
    if evals:
        keys = [k for k in evals[-1] if k.startswith("eval_")]
        parts += ["## Evaluations", "", "| step | " + " | ".join(k[5:] for k in keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]
        parts += [f"| {r['step']} | " + " | ".join(f"{r.get(k, float('nan')):.4f}" for k in keys) + " |"
                  for r in evals]
        parts.append("")
    parts += samples_section(records)
    parts += [f"![{p.stem}]({p.name})" for p in images]
    path = run_dir / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path
