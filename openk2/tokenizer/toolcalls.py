"""K2's generated text -> `content` + tool calls, whole (`parse_tool_calls`) or streaming
(`StreamingToolParser`, OpenAI chat.completion.chunk deltas). K2-SPEC §6.5.

Grammar, as both parsers read it. Outside a section, text is content; a section opens at
`<|tool_calls_section_begin|>` (or the singular `<|tool_call_section_begin|>` K2 sometimes writes, not
a special token, so it arrives as plain text) and closes at `<|tool_calls_section_end|>` (or
`<|tool_call_section_end|>`); text after it is content again. Inside, a call is `<|tool_call_begin|>`
ID `<|tool_call_argument_begin|>` ARGS, ended by `<|tool_call_end|>` (or, tolerated, by the next call
or the section end). ID and ARGS are whitespace-trimmed. `parse_tool_calls` is the reference; the
streaming parser is the fast path, and tests bind the two on every case (tests/test_chat.py,
tests/test_toolcall_peers.py with vLLM's and SGLang's cases in tests/data/peer_toolcalls.json).

Rules, where the peers (vLLM `kimi_k2`, SGLang `KimiK2Detector`) were read and a choice was made:
- An id is `functions.NAME:INDEX` or `NAME:INDEX`: INDEX an integer, NAME dot-separated runs of word
  characters and `-` (MCP names have them). Anything else (`functions.x.0`, `functions.f:x`, a bare
  `0`, a client-style `call_3`) drops the call. Both peers now guess the name of a bare or foreign id
  from the declared tools' schemas; we do not guess: a wrong guess runs a tool the model did not pick.
- A dotted name is kept whole (`functions.a.b:0` -> `a.b`, as SGLang; vLLM keeps only `b`, a
  different tool), so the name round-trips through the template.
- Arguments are returned as written, as OpenAI's API does, when they are not valid JSON, not an object,
  or cut off by the end of the output; each such call is also reported in `errors`.
- Text after a section end is content (SGLang; vLLM now drops it). Text inside a section but outside a
  call is dropped and reported, however long (SGLang; an older vLLM turned a long run into content).
- K2's `<|…|>` special-token text never reaches `content`: the tool markers (either spelling), the chat
  markers (`<|im_end|>`, `<|im_middle|>`, …, K2-SPEC §5) and `<|reserved_token_N|>` are cut out (both
  peers strip the tool markers). Bracket names (`[EOS]`, `[BOS]`, …) stay: they are ordinary prose.
- Ids are unique within a reply (OpenAI clients match results by id): a repeated id gets the next free
  index of its name, reported. At most `max_calls` calls per reply; later ones are dropped, reported once.
- Streaming sends a call's header once its id is complete, then its arguments as they arrive (as
  OpenAI and both peers do); the reassembled stream equals the whole parse, errors included.
- `index` counts this reply's returned calls from 0, whatever INDEX the model wrote (both peers).
Each entry of `errors` is a `ParseError`: its text, and a `reason` (a metric label, `REASONS`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from openk2.tokenizer.chat import ARGUMENT_BEGIN, CALL_BEGIN, CALL_END, SECTION_BEGIN, SECTION_END
from openk2.tokenizer.tokenizer import K2_SPECIALS

SECTION_BEGINS = (SECTION_BEGIN, "<|tool_call_section_begin|>")
SECTION_ENDS = (SECTION_END, "<|tool_call_section_end|>")
MAX_CALLS = 128  # per reply: a model looping in a section cannot grow a reply without bound
NAME = r"[\w-]+(?:\.[\w-]+)*"  # a tool name as an id carries it: dot-separated runs of word characters, `-`
CALL_ID = re.compile(rf"(?:functions\.)?({NAME}):(\d+)")
# K2's special-token text that content never carries; reserved ids are 163584..163841 (6 digits)
SPECIAL_TEXT = re.compile("|".join(map(re.escape, sorted(
    {*SECTION_BEGINS, *SECTION_ENDS, *(name for name in K2_SPECIALS if name.startswith("<|"))})))
    + r"|<\|reserved_token_\d{1,6}\|>")
SPECIAL_PREFIX = re.compile(r"<(?:\|[a-z0-9_]{0,28}\|?)?\Z")  # text that may still become one of them
REASONS = ("invalid_arguments", "cut_off", "malformed_id", "no_arguments", "duplicate_id", "too_many_calls",
           "stray_text")


@dataclass(frozen=True)
class ToolCall:
    id: str  # as the model wrote it, e.g. "functions.get_weather:0" (renamed only when repeated)
    name: str
    arguments: str  # as written, trimmed; a JSON object unless `errors` says otherwise

    def to_dict(self) -> dict:
        """The OpenAI `tool_calls[]` entry (also what the chat template renders back)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ParseError(str):
    """One problem met while parsing, as text (what clients and logs see), with its `reason`, and
    whether the call is `returned` all the same (in `tool_calls`) or was dropped."""

    def __new__(cls, reason: str, text: str, returned: bool = False):
        self = super().__new__(cls, text)
        self.reason, self.returned = reason, returned
        return self


