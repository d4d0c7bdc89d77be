"""Muon for the matrices, AdamW for the rest: the optimizer half of MuonClip (K2-SPEC §7.1).

Read top to bottom: `newton_schulz` (orthogonalise), `momentum_step`, `rms_scale` and `match_adamw_rms`,
`apply_muon` (that update, not built), `muon_update` (the single-matrix reference: the three in a row),
`adamw_update`, then `Muon`, a thin class that holds state and runs the *sharded* step over the groups
of `optim.groups.muon_param_groups`. QK-Clip, the other half of MuonClip, is `optim.qk_clip`, applied
after `step()`. tests/test_optim.py binds the sharded step (1 and 2 processes) to `muon_update`.

Sharding (STYLE §2): Newton–Schulz is the only expensive part, so the orthogonalisations are split.
Every Muon matrix is grouped by shape; rank r orthogonalises the r-th contiguous share of each shape
group and the bf16 results are all-gathered (lossless: NS output is bf16). Momentum, AdamW and the
weight update itself are elementwise and run on every rank, so state and weights stay replicated and
`state_dict()` does not depend on the world size. Parameters sharded by rows (FSDP2's DTensors) are
the exception: their state is sharded alike and each whole matrix goes to one owner (`_muon_rows`).
Gradients are assumed already averaged (DDP). With torch.distributed not initialised, or world size
1, rank 0 owns every matrix and nothing is sent.

On the CPU the elementwise passes (momentum, the normalised bf16 copy, the update) run as openk2's
kernels where they are built (`openk2/kernels/optim_cpu.cpp`, `_kernel`): one pass each where torch's
ops take two or three, the same numbers bit for bit. k2-small's step reads ~17 and writes ~9 bytes per
fp32 weight through torch's ops, ~9 and ~5 through the kernels.
"""

import math

import torch
import torch.distributed as dist

from openk2 import kernels

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # ref: Moonlight toy_train.py / KellerJordan Muon (quintic)
# CPU orthogonalises this many bytes of X at a time: chunks of 16 matrices of 256×512 ran at 1.43 TFLOP/s
# on 2 Sapphire Rapids cores, of 4 at 1.27, of 2 at 1.18 (on 2 EPYC cores 1 MiB chunks ran 2.4× the whole
# stack; 4 MiB is not measured there). GPUs take the whole stack in one batch.
NS_CHUNK_BYTES = 1 << 22


class Scratch:
    """Tensors kept from one optimizer step to the next, one per role, grown to the largest asked for.

    Notes: on CPU a fresh tensor of many MB comes from new pages, each faulted in on first write.
    k2-small's Muon step, with its temporaries allocated anew, took 2.9 s in bench/train.py, of which
    Newton–Schulz 0.8 s; reused, 1.0 s. `Muon` keeps its scratch between steps on CPU only: a GPU's
    caching allocator reuses freed memory anyway, and activations need it between steps.
    """

    def __init__(self):
        self.flat: dict[str, torch.Tensor] = {}

    def get(self, role: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """An uninitialised tensor of `shape` for `role`, valid until `role` is asked for again."""
        n = math.prod(shape)
        t = self.flat.get(role)
        if t is None or t.numel() < n or t.dtype != dtype or t.device != torch.device(device):
            t = self.flat[role] = torch.empty(n, dtype=dtype, device=device)
        return t[:n].view(shape)


WRITES = {"muon_momentum": (1, 2), "scale_to_bf16": (2,), "muon_apply": (0,)}  # the arguments each kernel writes


def _kernel(name: str, *tensors: torch.Tensor, last=(torch.float32,)):
    """openk2's CPU kernel `name` for these tensors (contiguous, on the CPU, fp32, the last one of a dtype in
    `last`), or None: the torch ops serve (and are the reference the kernels are tested against). The
    first call builds the kernels where they are not yet (~1 min once: `openk2.kernels.load`)."""
    *head, tail = tensors
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors) or tail.dtype not in last \
            or any(t.dtype != torch.float32 for t in head) or (op := kernels.cpu_op(name)) is None:
        return None

    def run(*args):  # written through raw pointers: autograd's version counters are bumped here
        op(*args)
        torch.autograd.graph.increment_version([args[i] for i in WRITES[name] if not args[i].is_inference()])
    return run


