"""Chat completions in ids, without HTTP: messages (+ tools, tool_choice) -> the prompt's token ids,
sampling parameters with the server's defaults, and generated text -> the assistant message.

The HTTP app (app.py) and the in-process agent client (`openk2.agent.client.EngineClient`) both go
through `ChatFormat`, so one conversation gets the same ids, the same sampling and the same parsed
reply either way. tool_choice "required" or a named function forces a call by ending the prompt with
the call's opening markers; the same prefix goes before the generated text when parsing. A grammar
(constrain.py; forced calls, `response_format`, `strict` tools) goes from the prompt to `sampling`.
A reasoning parser (K2-Thinking) splits replies into `reasoning_content` and the rest (reasoning.py);
`stream_parser` gives a reply's deltas as it comes. Not here: HTTP, pydantic, the engine itself.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from openk2.engine.sampler import SamplingParams
from openk2.sampling import API_MAX_TOKENS, API_TEMPERATURE, TOP_P_OFF
from openk2.server import constrain
from openk2.server.detokenizer import Detokenizer
from openk2.tokenizer import Tokenizer, load_chat_template, parse_tool_calls
from openk2.tokenizer.chat import ARGUMENT_BEGIN, CALL_BEGIN, SECTION_BEGIN, THINK, template_variables
from openk2.tokenizer.protect import encode_chat, protector
from openk2.tokenizer.reasoning import ReplyStream, reasoning_enabled, split_reasoning
from openk2.tokenizer.toolcalls import MAX_CALLS, NAME, finish_reason

TOOL_NAME = re.compile(rf"(?=.{{1,64}}\Z){NAME}", re.ASCII)  # what toolcalls.CALL_ID reads back, ASCII


class ChatError(ValueError):
    """A request that cannot be served as given; `param` names the field at fault (a 400 over HTTP)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    prefix: str  # forced tool-call opening (already in `ids`); the reply is parsed as prefix + text
    use_tools: bool  # parse tool calls out of the reply
    inside: bool = False  # the prompt ends with `<think>`: the reply starts within its reasoning
    grammar: object | None = None  # constrain.Grammar the reply must follow, if any
    max_calls: int = MAX_CALLS  # tool calls kept per reply (1 without parallel_tool_calls)


@dataclass(frozen=True)
class Reply:
    message: dict  # the OpenAI assistant message: role, content, reasoning_content, tool_calls (when any)
    finish_reason: str
    errors: list[str] = field(default_factory=list)  # what the tool-call parser met (`ParseError`s)


def forced_prefix(tool_choice, tools: list[dict] | None, messages: list[dict]) -> str:
    """The opening markers that force a tool call ("" for None/"auto"/"none"): a named function gets
    its whole call header, with the index of the dialog's next call (K2-SPEC §6.2); "required" stops
    after `functions.`, so the model picks the name."""
    if tool_choice in (None, "auto", "none"):
        return ""
    if not tools:
        raise ChatError(f"tool_choice {json.dumps(tool_choice)} needs `tools`", "tool_choice")
    if tool_choice == "required":
        return SECTION_BEGIN + CALL_BEGIN + "functions."
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not name:
        raise ChatError('tool_choice must be "auto", "none", "required" or {"type": "function", '
                        '"function": {"name": ...}}', "tool_choice")
    if name not in [t.get("function", {}).get("name") for t in tools]:
        raise ChatError(f"tool_choice names `{name}`, which is not in `tools`", "tool_choice")
    return SECTION_BEGIN + CALL_BEGIN + f"functions.{name}:{next_call_index(messages)}" + ARGUMENT_BEGIN


def check_tool_names(tools: list[dict] | None) -> None:
    """Tool names the K2 call ids can carry and the parser reads back (`functions.NAME:IDX`), else a 400."""
    for i, tool in enumerate(tools or []):
        name = (tool.get("function") or {}).get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise ChatError(f"tools[{i}].function.name must be 1-64 letters, digits, `_` or `-`, dot-separated; got "
                            f"{json.dumps(name)}", f"tools[{i}].function.name")


def next_call_index(messages: list[dict]) -> int:
    """The index of the dialog's next tool call: calls are counted over the whole dialog (K2-SPEC §6.2)."""
    return sum(len(m.get("tool_calls") or []) for m in messages if m["role"] == "assistant")


