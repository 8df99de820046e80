"""The ``deltatune`` command line: a thin layer over ``deltatune.train.jobs`` (parse, call, print).

Adding a command is one decorated function that calls a library function inside ``_guard`` (which turns
user errors into a one-paragraph message on stderr and a non-zero exit; ``--debug`` shows the traceback).
Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer

app = typer.Typer(name="deltatune", help="Delta tuning (parameter-efficient fine-tuning) of transformers models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)

Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks and debug logs.")]
Checkpoint = Annotated[str | None, typer.Option(
    "--checkpoint", "-c", help="best, last, or a checkpoint directory (default: best of the run, else last).")]
ModelPath = Annotated[str | None, typer.Option("--model", "-m", help="Base model directory or hub name "
                                               "(default: the run's model.path).")]
Task = Annotated[str | None, typer.Option("--task", help="classification, causal_lm or instruction "
                                          "(default: the run's task, or guessed from the model).")]
OVERRIDES = {"ignore_unknown_options": True, "allow_extra_args": True}
ArgsAndOverrides = Annotated[list[str] | None, typer.Argument(
    metavar="[CONFIG.yaml] [--KEY VALUE]...", show_default=False,
    help="A YAML config (none: the embedded default job), then overrides such as --train.max_steps 20.")]


def _setup_logging(debug: bool) -> None:
    """Library code logs; here its INFO lines go to stderr (rank 0 only under torchrun)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("deltatune")
    logger.handlers[:] = [handler]
    quiet = os.environ.get("RANK", "0") != "0"
    logger.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def _fail(message: str, code: int) -> None:
    typer.echo(" ".join(message.split()), err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _guard(debug: bool):
    """User errors -> one paragraph on stderr and exit 2 (1 for unexpected ones); --debug re-raises."""
    from .core.errors import DeltaError

    _setup_logging(debug)
    try:
        yield
    except (click.exceptions.Exit, click.exceptions.ClickException):
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        _fail("interrupted. A training run continues from its last state with the same command plus --resume.", 130)
    except DeltaError as e:
        if debug:
            raise
        _fail(f"error: {e}", 2)
    except OSError as e:
        if debug:
            raise
        _fail(f"error: {e.strerror or e}: {e.filename or ''}. Check that the path exists, is writable, and that "
              f"the disk has space.", 2)
    except Exception as e:  # a bug, not a user error: still no wall of text unless asked for
        if debug:
            raise
        _fail(f"internal error ({type(e).__name__}: {e}). Run the same command with --debug for the traceback "
              f"and please report it.", 1)


def _split_config(args: list[str] | None) -> tuple[str | None, list[str]]:
    args = list(args or [])
    if args and not args[0].startswith("-"):
        return args[0], args[1:]
    return None, args


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


@app.command(context_settings=OVERRIDES)
def train(args: ArgsAndOverrides = None,
          resume: Annotated[bool, typer.Option("--resume", help="Continue the run in output_dir from its last "
                                                                "training state (also after kill -9).")] = False,
          overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again in an output_dir that "
                                                                      "already holds a run (deletes its "
                                                                      "checkpoints).")] = False,
          print_config: Annotated[bool, typer.Option("--print-config", help="Print the fully resolved config "
                                                                            "and exit.")] = False,
          debug: Debug = False) -> None:
    """Train a delta. With no CONFIG: LoRA on MiniLM on the bundled review-sentiment set (a few minutes on CPU).

    Multi-process: torchrun --nproc_per_node N -m deltatune.cli train CONFIG.yaml (or accelerate launch).
    """
    with _guard(debug):
        from .train.config import dump_yaml, load_config, parse_overrides

        path, rest = _split_config(args)
        if path is not None and _train_router(path, rest, resume, overwrite, print_config):
            return
        cfg = load_config(path, parse_overrides(rest))
        if print_config:
            typer.echo(dump_yaml(cfg), nl=False)
            return
        from .train.jobs import train as run_training

        summary = run_training(cfg, resume=resume, overwrite=overwrite)
        if summary:
            _print_summary(summary)


