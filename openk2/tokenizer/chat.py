"""K2's chat template: messages (+ tool declarations) -> the prompt string the model reads (K2-SPEC §6).

Two renderers. The built-in one is plain Python and reproduces K2-Instruct's v2 layout (§6.1, the
§6.3 example byte for byte), or with `thinking=True` K2-Thinking's (`<think>…</think>` in every
assistant turn, reasoning kept only after the last plain answer); openk2's own checkpoints use it.
A checkpoint folder that ships a template (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`) is rendered with jinja2 set up as transformers' `apply_chat_template` sets
it up, so a real K2 folder gets the very bytes transformers would give. jinja2 is imported only on that path.
Not here: turning generated text back into content + tool calls (`toolcalls.py`), tokenization.

Notes: v2's tool declaration exists in two reported forms (§6.1, *Unverified*); the built-in
renderer writes the compact `tojson(separators=(',', ':'))` one, reported for the standalone
`chat_template.jinja`. Checkpoint folders with their own template are not affected. The default
system prompt goes in when the first message is not a system one (§6.1's rule). The jinja path is
transformers' plain `apply_chat_template`; a later `tokenization_kimi.py` override that sorts the
keys of `tools` first (§5, *Unverified*) is not applied: sort them before calling if yours does.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

IM_USER, IM_ASSISTANT, IM_SYSTEM = "<|im_user|>", "<|im_assistant|>", "<|im_system|>"
IM_MIDDLE, IM_END = "<|im_middle|>", "<|im_end|>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARGUMENT_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
THINK, END_THINK = "<think>", "</think>"  # K2-Thinking's reasoning block (reasoning.py parses it)
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # what clients call a message's reasoning
DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."
GENERATION_PROMPT = IM_ASSISTANT + "assistant" + IM_MIDDLE
# the special-token attributes transformers hands every template (`special_tokens_map`)
SPECIAL_TOKEN_VARIABLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                           "mask_token")


# ---------------------------------------------------------------- built-in K2 v2 renderer

def content_text(content) -> str:
    """A message's `content` as text: a string as is, None as "", a list of parts concatenated.

    Notes: v1 renders image parts as `<|media_start|>image…` (§6.1); openk2's models read no images
    and those strings are not named tokens, so an image part is an error here rather than a
    placeholder the model was never trained on."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type", "text") == "text":
            parts.append(part["text"])
        else:
            raise ValueError(f"content part of type {part.get('type')!r} is not supported by the built-in "
                             "K2 template (text only); use the checkpoint's own template for media")
    return "".join(parts)


def tool_call_text(call: dict) -> str:
    """One call block: the id as given, arguments verbatim if a string, else as `tojson` writes them."""
    if not call.get("id"):
        raise ValueError(f"tool call {call} has no id; give each one (see assign_tool_call_ids)")
    args = call["function"]["arguments"]
    args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return CALL_BEGIN + call["id"] + ARGUMENT_BEGIN + args + CALL_END


def message_body(message: dict) -> str:
    """What goes between `<|im_middle|>` and `<|im_end|>`."""
    text = content_text(message.get("content"))
    if message["role"] == "assistant" and message.get("tool_calls"):
        return text + SECTION_BEGIN + "".join(map(tool_call_text, message["tool_calls"])) + SECTION_END
    if message["role"] == "tool":
        if not message.get("tool_call_id"):
            raise ValueError("a tool message needs the `tool_call_id` of the call it answers")
        return f"## Return of {message['tool_call_id']}\n{text}"
    return text


def reasoning_of(message: dict) -> str | None:
    """A message's reasoning, under whichever name the client used."""
    return next((message[k] for k in REASONING_KEYS if message.get(k) is not None), None)


def render_message(message: dict, think: str | None = None) -> str:
    """`<|im_X|>{name or role}<|im_middle|>{body}<|im_end|>`; everything not user/assistant is system.
    `think` (not None): the body opens with `<think>{think}</think>` (K2-Thinking's assistant turns)."""
    role = message["role"]
    opener = {"user": IM_USER, "assistant": IM_ASSISTANT}.get(role, IM_SYSTEM)
    thought = "" if think is None else THINK + think + END_THINK
    return opener + (message.get("name") or role) + IM_MIDDLE + thought + message_body(message) + IM_END


