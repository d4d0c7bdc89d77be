"""K2-Thinking's reasoning: a reply's opening `<think>…</think>` -> `reasoning_content`, the rest ->
content and tool calls (toolcalls.py). Whole (`split_reasoning`, the reference) or streaming
(`ReasoningStream`); `ReplyStream` chains the streaming splitter and `StreamingToolParser` into
OpenAI deltas. Rendering reasoning back into a prompt is the chat template's (chat.py, §6.1).

Rules (K2-SPEC §6.1; the decisions checked against vLLM's and SGLang's `kimi_k2` reasoning parsers):
- A reply holds reasoning only if it opens with `<think>`, or if the prompt already opened the block
  (`inside`: a template whose generation prompt ends with `<think>`; K2-Thinking's does not). Any other
  reply is all rest, as SGLang has it (vLLM would call a reply without tags all reasoning).
- Reasoning ends at the first `</think>` (dropped) or the first `<|tool_calls_section_begin|>` (kept:
  it opens the rest), whichever comes first: K2-Thinking sometimes calls tools from inside its
  thinking, and both peers end reasoning at the section. (Their whole-text parsers look for
  `</think>` first, and so bury such calls in reasoning when a `</think>` follows; here the whole and
  streaming paths agree.) A `</think>` after that is content text.
- No end: the reply was cut off while thinking; all of it is reasoning, the rest is empty (both peers).
- Nothing is trimmed: the template renders `<think>{reasoning}</think>{content}` back verbatim.
"""

from __future__ import annotations

from openk2.tokenizer.chat import END_THINK, SECTION_BEGIN, THINK
from openk2.tokenizer.toolcalls import MAX_CALLS, StreamingToolParser, earliest, partial_marker

ENDS = (END_THINK, SECTION_BEGIN)  # what ends reasoning
CHOICES = ("auto", "kimi_k2", "none")  # `--reasoning-parser`


def reasoning_enabled(choice: str, template: str | None) -> bool:
    """`--reasoning-parser`: kimi_k2 on, none off, auto on when the checkpoint's template writes `<think>`
    (K2-Thinking's does; K2-Instruct's and the built-in v2 one do not)."""
    if choice not in CHOICES:
        raise ValueError(f"reasoning parser {choice!r}: expected one of {', '.join(CHOICES)}")
    return choice == "kimi_k2" or (choice == "auto" and template is not None and THINK in template)


def cut_at_end(text: str, i: int, marker: str) -> tuple[str, str]:
    """(reasoning, rest) around the end marker at `i`: `</think>` is dropped, a section begin kept."""
    return text[:i], text[i + len(END_THINK):] if marker == END_THINK else text[i:]


def split_reasoning(text: str, inside: bool = False) -> tuple[str | None, str]:
    """(reasoning, rest) of a whole reply; reasoning None when the reply has no reasoning block.
    `inside`: the prompt ended with `<think>`, so the reply starts within the block."""
    if not inside:
        if not text.startswith(THINK):
            return None, text
        text = text[len(THINK):]
    end = earliest(text, ENDS, 0)  # where reasoning ends: (position, marker)
    return cut_at_end(text, *end) if end else (text, "")


START, THINKING, REST = "start", "thinking", "rest"


class ReasoningStream:
    """Feed a reply in pieces; each `feed` gives (reasoning, rest) text, either possibly "". Held back:
    a start that may still become `<think>`, an end that may still become `</think>` or a section
    begin. The concatenations equal `split_reasoning` of the whole reply (tests/test_reasoning.py)."""

    def __init__(self, inside: bool = False):
        self.state, self.buf = THINKING if inside else START, ""

    def feed(self, text: str) -> tuple[str, str]:
        if self.state == REST:
            return "", text
        self.buf += text
        if self.state == START:
            if not self.buf.startswith(THINK):
                if THINK.startswith(self.buf):
                    return "", ""  # "<thi" may still be the opening
                self.state, rest, self.buf = REST, self.buf, ""
                return "", rest
            self.state, self.buf = THINKING, self.buf[len(THINK):]
        if end := earliest(self.buf, ENDS, 0):
            self.state, (reasoning, rest), self.buf = REST, cut_at_end(self.buf, *end), ""
            return reasoning, rest
        keep = partial_marker(self.buf, ENDS)
        reasoning, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return reasoning, ""

    def finish(self) -> tuple[str, str]:
        """End of the reply: what was held goes out (a reply cut off while thinking is all reasoning)."""
        text, self.buf = self.buf, ""
        return (text, "") if self.state == THINKING else ("", text)


class ReplyStream:
    """A reply in pieces -> OpenAI deltas: `{"reasoning_content": …}` while it thinks (when `reasoning`),
    then `{"content": …}` and tool calls (through `StreamingToolParser` when `tools`). After `finish`,
    `finish_reason` and `errors` are those of the whole reply."""

    def __init__(self, reasoning: bool = False, tools: bool = False, inside: bool = False, max_calls: int = MAX_CALLS):
        self.thinking = ReasoningStream(inside) if reasoning else None
        self.tools = StreamingToolParser(max_calls) if tools else None
        self.finish_reason, self.errors = None, []

    def feed(self, text: str) -> list[dict]:
        return self._deltas(*(self.thinking.feed(text) if self.thinking else ("", text)))

    def finish(self, engine_reason: str = "stop") -> list[dict]:
        deltas = self._deltas(*self.thinking.finish()) if self.thinking else []
        if self.tools is None:
            self.finish_reason = engine_reason
            return deltas
        deltas += self.tools.finish(engine_reason)
        self.finish_reason, self.errors = self.tools.finish_reason, self.tools.errors
        return deltas

    def _deltas(self, reasoning: str, rest: str) -> list[dict]:
        deltas = [{"reasoning_content": reasoning}] if reasoning else []
        if self.tools is not None:
            return deltas + (self.tools.feed(rest) if rest else [])
        return deltas + ([{"content": rest}] if rest else [])
