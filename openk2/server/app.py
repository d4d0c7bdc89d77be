"""The FastAPI app: OpenAI's chat completions ⇄ K2's chat template ⇄ the engine (ids only).

The engine runs on `EngineLoop`'s thread (engine_loop.py), shared by every client; `Server.generate`
submits a prompt's ids and returns its `Run` (the text in safe increments, `stop` strings trimmed; the
tokens it took, the finish reason and the engine's record of the request). Prompts,
sampling defaults, forced tool calls, reasoning and the parse of replies, whole or streamed, are
`ChatFormat`'s (chat_format.py, shared with the in-process agent client).
Errors keep OpenAI's shape and status; a client mistake is never a 500. `/v1/completions`,
`/tokenize`, `/detokenize`, `/metrics`: extra.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from openk2.engine.engine import Engine
from openk2.sampling import API_MAX_TOKENS, API_TEMPERATURE
from openk2.server import extra, logprobs
from openk2.server.chat_format import ChatError, ChatFormat, Prompt
from openk2.server.engine_loop import EngineLoop, Run
from openk2.server.guard import RequireKey, truthful_openapi
from openk2.server.metrics import CountRequests, Metrics
from openk2.server.protocol import (APIError, AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice,
                                    ModelCard, ModelList, SamplingRequest, Usage, chunk, completion_id, error_body,
                                    stream_error)


@dataclass
class Server:
    """What every endpoint shares: the engine loop, the chat format and the model's name (the API key
    is checked before any endpoint runs: guard.py)."""
    loop: EngineLoop
    fmt: ChatFormat
    model_name: str

    def check(self, body: SamplingRequest, max_n: int = 1) -> None:
        if body.model != self.model_name:
            raise APIError(404, f"the model `{body.model}` does not exist; this server has `{self.model_name}`",
                           param="model", code="model_not_found")
        if body.n > max_n:
            raise APIError(400, f"n must be 1..{max_n}" if max_n > 1 else "n must be 1 here", param="n")

    def generate(self, ids: list[int], body: SamplingRequest, param: str, choice: int = 0, grammar=None) -> Run:
        """Submit `ids` under the body's sampling fields."""
        seed = None if body.seed is None else body.seed + choice  # n choices: distinct, reproducible
        params = self.fmt.sampling(len(ids), body.temperature, body.top_p, body.max_new_tokens(), seed, param,
                                   grammar)
        params = logprobs.engine_params(params, body)
        detok = self.fmt.detokenizer(body.stop_strings())
        try:
            return self.loop.generate(ids, params, detok)
        except ValueError as e:
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded")

    async def collect(self, runs: list[Run], request: Request) -> list[str] | None:
        """Each run's whole text (one failing cancels the others), or None if the client goes away
        first: then its requests are cancelled at once instead of decoding on to max_tokens."""
        async def whole(pieces) -> str:
            return "".join([p async for p in pieces])

        async def all_texts() -> list[str]:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(whole(run.pieces)) for run in runs]
            return [task.result() for task in tasks]

        async def disconnected() -> None:  # the body is read: what comes next is the client leaving
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, gone = asyncio.ensure_future(all_texts()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                return None
            try:
                return work.result()
            except ExceptionGroup as e:
                raise e.exceptions[0]
        finally:
            gone.cancel()
            self.release(runs)

    def release(self, runs: list[Run]) -> None:
        """Cancel the runs' requests that are still going (a reply abandoned before its text
        generators ever started would otherwise decode on to max_tokens)."""
        for run in runs:
            self.loop.cancel(run.request)


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
               chat_template: str | None = None, template_vars: dict | None = None,
               default_temperature: float = API_TEMPERATURE, default_max_tokens: int = API_MAX_TOKENS,
               engine_thread: bool = True, reasoning: bool = False) -> FastAPI:
    """The server for `model` + `tokenizer`. `engine` (default `Engine(model)`) may be any object with
    the Engine's add_request/step/cancel/has_work, e.g. a scripted fake in tests. engine_thread: the
    app steps the engine on a thread it starts; False leaves that to the caller
    (`app.state.engine_loop.run_here()`, as `openk2 serve` does on its main thread). reasoning: parse
    K2-Thinking's `<think>` blocks into `reasoning_content` (reasoning.py)."""
    engine = engine if engine is not None else Engine(model)
    metrics = Metrics(engine)
    loop = EngineLoop(engine, metrics)
    fmt = ChatFormat(tokenizer, model.cfg.max_position_embeddings, model.cfg.vocab_size, chat_template,
                     template_vars or {}, default_temperature, default_max_tokens, reasoning)
    srv = Server(loop, fmt, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine_thread:
            loop.start()
        yield
        loop.stop()

    app = FastAPI(title="openk2", lifespan=lifespan)
    app.state.engine_loop, app.state.metrics, paths = loop, metrics, set()
    if api_key is not None:  # inside the counter, so refused requests are counted too
        app.add_middleware(RequireKey, key=api_key)
    app.add_middleware(CountRequests, metrics=metrics, paths=paths)
    truthful_openapi(app)

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(ChatError)
    async def chat_error(request, exc: ChatError):
        return JSONResponse(error_body(str(exc), "invalid_request_error", exc.param, exc.code), 400)

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
    async def health():  # up (and answering) from the start; `decode` says whether steps are compiled yet
        mode = getattr(engine, "decode_mode", None)
        return {"status": "ok"} if mode is None else {"status": "ok", "decode": mode}

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=model_name, max_model_len=fmt.context)])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        srv.check(body, max_n=8)
        # off the event loop: a long conversation's template, a new grammar's compile (~1 s at K2's vocabulary)
        prompt = await asyncio.to_thread(fmt.prompt, body.messages_as_dicts(), body.tools, body.tool_choice,
                                         body.response_format, body.parallel_tool_calls)
        ids = prompt.ids
        # n choices decode together
        runs = [srv.generate(ids, body, "messages", i, prompt.grammar) for i in range(body.n)]
        shaper = logprobs.shaper_for(fmt, body)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            streams = [logprobs.Stream(shaper, run, chat=True) if shaper else None for run in runs]
            return StreamingResponse(sse(runs, prompt, include, streams), media_type="text/event-stream")
        if (texts := await srv.collect(runs, request)) is None:
            return Response(status_code=499)  # nobody is listening (nginx's "client closed request")
        replies = [fmt.reply(text, prompt, run.finish_reason) for text, run in zip(texts, runs)]
        for reply in replies:
            metrics.count_parse_errors(reply.errors)
        lps = [shaper.chat(shaper.listed(run.request, run.completion_tokens)) if shaper else None for run in runs]
        choices = [choice_of(i, reply, lp) for i, (reply, lp) in enumerate(zip(replies, lps))]
        used = Usage.of(len(ids), sum(run.completion_tokens for run in runs), runs[0].request.cached_tokens)
        return ChatCompletion(id=completion_id(), model=model_name, usage=used, choices=choices)

    def choice_of(index: int, reply, lp: dict | None) -> Choice:
        message = AssistantMessage(content=reply.message["content"], tool_calls=reply.message.get("tool_calls"),
                                   reasoning_content=reply.message.get("reasoning_content"))
        return Choice(index=index, message=message, finish_reason=reply.finish_reason, logprobs=lp)

    async def sse(runs: list[Run], prompt: Prompt, include_usage: bool, streams: list):
        """The SSE stream of n choices decoding together: each choice's chunks carry its index and
        arrive as produced (role first, finish_reason last); one usage chunk for all; then [DONE]."""
        cid, created = completion_id(), int(time.time())

        def event(index, delta, reason=None, use=None):
            body = chunk(cid, created, model_name, delta, reason, use, include_usage, index)
            if delta is not None and streams[index]:  # the tokens consumed since the last chunk
                body["choices"][0]["logprobs"] = streams[index].take()
            return f"data: {json.dumps(body)}\n\n"

        async def one(index: int, run: Run):
            parser = fmt.stream_parser(prompt)
            yield event(index, {"role": "assistant", "content": ""})
            for delta in parser.feed(prompt.prefix):
                yield event(index, delta)
            async for piece in run.pieces:
                for delta in parser.feed(piece):
                    yield event(index, delta)
            for delta in parser.finish(run.finish_reason):
                yield event(index, delta)
            metrics.count_parse_errors(parser.errors)
            yield event(index, {}, parser.finish_reason)

        try:
            async with contextlib.aclosing(merge([one(i, run) for i, run in enumerate(runs)])) as lines:
                async for line in lines:
                    yield line
        except Exception as e:  # noqa: BLE001 — headers are out: reported in-band
            yield stream_error(e)
            return
        finally:
            srv.release(runs)
        if include_usage:
            yield event(0, None, use=Usage.of(len(prompt.ids), sum(run.completion_tokens for run in runs),
                                              runs[0].request.cached_tokens))
        yield "data: [DONE]\n\n"

    api = extra.router(srv)
    app.include_router(api)
    paths.update(r.path for r in [*app.routes, *api.routes] if hasattr(r, "path"))
    return app
