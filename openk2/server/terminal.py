"""`openk2 chat PATH`: a chat in the terminal on the Engine (no HTTP), for a person trying a model.

The dialog is rendered with the checkpoint's chat template (or K2's built-in one) every turn, the
reply streams as it is generated (text tokens only) and ends at `<|im_end|>` / `[EOS]`; `/reset` clears the history,
`/exit` (or end of input) leaves. No fastapi here: it needs only the core install.
"""

import sys

from openk2.engine import Engine, SamplingParams
from openk2.server.detokenizer import Detokenizer
from openk2.tokenizer.protect import encode_chat


def chat(model, tokenizer, template=None, variables=None, temperature: float = 0.6, max_tokens: int = 512,
         input_fn=input, out=sys.stdout, engine: Engine | None = None) -> list[dict]:
    """Run the loop; returns the final history (for tests)."""
    engine = engine or Engine(model, cache_tokens=model.cfg.max_position_embeddings)
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
        ids = encode_chat(tokenizer, history, template=template, **(variables or {}))  # what you type is text
        budget = min(max_tokens, model.cfg.max_position_embeddings - len(ids))
        if budget < 1:
            history.pop()
            out.write("(the dialog fills the context: /reset to start again)\n")
            continue
        req = engine.add_request(ids, SamplingParams(temperature=temperature, top_p=0.95, max_tokens=budget,
                                                     stop_token_ids=stops))
        detok, reply = Detokenizer(tokenizer, hidden, []), []
        out.write("k2> ")
        for i, tok in enumerate(engine.stream(req)):  # the last token flushes a split character
            reply.append(detok.add(tok, final=req.finished and i == len(req.output) - 1))
            out.write(reply[-1])
            out.flush()
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
    return history
