"""Loading the base model and tokenizer for a task, and deciding what trains besides the delta."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..core.errors import DeltaError
from ..core.targets import find_task_heads
from .config import ModelConfig, RunConfig
from .quantization import load_kwargs

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(DeltaError, OSError):
    """The model or tokenizer could not be loaded from the configured path or name."""


def _quiet_transformers() -> None:
    """transformers prints a progress bar and a load report per model; the run log says what matters."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    _quiet_transformers()
    source = model.tokenizer or model.path
    kwargs = {"gguf_file": model.gguf_file} if model.gguf_file and not model.tokenizer else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a tokenizer from {source!r}: {e}. Set model.tokenizer to a "
                             f"directory with tokenizer files") from e
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"the tokenizer of {source!r} has neither a pad nor an eos token; batches "
                                 f"cannot be padded. Use a tokenizer that defines pad_token")
        tokenizer.pad_token = tokenizer.eos_token  # causal LMs: pad positions are masked out of attention and loss
    return tokenizer


def load_model(cfg: RunConfig, label_names: list[str] | None = None,
               pad_token_id: int | None = None) -> tuple[nn.Module, list[str]]:
    """The task model and the names of parameters the checkpoint did not have (e.g. a new classifier)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    _quiet_transformers()
    kwargs: dict = {"dtype": DTYPES[cfg.model.dtype]}
    path = cfg.model.path
    if cfg.model.quantization is not None:  # a GGUF is dequantized once and quantized from that copy
        kwargs.update(load_kwargs(cfg.model.quantization, path, cfg.model.gguf_file, _device_map(cfg)))
        path = kwargs.pop("path", path)
    elif cfg.model.gguf_file:
        kwargs["gguf_file"] = cfg.model.gguf_file
    if "gguf_file" not in kwargs and not cfg.model.allow_pickle:
        kwargs["use_safetensors"] = True  # never unpickle pytorch_model.bin unless the user opted in
    if cfg.task == "classification":
        names = label_names or ["0", "1"]
        kwargs.update(num_labels=len(names), id2label=dict(enumerate(names)),
                      label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True)
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    try:
        model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        if not cfg.model.allow_pickle and any(Path(cfg.model.path).glob("pytorch_model*.bin")):
            raise ModelLoadError(f"{cfg.model.path!r} holds its weights only as pytorch_model.bin, a pickle file, and "
                                 f"loading a pickle can run arbitrary code. If you trust its source, set "
                                 f"model.allow_pickle: true (it is read with torch.load(weights_only=True)), or "
                                 f"convert it to model.safetensors") from e
        raise ModelLoadError(f"could not load a {cfg.task} model from {cfg.model.path!r}: {e}. Check model.path "
                             f"(a directory with config.json, or a hub name when online)") from e
    except Exception as e:  # with allow_pickle: UnpicklingError when torch.load(weights_only=True) refuses the file
        if not cfg.model.allow_pickle:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelLoadError(f"the weights in {cfg.model.path!r} were refused by torch.load(weights_only=True): "
                             f"{first} They hold something other than plain tensors (possibly malicious) or are "
                             f"corrupt; do not use them") from e
    new = sorted(set(info.get("missing_keys", ())) | {k for k, *_ in info.get("mismatched_keys", ())})
    if new:
        log.info("newly initialised (not in the checkpoint): %s", ", ".join(new))
    if getattr(model.config, "pad_token_id", None) is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # decoder classifiers find each row's last token with it
    return model, new


def _device_map(cfg: RunConfig) -> str:
    """Where a quantized base is placed as it loads (it cannot be moved afterwards like a plain model)."""
    device = cfg.train.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_vocab(model: nn.Module, source: str, pad_id: int | None, *splits) -> None:
    """Every token id must index the model's input embeddings. A tokenizer of another model (model.tokenizer
    pointing elsewhere) gives ids past the end of the table, which torch reports as a bare IndexError."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    size = getattr(embeddings, "num_embeddings", None)
    if size is None:
        return
    ids = [int(s.input_ids.max()) for s in splits if s is not None and s.input_ids.numel()]
    top = max(ids + ([pad_id] if pad_id is not None else []), default=-1)
    if top >= size:
        raise ModelLoadError(f"the tokenizer of {source!r} does not fit this model: it produces token id {top}, "
                             f"but the model has only {size} input embeddings (ids 0..{size - 1}). Use the "
                             f"model's own tokenizer (unset model.tokenizer, or point it at the model's directory)")


def train_module_names(cfg: RunConfig, model: nn.Module, new_params: list[str]) -> list[str]:
    """Modules trained in full next to the delta: as configured, or ``auto``: the classification head
    (``core.targets.find_task_heads``: ``classifier``, ``score``, ...) plus any module holding parameters
    the checkpoint lacked.

    A task head must train (it is specific to the labels), and anything freshly initialised must be
    saved with the delta, or the checkpoint could not reproduce the model; the rest stays frozen.
    """
    if cfg.train_modules != "auto":
        return list(cfg.train_modules)
    modules = {name.rpartition(".")[0] for name in new_params if name.rpartition(".")[0]}
    if cfg.task == "classification":
        modules.update(find_task_heads(model))
    named = dict(model.named_modules())
    kept = sorted(m for m in modules if m in named)
    return [m for m in kept if not any(m.startswith(other + ".") for other in kept)]  # no module inside another


def guess_task(path: str, gguf_file: str | None = None) -> str:
    """classification or causal_lm, from the model's config (architectures / model type)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read a model config from {path!r}: {e}") from e
    archs = " ".join(config.architectures or [])
    return "causal_lm" if "CausalLM" in archs or "LMHead" in archs else "classification"


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory a checkpoint belongs to (it holds config.yaml), if any."""
    path = Path(path)
    for candidate in (path, path.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    return None
