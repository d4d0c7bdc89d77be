"""Supervised fine-tuning, `openk2 sft CHECKPOINT --data FILE.jsonl`: the pretraining loop (`loop.train`:
MuonClip with QK-Clip, WSD, expert balancing, metrics, exact resume, HF checkpoints) fed with chat
conversations instead of a corpus. Each conversation (OpenAI messages, tools optional) is rendered with
the checkpoint's chat template, or the built-in K2 one if it ships none, the loss taken only on
assistant tokens (`tokenizer/sft.py`); conversations are packed several per row, attention kept inside
each (`data/packing.py`). The run starts from the checkpoint's weights and saves its template with
every checkpoint, so a fine-tuned folder chats as it was trained.

Notes: the chat format's special tokens (`<|im_end|>`, `<|tool_call_begin|>`, …) are rows of the
embedding and lm_head like any other, trained by AdamW whether or not pretraining ever saw them;
`sft_data` checks that every id has a row. Loss is a mean over the loss tokens of each micro-batch.
"""

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from openk2.checkpoint import load_hf
from openk2.config import ModelConfig
from openk2.data.packing import PackedSFTLoader, fit_examples, sft_val_batches
from openk2.tokenizer import Tokenizer, load_chat_template
from openk2.tokenizer.chat import template_variables
from openk2.tokenizer.sft import AVOID_MARK, encode_with_mask, read_jsonl
from openk2.train.config import TrainConfig, add_config_flags
from openk2.train.loop import RunData, check_fits, train


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    checkpoint: str = ""  # the HF folder to fine-tune: weights, tokenizer, chat template
    long: str = "truncate"  # conversations over seq_len + 1 ids: truncate | drop (counted either way)
    context: int = 0  # fine-tune for a longer context (YaRN factor rescaled to it); 0: the checkpoint's
    avoid_refused: bool = False  # unlikelihood on the names of refused calls (weight-0 turns calling undeclared tools)

    TRAJECTORY = TrainConfig.TRAJECTORY + ("checkpoint", "long", "context", "avoid_refused")

    def __post_init__(self):
        super().__post_init__()
        if not self.checkpoint or not self.data:
            raise ValueError("SFT needs a checkpoint folder and --data FILE.jsonl")
        if self.long not in ("truncate", "drop"):
            raise ValueError(f"long must be truncate or drop, not {self.long!r}")

    def model_config(self):
        if not (Path(self.checkpoint) / "config.json").is_file():
            raise ValueError(f"{self.checkpoint}: not a Hugging Face model folder (no config.json)")
        cfg = ModelConfig.from_json(Path(self.checkpoint))
        if self.context:
            cfg = with_context(cfg, self.context)
        if self.seq_len > cfg.max_position_embeddings:
            raise ValueError(f"seq_len {self.seq_len} is longer than the model's context "
                             f"({cfg.max_position_embeddings}); give --context {self.seq_len} to extend it")
        return cfg


def with_context(cfg: ModelConfig, context: int) -> ModelConfig:
    """`cfg` for a `context`-token window: YaRN's factor becomes context / the original window (the
    frequencies and the softmax scale follow from it, as in K2's 4K -> 128K), for fine-tuning to adapt."""
    rs = cfg.rope_scaling
    if cfg.rope_type != "yarn":
        raise ValueError(f"--context needs a YaRN rope_scaling in config.json, not {rs!r}")
    factor = context / rs["original_max_position_embeddings"]
    if factor < 1:
        raise ValueError(f"--context {context} is shorter than the original window "
                         f"({rs['original_max_position_embeddings']})")
    return dataclasses.replace(cfg, max_position_embeddings=context, rope_scaling={**rs, "factor": factor})


# fine-tuning defaults: a lower peak than pretraining, short warmup, the usual WSD tail
SFT_DEFAULTS = dict(out_dir="runs/sft", seq_len=512, batch_size=8, steps=200, lr=1e-3, warmup_steps=10,
                    decay_frac=0.3, val_fraction=0.02, eval_every=50, log_every=5, ckpt_every=100)


def chat_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    """The checkpoint's tokenizer, or byte-level text (ids 0..255, specials from 256) if it ships none."""
    if (folder / "tiktoken.model").is_file():
        return Tokenizer.from_dir(folder)
    return Tokenizer.byte_level(vocab_size, str(folder))


