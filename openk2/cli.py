"""`openk2` command line: thin dispatch onto the library."""

import argparse
import codecs
import os
import sys
import time
from pathlib import Path

from openk2.sampling import CHAT_TOP_P, GREEDY, K2_TEMPERATURE, MAX_TOKENS, TOP_K_OFF, TOP_P_OFF

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _load(spec: str, dtype_name: str | None, seed: int, expert_cache: float | None = None):
    """A model from a HF folder, or a randomly initialised one from a preset / config.json; with
    `expert_cache` (GB), the folder's routed experts stay on disk behind a cache of that size."""
    import torch

    from openk2.checkpoint.hf import load_dtype, load_hf
    from openk2.config import resolve_config
    from openk2.info import check_memory
    from openk2.model import build_model

    dtype = getattr(torch, DTYPES[dtype_name]) if dtype_name else None
    path, cfg = Path(spec), resolve_config(spec)
    if path.is_dir():  # weights, never random ones in their place
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"{path} holds no *.safetensors weights; for random ones, name a preset or a config.json")
        if expert_cache is not None:  # checks the memory it needs itself
            from openk2.offload import load_offloaded
            return load_offloaded(path, int(expert_cache * 1e9), dtype)
        check_memory(cfg, load_dtype(cfg, dtype))
        return load_hf(path, dtype=dtype)
    if expert_cache is not None:
        raise ValueError("--expert-cache reads the experts from a checkpoint folder; a preset has none")
    check_memory(cfg, dtype or torch.float32)
    print(f"[openk2] {spec}: no weights, randomly initialised (seed {seed})", file=sys.stderr)
    return build_model(cfg, dtype=dtype or torch.float32, seed=seed)


def _tokenizer(path: str):
    """The folder's K2-format tokenizer, or None (then text is byte-level: UTF-8 bytes are ids 0..255)."""
    from openk2.tokenizer import Tokenizer
    return Tokenizer.from_dir(path) if (Path(path) / "tiktoken.model").is_file() else None


def _prompt_ids(args, vocab_size: int, tok) -> list[int]:
    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise SystemExit(f"--prompt-ids must be integers separated by commas or spaces: {args.prompt_ids!r}")
        if not ids:
            raise SystemExit("--prompt-ids is empty")
        if bad := [i for i in ids if not 0 <= i < vocab_size]:
            raise SystemExit(f"--prompt-ids {bad} outside the vocabulary [0, {vocab_size})")
        return ids
    if not args.prompt:
        raise SystemExit("--prompt is empty")
    if tok is not None:
        return tok.encode(args.prompt)
    if vocab_size < 256:
        raise SystemExit("--prompt needs a tokenizer or a vocabulary of at least 256 byte ids; use --prompt-ids")
    return list(args.prompt.encode("utf-8"))


def cmd_info(args):
    from openk2.config import resolve_config
    from openk2.info import offload_report, report
    print(*(report(resolve_config(spec), spec) + ("" if args.expert_cache is None else "\n" + offload_report(
        resolve_config(spec), args.expert_cache, spec)) for spec in args.config), sep="\n")