def _train_router(path: str, rest: list[str], resume: bool, overwrite: bool, print_config: bool) -> bool:
    """A config with a router: section trains a router over finished runs (train/router_job.py)."""
    from .core.errors import ConfigError
    from .train.config import parse_overrides
    from .train.router_job import dump_router_config, is_router_config, load_router_config, train_router

    if not is_router_config(path):
        return False
    cfg = load_router_config(path, parse_overrides(rest))
    if print_config:
        typer.echo(dump_router_config(cfg), nl=False)
        return True
    if resume:
        raise ConfigError("--resume continues a training run; a router job has nothing to resume (it takes "
                          "seconds): run it again with --overwrite")
    s = train_router(cfg, overwrite=overwrite)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in s["router_accuracy"].items())
    typer.echo(f"run: {s['run_dir']}\nrouter ({s['mode']}) over {', '.join(s['deltas'])}: training accuracy "
               f"{s['router_train_accuracy']:.4f}; validation accuracy per task: {shown}")
    typer.echo(f"routed vs oracle metrics: deltatune eval {s['run_dir']}")
    return True


def _print_summary(s: dict[str, Any]) -> None:
    final = s.get("final_eval") or {}
    shown = ", ".join(f"{k[5:]} {v:.4f}" for k, v in final.items() if k.startswith("eval_"))
    best = f"best {s['metric']} {s['best_metric']:.4f} at step {s['best_step']}" if s.get("best_metric") is not None \
        else "no evaluation set"
    typer.echo(f"run: {s['run_dir']}\n{best}" + (f"; final eval: {shown}" if shown else ""))
    typer.echo(f"{s['methods']}: {s['trainable_params']:,} trainable parameters ({s['trainable_percent']:.3f}%), "
               f"checkpoint {s['checkpoint_bytes'] / 1024:.1f} KiB, {s['steps']} steps in {s['train_time_s']:.1f} s")
    typer.echo(f"report: {Path(s['run_dir']) / 'report.md'}")


@app.command("eval", context_settings=OVERRIDES)
def eval_(args: Annotated[list[str] | None, typer.Argument(
              metavar="TARGET [--KEY VALUE]...", show_default=False,
              help="A run dir, or a checkpoint (with --model), then overrides such as "
                   "--data.validation dev.tsv.")] = None,
          checkpoint: Checkpoint = None, model: ModelPath = None, task: Task = None, debug: Debug = False) -> None:
    """Evaluate a trained delta on data.validation; prints the metrics as JSON."""
    with _guard(debug):
        from .train.config import parse_overrides
        from .train.jobs import locate, run_eval

        target, rest = _split_config(args)
        if target is None:
            raise click.UsageError("eval needs a TARGET: a run directory such as runs/default")
        from .train.router_job import evaluate_router_run, format_table, is_router_run

        if is_router_run(target):  # routed vs oracle, every task of the router run
            if rest or checkpoint or model or task:
                raise click.UsageError("a router run is evaluated as it was trained: no overrides or options")
            typer.echo(format_table(evaluate_router_run(target)))
            return
        cfg, where = locate(target, checkpoint, model, task, parse_overrides(rest))
        _echo_json(run_eval(cfg, where))


@app.command()
def inspect(model: Annotated[str, typer.Argument(help="Model directory or hub name ('default': the embedded "
                                                      "MiniLM).")],
            method: Annotated[list[str] | None, typer.Option(
                "--method", help="A method name (lora) or a YAML mapping ('{method: lora, r: 4, targets: [query]}'); "
                                 "repeat to combine.")] = None,
            task: Task = None,
            train_modules: Annotated[str | None, typer.Option(help="Comma-separated modules to train in full "
                                                                   "(default: newly initialised ones).")] = None,
            debug: Debug = False) -> None:
    """Show which modules a method would change and what would train (dt.inspect)."""
    with _guard(debug):
        from .train.config import default_model_path, parse_overrides
        from .train.jobs import inspect_model

        values = [parse_overrides(["--method", spec])[0][1] for spec in method or []]
        specs = [v if isinstance(v, dict) else {"method": str(v)} for v in values]  # validated with the config
        path = default_model_path() if model == "default" else model
        names = [m for m in train_modules.split(",") if m] if train_modules is not None else None
        typer.echo(inspect_model(path, specs, task, names))


@app.command()
def merge(target: Annotated[str, typer.Argument(help="A run dir or a checkpoint directory.")],
          out: Annotated[Path, typer.Argument(help="Where to write the merged model.")],
          checkpoint: Checkpoint = None, model: ModelPath = None, task: Task = None,
          dtype: Annotated[str | None, typer.Option("--dtype", help="Write the model in this dtype (bfloat16, "
                                                    "float16, float32); a quantized base is dequantized.")] = None,
          requantize: Annotated[bool, typer.Option("--requantize", help="Quantized base: merge, quantize again "
                                                   "and report the error that costs.")] = False,
          debug: Debug = False) -> None:
    """Write base + delta as one standalone model (plain transformers from_pretrained loads it)."""
    with _guard(debug):
        from .train.jobs import locate
        from .train.jobs import merge as merge_job

        cfg, where = locate(target, checkpoint, model, task)
        typer.echo(f"merged model written to {merge_job(cfg, _need(where, target), out, dtype, requantize)}")


