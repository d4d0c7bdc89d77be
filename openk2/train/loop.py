"""Pretraining: `train(cfg)` reads top to bottom as the recipe, calling small builders.

One code path for 1 or N processes (`torchrun --nproc_per_node N -m openk2.train`): DDP wraps the
model when the world is larger than one, the loader gives each rank its block of the global batch,
QK-Clip and bias balancing act on statistics max- and sum-reduced over ranks, so every rank applies
the same update; `--ep N` shards the experts over groups of N processes and `--fsdp` the dense weights
over all (`openk2.parallel.training`).
Per step: WSD learning rate, micro-batches under bf16 autocast, gradient clipping, MuonClip
(Muon/AdamW step, then QK-Clip from the step's recorded max logits), aux-loss-free balancing of
`e_score_correction_bias` (DeepSeek-V3: γ·sign(mean load − load)). Checkpoints hold the model as a
Hugging Face folder (fp32, so resume is exact) plus optimizer, loader, RNG and step in
`train_state.pt`, or (`--checkpoint-format dcp`, the default with `--fsdp`) the weights and optimizer
state in each rank's DCP shards beside the rest (`openk2.checkpoint.sharded`); metrics go to
`metrics.jsonl`. What a run trains on is a `RunData`: a corpus
(`pretrain_data`, here) or chat conversations with a loss mask, packed (`sft.py`: `sft_data`), whose
batches carry segment ids and targets of -100 where no loss is taken.
"""

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from openk2 import kernels
from openk2.checkpoint import latest_checkpoint, load_hf, restore, save_train_state, sharded
from openk2.data import PackedLoader, load_documents, split_documents, tokenize_to_cache, val_batches
from openk2.info import breakdown, require_memory, train_flops_per_token
from openk2.model import build_model
from openk2.optim import Muon, apply_qk_clip, muon_param_groups, reduce_max_logits, wsd_lr
from openk2.parallel.training import ParallelTraining
from openk2.tokenizer import Tokenizer
from openk2.train.budget import StepBudget
from openk2.train.config import TrainConfig
from openk2.train.runlog import final_metrics, git_revision, open_log


@dataclass
class RunData:
    """What a run trains on. loader: `next_batch()` -> (x, y) or (x, y, segment_ids) [B, T], plus
    `state_dict`/`load_state_dict`; val: a fixed list of such batches; init_model(device): the starting
    weights of a fresh run; header: extra fields of the log's start row; files: {name: text} written
    into every checkpoint folder (an SFT run keeps its chat template)."""
    tok: Tokenizer
    model_cfg: object
    loader: object
    val: list
    init_model: Callable
    header: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)


def token_weights(targets: list[torch.Tensor], world: int) -> list[float]:
    """Each micro-batch's share of the step's loss tokens over all ranks (SFT rows differ; pretraining:
    1/grad_accum each): mean losses times these make the step's mean over tokens, however split."""
    counts = torch.stack([(y != -100).sum() for y in targets]).double()
    total = counts.sum()
    if world > 1:
        dist.all_reduce(total)
    return (counts * world / total.clamp(min=1)).tolist()