@dataclass(frozen=True)
class ParsedOutput:
    content: str | None  # None when there is no text outside sections
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[ParseError] = field(default_factory=list)
    truncated: bool = False  # the output ended inside a tool-call section


def strip_special(text: str) -> str:
    return SPECIAL_TEXT.sub("", text)


def arguments_errors(n: int, call: ToolCall, cut: bool = False) -> list[ParseError]:
    """Why call number `n`'s arguments are not a JSON object (the call is returned all the same)."""
    if cut:
        return [ParseError("cut_off", f"tool call {n} ({call.id}): cut off by the end of the output; "
                                      "arguments returned as written", True)]
    try:
        value = json.loads(call.arguments)
    except json.JSONDecodeError as e:
        return [ParseError("invalid_arguments", f"tool call {n} ({call.id}): arguments are not valid JSON "
                                                f"({e}); returned as written", True)]
    if not isinstance(value, dict):
        return [ParseError("invalid_arguments", f"tool call {n} ({call.id}): arguments are not a JSON object; "
                                                "returned as written", True)]
    return []


def stray_text(text: str) -> list[ParseError]:
    """An error for non-whitespace text inside a section but outside any call."""
    return [ParseError("stray_text", f"unexpected text in tool-call section: {text.strip()[:40]!r}")] \
        if text.strip() else []


def dropped(n: int, reason: str, why: str) -> ParseError:
    return ParseError(reason, f"tool call {n}: {why}; dropped")


class Admission:
    """The id rules both parsers apply, in call order: well formed, within `max_calls`, unique."""

    def __init__(self, max_calls: int = MAX_CALLS):
        self.max_calls, self.ids, self.over = max_calls, set(), 0  # over: calls dropped by the bound

    def admit(self, n: int, raw_id: str) -> tuple[ToolCall | None, list[ParseError]]:
        """Call number `n` (counting every call begin) with empty arguments, or None; and its errors."""
        call_id = raw_id.strip()
        if not (m := CALL_ID.fullmatch(call_id)):
            return None, [dropped(n, "malformed_id", f"malformed id {call_id[:60]!r}")]
        if len(self.ids) >= self.max_calls:
            self.over += 1  # one error, for the first call over the bound, however long the run
            why = f"more than {self.max_calls} calls in one reply"
            return None, [dropped(n, "too_many_calls", why)] if self.over == 1 else []
        errors, index = [], int(m[2])
        while call_id in self.ids:
            index += 1
            call_id = f"{m.string[:m.end(1)]}:{index}"
        if call_id != m.string:
            errors.append(ParseError("duplicate_id", f"tool call {n}: id {m.string!r} repeated; renamed {call_id!r}",
                                     True))
        self.ids.add(call_id)
        return ToolCall(call_id, m[1], ""), errors


def finish_reason(engine_reason: str, has_tool_calls: bool) -> str:
    """The response's finish_reason: "length" whenever generation hit max_tokens (calls are still
    returned with it), else "tool_calls" if there are calls, else the engine's reason."""
    if engine_reason == "length":
        return "length"
    return "tool_calls" if has_tool_calls else engine_reason


# ---------------------------------------------------------------- reference: the whole text at once

def alternatives(markers) -> str:
    return "|".join(map(re.escape, markers))


SECTION = re.compile(f"({alternatives(SECTION_BEGINS)})(.*?)({alternatives(SECTION_ENDS)}|\\Z)", re.DOTALL)


def parse_tool_calls(text: str, max_calls: int = MAX_CALLS) -> ParsedOutput:
    """Split generated `text` into content and tool calls (see the module docstring for the rules)."""
    content, calls, errors, truncated, n, at = [], [], [], False, 0, 0
    admission = Admission(max_calls)
    for section in SECTION.finditer(text):
        content.append(strip_special(text[at:section.start()]))
        at, cut = section.end(), not section[3]
        truncated = truncated or cut
        preamble, *chunks = section[2].split(CALL_BEGIN)
        errors += stray_text(preamble)
        for k, chunk in enumerate(chunks):
            last = cut and k == len(chunks) - 1
            raw_id, has_args, rest = chunk.partition(ARGUMENT_BEGIN)
            raw_args, ended, tail = rest.partition(CALL_END)
            if not has_args:
                errors.append(dropped(n, "cut_off", "cut off by the end of the output") if last
                              else dropped(n, "no_arguments", f"no {ARGUMENT_BEGIN}"))
            else:
                call, problems = admission.admit(n, raw_id)
                errors += problems
                if call:
                    calls.append(call := ToolCall(call.id, call.name, raw_args.strip()))
                    errors += arguments_errors(n, call, cut=last and not ended)
                errors += stray_text(tail)
            n += 1
    content.append(strip_special(text[at:]))
    return ParsedOutput("".join(content) or None, calls, errors, truncated)


# ---------------------------------------------------------------- fast path: incremental

