"""Named deltas: switching, the active() context, save_all/load_all, and the rules that keep them consistent."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from tests.conftest import BUILDERS, logits, perturb


def two_deltas(arch: str = "bert"):
    model = BUILDERS[arch]()
    base = logits(model)
    a = dt.attach(model, dt.LoRA(r=4, targets="all-linear"), name="a", train_modules=None)
    perturb(a, seed=1)
    b = dt.attach(model, dt.LoRA(r=2, targets="all-linear"), name="b", train_modules=None)
    perturb(b, seed=2)
    return model, base, a, b


def base_weights(model) -> dict[str, torch.Tensor]:
    from deltatune.core.inject import named_base_parameters

    return {n: p.detach().clone() for n, p in named_base_parameters(model)}


def test_switching_gives_each_delta_alone_and_never_writes_base_weights(arch):
    model, base, a, b = two_deltas(arch)
    weights = base_weights(model)
    out_b = logits(model)  # b was attached last: it is the active one
    dt.activate(model, "a")
    out_a = logits(model)
    assert a.is_active and not b.is_active
    assert not torch.allclose(out_a, out_b) and not torch.allclose(out_a, base)
    with dt.active(model, "b") as delta:
        assert delta is b
        assert torch.equal(logits(model), out_b)
    assert torch.equal(logits(model), out_a)  # restored on exit
    dt.deactivate(model)
    assert torch.equal(logits(model), base)
    with dt.active(model, None):
        assert torch.equal(logits(model), base)
    for name, value in base_weights(model).items():
        assert torch.equal(value, weights[name]), name  # bitwise


def test_active_context_restores_after_an_exception():
    model, _, a, b = two_deltas()
    dt.activate(model, "a")
    with pytest.raises(RuntimeError), dt.active(model, "b"):
        raise RuntimeError("boom")
    assert a.is_active and not b.is_active


def test_same_delta_alone_equals_it_on_a_fresh_model():
    model, _, a, _ = two_deltas()
    dt.activate(model, "a")
    shared = logits(model)
    fresh = BUILDERS["bert"]()
    alone = dt.attach(fresh, dt.LoRA(r=4, targets="all-linear"), train_modules=None)
    alone.load_state_dict(a.state_dict())
    assert torch.equal(logits(fresh), shared)


def test_unknown_name_lists_attached_names():
    model, *_ = two_deltas()
    for call in (lambda: dt.activate(model, "zzz"), lambda: dt.active(model, "zzz").__enter__(),
                 lambda: dt.route(model, ["a", "zzz", "a"])):
        with pytest.raises(dt.StateError, match=r"'zzz'.*\['a', 'b'\]"):
            call()


def test_switching_refuses_while_another_delta_is_merged():
    model, _, a, b = two_deltas()
    dt.activate(model, "a")
    a.merge()
    weights = base_weights(model)
    for call in (lambda: dt.activate(model, "b"), lambda: dt.deactivate(model), lambda: dt.route(model, ["a"])):
        with pytest.raises(dt.StateError, match="'a' is merged"):
            call()
    assert a.is_merged and not b.is_active
    dt.activate(model, "a")  # activating the merged delta itself is fine
    assert all(torch.equal(v, weights[n]) for n, v in base_weights(model).items())


def test_merge_refuses_when_another_delta_is_in_effect_on_the_same_module():
    model, base, a, b = two_deltas()
    dt.activate(model, "a")
    a.merge()
    b.set_active(True)  # stacking b on top of merged a is allowed ...
    with pytest.raises(dt.StateError, match="'a' is also merged into"):
        b.merge()  # ... but a second merge into the same weights is not
    a.unmerge()
    with pytest.raises(dt.StateError, match="'a' is also active on"):
        b.merge()
    dt.activate(model, "b")
    b.merge()  # alone in effect: fine
    b.unmerge()
    dt.deactivate(model)
    assert torch.allclose(logits(model), base, atol=1e-6)


def test_merge_allowed_when_the_other_delta_touches_other_modules():
    model = BUILDERS["bert"]()
    q = dt.attach(model, dt.LoRA(r=2, targets=["query"]), name="q", train_modules=None)
    perturb(q)
    q.merge()
    v = dt.attach(model, dt.LoRA(r=2, targets=["value"]), name="v", train_modules=None)
    perturb(v, seed=3)
    before = logits(model)
    v.merge()
    assert torch.allclose(logits(model), before, atol=1e-5)


def test_save_all_load_all_onto_one_base(tmp_path):
    model, base, a, b = two_deltas("llama")
    dt.activate(model, "a")
    out_a = logits(model)
    with dt.active(model, "b"):
        out_b = logits(model)
    dt.save_all(model, tmp_path / "all")
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["a", "b", "deltas.json"]

    fresh = BUILDERS["llama"]()
    loaded = dt.load_all(fresh, tmp_path / "all")
    assert list(loaded) == ["a", "b"] and loaded["a"].is_active and not loaded["b"].is_active
    assert torch.equal(logits(fresh), out_a)
    dt.activate(fresh, "b")
    assert torch.equal(logits(fresh), out_b)
    # one base: both deltas' wrappers sit on the very same base Linear objects
    layers_a = {id(w.base_layer()) for w in loaded["a"].wrappers()}
    assert layers_a == {id(w.base_layer()) for w in loaded["b"].wrappers()}
    dt.deactivate(fresh)
    assert torch.equal(logits(fresh), base)


def test_load_all_subset_and_errors(tmp_path):
    model, *_ = two_deltas()
    dt.save_all(model, tmp_path / "all")
    fresh = BUILDERS["bert"]()
    assert list(dt.load_all(fresh, tmp_path / "all", names=["b"])) == ["b"]
    with pytest.raises(dt.CheckpointError, match="no delta named"):
        dt.load_all(BUILDERS["bert"](), tmp_path / "all", names=["nope"])
    with pytest.raises(dt.CheckpointNotFoundError, match="deltas.json"):
        dt.load_all(BUILDERS["bert"](), tmp_path / "all" / "a")
    # failure half-way (second delta's name is taken) detaches the first one again
    target = BUILDERS["bert"]()
    dt.attach(target, dt.LoRA(r=2, targets=["query"]), name="b", train_modules=None)
    with pytest.raises(dt.AttachError, match="'b' is already attached"):
        dt.load_all(target, tmp_path / "all")
    assert list(dt.deltas(target)) == ["b"]


def test_save_all_rejects_unsafe_names(tmp_path):
    model = BUILDERS["bert"]()
    dt.attach(model, dt.LoRA(r=2, targets=["query"]), name="../evil", train_modules=None)
    with pytest.raises(dt.StateError, match="directory name"):
        dt.save_all(model, tmp_path / "x")
    with pytest.raises(dt.StateError, match="no deltas"):
        dt.save_all(BUILDERS["bert"](), tmp_path / "y")


def test_save_all_while_routed_loads_with_nothing_active(tmp_path):
    model, base, a, b = two_deltas()
    dt.route(model, ["a", "b", "a"])
    dt.save_all(model, tmp_path / "all")
    fresh = BUILDERS["bert"]()
    loaded = dt.load_all(fresh, tmp_path / "all")
    assert not any(d.is_active for d in loaded.values())
    assert torch.equal(logits(fresh), base)


def test_switching_warns_about_shared_base_parameters(caplog):
    model = BUILDERS["bert"]()
    dt.attach(model, dt.LoRA(r=2, targets=["query"]), train_modules=["classifier"], name="head")
    dt.attach(model, dt.BitFit(), name="bias", train_modules=None)
    dt.attach(model, dt.LoRA(r=2, targets=["value"]), name="plain", train_modules=None)
    with caplog.at_level("WARNING", logger="deltatune"):
        dt.activate(model, "plain")
        dt.activate(model, "head")  # its head is a copy owned by the delta: nothing shared, no warning
        assert caplog.text == ""
        dt.activate(model, "bias")
        assert "'bias' trains base parameters in place" in caplog.text
    with pytest.raises(dt.StateError, match="not supported for bitfit"):
        dt.route(model, ["bias", "plain"])


def test_each_named_delta_switches_its_own_head():
    model = BUILDERS["bert"]()
    base = logits(model)
    heads = {}
    for name, seed in (("a", 1), ("b", 2)):
        delta = dt.attach(model, dt.LoRA(r=2, targets=["query"]), name=name)  # "auto": the classifier
        assert list(delta.train_modules) == ["classifier"]
        with torch.no_grad():
            delta.train_modules["classifier"].copy.weight.normal_(generator=torch.Generator().manual_seed(seed))
        heads[name] = logits(model)
    assert not torch.allclose(heads["a"], heads["b"])
    dt.activate(model, "a")
    assert torch.equal(logits(model), heads["a"])
    dt.deactivate(model)
    assert torch.equal(logits(model), base)  # the original head is untouched
    dt.route(model, ["b", "a", "b"])
    mixed = logits(model)
    assert torch.allclose(mixed[0], heads["b"][0], atol=1e-6) and torch.allclose(mixed[1], heads["a"][1], atol=1e-6)

