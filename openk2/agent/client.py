"""Model clients for the agent loop, one interface: `await client.complete(messages, tools, ...)`
takes messages in OpenAI's chat format and returns one assistant `Completion`.

- `OpenAIClient`: any OpenAI-compatible endpoint over HTTP with the openai SDK (`openk2 serve`, vLLM,
  SGLang, a hosted API): base URL + key + model.
- `EngineClient`: our Engine in this process, no HTTP. It goes through the server's own `ChatFormat`
  and `EngineLoop`, so a conversation gets the ids and the parsed reply `openk2 serve` would give;
  concurrent episodes share one engine and its continuous batching (RL rollouts); it also returns the
  prompt and sampled token ids.
- `ScriptedClient`: plays back assistant turns written as the model writes them (K2 text with tool-call
  markers) or computed from the conversation, through the same template and parser; for tests and
  programmatic teachers.
`on_delta(kind, text)` receives "content" and "reasoning" text as it arrives (the terminal UI).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from openk2.server.chat_format import ChatError, ChatFormat
from openk2.server.constrain import as_strict
from openk2.tokenizer import Tokenizer

MESSAGE_KEYS = ("role", "content", "reasoning_content", "tool_calls")


class ContextLengthExceeded(RuntimeError):
    """The conversation no longer fits the model's context (the loop compacts it, or stops)."""


@dataclass
class Completion:
    message: dict  # the assistant message: role, content, tool_calls?, reasoning_content?
    finish_reason: str  # "stop" | "tool_calls" | "length" | ...
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: list[str] = field(default_factory=list)  # tool calls the parser dropped, and why
    prompt_ids: list[int] | None = None  # in-process clients: what the model read ...
    completion_ids: list[int] | None = None  # ... and what it sampled (RL trains on these) ...
    logprobs: list[float] | None = None  # ... with each sampled token's log-prob, if the client was asked


def clean_message(message: dict) -> dict:
    """An assistant message with the fields the loop keeps; reasoning under `reasoning_content`
    whatever the server called it (vLLM: `reasoning_content`, later `reasoning`)."""
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    out = {k: message[k] for k in MESSAGE_KEYS if message.get(k) is not None and k != "reasoning_content"}
    out.setdefault("content", None)
    if reasoning:
        out["reasoning_content"] = reasoning
    if out.get("tool_calls"):  # arguments as a JSON string, as OpenAI's API has them
        out["tool_calls"] = [{"id": c["id"], "type": "function", "function": {"name": c["function"]["name"],
                              "arguments": as_json_text(c["function"]["arguments"])}} for c in out["tool_calls"]]
    else:  # an empty list is not "no calls" to every endpoint: OpenAI answers 400 `empty_array`
        out.pop("tool_calls", None)
    return out


def as_json_text(arguments) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


# ---------------------------------------------------------------- over HTTP

