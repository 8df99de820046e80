"""The bad-input catalogue, API half: one row per mistake a user (or a crash, or a hostile file) can make.

Every row must fail with a specific DeltaError subclass whose message names the problem (the field, the
module, the file) and says what to do, in one short paragraph; and it must leave the model and any
existing checkpoint exactly as they were. Method rows iterate the registry, so a new method is covered
the day it is registered. The CLI half is tests/reliability/test_bad_inputs_cli.py.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import re
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import deltatune as dt
from deltatune.core import checkpoint
from deltatune.core.checkpoint import CONFIG_FILE, TENSORS_FILE
from deltatune.core.delta import deltas_of
from deltatune.methods import METHODS
from tests.conftest import BUILDERS, logits, perturb, tiny_bert


@dataclasses.dataclass
class Row:
    id: str
    run: Callable[[Path, pytest.MonkeyPatch], object]
    error: type[Exception]
    problem: str  # regex the message must contain: what is wrong
    fix: str      # regex the message must contain: what to do


def _saved(tmp_path: Path, arch: str = "bert", name: str = "ck") -> Path:
    model = BUILDERS[arch]()
    delta = dt.attach(model, dt.LoRA(r=2, targets="all-linear"))
    perturb(delta)
    return delta.save(tmp_path / name)


def _edit_meta(where: Path, change: Callable[[dict], object]) -> Path:
    meta = json.loads((where / CONFIG_FILE).read_text())
    change(meta)
    (where / CONFIG_FILE).write_text(json.dumps(meta))
    return where


def _flip_byte(where: Path) -> Path:
    data = bytearray((where / TENSORS_FILE).read_bytes())
    data[len(data) - 5] ^= 0xFF  # inside the tensor data: the header still parses, the numbers are wrong
    (where / TENSORS_FILE).write_bytes(bytes(data))
    return where


def _swap_tensor_file(tmp_path: Path) -> Path:
    """The tensor file of one save next to the JSON of another: the mix a torn copy would produce."""
    first, second = _saved(tmp_path, name="a"), _saved(tmp_path, name="b")
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.LoRA(r=2, targets="all-linear"))
    perturb(delta, seed=5)
    delta.save(second)
    (first / TENSORS_FILE).write_bytes((second / TENSORS_FILE).read_bytes())
    return first


def _delta(arch: str = "bert"):
    return dt.attach(BUILDERS[arch](), dt.LoRA(r=2, targets=["query"] if arch == "bert" else "all-linear"))


def _raise(error: BaseException):
    def fail(*args, **kwargs):
        raise error
    return fail


def _disk_full_in_tensors(tmp_path, mp):
    # what safetensors really raises on a full disk (seen on a 64 KiB tmpfs): not an OSError
    mp.setattr(checkpoint, "save_file", _raise(SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)")))
    return _delta().save(tmp_path / "ck")


def _disk_full_in_json(tmp_path, mp):
    mp.setattr(Path, "write_text", _raise(OSError(errno.ENOSPC, "No space left on device")))
    return _delta().save(tmp_path / "ck")


def _read_only(tmp_path, mp):
    mp.setattr(checkpoint.tempfile, "mkdtemp", _raise(OSError(errno.EROFS, "Read-only file system")))
    return _delta().save(tmp_path / "ck")


def _permission_denied_on_rename(tmp_path, mp):
    mp.setattr(checkpoint.os, "replace", _raise(PermissionError(errno.EACCES, "Permission denied")))
    return _delta().save(tmp_path / "ck")


def _merged_disk_full(tmp_path, mp):
    delta = _delta()
    mp.setattr(type(delta.model), "save_pretrained", _raise(OSError(errno.ENOSPC, "No space left on device")))
    return dt.merge_and_save(delta, tmp_path / "merged")


def _foreign_dir(tmp_path, mp):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("the user's own file")
    return _delta().save(tmp_path / "runs")


def _onto_file(tmp_path, mp):
    (tmp_path / "out").write_text("a file")
    return _delta().save(tmp_path / "out")


def _peft_bad_config(tmp_path, mp):
    dt.export_peft(_delta(), tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    cfg["r"] = 0
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(cfg))
    return dt.import_peft(tiny_bert(), tmp_path / "p")


def _load_twice(tmp_path, mp):
    model = tiny_bert()
    dt.load(model, _saved(tmp_path))
    return dt.load(model, tmp_path / "ck")


ROWS = [
    # -- attach ------------------------------------------------------------------------------------------
    Row("unknown-target", lambda t, m: dt.attach(tiny_bert(), dt.LoRA(targets=["qurey"])),
        dt.TargetError, r"'qurey' matched no module", r"Did you mean \['query'"),
    Row("empty-targets", lambda t, m: dt.attach(tiny_bert(), dt.LoRA(targets=[])),
        dt.TargetError, r"targets is empty", r"give module names such as"),
    Row("regex-matches-nothing", lambda t, m: dt.attach(tiny_bert(), dt.LoRA(targets="re:.*\\.q_proj")),
        dt.TargetError, r"matched no module", r"re:<regex>"),
    Row("layers-out-of-range", lambda t, m: dt.attach(tiny_bert(), dt.LoRA(targets=["query"], layers=[7])),
        dt.TargetError, r"layers=\[7\] selects none", r"this model has layers \[0\]\.\.\[1\]"),
    Row("target-of-wrong-type", lambda t, m: dt.attach(tiny_bert(), dt.LoRA(targets=["attention"])),
        dt.TargetError, r"matches modules of type", r"name a submodule instead"),
    Row("unknown-train-module", lambda t, m: dt.attach(tiny_bert(), dt.LoRA(), train_modules=["clasifier"]),
        dt.TargetError, r"'clasifier' matched no module", r"classifier"),
    Row("not-a-model", lambda t, m: dt.attach({"weights": 1}, dt.LoRA()),
        dt.AttachError, r"expects a torch nn.Module", r"transformers model"),
    Row("not-a-config", lambda t, m: dt.attach(tiny_bert(), "lora"),
        dt.ConfigError, r"'lora' is not a delta method config", r"dt.LoRA\(r=8\)"),
    Row("same-tensor-twice", lambda t, m: dt.attach(tiny_bert(), dt.BitFit(), dt.BitFit()),
        dt.AttachError, r"would train the same tensor twice", r"drop the duplicate method config"),
    Row("name-taken-by-load", _load_twice,
        dt.AttachError, r"already attached", r"pass name="),
    # -- reading checkpoints -----------------------------------------------------------------------------
    Row("checkpoint-missing", lambda t, m: dt.load(tiny_bert(), t / "nothing"),
        dt.CheckpointNotFoundError, r"nothing", r"does not exist"),
    Row("checkpoint-is-a-file", lambda t, m: dt.load(tiny_bert(), _saved(t) / TENSORS_FILE),
        dt.CheckpointNotFoundError, r"is a file", r"pass that directory"),
    Row("checkpoint-other-base", lambda t, m: dt.load(BUILDERS["llama"](), _saved(t, "gpt2")),
        dt.BaseModelMismatchError, r"GPT2LMHeadModel.*LlamaForCausalLM", r"Load it onto the base model"),
    Row("checkpoint-other-size", lambda t, m: dt.load(tiny_bert(num_labels=5), _saved(t)),
        dt.BaseModelMismatchError, r"different parameter shapes", r"check_base=False"),
    Row("checkpoint-no-fingerprint", lambda t, m: dt.load(tiny_bert(), _edit_meta(_saved(t),
                                                                                  lambda d: d.pop("base_model"))),
        dt.BaseModelMismatchError, r"saved for a None", r"Load it onto the base model"),
    Row("tensors-truncated-to-zero", lambda t, m: dt.load(tiny_bert(), _truncate(_saved(t), 0)),
        dt.CheckpointError, r"does not match the checksum", r"Re-save the delta or use another checkpoint"),
    Row("tensors-header-only", lambda t, m: dt.load(tiny_bert(), _truncate(_saved(t), 40)),
        dt.CheckpointError, r"truncated or corrupt", r"use another checkpoint"),
    Row("tensors-one-byte-flipped", lambda t, m: dt.load(tiny_bert(), _flip_byte(_saved(t))),
        dt.CheckpointError, r"does not match the checksum", r"use another checkpoint"),
    Row("tensors-from-another-save", lambda t, m: dt.load(tiny_bert(), _swap_tensor_file(t)),
        dt.CheckpointError, r"does not match the checksum", r"use another checkpoint"),
    Row("tensors-missing", lambda t, m: dt.load(tiny_bert(), _unlink(_saved(t), TENSORS_FILE)),
        dt.CheckpointNotFoundError, r"delta.safetensors is missing", r"checkpoint is incomplete"),
    Row("tensors-path-escapes-dir", lambda t, m: dt.load(tiny_bert(), _edit_meta(
        _saved(t), lambda d: d["tensors"].update(file="../elsewhere.safetensors"))),
        dt.CheckpointError, r"must name a file inside the checkpoint", r"not written by deltatune"),
    Row("json-truncated", lambda t, m: dt.load(tiny_bert(), _truncate(_saved(t), 25, CONFIG_FILE)),
        dt.CheckpointError, r"not valid JSON", r"checkpoint is corrupt"),
    Row("json-not-an-object", lambda t, m: dt.load(tiny_bert(), _write(_saved(t), CONFIG_FILE, "[1, 2]")),
        dt.CheckpointError, r"has no format_version", r"not a deltatune checkpoint"),
    Row("json-newer-format", lambda t, m: dt.load(tiny_bert(), _edit_meta(
        _saved(t), lambda d: d.update(format_version=2, deltatune_version="9.0"))),
        dt.CheckpointError, r"format 2, newer than this deltatune supports \(1\)", r"upgrade deltatune.*9\.0"),
    Row("json-format-not-int", lambda t, m: dt.load(tiny_bert(), _edit_meta(
        _saved(t), lambda d: d.update(format_version="2"))),
        dt.CheckpointError, r"format_version is '2', not an integer", r"corrupt"),
    Row("json-unknown-method", lambda t, m: dt.load(tiny_bert(), _edit_meta(
        _saved(t), lambda d: d["methods"][0]["config"].update(method="loraa"))),
        dt.CheckpointError, r"unknown method 'loraa'", r"known methods: .*lora"),
    Row("json-bad-hyperparameter", lambda t, m: dt.load(tiny_bert(), _edit_meta(
        _saved(t), lambda d: d["methods"][0]["config"].update(r="eight"))),
        dt.CheckpointError, r"lora\.r must be an integer, got 'eight'", r"lora\.r must be"),
    Row("peft-config-invalid", _peft_bad_config,
        dt.CheckpointError, r"adapter_config.json has unusable LoRA settings: lora\.r", r"Re-export the adapter"),
    # -- writing checkpoints -----------------------------------------------------------------------------
    Row("disk-full-tensors", _disk_full_in_tensors,
        dt.CheckpointError, r"No space left on device", r"disk is full: free some space"),
    Row("disk-full-json", _disk_full_in_json,
        dt.CheckpointError, r"No space left on device", r"disk is full: free some space"),
    Row("disk-full-merged-model", _merged_disk_full,
        dt.CheckpointError, r"could not write .*merged: No space left", r"disk is full"),
    Row("read-only-dir", _read_only,
        dt.CheckpointError, r"Read-only file system", r"not writable .*choose a writable one"),
    Row("permission-denied-rename", _permission_denied_on_rename,
        dt.CheckpointError, r"Permission denied", r"choose a writable one"),
    Row("save-into-foreign-dir", _foreign_dir,
        dt.CheckpointError, r"already holds files this save would not write \(\['notes.txt'\]\)",
        r"Save to a new or empty directory"),
    Row("save-onto-a-file", _onto_file,
        dt.CheckpointError, r"exists and is a file", r"choose another path"),
]


def _truncate(where: Path, size: int, name: str = TENSORS_FILE) -> Path:
    data = (where / name).read_bytes()
    (where / name).write_bytes(data[:size])
    return where


def _unlink(where: Path, name: str) -> Path:
    (where / name).unlink()
    return where


def _write(where: Path, name: str, text: str) -> Path:
    (where / name).write_text(text)
    return where


def check_message(error: BaseException, problem: str, fix: str) -> None:
    """A user-facing message: names the problem, says the fix, one short paragraph, no torch internals."""
    msg = str(error)
    assert isinstance(error, dt.DeltaError), f"{type(error).__name__}: {msg}"
    assert re.search(problem, msg), f"problem {problem!r} not in: {msg}"
    assert re.search(fix, msg), f"fix {fix!r} not in: {msg}"
    assert "Traceback" not in msg and msg.count("\n") <= 2 and len(msg) < 1200, msg


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_catalogue(row: Row, tmp_path, monkeypatch):
    with pytest.raises(row.error) as info:
        row.run(tmp_path, monkeypatch)
    check_message(info.value, row.problem, row.fix)


# -- every registered method --------------------------------------------------------------------------

def _fields(kinds: set[type]) -> list[tuple[str, str, typing.Any]]:
    """(method, field, annotation) for every registered config field whose annotation allows ``kinds``."""
    out = []
    for name, method in sorted(METHODS.items()):
        hints = typing.get_type_hints(method.config)
        for f in dataclasses.fields(method.config):
            args = typing.get_args(hints[f.name]) or (hints[f.name],)
            if kinds & set(args):
                out.append((name, f.name, hints[f.name]))
    return out


NUMERIC = _fields({int, float})
SIGN_FREE = {"seed"}  # integer fields where a negative value is meaningful


def _bad_values(name: str, annotation: typing.Any) -> list:
    args = set(typing.get_args(annotation) or (annotation,))
    values: list = ["8", [1], float("nan"), True]
    if int in args and float not in args:
        values.append(2.5)
        if name not in SIGN_FREE:
            values.append(-1)
    if float in args:
        values += [float("inf"), "1e-3"]  # YAML reads 1e-3 (no dot) as a string
    return values


def test_registry_has_the_methods():
    assert {"lora", "adapter", "bitfit", "ia3", "prefix", "prompt"} <= set(METHODS)
    assert len(NUMERIC) >= 8


@pytest.mark.parametrize("method,field,annotation", NUMERIC, ids=[f"{m}.{f}" for m, f, _ in NUMERIC])
def test_every_numeric_hyperparameter_is_validated(method, field, annotation):
    cls = METHODS[method].config
    for value in _bad_values(field, annotation):
        with pytest.raises(dt.ConfigError, match=rf"^{method}\.{field} must be .*got {re.escape(repr(value))}"):
            cls(**{field: value})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_field_rejects_a_wrong_type(method):
    """A value of a type no annotation allows (a mapping for a scalar, a list for a mapping) names the field."""
    cls = METHODS[method].config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        is_mapping = typing.get_origin(hints[f.name]) is dict
        value = ["x"] if is_mapping else {"nested": {"x": 1}}
        with pytest.raises(dt.ConfigError, match=rf"^{method}\.{f.name}\b"):
            cls(**{f.name: value})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_config_mutated_after_construction_is_rechecked_at_attach(method):
    cls = METHODS[method].config
    cfg = cls()
    field = dataclasses.fields(cls)[0].name
    setattr(cfg, field, {"nested": 1})
    model = tiny_bert()
    others = [dt.LoRA(targets=["query"])] if METHODS[method].sees_delta else []  # gates act on other methods
    with pytest.raises(dt.ConfigError, match=rf"{method}\.{field}"):
        dt.attach(model, *others, cfg)
    assert deltas_of(model) == {}


TARGETED = [n for n, m in sorted(METHODS.items()) if "targets" in {f.name for f in dataclasses.fields(m.config)}]


@pytest.mark.parametrize("method", TARGETED)
@pytest.mark.parametrize("targets,match", [(["qurey"], r"'qurey' matched no module"),
                                           ("re:nothing\\..*", r"matched no module"),
                                           ([], r"targets is empty")],
                         ids=["misspelt", "regex", "empty"])
def test_every_targeted_method_names_a_bad_target(method, targets, match):
    model = tiny_bert()
    before = {n: (type(m), m) for n, m in model.named_modules()}
    weights = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(dt.TargetError, match=match) as info:
        dt.attach(model, METHODS[method].config(targets=targets))
    assert re.search("module names|such as", str(info.value), re.I)  # the fix: names to use
    assert {n: (type(m), m) for n, m in model.named_modules()} == before
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


# -- failures leave what was there ---------------------------------------------------------------------

def test_failed_attach_restores_requires_grad_flags():
    """The rollback of a failed attach puts back the user's flags (BitFit had marked, then frozen, biases)."""
    model = tiny_bert()
    model.bert.embeddings.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(dt.AttachError):
        dt.attach(model, dt.BitFit(), dt.BitFit())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert deltas_of(model) == {}


