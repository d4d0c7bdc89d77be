"""The FastAPI app: OpenAI's chat completions ⇄ K2's chat template ⇄ the engine (ids only).

One background thread runs `engine.step()` while there is work; handlers add requests under the
same lock and receive their tokens on an asyncio queue (`loop.call_soon_threadsafe`), so any number
of clients share one continuously batched engine. Text is made here: ids are decoded incrementally
(a UTF-8 character split over tokens is held back), `stop` strings end a request and are trimmed,
and tool calls are parsed with `parse_tool_calls` (whole response) or `StreamingToolParser` (SSE).
Errors keep OpenAI's shape and status; a client mistake is never a 500.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from openk2.engine.engine import Engine
from openk2.engine.sampler import SamplingParams
from openk2.server.protocol import (APIError, AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice,
                                    ModelCard, ModelList, Usage, chunk, completion_id, error_body)
from openk2.tokenizer import StreamingToolParser, parse_tool_calls, render_chat
from openk2.tokenizer.toolcalls import finish_reason, partial_marker


class EngineLoop:
    """Owns the engine: a thread steps it while it has work; tokens go to each request's queue."""

    def __init__(self, engine):
        self.engine, self.lock, self.wake = engine, threading.Lock(), threading.Event()
        self.sinks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="openk2-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    def submit(self, prompt_ids: list[int], params: SamplingParams):
        """Queue a request (ValueError if it can never be served); its tokens arrive on the queue as
        (token, finish_reason or None), or an exception if the engine failed."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        with self.lock:
            req = self.engine.add_request(prompt_ids, params)
            self.sinks[req.id] = (loop, queue)
        self.wake.set()
        return req, queue

    def cancel(self, req) -> None:
        with self.lock:
            self.engine.cancel(req)
            self.sinks.pop(req.id, None)

    def _run(self) -> None:
        while not self.stopping:
            self.wake.wait()
            with self.lock:
                if not self.engine.has_work():
                    self.wake.clear()
                    continue
                out = self._step()
            for (loop, queue), item in out:
                loop.call_soon_threadsafe(queue.put_nowait, item)

    def _step(self) -> list:
        """One engine step under the lock: [(sink, item)]; sinks of finished requests are dropped."""
        try:
            events = self.engine.step()
        except Exception as e:  # noqa: BLE001 — fail every waiting client, keep serving
            out = [(sink, e) for sink in self.sinks.values()]
            for req in [*self.engine.waiting, *self.engine.running]:
                self.engine.cancel(req)
            self.sinks.clear()
            return out
        out = [(self.sinks[r.id], (tok, r.finish_reason)) for r, tok in events if r.id in self.sinks]
        for r, _ in events:
            if r.finish_reason is not None:
                self.sinks.pop(r.id, None)
        return out


class Detokenizer:
    """Token ids -> safe text increments: stop ids dropped, split UTF-8 characters and a possible
    prefix of a stop string held back; `stopped` once a stop string appears (the text ends before it)."""

    def __init__(self, tokenizer, stop_ids, stop_strings: list[str]):
        self.tokenizer, self.stop_ids, self.stop_strings = tokenizer, set(stop_ids), stop_strings
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, tok: int, final: bool = False) -> str:
        if tok not in self.stop_ids:
            self.text += self.utf8.decode(self.tokenizer.decode_bytes([tok]))
        if final:
            self.text += self.utf8.decode(b"", final=True)
        hits = [i for s in self.stop_strings if (i := self.text.find(s)) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text) if final or self.stopped else len(self.text) - partial_marker(self.text, self.stop_strings)
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece


def create_app(model, tokenizer, model_name: str, api_key: str | None = None, engine=None,
               chat_template: str | None = None, template_vars: dict | None = None, default_temperature: float = 1.0,
               default_max_tokens: int = 1024) -> FastAPI:
    """The server for `model` + `tokenizer`. `engine` (default `Engine(model)`) may be any object with
    the Engine's add_request/step/cancel/has_work, e.g. a scripted fake in tests."""
    loop = EngineLoop(engine if engine is not None else Engine(model))
    context = model.cfg.max_position_embeddings
    stop_ids = tuple(dict.fromkeys(tokenizer.token_id(n) for n in ("<|im_end|>", "[EOS]")))

    @asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="openk2", lifespan=lifespan)
    app.state.engine_loop = loop

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        if err.get("type") == "json_invalid":
            return JSONResponse(error_body(f"malformed JSON: {err.get('msg')}", "invalid_request_error"), 400)
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        msg = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}"
        return JSONResponse(error_body(msg, "invalid_request_error", ".".join(loc) or None), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), exc.status_code)

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        return JSONResponse(error_body("internal server error", "server_error"), 500)

    def authorize(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key", param=None, code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return ModelList(data=[ModelCard(id=model_name)])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        authorize(request)
        if body.model != model_name:
            raise APIError(404, f"the model `{body.model}` does not exist; this server has `{model_name}`",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if body.tool_choice not in (None, "auto", "none"):
            raise APIError(400, 'tool_choice must be "auto" or "none"', param="tool_choice")
        use_tools = bool(body.tools) and body.tool_choice != "none"
        try:
            prompt = render_chat(body.messages_as_dicts(), tools=body.tools or None, template=chat_template,
                                 **(template_vars or {}))
        except (ValueError, KeyError, TypeError) as e:
            raise APIError(400, f"cannot render the conversation: {e}", param="messages")
        ids = tokenizer.encode(prompt, allow_special=True)
        if len(ids) >= context:
            raise APIError(400, f"the prompt is {len(ids)} tokens; the context is {context}",
                           param="messages", code="context_length_exceeded")
        max_tokens = body.max_completion_tokens or body.max_tokens or min(default_max_tokens, context - len(ids))
        params = SamplingParams(temperature=default_temperature if body.temperature is None else body.temperature,
                                top_p=1.0 if body.top_p is None else body.top_p, max_tokens=max_tokens,
                                stop_token_ids=stop_ids, seed=body.seed)
        try:
            req, queue = loop.submit(ids, params)
        except ValueError as e:
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded")
        detok = Detokenizer(tokenizer, stop_ids, body.stop_strings())
        state = {"completion_tokens": 0, "reason": "stop"}
        pieces = text_pieces(loop, req, queue, detok, state)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(pieces, state, len(ids), use_tools, include),
                                     media_type="text/event-stream")
        text = "".join([p async for p in pieces])
        return full_response(text, state, len(ids), use_tools)

    def full_response(text: str, state: dict, n_prompt: int, use_tools: bool) -> ChatCompletion:
        parsed = parse_tool_calls(text) if use_tools else None
        calls = [c.to_dict() for c in parsed.tool_calls] if parsed else []
        message = AssistantMessage(content=parsed.content if parsed else text, tool_calls=calls or None)
        choice = Choice(message=message, finish_reason=finish_reason(state["reason"], bool(calls)))
        return ChatCompletion(id=completion_id(), model=model_name, usage=usage(n_prompt, state), choices=[choice])

    async def sse(pieces, state: dict, n_prompt: int, use_tools: bool, include_usage: bool):
        cid, created = completion_id(), int(time.time())

        def event(delta, reason=None, use=None):
            return f"data: {json.dumps(chunk(cid, created, model_name, delta, reason, use, include_usage))}\n\n"

        parser = StreamingToolParser() if use_tools else None
        yield event({"role": "assistant", "content": ""})
        try:
            async for piece in pieces:
                for delta in parser.feed(piece) if parser else [{"content": piece}]:
                    yield event(delta)
        except Exception:  # noqa: BLE001 — headers are out: report in-band, as OpenAI does
            yield f"data: {json.dumps(error_body('internal server error', 'server_error'))}\n\n"
            return
        for delta in parser.finish(state["reason"]) if parser else []:
            yield event(delta)
        yield event({}, parser.finish_reason if parser else state["reason"])
        if include_usage:
            yield event(None, use=usage(n_prompt, state))
        yield "data: [DONE]\n\n"

    return app


def usage(n_prompt: int, state: dict) -> Usage:
    return Usage(prompt_tokens=n_prompt, completion_tokens=state["completion_tokens"],
                 total_tokens=n_prompt + state["completion_tokens"])


async def text_pieces(loop: EngineLoop, req, queue: asyncio.Queue, detok: Detokenizer, state: dict):
    """The response text in safe increments; sets state["completion_tokens"] and state["reason"]
    ("stop" for a stop id or string, "length"). Cancels the request if abandoned or stopped early."""
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            tok, reason = item
            state["completion_tokens"] += 1
            piece = detok.add(tok, final=reason is not None)
            if piece:
                yield piece
            if detok.stopped or reason is not None:
                state["reason"] = "stop" if detok.stopped else reason
                return
    finally:
        loop.cancel(req)
