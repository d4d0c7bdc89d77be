"""The endpoints beside chat: `/v1/completions` (OpenAI's legacy text completions: a raw prompt, text or
token ids, no template, no tools; log-probs and echo: logprobs.py), `/tokenize`, `/detokenize` and
`/tokenizer_info` (vLLM's shapes; lm-eval's `remote` tokenizer reads them), `/metrics` (Prometheus text).
They share app.py's `Server`: the same engine, validation and error shapes.

A completion prompt given as text may hold K2's special-token strings (`<|im_end|>`, …): they become
their ids, as a hand-written chat prompt needs. `/tokenize` reads them as plain text unless asked
(`"special": true`); its `messages` get the chat's structure only, as chat completions do. Token
ids must lie in the model's vocabulary.
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from openk2.server import logprobs
from openk2.server.engine_loop import Run
from openk2.server.protocol import (APIError, CompletionRequest, DetokenizeRequest, TokenizeRequest, Usage,
                                    completion_id, message_dicts, stream_error, text_completion)


def check_ids(ids: list[int], n: int, param: str) -> None:
    bad = [t for t in ids if not 0 <= t < n]
    if bad:
        raise APIError(400, f"token ids {bad[:8]} outside the vocabulary [0, {n})", param=param)


def prompt_ids(srv, prompt) -> list[int]:
    """One prompt's ids: text, ids, or a batch of one of either (larger batches are refused)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return srv.fmt.tokenizer.encode(prompt, allow_special=True)
    check_ids(prompt, srv.fmt.vocab_size, "prompt")
    return list(prompt)


def router(srv) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        srv.check(body)
        ids = prompt_ids(srv, body.prompt)
        run = srv.generate(ids, body, "prompt")
        cid, created = completion_id("cmpl"), int(time.time())
        shaper = logprobs.shaper_for(srv.fmt, body)
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            lps = logprobs.Stream(shaper, run, chat=False) if shaper else None
            return StreamingResponse(sse(run, len(ids), cid, created, include, lps),
                                     media_type="text/event-stream")
        if (texts := await srv.collect([run], request)) is None:
            return Response(status_code=499)  # the client left: its request was cancelled
        text, lps = logprobs.whole_completion(srv.fmt, body, ids, run, texts[0], shaper)
        out = text_completion(cid, created, srv.model_name, text, run.finish_reason,
                              Usage.of(len(ids), run.completion_tokens, run.request.cached_tokens))
        out["choices"][0]["logprobs"] = lps
        return out

    async def sse(run: Run, n_prompt: int, cid: str, created: int, include_usage: bool, lps):
        def event(text, reason=None, use=None):
            body = text_completion(cid, created, srv.model_name, text, reason, use, include_usage)
            if text is not None and lps:  # the tokens consumed since the last chunk
                body["choices"][0]["logprobs"] = lps.take()
            return f"data: {json.dumps(body)}\n\n"

        try:
            async for piece in run.pieces:
                yield event(piece)
        except Exception as e:  # noqa: BLE001 — headers are out: reported in-band
            yield stream_error(e)
            return
        finally:
            srv.release([run])
        yield event("", run.finish_reason)
        if include_usage:
            yield event(None, use=Usage.of(n_prompt, run.completion_tokens, run.request.cached_tokens))
        yield "data: [DONE]\n\n"

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of `prompt` and `messages`", param="prompt")
        if body.messages is not None:  # the chat's own structure only: special strings in values are text
            tokens = srv.fmt.encode(message_dicts(body.messages), body.tools, body.add_generation_prompt)
        else:
            tokens = srv.fmt.tokenizer.encode(body.prompt, allow_special=body.special)
        return {"tokens": tokens, "count": len(tokens)}

    @api.get("/tokenizer_info")
    async def tokenizer_info():
        """The part of vLLM's reply that lm-eval's `remote` tokenizer backend reads."""
        eos = srv.fmt.tokenizer.decode(srv.fmt.stop_ids[:1])
        return {"eos_token": eos, "bos_token": None, "pad_token": None, "model_max_length": srv.fmt.context}

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_ids(body.tokens, srv.fmt.tokenizer.n_vocab, "tokens")
        return {"prompt": srv.fmt.tokenizer.decode(body.tokens)}

    @api.get("/metrics")
    async def metrics(request: Request):
        data, content_type = request.app.state.metrics.render()
        return Response(data, media_type=content_type)

    return api
