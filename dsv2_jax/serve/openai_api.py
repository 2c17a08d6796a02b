"""OpenAI request bodies (pydantic) and their translation to SamplingParams; OpenAI-style error bodies."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dsv2_jax.serve.request import SamplingParams


class APIError(Exception):
    """Answered as {"error": {"message", "type", "param", "code"}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (user, metadata, ...) are ignored
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool | int | None = None

    def check(self) -> None:
        if self.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", "n")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", "logprobs")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise APIError(400, "at most 4 stop sequences", "stop")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, max_tokens: int | None, default_max: int, eos: tuple[int, ...]) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens or default_max,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p,
                              seed=(self.seed if self.seed is not None else 0) & 0x7FFFFFFF, stop_ids=eos)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    echo: bool = False

    def check(self) -> None:
        super().check()
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", "prompt")
        if self.echo:
            raise APIError(400, "echo is not supported", "echo")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for p in self.content:
                if p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise APIError(400, "only text content parts are supported", "messages")
                parts.append(p["text"])
            return "".join(parts)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