def cmd_generate(args):
    import torch

    from openk2.engine import SamplingParams, generate_stream

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = _load(args.path, args.dtype, args.seed, args.expert_cache).eval()
    if args.quantize:  # with --expert-cache, the cache holds the experts quantized
        from openk2.quant import quantize_model
        quantize_model(model, args.quantize)
    tokenizer = _tokenizer(args.path)
    ids = _prompt_ids(args, model.cfg.vocab_size, tokenizer)
    as_bytes = tokenizer.decode_bytes if tokenizer else (lambda t: bytes(t) if t[0] < 256 else f"<{t[0]}>".encode())
    eos = model.cfg.eos_token_id
    stops = tuple(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop_token_ids=stops)
    out, stamps = [], [time.perf_counter()]
    text = codecs.getincrementaldecoder("utf-8")("replace")  # multi-byte characters span tokens
    for tok in generate_stream(model, torch.tensor([ids]), params, compile=args.compile):
        out.append(int(tok[0]))
        stamps.append(time.perf_counter())
        if args.prompt_ids is None:
            print(text.decode(as_bytes([out[-1]])), end="", flush=True)
    print(" ".join(map(str, out)) if args.prompt_ids is not None else "")
    firsts = ", ".join(f"{b - a:.2f}s" for a, b in zip(stamps, stamps[1:3]))  # the prompt; a compile
    rate = f", then {(len(out) - 2) / (stamps[-1] - stamps[2]):.1f} tok/s" if len(out) > 2 else ""
    print(f"[openk2] {len(ids)} prompt + {len(out)} generated tokens in {stamps[-1] - stamps[0]:.2f}s "
          f"(first tokens {firsts}{rate})", file=sys.stderr)
    if (cache := getattr(model, "expert_cache", None)) is not None:
        print(f"[openk2] {cache.summary()}", file=sys.stderr)


PROMPTS = ["def ", "import ", "class ", "    def __init__(self", "for i in range(", "    return "]


def cmd_train(args):
    """The main job: pretrain, then the plots, the validation loss and completions of code prompts."""
    import torch

    from openk2.checkpoint import load_hf
    from openk2.engine import SamplingParams, generate
    from openk2.tokenizer import Tokenizer
    from openk2.train import latest_checkpoint, parse_args, train
    from openk2.train.plot import plot_run

    cfg = parse_args(args.rest)
    metrics = train(cfg)
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"\nvalidation loss {metrics.get('val_loss', float('nan')):.3f} nats/token after "
          f"{metrics.get('step', cfg.steps)} steps; plots: {', '.join(str(p) for p in plot_run(cfg.out_dir))}")
    ckpt = latest_checkpoint(Path(cfg.out_dir))
    model, tok = load_hf(ckpt, dtype=torch.float32, progress=False).eval(), Tokenizer.from_dir(ckpt)
    for prompt in PROMPTS:
        ids, stop = torch.tensor([tok.encode(prompt)]), (tok.eos_id,)
        for name, params in (("greedy", SamplingParams(max_tokens=48, stop_token_ids=stop)),
                             ("sampled", SamplingParams(max_tokens=48, temperature=K2_TEMPERATURE,
                                                        top_p=CHAT_TOP_P, seed=0, stop_token_ids=stop))):
            out = [i for i in generate(model, ids, params)[0].tolist() if i < tok.n_base]  # text ids only
            print(f"--- {name}: {prompt!r}\n{prompt}{tok.decode(out)}")


def cmd_sft(args):  # fine-tune on chat JSONL, then the masked validation loss and the plots
    from openk2.train.plot import plot_run
    from openk2.train.sft import parse_sft_args, sft
    cfg = parse_sft_args(args.rest)
    if (metrics := sft(cfg)) and os.environ.get("RANK", "0") == "0":
        print(f"\nvalidation loss {metrics.get('val_loss', float('nan')):.3f} nats per assistant token after "
              f"{metrics.get('step', cfg.steps)} steps; plots: {', '.join(str(p) for p in plot_run(cfg.out_dir))}")


def cmd_pipeline(args):  # the whole recipe: pretrain → agentic data → SFT → RL, each stage evaluated
    from openk2.pipeline import main as pipeline_main
    pipeline_main(args.rest)


def cmd_rl(args):  # RL on the tool worlds, then held-out success before and after, and the plots
    from openk2.rl.loop import rl_command
    rl_command(args.rest)


def cmd_plot(args):
    from openk2.train.plot import plot_run
    print(*plot_run(args.run_dir), sep="\n")


def cmd_convert(args):
    from openk2.checkpoint import convert
    print(convert(args.src, args.dst, args.quantize))


