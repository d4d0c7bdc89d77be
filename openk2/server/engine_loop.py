"""The engine behind the server, in text: `EngineLoop` runs `engine.step()` on a thread while there
is work (handlers add requests under the same lock and receive their tokens on an asyncio queue via
`loop.call_soon_threadsafe`, so any number of clients share one continuously batched engine);
`EngineLoop.generate` returns one request's `Run`: its text in safe increments with a `Detokenizer`.
No HTTP here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from openk2.engine.engine import Request
from openk2.engine.sampler import SamplingParams
from openk2.server.detokenizer import Detokenizer
from openk2.server.protocol import APIError

log = logging.getLogger("openk2.server")


@dataclass(eq=False)
class Run:
    """A request on its way back as text: `pieces` (safe increments, stop strings cut); as they are consumed,
    the tokens they were made of and why the text ended ("stop": a stop id or string; "length")."""
    request: Request
    pieces: AsyncIterator[str] | None = None  # set by `EngineLoop.generate`
    completion_tokens: int = 0
    finish_reason: str = "stop"


class EngineLoop:
    """Owns the engine: a thread steps it while it has work; tokens go to each request's queue."""

    def __init__(self, engine, metrics=None):
        self.engine, self.lock, self.wake = engine, threading.Lock(), threading.Event()
        self.sinks: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.metrics, self.submitted = metrics, {}  # request id -> submit time, until its first token
        self.cancelled = collections.deque()  # requests to drop, taken by the stepping thread
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="openk2-engine", daemon=True)

    def start(self) -> None:
        """Step the engine on a thread of its own (tests, an app embedded in another server)."""
        self.thread.start()

    def run_here(self, keep_going=lambda: True) -> None:
        """Step the engine on the calling thread until `stop()` or until keep_going() is false.
        `openk2 serve` runs it on the main thread, where the model was loaded and compiled: OpenMP
        keeps a thread pool per calling thread, and a second pool on a machine with as many cores
        as one pool's threads makes every parallel region wake sleeping threads (decode ~2.5× slower)."""
        self._run(keep_going)

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    def generate(self, prompt_ids: list[int], params: SamplingParams, detok: Detokenizer) -> Run:
        """Queue a request (ValueError if it can never be served) and return its Run; the tokens reach
        its pieces on a queue as (token, finish_reason or None), or an exception if the engine failed."""
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        with self.lock:
            req = self.engine.add_request(prompt_ids, params)
            self.sinks[req.id], self.submitted[req.id] = (loop, queue), time.monotonic()
        if self.metrics:
            self.metrics.prompt_tokens.inc(len(prompt_ids))
        self.wake.set()
        run = Run(req)
        run.pieces = _pieces(self, run, queue, detok)
        return run

    def cancel(self, req) -> None:
        """Drop a request (its client is gone or has what it needs). Never waits for a step: the
        stepping thread cancels it before its next one."""
        if not req.finished:
            self.cancelled.append(req)
            self.wake.set()

    def abort_all(self, error: Exception) -> None:
        """Cancel every request and fail its client with `error` (shutting down)."""
        with self.lock:
            out = self._fail_all(error)
        self._deliver(out)

    def _run(self, keep_going=lambda: True) -> None:
        while not self.stopping and keep_going():
            if not self.wake.wait(timeout=0.5):
                continue
            with self.lock:
                while self.cancelled:
                    req = self.cancelled.popleft()
                    self.engine.cancel(req)
                    self.sinks.pop(req.id, None)
                    self.submitted.pop(req.id, None)
                if not self.engine.has_work():
                    self.wake.clear()
                    continue
                out = self._step()
            self._deliver(out)

    @staticmethod
    def _deliver(out: list) -> None:
        for (loop, queue), item in out:
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _fail_all(self, error: Exception) -> list:
        """Under the lock: cancel every request; [(sink, error)] for each waiting client."""
        if not isinstance(error, APIError):  # logged by the caller; a client gets a 500 the app answers
            error = APIError(500, "internal server error", "server_error")  # (keeping its connection open)
        out = [(sink, error) for sink in self.sinks.values()]
        for req in [*self.engine.waiting, *self.engine.running]:
            self.engine.cancel(req)
        self.sinks.clear()
        self.submitted.clear()
        return out

    def _step(self) -> list:
        """One engine step under the lock: [(sink, item)]; sinks of finished requests are dropped."""
        try:
            events = self.engine.step()
        except Exception as e:  # noqa: BLE001 — fail every waiting client, keep serving
            log.exception("engine step failed; its %d requests are cancelled", len(self.sinks))
            return self._fail_all(e)
        self._observe(events)
        out = [(self.sinks[r.id], (tok, r.finish_reason)) for r, tok in events if r.id in self.sinks]
        for r, _ in events:
            if r.finish_reason is not None:
                self.sinks.pop(r.id, None)
        return out

    def _observe(self, events) -> None:
        for r, _ in events:
            t0 = self.submitted.pop(r.id, None)
            if self.metrics and t0 is not None:
                self.metrics.ttft.observe(time.monotonic() - t0)
        if self.metrics:
            self.metrics.generation_tokens.inc(len(events))


async def _pieces(loop: EngineLoop, run: Run, queue: asyncio.Queue, detok: Detokenizer):
    """`run`'s text in safe increments, counting its tokens and setting its finish reason as it goes.
    Cancels the request if abandoned or stopped early."""
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            tok, reason = item
            run.completion_tokens += 1
            piece = detok.add(tok, final=reason is not None)
            if piece:
                yield piece
            if detok.stopped or reason is not None:
                run.finish_reason = "stop" if detok.stopped else reason
                return
    finally:
        loop.cancel(run.request)
