"""A live server on a free port (uvicorn in a thread) over tiny random models with three deltas each, and the
model, to compute what each delta gives alone through the library. Tests compute those references while no
request is in flight (routing state lives in the model, which the server's thread uses during a batch)."""

from __future__ import annotations

import socket
import string
import threading
import time

import pytest
import torch
import uvicorn
from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

import deltatune as dt
from deltatune.serve import Engine, ServeSettings, create_app
from tests.conftest import VOCAB, perturb, tiny_bert, tiny_llama

DELTAS = ["sst2", "cola", "mrpc"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (ids < the tiny models' vocabulary of 100): pad 0, bos 1, eos 2, unk 3."""
    chars = string.ascii_letters + string.digits + " .,:;!?'\n-"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    assert len(vocab) <= VOCAB
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def with_three_deltas(model: torch.nn.Module) -> torch.nn.Module:
    for i, name in enumerate(DELTAS):
        perturb(dt.attach(model, dt.LoRA(r=4, targets="all-linear"), name=name), seed=100 + i, std=0.3)
    return model


class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 and a free port, in a daemon thread, until ``stop``."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer()


# batching collects for 100 ms so that concurrent test requests meet in one batch
SETTINGS = ServeSettings(max_batch_size=16, max_wait_ms=100, max_body_bytes=4096, max_tokens=64)


@pytest.fixture(scope="module")
def llama_server(tokenizer):
    model = with_three_deltas(tiny_llama())
    engine = Engine(model, "causal_lm", pad_id=0, eos_ids=[2])
    live = LiveServer(create_app(engine, tokenizer, SETTINGS))
    yield live, model
    live.stop()


@pytest.fixture(scope="module")
def bert_server(tokenizer):
    model = with_three_deltas(tiny_bert(num_labels=3))
    engine = Engine(model, "classification", pad_id=0, labels={"cola": ["bad", "ok", "good"]})
    live = LiveServer(create_app(engine, tokenizer, SETTINGS))
    yield live, model
    live.stop()
