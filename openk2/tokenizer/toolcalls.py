"""K2's generated text -> `content` + tool calls, whole (`parse_tool_calls`) or streaming
(`StreamingToolParser`, OpenAI chat.completion.chunk deltas). K2-SPEC §6.5.

Grammar, as both parsers read it. Outside a section, text is content and only
`<|tool_calls_section_begin|>` is a marker. Inside, a call is `<|tool_call_begin|>` ID
`<|tool_call_argument_begin|>` ARGS, ended by `<|tool_call_end|>` (or, tolerated, by the next call or
the section end); the section ends at `<|tool_calls_section_end|>`; text after it is content again.
ID and ARGS are whitespace-trimmed. The id is returned as written (the client echoes it, §6.2); the
name is the id without an optional leading `functions.`, up to its last `:`, so `get_weather:0`,
`functions.a.b:3` and out-of-order indices all parse.

Decisions. A call whose arguments are not a JSON object, whose id is malformed, or which the end of
the output cut off is left out of `tool_calls` and reported in `errors`: OpenAI clients `json.loads`
the arguments, so passing such a call on would crash them. Output ending inside a section sets
`truncated`. The streaming parser therefore releases a call only at its end (the header delta, then
its arguments as one fragment), which keeps every stream equal to the whole-text parse;
`stream_arguments=True` streams the arguments as they come, as vLLM does, and equals the whole parse
only where every call is complete and valid. `parse_tool_calls` is the reference; the streaming
parser is the fast path, and tests/test_chat.py binds the two.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from openk2.tokenizer.chat import ARGUMENT_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END


@dataclass(frozen=True)
class ToolCall:
    id: str  # as the model wrote it, e.g. "functions.get_weather:0"
    name: str
    arguments: str  # JSON object text, trimmed

    def to_dict(self) -> dict:
        """The OpenAI `tool_calls[]` entry (also what the chat template renders back)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # None when there is no text outside sections
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    truncated: bool = False  # the output ended inside a tool-call section


def tool_name(call_id: str) -> str:
    """`functions.get_weather:0` -> `get_weather`; tolerant of a missing prefix and dotted names."""
    bare = call_id.removeprefix("functions.")
    return bare.rpartition(":")[0] if ":" in bare else bare


def well_formed(call_id: str) -> bool:
    """Non-empty, a non-empty name, no whitespace and no marker text (it is rendered back verbatim)."""
    return bool(call_id) and "<|" not in call_id and not any(c.isspace() for c in call_id) \
        and bool(tool_name(call_id))


def make_call(n: int, raw_id: str, raw_args: str) -> tuple[ToolCall | None, str | None]:
    """Call number `n` (counting every call begin of the output) from its raw id and argument text:
    the call, or None and the reason it is dropped."""
    call_id, args = raw_id.strip(), raw_args.strip()
    if not well_formed(call_id):
        return None, f"tool call {n}: malformed id {call_id!r}; dropped"
    try:
        value = json.loads(args)
    except json.JSONDecodeError as e:
        return None, f"tool call {n} ({call_id}): arguments are not valid JSON ({e}); dropped"
    if not isinstance(value, dict):
        return None, f"tool call {n} ({call_id}): arguments are not a JSON object; dropped"
    return ToolCall(call_id, tool_name(call_id), args), None


def stray_text(text: str) -> list[str]:
    """An error for non-whitespace text inside a section but outside any call."""
    return [f"unexpected text in tool-call section: {text.strip()[:40]!r}"] if text.strip() else []


def cut_call(n: int) -> str:
    return f"tool call {n}: cut off by the end of the output; dropped"


def finish_reason(engine_reason: str, has_tool_calls: bool) -> str:
    """The response's finish_reason: "length" whenever generation hit max_tokens (complete calls are
    still returned with it), else "tool_calls" if there are calls, else the engine's reason."""
    if engine_reason == "length":
        return "length"
    return "tool_calls" if has_tool_calls else engine_reason


# ---------------------------------------------------------------- reference: the whole text at once

SECTION = re.compile(re.escape(SECTION_BEGIN) + "(.*?)(" + re.escape(SECTION_END) + r"|\Z)", re.DOTALL)


def parse_tool_calls(text: str) -> ParsedOutput:
    """Split generated `text` into content and tool calls (see the module docstring for the rules)."""
    content, calls, errors, truncated, n, at = [], [], [], False, 0, 0
    for section in SECTION.finditer(text):
        content.append(text[at:section.start()])
        at, cut = section.end(), not section[2]
        truncated = truncated or cut
        preamble, *chunks = section[1].split(CALL_BEGIN)
        errors += stray_text(preamble)
        for k, chunk in enumerate(chunks):
            last = cut and k == len(chunks) - 1
            raw_id, has_args, rest = chunk.partition(ARGUMENT_BEGIN)
            raw_args, ended, tail = rest.partition(CALL_END)
            if last and not ended:
                errors.append(cut_call(n))
            elif not has_args:
                errors.append(f"tool call {n}: no {ARGUMENT_BEGIN}; dropped")
            else:
                call, error = make_call(n, raw_id, raw_args)
                calls += [call] if call else []
                errors += [error] if error else []
                errors += stray_text(tail)
            n += 1
    content.append(text[at:])
    return ParsedOutput("".join(content) or None, calls, errors, truncated)


# ---------------------------------------------------------------- fast path: incremental

