"""Log-probs in OpenAI's shapes, from the engine's records (`Request.logprobs`, `prompt_logprobs`: the
model's log_softmax of the raw logits, whatever temperature or top-p did to sampling).

Chat (`logprobs: true`, `top_logprobs` 0..20): `{"content": [{"token", "logprob", "bytes",
"top_logprobs": [{"token", "logprob", "bytes"}]}]}`. Text completions (`logprobs` 0..5, `echo`):
`{"tokens", "token_logprobs", "top_logprobs" (token -> log-prob), "text_offset"}`; with `echo` the
prompt comes first (its first token has None), and `max_tokens: 0` scores the prompt alone.
Listed: every generated token up to where the text ends; in text completions a stop id too (lm-eval's
loglikelihood sends max_tokens 1 and drops the last entry as the generated one), not in chat's content.
A token's text is its bytes as UTF-8, or `bytes:\\xe2\\x80` when they split a character; `bytes` always
holds them. `text_offset` is the length of the text decoded from the bytes before the token's (an
unfinished character counting as one), so a whole-character token's text sits there in the reply's
text (which may end earlier: a stop string cuts the text, not the tokens; a stop id sits at the end
of a text that does not hold its name).
"""

from __future__ import annotations

import codecs
import dataclasses

from openk2.engine.sampler import SamplingParams, TokenLogprob
from openk2.server.engine_loop import Run
from openk2.server.protocol import APIError, ChatCompletionRequest

FLOOR = -9999.0  # a log-prob that underflowed to -inf (JSON has no infinity)


def wanted(body) -> int | None:
    """How many top tokens the request wants beside the chosen one; None: no log-probs."""
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def engine_params(params: SamplingParams, body) -> SamplingParams:
    """The engine's parameters with the request's log-prob fields (echo: the prompt's too)."""
    echo = getattr(body, "echo", False)
    if echo and body.stream:
        raise APIError(400, "echo is not supported with stream", param="echo")
    if body.max_tokens == 0 and not echo:
        raise APIError(400, "max_tokens: 0 needs echo (it scores the prompt alone)", param="max_tokens")
    k = wanted(body)
    max_tokens = 1 if body.max_tokens == 0 else params.max_tokens  # one token is decoded, then dropped
    return dataclasses.replace(params, logprobs=k, prompt_logprobs=echo and k is not None, max_tokens=max_tokens)


class Shaper:
    """One reply's log-probs: token texts, offsets, OpenAI's two shapes."""

    def __init__(self, tokenizer, stop_ids):
        self.tokenizer, self.stop_ids = tokenizer, set(stop_ids)

    def raw(self, tok: int) -> bytes:
        return self.tokenizer.decode_bytes([tok]) if tok < self.tokenizer.n_vocab else b""

    def text(self, tok: int) -> str:
        raw = self.raw(tok)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def listed(self, req, upto: int, since: int = 0) -> list[TokenLogprob]:
        """Entries of output tokens since..upto (the count the text was made of), stop ids left out."""
        return [e for e in req.logprobs[since:upto] if e.token not in self.stop_ids]

    # --- chat
    def chat_entry(self, tok: int, logprob: float) -> dict:
        return {"token": self.text(tok), "logprob": max(logprob, FLOOR), "bytes": list(self.raw(tok))}

    def chat(self, entries: list[TokenLogprob]) -> dict:
        return {"content": [{**self.chat_entry(e.token, e.logprob),
                             "top_logprobs": [self.chat_entry(t, lp) for t, lp in e.top]} for e in entries],
                "refusal": None}

    # --- text completions
    def completion(self, entries: list[TokenLogprob | None], tokens: list[int], at: list[int] | None = None,
                   utf8=None) -> dict:
        """`tokens` (prompt ones may have None entries); `at` [characters before them], advanced, and
        `utf8` (an incremental decoder) carry the offsets across the chunks of a stream."""
        at = at if at is not None else [0]
        utf8 = utf8 or codecs.getincrementaldecoder("utf-8")("replace")
        offsets = []
        for tok in tokens:  # an unfinished character before the token: one more (its U+FFFD or itself)
            offsets.append(at[0] + bool(utf8.getstate()[0]))
            at[0] += len(utf8.decode(self.raw(tok)))

        def top(e):
            return None if e is None else {self.text(t): max(lp, FLOOR) for t, lp in e.top}
        return {"tokens": [self.text(t) for t in tokens],
                "token_logprobs": [None if e is None else max(e.logprob, FLOOR) for e in entries],
                "top_logprobs": [top(e) for e in entries], "text_offset": offsets}


def shaper_for(fmt, body) -> Shaper | None:
    """The request's shaper, or None when it asks for no log-probs."""
    if wanted(body) is None:
        return None
    return Shaper(fmt.tokenizer, fmt.stop_ids if isinstance(body, ChatCompletionRequest) else ())


class Stream:
    """Hands a streamed choice's log-probs out chunk by chunk: the tokens consumed since the last call."""

    def __init__(self, shaper: Shaper, run: Run, chat: bool):
        self.shaper, self.run, self.chat, self.sent = shaper, run, chat, 0
        self.at, self.utf8 = [0], codecs.getincrementaldecoder("utf-8")("replace")

    def take(self) -> dict | None:
        upto, req = self.run.completion_tokens, self.run.request
        entries, self.sent = self.shaper.listed(req, upto, self.sent), upto
        if not entries:
            return None
        if self.chat:
            return self.shaper.chat(entries)
        return self.shaper.completion(entries, [e.token for e in entries], self.at, self.utf8)


def whole_completion(fmt, body, ids: list[int], run: Run, text: str,
                     shaper: Shaper | None) -> tuple[str, dict | None]:
    """A whole text completion's text (after the prompt's, with echo) and log-probs (`shaper_for` the
    request's). With max_tokens 0 the one token decoded is dropped (the run: no completion tokens,
    finish_reason "length")."""
    if body.max_tokens == 0:
        text, run.completion_tokens, run.finish_reason = "", 0, "length"
    generated = text
    if body.echo:
        text = fmt.tokenizer.decode(ids) + text
    if shaper is None:
        return text, None
    req = run.request
    entries = shaper.listed(req, run.completion_tokens)
    out = shaper.completion(entries, [e.token for e in entries], [len(text) - len(generated)])
    if not body.echo:
        return text, out
    echoed = shaper.completion(req.prompt_logprobs, ids)  # the prompt's text was decoded on its own
    return text, {key: echoed[key] + out[key] for key in out}
