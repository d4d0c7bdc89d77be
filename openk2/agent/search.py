"""Regex search over files in a child process with a time limit: a pattern that backtracks badly
holds the interpreter (Python's `re` keeps the GIL while it matches), so it must not run in ours.
Binary files (a NUL in the first 8 KB) are skipped; lines are read one at a time.
"""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from openk2.agent.tools import ToolError

SEARCH_SECONDS = 20.0
GREP = r"""
import re, sys
rx, limit, root = re.compile(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
hits = 0
for path in filter(None, sys.stdin.read().split("\0")):
    with open(path, "rb") as f:
        if b"\0" in f.read(8192):
            continue  # binary
        f.seek(0)
        for i, raw in enumerate(f, 1):
            line = raw.decode("utf-8", "replace")
            if rx.search(line):
                print(f"{path[len(root) + 1:]}:{i}: {line.strip()[:200]}")
                hits += 1
                if hits >= limit:
                    sys.exit(print(f"(stopped at {limit} matches)"))
"""


async def search_lines(regex: str, files: list[Path], root: Path, limit: int) -> str:
    """Matching lines as `path:line: text` (paths relative to `root`), at most `limit` of them."""
    re.compile(regex)  # a bad pattern fails here, with re's own message
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", "-c", GREP, regex, str(limit), str(root),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        out, _ = await asyncio.wait_for(proc.communicate("\0".join(map(str, files)).encode()), SEARCH_SECONDS)
    except TimeoutError:
        raise ToolError(f"the search ran past {SEARCH_SECONDS:g} s (a pattern that backtracks badly?)") from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return out.decode(errors="replace").rstrip("\n") or "(no matches)"
