"""What each CLI command does, as plain functions (the CLI only parses arguments and prints).

``train`` builds a run directory::

    runs/<name>/config.yaml      the resolved config (labels included)
               metrics.jsonl    train / eval records
               best/ last/      delta checkpoints (dt.load-able)
               state/           training state for --resume
               summary.json report.md loss.png eval.png
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from inspect import signature as inspect_signature
from pathlib import Path
from typing import Any

import torch

from ..api import attach, load
from ..core import onednn
from ..core.checkpoint import CONFIG_FILE, TENSORS_FILE
from ..core.errors import CheckpointNotFoundError, ConfigError
from ..inspect import inspect
from ..interop.gguf import export_gguf
from ..interop.merged import merge_and_save
from ..interop.peft import export_peft
from ..interop.vllm import export_vllm
from . import distributed, sharding
from .batches import Encoded
from .chat import use_chat_template
from .config import RunConfig, check_paths, dump_yaml, load_config, read_yaml
from .data import load_split
from .data_init import start_from_data
from .loop import Loop, MetricsLog, Session, autocast_dtype, evaluate, seed_everything
from .models import check_vocab, guess_task, load_model, load_tokenizer, run_dir_of, train_module_names
from .offline_models import resolve_model_name
from .preference import PreferenceObjective, load_pairs
from .report import write_report
from .samples import prompt_inputs
from .threads import ThreadGovernor

log = logging.getLogger(__name__)
RUN_FILES = ("state", "best", "last", "metrics.jsonl", "config.yaml", "summary.json", "report.md", "loss.png",
             "eval.png", "tensorboard", "mlflow.db", "mlflow-artifacts")
VOLATILE = {("train", "progress"), ("train", "device"), ("train", "num_threads"),  # may differ on --resume
            ("train", "distributed"),  # the state is the same whether the base was sharded or replicated
            ("train", "report_to"), ("train", "tracker_project")}  # a resumed run may report elsewhere


# -- train ------------------------------------------------------------------------------------------

def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs: a used run dir needs --resume (continue) or --overwrite (start over)."""
    used = run_dir.exists() and any((run_dir / name).exists() for name in RUN_FILES)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    if resume and not (run_dir / "state").exists() and not (run_dir / ".state.old").exists():
        start = ("pass --overwrite instead of --resume to start it again (the run stopped before its first "
                 "state save)" if used else "run without --resume to start it")
        raise CheckpointNotFoundError(f"nothing to resume in {run_dir}: no training state there (state/ is written "
                                      f"every train.save_every steps); {start}")
    if used and not resume and not overwrite:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to start it "
                          f"again (its checkpoints are deleted), or --output_dir DIR for a new one")


def _differences(old: Any, new: Any, path: tuple = ()) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) if path + (k,) not in VOLATILE
                for d in _differences(old.get(k), new.get(k), path + (k,))]
    return [] if old == new else [f"{'.'.join(map(str, path))}: {old!r} -> {new!r}"]


def init_run_dir(run_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    """Resume: the config must be the one the run started with. Otherwise write config.yaml afresh."""
    if resume:
        changed = _differences(read_yaml(run_dir / "config.yaml"), cfg.to_dict())
        if changed:
            raise ConfigError(f"--resume needs the config the run started with, but {len(changed)} value(s) differ: "
                              f"{'; '.join(changed[:5])}. Use the original config, or start a new run")
        for leftover in run_dir.glob(".*.tmp-*"):  # half-written checkpoints of a killed run
            shutil.rmtree(leftover, ignore_errors=True)
        return
    if overwrite:
        for name in RUN_FILES:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))


def load_data(cfg: RunConfig, info: distributed.Dist) -> tuple[Any, Encoded, Encoded | None]:
    """Tokenizer and tokenised splits (rank 0 first, so it fills the cache the others then read)."""
    tokenizer = load_tokenizer(cfg.model)
    use_chat_template(tokenizer, cfg.data.chat_template)
    with distributed.main_first(info):
        if cfg.task == "dpo":  # preference pairs: every record checked here, before the model loads
            train_set = load_pairs(cfg, tokenizer, "train")
            eval_set = load_pairs(cfg, tokenizer, "validation") if cfg.data.validation else None
        else:
            train_set = load_split(cfg, tokenizer, "train")
            eval_set = load_split(cfg, tokenizer, "validation", train_set.label_names) if cfg.data.validation else None
    log.info("data: %d training examples, %s evaluation examples", len(train_set),
             len(eval_set) if eval_set is not None else "no")
    return tokenizer, train_set, eval_set