class OpenAIClient:
    """An OpenAI-compatible endpoint. `model` None takes the server's first model; the context window
    comes from `context_window` or the server's `/v1/models` (`max_model_len`, as openk2 and vLLM say)."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 context_window: int | None = None, timeout: float = 600.0, http_client=None,
                 strict_tools: bool = False, **request_fields):
        """request_fields go into every request (top_p, extra_body, ...); http_client: the SDK's own;
        strict_tools: every tool is sent marked `"strict": true` (the endpoint constrains its calls)."""
        key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
        self.sdk_args = {"base_url": base_url, "api_key": key, "timeout": timeout, "max_retries": 2,
                         "http_client": http_client}
        self.name, self.context_window, self.fields = model, context_window, request_fields
        self.strict_tools = strict_tools
        self._ready = model is not None and context_window is not None
        self._sdk, self._loop = None, None

    @property
    def sdk(self):
        """The SDK client of the running event loop (its connections belong to one loop, and a client
        may serve several `asyncio.run`s)."""
        import asyncio

        import openai

        if self._loop is not asyncio.get_running_loop():
            self._sdk, self._loop = openai.AsyncOpenAI(**self.sdk_args), asyncio.get_running_loop()
        return self._sdk

    async def _setup(self) -> None:
        models = (await self.sdk.models.list()).data
        card = next((m for m in models if self.name in (None, m.id)), None)
        if card is None:
            raise RuntimeError(f"the endpoint serves {[m.id for m in models]}, not {self.name!r}")
        self.name = card.id
        self.context_window = self.context_window or (card.model_extra or {}).get("max_model_len")
        self._ready = True

    def count_tokens(self, messages: list[dict], tools: list[dict] | None = None) -> int:
        """An estimate (no tokenizer here): three characters a token errs towards compacting early."""
        return len(json.dumps([messages, tools or []], ensure_ascii=False)) // 3

    async def complete(self, messages, tools=None, *, tool_choice=None, max_tokens=None, temperature=None,
                       seed=None, on_delta: Callable[[str, str], None] | None = None) -> Completion:
        import openai

        if not self._ready:
            await self._setup()
        tools = as_strict(tools) if self.strict_tools else tools
        given = {"tools": tools or None, "tool_choice": tool_choice if tools else None, "max_tokens": max_tokens,
                 "temperature": temperature, "seed": seed}
        kw = {"model": self.name, "messages": messages, **self.fields,
              **{k: v for k, v in given.items() if v is not None}}
        try:
            if on_delta is None:
                r = await self.sdk.chat.completions.create(**kw)
                message = r.choices[0].message
                raw = {**message.model_dump(exclude_none=True), **(message.model_extra or {})}
                usage = r.usage
                return Completion(clean_message(raw), r.choices[0].finish_reason,
                                  usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)
            return await self._stream(kw, on_delta)
        except openai.BadRequestError as e:
            if "context" in str(e).lower():
                raise ContextLengthExceeded(str(e)) from e
            raise

    async def _stream(self, kw: dict, on_delta) -> Completion:
        stream = await self.sdk.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        text, reasoning, calls, reason, usage = [], [], {}, "stop", None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                delta = {**choice.delta.model_dump(exclude_none=True), **(choice.delta.model_extra or {})}
                reason = choice.finish_reason or reason
                if piece := delta.get("reasoning_content") or delta.get("reasoning"):
                    reasoning.append(piece)
                    on_delta("reasoning", piece)
                if piece := delta.get("content"):
                    text.append(piece)
                    on_delta("content", piece)
                for c in delta.get("tool_calls") or []:
                    call = calls.setdefault(c["index"], {"id": "", "function": {"name": "", "arguments": ""}})
                    call["id"] += c.get("id") or ""
                    call["function"]["name"] += (c.get("function") or {}).get("name") or ""
                    call["function"]["arguments"] += (c.get("function") or {}).get("arguments") or ""
        message = {"role": "assistant", "content": "".join(text) or None, "reasoning_content": "".join(reasoning),
                   "tool_calls": [calls[i] for i in sorted(calls)]}
        return Completion(clean_message(message), reason, usage.prompt_tokens if usage else 0,
                          usage.completion_tokens if usage else 0)


# ---------------------------------------------------------------- in process

class EngineClient:
    """Our Engine behind an `EngineLoop` (started by the caller: `loop.start()` or `loop.run_here()`).
    logprobs: each completion also carries its sampled tokens' log-probs, taken by the engine as it
    samples them (under the raw logits: the policy's own, whatever the temperature), for RL."""

    def __init__(self, loop, fmt: ChatFormat, name: str = "openk2", logprobs: bool = False,
                 strict_tools: bool = False):
        """strict_tools: each call names a declared tool, its arguments valid under the tool's schema
        (constrained decoding, as for `"strict": true` tools; the prompt declares the tools unchanged)."""
        self.loop, self.fmt, self.name, self.context_window = loop, fmt, name, fmt.context
        self.logprobs, self.strict_tools = logprobs, strict_tools

    def count_tokens(self, messages: list[dict], tools: list[dict] | None = None) -> int:
        return len(self.fmt.prompt(messages, tools).ids)

    async def complete(self, messages, tools=None, *, tool_choice=None, max_tokens=None, temperature=None,
                       seed=None, on_delta=None) -> Completion:
        try:
            prompt = self.fmt.prompt(messages, tools, tool_choice, strict_tools=self.strict_tools)
            room = self.fmt.context - len(prompt.ids)
            params = self.fmt.sampling(len(prompt.ids), temperature, None, max_tokens and min(max_tokens, room), seed,
                                       grammar=prompt.grammar)
            params.logprobs = 0 if self.logprobs else None
        except ChatError as e:
            raise (ContextLengthExceeded(str(e)) if e.code == "context_length_exceeded" else e) from None
        run = self.loop.generate(prompt.ids, params, self.fmt.detokenizer())
        parser, pieces = self.fmt.stream_parser(prompt), []
        parser.feed(prompt.prefix)
        async for piece in run.pieces:
            pieces.append(piece)
            for delta in parser.feed(piece) if on_delta else []:
                for kind, key in (("reasoning", "reasoning_content"), ("content", "content")):
                    if delta.get(key):
                        on_delta(kind, delta[key])
        reply = self.fmt.reply("".join(pieces), prompt, run.finish_reason)
        req = run.request
        return Completion(reply.message, reply.finish_reason, len(prompt.ids), run.completion_tokens,
                          reply.errors, prompt.ids, list(req.output),
                          [t.logprob for t in req.logprobs] if self.logprobs else None)


# ---------------------------------------------------------------- scripted

class ScriptedClient:
    """Plays back `turns`, one per call: the text the model would write after the prompt (K2's markers
    for tool calls), a dict `{"content": text, "reasoning_content": ...}`, a dict with `tool_calls`
    as an endpoint returns them (not parsed), or a function of (messages, tools) returning any of
    these. Every request is rendered and tokenized as the engine would (a malformed conversation
    fails here as it would there) and kept in `requests`; replies are cut at max_tokens and parsed
    by `ChatFormat.reply`."""

    def __init__(self, turns, tokenizer: Tokenizer | None = None, context_window: int = 131072,
                 name: str = "scripted"):
        tokenizer = tokenizer or Tokenizer.byte_level()
        self.fmt = ChatFormat(tokenizer, context_window, tokenizer.n_vocab)
        self.turns, self.requests, self.name, self.context_window = list(turns), [], name, context_window

    def count_tokens(self, messages: list[dict], tools: list[dict] | None = None) -> int:
        return len(self.fmt.prompt(messages, tools).ids)

    async def complete(self, messages, tools=None, *, tool_choice=None, max_tokens=None, temperature=None,
                       seed=None, on_delta=None) -> Completion:
        prompt = self.fmt.prompt(messages, tools, tool_choice)
        if len(prompt.ids) >= self.context_window:
            raise ContextLengthExceeded(f"the prompt is {len(prompt.ids)} tokens; the context is {self.context_window}")
        self.requests.append({"messages": copy.deepcopy(messages), "tools": tools, "tool_choice": tool_choice,
                              "max_tokens": max_tokens, "prompt_ids": prompt.ids})
        if not self.turns:
            raise RuntimeError("the script has no more turns")
        turn = self.turns.pop(0)
        turn = turn(messages, tools) if callable(turn) else turn
        turn = turn if isinstance(turn, dict) else {"content": turn}
        if "tool_calls" in turn:  # calls given as an endpoint returns them (raw arguments, unchecked)
            message = clean_message({"role": "assistant", **turn})
            return Completion(message, "tool_calls", len(prompt.ids), 1)
        text = turn["content"]
        if prompt.prefix and not text.startswith(prompt.prefix):
            raise RuntimeError(f"the scripted turn does not continue the forced call {prompt.prefix!r}")
        ids = self.fmt.tokenizer.encode(text[len(prompt.prefix):], allow_special=True)
        reason = "length" if max_tokens and len(ids) > max_tokens else "stop"
        ids = ids[:max_tokens] if reason == "length" else ids
        reply = self.fmt.reply(self.fmt.tokenizer.decode(ids), prompt, reason)
        message = {**reply.message, **({"reasoning_content": turn["reasoning_content"]}
                                       if turn.get("reasoning_content") else {})}
        if on_delta and message.get("content"):
            on_delta("content", message["content"])
        return Completion(message, reply.finish_reason, len(prompt.ids), len(ids) + 1, reply.errors)