@dataclass(frozen=True)
class ChatFormat:
    """One model's chat: tokenizer, template, context, stop ids and sampling defaults."""
    tokenizer: Tokenizer
    context: int
    vocab_size: int
    template: str | None = None  # a checkpoint's jinja template; None: the built-in K2 v2 renderer
    template_vars: dict = field(default_factory=dict)
    default_temperature: float = API_TEMPERATURE
    default_max_tokens: int = API_MAX_TOKENS
    reasoning: bool = False  # K2-Thinking's `<think>` blocks: parsed out of replies, rendered back

    @classmethod
    def for_model(cls, model, tokenizer=None, path: str | Path | None = None, reasoning_parser: str = "auto",
                  **defaults) -> ChatFormat:
        """The chat of `model`, with the folder's template if it ships one (`reasoning_parser`: reasoning.py).
        Without a tokenizer, text is byte-level (ids 0..255 bytes, 256.. K2's specials): 512 embedding rows."""
        if tokenizer is None:
            tokenizer = Tokenizer.byte_level(model.cfg.vocab_size, str(path))
        folder = Path(path) if path is not None else None
        template = load_chat_template(folder) if folder is not None and folder.is_dir() else None
        variables = template_variables(folder) if template else {}
        return cls(tokenizer, model.cfg.max_position_embeddings, model.cfg.vocab_size, template, variables,
                   **defaults, reasoning=reasoning_enabled(reasoning_parser, template))

    @functools.cached_property  # read by every request's sampling and detokenizer
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(self.tokenizer.token_id(n) for n in ("<|im_end|>", "[EOS]")))

    def encode(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               suffix: str = "") -> list[int]:
        """The conversation's prompt ids; special-token strings inside it are text (protect.py)."""
        try:
            return encode_chat(self.tokenizer, messages, tools, add_generation_prompt, self.template, suffix,
                               builtin_thinking=self.reasoning, **self.template_vars)
        except (ValueError, KeyError, TypeError) as e:
            raise ChatError(f"cannot render the conversation: {e}", "messages") from None

    def prompt(self, messages: list[dict], tools: list[dict] | None = None, tool_choice=None,
               response_format: dict | None = None, parallel_tool_calls: bool | None = True,
               strict_tools: bool = False) -> Prompt:
        """parallel_tool_calls false: at most one call per reply (the grammar's when constrained, else the
        parser's: later calls are dropped and reported). strict_tools: every tool's calls are constrained
        as `"strict": true` would constrain them, while the prompt declares the tools as given."""
        check_tool_names(tools)
        prefix = forced_prefix(tool_choice, tools, messages)
        mask = protector(self.tokenizer).mask  # the prefix's markers are structure; a tool's name is text
        ids = self.encode(messages, tools, suffix=prefix and forced_prefix(mask(tool_choice), mask(tools), messages))
        inside = self.reasoning and not prefix and self.tokenizer.decode(ids[-len(THINK):]).endswith(THINK)
        parallel = parallel_tool_calls is not False
        return Prompt(ids, prefix, bool(tools) and tool_choice != "none", inside,
                      self.grammar(messages, constrain.as_strict(tools) if strict_tools else tools, tool_choice,
                                   response_format, parallel),
                      MAX_CALLS if parallel else 1)

    def grammar(self, messages, tools, tool_choice, response_format, parallel: bool):  # None: free
        try:
            text = constrain.grammar_text(tools, tool_choice, response_format, next_call_index(messages), parallel,
                                          self.reasoning)
        except constrain.BadConstraint as e:
            raise ChatError(str(e), e.param) from None
        return text and constrain.compile_grammar(self.tokenizer, self.vocab_size, self.stop_ids, text)

    def sampling(self, n_prompt: int, temperature: float | None = None, top_p: float | None = None,
                 max_tokens: int | None = None, seed: int | None = None, param: str = "messages",
                 grammar=None) -> SamplingParams:
        """The engine's parameters for a prompt of `n_prompt` ids: the request's, else the defaults;
        max_tokens defaults to what the context leaves (at most `default_max_tokens`)."""
        if not n_prompt:
            raise ChatError("the prompt is empty", param)
        if n_prompt >= self.context:
            raise ChatError(f"the prompt is {n_prompt} tokens; the context is {self.context}", param,
                            "context_length_exceeded")
        return SamplingParams(temperature=self.default_temperature if temperature is None else temperature,
                              top_p=TOP_P_OFF if top_p is None else top_p,
                              max_tokens=max_tokens or min(self.default_max_tokens, self.context - n_prompt),
                              stop_token_ids=self.stop_ids, seed=seed, grammar=grammar)

    def detokenizer(self, stop_strings=()) -> Detokenizer:
        return Detokenizer(self.tokenizer, self.stop_ids, list(stop_strings))

    def reply(self, text: str, prompt: Prompt, engine_reason: str) -> Reply:
        """The assistant message of generated `text` (after the prompt's forced prefix)."""
        text = prompt.prefix + text
        reasoning, text = split_reasoning(text, prompt.inside) if self.reasoning else (None, text)
        message = {"role": "assistant", "content": text, **({"reasoning_content": reasoning} if reasoning else {})}
        if not prompt.use_tools:
            return Reply(message, engine_reason)
        parsed = parse_tool_calls(text, prompt.max_calls)
        message["content"] = parsed.content
        if parsed.tool_calls:
            message["tool_calls"] = [c.to_dict() for c in parsed.tool_calls]
        return Reply(message, finish_reason(engine_reason, bool(parsed.tool_calls)), list(parsed.errors))

    def stream_parser(self, prompt: Prompt) -> ReplyStream:
        """The streaming twin of `reply`: feed it the prompt's prefix, then the text as it comes."""
        return ReplyStream(self.reasoning, prompt.use_tools, prompt.inside, prompt.max_calls)
