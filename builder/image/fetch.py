"""Release archives into a content-addressed cache: resumable, retried, verified.

The cache holds `artifacts/sha256-<hex>` files, each verified before it got
that name; `artifacts/partial/` holds interrupted downloads, resumed with an
HTTP Range request; `artifacts/by-url/` remembers which digest a URL gave.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

from builder.config import Config
from builder.config.places import cache_root  # noqa: F401 - where callers find it
from builder.errors import BuilderError
from builder.fsutil import sha256_file, write_atomic
from builder.image.lock import LockEntry
from builder.render.blueprint import mirrored
from builder.progress import Progress

CHUNK = 1 << 20


@dataclass(frozen=True)
class Artifact:
    """A release archive the image needs."""

    key: str  # "ollama" | "llama_cpp"
    url: str  # canonical, as the config gives it
    download_url: str  # with the GitHub mirror prefix applied
    sha256: str | None  # from the config, if it pins one

    @property
    def filename(self) -> str:
        return PurePosixPath(self.url.split("?", 1)[0]).name


def plan_artifacts(config: Config) -> list[Artifact]:
    """The archives to fetch, in a fixed order (pure)."""
    out = []
    for key, release in (("llama_cpp", config.llama_cpp), ("ollama", config.ollama)):
        out.append(Artifact(key, release.url, mirrored(release.url, config.github_mirror), release.sha256))
    return out


@dataclass
class FetchSettings:
    cache_dir: Path
    offline: bool = False
    carried_dir: Path | None = None  # artifacts carried in by hand (air-gapped machines)
    attempts: int = 6
    wait_seconds: float = 1.0  # first back-off; doubles each time, at most 30 s
    timeout_seconds: float = 30.0
    echo: Callable[[str], None] = field(default=lambda message: None)

    @classmethod
    def from_env(cls, cache_dir: Path, **kwargs) -> "FetchSettings":
        """Settings with the retry knobs BUILDER_RETRIES / BUILDER_RETRY_WAIT applied."""
        from builder.errors import ConfigError

        settings = cls(cache_dir=cache_dir, **kwargs)
        for var, attribute, kind in (("BUILDER_RETRIES", "attempts", int), ("BUILDER_RETRY_WAIT", "wait_seconds", float)):
            if os.environ.get(var):
                try:
                    value = kind(os.environ[var])
                    if value < (1 if kind is int else 0):
                        raise ValueError
                except ValueError:
                    raise ConfigError(f"${var}: expected a {'whole number >= 1' if kind is int else 'number of seconds'}, got {os.environ[var]!r}") from None
                setattr(settings, attribute, value)
        return settings


class _Retryable(Exception):
    """A failure worth another attempt (a 5xx answer, a short body)."""


class ArtifactCache:
    """The content-addressed cache under `root/artifacts`."""

    def __init__(self, root: Path):
        self.root = root / "artifacts"

    def path(self, sha256: str) -> Path:
        return self.root / f"sha256-{sha256}"

    def partial(self, artifact: Artifact) -> Path:
        tag = hashlib.sha256(artifact.url.encode()).hexdigest()[:16]
        return self.root / "partial" / f"{tag}-{artifact.filename}.part"

    def remembered(self, url: str) -> str | None:
        marker = self.root / "by-url" / hashlib.sha256(url.encode()).hexdigest()
        try:
            digest = marker.read_text().strip()
        except OSError:
            return None
        return digest if self.path(digest).is_file() else None

    def store(self, source: Path, sha256: str, url: str, move: bool) -> Path:
        """Give verified bytes their final name (atomically), and remember the URL."""
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(source, target)
        elif not target.exists():
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            os.close(fd)
            try:
                shutil.copyfile(source, tmp)
                os.replace(tmp, target)
            finally:
                Path(tmp).unlink(missing_ok=True)
        write_atomic(self.root / "by-url" / hashlib.sha256(url.encode()).hexdigest(), sha256.encode() + b"\n")
        return target


def resolve_expected(artifact: Artifact, locked: LockEntry | None) -> str | None:
    """The digest the artifact must have: the config's pin, else the lock's."""
    if locked is not None and locked.url != artifact.url:
        locked = None  # the URL changed (a new version): the old entry does not apply
    if artifact.sha256 and locked and artifact.sha256 != locked.sha256:
        from builder.errors import ConfigError

        raise ConfigError(
            f"{artifact.key}.sha256 in the config ({artifact.sha256}) disagrees with builder.lock ({locked.sha256}) "
            f"for {artifact.url}; fix one of them"
        )
    return artifact.sha256 or (locked.sha256 if locked else None)


def ensure_artifact(artifact: Artifact, expected: str | None, settings: FetchSettings, fresh: bool = False) -> LockEntry:
    """Make sure the cache holds the artifact; return what the lock should say.
    `fresh` (for `builder lock`) downloads again unless the config pins a digest."""
    cache = ArtifactCache(settings.cache_dir)
    known = expected or (None if fresh else cache.remembered(artifact.url))
    if known and cache.path(known).is_file():
        return LockEntry(artifact.url, known, cache.path(known).stat().st_size)

    if settings.carried_dir is not None:
        carried = settings.carried_dir / artifact.filename
        if carried.is_file():
            actual = sha256_file(carried)
            _check_digest(artifact, carried, expected, actual, str(carried))
            settings.echo(f"{artifact.filename}: taken from {settings.carried_dir}")
            stored = cache.store(carried, actual, artifact.url, move=False)
            return LockEntry(artifact.url, actual, stored.stat().st_size)
    if settings.offline:
        where = f" or in {settings.carried_dir}" if settings.carried_dir else ""
        pin = f" (sha256 {expected})" if expected else ""
        raise BuilderError(
            f"offline: {artifact.filename}{pin} is not in the cache {cache.root}{where}; "
            f"carry it in with `builder fetch --from DIR` or fetch it where the network reaches {artifact.download_url}"
        )

    partial = cache.partial(artifact)
    partial.parent.mkdir(parents=True, exist_ok=True)
    _download(artifact, partial, settings)
    actual = sha256_file(partial)
    try:
        _check_digest(artifact, partial, expected, actual, artifact.download_url)
    except BuilderError:
        partial.unlink(missing_ok=True)  # bad bytes are never kept, not even to resume from
        raise
    stored = cache.store(partial, actual, artifact.url, move=True)
    return LockEntry(artifact.url, actual, stored.stat().st_size)


def _check_digest(artifact: Artifact, path: Path, expected: str | None, actual: str, origin: str) -> None:
    if expected and actual != expected:
        raise BuilderError(
            f"checksum mismatch for {origin}: expected sha256 {expected}, got {actual}; "
            f"the file was not kept (check mirrors.github, or {artifact.key}.sha256 and builder.lock)"
        )


def _download(artifact: Artifact, partial: Path, settings: FetchSettings) -> None:
    import httpx
    from tenacity import RetryError, Retrying, retry_if_exception, retry_if_exception_type, stop_after_attempt, wait_exponential

    def retry_if_not_exception(predicate):
        return retry_if_exception(lambda error: not predicate(error))

    url = artifact.download_url
    timeout = httpx.Timeout(settings.timeout_seconds, connect=min(10.0, settings.timeout_seconds))

    def note_retry(state) -> None:
        error = state.outcome.exception()
        settings.echo(f"{artifact.filename}: attempt {state.attempt_number} failed ({_reason(error)}); retrying")

    retrying = Retrying(
        stop=stop_after_attempt(settings.attempts),
        wait=wait_exponential(multiplier=settings.wait_seconds, max=30),
        # An unknown host name will not become known by waiting: fail at once.
        retry=retry_if_exception_type((httpx.TransportError, _Retryable)) & retry_if_not_exception(_unknown_host),
        before_sleep=note_retry,
        reraise=False,
    )
    # trust_env: HTTP(S)_PROXY, ALL_PROXY and NO_PROXY are honoured.
    with httpx.Client(timeout=timeout, follow_redirects=True, trust_env=True) as client:
        try:
            for attempt in retrying:
                with attempt:
                    _attempt(client, url, artifact.filename, partial)
        except httpx.TransportError as exc:
            if not _unknown_host(exc):
                raise
            host = httpx.URL(url).host
            raise BuilderError(
                f"cannot download {url}: the host {host} is unknown here ({_reason(exc)}); set mirrors.github "
                "(or BUILDER_MIRROR_GITHUB) to a proxy this machine can resolve, or carry the archives in and use --offline --from DIR"
            ) from None
        except RetryError as exc:
            last = exc.last_attempt.exception()
            kept = f"; {partial.stat().st_size} bytes kept and resumed next time" if partial.exists() and partial.stat().st_size else ""
            raise BuilderError(
                f"cannot download {url} after {settings.attempts} attempts ({_reason(last)}); "
                f"check the network, the proxy variables or mirrors.github{kept}"
            ) from None


def _unknown_host(error: BaseException) -> bool:
    """A DNS answer that the name does not exist (not a temporary failure)."""
    import socket

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, socket.gaierror) and error.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return True
        if "Name or service not known" in str(error) or "No address associated with hostname" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _reason(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    text = str(error) or error.__class__.__name__
    return text.splitlines()[0][:200]


def _attempt(client, url: str, filename: str, partial: Path) -> None:
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with client.stream("GET", url, headers=headers) as response:
        status = response.status_code
        if status == 416 and have:
            total = response.headers.get("content-range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == have:
                return  # the partial file is already whole
            partial.unlink()
            raise _Retryable("the server refused to resume; starting again")
        if status >= 500 or status == 429:
            raise _Retryable(f"HTTP {status}")
        if status >= 400:
            raise BuilderError(f"{url} answered HTTP {status}; check the version, the URL template and mirrors.github")
        append = False
        if status == 206:
            start = response.headers.get("content-range", "").removeprefix("bytes ").split("-", 1)[0]
            if not (start.isdigit() and int(start) == have):
                partial.unlink(missing_ok=True)
                raise _Retryable(f"the server resumed at byte {start or '?'} instead of {have}; starting again")
            append = True
        else:
            have = 0  # no Range support (200): start over
        length = response.headers.get("content-length")
        total = have + int(length) if length and length.isdigit() else None
        if length and length.isdigit():  # before the first byte: the download cache's disk holds the rest
            from builder.preflight.disk import Need, check_space

            check_space([Need(f"download of {filename}", partial.parent, int(length))])
        progress = Progress(filename, total, start=have)
        with partial.open("ab" if append else "wb") as handle:
            for chunk in response.iter_raw():  # as received, undecoded: Range counts these bytes
                handle.write(chunk)
                progress.advance(len(chunk))
            handle.flush()
            os.fsync(handle.fileno())
        if total is not None and partial.stat().st_size < total:
            raise _Retryable(f"the connection ended at {partial.stat().st_size} of {total} bytes")
        progress.finish()


def fetch_all(
    artifacts: list[Artifact], locked: dict[str, LockEntry], settings: FetchSettings, fresh: bool = False
) -> dict[str, LockEntry]:
    """Ensure every artifact; return the lock entries (existing ones kept, new ones added)."""
    entries = dict(locked)
    for artifact in artifacts:
        expected = resolve_expected(artifact, locked.get(artifact.key))
        entries[artifact.key] = ensure_artifact(artifact, expected, settings, fresh=fresh)
    return entries


def fetch_and_lock(
    config_path: str, config: Config, settings: FetchSettings, ignore_lock: bool = False
) -> tuple[list[Artifact], dict[str, LockEntry]]:
    """Fetch every artifact, check it against builder.lock, and (re)write the lock."""
    from builder.image.lock import lock_path, read_lock, write_lock

    path = lock_path(config_path)
    current = read_lock(path)
    artifacts = plan_artifacts(config)
    entries = fetch_all(artifacts, {} if ignore_lock else current, settings, fresh=ignore_lock)
    if entries != current:
        write_lock(path, entries)
        settings.echo(f"wrote {path}")
    return artifacts, entries