def _dist() -> tuple[int, int]:
    """(rank, world size); initialises torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():  # CUDA tensors over NCCL; the CPU ones (metrics, norms) over gloo
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _barrier(world: int):
    if world > 1:
        dist.barrier()


def build_tokenizer(cfg: TrainConfig, docs, vocab_size: int, rank: int, world: int) -> Tokenizer:
    """The given tokenizer folder, or one trained on the corpus (rank 0) and cached in the run."""
    if cfg.tokenizer:
        return Tokenizer.from_dir(cfg.tokenizer)
    folder = Path(cfg.out_dir) / "tokenizer"
    if rank == 0 and not (folder / "tiktoken.model").exists():
        Tokenizer.train((d.text for d in docs), vocab_size).save(folder)
    _barrier(world)
    return Tokenizer.from_dir(folder)


def build_data(cfg: TrainConfig, tok: Tokenizer, train_docs, val_docs, rank: int, world: int):
    data_dir = Path(cfg.out_dir) / "data"
    if rank == 0:  # tokenise once; other ranks wait and map the same files
        tokenize_to_cache(train_docs, tok, data_dir / "train.bin")
        tokenize_to_cache(val_docs, tok, data_dir / "val.bin")
    _barrier(world)
    train_ids = tokenize_to_cache(train_docs, tok, data_dir / "train.bin")
    val_ids = tokenize_to_cache(val_docs, tok, data_dir / "val.bin")
    loader = PackedLoader(train_ids, cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=rank, world_size=world)
    val = val_batches(val_ids, cfg.batch_size, cfg.seq_len, cfg.eval_batches, rank=rank, world_size=world)
    return loader, val, len(train_ids)


def build_optimizer(cfg: TrainConfig, model, ep=None):
    groups = ep.param_groups(model) if ep else muon_param_groups(model)
    if cfg.optimizer == "adamw":  # the baseline: every tensor in the AdamW group
        groups = [{"params": [p for g in groups for p in g["params"]], "algo": "adamw"}]
    return Muon(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """WSD over the run: the last step (cfg.steps - 1) lands on lr · final_lr_frac."""
    stable = cfg.steps - 1 - cfg.warmup_steps - cfg.decay_steps
    return wsd_lr(step, peak=cfg.lr, warmup=cfg.warmup_steps, stable=stable, decay=cfg.decay_steps,
                  final=cfg.lr * cfg.final_lr_frac)


@torch.no_grad()
def balance_experts(model, loads: dict[int, torch.Tensor], speed: float, world: int) -> dict[int, torch.Tensor]:
    """Aux-loss-free balancing: raise the bias of under-loaded experts by γ, lower the over-loaded.
    Returns each MoE layer's load / mean load [E], summed over ranks."""
    relative = {}
    for i, load in loads.items():
        load = load.float()
        if world > 1:
            dist.all_reduce(load)
        if speed:
            model.layers[i].mlp.gate.e_score_correction_bias.add_(speed * torch.sign(load.mean() - load))
        relative[i] = load / load.mean().clamp(min=1e-9)
    return relative


def target_loss(model, x, y, seg: list) -> torch.Tensor:
    """Mean next-token loss of `model` (or DDP) on x, seg [segment_ids] or []: the vocabulary projection
    and its softmax fused, only where y has a target (`forward(targets=)`, the numbers of `lm_loss`)."""
    return model(x, segment_ids=seg[0] if seg else None, targets=y)


