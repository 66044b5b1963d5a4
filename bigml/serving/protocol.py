"""What clients send and receive: OpenAI's completion and chat shapes, and bigml's /v1/predict and
/v1/fill-mask. Request bodies are pydantic models that refuse unknown fields, so a typo is a 400
naming the field rather than a silently ignored setting.

Decoding keys: OpenAI's (`max_tokens`, `temperature`, `top_p`, `n`, `stop`, `seed`) plus those of
`bigml generate` (`do_sample`, `top_k`, `repetition_penalty`, `num_beams`, `length_penalty`,
`max_new_tokens`). As in OpenAI's API, `temperature` > 0 samples and 0 decodes greedily; without
either `temperature` or `do_sample` decoding is greedy, as in `bigml generate`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class RequestError(Exception):
    """A request the server cannot serve: answered with `status` and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class Decoding(Strict):
    """The decoding keys both text endpoints take."""

    model: str | None = None
    max_tokens: int | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    do_sample: bool | None = None
    repetition_penalty: float | None = None
    num_beams: int | None = None
    length_penalty: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI fields bigml does not implement: accepted at their neutral value, refused otherwise
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> None:
        for name in ("logprobs", "logit_bias"):
            if getattr(self, name) not in (None, False, {}, 0):
                raise RequestError(f"{name} is not supported by bigml serve", name)
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise RequestError(f"{name} is not supported by bigml serve; use repetition_penalty", name)


class CompletionRequest(Decoding):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise RequestError("echo is not supported by bigml serve", "echo")
        if self.best_of not in (None, 1):
            raise RequestError("best_of is not supported by bigml serve; use num_beams", "best_of")
        if self.suffix:
            raise RequestError("suffix is not supported by bigml serve", "suffix")


class Message(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError("only text content parts are supported", "messages")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class ChatRequest(Decoding):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


class PredictRequest(Strict):
    model: str | None = None
    input: str | list[str]
    text_pair: str | list[str] | None = None


class FillMaskRequest(Strict):
    model: str | None = None
    input: str | list[str]
    top_k: int = 5


# -- responses -------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
