"""Errors the CLI turns into one line each and an exit status.

Exit status: 0 success, 1 a runtime failure, 2 a usage or config error.
"""

from __future__ import annotations

from dataclasses import dataclass


class BuilderError(Exception):
    """A failure at run time (engine, network, files): exit status 1."""

    exit_code = 1

    def lines(self) -> list[str]:
        return [str(self)]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where (file, line, key path) and what."""

    key: str
    message: str
    line: int | None = None
    source: str | None = None

    def __str__(self) -> str:
        if not self.source and not self.key:
            return self.message
        where = self.source or "config"
        if self.line is not None:
            where = f"{where}:{self.line}"
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message}"


class ConfigError(BuilderError):
    """The config or the command line is wrong: exit status 2."""

    exit_code = 2

    def __init__(self, problems: list[Problem] | Problem | str):
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]
