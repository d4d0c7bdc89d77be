"""One agent episode and its record: the transcript, the stop reason, per-call token counts and
timings, tool errors, compactions and sub-agent episodes. `Episode.record()` is one JSONL line, the
format `openk2 sft` reads (OpenAI `messages` + `tools`, as other SFT tools do) and RL and people inspect.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

STOP_REASONS = {
    "answered": "the model answered without tool calls",
    "max_turns": "the budget of model calls is spent",
    "max_tokens": "the budget of generated tokens is spent",
    "wall_time": "the wall-clock budget is spent",
    "length": "a reply was cut at the per-turn token limit",
    "context_length": "the conversation no longer fits the context, even compacted",
    "model_error": "the model call failed",
    "cancelled": "interrupted",
}


@dataclass
class Episode:
    context: list[dict]  # what the model is sent (compacted near the context window)
    tools: list[dict]  # OpenAI tool schemas
    transcript: list[dict] = field(default_factory=list)  # every message, never compacted
    stop_reason: str | None = None
    detail: str = ""
    final: str | None = None  # the answer, when the model gave one
    turns: list[dict] = field(default_factory=list)  # per model call: tokens, finish reason, seconds
    tool_errors: list[dict] = field(default_factory=list)
    compactions: list[dict] = field(default_factory=list)
    subagents: list[dict] = field(default_factory=list)
    # per model call of an in-process client: {"kind", "prompt_ids", "completion_ids", "logprobs"}
    # (what RL trains on; not in `record()`)
    generations: list[dict] = field(default_factory=list)
    tools_s: float = 0.0
    seconds: float = 0.0
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        self.transcript = self.transcript or list(self.context)

    def append(self, *messages: dict) -> None:
        self.context.extend(messages)
        self.transcript.extend(messages)

    def stop(self, reason: str, detail: str = "") -> None:
        assert reason in STOP_REASONS, reason
        self.stop_reason, self.detail = reason, detail or STOP_REASONS[reason]

    @property
    def completion_tokens(self) -> int:
        return sum(t["completion_tokens"] for t in self.turns)

    def record(self) -> dict:
        """One JSONL record: what `openk2 sft` reads (messages + tools) and what RL and people inspect."""
        model_s = sum(t["seconds"] for t in self.turns if t["kind"] != "subagent")
        return {"id": self.id, "messages": self.transcript, "tools": self.tools, "stop_reason": self.stop_reason,
                "stop_detail": self.detail, "final": self.final,
                "usage": {"model_calls": sum(t.get("model_calls", 1) for t in self.turns),  # sub-agents' too
                          "prompt_tokens": sum(t["prompt_tokens"] for t in self.turns),
                          "completion_tokens": self.completion_tokens},
                "timings": {"total_s": round(self.seconds, 4), "model_s": round(model_s, 4),
                            "tools_s": round(self.tools_s, 4)},
                "turns": self.turns, "tool_errors": self.tool_errors, "compactions": self.compactions,
                "subagents": self.subagents, "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.started))}


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Append records, one JSON object a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
