"""Reading and tokenising training data: local files with column mapping, or the ``datasets`` library.

Formats: TSV (unquoted, ``csv.QUOTE_NONE``, as GLUE ships it), CSV, JSON (a list of records, or columns
of equal length), JSONL, plain text (causal LM: the corpus is cut into ``max_length`` blocks), parquet and
Hub datasets through ``datasets``. Tasks:
- ``classification``: one text column, optionally a second (pairs), and a label column (ints or names);
- ``causal_lm``: a text column or a .txt corpus, every token is a target;
- ``instruction``: Alpaca-style records (Taori et al., 2023) in Alpaca's prompt template; the prompt's
  tokens get label -100, so only the response is learned;
- ``chat``: conversations (or Alpaca records) in the tokenizer's chat template, loss on assistant turns (chat.py).
Tokenised splits are cached (safetensors, keyed by the data, the tokenizer and every setting that changes
the result), so a second run on the same data starts training immediately.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core.checkpoint import file_sha256
from ..core.errors import DataError
from .batches import IGNORE, Encoded
from .chat import encode_chat
from .config import DataConfig, RunConfig, hub_offline

log = logging.getLogger(__name__)
CACHE_VERSION = 1
EXTENSIONS = {".tsv": "tsv", ".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".txt": "text", ".parquet": "parquet"}
TEXT_COLUMNS = ("sentence", "text", "review", "content", "sentence1", "question", "question1", "premise")
PAIRS = {"sentence1": "sentence2", "question1": "question2", "question": "sentence", "premise": "hypothesis"}
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def alpaca_prompt(instruction: str, context: str = "") -> str:
    """Alpaca's prompt for one record (the variant with an Input block when ``context`` is not empty)."""
    if context.strip():
        return ALPACA_INPUT.format(instruction=instruction, input=context)
    return ALPACA.format(instruction=instruction)


# -- reading records --------------------------------------------------------------------------------

