"""The FastAPI app: OpenAI's chat completions ⇄ K2's chat template ⇄ the engine (ids only).

The engine runs on `EngineLoop`'s thread (engine_loop.py), shared by every client; `Server.generate`
validates a prompt's ids and returns its text in safe increments (`stop` strings trimmed). Tool calls
are parsed with `parse_tool_calls` (whole response) or `StreamingToolParser` (SSE); tool_choice
"required" or a named function forces a call by ending the prompt with the call's opening markers
(the same prefix goes before the generated text when parsing). Errors keep OpenAI's shape and status;
a client mistake is never a 500. `/v1/completions`, `/tokenize`, `/detokenize`, `/metrics`: extra.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from openk2.engine.engine import Engine
from openk2.engine.sampler import SamplingParams
from openk2.server import extra
from openk2.server.detokenizer import Detokenizer
from openk2.server.engine_loop import EngineLoop, text_pieces
from openk2.server.metrics import CountRequests, Metrics
from openk2.server.protocol import (APIError, AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice,
                                    ModelCard, ModelList, SamplingRequest, Usage, chunk, completion_id, error_body,
                                    stream_error)
from openk2.tokenizer import StreamingToolParser, parse_tool_calls, render_chat
from openk2.tokenizer.chat import ARGUMENT_BEGIN, CALL_BEGIN, SECTION_BEGIN
from openk2.tokenizer.toolcalls import finish_reason


@dataclass
class Server:
    """What every endpoint shares: the engine loop, the tokenizer, names and defaults."""
    loop: EngineLoop
    tokenizer: object
    model_name: str
    context: int
    vocab_size: int
    stop_ids: tuple[int, ...]
    api_key: str | None
    default_temperature: float
    default_max_tokens: int

    def authorize(self, request: Request) -> None:
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise APIError(401, "invalid or missing API key", param=None, code="invalid_api_key")

    def check(self, body: SamplingRequest, request: Request, max_n: int = 1) -> None:
        self.authorize(request)
        if body.model != self.model_name:
            raise APIError(404, f"the model `{body.model}` does not exist; this server has `{self.model_name}`",
                           param="model", code="model_not_found")
        if body.n > max_n:
            raise APIError(400, f"n must be 1..{max_n}" if max_n > 1 else "n must be 1 here", param="n")

    def generate(self, ids: list[int], body: SamplingRequest, param: str, choice: int = 0):
        """Submit `ids` under the body's sampling fields: (text pieces, state) — state gets
        "completion_tokens" and "reason" as the pieces are consumed."""
        if not ids:
            raise APIError(400, "the prompt is empty", param=param)
        if len(ids) >= self.context:
            raise APIError(400, f"the prompt is {len(ids)} tokens; the context is {self.context}",
                           param=param, code="context_length_exceeded")
        max_tokens = body.max_new_tokens() or min(self.default_max_tokens, self.context - len(ids))
        temperature = self.default_temperature if body.temperature is None else body.temperature
        seed = None if body.seed is None else body.seed + choice  # n choices: distinct, reproducible
        params = SamplingParams(temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p,
                                max_tokens=max_tokens, stop_token_ids=self.stop_ids, seed=seed)
        detok = Detokenizer(self.tokenizer, self.stop_ids, body.stop_strings())
        try:
            req, queue = self.loop.submit(ids, params)
        except ValueError as e:
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded")
        state = {"completion_tokens": 0, "reason": "stop", "request": req}
        return text_pieces(self.loop, req, queue, detok, state), state

    def release(self, runs: list) -> None:
        """Cancel the runs' requests that are still going (a reply abandoned before its text
        generators ever started would otherwise decode on to max_tokens)."""
        for _, state in runs:
            self.loop.cancel(state["request"])


def forced_prefix(tool_choice, tools: list[dict] | None, messages: list[dict]) -> str:
    """The opening markers that force a tool call ("" for None/"auto"/"none"): a named function gets
    its whole call header, with the index of the dialog's next call (K2-SPEC §6.2); "required" stops
    after `functions.`, so the model picks the name."""
    if tool_choice in (None, "auto", "none"):
        return ""
    if not tools:
        raise APIError(400, f"tool_choice {json.dumps(tool_choice)} needs `tools`", param="tool_choice")
    if tool_choice == "required":
        return SECTION_BEGIN + CALL_BEGIN + "functions."
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not name:
        raise APIError(400, 'tool_choice must be "auto", "none", "required" or {"type": "function", '
                       '"function": {"name": ...}}', param="tool_choice")
    if name not in [t.get("function", {}).get("name") for t in tools]:
        raise APIError(400, f"tool_choice names `{name}`, which is not in `tools`", param="tool_choice")
    index = sum(len(m.get("tool_calls") or []) for m in messages if m["role"] == "assistant")
    return SECTION_BEGIN + CALL_BEGIN + f"functions.{name}:{index}" + ARGUMENT_BEGIN


async def merge(streams: list):
    """Items of several async iterators as each produces them; an error in one is raised here, and
    closing this (a client gone) cancels the others' tasks and waits for them."""
    queue, done = asyncio.Queue(), object()

    async def pump(stream):
        try:
            async for item in stream:
                await queue.put(item)
            await queue.put(done)
        except Exception as e:  # noqa: BLE001 — handed to the consumer
            await queue.put(e)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        for _ in streams:
            while (item := await queue.get()) is not done:
                if isinstance(item, Exception):
                    raise item
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def create_app(model, tokenizer, model_name: str, api_key: str | None = None, engine=None,
               chat_template: str | None = None, template_vars: dict | None = None, default_temperature: float = 1.0,
               default_max_tokens: int = 1024, engine_thread: bool = True) -> FastAPI:
    """The server for `model` + `tokenizer`. `engine` (default `Engine(model)`) may be any object with
    the Engine's add_request/step/cancel/has_work, e.g. a scripted fake in tests. engine_thread: the
    app steps the engine on a thread it starts; False leaves that to the caller
    (`app.state.engine_loop.run_here()`, as `openk2 serve` does on its main thread)."""
    engine = engine if engine is not None else Engine(model)
    metrics = Metrics(engine)
    loop = EngineLoop(engine, metrics)
    stop_ids = tuple(dict.fromkeys(tokenizer.token_id(n) for n in ("<|im_end|>", "[EOS]")))
    srv = Server(loop, tokenizer, model_name, model.cfg.max_position_embeddings, model.cfg.vocab_size, stop_ids,
                 api_key, default_temperature, default_max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine_thread:
            loop.start()
        yield
        loop.stop()

    app = FastAPI(title="openk2", lifespan=lifespan)
    app.state.engine_loop, app.state.metrics, paths = loop, metrics, set()
    app.add_middleware(CountRequests, metrics=metrics, paths=paths)

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

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        srv.authorize(request)
        return ModelList(data=[ModelCard(id=model_name)])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        srv.check(body, request, max_n=8)
        messages = body.messages_as_dicts()
        prefix = forced_prefix(body.tool_choice, body.tools, messages)
        use_tools = bool(body.tools) and body.tool_choice != "none"
        try:
            prompt = render_chat(messages, tools=body.tools or None, template=chat_template, **(template_vars or {}))
        except (ValueError, KeyError, TypeError) as e:
            raise APIError(400, f"cannot render the conversation: {e}", param="messages")
        ids = tokenizer.encode(prompt + prefix, allow_special=True)
        runs = [srv.generate(ids, body, "messages", i) for i in range(body.n)]  # n choices decode together
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(runs, len(ids), use_tools, include, prefix), media_type="text/event-stream")
        try:  # a task group: one choice failing cancels the others
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(collect(pieces)) for pieces, _ in runs]
        except ExceptionGroup as e:
            raise e.exceptions[0]
        finally:
            srv.release(runs)
        texts = [task.result() for task in tasks]
        choices = [choice_of(i, prefix + t, state, use_tools) for i, (t, (_, state)) in enumerate(zip(texts, runs))]
        used = {"completion_tokens": sum(state["completion_tokens"] for _, state in runs)}
        return ChatCompletion(id=completion_id(), model=model_name, usage=Usage.of(len(ids), used), choices=choices)

    async def collect(pieces) -> str:
        return "".join([p async for p in pieces])

    def choice_of(index: int, text: str, state: dict, use_tools: bool) -> Choice:
        parsed = parse_tool_calls(text) if use_tools else None
        calls = [c.to_dict() for c in parsed.tool_calls] if parsed else []
        message = AssistantMessage(content=parsed.content if parsed else text, tool_calls=calls or None)
        return Choice(index=index, message=message, finish_reason=finish_reason(state["reason"], bool(calls)))

    async def sse(runs: list, n_prompt: int, use_tools: bool, include_usage: bool, prefix: str = ""):
        """The SSE stream of n choices decoding together: each choice's chunks carry its index and
        arrive as produced (role first, finish_reason last); one usage chunk for all; then [DONE]."""
        cid, created = completion_id(), int(time.time())

        def event(index, delta, reason=None, use=None):
            body = chunk(cid, created, model_name, delta, reason, use, include_usage, index)
            return f"data: {json.dumps(body)}\n\n"

        async def one(index: int, pieces, state: dict):
            parser = StreamingToolParser() if use_tools else None
            yield event(index, {"role": "assistant", "content": ""})
            for delta in parser.feed(prefix) if prefix else []:
                yield event(index, delta)
            async for piece in pieces:
                for delta in parser.feed(piece) if parser else [{"content": piece}]:
                    yield event(index, delta)
            for delta in parser.finish(state["reason"]) if parser else []:
                yield event(index, delta)
            yield event(index, {}, parser.finish_reason if parser else state["reason"])

        try:
            async with contextlib.aclosing(merge([one(i, p, state) for i, (p, state) in enumerate(runs)])) as lines:
                async for line in lines:
                    yield line
        except Exception as e:  # noqa: BLE001 — headers are out: reported in-band
            yield stream_error(e)
            return
        finally:
            srv.release(runs)
        if include_usage:
            used = {"completion_tokens": sum(state["completion_tokens"] for _, state in runs)}
            yield event(0, None, use=Usage.of(n_prompt, used))
        yield "data: [DONE]\n\n"

    api = extra.router(srv, chat_template, template_vars)
    app.include_router(api)
    paths.update(r.path for r in [*app.routes, *api.routes] if hasattr(r, "path"))
    return app
