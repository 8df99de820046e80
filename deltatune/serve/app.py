"""The HTTP layer: a FastAPI app over an ``Engine`` and a ``Batcher``.

Endpoints: ``GET /health``, ``GET /v1/models`` (the deltas, and ``base``), ``POST /v1/completions`` and
``POST /v1/chat/completions`` (OpenAI-compatible, causal LMs; ``model`` names the delta) and
``POST /v1/classify`` (classification heads: labels and probabilities). Every request is checked before it is
queued (body size, delta name, token limit, schema), so a bad request gets its 4xx without touching the
batch other requests share. Errors use OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..core.errors import StateError
from .batcher import Batcher
from .engine import Engine, Generated, Row, Sampling
from .limits import BodySizeLimit
from .protocol import ChatRequest, ClassifyRequest, CompletionRequest, error_body


@dataclasses.dataclass
class ServeSettings:
    max_batch_size: int = 16        # rows per forward; 1 turns batching off (one row at a time)
    max_wait_ms: float = 5.0        # how long the first row of a batch waits for company
    max_body_bytes: int = 1 << 20   # larger request bodies get 413 before they are read in full
    max_tokens: int | None = None   # prompt + max_tokens (or text tokens) per row; None: the model's context


class RequestError(Exception):
    """A request this server refuses: turned into a JSON error with ``status``."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def create_app(engine: Engine, tokenizer: Any, settings: ServeSettings | None = None) -> FastAPI:
    """The app; the batcher starts and stops with it (FastAPI lifespan)."""
    settings = settings or ServeSettings()
    max_tokens = min(settings.max_tokens or engine.max_tokens, engine.max_tokens)
    batcher = Batcher(lambda key, rows: engine.run(key[0], key[1], rows), settings.max_batch_size,
                      settings.max_wait_ms)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="deltatune serve", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def refused(_: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.code, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, e: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}"
                    for err in e.errors()]
        not_json = any(err.get("type") == "json_invalid" for err in e.errors())
        status, code = (400, "invalid_json") if not_json else (422, "invalid_request")
        return JSONResponse(error_body("malformed request: " + "; ".join(problems), code), status_code=status)

    @app.exception_handler(Exception)
    async def failed(_: Request, e: Exception) -> JSONResponse:  # a failed batch: its requests only (batcher.py)
        return JSONResponse(error_body(f"the server failed on this request ({type(e).__name__}: {e})",
                                       "internal_error", kind="server_error"), status_code=500)

    def delta_of(name: str) -> str | None:
        try:
            return engine.resolve(name)
        except StateError:
            raise RequestError(404, f"the model {name!r} does not exist: this server serves "
                                    f"{', '.join(engine.choices())} (GET /v1/models)", "model_not_found",
                               "model") from None

    def need_task(task: str, endpoint: str, other: str) -> None:
        if engine.task != task:
            raise RequestError(400, f"{endpoint} needs a {task} model; this server serves a {engine.task} model: "
                                    f"use {other}", "wrong_endpoint")

    def encode(text: str, special: bool = True) -> list[int]:
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        if not ids:
            raise RequestError(400, "the text encodes to no tokens; send a non-empty prompt", "empty_prompt")
        return ids

    def check_length(ids: list[int], new: int, param: str) -> None:
        if len(ids) + new > max_tokens:
            raise RequestError(400, f"this request needs {len(ids)} prompt tokens + {new} new tokens = "
                                    f"{len(ids) + new}, above this server's limit of {max_tokens} tokens; shorten "
                                    f"the {param} or lower max_tokens", "context_length_exceeded", param)

    async def complete(body: Any, prompts: list[list[int]], new: int, param: str) -> list[Generated]:
        need_task("causal_lm", "this endpoint", "POST /v1/classify")
        if body.n != 1 or body.stream:
            raise RequestError(400, "only n=1 and stream=false are supported", "unsupported_parameter",
                               "n" if body.n != 1 else "stream")
        delta = delta_of(body.model)
        for ids in prompts:
            check_length(ids, new, param)
        sampling = Sampling(body.temperature, body.top_p)
        return await batcher.submit(("generate", sampling), [Row(delta, ids, new) for ids in prompts])

    def finish(out: Generated, stops: list[str]) -> tuple[str, str]:
        text = tokenizer.decode(out.ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in stops if s and s in text]
        return (text[:min(cuts)], "stop") if cuts else (text, out.finish_reason)

    def usage(prompts: list[list[int]], outs: list[Generated]) -> dict[str, int]:
        p, c = sum(map(len, prompts)), sum(len(o.ids) for o in outs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    @app.get("/health")
    async def health() -> dict:
        s = batcher.stats
        return {"status": "ok", "task": engine.task, "models": engine.choices(), "batches": s.batches,
                "rows": s.rows, "largest_batch": s.largest, "mixed_batches": engine.mixed_batches}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": started,
                                            "owned_by": "deltatune"} for name in engine.choices()]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict:
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        prompts = [encode(t) for t in texts]
        outs = await complete(body, prompts, body.max_tokens or 16, "prompt")
        choices = []
        for i, out in enumerate(outs):
            text, reason = finish(out, body.stops())
            choices.append({"index": i, "text": text, "finish_reason": reason, "logprobs": None})
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model, "choices": choices, "usage": usage(prompts, outs)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> dict:
        need_task("causal_lm", "/v1/chat/completions", "POST /v1/classify")
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(400, "the tokenizer has no chat template, so chat messages cannot be formatted; use "
                                    "/v1/completions with a prompt", "no_chat_template")
        messages = [m.model_dump() for m in body.messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = encode(text, special=False)  # the template writes its own special tokens
        outs = await complete(body, [prompt], body.max_completion_tokens or body.max_tokens or 16, "messages")
        content, reason = finish(outs[0], body.stops())
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "usage": usage([prompt], outs),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": reason, "logprobs": None}]}

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict:
        need_task("classification", "/v1/classify", "POST /v1/completions")
        delta = delta_of(body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        rows = [Row(delta, encode(t)) for t in texts]
        for row in rows:
            check_length(row.ids, 0, "input")
        probs = await batcher.submit(("classify", None), rows)
        labels = engine.labels[body.model]
        data = [{"index": i, "label": labels[max(range(len(p)), key=p.__getitem__)],
                 "probabilities": dict(zip(labels, p, strict=True))} for i, p in enumerate(probs)]
        return {"object": "list", "model": body.model, "data": data,
                "usage": {"prompt_tokens": sum(len(r.ids) for r in rows)}}

    return app


def serve_forever(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run ``app`` with uvicorn until interrupted (one process, one event loop; the model runs on the
    batcher's thread)."""
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