@app.command()
def export(target: Annotated[str, typer.Argument(help="A run dir or a checkpoint directory.")],
           out: Annotated[Path, typer.Argument(help="Where to write the exported adapter.")],
           format: Annotated[str, typer.Option("--format", "-f", help="Output format: peft, vllm (a PEFT "
                                               "directory vLLM can load) or gguf (a llama.cpp LoRA file).")] = "peft",
           checkpoint: Checkpoint = None, model: ModelPath = None, task: Task = None, debug: Debug = False) -> None:
    """Export a LoRA delta in another library's format (PEFT / vLLM: adapter_config.json +
    adapter_model.safetensors; gguf: one llama.cpp adapter file)."""
    with _guard(debug):
        from .train.jobs import export as export_job
        from .train.jobs import locate

        cfg, where = locate(target, checkpoint, model, task)
        typer.echo(f"{format} adapter written to {export_job(cfg, _need(where, target), out, format)}")


def _need(where: Path | None, target: str) -> Path:
    if where is None:
        from .core.errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(f"no delta checkpoint found for {target}; pass --checkpoint DIR")
    return where


@app.command()
def generate(target: Annotated[str | None, typer.Argument(help="A run dir or checkpoint (none: the bare "
                                                                "--model).")] = None,
             prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "",
             max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
             temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy decoding.")] = 0.0,
             template: Annotated[bool | None, typer.Option(
                 "--template/--no-template", help="Wrap the prompt as the run was trained: the chat template's "
                                                  "generation prompt (chat runs) or Alpaca's template (default: for "
                                                  "instruction and chat runs).")] = None,
             checkpoint: Checkpoint = None, model: ModelPath = None, debug: Debug = False) -> None:
    """Generate text with a causal LM and its delta."""
    with _guard(debug):
        from .core.errors import ConfigError
        from .train.jobs import generate as generate_job
        from .train.jobs import locate

        if target is None and model is None:
            raise ConfigError("generate needs a run dir / checkpoint, or --model for the bare base model")
        cfg, where = locate(target or model, checkpoint, model, "causal_lm" if target is None else None)
        typer.echo(generate_job(cfg, where if target else None, prompt, max_new_tokens, temperature, template))


@app.command()
def serve(base: Annotated[str, typer.Argument(help="The base model (directory or hub name), held once.")],
          delta: Annotated[list[str] | None, typer.Option(
              "--delta", "-d", help="NAME=DIR: a delta checkpoint or run dir, served as model NAME (repeat).")] = None,
          task: Task = None,
          gguf_file: Annotated[str | None, typer.Option(help="A GGUF file inside BASE (the offline SmolLM2).")] = None,
          labels: Annotated[str | None, typer.Option(help="Comma-separated label names of the classification "
                                                          "heads (default: the runs' data.labels).")] = None,
          host: Annotated[str, typer.Option()] = "127.0.0.1",
          port: Annotated[int, typer.Option()] = 8000,
          max_batch_size: Annotated[int, typer.Option(min=1, help="Rows per forward; 1: no batching.")] = 16,
          max_wait_ms: Annotated[float, typer.Option(min=0.0, help="How long a batch waits for more rows.")] = 5.0,
          max_body_bytes: Annotated[int, typer.Option(min=1, help="Larger request bodies get 413.")] = 1 << 20,
          max_tokens: Annotated[int | None, typer.Option(min=1, help="Prompt + new tokens per row (default: the "
                                                                     "model's context).")] = None,
          debug: Debug = False) -> None:
    """Serve many deltas over one base: OpenAI-compatible /v1/completions and /v1/chat/completions (the model
    field names the delta; 'base' the bare model), /v1/classify for classifiers, /v1/models, /health."""
    with _guard(debug):
        from .serve.app import ServeSettings, create_app, serve_forever
        from .serve.load import load_engine, parse_deltas

        logging.getLogger("deltatune.compose.routing").setLevel(logging.WARNING)  # one line per batch otherwise
        engine, tokenizer = load_engine(base, parse_deltas(delta or []), task, gguf_file,
                                        labels=labels.split(",") if labels else None, max_tokens=max_tokens)
        settings = ServeSettings(max_batch_size, max_wait_ms, max_body_bytes, max_tokens)
        serve_forever(create_app(engine, tokenizer, settings), host, port)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A training run directory.")],
           debug: Debug = False) -> None:
    """(Re)build report.md and the PNG plots of a run from its metrics.jsonl."""
    with _guard(debug):
        from .train.report import write_report

        typer.echo(f"report written to {write_report(run_dir)}")


