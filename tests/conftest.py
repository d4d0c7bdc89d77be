"""Shared fixtures. `tool_model`: a tiny K2 (byte-level text) taught, in a few seconds of training here,
one file task: called with the `read_file` tool, it asks for notes.txt, then answers from the result.
A random model writes no tool calls; this one does, so the agent tests can drive the real engine, the
real server and the CLI end to end and know what a correct episode looks like."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

SYSTEM, TASK, NOTES = "Use tools.", "What is in notes.txt?", "hello from notes"
ANSWER = f"It says: {NOTES}"
CALL = {"id": "functions.read_file:0", "type": "function",
        "function": {"name": "read_file", "arguments": '{"path": "notes.txt"}'}}


def tool_dialog(tools):
    """The two model calls of the task: (messages, the reply the model must write) each."""
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
    reply1 = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.read_file:0<|tool_call_argument_begin|>"
              '{"path": "notes.txt"}<|tool_call_end|><|tool_calls_section_end|><|im_end|>')
    second = first + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                      {"role": "tool", "tool_call_id": CALL["id"], "name": "read_file", "content": f"     1\t{NOTES}"}]
    return [(first, reply1), (second, ANSWER + "<|im_end|>")]


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory):
    from openk2.agent.files import Workspace
    from openk2.checkpoint import save_hf
    from openk2.config import PRESETS
    from openk2.model import build_model
    from openk2.model.transformer import lm_loss
    from openk2.server.chat_format import ChatFormat

    root = tmp_path_factory.mktemp("tool_model")
    (root / "ws").mkdir()
    (root / "ws" / "notes.txt").write_text(NOTES + "\n")
    tools = [t.schema() for t in Workspace(root / "ws").tools() if t.name == "read_file"]
    cfg = dataclasses.replace(PRESETS["k2-tiny"], max_position_embeddings=1024)
    model = build_model(cfg, seed=0)
    fmt = ChatFormat.for_model(model)
    rows = []
    for messages, reply in tool_dialog(tools):
        prompt, target = fmt.prompt(messages, tools).ids, fmt.tokenizer.encode(reply, allow_special=True)
        rows.append((prompt + target, len(prompt)))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (seq, n_prompt) in enumerate(rows):
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, n_prompt - 1:len(seq) - 1] = torch.tensor(seq[n_prompt:])  # predict the reply only
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(400):
        loss = lm_loss(model(ids), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    assert loss.item() < 0.05, f"the tool model did not learn its task (loss {loss.item():.3f})"
    model.eval()
    folder = save_hf(model, root / "model", progress=False)
    return SimpleNamespace(model=model, fmt=fmt, tools=tools, folder=folder, workspace=root / "ws",
                           dialog=tool_dialog(tools), steps=step + 1)


@pytest.fixture
def cpu_kernels():
    """openk2's CPU kernels (openk2.kernels) must build wherever their tools are (a C++ compiler and
    ninja: here and in CI); without them the decode step uses its fused loops, and this skips."""
    import shutil

    from openk2 import kernels
    if not (shutil.which("ninja") and (shutil.which("c++") or shutil.which("g++"))):
        pytest.skip("no C++ compiler or ninja: the decode step uses its fused loops")
    assert kernels.load()
