"""Token ids to text as it streams: `Detokenizer` holds back what could still change (a UTF-8
character split across tokens, a possible prefix of a stop string). The server (`engine_loop.py`)
and the terminal chat (`terminal.py`) both use it."""

import codecs

from openk2.tokenizer.toolcalls import partial_marker


class Detokenizer:
    """Token ids -> safe text increments: stop ids dropped, split UTF-8 characters and a possible
    prefix of a stop string held back; `stopped` once a stop string appears (the text ends before it).
    Ids the tokenizer has no entry for (a model whose vocabulary is larger than its tokenizer's, such
    as random weights with the byte-level fallback) give no text."""

    def __init__(self, tokenizer, stop_ids, stop_strings: list[str]):
        self.tokenizer, self.stop_ids, self.stop_strings = tokenizer, set(stop_ids), stop_strings
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, tok: int, final: bool = False) -> str:
        if tok not in self.stop_ids and tok < self.tokenizer.n_vocab:
            self.text += self.utf8.decode(self.tokenizer.decode_bytes([tok]))
        if final:
            self.text += self.utf8.decode(b"", final=True)
        hits = [i for s in self.stop_strings if (i := self.text.find(s)) >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text) if final or self.stopped else len(self.text) - partial_marker(self.text, self.stop_strings)
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece
