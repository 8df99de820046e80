"""The multi-delta server over HTTP, with real clients (openai, httpx): concurrent requests for different
deltas are batched into one routed forward and each gets exactly its own delta's answer; bad requests get a
clear 4xx and leave a concurrent good request alone."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

import deltatune as dt
from tests.serve.conftest import DELTAS

PROMPTS = ["Hello there", "The cat sat on", "ok"]
NEW = 12


def alone(model, tokenizer, name: str | None, prompt_ids: list[int], new: int = NEW) -> list[int]:
    """Greedy tokens from the library with only ``name`` in effect (None: the base), one prompt at a time."""
    with torch.no_grad(), dt.active(model, name):
        out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=new, do_sample=False,
                             pad_token_id=0)
    new_ids = out[0, len(prompt_ids):].tolist()
    return new_ids[:new_ids.index(2)] if 2 in new_ids else new_ids


def expected_text(model, tokenizer, name, prompt: str) -> str:
    return tokenizer.decode(alone(model, tokenizer, name, tokenizer(prompt)["input_ids"]), skip_special_tokens=True)


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


async def complete_all(url: str, jobs: list[tuple[str, str]]) -> list[str]:
    async with client(url) as c:
        answers = await asyncio.gather(*(c.completions.create(model=m, prompt=p, max_tokens=NEW, temperature=0)
                                         for m, p in jobs))
    return [a.choices[0].text for a in answers]


def test_concurrent_completions_for_three_deltas_get_each_deltas_own_tokens(llama_server, tokenizer):
    live, model = llama_server
    names = [*DELTAS, "base"]
    jobs = [(m, p) for p in PROMPTS for m in names]
    expected = [expected_text(model, tokenizer, None if m == "base" else m, p) for m, p in jobs]
    for i in range(0, len(jobs), len(names)):  # the deltas really differ, so a mix-up would show
        assert len(set(expected[i:i + len(names)])) == len(names)
    before = httpx.get(f"{live.url}/health").json()

    got = asyncio.run(complete_all(live.url, jobs))

    assert got == expected
    after = httpx.get(f"{live.url}/health").json()
    assert after["rows"] - before["rows"] == len(jobs)
    assert after["batches"] - before["batches"] < len(jobs)  # batched...
    assert after["mixed_batches"] > before["mixed_batches"]  # ...across different deltas


def test_chat_completion_uses_the_chat_template_and_the_named_delta(llama_server, tokenizer):
    live, model = llama_server
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"]
    expected = tokenizer.decode(alone(model, tokenizer, "cola", prompt), skip_special_tokens=True)

    async def ask():
        async with client(live.url) as c:
            return await c.chat.completions.create(model="cola", messages=messages, max_tokens=NEW, temperature=0)

    answer = asyncio.run(ask())
    assert answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens == len(prompt)


def test_models_lists_the_deltas_and_the_base(llama_server):
    live, _ = llama_server
    ids = [m["id"] for m in httpx.get(f"{live.url}/v1/models").json()["data"]]
    assert ids == ["base", *sorted(DELTAS)]


def test_sampled_and_length_limited_completions(llama_server):
    live, _ = llama_server
    body = {"model": "sst2", "prompt": ["Hello", "ok"], "max_tokens": 5, "temperature": 0.8, "top_p": 0.9}
    answer = httpx.post(f"{live.url}/v1/completions", json=body, timeout=30).json()
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    assert answer["usage"]["completion_tokens"] <= 10
    assert all(c["finish_reason"] in ("stop", "length") for c in answer["choices"])


BAD = {
    "unknown delta": ({"json": {"model": "nope", "prompt": "hi", "max_tokens": 3}}, 404, "model_not_found"),
    "oversized body": ({"json": {"model": "sst2", "prompt": "a" * 5000, "max_tokens": 3}}, 413, "request_too_large"),
    "too many tokens": ({"json": {"model": "sst2", "prompt": "a" * 60, "max_tokens": 10}}, 400,
                        "context_length_exceeded"),
    "malformed json": ({"content": b'{"model": "sst2", "prompt": ', "headers": {"content-type": "application/json"}},
                       400, "invalid_json"),
    "missing prompt": ({"json": {"model": "sst2", "max_tokens": 3}}, 422, "invalid_request"),
    "unsupported field": ({"json": {"model": "sst2", "prompt": "hi", "logprobs": 2}}, 422, "invalid_request"),
    "stream": ({"json": {"model": "sst2", "prompt": "hi", "stream": True}}, 400, "unsupported_parameter"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_request_gets_a_clear_4xx_and_a_concurrent_good_one_its_answer(llama_server, tokenizer, case):
    live, model = llama_server
    request, status, code = BAD[case]
    expected = expected_text(model, tokenizer, "mrpc", PROMPTS[1])

    async def both():
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            good = http.post("/v1/completions", json={"model": "mrpc", "prompt": PROMPTS[1], "max_tokens": NEW,
                                                      "temperature": 0})
            return await asyncio.gather(good, http.post("/v1/completions", **request))

    good, bad = asyncio.run(both())
    assert good.status_code == 200 and good.json()["choices"][0]["text"] == expected
    assert bad.status_code == status, bad.text
    error = bad.json()["error"]
    assert error["code"] == code and error["message"]
    if case == "unknown delta":
        assert all(name in error["message"] for name in ["base", *DELTAS])


def test_the_openai_client_sees_a_bad_delta_name_as_not_found(llama_server):
    live, _ = llama_server

    async def ask():
        async with client(live.url) as c:
            await c.completions.create(model="sts-b", prompt="hi", max_tokens=2)

    with pytest.raises(openai.NotFoundError, match="sts-b"):
        asyncio.run(ask())


def test_classify_gives_each_deltas_probabilities(bert_server, tokenizer):
    live, model = bert_server
    texts = ["good movie", "bad plot", "fine"]
    jobs = [(m, t) for t in texts for m in [*DELTAS, "base"]]
    expected = []
    for name, text in jobs:
        with torch.no_grad(), dt.active(model, None if name == "base" else name):
            expected.append(torch.softmax(model(**tokenizer(text, return_tensors="pt")).logits, -1)[0])

    async def ask_all():
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as http:
            return await asyncio.gather(*(http.post("/v1/classify", json={"model": m, "input": t}) for m, t in jobs))

    answers = [r.json() for r in asyncio.run(ask_all())]
    for (name, _), answer, probs in zip(jobs, answers, expected, strict=True):
        labels = ["bad", "ok", "good"] if name == "cola" else ["LABEL_0", "LABEL_1", "LABEL_2"]
        got = answer["data"][0]
        assert list(got["probabilities"]) == labels
        torch.testing.assert_close(torch.tensor(list(got["probabilities"].values())), probs, atol=1e-5, rtol=0)
        assert got["label"] == labels[int(probs.argmax())]
    assert len({tuple(p.tolist()) for p in expected[:4]}) == 4
    assert httpx.get(f"{live.url}/health").json()["mixed_batches"] >= 1


def test_classify_refuses_generation_and_long_inputs(bert_server):
    live, _ = bert_server
    wrong = httpx.post(f"{live.url}/v1/completions", json={"model": "sst2", "prompt": "hi"})
    assert wrong.status_code == 400 and "/v1/classify" in wrong.json()["error"]["message"]
    long = httpx.post(f"{live.url}/v1/classify", json={"model": "sst2", "input": ["fine", "a" * 80]})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
