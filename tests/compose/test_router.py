"""The learned router (compose/router.py): it learns which named delta a sample belongs to, routes each forward
call exactly as dt.route would, keeps its choice through cached generation, mixes additive deltas in soft mode
(with gradients into the router), saves and loads, and refuses what it cannot do with a clear error."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.compose.router import _check_deltas
from tests.conftest import VOCAB, tiny_bert, tiny_llama

# two "domains" the router can tell apart from the words alone: low and high token ids
RANGES = {"a": (3, 50), "b": (50, VOCAB)}


def domain_batch(name: str, n: int, seed: int, length: int = 10) -> dict:
    lo, hi = RANGES[name]
    ids = torch.randint(lo, hi, (n, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "route": [name] * n}


def randomize(delta, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def with_deltas(build=tiny_bert, b=lambda: dt.LoRA(r=4)):
    model = build()
    randomize(dt.attach(model, dt.LoRA(r=4), name="a", train_modules=None), 1)
    randomize(dt.attach(model, b(), name="b", train_modules=None), 2)
    return model


def trained(model, **kwargs):
    router = dt.attach_router(model, ["a", "b"], **kwargs)
    data = [domain_batch("a", 32, 1), domain_batch("b", 32, 2)]
    losses = router.fit(data)
    assert losses[-1] < 0.1 * losses[0]
    assert router.fit_accuracy == router.accuracy(data)  # kept by fit, from the features it already read
    return router


def assert_rows_as_alone(model, routed: torch.Tensor, ids: torch.Tensor, names: list[str]) -> None:
    """Each routed row equals its sample run alone through the delta it was routed to."""
    for i, name in enumerate(names):
        with dt.active(model, name), torch.no_grad():
            assert torch.allclose(routed[i], model(input_ids=ids[i:i + 1]).logits[0], atol=1e-5), (i, name)


def saved_and_loaded(model, router, tmp_path):
    """A fresh tiny BERT with the deltas and the router read back from disk."""
    dt.save_all(model, tmp_path / "deltas")
    router.save(tmp_path / "router")
    fresh = tiny_bert()
    dt.load_all(fresh, tmp_path / "deltas")
    return fresh, dt.load_router(fresh, tmp_path / "router")


def mixed_inputs():
    a, b = domain_batch("a", 2, 10), domain_batch("b", 2, 11)
    ids = torch.cat([a["input_ids"], b["input_ids"]])[[0, 2, 1, 3]]
    return ids, ["a", "b", "a", "b"]


def test_learns_the_domains_and_routes_each_sample_exactly():
    model = with_deltas()
    router = trained(model)
    assert router.accuracy([domain_batch("a", 20, 5), domain_batch("b", 20, 6)]) == 1.0  # held out
    ids, names = mixed_inputs()
    assert router.predict(ids) == names
    with torch.no_grad():
        routed = model(input_ids=ids).logits
    router.disable()
    with dt.route(model, names), torch.no_grad():
        manual = model(input_ids=ids).logits
    assert torch.allclose(routed, manual, atol=1e-6)  # the router sorts the batch by route: another row order
    assert_rows_as_alone(model, routed, ids, names)


def test_each_call_restores_the_model_state():
    model = with_deltas()
    router = trained(model)
    dt.activate(model, "b")
    ids, _ = mixed_inputs()
    with torch.no_grad():
        model(input_ids=ids)
    assert all(m.sample_scale is None for d in dt.deltas(model).values() for m in d.modules())
    assert dt.deltas(model)["b"].is_active and not dt.deltas(model)["a"].is_active
    router.disable()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    with dt.active(model, "b"), torch.no_grad():
        assert torch.equal(after, model(input_ids=ids).logits)


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
def test_cached_generation_keeps_the_prompts_choice(method):
    make = {"lora": lambda: dt.LoRA(r=4), "prompt": lambda: dt.PromptTuning(num_tokens=3),
            "prefix": lambda: dt.PrefixTuning(num_tokens=3, reparam_hidden=None)}[method]
    model = with_deltas(tiny_llama, make)
    router = trained(model)
    ids, names = mixed_inputs()
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 5, "do_sample": False,
              "pad_token_id": 0}
    routed = model.generate(**kwargs)
    router.disable()
    for name in ("a", "b"):
        with dt.active(model, name):
            alone = model.generate(**kwargs)
        for i in (i for i, n in enumerate(names) if n == name):
            assert torch.equal(routed[i], alone[i]), (method, i)


def test_soft_mode_mixes_additive_deltas_and_trains_end_to_end():
    model = with_deltas()
    router = trained(model, mode="soft")
    ids, _ = mixed_inputs()
    with torch.no_grad():
        weights = router.logits(ids).softmax(-1)
        mixed = model(input_ids=ids).logits
    router.disable()
    deltas = dt.deltas(model)
    for k, name in enumerate(["a", "b"]):
        deltas[name].set_active(True)
        for m in deltas[name].modules():
            m.sample_scale = weights[:, k]
    with torch.no_grad():
        manual = model(input_ids=ids).logits
    assert torch.allclose(mixed, manual, atol=1e-6)
    dt.deactivate(model)
    router.enable()
    loss = model(input_ids=ids, labels=torch.tensor([0, 1, 1, 0])).loss
    loss.backward()
    grads = [p.grad for p in router.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)  # the task loss reaches the router


def test_save_and_load_with_the_deltas(tmp_path):
    model = with_deltas()
    router = trained(model)
    ids, names = mixed_inputs()
    with torch.no_grad():
        routed = model(input_ids=ids).logits
    fresh, loaded = saved_and_loaded(model, router, tmp_path)
    assert loaded.predict(ids) == names and loaded.names == ["a", "b"]
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, routed)
    other = tiny_llama()
    with pytest.raises(dt.BaseModelMismatchError):
        dt.load_router(other, tmp_path / "router")


def test_clear_errors():
    model = with_deltas()
    with pytest.raises(dt.StateError, match=r"no delta named 'c'.*attached: \['a', 'b'\]"):
        dt.attach_router(model, ["a", "c"])
    with pytest.raises(dt.ConfigError, match="at least two distinct"):
        dt.attach_router(model, ["a"])
    with pytest.raises(dt.ConfigError, match="mode must be one of"):
        dt.attach_router(model, ["a", "b"], mode="top2")
    dt.attach(model, dt.BitFit(), name="bias", train_modules=None)
    with pytest.raises(dt.StateError, match="not supported for bitfit"):
        dt.attach_router(model, ["a", "bias"])
    router = dt.attach_router(model, ["a", "b"])
    with pytest.raises(dt.StateError, match="already has a router"):
        dt.attach_router(model, ["a", "b"])
    with pytest.raises(dt.ConfigError, match="'route' entry"):
        router.fit([{"input_ids": torch.ones(2, 3, dtype=torch.long)}])
    with pytest.raises(dt.ConfigError, match=r"\['z'\] are not among"):
        router.fit([{"input_ids": torch.ones(2, 3, dtype=torch.long), "route": ["a", "z"]}])
    router.detach()
    prefix = with_deltas(tiny_llama, lambda: dt.PrefixTuning(num_tokens=2))
    with pytest.raises(dt.StateError, match="use mode='hard'"):
        dt.attach_router(prefix, ["a", "b"], mode="soft")
    dt.deltas(model)["b"].base_fingerprint = {"shapes_sha256": "other"}  # as loaded with check_base=False
    with pytest.raises(dt.StateError, match=r"deltas \['b'\] were trained on a base model"):
        _check_deltas(model, ["a", "b"], "hard")


def test_hidden_features_read_the_frozen_model_and_route_exactly(tmp_path):
    """features='hidden': the mean of the base model's last hidden states, every delta off while it is read; the
    model's state (which deltas are on) is what it was after each call; saved and loaded with the router."""
    model = with_deltas()
    router = trained(model, features="hidden")
    ids, names = mixed_inputs()
    router.disable()
    with dt.active(model, None), torch.no_grad():
        expected = model.bert(input_ids=ids).last_hidden_state.mean(1)  # the base model's
    assert torch.allclose(router._raw_features(ids, None, None), expected, atol=1e-6)
    router.enable()
    assert router.predict(ids) == names
    dt.activate(model, "b")
    with torch.no_grad():
        routed = model(input_ids=ids).logits
    assert router.last_choice == names
    assert dt.deltas(model)["b"].is_active and not dt.deltas(model)["a"].is_active  # put back
    assert_rows_as_alone(model, routed, ids, names)
    fresh, loaded = saved_and_loaded(model, router, tmp_path)
    assert loaded.features == "hidden" and loaded.predict(ids) == names
    with pytest.raises(dt.ConfigError, match="features must be one of"):
        dt.attach_router(tiny_bert(), ["a", "b"], features="pixels")


