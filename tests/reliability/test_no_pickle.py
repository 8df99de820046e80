"""No pickle: deltatune reads only safetensors, JSON and YAML (safe_load); a pickle needs an explicit opt-in.

Two kinds of checks: a scan of the package source for every way Python code can unpickle or execute
data (it must find nothing outside the one audited opt-in), and runtime tests with a live malicious pickle
(its ``__reduce__`` writes a marker file) that must be refused with and without ``allow_pickle=True``.
"""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.core.delta import deltas_of
from tests.conftest import BUILDERS, logits, perturb

PACKAGE = Path(dt.__file__).resolve().parent
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}
UNSAFE_YAML_LOADERS = {"Loader", "UnsafeLoader", "FullLoader", "CLoader", "CUnsafeLoader", "CFullLoader"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
# keyword=True constants that switch a library into pickle or remote-code mode
UNSAFE_FLAGS = {"trust_remote_code": True, "allow_pickle": True, "use_safetensors": False, "weights_only": False}
# The audited exceptions: file -> calls allowed there. peft.py reads adapter_model.bin only when the user
# passes allow_pickle=True, through torch.load(weights_only=True) (checked below like every call).
ALLOWED_TORCH_LOAD = {"interop/peft.py"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _call_problems(call: ast.Call, rel: str) -> list[str]:
    name = _dotted(call.func)
    kwargs = {k.arg: k.value for k in call.keywords if k.arg}
    problems = []
    if name in ("eval", "exec", "compile", "__import__"):
        problems.append(f"{name}() runs arbitrary code")
    if name.endswith("read_pickle"):
        problems.append(f"{name}() unpickles")
    if name == "torch.load" or name.endswith(".torch.load"):
        weights_only = kwargs.get("weights_only")
        if rel not in ALLOWED_TORCH_LOAD:
            problems.append("torch.load outside the audited allow_pickle path")
        if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            problems.append("torch.load without weights_only=True")
    if name.startswith("yaml.") and name.split(".")[-1] in UNSAFE_YAML:
        loader = _dotted(kwargs["Loader"]).split(".")[-1] if "Loader" in kwargs else ""
        if loader not in SAFE_YAML_LOADERS:
            problems.append(f"{name} without a safe Loader (use yaml.safe_load)")
    for key, bad in UNSAFE_FLAGS.items():
        value = kwargs.get(key)
        if isinstance(value, ast.Constant) and value.value is bad:
            problems.append(f"{key}={bad}")
    return problems


def scan(source: str, rel: str = "<test>") -> list[str]:
    """Every unsafe deserialisation / code-execution construct in ``source``, as "file:line: what"."""
    found = []
    for node in ast.walk(ast.parse(source)):
        problems: list[str] = []
        if isinstance(node, ast.Import):
            problems = [f"imports {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            problems = [f"imports from {node.module}"]
        elif isinstance(node, ast.Call):
            problems = _call_problems(node, rel)
        elif isinstance(node, ast.Attribute) and node.attr in UNSAFE_YAML_LOADERS and _dotted(node.value) == "yaml":
            problems = [f"uses yaml.{node.attr}"]
        found += [f"{rel}:{node.lineno}: {p}" for p in problems]
    return found


def test_package_source_has_no_unsafe_loading():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the whole package, not an empty glob
    found = [p for f in files for p in scan(f.read_text(), f.relative_to(PACKAGE).as_posix())]
    assert found == []


def test_the_one_torch_load_is_weights_only():
    source = (PACKAGE / "interop" / "peft.py").read_text()
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and _dotted(n.func) == "torch.load"]
    assert len(calls) == 1
    assert scan(source, "interop/peft.py") == []


@pytest.mark.parametrize("snippet", [
    "import pickle", "import _pickle as p", "from dill import loads", "import joblib", "import marshal",
    "torch.load(f)", "torch.load(f, weights_only=False)", "x = yaml.load(s)", "yaml.load(s, Loader=yaml.Loader)",
    "yaml.full_load(s)", "yaml.unsafe_load(s)", "eval(text)", "exec(code)", "pd.read_pickle(p)",
    "np.load(p, allow_pickle=True)", "AutoModel.from_pretrained(p, trust_remote_code=True)",
    "AutoModel.from_pretrained(p, use_safetensors=False)", "yaml.add_constructor('!x', f, Loader=yaml.UnsafeLoader)",
])
def test_scanner_catches(snippet):
    """The scan above would fail on each of these (so its empty result means something)."""
    assert scan(snippet, "core/x.py"), snippet


@pytest.mark.parametrize("snippet", [
    "yaml.safe_load(s)", "yaml.load(s, Loader=yaml.SafeLoader)", "model.eval()", "json.loads(s)",
    "load_file(p)", "torch.save(x, p)", "from_pretrained(p, trust_remote_code=cfg.trust)",
])
def test_scanner_allows(snippet):
    assert scan(snippet, "core/x.py") == []


# -- runtime: a live malicious pickle ------------------------------------------------------------------

class Payload:
    """Unpickling this runs ``os.system("touch <marker>")``: what a hostile adapter_model.bin would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def peft_dir(tmp_path):
    """A PEFT adapter directory (exported by deltatune) and the outputs it gives."""
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.LoRA(r=2, alpha=4, targets=["query", "value"]))
    perturb(delta, std=0.05)
    dt.export_peft(delta, tmp_path / "adapter")
    return tmp_path / "adapter", logits(model)


def _to_bin(where: Path, extra: dict | None = None, raw_pickle: bool = False) -> None:
    """Replace adapter_model.safetensors by an adapter_model.bin (torch.save zip, or a bare pickle)."""
    state = dict(load_file(where / "adapter_model.safetensors"))
    state.update(extra or {})
    (where / "adapter_model.safetensors").unlink()
    if raw_pickle:
        (where / "adapter_model.bin").write_bytes(pickle.dumps(state))
    else:
        torch.save(state, where / "adapter_model.bin")


def test_payload_is_live(tmp_path):
    """Plain unpickling really runs the payload, so the refusals below are refusals of a working attack."""
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_bin_adapter_needs_opt_in(peft_dir):
    where, _ = peft_dir
    _to_bin(where)
    model = BUILDERS["bert"]()
    with pytest.raises(dt.CheckpointError, match=r"pickle.*allow_pickle=True.*safe_serialization"):
        dt.import_peft(model, where)
    assert deltas_of(model) == {}


def test_bin_adapter_with_opt_in_loads_same_outputs(peft_dir):
    where, tuned = peft_dir
    _to_bin(where)
    model = BUILDERS["bert"]()
    dt.import_peft(model, where, allow_pickle=True)
    assert torch.equal(logits(model), tuned)


@pytest.mark.parametrize("raw_pickle", [False, True], ids=["torch-zip", "bare-pickle"])
@pytest.mark.parametrize("allow_pickle", [False, True])
def test_malicious_pickle_refused(peft_dir, tmp_path, raw_pickle, allow_pickle):
    where, _ = peft_dir
    marker = tmp_path / "pwned"
    _to_bin(where, {"evil": Payload(marker)}, raw_pickle=raw_pickle)
    model = BUILDERS["bert"]()
    before = {n: p.clone() for n, p in model.named_parameters()}
    match = "refused by torch.load" if allow_pickle else "allow_pickle=True"
    with pytest.raises(dt.CheckpointError, match=match):
        dt.import_peft(model, where, allow_pickle=allow_pickle)
    assert not marker.exists()
    assert deltas_of(model) == {}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bin_with_non_tensor_values_refused(peft_dir):
    where, _ = peft_dir
    _to_bin(where, {"note": "plain strings pass weights_only but are not weights"})
    with pytest.raises(dt.CheckpointError, match="mapping of names to tensors"):
        dt.import_peft(BUILDERS["bert"](), where, allow_pickle=True)


def test_truncated_bin_is_a_checkpoint_error(peft_dir):
    where, _ = peft_dir
    _to_bin(where)
    data = (where / "adapter_model.bin").read_bytes()
    (where / "adapter_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(dt.CheckpointError, match="refused by torch.load"):
        dt.import_peft(BUILDERS["bert"](), where, allow_pickle=True)


def test_safetensors_paths_never_unpickle(peft_dir, tmp_path, monkeypatch):
    """dt.load and dt.import_peft work with every unpickling entry point disabled."""
    where, tuned = peft_dir
    model = BUILDERS["bert"]()
    delta = dt.attach(model, dt.LoRA(r=2, targets=["key"]), train_modules=["classifier"])
    perturb(delta)
    delta.save(tmp_path / "ck")

    def refuse(*args, **kwargs):
        raise AssertionError("deltatune tried to unpickle")

    for target in (pickle, torch):
        for name in ("load", "loads", "Unpickler"):
            if hasattr(target, name):
                monkeypatch.setattr(target, name, refuse)
    fresh = BUILDERS["bert"]()
    dt.load(fresh, tmp_path / "ck")
    assert torch.equal(logits(fresh), logits(model))
    other = BUILDERS["bert"]()
    dt.import_peft(other, where, allow_pickle=True)  # safetensors present: the flag must not matter
    assert torch.equal(logits(other), tuned)


# -- the CLI's base model: safetensors only, unless model.allow_pickle -------------------------------------

def _bin_model(src: Path, dst: Path, extra: dict | None = None) -> Path:
    """A copy of the saved tiny model with its weights as pytorch_model.bin (the pre-safetensors layout)."""
    import shutil

    shutil.copytree(src, dst)
    state = dict(load_file(dst / "model.safetensors"))
    state.update(extra or {})
    (dst / "model.safetensors").unlink()
    torch.save(state, dst / "pytorch_model.bin")
    return dst


def _train(make_config, model_dir: Path, allow: bool):
    from typer.testing import CliRunner

    from deltatune.cli import app

    path = make_config(model__path=str(model_dir), model__allow_pickle=allow, train__max_steps=1)
    return CliRunner().invoke(app, ["train", str(path)])


def test_cli_refuses_a_pickled_base_model_without_opt_in(make_config, cli_model, tmp_path):
    result = _train(make_config, _bin_model(cli_model, tmp_path / "bin"), allow=False)
    assert result.exit_code == 2
    assert "pytorch_model.bin, a pickle file" in result.stderr and "model.allow_pickle: true" in result.stderr


def test_cli_loads_a_pickled_base_model_with_opt_in(make_config, cli_model, tmp_path):
    result = _train(make_config, _bin_model(cli_model, tmp_path / "bin"), allow=True)
    assert result.exit_code == 0, result.stderr[-1500:]


def test_cli_refuses_a_malicious_base_model_even_with_opt_in(make_config, cli_model, tmp_path):
    marker = tmp_path / "pwned"
    model_dir = _bin_model(cli_model, tmp_path / "bin", {"evil": Payload(marker)})
    result = _train(make_config, model_dir, allow=True)
    assert result.exit_code == 2 and "refused by torch.load(weights_only=True)" in result.stderr
    assert not marker.exists()
