"""A run's record: the source revision, the metrics log (resume-aware) and its last row."""

import json
import subprocess
from pathlib import Path


def git_revision() -> str:
    """`<sha>` or `<sha>+dirty` of the source tree, or "unknown" outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    run = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True)  # noqa: E731
    sha = run("rev-parse", "--short", "HEAD").stdout.strip()
    return (sha + ("+dirty" if run("status", "--porcelain").stdout.strip() else "")) if sha else "unknown"


def final_metrics(out_dir: Path) -> dict:
    """The last logged row of a run (the final step's, with its validation loss)."""
    path = Path(out_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return next((r for r in reversed(rows) if "step" in r), {})


def open_log(path: Path, step: int):
    """metrics.jsonl for appending; on resume, rows past the checkpoint's step (logged by the
    interrupted run after its last checkpoint) are dropped first, so each step appears once. From
    step 0 (a new run, or a resume with no checkpoint to resume from) the log starts empty."""
    if not step:
        return open(path, "w")
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in rows))
    return open(path, "a")
