"""`openk2 agent` as a user runs it: the README's demo (played-back turns, real tools), the interactive
session with approvals and trajectories, and clear one-line errors for bad flags."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from openk2.agent.sandbox import Sandbox

ROOT = Path(__file__).resolve().parents[1]
OPENK2 = os.path.join(os.path.dirname(sys.executable), "openk2")
DEMO = ROOT / "examples" / "agent-demo"


def agent(*args, stdin: str | None = None):
    return subprocess.run([OPENK2, "agent", *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_readme_demo(tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(DEMO / "workspace", ws)
    p = agent("--script", str(DEMO / "turns.json"), "--workspace", str(ws), "--yes", "--no-trajectory",
              "-p", "What is the mean score in scores.csv, and who is best?")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("The mean score is 84.67 over 3 people")
    assert "← read_file: 1 name,score 2 ada,91" in p.stderr and (ws / "stats.py").is_file()
    if Sandbox(ws).isolation_error() is None:
        assert "← run_python: n=3 mean=84.67 best=ada [exit code 0]" in p.stderr
        assert "← run_shell: 4 scores.csv [exit code 0]" in p.stderr
    readme = (ROOT / "README.md").read_text()
    assert "examples/agent-demo/turns.json" in readme and "n=3 mean=84.67 best=ada" in readme


def test_interactive_session_with_approvals_and_trajectories(tmp_path):
    script = tmp_path / "turns.json"
    write = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.write_file:0<|tool_call_argument_begin|>'
             '{"path": "x.txt", "content": "hi"}<|tool_call_end|><|tool_calls_section_end|>')
    script.write_text(json.dumps([write, "Declined, so nothing was written.", write, "Written.", "Forgotten."]))
    (tmp_path / "ws").mkdir()
    trajectory = tmp_path / "runs" / "t.jsonl"
    p = agent("--script", str(script), "--workspace", str(tmp_path / "ws"), "--trajectory", str(trajectory),
              stdin="write it\nn\nagain\ny\n/reset\nthird\n/exit\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("allow write_file? [y]es / [n]o / [a]lways") == 2
    assert "← write_file: Error: the user declined this call." in p.stdout and "(conversation forgotten)" in p.stdout
    assert (tmp_path / "ws" / "x.txt").read_text() == "hi"
    records = [json.loads(line) for line in trajectory.read_text().splitlines()]
    assert [r["stop_reason"] for r in records] == ["answered"] * 3
    assert [r["tool_errors"][0]["kind"] if r["tool_errors"] else None for r in records] == ["declined", None, None]
    assert [m["content"] for m in records[1]["messages"] if m["role"] == "user"] == ["write it", "again"]
    assert [m["content"] for m in records[2]["messages"] if m["role"] == "user"] == ["third"]  # after /reset


@pytest.mark.parametrize("args, message", [
    ([], "give one of a checkpoint PATH, --endpoint URL or --script FILE"),
    (["k2-tiny", "--endpoint", "http://127.0.0.1:9/v1"], "give one of"),
    (["--script", "/nonexistent.json"], "--script /nonexistent.json"),
    (["--script", "{script}", "--tools", "read_file,nope"], "unknown built-in tools ['nope']"),
    (["--script", "{script}", "--workspace", "/nonexistent"], "the workspace /nonexistent is not a directory"),
    (["no-such-model", "-p", "hi"], "neither a preset"),
])
def test_bad_flags_fail_with_one_clear_line(tmp_path, args, message):
    script = tmp_path / "turns.json"
    script.write_text('["hi"]')
    p = agent(*[a.format(script=script) for a in args], "--no-trajectory", stdin="")
    assert p.returncode != 0 and message in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_an_unreachable_endpoint_stops_the_task_with_its_reason(tmp_path):
    p = agent("--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--context-window", "4096", "-p", "hi",
              "--workspace", str(tmp_path), "--no-trajectory")
    assert p.returncode == 1 and "[stopped: model_error — APIConnectionError" in p.stderr, p.stderr
