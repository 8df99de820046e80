"""Request bodies the server accepts: the OpenAI completions / chat completions subset it implements, and
``/v1/classify``. Unknown fields are refused (422 naming them) rather than silently ignored, so a client
asking for something this server does not do (logprobs, tools, ...) learns it at once."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A delta name, or 'base' for the base model without a delta (GET /v1/models)")


class _Generation(_Request):
    max_tokens: int | None = Field(16, ge=1, description="New tokens at most; prompt + max_tokens <= the token limit")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy; rows batch with equal settings only")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, description="Only 1 is supported")
    stream: bool = Field(False, description="Only false is supported")
    stop: str | list[str] | None = Field(None, description="Text ends before the first of these strings")
    user: str | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Generation):
    prompt: str | list[str] = Field(min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="The newer name of max_tokens")


class ClassifyRequest(_Request):
    input: str | list[str] = Field(min_length=1, description="One text or a list of texts")


def error_body(message: str, code: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    """OpenAI's error shape, which its clients turn into typed exceptions (NotFoundError, BadRequestError...)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