OUT, SECTION_STATE, ID, ARGS = "out", "section", "id", "args"
# the markers that end the text of each state; anything else, marker strings included, is text
DELIMITERS = {OUT: SECTION_BEGINS, SECTION_STATE: (CALL_BEGIN, *SECTION_ENDS),
              ID: (ARGUMENT_BEGIN, CALL_BEGIN, *SECTION_ENDS), ARGS: (CALL_END, CALL_BEGIN, *SECTION_ENDS)}
NEXT = {**dict.fromkeys(SECTION_BEGINS, SECTION_STATE), CALL_BEGIN: ID, ARGUMENT_BEGIN: ARGS,
        CALL_END: SECTION_STATE, **dict.fromkeys(SECTION_ENDS, OUT)}
LONGEST = max(map(len, NEXT))


def partial_marker(text: str, markers) -> int:
    """Length of the longest end of `text` that is a proper prefix of one of `markers` (held back)."""
    return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


def partial_special(text: str) -> int:
    """Length of the end of `text`, from its last `<`, that may still become special-token text."""
    at = text.rfind("<")
    return len(text) - at if at >= 0 and SPECIAL_PREFIX.match(text, at) else 0


def earliest(text: str, markers, start: int) -> tuple[int, str] | None:
    """The first occurrence (position, marker) of any of `markers` in `text[start:]`."""
    hits = [(i, m) for m in markers if (i := text.find(m, start)) >= 0]
    return min(hits) if hits else None


class StreamingToolParser:
    """Feed generated text in pieces; get OpenAI deltas: `{"content": …}`, a call's header
    `{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}`
    once its id is complete, then `{"tool_calls": [{"index", "function": {"arguments": fragment}}]}`
    as the arguments arrive (trailing whitespace and a possible partial marker held back).

    After `finish`, `errors`, `truncated` and `finish_reason` hold what `parse_tool_calls` and
    `finish_reason` give for the whole text."""

    def __init__(self, max_calls: int = MAX_CALLS):
        self.state, self.buf, self.scan = OUT, "", 0  # buf: text since the last marker
        self.admission = Admission(max_calls)
        self.n, self.index = 0, 0  # call begins seen, calls returned
        self.call, self.sent = None, 0  # the open call (None while a dropped call's text passes), args sent
        self.errors: list[ParseError] = []
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
        """End of output: flush held text, close a cut call, settle `finish_reason`."""
        deltas = []
        if self.state == OUT:
            deltas = self._content(self.buf)
        else:
            self.truncated = True
            if self.state == SECTION_STATE:
                self.errors += stray_text(self.buf)
            elif self.state == ID:
                self.errors.append(dropped(self.n, "cut_off", "cut off by the end of the output"))
            else:
                deltas = self._end_call(self.buf, cut=True)
        self.buf = ""
        self.finish_reason = finish_reason(engine_reason, self.index > 0)
        return deltas

    def _close(self, text: str, marker: str) -> list[dict]:
        """The text of the current state ended at `marker`: act on it and move to the next state."""
        deltas = []
        if self.state == OUT:
            deltas = self._content(text)
        elif self.state == SECTION_STATE:
            self.errors += stray_text(text)
        elif self.state == ID and marker != ARGUMENT_BEGIN:
            self.errors.append(dropped(self.n, "no_arguments", f"no {ARGUMENT_BEGIN}"))
            self.n += 1
        elif self.state == ID:
            self.call, problems = self.admission.admit(self.n, text)
            self.errors += problems
            self.sent = 0
            deltas = [self._header()] if self.call else []
        else:
            deltas = self._end_call(text)
        self.state = NEXT[marker]
        return deltas

    def _content(self, text: str) -> list[dict]:
        text = strip_special(text)
        return [{"content": text}] if text else []

    def _header(self) -> dict:
        return {"tool_calls": [{"index": self.index, "id": self.call.id, "type": "function",
                                "function": {"name": self.call.name, "arguments": ""}}]}

    def _fragment(self, text: str) -> list[dict]:
        return [{"tool_calls": [{"index": self.index, "function": {"arguments": text}}]}] if text else []

    def _end_call(self, raw_args: str, cut: bool = False) -> list[dict]:
        call, n = self.call, self.n
        self.call, self.n = None, n + 1
        if call is None:  # dropped at its id
            return []
        args = raw_args.strip()
        deltas = self._fragment(args[self.sent:])
        self.errors += arguments_errors(n, ToolCall(call.id, call.name, args), cut)
        self.index += 1
        return deltas

    def _partial(self) -> list[dict]:
        """Emit what is safe of the unfinished text: content minus what may be special-token text; an
        open call's arguments minus trailing whitespace and a possible partial marker."""
        if self.state == OUT:
            keep = partial_special(self.buf)
            text, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
            self.scan = 0
            return self._content(text)
        if self.state == ARGS and self.call:
            text = self.buf.lstrip()
            safe = text[:len(text) - partial_marker(text, DELIMITERS[ARGS])].rstrip()
            deltas, self.sent = self._fragment(safe[self.sent:]), max(self.sent, len(safe))
            return deltas
        return []
