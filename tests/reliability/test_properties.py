"""Property-based tests (hypothesis): config parsing and attach -> save -> load -> detach on random inputs.

- Any dict given to ``config_from_dict`` (what a checkpoint's JSON or a YAML ``delta:`` entry holds) yields
  a valid config or a ConfigError, never another exception; a valid config survives a JSON round trip.
- On random tiny BERT / Llama / GPT-2 models and random method settings (every method, and pairs):
  attach either raises a DeltaError and leaves the model bit-for-bit untouched, or it works, and then
  save -> load onto a fresh copy gives identical outputs, and detach gives back the very same module
  objects with bitwise-identical tensors and the original requires_grad flags.
Examples are few (deadline off) so this stays a few seconds; hypothesis shrinks any failure it finds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import deltatune as dt
from deltatune.core.config import DeltaConfig, config_from_dict
from deltatune.methods import METHODS, config_classes

# DELTATUNE_HYPOTHESIS_SCALE=10 runs ten times the examples (a longer bug hunt; the suite uses 1)
SCALE = int(os.environ.get("DELTATUNE_HYPOTHESIS_SCALE", "1"))
FAST = settings(max_examples=25 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = sorted({f.name for m in METHODS.values() for f in dataclasses.fields(m.config)})

# -- config parsing ------------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["all-linear", "query", "kaiming", "houlsby", "all", "random", "1e-3", ""]),
                    st.text(max_size=4))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=3), inner, max_size=2)),
                      max_leaves=4)
method_names = st.one_of(st.sampled_from(sorted(METHODS)), st.none(), st.integers(), st.text(max_size=4),
                         st.lists(st.sampled_from(sorted(METHODS)), max_size=1))
config_dicts = st.builds(lambda m, body: {"method": m, **body}, method_names,
                         st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=3)), values, max_size=4))


@FAST
@given(data=st.one_of(config_dicts, values))
def test_config_from_any_dict_is_a_config_or_a_config_error(data):
    try:
        cfg = config_from_dict(data, config_classes())
    except dt.ConfigError as e:
        assert str(e)
        return
    assert isinstance(cfg, DeltaConfig)
    text = json.dumps(cfg.to_dict(), allow_nan=False)  # what a checkpoint writes: strict JSON
    assert config_from_dict(json.loads(text), config_classes()) == cfg


@FAST
@given(method=st.sampled_from(sorted(METHODS)), field=st.sampled_from(FIELDS), value=values)
def test_setting_any_field_to_anything_is_caught_at_attach(method, field, value):
    """The same guarantee for a config changed after construction (dt.attach re-checks it)."""
    cfg = METHODS[method].config()
    if field not in {f.name for f in dataclasses.fields(cfg)}:
        return
    setattr(cfg, field, value)
    try:
        cfg.check()
    except dt.ConfigError:
        return
    assert json.loads(json.dumps(cfg.to_dict(), allow_nan=False))["method"] == method


# -- attach -> save -> load -> detach ------------------------------------------------------------------

@st.composite
def tiny_models(draw):
    """(arch, builder) for a random small BERT, Llama (grouped KV heads) or GPT-2; builder(seed) -> model."""
    arch = draw(st.sampled_from(["bert", "llama", "gpt2"]))
    heads = draw(st.sampled_from([2, 4]))
    hidden = heads * draw(st.sampled_from([4, 8]))
    layers = draw(st.integers(1, 3))
    vocab = draw(st.integers(40, 90))
    if arch == "bert":
        cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=2 * hidden, max_position_embeddings=64,
                         num_labels=draw(st.integers(2, 4)))
        cls = BertForSequenceClassification
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=draw(st.sampled_from([1, heads])), intermediate_size=2 * hidden,
                          max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          tie_word_embeddings=draw(st.booleans()))
        cls = LlamaForCausalLM
    else:
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64)
        cls = GPT2LMHeadModel

    def build(seed: int = 0):
        torch.manual_seed(seed)
        return cls(cfg).eval()

    return arch, build, vocab


LINEAR_NAMES = {"bert": ["query", "key", "value", "dense"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"],
                "gpt2": ["c_attn", "c_proj", "c_fc"]}


@st.composite
def method_configs(draw, arch: str):
    name = draw(st.sampled_from(sorted(n for n, m in METHODS.items() if not m.sees_delta)))
    if name == "lora":
        targets = draw(st.one_of(st.just("all-linear"),
                                 st.lists(st.sampled_from(LINEAR_NAMES[arch]), min_size=1, max_size=3, unique=True)))
        return dt.LoRA(r=draw(st.integers(1, 6)), alpha=draw(st.floats(0.5, 32)), rslora=draw(st.booleans()),
                       dora=draw(st.booleans()), targets=targets, init=draw(st.sampled_from(["kaiming", "gaussian"])),
                       layers=draw(st.one_of(st.none(), st.just([0]))))
    if name == "adapter":
        return METHODS[name].config(kind=draw(st.sampled_from(["houlsby", "pfeiffer", "parallel"])),
                                    bottleneck=draw(st.integers(1, 8)), scale=draw(st.sampled_from([1.0, 4.0, -0.5])))
    if name == "ipt":
        tokens = draw(st.integers(1, 4))
        return METHODS[name].config(num_tokens=tokens, intrinsic_dim=draw(st.integers(1, 4 * tokens)))
    if name == "bitfit":
        return METHODS[name].config(which=draw(st.sampled_from(["all", "attention", "ffn", "norm"])))
    if name == "prefix":
        return METHODS[name].config(num_tokens=draw(st.integers(1, 4)),
                                    reparam_hidden=draw(st.sampled_from([None, 0, 8])))
    if name == "prompt":
        return METHODS[name].config(num_tokens=draw(st.integers(1, 4)))
    return METHODS[name].config()  # a method added later: its defaults


def _snapshot(model: torch.nn.Module):
    modules = {n: m for n, m in model.named_modules()}
    params = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    return modules, params


def _assert_same(model: torch.nn.Module, snapshot) -> None:
    modules, params = snapshot
    now = dict(model.named_modules())
    assert now.keys() == modules.keys() and all(now[n] is modules[n] for n in now)
    current = dict(model.named_parameters())
    assert current.keys() == params.keys()
    for n, (tensor, flag) in params.items():
        assert torch.equal(current[n], tensor) and current[n].requires_grad == flag, n


def _outputs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _perturb(delta, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@settings(max_examples=20 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_attach_save_load_detach_roundtrip(data):
    arch, build, vocab = data.draw(tiny_models())
    configs = data.draw(st.lists(method_configs(arch), min_size=1, max_size=2))
    gates = data.draw(st.booleans())
    ids = torch.randint(3, vocab, (2, data.draw(st.integers(2, 9))), generator=torch.Generator().manual_seed(0))
    model = build()
    base_out = _outputs(model, ids)
    before = _snapshot(model)
    try:
        delta = dt.attach(model, *configs, gates=gates)
    except dt.DeltaError as e:  # a combination this model can't take: then nothing may have changed
        event(f"refused: {type(e).__name__}: {str(e)[:90]}")
        _assert_same(model, before)
        return
    _perturb(delta, data.draw(st.integers(0, 100)))
    tuned = _outputs(model, ids)
    assert torch.isfinite(tuned).all()
    with tempfile.TemporaryDirectory() as tmp:
        delta.save(Path(tmp) / "ck")
        fresh = build()
        dt.load(fresh, Path(tmp) / "ck")
        assert torch.equal(_outputs(fresh, ids), tuned)
    delta.detach()
    _assert_same(model, before)
    assert torch.equal(_outputs(model, ids), base_out)


@settings(max_examples=15 * SCALE, deadline=None)
@given(r=st.integers(1, 16), alpha=st.floats(0.1, 64).filter(math.isfinite), rslora=st.booleans(),
       targets=st.lists(st.sampled_from(LINEAR_NAMES["bert"]), min_size=1, unique=True))
def test_lora_scaling_is_what_the_config_says(r, alpha, rslora, targets):
    """LoRA's effective update is B A * alpha / r (alpha / sqrt(r) with rslora) for any settings."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32)).eval()
    delta = dt.attach(model, dt.LoRA(r=r, alpha=alpha, rslora=rslora, targets=targets))
    _perturb(delta, 0)
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    lora = next(a for a in delta.attachments if a.config.method == "lora")
    for wrapper in lora.wrappers().values():
        expected = (wrapper.lora_B @ wrapper.lora_A) * scale
        assert torch.allclose(wrapper.delta_weight(), expected, rtol=1e-6, atol=1e-7)
        x = torch.randn(3, wrapper.lora_A.shape[1])
        with torch.no_grad():
            assert torch.allclose(wrapper(x), wrapper.base(x) + x @ expected.T, atol=1e-5)
