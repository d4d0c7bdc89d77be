"""Start-up of `openk2 serve`: how long until the server answers, and until its decode steps run
compiled, with an empty and a filled inductor cache, compiling in the background (the default:
requests are answered with eager steps meanwhile) or before listening (`--compile-first`).

A k2-small folder with random bf16 weights is written to a temporary directory; each row starts a real
`openk2 serve` process and polls it: "up" is the first 200 from /health, "first reply" the end of a
16-token chat completion sent as soon as it is up, "compiled" the first /health that reports
`"decode": "compiled"`. Times are from process start. The cold rows use a new TORCHINDUCTOR_CACHE_DIR;
the warm rows reuse it.

    .venv/bin/python -m bench.startup
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import httpx

from bench.serve import free_port, random_folder


def start_up(folder: str, cache: str, flags: list[str], limit: float = 1200) -> dict:
    port, t0 = free_port(), time.monotonic()
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    proc = subprocess.Popen([sys.executable, "-m", "openk2.cli", "serve", folder, "--port", str(port), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    base, out = f"http://127.0.0.1:{port}", {}
    try:
        while "compiled" not in out:
            if proc.poll() is not None or time.monotonic() - t0 > limit:
                raise SystemExit(f"openk2 serve {' '.join(flags)} stopped or took over {limit} s")
            try:
                health = httpx.get(f"{base}/health").json()
            except httpx.HTTPError:
                time.sleep(0.1)
                continue
            out.setdefault("up", time.monotonic() - t0)
            if "first reply" not in out:
                body = {"model": "k2-small", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16,
                        "temperature": 0}
                httpx.post(f"{base}/v1/chat/completions", json=body, timeout=limit).raise_for_status()
                out["first reply"] = time.monotonic() - t0
            elif health.get("decode") == "compiled":
                out["compiled"] = time.monotonic() - t0
            else:
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        _, folder = random_folder(tmp, args.threads)
        rows = []
        for mode, flags in (("background (default)", []), ("--compile-first", ["--compile-first"])):
            cache = tempfile.mkdtemp(dir=tmp)
            for state in ("cold", "warm"):
                rows.append((mode, state, start_up(folder, cache, flags)))
        print("\n| compile | inductor cache | up s | first reply s | compiled s |")
        print("| --- | --- | ---: | ---: | ---: |")
        for mode, state, t in rows:
            print(f"| {mode} | {state} | {t['up']:.1f} | {t['first reply']:.1f} | {t['compiled']:.1f} |")
        print(f"\nload after: {open('/proc/loadavg').read().split()[0]}")


if __name__ == "__main__":
    main()