@app.command()
def extract(base: Annotated[str, typer.Argument(help="The base model (directory or hub name).")],
            finetuned: Annotated[str, typer.Argument(help="Its full fine-tune (same architecture).")],
            out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the LoRA delta checkpoint.")],
            r: Annotated[int, typer.Option("--r", min=1, help="LoRA rank per module.")] = 16,
            targets: Annotated[str, typer.Option(help="Comma-separated modules to extract.")] = "all-linear",
            debug: Debug = False) -> None:
    """Turn a full fine-tune into a LoRA delta: truncated SVD of W_ft - W_base per module (dt.extract_lora)."""
    with _guard(debug):
        from .compose.extract import extract_to_directory, format_report

        names = [t for t in targets.split(",") if t]
        report = extract_to_directory(base, finetuned, out, r=r, targets=names[0] if len(names) == 1 else names)
        typer.echo(format_report(report))
        typer.echo(f"LoRA delta written to {out}")


@app.command(context_settings=OVERRIDES)
def search(args: ArgsAndOverrides = None,
           trials: Annotated[int | None, typer.Option("--trials", "-n", min=1, help="Trials this process runs "
                                                      "(per worker).")] = None,
           storage: Annotated[str | None, typer.Option("--storage", help="Optuna storage URL shared by workers: "
                                                       "sqlite:///study.db or any RDB URL (default: sqlite in the "
                                                       "output dir). The same storage resumes the study.")] = None,
           study: Annotated[str | None, typer.Option("--study", help="Study name (default: the config's "
                                                     "stem).")] = None,
           timeout: Annotated[float | None, typer.Option("--timeout", min=0.0, help="Start no new trial after "
                                                         "this many seconds.")] = None,
           output: Annotated[Path | None, typer.Option("--output", "-o", help="Results directory (default: "
                                                       "searches/<study>).")] = None,
           debug: Debug = False) -> None:
    """Search methods and hyperparameters (the config's search: section) with Optuna; prunes bad trials."""
    with _guard(debug):
        from .auto.search import run_search
        from .train.config import parse_overrides

        path, rest = _split_config(args)
        if path is None:
            raise click.UsageError("search needs a CONFIG.yaml with a search: section")
        result = run_search(path, trials, storage, study, timeout, output, parse_overrides(rest))
        _print_search(result, output or Path("searches") / (study or Path(path).stem))


def _print_search(result: dict[str, Any], out: Path) -> None:
    best = result.get("best")
    typer.echo(f"study {result['study']}: {result['counts']} trials")
    if best:
        typer.echo(f"best: trial {best['number']}, {result['metric']} {best['value']:.4f}, {best['methods']} "
                   f"({best['trainable_params']:,} trainable parameters)")
        typer.echo(f"config: {out / 'best_config.yaml'}\ndelta: {out / 'best_delta'}")
    typer.echo(f"report: {out / 'report.md'}")


@app.command(context_settings=OVERRIDES)
def race(args: ArgsAndOverrides = None,
         eta: Annotated[int | None, typer.Option("--eta", min=2, help="Keep 1/eta of the candidates per rung "
                                                 "(default: race.eta, else 2).")] = None,
         output: Annotated[Path | None, typer.Option("--output", "-o", help="Results directory (default: "
                                                     "races/<config stem>).")] = None,
         debug: Debug = False) -> None:
    """Race candidate deltas (the config's race: section; default LoRA, adapter, prefix, BitFit) by successive
    halving on the validation metric; keeps the best."""
    with _guard(debug):
        from .auto.racing import run_race
        from .train.config import parse_overrides

        path, rest = _split_config(args)
        if path is None:
            raise click.UsageError("race needs a CONFIG.yaml (its race: section lists the candidates)")
        result = run_race(path, output, parse_overrides(rest), eta)
        out = output or Path("races") / Path(path).stem
        typer.echo(f"winner: {result['winner']}" if result["winner"] else "no candidate finished")
        typer.echo(f"report: {out / 'report.md'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