def build_model(cfg: RunConfig, label_names: list[str] | None, pad_id: int, device: torch.device,
                sharded: bool = False):
    """The base model with the configured delta attached (same seed: same init on every process).
    ``sharded``: left where it was loaded (memory-mapped); ``sharding.shard_model`` copies each process' rows
    to ``device``."""
    seed_everything(cfg.seed)
    model, new = load_model(cfg, label_names, pad_id)
    if cfg.train.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} does not support it; set it "
                              f"to false")
        enable_activation_checkpointing(model)
    if not sharded:
        model.to(device)
    delta = attach(model, *cfg.delta_configs(), train_modules=train_module_names(cfg, model, new) or None)
    log.info("delta: %s; %s", " + ".join(describe_method(c) for c in delta.configs), delta.summary())
    if cfg.train.onednn:
        log.info("oneDNN products on %d frozen linear layers", use_onednn(cfg, model, device))
    return model, delta


def use_onednn(cfg: RunConfig, model: torch.nn.Module, device: torch.device) -> int:
    """``train.onednn``, refused where it would silently do nothing (another device, low precision)."""
    if device.type != "cpu":
        raise ConfigError(f"train.onednn speeds up CPU training only (device is {device}); set it to false")
    if autocast_dtype(cfg.train.precision, device) is not None:
        raise ConfigError(f"train.onednn runs float32 products only, but train.precision is "
                          f"{cfg.train.precision}; use fp32 or set train.onednn to false")
    return onednn.enable(model)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in backward (non-reentrant: works with frozen inputs). transformers
    5.24 renamed the switch and warns on the old name; older 5.x releases only have the old one."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def cpu_threads(configured: int | None, world: int = 1) -> int:
    """CPU threads per process for a job without a training loop to re-decide in (train/threads.py)."""
    return ThreadGovernor(configured, world).decide()