def test_token_features_learn_each_tokens_score_and_route_exactly(tmp_path):
    """features='tokens': the mean of a learned score vector per token id, padding left out; more routing data
    for one delta does not tilt the choice (balanced loss); saved and loaded with the router."""
    model = with_deltas()
    router = dt.attach_router(model, ["a", "b"], features="tokens")
    data = [domain_batch("a", 64, 1), domain_batch("b", 8, 2)]  # 8x fewer samples of b
    router.fit(data, epochs=200, lr=0.05)
    assert router.fit_accuracy == 1.0
    assert router.accuracy([domain_batch("a", 20, 5), domain_batch("b", 20, 6)]) == 1.0  # held out
    ids, names = mixed_inputs()
    padded, mask = torch.cat([ids, torch.full((4, 5), 99)], 1), torch.cat([torch.ones_like(ids), torch.zeros(4, 5)], 1)
    assert torch.allclose(router.logits(padded, mask), router.logits(ids), atol=1e-6)  # padding is not read
    with torch.no_grad():
        routed = model(input_ids=ids).logits
    assert router.last_choice == names
    assert_rows_as_alone(model, routed, ids, names)
    fresh, loaded = saved_and_loaded(model, router, tmp_path)
    assert loaded.features == "tokens" and torch.equal(loaded.logits(ids), router.logits(ids))
    with pytest.raises(dt.StateError, match="pass input_ids"):
        loaded.logits(inputs_embeds=torch.zeros(1, 3, 32))
    loaded.detach()
    with pytest.raises(dt.ConfigError, match="linear bag of tokens"):
        dt.attach_router(fresh, ["a", "b"], features="tokens", hidden=16)


def test_token_pairs_tell_apart_inputs_made_of_the_same_tokens():
    """Domain a alternates two tokens (5 6 5 6 ...), domain b repeats them in runs (5 5 6 6 ...): the same bag of
    single tokens, different neighbouring pairs. Left and right padding give the same bag."""
    def batch(name: str, n: int) -> dict:
        row = [5, 6] * 4 if name == "a" else [5, 5, 6, 6] * 2
        ids = torch.tensor([row] * n)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "route": [name] * n}

    data = [batch("a", 8), batch("b", 8)]
    for buckets, expected in ((0, 0.5), (1024, 1.0)):
        model = with_deltas()
        router = dt.attach_router(model, ["a", "b"], features="tokens", bigram_buckets=buckets)
        router.fit(data, epochs=100, lr=0.05)
        assert router.fit_accuracy == expected, buckets
    ids = torch.tensor([[5, 6, 5, 0, 0], [0, 0, 5, 6, 5]])
    right, left = torch.tensor([[1, 1, 1, 0, 0]]), torch.tensor([[0, 0, 1, 1, 1]])
    assert torch.equal(router.logits(ids[:1], right), router.logits(ids[1:], left))