def encode_file(path, tok: Tokenizer, template: str | None, variables: dict, show: bool, avoid_refused: bool = False):
    """(ids, mask) of every conversation of the JSONL file; errors name the line. Reasoning the template
    does not write (the built-in K2 template has none) cannot be trained: such lines are counted, said.
    `avoid_refused`: see `tokenizer/sft.py`."""
    out, unwritten = [], 0
    for n, messages, tools in tqdm(read_jsonl(path), desc="render", unit="conv", disable=not show, leave=False):
        try:
            out.append(encode_with_mask(tok, messages, tools, template, avoid_refused, **variables))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: {e}") from None
        thoughts = [m["reasoning_content"] for m in messages if m["role"] == "assistant" and m.get("reasoning_content")]
        unwritten += bool(thoughts) and not all(tok.encode(t) and tok.decode(out[-1][0]).count(t) for t in thoughts)
    if unwritten and show:
        print(f"[openk2] sft data: {unwritten} conversation(s) carry reasoning_content the chat template does not "
              "write; that reasoning is not trained", file=sys.stderr, flush=True)
    return out


def sft_data(cfg: SFTConfig, rank: int, world: int) -> RunData:
    folder = Path(cfg.checkpoint)
    model_cfg = cfg.model_config()
    check_fits(model_cfg, cfg)
    tok = chat_tokenizer(folder, model_cfg.vocab_size)
    if tok.n_vocab > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.n_vocab} ids, the model {model_cfg.vocab_size} embedding rows")
    template = load_chat_template(folder)
    examples = encode_file(cfg.data, tok, template, template_variables(folder) if template else {}, rank == 0,
                           cfg.avoid_refused)
    if len(examples) < 2:
        raise ValueError(f"{cfg.data}: {len(examples)} conversation(s) cannot give both a training and a "
                         "validation split")
    order = np.random.default_rng(cfg.seed).permutation(len(examples))
    n_val = max(1, round(len(examples) * cfg.val_fraction))
    train_ex, counts = fit_examples([examples[i] for i in order[n_val:]], cfg.seq_len, cfg.long)
    val_ex, _ = fit_examples([(ids, [int(m == 1) for m in mask]) for ids, mask in  # val loss: cross entropy only
                              (examples[i] for i in sorted(order[:n_val]))], cfg.seq_len, cfg.long)
    if not train_ex or not val_ex:
        raise ValueError(f"no conversation left for {'training' if not train_ex else 'validation'} after "
                         f"fitting to seq_len {cfg.seq_len} ({counts}); raise --seq-len or add data")
    loader = PackedSFTLoader(train_ex, cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=rank, world_size=world)
    val = sft_val_batches(val_ex, cfg.batch_size, cfg.seq_len, cfg.eval_batches, rank=rank, world_size=world)
    loss_tokens = sum(m[1:].count(1) for _, m in train_ex)
    summary = {"conversations": len(examples), "train": len(train_ex), "val": len(val_ex), **counts,
               "loss_tokens": loss_tokens, "pack_fill": round(loader.fill(), 4)}
    if cfg.avoid_refused:
        summary["avoided_tokens"] = sum(m[1:].count(AVOID_MARK) for _, m in train_ex)
    if rank == 0:
        print(f"[openk2] sft data: {summary}", file=sys.stderr, flush=True)
    return RunData(tok, model_cfg, loader, val,
                   lambda device: load_hf(folder, dtype=torch.float32, device=device, progress=False,
                                          config=model_cfg),
                   {"train_tokens": sum(len(ids) - 1 for ids, _ in train_ex), "sft": summary},
                   {"chat_template.jinja": template} if template else {})


def sft(cfg: SFTConfig, stop_at: int | None = None) -> dict:
    """Run (or resume, `cfg.resume`) SFT; returns the last step's metrics."""
    return train(cfg, stop_at, data_fn=sft_data)


def parse_sft_args(argv=None, prog: str = "openk2 sft") -> SFTConfig:
    """`CHECKPOINT --data FILE.jsonl` then one `--field value` per SFTConfig field."""
    import argparse
    p = argparse.ArgumentParser(prog=prog, description="Fine-tune a K2 checkpoint on chat / tool-use "
                                "conversations (OpenAI messages JSONL), loss on assistant tokens only.")
    p.add_argument("checkpoint", help="Hugging Face folder (its tokenizer and chat template are used)")
    add_config_flags(p, SFTConfig, skip=("checkpoint", "model", "tokenizer", "data"), defaults=SFT_DEFAULTS)
    p.add_argument("--data", required=True, help="conversations: OpenAI messages JSONL, one {\"messages\", "
                   "\"tools\"} object a line (tools optional)")
    args = vars(p.parse_args(argv))
    given = {k: v for k, v in args.items() if v is not None}
    try:
        return SFTConfig(**{**SFT_DEFAULTS, **given, "model": args["checkpoint"]})
    except ValueError as e:
        p.error(str(e))
