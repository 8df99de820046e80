"""Learned routing on real data (issue 24): three task deltas, a router, and a single LoRA on the union.

    python bench/router.py all --examples 2000            # train (resumable), route, measure; prints the tables

1. One LoRA (deltatune's defaults) per task on the offline MiniLM: SST-2, MRPC, CoLA from ../shared/data, the
   first ``--examples`` training rows, 1 epoch, batch 16, one CPU thread; metric on the first 1000 rows of the
   dev/test file (accuracy for SST-2, F1 for MRPC, MCC for CoLA, as bench/quality.py).
2. A router over the three best deltas (``deltatune train`` on a ``router:`` config), then ``deltatune eval``
   on it: each task's evaluation set routed (the router picks a delta per sample, in batches that mix the
   three tasks, the task not given) vs oracle (each task with its own delta), and router accuracy.
3. The cost of routing at inference: a mixed batch through the router (hard: all three deltas on, masked per
   sample) vs the same batch through one delta, in paired rounds (alternating order), median ratio.
4. The baseline that needs no routing: one LoRA trained on the union of the three training sets (the same
   examples, tokenised by each task's config, one shared 2-way head), the same total steps, scored per task.
Results go to bench/results/router.json; runs to bench-out/router/ (re-running skips finished runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("DELTATUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))  # env: from a worktree
RESULTS = ROOT / "bench" / "results" / "router.json"
TASKS = {"sst2": ("sst2/train.tsv", "sst2/dev.tsv", "accuracy"), "mrpc": ("mrpc/train.tsv", "mrpc/test.tsv", "f1"),
         "cola": ("cola/train.tsv", "cola/dev.tsv", "mcc")}


def task_config(task: str, examples: int, out: Path, eval_examples: int = 1000) -> dict[str, Any]:
    train_file, eval_file, metric = TASKS[task]
    return {"data": {"train": str(DATA / train_file), "validation": str(DATA / eval_file),
                     "max_train_samples": examples, "max_eval_samples": eval_examples},
            "delta": [{"method": "lora"}], "seed": 0, "output_dir": str(out / task),
            "train": {"epochs": 1, "batch_size": 16, "num_threads": 1, "save_every": 10**9, "progress": "never",
                      "metric": metric}}


def train_tasks(examples: int, out: Path, eval_examples: int) -> dict[str, dict[str, Any]]:
    """One LoRA per task through ``deltatune train``'s code path; a finished run is read back, not redone."""
    from deltatune.train.config import load_config
    from deltatune.train.jobs import train

    summaries = {}
    for task in TASKS:
        done = out / task / "summary.json"
        if not done.exists():
            cfg = load_config(None, list(_flat(task_config(task, examples, out, eval_examples)).items()))
            train(cfg, overwrite=True)
        summaries[task] = json.loads(done.read_text())
    return summaries


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def route(out: Path, samples: int, hidden: int | None, features: str = "embeddings", epochs: int = 100,
          learning_rate: float = 0.01) -> tuple[dict[str, Any], dict[str, Any]]:
    """The router job and its evaluation, as ``deltatune train router.yaml`` / ``deltatune eval`` run them."""
    from deltatune.train.router_job import RouterRunConfig, evaluate_router_run, train_router

    cfg = RouterRunConfig.model_validate({
        "router": {"runs": {t: str(out / t) for t in TASKS}, "samples_per_run": samples, "mode": "hard",
                   "hidden": hidden, "features": features, "epochs": epochs, "learning_rate": learning_rate},
        "train": {"num_threads": 1}, "output_dir": str(router_dir(out, features)), "run_name": "router"})
    summary = train_router(cfg, overwrite=True)
    return summary, evaluate_router_run(router_dir(out, features))


def router_dir(out: Path, features: str) -> Path:
    """One router run per feature kind, so that latency can time either."""
    return out / ("router" if features == "embeddings" else f"router_{features}")


