"""Agentic RL: rollouts of the agent loop on the in-process engine, verifiable and self-critique
rewards, K2's (K1.5) objective or GRPO, PTX, temperature decay; `openk2 rl CHECKPOINT` (loop.py)."""
