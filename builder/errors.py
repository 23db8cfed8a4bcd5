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


def os_error_line(exc: OSError) -> str:
    """One line for an OSError: where, the real cause, and the advice that fits it."""
    import errno

    where = f"{exc.filename}: " if exc.filename else ""
    if exc.filename2:
        where = f"{exc.filename} -> {exc.filename2}: "
    cause = exc.strerror or str(exc) or exc.__class__.__name__
    advice = {
        errno.ENOSPC: "free some space there (or point the path at a larger disk)",
        errno.EDQUOT: "your disk quota is used up: free some space or raise the quota",
        errno.EXDEV: "the two paths are on different filesystems: put them on one",
        errno.EACCES: "check the path's owner and permissions",
        errno.EPERM: "check the path's owner and permissions",
        errno.EROFS: "the filesystem is mounted read-only: remount it read-write or use another path",
        errno.ENOENT: "check that the path exists",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EISDIR: "the path is a folder, a file was expected",
        errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
        errno.EIO: "the disk reported an I/O error: check it (dmesg)",
    }.get(exc.errno or -1, "")
    return f"{where}{cause}" + (f"; {advice}" if advice else "")


def engine_error_line(exc: BaseException, host: str) -> str:
    """Why the Docker engine cannot be reached, from the exception chain."""
    causes = []
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        causes.append(current)
        current = current.__cause__ or current.__context__
    text = " ".join(str(c) for c in causes)
    kinds = {type(c) for c in causes}
    if PermissionError in kinds or "Permission denied" in text:
        return (f"cannot reach the Docker engine at {host}: permission denied on its socket; add your user to the "
                "`docker` group (sudo usermod -aG docker $USER, then log in again) or run builder as root")
    if FileNotFoundError in kinds or "No such file or directory" in text:
        return f"cannot reach the Docker engine at {host}: the socket does not exist (no engine runs); start dockerd, or set DOCKER_HOST"
    if ConnectionRefusedError in kinds or "Connection refused" in text:
        return f"cannot reach the Docker engine at {host}: connection refused (no engine listens); start dockerd, or set DOCKER_HOST"
    reason = str(causes[-1]) or causes[-1].__class__.__name__
    return f"cannot reach the Docker engine at {host} ({reason.splitlines()[0][:200]}); start it, or set DOCKER_HOST"