def drop_unused_inputs(model, *splits: Encoded | None) -> None:
    """Forget token type ids the model does not take (a BERT-style tokenizer in front of a decoder)."""
    if "token_type_ids" not in inspect_signature(model.forward).parameters:
        for split in splits:
            if split is not None:
                split.token_type_ids = None


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run (or continue) the job described by ``cfg``; returns the summary written to summary.json."""
    run_dir = Path(cfg.output_dir)
    check_run_dir(run_dir, resume, overwrite)
    info = distributed.setup(cfg.train.device)
    try:
        mode = sharding.resolve_mode(cfg.train.distributed, info.world)
        sharding.check_settings(cfg, mode)
        info = dataclasses.replace(info, sharded=mode == "fsdp")
        threads = ThreadGovernor(cfg.train.num_threads, info.world) if info.device.type == "cpu" else None
        tokenizer, train_set, eval_set = load_data(cfg, info)
        cfg = cfg.model_copy(deep=True)
        if train_set.label_names is not None:
            cfg.data.labels = train_set.label_names
        if info.is_main:
            init_run_dir(run_dir, cfg, resume, overwrite)
        distributed.barrier(info)
        model, delta = build_model(cfg, train_set.label_names, tokenizer.pad_token_id, info.device, info.sharded)
        start_from_data(delta, train_set, tokenizer.pad_token_id, cfg.train.batch_size, cfg.seed,  # init eva / corda
                        cfg.data.group_by_length, info.device, info.sharded)
        if info.sharded:
            sharding.shard_model(model, delta, info)
        check_vocab(model, cfg.model.tokenizer or cfg.model.path, tokenizer.pad_token_id, train_set, eval_set)
        if threads is not None:
            threads.decide()  # measured over the start-up just done: what other processes use now
        objective = PreferenceObjective.from_config(model, cfg.train) if cfg.task == "dpo" else None
        loop = Loop(Session(cfg, model, delta, train_set, eval_set, tokenizer.pad_token_id, run_dir, info,
                            threads=threads, objective=objective, tokenizer=tokenizer))
        with distributed.peers_watched(info, run_dir), loop.trackers.closed_on_failure():
            loop.start(resume)
            progress = loop.run()
        summary = write_summary(run_dir, cfg, delta, progress) if info.is_main else {}
        loop.trackers.finish(summary)
        if info.is_main:
            write_report(run_dir)
        distributed.barrier(info)  # no process leaves (and tears down the group) while rank 0 still writes
        return summary
    finally:
        distributed.cleanup(info)


def describe_method(config) -> str:
    """``lora(r=8, alpha=16.0, dropout=0.0, targets='all-linear')``: the first fields, defaults included."""
    fields = list(config.to_dict().items())[1:5]
    return f"{config.method}({', '.join(f'{k}={v!r}' for k, v in fields)})"


def write_summary(run_dir: Path, cfg: RunConfig, delta, progress) -> dict[str, Any]:
    evals = [r for r in MetricsLog.read(run_dir / "metrics.jsonl") if r.get("type") == "eval"]
    checkpoint = run_dir / "last" / TENSORS_FILE
    summary = {
        "run_dir": str(run_dir), "task": cfg.task, "model": cfg.model.path,
        "methods": " + ".join(describe_method(c) for c in delta.configs), "trainable_params": delta.num_trainable(),
        "total_params": delta.num_total(), "trainable_percent": 100 * delta.num_trainable() / delta.num_total(),
        "checkpoint_bytes": checkpoint.stat().st_size if checkpoint.exists() else None,
        "train_time_s": round(progress.elapsed_s, 2), "steps": progress.step, "metric": cfg.train.metric,
        "best_metric": progress.best_metric, "best_step": progress.best_step,
        "final_eval": evals[-1] if evals else None,
        "best_checkpoint": str(run_dir / "best") if (run_dir / "best").exists() else None,
        "last_checkpoint": str(run_dir / "last"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# -- using a trained delta --------------------------------------------------------------------------

def locate(target: str, checkpoint: str | None = None, model: str | None = None, task: str | None = None,
           overrides: list[tuple[str, Any]] | None = None, check_files: bool = False) -> tuple[RunConfig, Path | None]:
    """The run config and delta checkpoint meant by ``target``: a run dir, a checkpoint in one, or a bare
    checkpoint (then ``model`` names the base). ``checkpoint`` may be best, last or a directory."""
    named = model
    model, gguf_file = resolve_model_name(model, None)  # ``--model smollm2``: the package's directory and GGUF
    path = Path(model if target == named else target)
    run = run_dir_of(path)
    if run is not None:
        cfg = load_config(run / "config.yaml", overrides, check_files=check_files)
        own = path if (path / CONFIG_FILE).exists() else None
        chosen = {"best": run / "best", "last": run / "last"}.get(checkpoint or "", checkpoint)
        where = Path(chosen) if chosen else own or (run / "best" if (run / "best").exists() else run / "last")
    elif (path / CONFIG_FILE).exists() or model is not None:
        if model is None:
            raise ConfigError(f"{path} is a checkpoint outside a run directory; pass --model with its base model")
        extra = [("model.path", model), ("model.gguf_file", gguf_file),
                 ("task", task or guess_task(model, gguf_file))] + list(overrides or [])
        cfg = load_config(None, extra, check_files=check_files)
        where = Path(checkpoint) if checkpoint else (path if (path / CONFIG_FILE).exists() else None)
    else:
        raise CheckpointNotFoundError(f"{path} is neither a run directory (with config.yaml) nor a delta checkpoint "
                                      f"(with {CONFIG_FILE}); pass a run dir, e.g. runs/default")
    if model is not None:
        cfg.model.path, cfg.model.gguf_file = model, gguf_file or cfg.model.gguf_file
    return cfg, where


def loaded_model(cfg: RunConfig, checkpoint: Path | None, device: str = "cpu"):
    """Tokenizer, and the base model with the checkpoint's delta loaded (or bare when None)."""
    tokenizer = load_tokenizer(cfg.model)
    use_chat_template(tokenizer, cfg.data.chat_template)
    model, _ = load_model(cfg, cfg.data.labels, tokenizer.pad_token_id)
    model.to(device).eval()
    delta = load(model, checkpoint) if checkpoint is not None else None
    return tokenizer, model, delta