def _positive(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return int(text)


def main(argv=None):
    from openk2.server import EXPERT_CACHE_HELP  # light: the server package imports its app lazily
    p = argparse.ArgumentParser(prog="openk2", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("info", help="parameters, active parameters, KV cache and FLOPs of a config")
    s.add_argument("config", nargs="+", help="preset name, config.json or Hugging Face folder")
    s.add_argument("--expert-cache", type=float, metavar="GB", help="also the memory split with the routed "
                   "experts on disk behind a cache of GB (and what fits in 64-512 GB of RAM)")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("generate", help="generate from a HF folder (or a random preset)")
    s.add_argument("path", help="Hugging Face folder, or a preset / config.json for random weights")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt-ids", help="comma- or space-separated token ids")
    g.add_argument("--prompt", help="text (byte-level ids until the folder ships a tokenizer)")
    s.add_argument("--max-tokens", type=_positive, default=MAX_TOKENS)
    s.add_argument("--temperature", type=float, default=GREEDY, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=TOP_P_OFF)
    s.add_argument("--top-k", type=int, default=TOP_K_OFF)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's")
    s.add_argument("--threads", type=_positive, default=0, help="CPU threads (default: torch's)")
    s.add_argument("--compile", action="store_true", help="compiled decode steps (compiling takes 10-60 s)")
    s.add_argument("--expert-cache", type=float, metavar="GB", help=EXPERT_CACHE_HELP)
    s.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights at load time")
    s.set_defaults(fn=cmd_generate)
    raw = {"train": (cmd_train, "pretrain a K2 with MuonClip (`openk2 train --help`)"),  # flags: TrainConfig's
           "sft": (cmd_sft, "fine-tune a checkpoint on chat JSONL (`openk2 sft CHECKPOINT --data F.jsonl`)"),
           "pipeline": (cmd_pipeline, "the whole K2 recipe: pretrain, agentic SFT data, SFT, RL, evaluated after each"),
           "rl": (cmd_rl, "RL on the tool worlds: K samples per task, K2's objective (`openk2 rl CHECKPOINT`)")}
    for name, (fn, text) in raw.items():
        sub.add_parser(name, help=text, add_help=False).add_argument("rest", nargs=argparse.REMAINDER)
    s = sub.add_parser("plot", help="PNGs of a training run's metrics (loss, max logit, expert load)")
    s.add_argument("run_dir")
    s.set_defaults(fn=cmd_plot)
    s = sub.add_parser("convert", help="rewrite a HF folder as int4 (K2-Thinking), fp8 (K2-Instruct), bf16 or fp32")
    s.add_argument("src", help="Hugging Face folder, or a sharded training checkpoint (--checkpoint-format dcp)")
    s.add_argument("dst", help="output folder (the source's tokenizer files are copied)")
    s.add_argument("--quantize", required=True, help="int4, fp8, bf16 or fp32 (int8 is applied at load time)")
    s.set_defaults(fn=cmd_convert)
    from openk2.agent.cli import add_parsers as agent_parsers  # `agent` and `mcp-server`
    from openk2.envs import add_parsers as envs_parsers  # `envs`
    from openk2.server import add_parsers as server_parsers  # `serve` and `chat`
    for add in (server_parsers, agent_parsers, envs_parsers):
        add(sub, load=lambda path, cache=None: (_load(path, None, 0, cache), _tokenizer(path)))
    argv = sys.argv[1:] if argv is None else list(argv)
    cmd = argv[0] if argv and argv[0] in raw else None
    args = argparse.Namespace(cmd=cmd, rest=argv[1:], fn=raw[cmd][0]) if cmd else p.parse_args(argv)
    try:
        args.fn(args)
    except ImportError as e:
        raise SystemExit(f"openk2 {args.cmd}: {e.name} is missing: .venv/bin/pip install -e '.[server,agent]'")
    except (ValueError, KeyError, OSError, RuntimeError) as e:  # bad input, files, safetensors
        raise SystemExit(f"openk2 {args.cmd}: error: {e}")


if __name__ == "__main__":
    main()
