"""Training across processes beyond data parallelism, applied from outside the model: expert
parallelism (`ep.py`: experts sharded over an EP group, tokens exchanged by all-to-all), and what the
training loop asks of it and of FSDP2 (`training.py`: `ParallelTraining`)."""

from openk2.parallel.ep import (ExpertParallelDispatcher, LocalExperts, clip_grad_norm, ep_param_groups,
                                gather_experts, shard_experts, sync_grads)

__all__ = ["ExpertParallelDispatcher", "LocalExperts", "clip_grad_norm", "ep_param_groups", "gather_experts",
           "shard_experts", "sync_grads"]