WRITE_FAILURES = ["disk-full-tensors", "disk-full-json", "read-only-dir", "permission-denied-rename"]


@pytest.mark.parametrize("row_id", WRITE_FAILURES)
def test_failed_write_keeps_previous_checkpoint_and_leaves_no_debris(row_id, tmp_path, monkeypatch):
    """A second save that fails (any way) leaves the first checkpoint loadable, bit for bit, and no temp dirs."""
    row = next(r for r in ROWS if r.id == row_id)
    model = tiny_bert()
    delta = dt.attach(model, dt.LoRA(r=2, targets=["query"]))
    perturb(delta)
    tuned = logits(model)
    target = delta.save(tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(dt.CheckpointError):
        row.run(tmp_path, monkeypatch)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    fresh = tiny_bert()
    dt.load(fresh, target)
    assert torch.equal(logits(fresh), tuned)


def test_foreign_directory_is_left_alone(tmp_path, monkeypatch):
    with pytest.raises(dt.CheckpointError):
        _foreign_dir(tmp_path, monkeypatch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    _delta().save(tmp_path / "empty")  # an empty directory is fine to fill
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == sorted([CONFIG_FILE, TENSORS_FILE])


def test_nan_checkpoint_loads_with_a_warning(tmp_path, caplog):
    """A checkpoint of a diverged run is loadable (it is the user's data) but never silently."""
    where = _edit_meta(_saved(tmp_path), lambda d: d["tensors"].pop("sha256"))
    from safetensors.torch import load_file

    tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(where / TENSORS_FILE).items()}
    save_file(tensors, where / TENSORS_FILE)
    logger = logging.getLogger("deltatune")  # the CLI (run earlier in this process) stops its propagation
    logger.addHandler(caplog.handler)
    try:
        dt.load(tiny_bert(), where)
    finally:
        logger.removeHandler(caplog.handler)
    assert "NaN/inf" in caplog.text and "diverged" in caplog.text


# -- a real full / read-only file system (a tiny tmpfs: the `mount` fixture in conftest.py) ---------

def test_real_full_disk_keeps_previous_checkpoint(mount):
    fs = mount("size=128k")
    model = tiny_bert()
    small = dt.attach(model, dt.LoRA(r=1, targets=["query"]), name="small")
    perturb(small)
    small.save(fs / "ck")
    tuned = logits(model)
    big = dt.attach(model, dt.LoRA(r=64, targets="all-linear"), name="big")  # ~250 KB of tensors
    with pytest.raises(dt.CheckpointError) as info:
        big.save(fs / "ck")
    check_message(info.value, r"No space left on device", r"disk is full: free some space")
    assert sorted(p.name for p in fs.iterdir()) == ["ck"]  # the partial temp dir is gone
    fresh = tiny_bert()
    dt.load(fresh, fs / "ck")
    assert torch.equal(logits(fresh), tuned)


def test_real_read_only_file_system(mount):
    fs = mount("ro,size=64k")
    with pytest.raises(dt.CheckpointError) as info:
        _delta().save(fs / "ck")
    check_message(info.value, r"Read-only file system", r"not writable")