def thoughts(messages: list[dict]) -> list[str | None]:
    """K2-Thinking's `<think>` text per message (None: not an assistant turn). Turns up to and including
    the last assistant answer without tool calls get an empty block; later ones (the tool-calling
    steps of the turn in progress) keep their reasoning (§6.1)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant" and not m.get("tool_calls")),
               default=-1)
    return [None if m["role"] != "assistant" else (reasoning_of(m) or "") if i > last else ""
            for i, m in enumerate(messages)]


def render_k2(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
              thinking: bool = False) -> str:
    """K2 v2 layout: tool declaration, default system prompt unless the dialog opens with a system
    message, the turns without separators, the generation prompt (§6.1, §6.3). `thinking`: the
    K2-Thinking layout, i.e. `<think>` blocks (`thoughts`) and the declaration as `tools | tojson()`
    writes it (json.dumps' default separators)."""
    out = []
    if tools:
        declaration = json.dumps(tools, ensure_ascii=False, separators=None if thinking else (",", ":"))
        out.append(IM_SYSTEM + "tool_declare" + IM_MIDDLE + declaration + IM_END)
    if messages and messages[0]["role"] != "system":
        out.append(IM_SYSTEM + "system" + IM_MIDDLE + DEFAULT_SYSTEM_PROMPT + IM_END)
    thinks = thoughts(messages) if thinking else [None] * len(messages)
    out += [render_message(m, t) for m, t in zip(messages, thinks)]
    if add_generation_prompt:
        out.append(GENERATION_PROMPT)
    return "".join(out)


def assign_tool_call_ids(messages: list[dict]) -> list[dict]:
    """A copy in which assistant tool calls lacking an id get `functions.NAME:IDX` (§6.2).

    IDX counts every tool call of the dialog from 0, those that already have ids included, so a
    call gets the index the model itself would have written there. Given ids are kept as they are."""
    out, idx = [], 0
    for message in messages:
        calls = []
        for call in message.get("tool_calls") or []:
            if not call.get("id"):
                call = {**call, "id": f"functions.{call['function']['name']}:{idx}"}
            calls.append(call)
            idx += 1
        out.append({**message, "tool_calls": calls} if message.get("tool_calls") else message)
    return out


# ---------------------------------------------------------------- checkpoint templates (jinja2)

@lru_cache(maxsize=16)
def compile_template(template: str):
    """`template` compiled in a sandboxed jinja2 environment set up as transformers sets up its own.

    Notes: `trim_blocks`/`lstrip_blocks` and the loop-control extension change whitespace and
    syntax; `tojson` must not HTML-escape and keeps non-ASCII (`ensure_ascii=False`), with jinja's
    own default separators; `{% generation %}` blocks (assistant masks in transformers) render
    their body unchanged; `namespace` refuses `_`-names, as transformers' sandbox does."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def namespace(*args, **kwargs):
        attrs = dict(*args, **kwargs)
        if any(isinstance(k, str) and k.startswith("_") for k in attrs):
            raise jinja2.exceptions.SecurityError("namespace attributes may not start with '_'")
        return jinja2.utils.Namespace(attrs)

    class SafeDict:  # `dict(...)` and `dict.fromkeys(...)` without exposing the type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=namespace, dict=SafeDict(),
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as transformers shows them to a template: keys whose value is None dropped, and a
    message's reasoning (under `reasoning_content`, `thinking` or `reasoning`) readable under both
    `reasoning_content` and `thinking`."""
    out = []
    for message in messages:
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = reasoning_of(message)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_template(template: str, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, **variables) -> str:
    """Render a checkpoint's jinja chat template with the variables `apply_chat_template` passes:
    messages, tools, documents (None), add_generation_prompt, then `variables` (special tokens,
    template switches such as `thinking`)."""
    if not messages:
        raise ValueError("cannot render an empty conversation")
    return compile_template(template).render(messages=template_messages(messages), tools=tools, documents=None,
                           add_generation_prompt=add_generation_prompt, **variables)


def render_chat(messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
                template: str | None = None, builtin_thinking: bool = False, **variables) -> str:
    """The prompt for `messages`: a checkpoint's jinja `template` if given (it renders reasoning its own
    way), else the built-in K2 renderer: v2, or K2-Thinking's layout if `builtin_thinking` (it takes
    no extra variables)."""
    if template is not None:
        return render_template(template, messages, tools, add_generation_prompt, **variables)
    if variables:
        raise TypeError(f"the built-in template takes no variables, got {sorted(variables)}")
    return render_k2(messages, tools, add_generation_prompt, builtin_thinking)


def load_chat_template(folder: str | Path) -> str | None:
    """A checkpoint folder's chat template, None if it ships none.

    `chat_template.jinja` wins over `tokenizer_config.json`'s `chat_template` (as in transformers);
    the latter is a string or a list of `{"name", "template"}`, of which "default" is taken."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text("utf-8")
    config = folder / "tokenizer_config.json"
    template = json.loads(config.read_text("utf-8")).get("chat_template") if config.is_file() else None
    if isinstance(template, list):
        named = {t["name"]: t["template"] for t in template}
        if "default" not in named:
            raise ValueError(f"{config}: chat templates {sorted(named)} include no 'default'")
        template = named["default"]
    return template


def template_variables(folder: str | Path) -> dict[str, str]:
    """Special-token variables (`bos_token`, `eos_token`, …) from `tokenizer_config.json`, as
    transformers passes them to every template; entries may be strings or AddedToken dicts."""
    config = Path(folder) / "tokenizer_config.json"
    data = json.loads(config.read_text("utf-8")) if config.is_file() else {}
    out = {}
    for key in SPECIAL_TOKEN_VARIABLES:
        value = data.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None:
            out[key] = str(value)
    return out
