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
import sys
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache

from openk2.tokenizer.chat import render_chat

OPEN, CLOSE = "\ue000", "\ue001"  # private use: no tokenizer gives them meaning
# a conversation's prefixes, a dataset's shared system prompt and tool declarations, a client's history
# sent again each turn: the same texts between control tokens, encoded once. Bytes kept per tokenizer
# (texts and ids, as sys.getsizeof counts them), least recently used out first; one text at most 1/16.
TEXT_CACHE_BYTES = 16 << 20
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
        self.cache, self.cached_bytes, self.lock = OrderedDict(), 0, threading.Lock()  # text -> (ids, bytes)

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

    def plain(self, text: str) -> array:
        """The ids of text between control tokens (sentinels restored), from the cache where it holds
        them. Shared with the cache: read, never change."""
        with self.lock:
            if (hit := self.cache.get(text)) is not None:
                self.cache.move_to_end(text)
                return hit[0]
        ids = array("i", self.tokenizer.encode(self.sentinel.sub(lambda m: self.guarded[int(m[1])], text)))
        size = sys.getsizeof(text) + sys.getsizeof(ids)
        if size <= TEXT_CACHE_BYTES // 16:
            with self.lock:
                if text not in self.cache:
                    self.cache[text], self.cached_bytes = (ids, size), self.cached_bytes + size
                while self.cached_bytes > TEXT_CACHE_BYTES:
                    self.cached_bytes -= self.cache.popitem(last=False)[1][1]
        return ids

    def encode(self, rendered: str) -> list[int]:
        """Ids of a prompt rendered from masked values: its special-token strings as control ids, the
        rest (sentinels restored) as plain text."""
        ids, at = [], 0
        for m in self.candidates.finditer(rendered):
            if m[0] in self.specials:
                ids += self.plain(rendered[at:m.start()])
                ids.append(self.specials[m[0]])
                at = m.end()
        ids += self.plain(rendered[at:])
        return ids


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
