"""Built-in file tools over one workspace directory: read, write, edit, list and search files.

Every path is taken relative to the workspace and resolved (symlinks followed) before use; one that
lands outside the workspace is refused, so `../`, absolute paths and links out all fail the same way.
Only regular files are read or written (a FIFO would block a worker thread for good) and binary files
are named rather than shown; the regex search is search.py's. Writes and edits need approval
in the terminal (`needs_approval`); reads do not. Code execution is sandbox.py's.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from pathlib import Path

from openk2.agent.search import search_lines
from openk2.agent.tools import Tool, ToolError, tool

MAX_READ_LINES, MAX_MATCHES, MAX_LIST = 2000, 200, 500
SEARCH_MAX_BYTES = 8 << 20  # larger files are skipped by the search
def open_regular(p: Path, mode: str = "rb"):
    """`p` opened, if it is a regular file (checked on the open descriptor, not the name)."""
    fd = os.open(p, (os.O_RDONLY if mode == "rb" else os.O_WRONLY | os.O_CREAT | os.O_TRUNC) | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ToolError(f"{p.name} is not a regular file")
    return os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {}))


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise ValueError(f"the workspace {root} is not a directory")

    def path(self, relative: str) -> Path:
        """`relative` inside the workspace, or PermissionError."""
        p = (self.root / relative).resolve()
        if not p.is_relative_to(self.root):
            raise PermissionError(f"{relative!r} is outside the workspace")
        return p

    def show(self, p: Path) -> str:
        return str(p.relative_to(self.root)) or "."

    def files(self, start: Path, glob: str):
        """Files under `start` matching `glob`, skipping hidden directories, in a stable order."""
        for p in sorted(start.rglob("*") if start.is_dir() else [start]):
            rel = p.relative_to(self.root).parts
            hidden = any(x.startswith(".") for x in rel[:-1])
            inside = p.resolve().is_relative_to(self.root)  # a link out is not listed either
            if inside and not hidden and p.is_file() and fnmatch.fnmatch(p.name, glob):
                yield p

    def read(self, path: str) -> str:
        with open_regular(self.path(path)) as f:
            data = f.read()
        if b"\0" in data[:8192]:
            raise ToolError(f"{path} is a binary file ({len(data)} bytes)")
        return data.decode("utf-8", errors="replace")

    def write(self, path: str, text: str) -> Path:
        p = self.path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open_regular(p, "w") as f:
            f.write(text)
        return p

    async def search(self, regex: str, path: str, pattern: str) -> str:
        files = [p for p in self.files(self.path(path), pattern) if p.stat().st_size <= SEARCH_MAX_BYTES]
        return await search_lines(regex, files, self.root, MAX_MATCHES)

    def tools(self) -> list[Tool]:
        ws = self

        @tool
        def read_file(path: str, offset: int = 1, limit: int = MAX_READ_LINES) -> str:
            """Read a text file of the workspace, as numbered lines.

            Args:
                path: file path relative to the workspace
                offset: first line to show (1-based)
                limit: how many lines to show
            """
            lines, first = ws.read(path).splitlines(), max(offset, 1)
            shown = lines[first - 1:first - 1 + limit]
            body = "\n".join(f"{i:6d}\t{line}" for i, line in enumerate(shown, first))
            more = len(lines) - (first - 1 + len(shown))
            return body + (f"\n… {more} more lines (use offset)" if more > 0 else "") if lines else "(empty file)"

        @tool(needs_approval=True)
        def write_file(path: str, content: str) -> str:
            """Create or overwrite a text file of the workspace (parent directories are created).

            Args:
                path: file path relative to the workspace
                content: the whole new content
            """
            return f"wrote {len(content.encode())} bytes to {ws.show(ws.write(path, content))}"

        @tool(needs_approval=True)
        def edit_file(path: str, old: str, new: str) -> str:
            """Replace one exact occurrence of `old` by `new` in a workspace file.

            Args:
                path: file path relative to the workspace
                old: the text to replace; it must occur exactly once
                new: the replacement
            """
            text = ws.read(path)
            if (n := text.count(old)) != 1:
                raise ToolError(f"`old` occurs {n} times in {path}; it must occur exactly once")
            return f"edited {ws.show(ws.write(path, text.replace(old, new)))}"

        @tool
        def list_files(path: str = ".", pattern: str = "*") -> str:
            """List the files under a workspace directory (recursively; hidden directories skipped).

            Args:
                path: directory relative to the workspace
                pattern: shell-style file-name filter, e.g. *.py
            """
            found = list(ws.files(ws.path(path), pattern))
            lines = [f"{ws.show(p)}  ({p.stat().st_size} bytes)" for p in found[:MAX_LIST]]
            return "\n".join(lines + ([f"… {len(found) - MAX_LIST} more"] if len(found) > MAX_LIST else [])) \
                or "(no files)"

        @tool
        async def search_files(regex: str, path: str = ".", pattern: str = "*") -> str:
            """Search workspace text files for a regular expression; lines as path:line: text.

            Args:
                regex: Python regular expression
                path: directory or file relative to the workspace
                pattern: shell-style file-name filter, e.g. *.py
            """
            return await ws.search(regex, path, pattern)

        return [read_file, write_file, edit_file, list_files, search_files]
