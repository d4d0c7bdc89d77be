"""Training loop: exact resume, 2-process DDP = 1 process, balancing, metrics, plots, errors."""

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from openk2.checkpoint import convert, load_hf, sharded
from openk2.train import TRAIN_PRESETS, parse_args, train
from openk2.checkpoint import latest_checkpoint
from openk2.train.loop import balance_experts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 small standard-library files as a .txt corpus (~0.4 MB)."""
    folder = tmp_path_factory.mktemp("corpus")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    for i, f in enumerate(files):
        (folder / f"{i:02d}.txt").write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def _cfg(corpus, out, **kw):
    return dataclasses.replace(TRAIN_PRESETS["tiny"], **{"data": str(corpus), "out_dir": str(out), **kw})


def _losses(out) -> list[float]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "step" in r]


@pytest.mark.parametrize("fmt", ["hf", "dcp"])
def test_resume_continues_bit_identically(corpus, tmp_path, fmt):
    """MuonClip (momentum and AdamW moments), balancing biases, loader and RNG, from either format."""
    full = train(_cfg(corpus, tmp_path / "full", checkpoint_format=fmt))
    train(_cfg(corpus, tmp_path / "split", checkpoint_format=fmt), stop_at=4)  # one step after the step-3 one
    assert latest_checkpoint(tmp_path / "split").name == "step_000003"
    with pytest.raises(ValueError, match="steps: 6 -> 9"):
        train(_cfg(corpus, tmp_path / "split", resume=True, steps=9, checkpoint_format=fmt))
    resumed = train(_cfg(corpus, tmp_path / "split", resume=True, checkpoint_format=fmt))
    assert _losses(tmp_path / "split") == _losses(tmp_path / "full")  # the whole curve, bit for bit
    assert resumed["val_loss"] == full["val_loss"]
    a = load_hf(latest_checkpoint(tmp_path / "full"), progress=False).state_dict()
    b = load_hf(latest_checkpoint(tmp_path / "split"), progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_metrics_checkpoint_and_plots(corpus, tmp_path):
    out = tmp_path / "run"
    last = train(_cfg(corpus, out, steps=4, qk_clip_tau=1e-3, seq_aux_weight=1e-2))  # tiny τ: all clipped
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    start, steps = rows[0], [r for r in rows if "step" in r]
    assert start["event"] == "start" and start["git"] and start["config"]["qk_clip_tau"] == 1e-3
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    cfg = TRAIN_PRESETS["tiny"]
    assert len(last["max_logit"]) == 3 and last["qk_clipped_heads"] > 0
    assert set(last["expert_load"]) == {1, 2} and len(last["expert_load"][1]) == 16
    assert steps[-1]["loss"] < steps[0]["loss"] and "val_loss" in last and 0 < last["mfu"] < 1
    state = torch.load(latest_checkpoint(out) / "train_state.pt", weights_only=False)
    assert state["step"] == 4 and state["config"]["seq_len"] == cfg.seq_len and "git" in state
    from openk2.train.plot import plot_run
    pngs = plot_run(out)
    assert [p.name for p in pngs] == ["loss.png", "max_logit.png", "expert_load.png"]
    assert all(p.stat().st_size > 1000 for p in pngs)


def test_balancing_raises_underloaded_and_lowers_overloaded():
    from openk2.config import PRESETS
    from openk2.model import build_model
    model = build_model(PRESETS["k2-tiny"])
    load = torch.zeros(16)
    load[0], load[1] = 40, 24  # mean 4
    stats = balance_experts(model, {1: load}, speed=0.01, world=1)
    bias = model.layers[1].mlp.gate.e_score_correction_bias
    assert bias[0] == -0.01 and bias[1] == -0.01 and (bias[2:] == 0.01).all()
    assert stats[1].max().item() == pytest.approx(10.0) and stats[1].mean().item() == pytest.approx(1.0)
    assert (model.layers[2].mlp.gate.e_score_correction_bias == 0).all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, cfg):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("optimizer, tolerance", [("adamw", 1e-5), ("muonclip", 2e-3)])
def test_two_processes_equal_one_with_the_same_global_batch(corpus, tmp_path, optimizer, tolerance):
    """DDP sums the two halves' gradients in another order than one process does: the last bits differ.
    Through AdamW's fp32 update the losses stay equal to fp32 rounding (~1e-6); Muon's Newton–Schulz
    runs in bf16, where such last-bit differences flip roundings, so after a few steps the losses
    differ by ~1e-4 to 1e-3 (measured: at most 8.8e-4 over 12 steps, fp32 and bf16 autocast alike)."""
    one = _cfg(corpus, tmp_path / "one", batch_size=4, steps=6, warmup_steps=1, autocast="none", optimizer=optimizer)
    train(one)
    two = dataclasses.replace(one, out_dir=str(tmp_path / "two"), batch_size=1, grad_accum=2)
    (tmp_path / "two").mkdir()
    os.symlink(tmp_path / "one" / "tokenizer", tmp_path / "two" / "tokenizer")  # same tokenizer, no retrain
    mp.spawn(_rank_main, args=(2, _free_port(), two), nprocs=2, join=True)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert a[:2] == pytest.approx(b[:2], abs=1e-5)  # before any bf16 orthogonalisation could diverge them
    assert a == pytest.approx(b, abs=tolerance)


def _resume_copy(src, step: int, dst) -> None:
    """dst: the run in src as it stood at its step-`step` checkpoint (its log cut there too)."""
    name = f"step_{step:06d}"
    shutil.copytree(src / "checkpoints" / name, dst / "checkpoints" / name)
    (dst / "checkpoints" / "latest").write_text(name + "\n")
    rows = (src / "metrics.jsonl").read_text().splitlines()
    keep = [r for r in rows if json.loads(r).get("step", 0) <= step]
    (dst / "metrics.jsonl").write_text("\n".join(keep) + "\n")


def test_expert_parallel_training_equals_one_process_and_resumes_at_any_size(corpus, tmp_path):
    """`--ep` on 2 and 4 processes (each holding 1/2 or 1/4 of every layer's experts; and EP 2 × DP 2)
    trains as one process with the same global batch; a checkpoint is the whole model and the whole optimizer state,
    so a run resumes bit for bit at the same size, and at another: 4 processes (--ep 4) -> 2 (--ep 2)
    -> 1 ends where one process does (AdamW, to 1e-5)."""
    one = _cfg(corpus, tmp_path / "one", batch_size=4, steps=5, warmup_steps=1, autocast="none", optimizer="adamw",
               ckpt_every=2, eval_every=100)
    train(one)
    runs = {}
    for name, world, ep in (("two", 2, 2), ("again", 2, 2), ("four", 4, 4), ("four_two", 2, 2), ("ep2xdp2", 4, 2)):
        runs[name] = dataclasses.replace(one, out_dir=str(tmp_path / name), batch_size=4 // world, ep=ep)
        (tmp_path / name).mkdir()
        os.symlink(tmp_path / "one" / "tokenizer", tmp_path / name / "tokenizer")
    mp.spawn(_rank_main, args=(2, _free_port(), runs["two"]), nprocs=2, join=True)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 5 and a == pytest.approx(b, abs=1e-5)
    whole = load_hf(tmp_path / "two" / "checkpoints" / "step_000005", progress=False)
    ref = load_hf(tmp_path / "one" / "checkpoints" / "step_000005", progress=False)
    for (name, x), (_, y) in zip(whole.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)  # every expert included
    # EP 2 × DP 2: the checkpoint gathered by rank 0's EP group alone (the other holds copies)
    mp.spawn(_rank_main, args=(4, _free_port(), runs["ep2xdp2"]), nprocs=4, join=True)
    assert _losses(tmp_path / "ep2xdp2") == pytest.approx(a, abs=1e-5)
    mixed = load_hf(tmp_path / "ep2xdp2" / "checkpoints" / "step_000005", progress=False)
    for (name, x), (_, y) in zip(mixed.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)
    # the same size: bit for bit
    _resume_copy(tmp_path / "two", 2, tmp_path / "again")
    mp.spawn(_rank_main, args=(2, _free_port(), dataclasses.replace(runs["again"], resume=True)), nprocs=2, join=True)
    assert _losses(tmp_path / "again") == b
    final = load_hf(tmp_path / "again" / "checkpoints" / "step_000005", progress=False)
    assert all(torch.equal(x, y) for x, y in zip(final.state_dict().values(), whole.state_dict().values()))
    # 4 -> 2 -> 1 processes, the global batch kept
    mp.spawn(_rank_main, args=(4, _free_port(), runs["four"]), nprocs=4, join=True)
    _resume_copy(tmp_path / "four", 2, tmp_path / "four_two")
    mp.spawn(_rank_main, args=(2, _free_port(), dataclasses.replace(runs["four_two"], resume=True)), nprocs=2,
             join=True)
    last = dataclasses.replace(one, out_dir=str(tmp_path / "four_two_one"), resume=True)
    (tmp_path / "four_two_one").mkdir()
    os.symlink(tmp_path / "one" / "tokenizer", tmp_path / "four_two_one" / "tokenizer")
    _resume_copy(tmp_path / "four_two", 4, tmp_path / "four_two_one")
    train(last)
    assert _losses(tmp_path / "four_two_one") == pytest.approx(a, abs=1e-5)
    end = load_hf(tmp_path / "four_two_one" / "checkpoints" / "step_000005", progress=False)
    for (name, x), (_, y) in zip(end.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)
    with pytest.raises(ValueError, match="batch_size × grad_accum × processes: 4 -> 2"):
        train(dataclasses.replace(last, batch_size=2))  # another global batch is another run


def test_sharded_checkpoints_resume_at_any_size_and_export(corpus, tmp_path):
    """--checkpoint-format dcp: each rank writes its own part (EP 2 × DP 2: each expert stack's half
    once, though two replicas hold it), and the run resumes at 4 -> 2 -> 1 processes ending where one
    process does (AdamW, to 1e-5); at the same size the resume is bit for bit, optimizer state
    included; the checkpoint loads as a model (`load_hf`) and converts to a HF folder from any size."""
    one = _cfg(corpus, tmp_path / "one", batch_size=4, steps=5, warmup_steps=1, autocast="none", optimizer="adamw",
               ckpt_every=2, eval_every=100)
    train(one)
    runs = {}
    for name, world in (("four", 4), ("four_two", 2), ("again", 2), ("four_two_one", 1)):
        runs[name] = dataclasses.replace(one, out_dir=str(tmp_path / name), batch_size=4 // world,
                                         ep=min(world, 2), checkpoint_format="dcp", resume=name != "four")
        (tmp_path / name).mkdir()
        os.symlink(tmp_path / "one" / "tokenizer", tmp_path / name / "tokenizer")
    a = _losses(tmp_path / "one")
    ref = load_hf(tmp_path / "one" / "checkpoints" / "step_000005", progress=False).state_dict()
    mp.spawn(_rank_main, args=(4, _free_port(), runs["four"]), nprocs=4, join=True)
    folder = tmp_path / "four" / "checkpoints" / "step_000002"
    assert {f.name for f in folder.iterdir()} >= {"dcp", "config.json", "train_state.pt", "tiktoken.model"}
    assert not list(folder.glob("*.safetensors"))
    assert len(list((folder / "dcp").glob("*.distcp"))) == 4  # one file per rank
    assert _losses(tmp_path / "four") == pytest.approx(a, abs=1e-5)
    _resume_copy(tmp_path / "four", 2, tmp_path / "four_two")
    mp.spawn(_rank_main, args=(2, _free_port(), runs["four_two"]), nprocs=2, join=True)
    _resume_copy(tmp_path / "four_two", 4, tmp_path / "four_two_one")
    train(runs["four_two_one"])
    assert _losses(tmp_path / "four_two_one") == pytest.approx(a, abs=1e-5)
    for run in ("four", "four_two_one"):  # the model, read whole in one process, from 4 and from 1
        got = load_hf(tmp_path / run / "checkpoints" / "step_000005", progress=False).state_dict()
        for name, x in got.items():
            torch.testing.assert_close(x, ref[name], atol=1e-5, rtol=0, msg=name)
    # the same size (2 processes, EP 2): bit for bit, the moments of every expert restored exactly
    _resume_copy(tmp_path / "four_two", 4, tmp_path / "again")
    mp.spawn(_rank_main, args=(2, _free_port(), runs["again"]), nprocs=2, join=True)
    assert _losses(tmp_path / "again") == _losses(tmp_path / "four_two")
    x = load_hf(tmp_path / "again" / "checkpoints" / "step_000005", progress=False).state_dict()
    y = load_hf(tmp_path / "four_two" / "checkpoints" / "step_000005", progress=False).state_dict()
    assert all(torch.equal(x[k], y[k]) for k in y)
    # export: a Hugging Face folder, exactly the checkpoint's fp32 weights
    hf = convert(tmp_path / "four" / "checkpoints" / "step_000005", tmp_path / "hf", "fp32", progress=False)
    assert (hf / "tiktoken.model").exists() and not (hf / "dcp").exists()
    exported = load_hf(hf, progress=False).state_dict()
    whole = load_hf(tmp_path / "four" / "checkpoints" / "step_000005", progress=False).state_dict()
    assert all(torch.equal(exported[k], whole[k]) for k in whole)
    with pytest.raises(ValueError, match="sharded training checkpoint"):  # offload reads safetensors only
        load_hf(tmp_path / "four" / "checkpoints" / "step_000005", experts=lambda i: None)


def test_fsdp_trains_as_one_process_and_resumes_at_any_size(corpus, tmp_path):
    """--fsdp: the dense weights FSDP2-sharded over all processes (with EP 2 for the experts on 4), the
    optimizer state sharded alike, DCP checkpoints. Losses and weights equal one process's (AdamW 1e-5;
    MuonClip, as two micro-batches a step, gradients reduced after the second only: 1e-5 on the first
    two steps, then within the bf16 Newton–Schulz drift); 4 -> 2 -> 1
    processes end where one process does; at the same size the resume is bit for bit."""
    one = _cfg(corpus, tmp_path / "one", batch_size=4, steps=5, warmup_steps=1, autocast="none", optimizer="adamw",
               ckpt_every=2, eval_every=100)
    train(one)
    muon_one = dataclasses.replace(one, out_dir=str(tmp_path / "muon_one"), optimizer="muonclip")
    train(muon_one)
    runs = {}
    for name, world, ep in (("four", 4, 2), ("four_two", 2, 2), ("again", 2, 2), ("four_two_one", 1, 1),
                            ("muon", 2, 1)):
        base = muon_one if name == "muon" else one
        split = dict(batch_size=1, grad_accum=2) if name == "muon" else dict(batch_size=4 // world)  # no-sync too
        runs[name] = dataclasses.replace(base, out_dir=str(tmp_path / name), ep=ep, fsdp=world > 1,
                                         resume=name not in ("four", "muon"), **split)
        (tmp_path / name).mkdir()
        os.symlink(tmp_path / "one" / "tokenizer", tmp_path / name / "tokenizer")
    a = _losses(tmp_path / "one")
    ref = load_hf(tmp_path / "one" / "checkpoints" / "step_000005", progress=False).state_dict()
    mp.spawn(_rank_main, args=(4, _free_port(), runs["four"]), nprocs=4, join=True)
    assert _losses(tmp_path / "four") == pytest.approx(a, abs=1e-5)
    assert sharded.is_sharded(tmp_path / "four" / "checkpoints" / "step_000002")  # dcp, by default with --fsdp
    _resume_copy(tmp_path / "four", 2, tmp_path / "four_two")
    mp.spawn(_rank_main, args=(2, _free_port(), runs["four_two"]), nprocs=2, join=True)
    _resume_copy(tmp_path / "four_two", 4, tmp_path / "four_two_one")
    train(runs["four_two_one"])  # one process, no FSDP, from FSDP's shards
    assert _losses(tmp_path / "four_two_one") == pytest.approx(a, abs=1e-5)
    for run in ("four", "four_two_one"):
        got = load_hf(tmp_path / run / "checkpoints" / "step_000005", progress=False).state_dict()
        for name, x in got.items():
            torch.testing.assert_close(x, ref[name], atol=1e-5, rtol=0, msg=name)
    _resume_copy(tmp_path / "four_two", 4, tmp_path / "again")
    mp.spawn(_rank_main, args=(2, _free_port(), runs["again"]), nprocs=2, join=True)
    x = load_hf(tmp_path / "again" / "checkpoints" / "step_000005", progress=False).state_dict()
    y = load_hf(tmp_path / "four_two" / "checkpoints" / "step_000005", progress=False).state_dict()
    assert all(torch.equal(x[k], y[k]) for k in y)
    mp.spawn(_rank_main, args=(2, _free_port(), runs["muon"]), nprocs=2, join=True)
    m, m1 = _losses(tmp_path / "muon"), _losses(tmp_path / "muon_one")
    assert m[:2] == pytest.approx(m1[:2], abs=1e-5) and m == pytest.approx(m1, abs=2e-3)
    with pytest.raises(ValueError, match="--fsdp shards the weights over processes"):
        train(dataclasses.replace(one, out_dir=str(tmp_path / "alone"), fsdp=True))
    with pytest.raises(ValueError, match="--fsdp writes sharded checkpoints"):
        dataclasses.replace(one, fsdp=True, checkpoint_format="hf")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_nccl_expert_parallel_and_fsdp_train_as_one_process(corpus, tmp_path):
    """The same code on NCCL (CUDA tensors) with gloo beside it for the CPU ones: EP 2 with DDP, and EP 2
    under FSDP2 with sharded checkpoints, train as one GPU process does (fp32, AdamW)."""
    one = _cfg(corpus, tmp_path / "one", batch_size=4, steps=4, warmup_steps=1, autocast="none", optimizer="adamw",
               ckpt_every=2, eval_every=2)
    train(one)
    for name, fsdp in (("ep", False), ("fsdp", True)):
        run = dataclasses.replace(one, out_dir=str(tmp_path / name), batch_size=2, ep=2, fsdp=fsdp)
        (tmp_path / name).mkdir()
        os.symlink(tmp_path / "one" / "tokenizer", tmp_path / name / "tokenizer")
        mp.spawn(_rank_main, args=(2, _free_port(), run), nprocs=2, join=True)
        assert _losses(tmp_path / name) == pytest.approx(_losses(tmp_path / "one"), abs=1e-4), name


def test_clear_errors(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        train(_cfg(corpus, tmp_path / "a", data=str(tmp_path / "nope")))
    small = tmp_path / "small"
    small.mkdir()
    (small / "a.txt").write_text("x = 1\n")
    with pytest.raises(ValueError, match="corpus too short"):  # one document: nothing left to train on
        train(_cfg(corpus, tmp_path / "b", data=str(small)))
    (small / "b.txt").write_text("y = 2\n")
    with pytest.raises(ValueError, match="corpus too short"):  # fewer tokens than one sequence
        train(_cfg(corpus, tmp_path / "b2", data=str(small)))
    with pytest.raises(ValueError, match="GiB"):
        train(_cfg(corpus, tmp_path / "c", model="kimi-k2"))
    with pytest.raises(SystemExit):
        parse_args(["--optimizer", "sgd"])


def test_cli_overrides_resolve_on_a_preset():
    cfg = parse_args(["--preset", "tiny", "--steps", "9", "--lr", "1e-3", "--resume"])
    assert (cfg.steps, cfg.lr, cfg.resume, cfg.seq_len) == (9, 1e-3, True, TRAIN_PRESETS["tiny"].seq_len)


def test_schedule_warms_up_holds_and_lands_on_final():
    from openk2.train.loop import lr_at
    cfg = TRAIN_PRESETS["tiny"]  # 6 steps: 2 warm-up, 1 decay
    lrs = [lr_at(cfg, s) for s in range(cfg.steps)]
    assert lrs[0] == 0 and lrs[1] == cfg.lr / 2 and lrs[2:5] == [cfg.lr] * 3
    assert lrs[5] == pytest.approx(cfg.lr * cfg.final_lr_frac)
    with pytest.raises(ValueError, match="do not fit"):
        dataclasses.replace(cfg, steps=3)
    for bad in (dict(peak_tflops=0), dict(eval_batches=0), dict(grad_clip=-1), dict(decay_frac=2)):
        with pytest.raises(ValueError):
            dataclasses.replace(cfg, **bad)


# ---------------------------------------------------------------- killed runs (real processes, SIGKILL)

def _start(corpus, out, *flags):
    return subprocess.Popen([sys.executable, "-m", "openk2.train", "--preset", "tiny", "--data", str(corpus),
                             "--out-dir", str(out), "--log-every", "1", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_when(proc, ready, timeout=300):
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"training ended early: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "training never got there"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
            if "step" in json.loads(line)]


def _resume(corpus, out, *flags):
    p = subprocess.run([sys.executable, "-m", "openk2.train", "--preset", "tiny", "--data", str(corpus),
                        "--out-dir", str(out), "--log-every", "1", *flags, "--resume"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stderr


def test_killed_before_the_first_checkpoint_resumes_with_a_clean_log(corpus, tmp_path):
    out, flags = tmp_path / "run", ["--steps", "16", "--ckpt-every", "16"]
    proc = _start(corpus, out, *flags)
    _kill_when(proc, lambda: (out / "metrics.jsonl").exists() and len(_steps(out)) >= 3)
    assert latest_checkpoint(out) is None and _steps(out)[:3] == [1, 2, 3]  # killed with no checkpoint
    log = _resume(corpus, out, *flags)
    assert "no complete checkpoint" in log and "starting from step 0" in log
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert _steps(out) == list(range(1, 17))  # each step once, not 1, 2, 3, 1, 2, ...
    assert [r["resumed_from"] for r in rows if r.get("event") == "start"] == [0]


def test_a_bad_latest_pointer_falls_back_to_the_newest_complete_checkpoint(corpus, tmp_path):
    out, flags = tmp_path / "run", ["--steps", "12", "--ckpt-every", "4"]
    proc = _start(corpus, out, *flags)
    _kill_when(proc, lambda: (out / "checkpoints" / "step_000004" / "train_state.pt").exists())
    newest = latest_checkpoint(out)
    # what a kill inside a checkpoint could leave: an emptied pointer (the pointer used to be rewritten
    # in place) and a newer folder that never got its train_state.pt
    (out / "checkpoints" / "latest").write_text("")
    (out / "checkpoints" / "step_000099").mkdir()
    (out / "checkpoints" / "step_000099" / "config.json").write_text("{}")
    log = _resume(corpus, out, *flags)
    assert f"latest is empty; using the newest complete checkpoint, {newest.name}" in log
    assert _steps(out) == list(range(1, 13)) and latest_checkpoint(out).name == "step_000012"
    (out / "checkpoints" / "latest").unlink()
    notes = []
    assert latest_checkpoint(out, notes.append).name == "step_000012" and "latest is missing" in notes[0]


def test_resume_of_a_finished_run_says_it_is_complete(corpus, tmp_path):
    out = tmp_path / "run"
    final = train(_cfg(corpus, out))
    before = (out / "metrics.jsonl").read_text()
    openk2 = os.path.join(os.path.dirname(sys.executable), "openk2")
    p = subprocess.run([openk2, "train", "--preset", "tiny", "--data", str(corpus), "--out-dir", str(out), "--resume"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"the run in {out} is complete (6 of 6 steps); nothing to resume" in p.stderr
    assert f"validation loss {final['val_loss']:.3f} nats/token after 6 steps" in p.stdout and "nan" not in p.stdout
    assert (out / "metrics.jsonl").read_text() == before
