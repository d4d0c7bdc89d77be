"""Built-in file tools over one workspace directory: read, write, edit, list and search files.

Every path is taken relative to the workspace and resolved (symlinks followed) before use; one that
lands outside the workspace is refused, so `../`, absolute paths and links out all fail the same way.
Writes and edits need approval in the terminal (`needs_approval`); reads do not. Code execution is
sandbox.py's.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from openk2.agent.tools import Tool, tool

MAX_READ_LINES, MAX_MATCHES, MAX_LIST = 2000, 200, 500


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
            lines = ws.path(path).read_text("utf-8", errors="replace").splitlines()
            shown = lines[max(offset, 1) - 1:max(offset, 1) - 1 + limit]
            body = "\n".join(f"{i:6d}\t{line}" for i, line in enumerate(shown, max(offset, 1)))
            more = len(lines) - (max(offset, 1) - 1 + len(shown))
            return body + (f"\n… {more} more lines (use offset)" if more > 0 else "") if lines else "(empty file)"

        @tool(needs_approval=True)
        def write_file(path: str, content: str) -> str:
            """Create or overwrite a text file of the workspace (parent directories are created).

            Args:
                path: file path relative to the workspace
                content: the whole new content
            """
            p = ws.path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(content, "utf-8")
            return f"wrote {len(content.encode())} bytes to {ws.show(p)}"

        @tool(needs_approval=True)
        def edit_file(path: str, old: str, new: str) -> str:
            """Replace one exact occurrence of `old` by `new` in a workspace file.

            Args:
                path: file path relative to the workspace
                old: the text to replace; it must occur exactly once
                new: the replacement
            """
            p = ws.path(path)
            text = p.read_text("utf-8")
            if (n := text.count(old)) != 1:
                raise ValueError(f"`old` occurs {n} times in {path}; it must occur exactly once")
            p.write_text(text.replace(old, new), "utf-8")
            return f"edited {ws.show(p)}"

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
        def search_files(regex: str, path: str = ".", pattern: str = "*") -> str:
            """Search workspace files for a regular expression; lines as path:line: text.

            Args:
                regex: Python regular expression
                path: directory or file relative to the workspace
                pattern: shell-style file-name filter, e.g. *.py
            """
            rx, hits = re.compile(regex), []
            for p in ws.files(ws.path(path), pattern):
                for i, line in enumerate(p.read_text("utf-8", errors="replace").splitlines(), 1):
                    if rx.search(line):
                        hits.append(f"{ws.show(p)}:{i}: {line.strip()[:200]}")
                        if len(hits) >= MAX_MATCHES:
                            return "\n".join(hits + [f"(stopped at {MAX_MATCHES} matches)"])
            return "\n".join(hits) or "(no matches)"

        return [read_file, write_file, edit_file, list_files, search_files]
