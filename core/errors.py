"""User mistakes as one error type, and paths shown the way the user would type them."""
from __future__ import annotations

from pathlib import Path


class PackError(Exception):
    """A user mistake. Carries every problem found; the CLI prints them and exits 2, no traceback."""

    def __init__(self, problems: list[str] | str, header: str = "the domain pack has problems"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.header = header
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1:
            return f"error: {self.problems[0]}"
        lines = [f"error: {self.header} ({len(self.problems)}):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def show_path(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
