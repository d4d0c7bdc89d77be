"""`openk2 chat PATH`: a chat in the terminal on the Engine (no HTTP), for a person trying a model.

The dialog is rendered with the checkpoint's chat template (or K2's built-in one) every turn, the
reply streams as it is generated (text tokens only) and ends at `<|im_end|>` / `[EOS]`; `/reset` clears the history,
`/exit` (or end of input) leaves. With `reasoning` (K2-Thinking), the `<think>` text is shown dimmed and
kept apart from the answer (reasoning.py). No fastapi here: it needs only the core install.
"""

import sys

from openk2.engine import Engine, EngineConfig, SamplingParams
from openk2.sampling import CHAT_MAX_TOKENS, CHAT_TOP_P, K2_TEMPERATURE
from openk2.server.detokenizer import Detokenizer
from openk2.tokenizer.chat import THINK
from openk2.tokenizer.protect import encode_chat
from openk2.tokenizer.reasoning import ReasoningStream

DIM, PLAIN = "\x1b[2m", "\x1b[0m"


def chat(model, tokenizer, template=None, variables=None, temperature: float = K2_TEMPERATURE,
         max_tokens: int = CHAT_MAX_TOKENS, input_fn=input, out=sys.stdout, engine: Engine | None = None,
         reasoning: bool = False) -> list[dict]:
    """Run the loop; returns the final history (for tests)."""
    engine = engine or Engine(model, EngineConfig(cache_tokens=model.cfg.max_position_embeddings))
    stops = tuple(tokenizer.token_id(t) for t in ("<|im_end|>", "[EOS]"))
    hidden = range(tokenizer.n_base, tokenizer.n_vocab)  # text only: special and reserved ids are not shown
    history: list[dict] = []
    out.write("openk2 chat — /reset clears the history, /exit leaves\n")
    while True:
        try:
            line = input_fn("you> ").strip()
        except EOFError:
            break
        if line == "/exit":
            break
        if line == "/reset":
            history.clear()
            out.write("(history cleared)\n")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ids = encode_chat(tokenizer, history, template=template, builtin_thinking=reasoning,
                          **(variables or {}))  # what you type is text
        budget = min(max_tokens, model.cfg.max_position_embeddings - len(ids))
        if budget < 1:
            history.pop()
            out.write("(the dialog fills the context: /reset to start again)\n")
            continue
        req = engine.add_request(ids, SamplingParams(temperature=temperature, top_p=CHAT_TOP_P, max_tokens=budget,
                                                     stop_token_ids=stops))
        detok, thought, reply = Detokenizer(tokenizer, hidden, []), [], []
        split = ReasoningStream(tokenizer.decode(ids[-len(THINK):]).endswith(THINK)) if reasoning else None
        out.write("k2> ")
        for i, tok in enumerate(engine.stream(req)):  # the last token flushes a split character
            piece = detok.add(tok, final=req.finished and i == len(req.output) - 1)
            show(out, *(split.feed(piece) if split else ("", piece)), thought, reply)
        show(out, *(split.finish() if split else ("", "")), thought, reply)
        out.write((PLAIN if thought and not reply else "") + "\n")
        history.append({"role": "assistant", "content": "".join(reply),
                        **({"reasoning_content": "".join(thought)} if thought else {})})
    return history


def show(out, reasoning: str, text: str, thought: list[str], reply: list[str]) -> None:
    """Write a piece of the reply and keep it: reasoning dimmed, the answer on a line of its own."""
    if reasoning:
        out.write(("" if thought else DIM) + reasoning)
        thought.append(reasoning)
    if text:
        out.write((PLAIN + "\n" if thought and not reply else "") + text)
        reply.append(text)
    out.flush()
