"""Serving throughput: `openk2 serve` over HTTP (the official openai client, non-streaming chat
completions) against the same Engine driven directly in-process, on the same weights and prompts.

A k2-small folder with random bf16 weights is written to a temporary directory, served by a real
`openk2 serve` process (compiled decode, byte-level text), and asked by 1, 8 and 32 concurrent
clients for 128 new tokens each (greedy; the prompt is the chat-templated "hello", 85 tokens). The
in-process column runs the same requests through an Engine of `EngineConfig(compile=True)` (max_batch
32). The ratio is what HTTP, the chat template, detokenizing and the asyncio/engine hand-off cost.

Then a long prompt joining a busy batch (in-process, compiled): 4 requests decoding, a 3,900-token
prompt added; per `prefill_chunk`, the decoding rows' median inter-token gap before it came, their
longest gap while it prefilled (one chunk's forward plus a decode step, by design), and its time to
first token.

    .venv/bin/python -m bench.serve [--threads 2]
"""

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import torch

from bench.forward import machine_line
from openk2.checkpoint import save_hf
from openk2.config import PRESETS
from openk2.engine import Engine, EngineConfig, SamplingParams
from openk2.model import build_model

NEW, CLIENTS = 128, (1, 8, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_folder(tmp: str, threads: int):
    """(model, folder): k2-small with random bf16 weights saved under `tmp`, after the machine line."""
    torch.set_num_threads(threads)
    print(machine_line(threads) + " | preset k2-small, bf16, random weights")
    model = build_model(PRESETS["k2-small"], dtype=torch.bfloat16).eval()
    save_hf(model, f"{tmp}/k2-small", progress=False)
    return model, f"{tmp}/k2-small"


def start_server(folder: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "openk2.cli", "serve", folder, "--port", str(port),
                             "--compile-first"],  # measure compiled steps, not the eager ones before
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600  # compiling on a cold cache takes a minute or two
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc, port
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("openk2 serve did not come up")


def over_http(port: int, name: str, clients: int) -> tuple[float, list[int]]:
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)

    def one(_):
        r = api.chat.completions.create(model=name, messages=[{"role": "user", "content": "hello"}],
                                        max_tokens=NEW, temperature=0)
        return r.usage.completion_tokens, r.usage.prompt_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(one, range(clients)))
    return sum(n for n, _ in done) / (time.perf_counter() - t0), [p for _, p in done]


def in_process(engine: Engine, prompt_len: int, clients: int) -> float:
    for _ in range(clients):
        engine.add_request(list(range(300, 300 + prompt_len)), SamplingParams(max_tokens=NEW))
    t0 = time.perf_counter()
    engine.run()
    return clients * NEW / (time.perf_counter() - t0)


def stall(model, chunk: int) -> tuple[float, float, float]:
    """(median gap before, longest gap while the long prompt prefills, its time to first token), s."""
    engine = Engine(model, EngineConfig(compile=True, prefill_chunk=chunk, max_batch=8))
    engine.warmup()
    rows = {engine.add_request(list(range(300, 332)), SamplingParams(max_tokens=400)).id for _ in range(4)}
    last, before, during, long, t_added, ttft = {}, [], [], None, 0.0, None
    for step in range(10**6):
        events = engine.step()
        now = time.perf_counter()
        for req, _ in events:
            if req.id in rows:
                if req.id in last:
                    (before if long is None else during if ttft is None else []).append(now - last[req.id])
                last[req.id] = now
            elif ttft is None:
                ttft = now - t_added
        if step == 40:
            long = engine.add_request(list(range(300, 4200)), SamplingParams(max_tokens=4))
            t_added = time.perf_counter()
        if ttft is not None:
            break
    return statistics.median(before), max(during), ttft


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, folder = random_folder(tmp, args.threads)
        proc, port = start_server(folder)
        try:
            over_http(port, "k2-small", 1)  # warm-up
            http = {n: over_http(port, "k2-small", n) for n in CLIENTS}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        prompt_len = http[1][1][0]
        engine = Engine(model, EngineConfig(compile=True))
        engine.warmup()
        in_process(engine, prompt_len, 1)  # warm-up
        print(f"\n| concurrent clients × {NEW} tokens | openk2 serve tok/s | Engine in-process tok/s | ratio |")
        print("| ---: | ---: | ---: | ---: |")
        for n in CLIENTS:
            direct = in_process(engine, prompt_len, n)
            print(f"| {n} | {http[n][0]:.0f} | {direct:.0f} | {http[n][0] / direct:.2f} |")
        print("\n| a 3,900-token prompt joins 4 decoding rows | gap before (ms) | longest gap while it "
              "prefills (ms) | its time to first token (s) |\n| --- | ---: | ---: | ---: |")
        for chunk in (256, 512, 1024):
            gap, worst, ttft = stall(model, chunk)
            print(f"| prefill_chunk {chunk} | {gap * 1e3:.0f} | {worst * 1e3:.0f} | {ttft:.2f} |")


if __name__ == "__main__":
    main()
