"""Constrained decoding: the grammar a reply must follow, compiled with llguidance into the per-request
token mask the engine applies before sampling (`openk2.engine.sampler.Constraint`).

The grammars, in llguidance's Lark dialect (K2's markers are special tokens, written `<|name|>`;
`%json{...}` is a JSON value under a schema; K2-SPEC §6):
- tool_choice "required": the prompt already ends with `<|tool_calls_section_begin|><|tool_call_begin|>
  functions.` (chat_format.forced_prefix); the grammar goes on with a declared tool's name, the id's
  index, its arguments under its schema, then up to MAX_CALLS - 1 further calls (none without
  parallel_tool_calls) and the section end. Ids count on from the dialog's calls (§6.2), one per call.
- a named function: the prompt holds the whole call header; its arguments, then the section end (one
  call only, as OpenAI has it).
- response_format json_object / json_schema: the content is that JSON; with tools under "auto" the
  reply may instead be a call section.
- "auto" with a tool marked `"strict": true`: free text, then optionally a call section in which strict
  tools' arguments follow their schemas (the others': any JSON object).
The engine ends a request once its grammar is complete (the section end, the JSON's last brace).
JSON is written in K2's style (`{"a": 1, "b": [2, 3]}`) with no free whitespace, so a model cannot pad
forever. llguidance is imported on the first constrained request only.
Not here: applying the mask (engine/), prompts and replies (chat_format.py).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

import torch

from openk2.tokenizer.chat import ARGUMENT_BEGIN, CALL_BEGIN, CALL_END, END_THINK, SECTION_BEGIN, SECTION_END, THINK

MAX_CALLS = 16  # calls in one forced section: each index is its own rule (ids count up), so a bound
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}


class BadConstraint(ValueError):
    """A request whose constraint cannot be built; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


# ---------------------------------------------------------------- grammars (text)

def json_rule(schema: dict, param: str | None = None, strict: bool = True) -> str:
    """`%json{schema}` in K2's JSON style; with `param`, the schema is checked first (a 400 naming it).
    Not `strict`: keywords llguidance does not implement (`uniqueItems`, `not`, look-arounds in a
    pattern, …) are not enforced instead of refused — a tool declared for `auto` use still works when a
    call to it is forced; `"strict": true` tools and schemas get every keyword or a 400."""
    schema = {**schema, "x-guidance": {**JSON_STYLE, **({} if strict else {"lenient": True})}}
    if param is not None and (error := schema_error(json.dumps(schema))):
        raise BadConstraint(f"invalid JSON schema: {error.strip().splitlines()[0]}", param)
    return "%json " + json.dumps(schema, ensure_ascii=False)


def declared(tools: list[dict], strict_only: bool) -> list[tuple[str, dict, str, bool]]:
    """(name, argument schema, its param, strict) per tool; the declared schema, or any JSON object when
    `strict_only` and the tool is not marked strict."""
    out = []
    for i, tool in enumerate(tools):
        fn, param = tool.get("function") or {}, f"tools[{i}].function"
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadConstraint("every tool needs a `function.name`", f"{param}.name")
        schema = fn.get("parameters") or ANY_OBJECT
        if not isinstance(schema, dict):
            raise BadConstraint("`parameters` must be a JSON schema (an object)", f"{param}.parameters")
        strict = fn.get("strict") is True
        out.append((fn["name"], schema if strict or not strict_only else ANY_OBJECT, f"{param}.parameters", strict))
    return out


def as_strict(tools: list[dict] | None) -> list[dict] | None:
    """`tools`, each marked `"strict": true` (its calls constrained to its schema under "auto")."""
    return tools and [{**t, "function": {**(t.get("function") or {}), "strict": True}} for t in tools]


def section_rules(tools: list[tuple[str, dict, str, bool]], first: int, calls: int) -> list[str]:
    """For K < calls: `head_K`, a call of any of `tools` after its `functions.` (id index first + K) to
    its end marker, and `call_K`, the whole call; `more_K` (1 <= K <= calls): calls K.. and the end."""
    rules = [f"args_{t}: {json_rule(schema, param, strict)}" for t, (_, schema, param, strict) in enumerate(tools)]
    for k in range(calls):
        heads = " | ".join(f"{json.dumps(f'{name}:{first + k}', ensure_ascii=False)} {ARGUMENT_BEGIN} args_{t}"
                           for t, (name, *_) in enumerate(tools))
        rules += [f"head_{k}: ({heads}) {CALL_END}", f'call_{k}: {CALL_BEGIN} "functions." head_{k}']
    rules += [f"more_{k}: call_{k} more_{k + 1} | {SECTION_END}" for k in range(1, calls)]
    return rules + [f"more_{calls}: {SECTION_END}"]


def content_schema(response_format: dict | None) -> dict | None:
    """The JSON schema the content must follow under `response_format` (None: free text)."""
    kind = response_format.get("type") if isinstance(response_format, dict) else response_format
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind != "json_schema":
        raise BadConstraint('response_format.type must be "text", "json_object" or "json_schema"',
                            "response_format.type")
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise BadConstraint("response_format json_schema needs `json_schema.schema`, a JSON schema (an object)",
                            "response_format.json_schema.schema")
    return schema


