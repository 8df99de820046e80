"""Fixtures for the training workflow: a tiny word-level tokenizer, tiny random BERT / Llama saved to disk
(so the code under test loads them like real models), and small synthetic datasets that can be learned in
a few dozen steps (the label says whether a sentence holds a positive or a negative word)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from tests.conftest import VOCAB, tiny_llama

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["good", "great", "lovely", "superb", "fine"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
FILLER = ["the", "a", "film", "movie", "was", "is", "really", "very", "plot", "cast", "and", "it", "this", "so",
          "quite", "book", "song", "show", "story", "i", "thought", "felt", "end", "start"]
WORDS = POSITIVE + NEGATIVE + FILLER + ["instruction", "response", "input", "below", "task", "write", "###", ":"]


def make_tokenizer(directory: Path):
    """A BERT-style WordLevel tokenizer ([CLS] a [SEP] b [SEP], token types) with < 100 tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    fast.save_pretrained(directory)
    return fast


def sentence(rng: random.Random, label: int) -> str:
    words = rng.sample(FILLER, rng.randint(0, 3))
    words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


def write_tsv(path: Path, n: int, seed: int = 0, columns: tuple[str, str] = ("sentence", "label")) -> Path:
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        out = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
        out.writerow(columns)
        for i in range(n):
            out.writerow([sentence(rng, i % 2), i % 2])
    return path


def save_tiny_bert(directory: Path, dropout: float) -> Path:
    """tests/conftest.py's tiny BERT, but initialised with std 0.1 instead of 0.02: a random model that
    small learns the keyword task in a few dozen steps only when its attention is not near-uniform."""
    assert len(make_tokenizer(directory)) <= VOCAB
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=2, max_position_embeddings=64, initializer_range=0.1,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(cfg).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A saved 2-layer random BERT (dropout 0.1 as BERT's default) with the tiny tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), dropout=0.1)


@pytest.fixture(scope="session")
def tiny_bert_nodrop_dir(tmp_path_factory) -> Path:
    """The same BERT without dropout: runs that must agree across process counts draw no random masks."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert_nodrop"), dropout=0.0)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Runs here set train.num_threads: 1 (tiny models; far faster on a shared CPU); put it back after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_llama")
    make_tokenizer(directory)
    tiny_llama().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("sentiment")
    return write_tsv(directory / "train.tsv", 96, seed=1), write_tsv(directory / "dev.tsv", 48, seed=2)


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    rows = [{"instruction": "write a good film", "input": "", "output": "the film was great"},
            {"instruction": "write a bad plot", "input": "the plot", "output": "it was dull and boring"}] * 4
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    return path


def base_overrides(model_dir: Path, train: Path, dev: Path | None, out: Path, cache: Path) -> dict:
    """A config dict for a fast tiny run (plain dict: tests add or change keys)."""
    return {
        "model": {"path": str(model_dir)},
        "data": {"train": str(train), "validation": str(dev) if dev else None, "max_length": 32,
                 "cache_dir": str(cache)},
        "delta": [{"method": "lora", "r": 4, "alpha": 8, "targets": ["query", "value"]}],
        "train": {"epochs": 2, "batch_size": 8, "learning_rate": 0.01, "head_learning_rate": 0.01,
                  "eval_every": "epoch", "save_every": 5, "log_every": 2, "progress": "never", "warmup_ratio": 0.0,
                  "num_threads": 1},
        "output_dir": str(out),
        "seed": 7,
    }