def run_eval(cfg: RunConfig, checkpoint: Path | None) -> dict[str, float]:
    """Metrics of the delta on ``data.validation`` (split across processes under torchrun)."""
    if cfg.data.validation is None:
        raise ConfigError("nothing to evaluate: data.validation is not set; pass --data.validation FILE")
    check_paths(cfg)
    info = distributed.setup(cfg.train.device)
    try:
        tokenizer, model, _ = loaded_model(cfg, checkpoint, str(info.device))
        started = time.perf_counter()
        if cfg.task == "dpo":
            found = PreferenceObjective.from_config(model, cfg.train).evaluate(
                load_pairs(cfg, tokenizer, "validation"), tokenizer.pad_token_id, cfg.train.eval_batch_size, info,
                autocast_dtype(cfg.train.precision, info.device))
            return {**found, "seconds": round(time.perf_counter() - started, 2)}
        data = load_split(cfg, tokenizer, "validation", cfg.data.labels)
        drop_unused_inputs(model, data)
        kwargs = {} if cfg.task == "classification" else {"use_cache": False}
        found = evaluate(model, data, tokenizer.pad_token_id, cfg.train.eval_batch_size, info,
                         autocast_dtype(cfg.train.precision, info.device), kwargs)
        return {**found, "examples": len(data), "seconds": round(time.perf_counter() - started, 2)}
    finally:
        distributed.cleanup(info)


def inspect_model(model_path: str, methods: list[dict[str, Any]], task: str | None,
                  train_modules: list[str] | None) -> str:
    """dt.inspect of the model with the given method configs attached (nothing attached: the bare model)."""
    cfg = load_config(None, [("model.path", model_path), ("task", task or guess_task(model_path))]
                      + ([("delta", methods)] if methods else []), check_files=False)
    model, new = load_model(cfg)
    if methods:
        names = train_modules if train_modules is not None else train_module_names(cfg, model, new)
        attach(model, *cfg.delta_configs(), train_modules=names or None)
    return inspect(model)


def merge(cfg: RunConfig, checkpoint: Path, out: Path, dtype: str | None = None, requantize: bool = False) -> Path:
    """A standalone model with the delta folded in (plain transformers loads it), plus its tokenizer. On a
    quantized base (model.quantization) the base is dequantized first (``dt.merge_and_save``)."""
    tokenizer, _, delta = loaded_model(cfg, checkpoint)
    merge_and_save(delta, out, dtype=dtype, requantize=requantize)
    tokenizer.save_pretrained(out)
    return out


EXPORTERS = {"peft": export_peft, "vllm": export_vllm, "gguf": export_gguf}


def export(cfg: RunConfig, checkpoint: Path, out: Path, fmt: str) -> Path:
    if fmt not in EXPORTERS:
        raise ConfigError(f"export format {fmt!r} is not supported; use --format {' / '.join(EXPORTERS)} (or "
                          f"`deltatune merge` for a standalone merged model)")
    _, _, delta = loaded_model(cfg, checkpoint)
    return EXPORTERS[fmt](delta, out)


def generate(cfg: RunConfig, checkpoint: Path | None, prompt: str, max_new_tokens: int, temperature: float,
             template: bool | None = None) -> str:
    """Continue ``prompt`` with the causal LM (+ delta). ``template`` (default: for instruction and chat runs)
    wraps the prompt as the run was trained: Alpaca's template, or the chat template's generation prompt."""
    if cfg.task == "classification":
        raise ConfigError("generate needs a language-model run (task causal_lm, instruction or chat); this run is "
                          "classification: use `deltatune eval`")
    if template is None:
        template = cfg.task in ("instruction", "chat")
    tokenizer, model, _ = loaded_model(cfg, checkpoint)
    inputs = prompt_inputs(cfg.task if cfg.task == "chat" else "instruction", tokenizer, prompt, template)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    seed_everything(cfg.seed)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             **sampling)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