def data_format(source: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    ext = Path(source).suffix.lower()
    if ext not in EXTENSIONS:
        raise DataError(f"cannot tell the format of {source!r} from its extension; set data.format to one of "
                        f"tsv, csv, json, jsonl, text, parquet, hub")
    return EXTENSIONS[ext]


def read_records(source: str, data: DataConfig, split: str) -> list[dict[str, Any]]:
    """The rows of one split as dicts (``{"text": corpus}`` for a plain-text file)."""
    fmt = data_format(source, data.format)
    if fmt in ("hub", "parquet"):
        return _read_with_datasets(source, data, split, fmt)
    try:
        with open(source, newline="", encoding="utf-8") as f:
            if fmt == "text":
                return [{"text": f.read()}]
            if fmt in ("tsv", "csv"):
                quoting = {"quoting": csv.QUOTE_NONE, "delimiter": "\t"} if fmt == "tsv" else {}
                return list(csv.DictReader(f, **quoting))
            if fmt == "jsonl":
                return [json.loads(line) for line in f if line.strip()]
            return _json_rows(json.load(f), source)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise DataError(f"could not read {source} as {fmt}: {e}. Check the file, or set data.format") from e


def _json_rows(obj: Any, source: str) -> list[dict[str, Any]]:
    if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
        n = {len(v) for v in obj.values()}
        if len(n) == 1:
            return [dict(zip(obj, values, strict=True)) for values in zip(*obj.values(), strict=True)]
    raise DataError(f"{source}: JSON must be a list of records ([{{...}}, ...]) or a mapping of equally long "
                    f"column lists")


def _read_with_datasets(source: str, data: DataConfig, split: str, fmt: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"reading {source} needs the datasets library: pip install datasets") from e
    try:
        if fmt == "parquet":
            ds = datasets.load_dataset("parquet", data_files=source, split="train")
        else:
            ds = datasets.load_dataset(source, data.hub_config, split=split)
    except Exception as e:  # datasets raises many kinds (network, missing split, bad config)
        offline = " (HF_HUB_OFFLINE=1 is set: hub datasets need the network)" if hub_offline() else ""
        raise DataError(f"datasets could not load {source!r} split {split!r}: {e}{offline}") from e
    return ds.to_list()


# -- classification: columns and labels -------------------------------------------------------------

def text_columns(rows: list[dict[str, Any]], data: DataConfig, where: str) -> tuple[str, str | None]:
    """The text (and pair) column names: configured, or the first usual name present."""
    present = list(rows[0])
    cols = data.columns
    text = cols.text or next((c for c in TEXT_COLUMNS if c in present), None)
    if text is None or text not in present:
        wanted = f"column {cols.text!r}" if cols.text else f"any of {', '.join(TEXT_COLUMNS)}"
        raise DataError(f"{where}: no {wanted} (columns: {', '.join(present)}); set data.columns.text to the "
                        f"column holding the text")
    pair = cols.text_pair or (PAIRS.get(text) if cols.text is None and PAIRS.get(text) in present else None)
    if pair is not None and pair not in present:
        raise DataError(f"{where}: no column {pair!r} for data.columns.text_pair (columns: {', '.join(present)})")
    if cols.label not in present:
        raise DataError(f"{where}: no label column {cols.label!r} (columns: {', '.join(present)}); set "
                        f"data.columns.label")
    return text, pair


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def label_names(values: list[Any], configured: list[str] | None, where: str) -> list[str]:
    """Class names in id order: as configured, ``"0".."K-1"`` for integer labels, else sorted names."""
    missing = next((row for row, v in enumerate(values) if v is None or v == ""), None)
    if missing is not None:
        raise DataError(f"{where} row {missing + 1}: the label is empty (a row with missing fields? TSV files must "
                        f"not quote fields)")
    ints = [_as_int(v) for v in values]
    if configured:
        names = list(configured)
    elif all(i is not None for i in ints):
        if min(ints) < 0:
            raise DataError(f"{where}: integer labels must be >= 0, found {min(ints)}; or set data.labels")
        names = [str(i) for i in range(max(ints) + 1)]
    elif any(i is not None for i in ints):  # mostly ids, one odd value: a broken row, not a class of its own
        row = next(r for r, i in enumerate(ints) if i is None)
        raise DataError(f"{where} row {row + 1}: label {values[row]!r} is not an integer like the other labels (a "
                        f"quoted field holding a tab? TSV files must not quote fields); fix the row, or list the "
                        f"label names in data.labels")
    else:
        names = sorted({str(v) for v in values})
    if len(names) < 2:
        raise DataError(f"{where}: every example has the label {names[0]!r}; classification needs at least two "
                        f"classes (list them in data.labels if some are absent from the training data)")
    return names


def label_ids(values: list[Any], names: list[str], where: str) -> list[int]:
    """Map labels (names, or integer ids) to ids; a label outside the set is an error naming the row."""
    index = {n: i for i, n in enumerate(names)}
    ids = []
    for row, value in enumerate(values):
        i = index.get(str(value))
        if i is None:
            i = _as_int(value)
        if i is None or not 0 <= i < len(names):
            shown = names if len(names) <= 20 else names[:20] + ["..."]
            raise DataError(f"{where} row {row + 1}: label {value!r} is not in the label set {shown}; fix the "
                            f"row, or list every label in data.labels")
        ids.append(i)
    return ids


# -- tokenising -------------------------------------------------------------------------------------

def encode_classification(rows: list[dict[str, Any]], data: DataConfig, tokenizer, names: list[str] | None,
                          where: str) -> Encoded:
    text, pair = text_columns(rows, data, where)
    values = [r[data.columns.label] for r in rows]
    names = names or label_names(values, data.labels, where)
    ids = label_ids(values, names, where)
    firsts = [_text(r, text, where, i) for i, r in enumerate(rows)]
    seconds = [_text(r, pair, where, i) for i, r in enumerate(rows)] if pair else None
    enc = tokenizer(firsts, seconds, truncation=True, max_length=data.max_length)
    return Encoded.from_lists(enc["input_ids"], ids, enc.get("token_type_ids"), names)


def _text(row: dict[str, Any], column: str, where: str, i: int) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise DataError(f"{where} row {i + 1}: column {column!r} is {value!r}, not text (a row with missing "
                        f"fields? TSV files must not quote fields)")
    return value


def encode_lm(rows: list[dict[str, Any]], data: DataConfig, tokenizer, corpus: bool, where: str) -> Encoded:
    """Causal LM: every token is a target. A corpus (.txt) is cut into blocks; records are truncated."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    column = data.columns.text or "text"
    if column not in rows[0]:
        raise DataError(f"{where}: no text column {column!r} (columns: {', '.join(rows[0])}); set "
                        f"data.columns.text")
    texts = [_text(r, column, where, i) for i, r in enumerate(rows)]
    if corpus:
        ids = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
        size = data.max_length
        blocks = [ids[i:i + size] for i in range(0, len(ids), size)]
    else:
        ends_with_eos = lambda ids: bool(eos) and ids[-1:] == eos  # some tokenizers append EOS themselves
        blocks = [x[: data.max_length] if ends_with_eos(x) else x[: data.max_length - len(eos)] + eos
                  for x in tokenizer(texts)["input_ids"]]
    blocks = [b for b in blocks if len(b) > 1]
    return Encoded.from_lists(blocks, [list(b) for b in blocks])


def encode_instruction(rows: list[dict[str, Any]], data: DataConfig, tokenizer, where: str) -> Encoded:
    """Alpaca records: prompt tokens (label -100) + response tokens + EOS, truncated to max_length."""
    cols = data.columns
    for column in (cols.instruction, cols.output):
        if column not in rows[0]:
            raise DataError(f"{where}: no column {column!r} (columns: {', '.join(rows[0])}); set "
                            f"data.columns.instruction / data.columns.output")
    prompts = [alpaca_prompt(_text(r, cols.instruction, where, i), r.get(cols.input) or "")
               for i, r in enumerate(rows)]
    outputs = [_text(r, cols.output, where, i) for i, r in enumerate(rows)]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt_ids = tokenizer(prompts)["input_ids"]
    output_ids = tokenizer(outputs, add_special_tokens=False)["input_ids"]
    ids, labels = [], []
    for p, o in zip(prompt_ids, output_ids, strict=True):
        full = (p + o + eos)[: data.max_length]
        if len(full) > len(p):  # a prompt that fills max_length leaves nothing to learn: skip it
            ids.append(full)
            labels.append([IGNORE] * len(p) + full[len(p):])
    if len(ids) < len(prompt_ids):
        log.warning("%s: %d record(s) skipped: the prompt alone fills data.max_length=%d",
                    where, len(prompt_ids) - len(ids), data.max_length)
    return Encoded.from_lists(ids, labels)


def encode(rows: list[dict[str, Any]], cfg: RunConfig, tokenizer, names: list[str] | None, where: str,
           corpus: bool) -> Encoded:
    if not rows:
        raise DataError(f"{where} has no examples; check the file (a TSV needs a header row and data rows)")
    if cfg.task == "classification":
        if corpus:
            raise DataError(f"{where}: a plain-text corpus has no labels; classification needs tsv/csv/json(l)")
        return encode_classification(rows, cfg.data, tokenizer, names, where)
    if cfg.task == "instruction":
        return encode_instruction(rows, cfg.data, tokenizer, where)
    if cfg.task == "chat":
        return encode_chat(rows, cfg.data, tokenizer, where)
    return encode_lm(rows, cfg.data, tokenizer, corpus, where)


# -- caching ----------------------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None) or ""  # task chat renders with it
    identity = f"{type(tokenizer).__name__}|{getattr(tokenizer, 'truncation_side', 'right')}|{text}|{template}"
    return hashlib.sha256(identity.encode()).hexdigest()


def _source_fingerprint(source: str, fmt: str) -> str:
    if fmt == "hub":
        return f"hub:{source}"
    return file_sha256(source)


def cache_dir(data: DataConfig) -> Path:
    root = data.cache_dir or os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune"
    return Path(root) / "tokenized"


def _cache_key(cfg: RunConfig, source: str, split: str, names: list[str] | None, tok_print: str,
               rows: int | None = None) -> str:
    data = cfg.data
    fmt = data_format(source, data.format)
    parts = {"v": CACHE_VERSION, "task": cfg.task, "source": _source_fingerprint(source, fmt), "split": split,
             "format": fmt, "hub_config": data.hub_config, "columns": data.columns.model_dump(),
             "labels": data.labels, "train_names": names, "max_length": data.max_length, "tokenizer": tok_print,
             "rows": rows, "train_on": data.train_on if cfg.task == "chat" else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(path: Path) -> Encoded | None:
    if not path.exists():
        return None
    try:
        tensors = load_file(path)
        meta = json.loads(path.with_suffix(".json").read_text())
    except (SafetensorError, OSError, ValueError) as e:
        log.warning("ignoring unreadable tokenisation cache %s (%s)", path, e)
        return None
    return Encoded(tensors["input_ids"].long(), tensors["offsets"], tensors["labels"],
                   tensors.get("token_type_ids"), meta["label_names"])


def _write_cache(path: Path, enc: Encoded) -> None:
    """Write tensors then JSON, each to a temp name renamed into place (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in enc.tensors().items()}
    tensors["input_ids"] = tensors["input_ids"].int()  # half the bytes; ids fit in int32
    suffix = f".tmp-{os.getpid()}"
    temps = (path.with_name(path.name + suffix), path.with_suffix(".json" + suffix))
    try:
        save_file(tensors, temps[0])
        temps[1].write_text(json.dumps({"label_names": enc.label_names}))
        os.replace(temps[1], path.with_suffix(".json"))
        os.replace(temps[0], path)
    except BaseException:  # a full disk: don't leave half-written temp files to fill it further
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise


def load_split(cfg: RunConfig, tokenizer, split: str, names: list[str] | None = None) -> Encoded:
    """One split (``train`` or ``validation``), tokenised, from the cache when possible."""
    data = cfg.data
    source = data.train if split == "train" else data.validation
    hub_split = data.train_split if split == "train" else data.validation_split
    where = f"data.{split} ({source})"
    fmt = data_format(source, data.format)
    limit = data.max_train_samples if split == "train" else data.max_eval_samples
    # Records (not text corpora, which are cut into blocks after tokenising) are cut to the limit before
    # tokenising: 2,000 rows of a 67,000-row file should not cost 67,000 tokenisations.
    early = limit if fmt != "text" else None
    path = None
    if data.cache:
        key = _cache_key(cfg, source, hub_split, names, tokenizer_fingerprint(tokenizer), early)
        path = cache_dir(data) / f"{key}.safetensors"
        cached = _read_cache(path)
        if cached is not None:
            log.info("%s: %d examples from the tokenisation cache", where, len(cached))
            return _truncate(cached, limit)
    rows = read_records(source, data, hub_split)
    if early is not None and early < len(rows):
        if cfg.task == "classification" and names is None and all(data.columns.label in r for r in rows):
            names = label_names([r[data.columns.label] for r in rows], data.labels, where)  # from every row
        rows = rows[:early]
    enc = encode(rows, cfg, tokenizer, names, where, corpus=fmt == "text")
    if len(enc) == 0:
        raise DataError(f"{where}: no usable examples after tokenisation (all prompts longer than "
                        f"data.max_length={data.max_length}?)")
    if path is not None:
        try:
            _write_cache(path, enc)
        except (OSError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError
            log.warning("could not write the tokenisation cache %s (%s); continuing without it", path, e)
    return _truncate(enc, limit)


def _truncate(enc: Encoded, limit: int | None) -> Encoded:
    """The first ``limit`` examples (all when None)."""
    if limit is None or limit >= len(enc):
        return enc
    end = int(enc.offsets[limit])
    token_level = enc.per_token_labels
    return Encoded(enc.input_ids[:end], enc.offsets[: limit + 1], enc.labels[:end] if token_level else
                   enc.labels[:limit], None if enc.token_type_ids is None else enc.token_type_ids[:end],
                   enc.label_names)
