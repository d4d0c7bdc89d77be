"""Chat prompts in which only the template's structure makes control tokens: a special-token string
inside a message — user or system text, a tool result, a name, call ids and arguments, reasoning, a
tool's declaration — is encoded as plain text, so `<|im_end|><|im_system|>` typed by a user or read
from a file cannot end a turn and open a system one.

How: before rendering, each special-token string found in the conversation's values (and keys) is
swapped for a sentinel of private-use characters, which templates and JSON serialisation pass through
untouched; the template (built-in or a checkpoint's jinja) renders as usual; the special-token strings
in its output are then its own and become control ids, and the text between them is encoded as plain
text with the sentinels turned back into what they stood for.
Notes: a template that slices a value could cut a sentinel in two; no K2 template does.
"""

from __future__ import annotations

import re
from array import array
from functools import lru_cache
from typing import Callable

from openk2.tokenizer.chat import render_chat

OPEN, CLOSE = "\ue000", "\ue001"  # private use: no tokenizer gives them meaning
SHAPES = r"<\|[A-Za-z0-9_]+\|>|\[[A-Za-z_]+\]"  # every K2 special is one of these (checked below)


class Protector:
    """Masks special-token strings in values and encodes rendered prompts, for one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer, self.specials = tokenizer, tokenizer.special_ids  # name -> id
        specials = self.specials
        odd = [re.escape(s) for s in specials if not re.fullmatch(SHAPES, s)]
        self.candidates = re.compile("|".join([SHAPES, *odd]))
        self.guarded = [*specials, OPEN, CLOSE]  # a literal sentinel character is masked too
        self.index = {s: i for i, s in enumerate(self.guarded)}
        self.masks = re.compile("|".join([self.candidates.pattern, OPEN, CLOSE]))
        self.sentinel = re.compile(OPEN + r"(\d+)" + CLOSE)
        # a conversation's prefixes, a dataset's shared system prompt and tool declarations, a client's
        # history sent again each turn: the same text between control tokens, encoded once
        self._cached = lru_cache(maxsize=PLAIN_CACHE)(self._plain)

    def mask(self, value):
        """`value` (str, or dicts and lists of them) with every special-token string a sentinel."""
        if isinstance(value, str):
            return self.masks.sub(lambda m: f"{OPEN}{self.index[m[0]]}{CLOSE}" if m[0] in self.index else m[0],
                                  value)
        if isinstance(value, dict):
            return {self.mask(k): self.mask(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.mask(v) for v in value]
        return value

    def _plain(self, text: str) -> array:
        return array("i", self.tokenizer.encode(self.sentinel.sub(lambda m: self.guarded[int(m[1])], text)))

    def plain(self, text: str) -> array:
        """The ids of text between control tokens (cached up to PLAIN_CHARS characters)."""
        return self._cached(text) if len(text) <= PLAIN_CHARS else self._plain(text)

    def encode(self, rendered: str) -> list[int]:
        """Ids of a prompt rendered from masked values: its special-token strings as control ids, the
        rest (sentinels restored) as plain text."""
        ids, at = [], 0
        for m in self.candidates.finditer(rendered):
            if m[0] in self.specials:
                ids += self.plain(rendered[at:m.start()])
                ids.append(self.specials[m[0]])
                at = m.end()
        return ids + list(self.plain(rendered[at:]))


PLAIN_CACHE, PLAIN_CHARS = 1024, 16384  # texts kept per tokenizer, and the longest kept (~100 MB at worst)


@lru_cache(maxsize=8)
def protector(tokenizer) -> Protector:
    return Protector(tokenizer)


def chat_encoder(tokenizer, messages: list[dict], tools: list[dict] | None = None, template: str | None = None,
                 **variables) -> Callable[..., list[int]]:
    """`enc(k, add_generation_prompt, suffix="")`: `encode_chat` of the first k messages, the values
    masked once for all k (SFT finds each turn's span from the ids of two prefixes)."""
    p = protector(tokenizer)
    masked, masked_tools = p.mask(messages), p.mask(tools) if tools else None

    def enc(k: int, add_generation_prompt: bool, suffix: str = "") -> list[int]:
        rendered = render_chat(masked[:k], tools=masked_tools, add_generation_prompt=add_generation_prompt,
                               template=template, **variables)
        return p.encode(rendered + suffix)
    return enc


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                template: str | None = None, suffix: str = "", **variables) -> list[int]:
    """The prompt ids of `messages` (+ `tools`, then `suffix`, which is structure: a forced call's
    opening markers), special-token strings inside any value encoded as text."""
    return chat_encoder(tokenizer, messages, tools, template, **variables)(len(messages), add_generation_prompt, suffix)