def newton_schulz(G: torch.Tensor, steps: int = 5, *, scratch: Scratch | None = None,
                  scale_G: bool = False) -> torch.Tensor:
    """Approximately orthogonalise each matrix: G = U S Vᵀ  ->  ≈ U S' Vᵀ with S' ≈ 1.

    Shapes: G [..., A, B] (one matrix or a stack, any float dtype) -> bf16 [..., A, B].
    Notes: the quintic coefficients maximise the slope at zero instead of converging to 1, so singular
    values that are not tiny land in roughly [0.7, 1.2], not at 1; that does not hurt training (Keller
    Jordan) and 5 steps suffice. It runs in bf16 because the iteration is self-correcting: the
    rounding of one step is damped by the next, and bf16 matmuls are the cheap ones on a GPU. The
    Frobenius normalisation (in G's dtype) bounds the spectral norm by 1, inside the iteration's basin;
    X is then bf16 and contiguous (for the bmms), in G's own layout. A tall matrix iterates on its
    right: X·(b·M + c·M²) with M = XᵀX, the same polynomial (X p(XᵀX) = p(XXᵀ) X), so the Gram matrix
    is the small one either way and nothing is transposed (on CPU a transposing copy in and out of bf16
    cost ~7x a straight one: k2-small's down projections, 16.6 against 2.4 ms a layer).
    `scale_G=True` lets the normalisation overwrite G (a caller's temporary: a fast pass, the same
    numbers; openk2's kernel, where it serves, leaves G as it is). With `scratch`, the result lives in
    it until the next call with that scratch.
    """
    a, b, c = NS_COEFFS
    scratch = scratch if scratch is not None else Scratch()
    tall = G.size(-2) > G.size(-1)
    G_NAB = G.reshape(-1, *G.shape[-2:])  # a view, unless G is strided oddly
    N, A, B = G_NAB.shape
    X_NAB = scratch.get("ns_in", (N, A, B), torch.bfloat16, G.device)
    inv = 1 / (G_NAB.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    if scale := _kernel("scale_to_bf16", G_NAB, inv, X_NAB, last=(torch.bfloat16,)):
        scale(G_NAB, inv, X_NAB)
    else:
        X_NAB.copy_(G_NAB.mul_(inv)) if scale_G else torch.mul(G_NAB, inv, out=X_NAB)
    if not steps:
        return X_NAB.view(G.shape)
    out_NAB = scratch.get("ns_out", (N, A, B), torch.bfloat16, G.device)
    S = min(A, B)  # the Gram matrices' side
    n = max(1, min(N, NS_CHUNK_BYTES // (2 * A * B) if G.device.type == "cpu" else N))  # matrices a chunk
    gram = scratch.get("ns_gram", (n, S, S), torch.bfloat16, G.device)
    poly = scratch.get("ns_poly", (n, S, S), torch.bfloat16, G.device)
    X2 = [scratch.get(f"ns_x{i}", (n, A, B), torch.bfloat16, G.device) for i in range(2)]
    for i in range(0, N, n):
        X = X_NAB[i:i + n]
        k = len(X)
        for step in range(steps):  # the quintic a·X + b·(XXᵀ)X + c·(XXᵀ)²X (tall: on the right), one fewer big matmul
            M = torch.bmm(X.mT, X, out=gram[:k]) if tall else torch.bmm(X, X.mT, out=gram[:k])
            P = torch.baddbmm(M, M, M, beta=b, alpha=c, out=poly[:k])  # b·M + c·M², scalings fused in
            out = out_NAB[i:i + n] if step == steps - 1 else X2[step % 2][:k]
            X = torch.baddbmm(X, X, P, beta=a, out=out) if tall else torch.baddbmm(X, P, X, beta=a, out=out)
    return out_NAB.view(G.shape)


def momentum_step(grad: torch.Tensor, buf: torch.Tensor, momentum: float, nesterov: bool,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """M ← μ·M + G (in place, K2 Algorithm 1); returns what gets orthogonalised: G + μ·M (Nesterov,
    Moonlight's default) or M (plain momentum, as the K2 report writes it), in `out` when given (a
    tensor of grad's shape and dtype), so the caller may overwrite it. One pass each (both in one
    where openk2's kernel takes them)."""
    if out is not None and (fused := _kernel("muon_momentum", grad, buf, out)):
        fused(grad, buf, out, momentum, nesterov)
        return out
    torch.add(grad, buf, alpha=momentum, out=buf)
    if nesterov:
        return torch.add(grad, buf, alpha=momentum, out=out)
    return out.copy_(buf) if out is not None else buf


def rms_scale(A: int, B: int) -> float:
    """0.2·sqrt(max(A, B)): an A×B matrix with unit singular values has RMS 1/sqrt(max(A, B)), scaled
    to ≈ 0.2, typical of AdamW updates, so AdamW's lr and weight decay carry over (Moonlight §2.2).
    The shape is each orthogonalised matrix's own: (F, D) for an expert's gate."""
    return 0.2 * math.sqrt(max(A, B))


def match_adamw_rms(O: torch.Tensor) -> torch.Tensor:
    """Orthogonalised matrices [..., A, B] scaled by `rms_scale`, in fp32: the Muon update."""
    return O.float() * rms_scale(*O.shape[-2:])


def apply_muon(p: torch.Tensor, O: torch.Tensor, lr: float, weight_decay: float, scale: float,
               scratch: Scratch | None = None):
    """W ← W·(1 − lr·wd) − lr·scale·O in place: `match_adamw_rms`'s update, not built (the scale rides on
    alpha). O has p's shape; with `scratch`, O of another dtype is cast into its "update" tensor first:
    on CPU a bf16 addend to fp32 weights is a slow path, a cast copy and a same-dtype add three times
    faster; openk2's kernel reads O as it is."""
    if fused := _kernel("muon_apply", p, O, last=(torch.bfloat16, torch.float32)):
        return fused(p, O, 1 - lr * weight_decay, -lr * scale)
    if scratch is not None and O.dtype != p.dtype:
        O = scratch.get("update", p.shape, p.dtype, p.device).copy_(O)
    p.mul_(1 - lr * weight_decay).add_(O, alpha=-lr * scale)


def muon_update(grad: torch.Tensor, buf: torch.Tensor, momentum: float = 0.95, nesterov: bool = True,
                ns_steps: int = 5) -> torch.Tensor:
    """The reference Muon update of one matrix (or a stack [..., A, B]): fp32, RMS ≈ 0.2.

    Apply as W ← W·(1 − lr·wd) − lr·update (decoupled weight decay, the same lr).
    """
    return match_adamw_rms(newton_schulz(momentum_step(grad, buf, momentum, nesterov), ns_steps))


def adamw_update(p, grad, exp_avg, exp_avg_sq, step: int, lr: float, betas, eps: float, wd: float):
    """One AdamW step in place, the arithmetic of torch.optim.AdamW (single-tensor path)."""
    beta1, beta2 = betas
    p.mul_(1 - lr * wd)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))


def is_sharded(t) -> bool:
    """A DTensor (duck-typed: the optimizer does not import torch.distributed.tensor)."""
    return hasattr(t, "to_local")


def local_part(t):
    """The part of `t` this rank holds: all of a plain tensor, a DTensor's local tensor."""
    return t.to_local() if is_sharded(t) else t


def row_block(t) -> tuple[int, int, dist.ProcessGroup | None]:
    """(first row this rank holds, rows a block, the group) of a tensor sharded by rows as FSDP2 shards
    (torch.chunk's blocks of ceil(rows / ranks), the last short or empty); a plain tensor: one block."""
    if not is_sharded(t):
        return 0, t.shape[0], None
    group = t.device_mesh.get_group()
    chunk = -(-t.shape[0] // dist.get_world_size(group))
    return dist.get_rank(group) * chunk, chunk, group


def _batches(items: list, A: int, B: int) -> list[list]:
    """A shape group's (param, group) pairs in the batches that one Newton–Schulz call takes at world
    size 1. On CPU, parameters that are one matrix each (and of one dtype) go together up to
    `NS_CHUNK_BYTES` of bf16: alone, k2-small's attention and shared-expert matrices ran at 0.25–0.95
    TFLOP/s on 2 Sapphire Rapids cores, all layers' matrices of a shape together at 0.55–1.66. A stack
    of matrices (experts), or any parameter off the CPU, is a batch of its own."""
    out, room = [], 0  # room: bytes left in the last batch
    for item in items:
        single = item[0].device.type == "cpu" and item[0].numel() == A * B
        if not (single and room >= 2 * A * B and item[0].dtype == out[-1][0][0].dtype):
            out.append([])
            room = NS_CHUNK_BYTES if single else 0
        out[-1].append(item)
        room -= 2 * A * B if single else 0
    return out


def _share(stacks: list[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    """Matrices start..stop of the concatenation of stacks [n_i, A, B]; copies only that share."""
    parts, off = [], 0
    for s in stacks:
        lo, hi = max(start - off, 0), min(stop - off, s.shape[0])
        if lo < hi:
            parts.append(s[lo:hi])
        off += s.shape[0]
    return torch.cat(parts) if parts else stacks[0].new_zeros(0, *stacks[0].shape[1:])


class Muon(torch.optim.Optimizer):
    """Muon + AdamW over the groups of `muon_param_groups(model)`; one code path for 1 or N ranks.

    Defaults are Moonlight's (K2-SPEC §7.1): momentum 0.95 with Nesterov, 5 NS steps; AdamW with betas
    (0.9, 0.95), eps 1e-8 and the same lr and weight decay; lr 2e-4 and wd 0.1 are K2's peak and decay.
    K2's own μ, Nesterov and AdamW settings are *Unverified*. Every rank must call `step()` (the
    gather is collective) with the same parameters holding gradients, as DDP guarantees.

    Notes: momentum and AdamW state are replicated, except for parameters sharded by rows over a
    mesh (FSDP2's DTensors): their state is sharded alike, and each whole matrix is gathered onto one
    rank for Newton–Schulz and its rows scattered back (`_muon_rows`). At world size 1 each parameter
    (on CPU, a batch of same-shape one-matrix parameters: `_batches`) goes through momentum, NS and its
    update in turn, with temporaries in `self.scratch` (a copy of the largest parameter or batch in the
    grads' dtype, two in bf16; kept between steps on CPU); with more ranks a
    shape group's NS inputs and bf16 updates are held at once: at K2 scale groups would need bucketing
    (expert parallelism shards them).
    `process_group` is the data-parallel group; None means the default group when torch.distributed is
    initialised. A group marked `local` holds matrices only this rank has (experts under expert
    parallelism): they are orthogonalised here, not shared.
    """

    def __init__(self, param_groups, lr: float = 2e-4, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, betas=(0.9, 0.95), eps: float = 1e-8,
                 process_group=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, betas=betas, eps=eps, algo=None, matrix=None, local=False)
        super().__init__(param_groups, defaults)
        for g in self.param_groups:
            if g["algo"] not in ("muon", "adamw"):
                raise ValueError("each group needs algo 'muon' or 'adamw': use muon_param_groups(model)")
        self.process_group = process_group
        self.scratch = Scratch()  # the step's temporaries, kept for the next step (not state)

    def _rank_world(self) -> tuple[int, int]:
        if not (dist.is_available() and dist.is_initialized()):
            return 0, 1
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        by_shape: dict[tuple, list] = {}  # (A, B, ns_steps, local) -> [(param, group)]: one NS batch each
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["algo"] == "adamw":
                    self._adamw(p, group)
                else:
                    A, B = group["matrix"] or p.shape
                    by_shape.setdefault((A, B, group["ns_steps"], group["local"]), []).append((p, group))
        rank, world = self._rank_world()
        turn = 0  # whose turn it is to own the next row-sharded matrix
        for (A, B, ns_steps, local), items in by_shape.items():  # local: this rank's own (expert-parallel)
            rows = [(p, group) for p, group in items if is_sharded(p)]
            for p, group in rows:
                self._muon_rows(p, group, A, B, ns_steps, turn)
                turn += 1
            if len(rows) < len(items):
                items = [(p, group) for p, group in items if not is_sharded(p)]
                self._muon(items, A, B, ns_steps, *((0, 1) if local else (rank, world)))
        self.scratch.flat = {k: t for k, t in self.scratch.flat.items() if t.device.type == "cpu"}  # see Scratch
        return loss

    def _muon_rows(self, p, group, A: int, B: int, ns_steps: int, turn: int):
        """A parameter sharded by rows over a mesh (FSDP2's `fully_shard`; torch.chunk's blocks): its
        momentum on each rank's rows (the state sharded alike), the whole update gathered onto one
        owner (ranks take turns), orthogonalised there, and each rank's rows scattered back."""
        u = self._momentum(p, group)
        _, chunk, pg = row_block(p)
        n = dist.get_world_size(pg)
        owner = dist.get_global_rank(pg, turn % n)
        mine = dist.get_rank() == owner
        padded = u.new_zeros(chunk, *u.shape[1:])
        padded[:u.shape[0]] = u
        parts = [torch.empty_like(padded) for _ in range(n)] if mine else None
        dist.gather(padded, parts, dst=owner, group=pg)
        if mine:
            O = newton_schulz(torch.cat(parts)[:p.shape[0]].view(-1, A, B), ns_steps, scratch=self.scratch,
                              scale_G=True)
            O = torch.cat([O.reshape(p.shape), O.new_zeros(n * chunk - p.shape[0], *p.shape[1:])])
            parts = list(O.split(chunk))
        O = torch.empty(chunk, *u.shape[1:], dtype=torch.bfloat16, device=u.device)
        dist.scatter(O, parts, src=owner, group=pg)
        local = p.to_local()
        apply_muon(local, O[:local.shape[0]], group["lr"], group["weight_decay"], rms_scale(A, B), self.scratch)

    def _adamw(self, p, group):
        state = self.state[p]
        if not state:  # of a sharded parameter, sharded alike
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        adamw_update(local_part(p), local_part(p.grad), local_part(state["exp_avg"]), local_part(state["exp_avg_sq"]),
                     state["step"], group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def _momentum(self, p, group, out=None):
        """`momentum_step` on this rank's part of p's gradient and momentum (made at the first step, as the
        gradient is: sharded alike for a sharded parameter)."""
        if "momentum_buffer" not in self.state[p]:
            self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
        return momentum_step(local_part(p.grad), local_part(self.state[p]["momentum_buffer"]), group["momentum"],
                             group["nesterov"], out)

    def _muon(self, items, A: int, B: int, ns_steps: int, rank: int, world: int):
        """One shape group: momentum (all ranks), this rank's contiguous share of the matrices through
        NS, all-gather, then every rank applies every update; at world size 1, batch by batch (`_batches`)."""
        if world == 1:
            for batch in _batches(items, A, B):
                sizes, grad = [p.grad.numel() for p, _ in batch], batch[0][0].grad
                U = self.scratch.get("update", (sum(sizes),), grad.dtype, grad.device)
                parts = U.split(sizes)
                for (p, group), u in zip(batch, parts):
                    self._momentum(p, group, out=u.view(p.grad.shape))
                O = newton_schulz(U.view(-1, A, B), ns_steps, scratch=self.scratch, scale_G=True)
                # the kernel adds bf16 O itself; torch's add wants it in fp32 first
                if not all(_kernel("muon_apply", p, O, last=(torch.bfloat16,)) for p, _ in batch):
                    O = U.copy_(O.view(-1))
                for (p, group), o in zip(batch, O.view(-1).split(sizes)):
                    apply_muon(p, o.view(p.shape), group["lr"], group["weight_decay"], rms_scale(A, B))
            return
        stacks = [self._momentum(p, group).reshape(-1, A, B) for p, group in items]
        n = sum(s.shape[0] for s in stacks)
        m = -(-n // world)  # matrices per rank; the last share may be short or empty
        O_mAB = newton_schulz(_share(stacks, rank * m, (rank + 1) * m), ns_steps, scratch=self.scratch, scale_G=True)
        O_mAB = torch.cat([O_mAB, O_mAB.new_zeros(m - O_mAB.shape[0], A, B)])
        gathered = O_mAB.new_empty(world * m, A, B)
        dist.all_gather_single(gathered, O_mAB, group=self.process_group)
        for (p, group), O in zip(items, gathered[:n].split([u.shape[0] for u in stacks])):
            apply_muon(p, O.view(p.shape), group["lr"], group["weight_decay"], rms_scale(A, B), self.scratch)