def latency(out: Path, rounds: int, batch_size: int, features: str = "embeddings", threads: int = 1
            ) -> dict[str, Any]:
    """Seconds per forward of one mixed batch, paired rounds (each round times every variant, order rotating):
    the router on (it reads its features and routes), dt.route with the routes given, and the peers: the same
    model with only one delta on (``dt.active``), and a second copy of the base model with that one LoRA
    attached and nothing else (the "one delta" of issue 24)."""
    import deltatune as dt
    from deltatune.train.models import load_model, load_tokenizer
    from deltatune.train.router_job import _forward_kwargs, batches_of, check_runs, load_router_config, task_data

    torch.set_num_threads(threads)
    run = router_dir(out, features)
    cfg = load_router_config(run / "config.yaml")
    configs = check_runs(cfg)
    first = next(iter(configs.values()))
    tokenizer = load_tokenizer(first.model)
    model, _ = load_model(first, first.data.labels, tokenizer.pad_token_id)
    model.eval()
    dt.load_all(model, run / "deltas")
    router = dt.load_router(model, run / "router", enable=False)
    alone, _ = load_model(first, first.data.labels, tokenizer.pad_token_id)
    alone.eval()
    dt.load(alone, run / "deltas" / "sst2", name="sst2")
    _, sets = task_data(configs, tokenizer, None)
    batch = _forward_kwargs(model, batches_of(sets, batch_size, tokenizer.pad_token_id, seed=1)[0])

    def timed(target, context) -> float:
        with context, torch.no_grad():
            start = time.perf_counter()
            target(**batch)
            return time.perf_counter() - start

    names = router.predict(**batch)
    variants = {"routed": (model, lambda: router), "known_routes": (model, lambda: dt.route(model, names)),
                "single": (model, lambda: dt.active(model, "sst2")),
                "one_attached": (alone, contextlib.nullcontext)}
    for target, make in variants.values():
        timed(target, make())  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    loads = []
    for i in range(rounds):  # paired: every round times all of them, in a rotating order
        order = list(variants)[i % len(variants):] + list(variants)[:i % len(variants)]
        for name in order:
            target, make = variants[name]
            times[name].append(timed(target, make()))
        loads.append(os.getloadavg()[0])

    def ratios(a: str, b: str) -> list[float]:
        return sorted(x / y for x, y in zip(times[a], times[b], strict=True))

    result = {"threads": threads, "batch_size": batch_size, "padded_length": int(batch["input_ids"].shape[1]),
              "tokens": int(batch["attention_mask"].sum()), "rounds": rounds, "features": router.features,
              "load_average": [min(loads), statistics.median(loads), max(loads)],
              **{f"{name}_ms_median": 1000 * statistics.median(t) for name, t in times.items()}}
    for a, b in (("routed", "single"), ("routed", "one_attached"), ("known_routes", "single"),
                 ("single", "one_attached")):
        found = ratios(a, b)
        result[f"{a}_over_{b}"] = {"median": statistics.median(found), "p10": found[len(found) // 10],
                                   "p90": found[(9 * len(found)) // 10]}
    return result


def union_baseline(examples: int, out: Path, eval_examples: int) -> dict[str, Any]:
    """One LoRA on the three training sets together (each tokenised by its task's config), scored per task."""
    from deltatune.train import distributed
    from deltatune.train.config import load_config
    from deltatune.train.data import load_split
    from deltatune.train.jobs import build_model, init_run_dir
    from deltatune.train.loop import Loop, Session, evaluate
    from deltatune.train.models import load_tokenizer

    configs = {t: load_config(None, list(_flat(task_config(t, examples, out, eval_examples)).items()))
               for t in TASKS}
    cfg = configs["sst2"].model_copy(deep=True)
    cfg.output_dir, cfg.data.validation, cfg.data.labels = str(out / "union"), None, ["0", "1"]
    info = distributed.setup("cpu")
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(cfg.model)
    parts = {t: load_split(c, tokenizer, "train", ["0", "1"]) for t, c in configs.items()}
    union = concatenate(list(parts.values()))
    init_run_dir(Path(cfg.output_dir), cfg, resume=False, overwrite=True)
    model, delta = build_model(cfg, ["0", "1"], tokenizer.pad_token_id, info.device)
    loop = Loop(Session(cfg, model, delta, union, None, tokenizer.pad_token_id, Path(cfg.output_dir), info))
    loop.start(False)
    start = time.perf_counter()
    progress = loop.run()
    seconds = time.perf_counter() - start
    scores, accuracy = {}, {}
    for task, c in configs.items():
        found = evaluate(model, load_split(c, tokenizer, "validation", ["0", "1"]), tokenizer.pad_token_id, 64, info)
        scores[task], accuracy[task] = found[f"eval_{TASKS[task][2]}"], found["eval_accuracy"]
    return {"steps": progress.step, "train_s": round(seconds, 1), "examples": len(union), "scores": scores,
            "accuracy": accuracy}


def concatenate(parts: list) -> Any:
    from deltatune.train.batches import Encoded

    offsets = [parts[0].offsets]
    for part in parts[1:]:
        offsets.append(part.offsets[1:] + offsets[-1][-1])
    types = [p.token_type_ids if p.token_type_ids is not None else torch.zeros_like(p.input_ids) for p in parts]
    return Encoded(torch.cat([p.input_ids for p in parts]), torch.cat(offsets), torch.cat([p.labels for p in parts]),
                   torch.cat(types), parts[0].label_names)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(results: dict[str, Any]) -> str:
    union = results.get("union") or {}
    lines = ["| task | metric | oracle (own delta) | routed (hard) | routed - oracle | accuracy: oracle / routed | "
             "router accuracy | same prediction | union LoRA | union accuracy |", "|---|---|" + "---:|" * 8]
    for row in results["eval"]["tasks"]:
        task, both = row["task"], row.get("all_metrics", {})
        accuracy = " / ".join(f"{both[k]['accuracy']:.4f}" for k in ("oracle", "routed")) if both else "-"
        lines.append(f"| {task} | {row['metric']} | {row['oracle']:.4f} | {row['routed']:.4f} | "
                     f"{row['routed'] - row['oracle']:+.4f} | {accuracy} | {row['router_accuracy']:.4f} | "
                     f"{row['same_prediction']:.4f} | {_cell(union.get('scores', {}).get(task))} | "
                     f"{_cell(union.get('accuracy', {}).get(task))} |")
    for key in sorted(k for k in results if k.startswith("latency")):
        lines += latency_lines(results[key])
    return "\n".join(lines)


def latency_lines(lat: dict[str, Any]) -> list[str]:
    lines = []
    if "routed_over_single" in lat:
        lines.append(f"\nrouting cost ({lat['features']} features, {lat.get('threads', '?')} threads), batch of "
                     f"{lat['batch_size']} mixed examples padded to {lat['padded_length']} ({lat['tokens']} tokens), "
                     f"{lat['rounds']} paired rounds, load "
                     f"{lat['load_average']}: routed {lat['routed_ms_median']:.1f} ms, one delta on "
                     f"{lat['single_ms_median']:.1f} ms, one LoRA attached {lat['one_attached_ms_median']:.1f} ms")
        for key in ("routed_over_single", "routed_over_one_attached", "known_routes_over_single",
                    "single_over_one_attached"):
            r = lat[key]
            lines.append(f"- {key}: median {r['median']:.3f} (p10 {r['p10']:.3f}, p90 {r['p90']:.3f})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["all", "tasks", "route", "latency", "union", "table"])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "router")
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--samples-per-run", type=int, default=1000, help="router.samples_per_run")
    parser.add_argument("--hidden", type=int, default=None, help="router.hidden")
    parser.add_argument("--features", default="embeddings", help="router.features: embeddings, hidden or tokens")
    parser.add_argument("--epochs", type=int, default=100, help="router.epochs")
    parser.add_argument("--learning-rate", type=float, default=0.01, help="router.learning_rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the latency step")
    parser.add_argument("--latency-key", default="", help="suffix of the latency entry in the results (_2threads)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    steps = {
        "tasks": lambda: {"tasks": {t: {k: s[k] for k in ("best_metric", "steps", "train_time_s", "methods")}
                                    for t, s in train_tasks(args.examples, args.out, args.eval_examples).items()}},
        "route": lambda: dict(zip(("router", "eval"),
                                  route(args.out, args.samples_per_run, args.hidden, args.features, args.epochs,
                                        args.learning_rate), strict=True)),
        "latency": lambda: {f"latency{args.latency_key}": latency(args.out, args.rounds, args.batch_size,
                                                                   args.features, args.threads)},
        "union": lambda: {"union": union_baseline(args.examples, args.out, args.eval_examples)},
    }
    for name, step in steps.items():
        if args.step in ("all", name):
            results.update(step(), examples=args.examples, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           machine=f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}, 1 thread")
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=2) + "\n")  # after each step: a failure keeps the rest
    print(table(results))


if __name__ == "__main__":
    main()
