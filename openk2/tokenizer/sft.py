"""Supervised chat data: OpenAI-messages JSONL -> token ids + a loss mask that is 1 exactly on what
the assistant writes (its content, reasoning where the template writes it, tool-call markers, ids and
arguments, and the closing `<|im_end|>`) and 0 on everything else (tool declarations, system, user and
tool turns, and the `<|im_assistant|>assistant<|im_middle|>` header, which the template writes).
An assistant message with `"weight": 0` (OpenAI's fine-tuning format: 0 or 1, default 1) stays in the
context of the later turns but is not trained on: its tokens get mask 0 (a teacher's slip before its
recovery, say: the recovery is learned, the slip is not).

How the spans are found, whatever the template: for the i-th message, if an assistant one, the
conversation up to it is rendered with the generation prompt (what the model would be shown) and up
to and including it without; the ids between the two are its span. Both must be prefixes of the
whole conversation's ids, else the template renders earlier turns differently once later turns
follow (K2-Thinking drops the reasoning of finished turns) and no single sequence trains each turn as
it was generated: such a conversation is an error. Rendering and encoding go through `encode_chat`,
so special-token strings inside values stay text and cannot fake a turn.
Not here: packing (`openk2.data.packing`), training (`openk2.train.sft`).
"""

from __future__ import annotations

import json
from pathlib import Path

from openk2.tokenizer.protect import encode_chat

ROLES = ("system", "user", "assistant", "tool")


def weight_of(message: dict, where: str) -> int:
    """An assistant message's training weight: 1 unless it says `"weight": 0`; a weight on another role,
    or one other than 0 and 1, is a ValueError naming `where`."""
    weight = message.get("weight", 1)
    if "weight" in message and message.get("role") != "assistant":
        raise ValueError(f"{where} ({message.get('role')}) has a weight; only assistant messages take one")
    if isinstance(weight, bool) or weight not in (0, 1):
        raise ValueError(f"{where} has weight {weight!r}; expected 0 (not trained on) or 1")
    return int(weight)


def check_example(row, where: str) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) of one JSONL row, or a ValueError naming `where` and what is wrong."""
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list) or not row["messages"]:
        raise ValueError(f"{where}: expected an object with a non-empty \"messages\" list")
    for j, m in enumerate(row["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise ValueError(f"{where}: message {j} has role {role!r}; expected one of {', '.join(ROLES)}")
        for call in m.get("tool_calls") or []:
            if not isinstance(call, dict) or not isinstance(call.get("function"), dict) \
                    or "name" not in call["function"] or "arguments" not in call["function"]:
                raise ValueError(f"{where}: message {j} has a tool call without function name and arguments")
        weight_of(m, f"{where}: message {j}")
    if not any(m["role"] == "assistant" and m.get("weight", 1) for m in row["messages"]):
        raise ValueError(f"{where}: no assistant message of weight 1, so nothing to learn")
    tools = row.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"{where}: \"tools\" must be a list of tool objects")
    return row["messages"], tools or None


def read_jsonl(path: str | Path) -> list[tuple[int, list[dict], list[dict] | None]]:
    """(line number, messages, tools) of every conversation of an OpenAI-messages JSONL file
    (`{"messages": [...], "tools": [...]}` a line, tools optional); blank lines skipped; errors name
    the line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
            out.append((n, *check_example(row, f"{path}:{n}")))
    if not out:
        raise ValueError(f"{path}: no conversations")
    return out


def encode_with_mask(tokenizer, messages: list[dict], tools: list[dict] | None = None, template: str | None = None,
                     **variables) -> tuple[list[int], list[int]]:
    """(ids, mask) of one conversation, rendered without a generation prompt; mask[i] = 1 where ids[i]
    is a token of an assistant message of weight 1 (see the module docstring)."""
    from openk2.tokenizer.chat import assign_tool_call_ids
    messages = assign_tool_call_ids(messages)

    def enc(msgs, prompt: bool) -> list[int]:
        return encode_chat(tokenizer, msgs, tools, prompt, template, **variables)

    ids = enc(messages, False)
    mask = [0] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("the conversation opens with an assistant message; it needs a system or user turn first")
        if not weight_of(message, f"message {i}"):
            continue  # a turn at weight 0 keeps mask 0: no need to render it to find its span
        head, upto = enc(messages[:i], True), enc(messages[:i + 1], False)
        if upto[:len(head)] != head or ids[:len(upto)] != upto:
            raise ValueError(f"the chat template renders the turns before message {i} differently once later "
                             "turns follow, so no single sequence trains every assistant turn; split the "
                             "conversation into one example per assistant turn")
        mask[len(head):len(upto)] = [1] * (len(upto) - len(head))
    return ids, mask
