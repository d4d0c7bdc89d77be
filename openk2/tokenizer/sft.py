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
it was generated: such a conversation is an error. Rendering and encoding go through `chat_encoder`,
so special-token strings inside values stay text and cannot fake a turn.

`avoid_refused`: a weight-0 assistant turn that calls a tool the conversation does not declare (a
refused call, as `openk2 synth`'s corrections write them) also marks, with mask 2, the token of the
undeclared name where it first leaves every declared name, once, where the turn commits to the name:
its last mention in the turn's text ("… Calling place_order with …"), else the call itself. Training then
lowers that token's probability there (unlikelihood, `model/head_loss.py`): the model learns the state
it must not repeat, where weight 0 alone only shows it.
Not here: packing (`openk2.data.packing`), training (`openk2.train.sft`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from openk2.tokenizer.protect import chat_encoder

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


AVOID_MARK = 2  # mask value: ids[i] is a token to avoid at that position (see the module docstring)


def declared_names(tools: list[dict] | None) -> set[str]:
    return {(t.get("function") or t).get("name") for t in tools or []} - {None}


def avoid_positions(tokenizer, ids: list[int], start: int, end: int, names: list[str],
                    declared: set[str]) -> list[int]:
    """Indices in ids[start:end] (one refused turn, rendered) of the token where each of `names` (its
    undeclared calls) first leaves every declared name (or, if it is a prefix of one, ends), where the
    turn commits to it: its last mention in the text before the calls, else its first in the calls
    (K2's call id, `functions.NAME:IDX`)."""
    spans, at = [], 0  # each token's byte range in the turn's text
    for k in range(start, end):
        n = len(tokenizer.decode_bytes([ids[k]]))
        spans.append((at, at + n))
        at += n
    text = tokenizer.decode_bytes(ids[start:end])
    section = tokenizer.token_id("<|tool_calls_section_begin|>")
    calls_at = next((spans[k - start][0] for k in range(start, end) if ids[k] == section), len(text))
    known = [d.encode() for d in declared]
    out = set()
    for name in map(str.encode, names):  # whole words only: "add" is not a mention inside "address"
        found = [m.start() for m in re.finditer(rb"(?<![\w])" + re.escape(name) + rb"(?![\w])", text)]
        said = [o for o in found if o < calls_at][-1:] or [o for o in found if o >= calls_at][:1]
        for o in said:
            k = next((k for k, (_, e) in enumerate(spans) if e > o and (e - o > len(name) or not any(
                d.startswith(name[:e - o]) for d in known))), None)
            if k is not None:  # None: the turn ends inside a name some declared one begins with
                out.add(start + k)
    return sorted(out)


def encode_with_mask(tokenizer, messages: list[dict], tools: list[dict] | None = None, template: str | None = None,
                     avoid_refused: bool = False, **variables) -> tuple[list[int], list[int]]:
    """(ids, mask) of one conversation, rendered without a generation prompt; mask[i] = 1 where ids[i]
    is a token of an assistant message of weight 1, and with `avoid_refused` AVOID_MARK where it is the
    token to avoid in a refused call (see the module docstring)."""
    from openk2.tokenizer.chat import assign_tool_call_ids
    messages = assign_tool_call_ids(messages)

    enc = chat_encoder(tokenizer, messages, tools, template, **variables)
    ids = enc(len(messages), False)
    mask = [0] * len(ids)
    declared = declared_names(tools)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("the conversation opens with an assistant message; it needs a system or user turn first")
        weight = weight_of(message, f"message {i}")
        refused = [c["function"]["name"] for c in message.get("tool_calls") or []
                   if c["function"]["name"] not in declared] if avoid_refused and declared and not weight else []
        if not weight and not refused:
            continue  # a turn at weight 0 keeps mask 0: no need to render it to find its span
        head, upto = enc(i, True), enc(i + 1, False)
        if upto[:len(head)] != head or ids[:len(upto)] != upto:
            if refused:
                continue  # a refused turn the template renders otherwise later: left unmarked, as without the flag
            raise ValueError(f"the chat template renders the turns before message {i} differently once later "
                             "turns follow, so no single sequence trains every assistant turn; split the "
                             "conversation into one example per assistant turn")
        if weight:
            mask[len(head):len(upto)] = [1] * (len(upto) - len(head))
        else:
            for k in avoid_positions(tokenizer, ids, len(head), len(upto), refused, declared):
                mask[k] = AVOID_MARK
    return ids, mask
