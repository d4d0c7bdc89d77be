"""OpenAI-compatible HTTP server (`openk2 serve`): `create_app` builds the FastAPI app, `serve` runs it
with uvicorn. Needs the `server` extra; `import openk2` does not import this package."""

import os
import sys
import threading
from pathlib import Path

from openk2.sampling import API_TEMPERATURE, K2_TEMPERATURE

__all__ = ["create_app", "serve", "run", "make_engine", "add_parsers"]


def __getattr__(name):  # fastapi is imported only when the app is built
    if name == "create_app":
        from openk2.server.app import create_app
        return create_app
    raise AttributeError(f"module 'openk2.server' has no attribute {name!r}")


def _text_setup(model, tokenizer, path: str, reasoning_parser: str = "auto"):
    """(tokenizer, chat template, its variables, reasoning on): the folder's, or byte-level text and K2's
    template; which reasoning parser is in use is logged."""
    from openk2.server.chat_format import ChatFormat

    fmt = ChatFormat.for_model(model, tokenizer, path, reasoning_parser)
    why = f"auto: the chat template {'writes' if fmt.reasoning else 'has no'} <think>" \
        if reasoning_parser == "auto" else f"--reasoning-parser {reasoning_parser}"
    print(f"[openk2] reasoning parser: {'kimi_k2' if fmt.reasoning else 'none'} ({why})", file=sys.stderr, flush=True)
    return fmt.tokenizer, fmt.template, fmt.template_vars, fmt.reasoning


def make_engine(model, quantize: str | None = None, wait: bool = False, **config):
    """The Engine for `openk2 serve` / `chat` / `agent`, of `EngineConfig(**config)` (the agent may not
    import the engine, so it names the fields): quantized first if asked, decode steps compiled if
    `compile` and the step can read the weights (all of openk2's formats). The compiler runs on a thread
    while requests are answered with eager steps (slower, but nobody waits on a silent server: a
    minute or more on a small CPU with an empty inductor cache); `wait` compiles first instead, for
    full speed from the first request.
    Progress goes to stderr."""
    from openk2.engine import Engine, EngineConfig

    if quantize:
        from openk2.quant import quantize_model
        quantize_model(model, quantize)
    engine = Engine(model, EngineConfig(**config))
    if engine.compiled is not None:
        def say(message):
            print(f"[openk2] {message}", file=sys.stderr, flush=True)
        say("compiling the decode step" + ("" if wait else "; requests are answered with eager steps until it is "
                                           "ready") + " (a minute or more on a small CPU the first time; cached after)")
        engine.warmup(background=not wait, progress=say)
    return engine


def serve(model, tokenizer, path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          quantize: str | None = None, compile: bool = True, temperature: float = API_TEMPERATURE,
          reasoning_parser: str = "auto", compile_first: bool = False) -> None:
    """Serve `model` under the name of its folder."""
    import uvicorn

    from openk2.server.app import create_app
    from openk2.server.protocol import APIError

    engine = make_engine(model, quantize, wait=compile_first, compile=compile)
    tokenizer, template, variables, reasoning = _text_setup(model, tokenizer, path, reasoning_parser)
    folder = Path(path)
    app = create_app(model, tokenizer, folder.name if folder.is_dir() else path, api_key=api_key, engine=engine,
                     chat_template=template, template_vars=variables, engine_thread=False,
                     default_temperature=temperature, reasoning=reasoning)
    # HTTP on a thread, the engine on this one: every torch call stays on the thread that loaded and
    # compiled the model (see EngineLoop.run_here)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port))
    http = threading.Thread(target=server.run, name="openk2-http", daemon=True)
    http.start()
    try:
        app.state.engine_loop.run_here(keep_going=http.is_alive)
    except KeyboardInterrupt:  # Ctrl-C: answer whoever waits, then let uvicorn close; twice: at once
        app.state.engine_loop.abort_all(APIError(503, "the server is shutting down", "server_error"))
        server.should_exit = True
        try:
            http.join()
        except KeyboardInterrupt:
            server.force_exit = True
    http.join(timeout=10)
    leave(engine, None if server.started else f"openk2 serve: could not serve on {host}:{port} (see uvicorn's "
                                                "error above)")


def leave(engine, error: str | None = None) -> None:
    """Return (or exit with `error`) — at once, skipping the interpreter's finalization, while the decode
    step still compiles on its thread: finalizing under a running compiler aborts the process
    ("terminate called without an active exception")."""
    if engine.decode_mode == "compiling":
        print(*[error] if error else [], file=sys.stderr)
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1 if error else 0)
    if error:
        raise SystemExit(error)


def run(args, model, tokenizer) -> None:
    """`openk2 serve PATH` and `openk2 chat PATH`."""
    if args.cmd == "serve":
        return serve(model, tokenizer, args.path, args.host, args.port, args.api_key, args.quantize, args.compile,
                     args.temperature, args.reasoning_parser, args.compile_first)
    from openk2.server.terminal import chat
    engine = make_engine(model, args.quantize, cache_tokens=model.cfg.max_position_embeddings, compile=args.compile)
    try:
        tokenizer, template, variables, reasoning = _text_setup(model, tokenizer, args.path, args.reasoning_parser)
        chat(model, tokenizer, template, variables, temperature=args.temperature, engine=engine, reasoning=reasoning)
    except KeyboardInterrupt:  # Ctrl-C leaves the chat, as /exit does
        print()
    leave(engine)


EXPERT_CACHE_HELP = "keep the routed experts on disk, read into a cache of GB in memory (models bigger than RAM)"


def add_parsers(sub, load) -> None:
    """The `serve` and `chat` subcommands of `openk2`; `load(path, expert_cache_gb)` -> (model, tokenizer)."""
    import argparse

    for name in ("serve", "chat"):
        s = sub.add_parser(name, help="OpenAI-compatible server" if name == "serve" else "chat in the terminal")
        s.add_argument("path", help="Hugging Face folder, or a preset / config.json for random weights")
        if name == "serve":
            s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
            s.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
            s.add_argument("--api-key", help="require `Authorization: Bearer KEY`")
        s.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights at load time")
        s.add_argument("--expert-cache", type=float, metavar="GB", help=EXPERT_CACHE_HELP)
        s.add_argument("--temperature", type=float, default=API_TEMPERATURE if name == "serve" else K2_TEMPERATURE,
                       help=f"for requests that give none (OpenAI's default, {API_TEMPERATURE})" if name == "serve"
                       else f"sampling temperature (K2's recommended {K2_TEMPERATURE})")
        s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                       help="compiled decode steps (compiled in the background: eager steps until then)")
        if name == "serve":
            s.add_argument("--compile-first", action="store_true",
                           help="compile before listening: full speed from the first request, none answered before")
        s.add_argument("--reasoning-parser", choices=["auto", "kimi_k2", "none"], default="auto",
                       help="split K2-Thinking's <think>…</think> into reasoning_content (auto: when the "
                            "checkpoint's chat template writes <think>)")
        s.set_defaults(fn=lambda args: run(args, *load(args.path, args.expert_cache)))
