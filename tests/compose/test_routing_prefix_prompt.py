"""Per-sample routing of prefix and prompt deltas (dt.route): every sample of a routed batch gets exactly what it
gets when the whole batch runs through its own delta, with padding, in both attention implementations, mixed
with an additive method, and in cached generation."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.conftest import VOCAB, tiny_bert, tiny_gpt2, tiny_llama

IDS = torch.randint(3, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
MASK = torch.ones_like(IDS)
MASK[2, :3] = 0  # one left-padded row
NAMES = ["a", None, "b"]
MAKERS = {"prefix": lambda: dt.PrefixTuning(num_tokens=4, reparam_hidden=None),
          "prefix_mlp": lambda: dt.PrefixTuning(num_tokens=3, reparam_hidden=16),
          "prompt": lambda: dt.PromptTuning(num_tokens=4)}
BUILD = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}


def randomize(delta, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def two_deltas(arch: str, make_a, make_b=None, attn: str = "sdpa"):
    model = BUILD[arch]()
    model.set_attn_implementation(attn)
    randomize(dt.attach(model, make_a(), name="a", train_modules=None), 1)
    randomize(dt.attach(model, (make_b or make_a)(), name="b", train_modules=None), 2)
    return model


def outputs(model, name: str | None) -> torch.Tensor:
    """The whole batch through one named delta (None: the base), as a user would run it alone."""
    if name is None:
        dt.deactivate(model)
    else:
        dt.activate(model, name)
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def assert_rows_match(model, names=NAMES) -> None:
    alone = {n: outputs(model, n) for n in set(names)}
    with dt.route(model, names), torch.no_grad():
        mixed = model(input_ids=IDS, attention_mask=MASK).logits
    for i, name in enumerate(names):
        got, want = mixed[i], alone[name][i]
        if got.dim() == 2:  # per-token logits: the padded positions are not compared
            got, want = got[MASK[i].bool()], want[MASK[i].bool()]
        assert torch.allclose(got, want, atol=1e-5), (i, name, (got - want).abs().max())


@pytest.mark.parametrize("arch", sorted(BUILD))
@pytest.mark.parametrize("method", sorted(MAKERS))
def test_routed_batch_equals_each_delta_alone(arch, method):
    assert_rows_match(two_deltas(arch, MAKERS[method]))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_eager_attention_routes_prefixes_too(arch):
    assert_rows_match(two_deltas(arch, MAKERS["prefix"], attn="eager"))


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_prefix_prompt_and_lora_deltas_in_one_batch(arch):
    model = two_deltas(arch, MAKERS["prefix"], MAKERS["prompt"])
    randomize(dt.attach(model, dt.LoRA(r=4), name="c", train_modules=None), 3)
    assert_rows_match(model, ["a", "c", "b"])
    assert_rows_match(model, ["b", None, "c"])


@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "no-mask"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_routed_cached_generation_equals_each_delta_alone(method, padded):
    model = two_deltas("llama", MAKERS[method])
    kwargs = {"input_ids": IDS, "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    if padded:
        kwargs["attention_mask"] = MASK
    alone = {}
    for name in set(NAMES):
        if name is None:
            dt.deactivate(model)
        else:
            dt.activate(model, name)
        alone[name] = model.generate(**kwargs)
        uncached = model.generate(**kwargs, use_cache=False)
        assert torch.equal(alone[name], uncached)  # the delta alone: cached == uncached
    with dt.route(model, NAMES):
        mixed = model.generate(**kwargs)
    for i, name in enumerate(NAMES):
        assert torch.equal(mixed[i], alone[name][i]), (i, name)


def test_gates_leave_prefixes_ungated():
    model = tiny_llama()
    delta = dt.attach(model, dt.LoRA(r=4), dt.PrefixTuning(num_tokens=2), gates=True, train_modules=None)
    gated = {g.slot for att in delta.attachments if att.config.method == "gates" for g in att.modules.values()}
    assert gated == {"lora"}  # a prefix can be switched per sample, not scaled by a gate


def test_a_fractional_scale_on_a_prefix_is_refused():
    model = tiny_llama()
    delta = dt.attach(model, dt.PrefixTuning(num_tokens=2), train_modules=None)
    for module in delta.modules():
        module.sample_scale = torch.tensor([0.5, 1.0, 1.0])
    with pytest.raises(dt.StateError, match="0/1 mask"):
        model(input_ids=IDS)
