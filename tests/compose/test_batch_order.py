"""The router sorts a mixed batch by route for the forward call and puts every output back in the caller's order
(compose/batch_order.py): the model's answers are the same as unsorted routing, row for row, caches included."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import deltatune as dt
from deltatune.compose.batch_order import BatchOrder
from deltatune.core import routed_fold
from tests.compose.test_router import domain_batch, trained, with_deltas
from tests.conftest import tiny_bert, tiny_llama


def interleaved(n: int = 8, length: int = 40) -> tuple[torch.Tensor, list[str]]:
    """Samples of the two domains in alternating order (the router's choice), so sorting moves every row."""
    a, b = domain_batch("a", n // 2, 20, length), domain_batch("b", n // 2, 21, length)
    ids = torch.stack([row for pair in zip(a["input_ids"], b["input_ids"], strict=True) for row in pair])
    return ids, ["a", "b"] * (n // 2)


@pytest.fixture
def groups_seen(monkeypatch) -> list:
    """The per-layer groups routed_fold computed during a call: slices when the batch arrived sorted."""
    seen = []
    original = routed_fold.sample_groups

    def spy(masks, device):
        found = original(masks, device)
        seen.append(found)
        return found

    monkeypatch.setattr(routed_fold, "sample_groups", spy)
    return seen


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_sorted_call_equals_unsorted_routing_row_for_row(build, groups_seen):
    model = with_deltas(build)
    router = trained(model)
    ids, names = interleaved()
    mask = torch.ones_like(ids)
    mask[1, 30:], mask[6, 12:] = 0, 0  # padding moves with its row
    assert router.predict(ids) == names
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert groups_seen and all(isinstance(rows, slice) for groups in groups_seen if groups for _, rows in groups)
    router.disable()
    with dt.route(model, names), torch.no_grad():
        manual = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert torch.allclose(out.logits, manual.logits, atol=1e-5, rtol=0)
    for got, want in zip(out.hidden_states, manual.hidden_states, strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(out.logits[0], out.logits[1], atol=1e-3)


def routed_names(router, ids: torch.Tensor) -> list[str]:
    names = router.predict(ids)
    assert BatchOrder.for_routes([router.names.index(n) for n in names]) is not None  # the call is sorted
    return names


def test_a_cache_filled_by_the_sorted_call_is_in_the_callers_order():
    model = with_deltas(tiny_llama)
    names = routed_names(trained(model), ids := interleaved(n=4)[0])
    with torch.no_grad():
        routed = model(input_ids=ids, use_cache=True)
        keys = routed.past_key_values.layers[0].keys.clone()
        follow = model(input_ids=ids[:, :1], past_key_values=routed.past_key_values)  # a cached step, unsorted
    for i, name in enumerate(names):
        with dt.active(model, name), torch.no_grad():
            alone = model(input_ids=ids[i:i + 1], use_cache=True)
            assert torch.allclose(keys[i], alone.past_key_values.layers[0].keys[0], atol=1e-5, rtol=0), i
            step = model(input_ids=ids[i:i + 1, :1], past_key_values=alone.past_key_values)
            assert torch.allclose(follow.logits[i], step.logits[0], atol=1e-5, rtol=0), i


def test_the_loss_over_a_sorted_batch_is_the_same_loss():
    model = with_deltas(tiny_llama)
    names = routed_names(trained(model), ids := interleaved(n=4)[0])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    model.__dict__["_deltatune_router"].disable()
    with dt.route(model, names), torch.no_grad():
        assert torch.allclose(loss, model(input_ids=ids, labels=ids).loss, atol=1e-6)


def test_calls_it_cannot_sort_are_left_as_they_are():
    order = BatchOrder.for_routes([1, 0, 1, 0])
    ids = torch.arange(8).view(4, 2)
    assert order.inputs({"input_ids": ids, "output_hidden_states": True})["input_ids"][:, 0].tolist() == [2, 6, 0, 4]
    assert order.inputs({"input_ids": ids, "head_mask": torch.ones(4, 2)}) is None  # batch dimension not known
    filled = DynamicCache()
    filled.update(torch.ones(4, 1, 3, 2), torch.ones(4, 1, 3, 2), 0)
    assert order.inputs({"input_ids": ids, "past_key_values": filled}) is None  # rows already in the caller's order
    assert order.inputs({"input_ids": ids, "past_key_values": DynamicCache()}) is not None
    assert order.inputs({"input_ids": ids, "position_ids": torch.arange(2)[None]}) is not None  # broadcast
    assert BatchOrder.for_routes([0, 0, 1, 2]) is None  # already in route order


def test_outputs_go_back_to_the_callers_order():
    order = BatchOrder.for_routes([2, 0, 1])
    sorted_rows = torch.tensor([[1.0], [2.0], [0.0]])  # rows of samples 1, 2, 0
    back = order.outputs({"logits": sorted_rows, "loss": torch.tensor(3.0), "hidden": (sorted_rows, sorted_rows)})
    assert back["logits"].flatten().tolist() == [0.0, 1.0, 2.0]
    assert back["loss"].item() == 3.0 and back["hidden"][1].flatten().tolist() == [0.0, 1.0, 2.0]


def test_training_calls_are_not_sorted(groups_seen):
    model = with_deltas(tiny_bert)
    trained(model)
    ids, _ = interleaved()
    model(input_ids=ids).logits.sum().backward()  # autograd on: routed through masks, in the caller's order
    assert not groups_seen