def grammar_text(tools: list[dict] | None, tool_choice, response_format: dict | None, first: int,
                 parallel: bool = True, reasoning: bool = False) -> str | None:
    """The Lark grammar of the reply after the prompt's forced prefix (chat_format.forced_prefix, which
    has checked tool_choice); None when nothing constrains the reply. `first`: the dialog's next call
    index. `reasoning` (K2-Thinking): an unforced reply may open with a `<think>…</think>` block first."""
    content, calls = content_schema(response_format), MAX_CALLS if parallel else 1
    forced = bool(tools) and tool_choice not in (None, "auto", "none")
    if content is not None and forced:
        raise BadConstraint("response_format cannot apply when tool_choice forces a call (the reply has no "
                            "content)", "response_format")
    if forced and tool_choice == "required":
        return "\n".join(["start: head_0 more_1", *section_rules(declared(tools, False), first, calls)])
    if forced:  # a named function: its arguments (the header is in the prompt), then the ends
        _, schema, param, strict = next(d for d in declared(tools, False) if d[0] == tool_choice["function"]["name"])
        return f"start: {json_rule(schema, param, strict)} {CALL_END} {SECTION_END}"
    usable = tools if tools and tool_choice != "none" else []
    if content is None and not any((t.get("function") or {}).get("strict") is True for t in usable):
        return None
    # one lexeme up to the first `</think>` (a lexeme for the thought alone would never end: llguidance
    # lexes greedily), with no marker text in it
    think = [f"THINK: /{lark(THINK)}(.|\\n)*{lark(END_THINK)}/ & ~/{lark(THINK)}(.|\\n)*{lark(END_THINK)}(.|\\n)+/"
             f" & ~/(.|\\n)*<\\|(.|\\n)*/"] if reasoning else []
    opening = "THINK? " if reasoning else ""
    section = [f"section: {SECTION_BEGIN} call_0 more_1", *section_rules(declared(usable, True), first, calls)]
    if content is None:  # free text holds no marker text: a call written in plain tokens would escape the schema
        return "\n".join([f"start: {opening}TEXT? section?", "TEXT: " + excluding("<|"), *think, *section])
    schema_spec = response_format.get("json_schema") or {}
    strict = response_format["type"] == "json_object" or schema_spec.get("strict") is True
    content_rule = f"content: {json_rule(content, 'response_format.json_schema.schema', strict)}"
    body = "(content | section)" if usable else "content"
    return "\n".join([f"start: {opening}{body}", content_rule, *think, *(section if usable else [])])


def lark(text: str) -> str:
    """`text` as a literal inside a Lark /regex/."""
    return re.escape(text).replace("/", "\\/")


def excluding(*texts: str) -> str:
    """A Lark lexeme: any non-empty text that contains none of `texts` (llguidance's `&` and `~`)."""
    return "/(.|\\n)+/" + "".join(f" & ~/(.|\\n)*{lark(t)}(.|\\n)*/" for t in texts)


# ---------------------------------------------------------------- compiled (llguidance)

@lru_cache(maxsize=256)
def schema_error(schema_json: str) -> str:
    """llguidance's complaint about a JSON schema ("" if it compiles)."""
    import llguidance
    return llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(schema_json))


@lru_cache(maxsize=8)
def lltokenizer(tokenizer, n_vocab: int, stop_ids: tuple[int, ...]):
    """llguidance's view of our tiktoken-format tokenizer over `n_vocab` ids (ids without a token are
    never allowed); the stop ids play EOS (allowed once the grammar may end). About 1 s for K2's vocab."""
    import llguidance

    from openk2.tokenizer.tokenizer import PAT_STR
    return llguidance.LLTokenizer.from_tiktoken(encoder=tokenizer.ranks, special_tokens=tokenizer.special_ids,
                                                pattern=PAT_STR, eos_token=list(stop_ids), n_vocab=n_vocab)


class Grammar:
    """A compiled grammar for one tokenizer (what `SamplingParams.grammar` holds): `start()` gives each
    request (each of n choices) its own matcher."""

    def __init__(self, lltok, text: str, stop_ids: tuple[int, ...]):
        import llguidance
        self.text, self.stop_ids, self.words = text, stop_ids, -(-lltok.vocab_size // 32)
        self.matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_lark(text), log_level=0)
        if self.matcher.is_error():  # schemas were checked one by one: this is a grammar we wrote wrong
            raise RuntimeError(f"constraint grammar failed to compile: {self.matcher.get_error()}")

    def start(self) -> Matcher:
        return Matcher(self.matcher.deep_copy(), self.words, self.stop_ids)


class Matcher:
    """One request's grammar state: the engine's `Constraint`."""

    def __init__(self, matcher, words: int, stop_ids: tuple[int, ...]):
        self.matcher, self.words, self.stop_ids = matcher, words, stop_ids

    def fill(self, row_W: torch.Tensor) -> None:
        if row_W.numel() == self.words:  # the model's vocabulary holds the tokenizer's: straight in
            self.matcher.unsafe_compute_mask_ptr(row_W.data_ptr(), 4 * self.words)
        else:  # a model with fewer rows than the tokenizer has ids (K2: 163,840 < 163,842): cut
            full = torch.zeros(self.words, dtype=torch.int32)
            self.matcher.unsafe_compute_mask_ptr(full.data_ptr(), 4 * self.words)
            row_W.copy_(full[:row_W.numel()])
        if self.matcher.is_error():  # cannot happen when only allowed ids are sampled; end cleanly if it does
            row_W.zero_()
            for t in self.stop_ids:
                bit = 1 << (t % 32)
                row_W[t // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # int32: bit 31 is the sign

    def advance(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()


@lru_cache(maxsize=64)
def compile_grammar(tokenizer, vocab_size: int, stop_ids: tuple[int, ...], text: str) -> Grammar:
    return Grammar(lltokenizer(tokenizer, max(vocab_size, tokenizer.n_vocab), stop_ids), text, stop_ids)
