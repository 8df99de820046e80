"""Delta checkpoints: small, safetensors-only, exact roundtrip, atomic, and refused when they don't fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
from deltatune.core.checkpoint import CONFIG_FILE, TENSORS_FILE
from tests.conftest import BUILDERS, logits, perturb, tiny_bert


@pytest.fixture
def saved(tmp_path):
    model = tiny_bert()
    delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["query", "value"]), train_modules=["classifier"])
    perturb(delta)
    delta.save(tmp_path / "ck")
    return tmp_path / "ck", logits(model), delta


def test_roundtrip_identical_outputs_every_arch(arch, tmp_path):
    model = BUILDERS[arch]()
    delta = dt.attach(model, dt.LoRA(r=4, targets="all-linear"))
    perturb(delta)
    delta.save(tmp_path / "ck")
    fresh = BUILDERS[arch](seed=0)
    loaded = dt.load(fresh, tmp_path / "ck")
    assert torch.equal(logits(fresh), logits(model))
    assert loaded.num_trainable() == delta.num_trainable()


def test_checkpoint_contents(saved):
    where, _, delta = saved
    assert sorted(p.name for p in where.iterdir()) == sorted([CONFIG_FILE, TENSORS_FILE])
    tensors = load_file(where / TENSORS_FILE)
    assert set(tensors) == set(delta.state_dict())
    assert sum(t.numel() for t in tensors.values()) == delta.num_trainable()
    meta = json.loads((where / CONFIG_FILE).read_text())
    assert meta["format_version"] == 1 and meta["deltatune_version"] == dt.__version__
    assert meta["methods"][0]["config"]["r"] == 4 and meta["train_modules"] == ["classifier"]
    assert meta["base_model"]["class"] == "BertForSequenceClassification"
    assert (where / TENSORS_FILE).stat().st_size < 16 * 1024


def test_load_leaves_fresh_model_trainable_like_attach(saved):
    where, tuned, _ = saved
    model = tiny_bert()
    delta = dt.load(model, where)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if ".lora_" in n or n.startswith("classifier.copy.")}
    assert torch.equal(logits(model), tuned)
    assert delta.name == "default"


def test_missing_checkpoint(tmp_path):
    with pytest.raises(dt.CheckpointNotFoundError, match="nope"):
        dt.load(tiny_bert(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        dt.load(tiny_bert(), tmp_path / "empty")


def test_wrong_base_model_is_named(saved):
    where, _, _ = saved
    model = BUILDERS["llama"]()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(dt.BaseModelMismatchError, match="BertForSequenceClassification.*LlamaForCausalLM"):
        dt.load(model, where)
    assert dt.inspect(model).count("0 delta(s)") == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_same_class_other_shapes_refused(saved):
    where, _, _ = saved
    with pytest.raises(dt.BaseModelMismatchError, match="shapes"):
        dt.load(tiny_bert(num_labels=3), where)


def test_check_base_false_then_key_shapes_are_checked(saved):
    where, _, _ = saved
    model = tiny_bert(num_labels=3)
    with pytest.raises(dt.CheckpointError, match=r"other shapes.*classifier"):
        dt.load(model, where, check_base=False)
    assert not any(n for n, _ in model.named_parameters() if "lora" in n)  # rolled back


def test_truncated_tensor_file(saved):
    where, _, _ = saved
    data = (where / TENSORS_FILE).read_bytes()
    (where / TENSORS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(dt.CheckpointError, match="truncated or corrupt"):
        dt.load(tiny_bert(), where)


def test_corrupt_tensor_file_without_checksum(saved):
    where, _, _ = saved
    meta = json.loads((where / CONFIG_FILE).read_text())
    meta["tensors"].pop("sha256")
    (where / CONFIG_FILE).write_text(json.dumps(meta))
    (where / TENSORS_FILE).write_bytes(b"\x00" * 100)
    with pytest.raises(dt.CheckpointError, match="safetensors"):
        dt.load(tiny_bert(), where)


def test_corrupt_json_and_newer_format(saved):
    where, _, _ = saved
    good = (where / CONFIG_FILE).read_text()
    (where / CONFIG_FILE).write_text(good[:40])
    with pytest.raises(dt.CheckpointError, match="not valid JSON"):
        dt.load(tiny_bert(), where)
    meta = json.loads(good)
    meta["format_version"] = 99
    (where / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(dt.CheckpointError, match="upgrade deltatune"):
        dt.load(tiny_bert(), where)


def test_unknown_method_or_field_in_json(saved):
    where, _, _ = saved
    meta = json.loads((where / CONFIG_FILE).read_text())
    meta["methods"][0]["config"]["rank"] = 3
    (where / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(dt.CheckpointError, match="rank"):
        dt.load(tiny_bert(), where)


def test_missing_and_extra_keys_are_listed(tmp_path, saved):
    where, _, _ = saved
    tensors = load_file(where / TENSORS_FILE)
    key = sorted(tensors)[0]
    tensors["lora:bogus.lora_A"] = tensors.pop(key)
    from deltatune.core.checkpoint import save_checkpoint

    meta = json.loads((where / CONFIG_FILE).read_text())
    save_checkpoint(tmp_path / "bad", tensors, {k: v for k, v in meta.items() if k != "tensors"})
    with pytest.raises(dt.CheckpointError, match=r"1 missing.*1 unexpected"):
        dt.load(tiny_bert(), tmp_path / "bad")


def test_save_replaces_atomically_and_cleans_up(saved):
    where, _, delta = saved
    perturb(delta, seed=3)
    delta.save(where)
    siblings = sorted(p.name for p in where.parent.iterdir())
    assert siblings == ["ck"]
    assert torch.equal(load_file(where / TENSORS_FILE)[sorted(delta.state_dict())[0]],
                       delta.state_dict()[sorted(delta.state_dict())[0]])


def test_crash_during_save_keeps_previous_checkpoint(saved):
    """A process killed (os._exit) in the middle of writing must leave the old checkpoint loadable."""
    where, tuned, _ = saved
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(os.getcwd())!r})
        import deltatune as dt
        from deltatune.core import checkpoint
        from tests.conftest import tiny_bert, perturb
        model = tiny_bert()
        delta = dt.attach(model, dt.LoRA(r=4, alpha=8, targets=["query", "value"]), train_modules=["classifier"])
        perturb(delta, seed=99)
        real = checkpoint.save_file
        def dying_save(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            os._exit(9)   # crash after the tensors, before the JSON and the rename
        checkpoint.save_file = dying_save
        delta.save({str(where)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-500:]
    model = tiny_bert()
    dt.load(model, where)
    assert torch.equal(logits(model), tuned)


def test_unwritable_destination(tmp_path, saved):
    _, _, delta = saved
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(dt.CheckpointError, match="writable"):
        delta.save(tmp_path / "a_file" / "ck")  # parent is a file: mkdir fails as on a read-only mount
    assert (tmp_path / "a_file").read_text() == "not a directory"


def test_merge_and_save_loads_with_plain_transformers(tmp_path, saved):
    from transformers import AutoModelForSequenceClassification

    _, tuned, delta = saved
    dt.merge_and_save(delta, tmp_path / "merged")
    assert not delta.is_merged  # returned to its previous state
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert type(plain.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    assert torch.allclose(logits(plain), tuned, atol=1e-5)
    delta.save(tmp_path / "merged2", merged=True)
    assert (tmp_path / "merged2" / "model.safetensors").exists()
    assert torch.allclose(logits(delta.model), tuned, atol=1e-6)


def test_merge_refused_on_tied_embeddings(tmp_path):
    model = BUILDERS["gpt2"]()  # GPT-2 ties wte to lm_head
    delta = dt.attach(model, dt.LoRA(r=2, targets=["c_attn", "wte"]))
    perturb(delta, std=0.05)
    tuned = logits(model)
    with pytest.raises(dt.StateError, match=r"tied to \['lm_head.weight'\]"):
        dt.merge_and_save(delta, tmp_path / "m")
    assert not delta.is_merged and torch.equal(logits(model), tuned)
    assert not (tmp_path / "m").exists()


def test_merge_and_save_causal_lm(tmp_path):
    from transformers import AutoModelForCausalLM

    model = BUILDERS["gpt2"]()
    delta = dt.attach(model, dt.LoRA(r=2, targets=["c_attn", "c_proj"]))
    perturb(delta, std=0.05)
    tuned = logits(model)
    dt.merge_and_save(delta, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.allclose(logits(plain), tuned, atol=1e-5)
