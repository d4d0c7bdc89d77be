"""Text <-> token ids: K2's tiktoken-format BPE (load K2's folder, or train our own on any corpus),
the chat template (`chat.py`) and the tool-call parser, whole and streaming (`toolcalls.py`)."""

from openk2.tokenizer.chat import load_chat_template, render_chat
from openk2.tokenizer.tokenizer import PAT_STR, Tokenizer
from openk2.tokenizer.toolcalls import StreamingToolParser, parse_tool_calls

__all__ = ["PAT_STR", "Tokenizer", "render_chat", "load_chat_template", "parse_tool_calls", "StreamingToolParser"]
