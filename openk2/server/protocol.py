"""OpenAI's chat-completions and (legacy) completions protocol, plus vLLM-style tokenize/detokenize,
as pydantic models: what a request may hold (validated, so a client mistake is a 400 with OpenAI's
error shape, never a 500) and the shapes of the replies.

Accepted and ignored: fields OpenAI defines that change nothing here (user, metadata, …). Log-probs
and echo are shaped in logprobs.py.
Rejected: n > 1 for text completions, a batch of several prompts (see app.py, extra.py).
Not here: generation, tool calls.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """A client-facing error: HTTP status and OpenAI's `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def stream_error(e: Exception) -> str:
    """The SSE event reporting `e` once a streamed reply's headers are out (in-band, as OpenAI does):
    an APIError as itself, anything else as an internal error, its traceback logged on the server."""
    if isinstance(e, APIError):
        return f"data: {json.dumps(e.body())}\n\n"
    logging.getLogger("openk2.server").error("a streamed reply failed", exc_info=e)
    return f"data: {json.dumps(error_body('internal server error', 'server_error'))}\n\n"


# ---------------------------------------------------------------- requests

class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. `reasoning_content`, passed on to the template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """The fields chat completions and completions share."""
    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 9)  # what torch's generator takes (+ up to 8 choices)
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences are allowed", param="stop")
        return [s for s in stops if s]

    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # None (or absent): true, OpenAI's default
    response_format: dict[str, Any] | None = None  # text / json_object / json_schema: checked by constrain.py
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def messages_as_dicts(self) -> list[dict]:
        return message_dicts(self.messages)


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    out = [m.model_dump(exclude_none=True) for m in messages]
    for m in out:  # the K2 template knows `system`; OpenAI's newer `developer` role means the same
        m["role"] = "system" if m["role"] == "developer" else m["role"]
    return out


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 only with echo: the prompt scored, nothing generated
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None  # None: false


class TokenizeRequest(BaseModel):
    """`prompt` as is, or `messages` (+ `tools`) through the chat template."""
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    special: bool = False  # `prompt`'s special-token strings become their ids (as /v1/completions reads them)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- responses

class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens the engine's prefix cache held (not computed again)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, n_prompt: int, n_completion: int, cached: int = 0) -> Usage:
        return cls(prompt_tokens=n_prompt, completion_tokens=n_completion, total_tokens=n_prompt + n_completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None  # K2-Thinking's `<think>` text, with a reasoning parser
    tool_calls: list[dict[str, Any]] | None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "openk2"
    max_model_len: int | None = None  # the context, as vLLM reports it (agent clients read it)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def completion_id(kind: str = "chatcmpl") -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def _envelope(kind: str, field: str, cid: str, created: int, model: str, value, finish_reason, usage,
              include_usage: bool, index: int = 0) -> dict:
    """The shared shape of completion objects: one choice carrying `field`, or none when value is None."""
    out = {"id": cid, "object": kind, "created": created, "model": model,
           "choices": [] if value is None else
           [{"index": index, field: value, "logprobs": None, "finish_reason": finish_reason}]}
    if include_usage:
        out["usage"] = usage.model_dump() if usage else None
    return out


def chunk(cid: str, created: int, model: str, delta: dict | None, finish_reason: str | None = None,
          usage: Usage | None = None, include_usage: bool = False, index: int = 0) -> dict:
    """One `chat.completion.chunk` for choice `index`; `delta` None is the usage-only chunk (empty
    `choices`)."""
    return _envelope("chat.completion.chunk", "delta", cid, created, model, delta, finish_reason, usage,
                     include_usage, index)


def text_completion(cid: str, created: int, model: str, text: str | None, finish_reason: str | None = None,
                    usage: Usage | None = None, include_usage: bool = True) -> dict:
    """A `text_completion` (whole, or one SSE chunk of it); `text` None is the usage-only chunk."""
    return _envelope("text_completion", "text", cid, created, model, text, finish_reason, usage, include_usage)