OUT, SECTION_STATE, ID, ARGS = "out", "section", "id", "args"
# the markers that end the text of each state; anything else, marker strings included, is text
DELIMITERS = {OUT: (SECTION_BEGIN,), SECTION_STATE: (CALL_BEGIN, SECTION_END),
              ID: (ARGUMENT_BEGIN, CALL_BEGIN, SECTION_END), ARGS: (CALL_END, CALL_BEGIN, SECTION_END)}
LONGEST = max(map(len, (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARGUMENT_BEGIN, CALL_END)))


def partial_marker(text: str, markers) -> int:
    """Length of the longest end of `text` that is a proper prefix of one of `markers` (held back)."""
    return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


def earliest(text: str, markers, start: int) -> tuple[int, str] | None:
    """The first occurrence (position, marker) of any of `markers` in `text[start:]`."""
    hits = [(i, m) for m in markers if (i := text.find(m, start)) >= 0]
    return min(hits) if hits else None


class StreamingToolParser:
    """Feed generated text in pieces; get OpenAI deltas: `{"content": …}`, a call's header
    `{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}`
    once, then `{"tool_calls": [{"index", "function": {"arguments": fragment}}]}`.

    After `finish`, `errors`, `truncated` and `finish_reason` hold what `parse_tool_calls` and
    `finish_reason` give for the whole text."""

    def __init__(self, stream_arguments: bool = False):
        self.stream_arguments = stream_arguments
        self.state, self.buf, self.scan = OUT, "", 0  # buf: text since the last marker
        self.n, self.index, self.raw_id, self.sent = 0, 0, "", 0  # call counters, current call
        self.open = False  # live mode: the current call's header went out
        self.errors: list[str] = []
        self.truncated, self.finish_reason = False, None

    def feed(self, text: str) -> list[dict]:
        self.buf += text
        deltas = []
        while hit := earliest(self.buf, DELIMITERS[self.state], self.scan):
            i, marker = hit
            deltas += self._close(self.buf[:i], marker)
            self.buf, self.scan = self.buf[i + len(marker):], 0
        self.scan = max(0, len(self.buf) - LONGEST + 1)
        return deltas + self._partial()

    def finish(self, engine_reason: str = "stop") -> list[dict]:
        """End of output: flush held text, drop a cut call, settle `finish_reason`."""
        deltas = []
        if self.state == OUT:
            deltas = [{"content": self.buf}] if self.buf else []
        else:
            self.truncated = True
            self.errors += stray_text(self.buf) if self.state == SECTION_STATE else [cut_call(self.n)]
        self.buf = ""
        self.finish_reason = finish_reason(engine_reason, self.index > 0)
        return deltas

    def _close(self, text: str, marker: str) -> list[dict]:
        """The text of the current state ended at `marker`: act on it and move to the next state."""
        deltas = []
        if self.state == OUT:
            deltas = [{"content": text}] if text else []
        elif self.state == SECTION_STATE:
            self.errors += stray_text(text)
        elif self.state == ID and marker != ARGUMENT_BEGIN:
            self.errors.append(f"tool call {self.n}: no {ARGUMENT_BEGIN}; dropped")
            self.n += 1
        elif self.state == ID:
            self.raw_id, self.sent, self.open = text, 0, False
            deltas = self._open_live()
        else:
            deltas = self._end_call(text)
        self.state = {SECTION_BEGIN: SECTION_STATE, CALL_BEGIN: ID, ARGUMENT_BEGIN: ARGS,
                      CALL_END: SECTION_STATE, SECTION_END: OUT}[marker]
        return deltas

    def _header(self, call: ToolCall) -> dict:
        return {"tool_calls": [{"index": self.index, "id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": ""}}]}

    def _fragment(self, text: str) -> list[dict]:
        return [{"tool_calls": [{"index": self.index, "function": {"arguments": text}}]}] if text else []

    def _open_live(self) -> list[dict]:
        """Live mode: announce the call as soon as its id is complete (if the id is well formed)."""
        call_id = self.raw_id.strip()
        if not (self.stream_arguments and well_formed(call_id)):
            return []
        self.open = True
        return [self._header(ToolCall(call_id, tool_name(call_id), ""))]

    def _end_call(self, raw_args: str) -> list[dict]:
        call, error = make_call(self.n, self.raw_id, raw_args)
        self.n += 1
        self.errors += [error] if error else []
        if self.open:  # live: header and a prefix of the arguments are out already
            deltas = self._fragment(raw_args.strip()[self.sent:])
            self.index += 1
            return deltas
        if not call:
            return []
        deltas = [self._header(call), *self._fragment(call.arguments)]
        self.index += 1
        return deltas

    def _partial(self) -> list[dict]:
        """Emit what is safe of the unfinished text: content minus a possible partial marker; in
        live mode also the argument text, minus trailing whitespace and a possible partial marker."""
        if self.state == OUT:
            keep = partial_marker(self.buf, DELIMITERS[OUT])
            text, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
            self.scan = 0
            return [{"content": text}] if text else []
        if self.state == ARGS and self.open:
            text = self.buf.lstrip()
            safe = text[:len(text) - partial_marker(text, DELIMITERS[ARGS])].rstrip()
            deltas, self.sent = self._fragment(safe[self.sent:]), max(self.sent, len(safe))
            return deltas
        return []
