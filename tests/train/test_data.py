"""Data loading: formats, column mapping, labels, pairs, Alpaca masking, caching, batching and padding."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from deltatune.train import data as data_module
from deltatune.train.batches import IGNORE, Encoded, collate, eval_batches, train_batches
from deltatune.train.config import load_config
from deltatune.train.data import DataError, alpaca_prompt, load_split, read_records


@pytest.fixture(scope="module")
def tokenizer(tiny_bert_dir):
    return AutoTokenizer.from_pretrained(tiny_bert_dir)


def config(tmp_path, model_dir, train, validation=None, **data):
    overrides = [("model.path", str(model_dir)), ("data.train", str(train)), ("data.validation", validation),
                 ("data.cache_dir", str(tmp_path / "cache"))] + [(f"data.{k}", v) for k, v in data.items()]
    return load_config(None, overrides)


def test_tsv_is_read_unquoted(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text('sentence\tlabel\n"quoted" start and a " stray quote\t1\nplain\t0\n')
    rows = read_records(str(path), load_config().data, "train")
    assert rows == [{"sentence": '"quoted" start and a " stray quote', "label": "1"},
                    {"sentence": "plain", "label": "0"}]


def test_csv_json_columns_and_jsonl(tmp_path):
    data = load_config().data
    (tmp_path / "a.csv").write_text('text,y\n"good, really",1\nbad,0\n')
    assert read_records(str(tmp_path / "a.csv"), data, "train")[0] == {"text": "good, really", "y": "1"}
    (tmp_path / "b.json").write_text(json.dumps({"text": ["good", "bad"], "y": [1, 0]}))
    assert read_records(str(tmp_path / "b.json"), data, "train") == [{"text": "good", "y": 1}, {"text": "bad", "y": 0}]
    (tmp_path / "c.jsonl").write_text('{"text": "good", "y": 1}\n\n{"text": "bad", "y": 0}\n')
    assert [r["y"] for r in read_records(str(tmp_path / "c.jsonl"), data, "train")] == [1, 0]
    (tmp_path / "d.json").write_text('{"text": "good"}')
    with pytest.raises(DataError, match="JSON must be a list of records"):
        read_records(str(tmp_path / "d.json"), data, "train")
    with pytest.raises(DataError, match="cannot tell the format of .*x.dat.*set data.format"):
        read_records(str(tmp_path / "x.dat"), data, "train")


def test_parquet_goes_through_datasets_and_hub_names_need_the_network(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "x.parquet"
    datasets.Dataset.from_list([{"text": "good", "label": 1}, {"text": "bad", "label": 0}]).to_parquet(path)
    assert read_records(str(path), load_config().data, "train") == [{"text": "good", "label": 1},
                                                                    {"text": "bad", "label": 0}]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def offline(*args, **kwargs):  # what datasets raises offline (a real lookup may wait for network timeouts)
        raise ConnectionError("Couldn't reach 'someone/nothing-here' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    hub = load_config(None, [("data.format", "hub"), ("data.train", "someone/nothing-here")], check_files=False)
    with pytest.raises(DataError, match="datasets could not load 'someone/nothing-here'.*HF_HUB_OFFLINE=1 is set"):
        read_records("someone/nothing-here", hub.data, "train")


def test_column_mapping_and_string_labels(tmp_path, tiny_bert_dir, tokenizer):
    train, dev = tmp_path / "t.jsonl", tmp_path / "d.jsonl"
    train.write_text("".join(json.dumps({"review": t, "stars": s}) + "\n"
                             for t, s in [("good film", "pos"), ("bad film", "neg"), ("fine", "pos")]))
    dev.write_text(json.dumps({"review": "dull", "stars": "neg"}) + "\n")
    cfg = config(tmp_path, tiny_bert_dir, train, str(dev), columns={"text": "review", "label": "stars"})
    enc = load_split(cfg, tokenizer, "train")
    assert enc.label_names == ["neg", "pos"] and enc.labels.tolist() == [1, 0, 1]
    assert tokenizer.decode(enc.input_ids[enc.offsets[0]:enc.offsets[1]]) == "[CLS] good film [SEP]"
    assert load_split(cfg, tokenizer, "validation", enc.label_names).labels.tolist() == [0]


def test_labels_outside_the_set_name_the_row(tmp_path, tiny_bert_dir, tokenizer):
    train, dev = tmp_path / "t.tsv", tmp_path / "d.tsv"
    train.write_text("sentence\tlabel\ngood\t0\nbad\t1\n")
    dev.write_text("sentence\tlabel\ngood\t1\nbad\t2\n")
    cfg = config(tmp_path, tiny_bert_dir, train, str(dev))
    names = load_split(cfg, tokenizer, "train").label_names
    assert names == ["0", "1"]
    with pytest.raises(DataError, match=r"row 2: label '2' is not in the label set \['0', '1'\]"):
        load_split(cfg, tokenizer, "validation", names)
    train.write_text("sentence\tlabel\ngood\t-1\nbad\t1\n")
    with pytest.raises(DataError, match="integer labels must be >= 0"):
        load_split(config(tmp_path, tiny_bert_dir, train), tokenizer, "train")


def test_missing_columns_and_empty_files_are_named(tmp_path, tiny_bert_dir, tokenizer):
    path = tmp_path / "t.tsv"
    path.write_text("words\tlabel\ngood\t1\n")
    with pytest.raises(DataError, match=r"no any of sentence, text.*\(columns: words, label\).*data.columns.text"):
        load_split(config(tmp_path, tiny_bert_dir, path), tokenizer, "train")
    with pytest.raises(DataError, match="no label column 'y'"):
        load_split(config(tmp_path, tiny_bert_dir, path, columns={"text": "words", "label": "y"}), tokenizer, "train")
    path.write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="has no examples"):
        load_split(config(tmp_path, tiny_bert_dir, path), tokenizer, "train")
    path.write_text("sentence\tlabel\ngood\n")
    with pytest.raises(DataError, match="row 1: the label is empty"):
        load_split(config(tmp_path, tiny_bert_dir, path), tokenizer, "train")
    path.write_text("sentence\tlabel\ngood\tpos\nbad\tpos\n")
    with pytest.raises(DataError, match="every example has the label 'pos'; classification needs at least two"):
        load_split(config(tmp_path, tiny_bert_dir, path), tokenizer, "train")


def test_sentence_pairs_are_detected_and_get_token_types(tmp_path, tiny_bert_dir, tokenizer):
    path = tmp_path / "p.tsv"
    path.write_text("sentence1\tsentence2\tlabel\ngood film\tbad plot\t1\nthe end\tthe start\t0\n")
    enc = load_split(config(tmp_path, tiny_bert_dir, path), tokenizer, "train")
    first = enc.input_ids[enc.offsets[0]:enc.offsets[1]]
    assert tokenizer.decode(first) == "[CLS] good film [SEP] bad plot [SEP]"
    assert enc.token_type_ids[enc.offsets[0]:enc.offsets[1]].tolist() == [0, 0, 0, 0, 1, 1, 1]
    batch = collate(enc, [0, 1], tokenizer.pad_token_id)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape


def test_alpaca_prompt_tokens_are_masked_out_of_the_loss(tmp_path, tiny_llama_dir, alpaca_file):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = load_config(None, [("task", "instruction"), ("model.path", str(tiny_llama_dir)),
                             ("data.train", str(alpaca_file)), ("data.cache", False), ("data.max_length", 64)])
    enc = load_split(cfg, tok, "train")
    for i, record in enumerate(json.loads(alpaca_file.read_text())):
        ids, labels = (t[enc.offsets[i]:enc.offsets[i + 1]].tolist() for t in (enc.input_ids, enc.labels))
        prompt = tok(alpaca_prompt(record["instruction"], record["input"]))["input_ids"]
        assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE] * len(prompt)
        assert labels[len(prompt):] == ids[len(prompt):]
        assert tok.decode(ids[len(prompt):]) == record["output"] + " [SEP]"  # output then EOS, all learned
    assert "### Input:\nthe plot" in alpaca_prompt("x", "the plot") and "### Input" not in alpaca_prompt("x")
    batch = collate(enc, [0, 1], tok.pad_token_id)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()  # padding never counts


def test_a_prompt_longer_than_max_length_is_skipped(tmp_path, tiny_llama_dir, alpaca_file):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = load_config(None, [("task", "instruction"), ("model.path", str(tiny_llama_dir)),
                             ("data.train", str(alpaca_file)), ("data.cache", False), ("data.max_length", 8)])
    with pytest.raises(DataError, match="no usable examples"):
        load_split(cfg, tok, "train")


def test_text_corpus_is_cut_into_blocks(tmp_path, tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(["the film was good and the plot was dull"] * 5))
    cfg = load_config(None, [("task", "causal_lm"), ("model.path", str(tiny_llama_dir)), ("data.train", str(path)),
                             ("data.cache", False), ("data.max_length", 16)])
    enc = load_split(cfg, tok, "train")
    assert enc.lengths() == [16, 16, 13] and torch.equal(enc.labels, enc.input_ids)
    assert enc.input_ids.tolist() == tok(path.read_text(), add_special_tokens=False)["input_ids"]
    records = tmp_path / "lm.jsonl"
    records.write_text('{"content": "the film"}\n')
    cfg = load_config(None, [("task", "causal_lm"), ("model.path", str(tiny_llama_dir)), ("data.train", str(records)),
                             ("data.cache", False)])
    with pytest.raises(DataError, match=r"no text column 'text' \(columns: content\); set data.columns.text"):
        load_split(cfg, tok, "train")
    cfg = load_config(None, [("task", "causal_lm"), ("model.path", str(tiny_llama_dir)), ("data.train", str(records)),
                             ("data.cache", False), ("data.columns.text", "content")])
    enc = load_split(cfg, tok, "train")  # the tokenizer's own [CLS] ... [SEP]; [SEP] is its EOS: not added twice
    assert tok.decode(enc.input_ids) == "[CLS] the film [SEP]" and torch.equal(enc.labels, enc.input_ids)


def test_tokenisation_is_cached_and_keyed_by_settings(tmp_path, tiny_bert_dir, tokenizer, monkeypatch,
                                                      sentiment_files):
    cfg = config(tmp_path, tiny_bert_dir, sentiment_files[0])
    first = load_split(cfg, tokenizer, "train")
    assert len(list((tmp_path / "cache" / "tokenized").glob("*.safetensors"))) == 1
    monkeypatch.setattr(data_module, "read_records", lambda *a: pytest.fail("cache not used"))
    again = load_split(cfg, tokenizer, "train")
    assert torch.equal(again.input_ids, first.input_ids) and torch.equal(again.labels, first.labels)
    assert again.label_names == first.label_names
    shorter = config(tmp_path, tiny_bert_dir, sentiment_files[0], max_length=4)
    with pytest.raises(pytest.fail.Exception, match="cache not used"):
        load_split(shorter, tokenizer, "train")  # another max_length is another cache entry
    monkeypatch.undo()
    limited = load_split(config(tmp_path, tiny_bert_dir, sentiment_files[0], max_train_samples=5), tokenizer, "train")
    assert len(limited) == 5 and torch.equal(limited.labels, first.labels[:5])
    assert limited.label_names == first.label_names  # label names still come from every row


def test_a_row_limit_tokenises_only_the_rows_it_keeps(tmp_path, tiny_bert_dir, tokenizer, monkeypatch,
                                                       sentiment_files):
    seen = []
    encode = data_module.encode
    monkeypatch.setattr(data_module, "encode", lambda rows, *a, **k: seen.append(len(rows)) or encode(rows, *a, **k))
    cfg = config(tmp_path, tiny_bert_dir, sentiment_files[0], max_train_samples=7)
    assert len(load_split(cfg, tokenizer, "train")) == 7 and seen == [7]


def test_a_corrupt_cache_file_is_rebuilt(tmp_path, tiny_bert_dir, tokenizer, sentiment_files):
    cfg = config(tmp_path, tiny_bert_dir, sentiment_files[0])
    first = load_split(cfg, tokenizer, "train")
    (cached,) = (tmp_path / "cache" / "tokenized").glob("*.safetensors")
    cached.write_bytes(b"garbage")
    assert torch.equal(load_split(cfg, tokenizer, "train").input_ids, first.input_ids)


def toy(lengths: list[int]) -> Encoded:
    return Encoded.from_lists([[5] * n for n in lengths], list(range(len(lengths))), label_names=["a"])


def test_train_batches_are_a_seeded_permutation_split_across_processes():
    lengths = [3, 9, 1, 7, 4, 4, 8, 2, 6, 5, 10, 1, 3]
    one = train_batches(lengths, 4, seed=1, epoch=0)
    assert sorted(i for b in one for i in b) == list(range(len(lengths)))
    assert one == train_batches(lengths, 4, seed=1, epoch=0)
    assert one != train_batches(lengths, 4, seed=1, epoch=1)
    two = [train_batches(lengths, 2, seed=1, epoch=0, world=2, rank=r) for r in (0, 1)]
    # process r takes every 2nd example of each global batch: together they form the 1-process batches,
    # except a global batch too small to give both an example (13 = 3 x 4 + 1), which is skipped
    assert [sorted(a + b) for a, b in zip(*two, strict=True)] == [sorted(b) for b in one if len(b) >= 2]
    assert len(two[0]) == 3


def test_length_grouping_cuts_padding():
    lengths = [1 + (i * 37) % 50 for i in range(400)]
    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)
    batches = train_batches(lengths, 8, seed=0, epoch=0, group_by_length=True)
    grouped = padded(batches)
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest != sorted(longest, reverse=True)  # the batch order is shuffled, not long-to-short
    assert grouped < 0.7 * padded(train_batches(lengths, 8, seed=0, epoch=0, group_by_length=False))
    assert padded(eval_batches(lengths, 8)) <= grouped  # fully sorted: the least padding possible


def test_collate_pads_each_batch_to_its_own_longest_example():
    data = toy([3, 5, 2])
    batch = collate(data, [0, 2], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 5, 5], [5, 5, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [0, 2]


def test_eval_batches_cover_every_example_once_across_processes():
    lengths = [3, 5, 2, 7, 1]
    shares = [i for rank in (0, 1) for b in eval_batches(lengths, 2, world=2, rank=rank) for i in b]
    assert sorted(shares) == list(range(5))