@torch.no_grad()
def evaluate(model, batches, autocast, world: int) -> float:
    model.eval()
    total = torch.zeros(2)
    device = model.lm_head.weight.device
    for x, y, *seg in batches:
        x, y, seg = x.to(device), y.to(device), [s.to(device) for s in seg]
        n = (y != -100).sum().item()
        with autocast():
            total += torch.tensor([target_loss(model, x, y, seg).item() * n, n])
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def save_checkpoint(folder: Path, model, opt, loader, tok: Tokenizer, step: int, cfg, files=None, ep=None,
                    budget: StepBudget | None = None):
    """Collective: a HF folder written by rank 0 (with --ep, every rank's experts and their optimizer
    state gathered there first), or, with checkpoint_format dcp, every rank's shards."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    if cfg.sharded_checkpoints:
        sharded.save(folder, model, opt, ep.view if ep else sharded.whole)
        opt_state = None
    else:
        model, opt_state = (ep.whole(model), ep.whole_optimizer_state(opt)) if ep else (model, opt.state_dict())
    if rank != 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():  # before train_state.pt, which marks the folder complete
        (folder / name).write_text(text, "utf-8")
    state = {"step": step, "optimizer": opt_state, "loader": loader.state_dict(),
             "world": dist.get_world_size() if dist.is_initialized() else 1,
             "rng": torch.get_rng_state(), "config": dataclasses.asdict(cfg), "git": git_revision(),
             "torch": torch.__version__, **({"budget": budget.state()} if budget else {})}
    save_train_state(folder, model, tok, state, weights=not cfg.sharded_checkpoints)


def check_fits(model_cfg, cfg: TrainConfig):
    """A clear error, before any work, for a run this machine's memory cannot hold.

    Estimate: fp32 weights, gradients and two optimizer moments (16 B per parameter) plus
    activations kept for backward (~40 values of width D per token and layer, fp32) and logits."""
    tokens = cfg.batch_size * cfg.seq_len
    need = (16 * breakdown(model_cfg).total + 4 * tokens * (40 * model_cfg.hidden_size
            * model_cfg.num_hidden_layers + 3 * model_cfg.vocab_size))
    require_memory(need, f"this run (model {cfg.model}, batch {cfg.batch_size} × {cfg.seq_len})",
                   ": use a smaller model or batch")


def pretrain_data(cfg: TrainConfig, rank: int, world: int) -> RunData:
    """A corpus: documents -> a tokenizer (given or trained) -> packed windows; a random model."""
    model_cfg = cfg.model_config()
    check_fits(model_cfg, cfg)
    docs = load_documents(cfg.data)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed)
    if not train_docs or not val_docs:
        raise ValueError(f"corpus too short: {len(docs)} document(s) cannot give both a training and a "
                         f"validation split")
    tok = build_tokenizer(cfg, train_docs, model_cfg.vocab_size, rank, world)
    if tok.n_vocab > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.n_vocab} ids, the model {model_cfg.vocab_size} embedding rows")
    model_cfg = dataclasses.replace(model_cfg, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    loader, val, n_train = build_data(cfg, tok, train_docs, val_docs, rank, world)
    return RunData(tok, model_cfg, loader, val, lambda device: build_model(model_cfg, device=device, seed=cfg.seed),
                   {"train_tokens": n_train})


def train(cfg: TrainConfig, stop_at: int | None = None, data_fn: Callable = pretrain_data) -> dict:
    """Run (or resume) a training run on `data_fn(cfg, rank, world)` (pretraining by default); returns
    the last step's metrics. `stop_at`: leave after that step as if interrupted (the schedule still
    spans `cfg.steps`)."""
    rank, world = _dist()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = data_fn(cfg, rank, world)
    tok, model_cfg, loader = data.tok, data.model_cfg, data.loader

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    note = (lambda text: print(f"[openk2] {text}", file=sys.stderr, flush=True)) if rank == 0 else (lambda text: None)
    ckpt = latest_checkpoint(out, note) if cfg.resume else None
    if cfg.resume and not ckpt:
        note(f"--resume: no complete checkpoint in {out / 'checkpoints'}; starting from step 0 (a new log)")
    if ckpt:
        state = torch.load(ckpt / "train_state.pt", weights_only=False)
        saved = state["config"]  # with --minutes, its steps are the plan, and --steps is the budget's bound
        bound = {**saved, "steps": state["budget"]["most"]} if "budget" in state else saved
        _check_same_trajectory(cfg, bound, ckpt, state.get("world", world), world)
        cfg = dataclasses.replace(cfg, steps=saved["steps"])
    # a sharded checkpoint is read after the experts are sharded: each rank reads its part only
    shards = ckpt and sharded.is_sharded(ckpt)
    if cfg.fsdp and world == 1:
        raise ValueError("--fsdp shards the weights over processes: launch it with torchrun, or drop it for one")
    if ckpt and cfg.fsdp and not shards:
        raise ValueError(f"--fsdp resumes from sharded checkpoints; {ckpt} is a Hugging Face folder (resume it "
                         f"without --fsdp)")
    model = load_hf(ckpt, dtype=torch.float32, device=device, progress=False) if ckpt and not shards \
        else data.init_model(device)
    model.train()
    ep = ParallelTraining(model, cfg.ep, world, torch.device(device).type, cfg.fsdp) \
        if cfg.ep > 1 or cfg.fsdp else None
    opt = build_optimizer(cfg, model, ep)
    kernels.load_for(device)  # the CPU's kernels (training's attention among them), whatever the optimizer
    if shards:
        sharded.load(ckpt, model, opt, ep.view if ep else sharded.whole)
    elif ep and ckpt:  # the checkpoint holds the whole optimizer state: this rank's slice of it
        state["optimizer"] = ep.local_optimizer_state(state["optimizer"], opt)
    step = restore(state if ckpt else None, opt, loader)
    budget = StepBudget(cfg, step, state.get("budget") if ckpt else None) if cfg.minutes else None
    if step >= cfg.steps:
        note(f"the run in {out} is complete ({step} of {cfg.steps} steps); nothing to resume")
        return final_metrics(out)
    ddp = (ep.wrap(model) if ep else torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)) \
        if world > 1 else model
    autocast = (lambda: torch.autocast(model.lm_head.weight.device.type, dtype=torch.bfloat16)) \
        if cfg.autocast == "bfloat16" else nullcontext
    model.record_max_logits(True)  # a metric always; QK-Clip acts on it when qk_clip_tau > 0
    model.record_aux_loss(cfg.seq_aux_weight > 0)

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    flops_per_step = train_flops_per_token(model_cfg, cfg.seq_len) * tokens_per_step
    log = open_log(out / "metrics.jsonl", step) if rank == 0 else None
    if rank == 0:
        header = {"event": "start", "config": dataclasses.asdict(cfg), "model": model_cfg.to_hf_dict(),
                  "git": git_revision(), "torch": torch.__version__, "world_size": world, "ep": cfg.ep,
                  **data.header, "resumed_from": step}
        log.write(json.dumps(header) + "\n")
    bar = tqdm(total=cfg.steps, initial=step, disable=rank != 0, unit="step", dynamic_ncols=True)
    metrics = {}
    while step < min(cfg.steps, stop_at or cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum, max_logits, loads, loss_share = 0.0, None, {}, 0.0
        batches = [[t.to(device) for t in loader.next_batch()] for _ in range(cfg.grad_accum)]
        weights = token_weights([y for _, y, *_ in batches], world)
        for micro, ((x, y, *seg), weight) in enumerate(zip(batches, weights)):
            loss_share += (y != -100).float().mean().item() / cfg.grad_accum
            last = micro == cfg.grad_accum - 1
            with (ep.sync_next_backward(model, ddp, last) if ep else ddp.no_sync() if world > 1 and not last
                  else nullcontext()):
                with autocast():  # the balance loss, if on, is only optimised; lm is logged
                    lm = target_loss(ddp, x, y, seg)
                    loss = lm + cfg.seq_aux_weight * model.aux_loss() if cfg.seq_aux_weight else lm
                (loss * weight).backward()
            loss_sum += lm.item() * weight
            m = model.max_logits()
            max_logits = m if max_logits is None else torch.maximum(max_logits, m)
            for i, load in model.expert_load().items():
                loads[i] = loads.get(i, 0) + load
        grad_norm = ep.clip(model, cfg.grad_clip) if ep else torch.nn.utils.clip_grad_norm_(
            model.parameters(), cfg.grad_clip or float("inf"))
        t_opt = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        max_logits = reduce_max_logits(max_logits)
        clipped = apply_qk_clip(model, max_logits, cfg.qk_clip_tau) if cfg.qk_clip_tau > 0 else 0
        t_opt = time.perf_counter() - t_opt  # Muon/AdamW step + QK-Clip
        relative_load = balance_experts(model, loads, cfg.bias_update_speed, world)
        step += 1
        dt = time.perf_counter() - t0
        if world > 1:
            loss_sum = _mean_over_ranks(loss_sum)
        metrics = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm.item(),
                   "tok_per_s": tokens_per_step / dt, "mfu": flops_per_step / dt / (cfg.peak_tflops * 1e12),
                   "optimizer_share": t_opt / dt, "qk_clipped_heads": clipped, "loss_token_share": loss_share,
                   "expert_load_max_over_mean": {i: v.max().item() for i, v in relative_load.items()}}
        metrics["max_logit"] = max_logits.amax(-1).tolist()
        if budget and (steps := budget.replan(cfg, step, world)) is not None:
            cfg, bar.total, metrics["planned_steps"] = dataclasses.replace(cfg, steps=steps), steps, steps
        if budget and budget.fixed and not budget.told:
            note(f"--minutes {cfg.minutes:g}: {cfg.steps} steps fit (at most {budget.most})")
            budget.told = True
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics["val_loss"] = evaluate(model, data.val, autocast, world)
        if rank == 0:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{metrics['tok_per_s']:.0f}")
            if step % cfg.log_every == 0 or "val_loss" in metrics:
                metrics["expert_load"] = {i: v.tolist() for i, v in relative_load.items()}
                log.write(json.dumps(metrics) + "\n")
                log.flush()
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_checkpoint(out / "checkpoints" / f"step_{step:06d}", model, opt, loader, tok, step, cfg,
                            data.files, ep, budget)
        _barrier(world)
    bar.close()
    if log:
        log.close()
    return metrics


def _check_same_trajectory(cfg: TrainConfig, saved: dict, ckpt: Path, saved_world: int = 1, world: int = 1):
    saved = {k: getattr(type(cfg), k, None) for k in cfg.TRAJECTORY} | saved  # older runs lack later fields: defaults
    changed = {k: (saved[k], getattr(cfg, k)) for k in cfg.TRAJECTORY if saved[k] != getattr(cfg, k)}
    saved_batch = saved["batch_size"] * saved["grad_accum"] * saved_world  # the global batch: any split over ranks
    if saved_batch != cfg.batch_size * cfg.grad_accum * world:
        changed["batch_size × grad_accum × processes"] = (saved_batch, cfg.batch_size * cfg.grad_accum * world)
    if changed:
        detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
        raise ValueError(f"--resume from {ckpt} would not continue the same run ({detail}); start a new "
                         f"--out-dir (or a fresh run from the checkpoint's weights) to change them")


def _mean_over_ranks(value: float) -> float:
    t = torch.tensor([value])
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()
