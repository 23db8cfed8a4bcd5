"""The gate's API keys: one file of named keys, some marked admin (issue 31).

Standard library only, Python 3.10+: it runs inside the image and on an
AutoDL instance's own python3.

The file (mode 0600: owner only; anything readable by group or others is
refused) holds one key a line:

    # builder gate keys: NAME KEY [admin]
    alice  Yl3Qx...43 characters...  
    ops    9vTq0...43 characters...  admin

Blank lines and lines starting with `#` are ignored. NAME is 1 to 64 of
`A-Z a-z 0-9 . _ @ -` (starting with a letter or digit), unique; KEY is 16
to 512 characters of the Bearer token alphabet (`A-Z a-z 0-9 - . _ ~ + /`,
then `=` padding), unique; the third field, when present, is `admin`. The
same keys may be written as JSON instead (a file whose first non-blank
character is `{`):

    {"keys": [{"name": "alice", "key": "...", "admin": false}, ...]}

The gate keeps only each key's SHA-256 in memory and compares a presented
key's SHA-256 with every one of them with hmac.compare_digest (constant
time, the same work whichever key matches, or none). It rereads the file
when its inode, size, mtime, ctime or mode change (checked at each
request), so an edited file (a revoked key) takes effect at the next
request, with nothing restarted. A file that becomes unreadable, malformed
or readable by others refuses every request until it is fixed (fail closed).

No function here logs or prints a key; error messages name the file and
the line, never the line's text.

    python3 -m supervisor.keys --file FILE add NAME [--admin]   # prints the new key, once
    python3 -m supervisor.keys --file FILE list                  # names and roles only
    python3 -m supervisor.keys --file FILE revoke NAME
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys
import threading
from dataclasses import dataclass

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
KEY_RE = re.compile(r"[A-Za-z0-9._~+/-]{16,512}=*\Z")
ADMIN = "admin"
HEADER = "# builder gate keys: NAME KEY [admin]; mode 0600; one key a line; a removed line is a revoked key\n"


class KeysFileError(Exception):
    """The keys file cannot be used: one line naming the file (never a key)."""


@dataclass(frozen=True)
class Entry:
    """A key as the file holds it (the helpers' view)."""

    name: str
    key: str
    admin: bool = False


@dataclass(frozen=True)
class Key:
    """A key as the gate holds it: its name, its role and the SHA-256 of the secret."""

    name: str
    admin: bool
    digest: bytes


def new_key() -> str:
    """A fresh random key: 32 bytes from the OS's CSPRNG, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def check_mode(path: str, st: os.stat_result | None = None) -> None:
    """Refuse a keys file that group or others may read or write (mode must be 0600 or stricter)."""
    st = st if st is not None else os.stat(path)
    if st.st_nlink == 0:
        raise KeysFileError(f"{path}: the file was replaced where it is mounted from (deleted, or saved by rename), and this "
                            "process still sees the old one: restart serve (`builder up`), and change keys with `builder keys`, "
                            "which writes the file in place")
    if not stat.S_ISREG(st.st_mode):
        raise KeysFileError(f"{path}: not a regular file; the keys file must be a file of mode 0600")
    mode = stat.S_IMODE(st.st_mode)
    # 0440 of a group this process is in: a Kubernetes Secret mounted for the
    # pod's fsGroup (owned by root). Nothing else may be open to the group.
    shared = (mode & 0o077 == 0o040 and st.st_uid == 0 != os.geteuid()
              and st.st_gid in (os.getegid(), *os.getgroups()))
    if mode & 0o077 and not shared:
        raise KeysFileError(f"{path}: mode {mode:04o}; the keys file must be readable by its owner only: chmod 600 {path}")


def parse_keys(text: str, path: str = "keys file") -> list[Entry]:
    """The entries of a keys file's text (either format); KeysFileError names the line."""
    entries = _parse_json(text, path) if text.lstrip().startswith("{") else _parse_text(text, path)
    names: set[str] = set()
    digests: set[bytes] = set()
    for number, entry in enumerate(entries, 1):
        if entry.name in names:
            raise KeysFileError(f"{path}: the name {entry.name!r} is given twice; names must be unique")
        digest = hashlib.sha256(entry.key.encode()).digest()
        if digest in digests:
            raise KeysFileError(f"{path}: key #{number} ({entry.name!r}) is the same key as an earlier one; every key must be unique")
        names.add(entry.name)
        digests.add(digest)
    return entries


def _check_entry(name, key, admin, where: str) -> Entry:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise KeysFileError(f"{where}: a key's name must be 1 to 64 of A-Z a-z 0-9 . _ @ - (starting with a letter or digit)")
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise KeysFileError(f"{where}: the key of {name!r} must be 16 to 512 characters of A-Z a-z 0-9 - . _ ~ + / (then = padding)")
    if not isinstance(admin, bool):
        raise KeysFileError(f"{where}: 'admin' of {name!r} must be true or false")
    return Entry(name, key, admin)


def _parse_text(text: str, path: str) -> list[Entry]:
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"{path}:{number}"
        if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] != ADMIN):
            raise KeysFileError(f"{where}: expected `NAME KEY` or `NAME KEY admin` (the line is not shown: it may hold a key)")
        entries.append(_check_entry(fields[0], fields[1], len(fields) == 3, where))
    return entries


def _parse_json(text: str, path: str) -> list[Entry]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise KeysFileError(f"{path}: not valid JSON (line {getattr(exc, 'lineno', '?')}); expected {{\"keys\": [{{\"name\": ..., \"key\": ..., \"admin\": false}}]}}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list) or set(data) - {"keys"}:
        raise KeysFileError(f"{path}: expected {{\"keys\": [{{\"name\": ..., \"key\": ..., \"admin\": false}}]}}")
    entries = []
    for number, item in enumerate(data["keys"], 1):
        where = f"{path}: keys[{number - 1}]"
        if not isinstance(item, dict) or set(item) - {"name", "key", "admin"}:
            raise KeysFileError(f"{where}: expected an object with name, key and admin (only)")
        entries.append(_check_entry(item.get("name"), item.get("key"), item.get("admin", False), where))
    return entries


def read_entries(path: str, lock: bool = True) -> list[Entry]:
    """The file's entries, after the mode check (`lock`: wait for a writer,
    which rewrites it in place under LOCK_EX; False for that writer itself)."""
    try:
        with open(path, "rb") as handle:
            check_mode(path, os.fstat(handle.fileno()))
            if lock:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
            raw = handle.read()
    except FileNotFoundError:
        raise KeysFileError(f"{path}: no such keys file; create one with `python3 -m supervisor.keys --file {path} add NAME`") from None
    except PermissionError:
        raise KeysFileError(f"{path}: cannot be read by this user (uid {os.geteuid()}); the gate must run as the file's owner") from None
    except IsADirectoryError:
        raise KeysFileError(f"{path}: is a folder; the keys file must be a file of mode 0600") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KeysFileError(f"{path}: not UTF-8 text") from None
    return parse_keys(text, path)


def _signature(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_nlink)


class KeyStore:
    """The keys the gate accepts, reread whenever the file changes.

    `authenticate(token)` returns the matching Key or None; it raises
    KeysFileError while the file is unusable (the gate then refuses every
    request). `on_change(message)` is called with one line (counts and the
    error, never a key) each time the file's state changes."""

    def __init__(self, path: str, on_change=None):
        self.path = path
        self.on_change = on_change or (lambda _message: None)
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._keys: tuple[Key, ...] = ()
        self._error: str | None = None
        self._reload(os.stat(path) if os.path.exists(path) else None, initial=True)
        if self._error:
            raise KeysFileError(self._error)

    def _reload(self, st: os.stat_result | None, initial: bool = False) -> None:
        before = self._error
        try:
            entries = read_entries(self.path)
            after = os.stat(self.path)
        except KeysFileError as exc:
            self._keys, self._error = (), str(exc)
            self._signature = _signature(st) if st is not None else None
            if self._error != before:
                self.on_change(f"{self._error}; every request is refused until it is fixed")
            return
        except OSError as exc:
            self._keys, self._error = (), f"{self.path}: {exc.strerror or exc}"
            self._signature = None
            if self._error != before:
                self.on_change(f"{self._error}; every request is refused until it is fixed")
            return
        self._keys = tuple(Key(e.name, e.admin, hashlib.sha256(e.key.encode()).digest()) for e in entries)
        self._error = None
        # Changed while it was read (an editor writing in place): read again next time.
        self._signature = _signature(after) if st is not None and _signature(after) == _signature(st) else None
        admins = sum(1 for k in self._keys if k.admin)
        self.on_change(f"{'' if initial else 'reread '}{self.path}: {len(self._keys)} key(s), {admins} admin")

    def current(self) -> tuple[Key, ...]:
        """The keys now (rereading the file if it changed); KeysFileError while it is unusable."""
        try:
            st = os.stat(self.path)
            signature = _signature(st)
        except OSError:
            st, signature = None, None
        if signature is None or signature != self._signature:
            with self._lock:
                if signature is None or signature != self._signature:
                    self._reload(st)
        if self._error:
            raise KeysFileError(self._error)
        return self._keys

    def authenticate(self, token: str) -> Key | None:
        """The key whose secret is `token`, or None: every key compared, in constant time."""
        keys = self.current()
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found = None
        for key in keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


# -- helpers for the command line (builder keys ...) ---------------------------


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock on the keys file for a read-modify-write (the file
    may be replaced by another writer while this one waits: lock again then)."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield
                return
        finally:
            os.close(fd)


def _rewrite(path: str, text: str) -> None:
    """Rewrite an existing keys file in place, under the caller's LOCK_EX:
    the same inode keeps its owner and mode, and a container that bind-mounts
    the file (a compose secret, a `--mount`) sees the change, which it would
    not after a rename. Readers take LOCK_SH, so none sees half a file."""
    fd = os.open(path, os.O_WRONLY)
    try:
        data = text.encode("utf-8")
        os.pwrite(fd, data, 0)  # then cut what is left over: a crash between leaves no empty file
        os.ftruncate(fd, len(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    """Write `text` to a new `path` through a temporary file of mode 0600 and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _is_json(path: str) -> bool:
    with open(path, encoding="utf-8") as handle:
        return handle.read().lstrip().startswith("{")


def _render_json(entries: list[Entry]) -> str:
    return json.dumps({"keys": [{"name": e.name, "key": e.key, "admin": e.admin} for e in entries]}, indent=2) + "\n"


def add_key(path: str, name: str, admin: bool = False, key: str | None = None) -> str:
    """Add a key named `name` (a new random one unless `key` is given) and return it.
    Creates the file (mode 0600) when missing; refuses a name already there."""
    key = key if key is not None else new_key()
    entry = _check_entry(name, key, admin, path)
    with _locked(path):
        if not os.path.exists(path):
            _write_atomic(path, HEADER + _line(entry))
            return key
        entries = read_entries(path, lock=False)
        if any(e.name == name for e in entries):
            raise KeysFileError(f"{path}: a key named {name!r} exists; revoke it first or choose another name")
        if any(hmac.compare_digest(e.key.encode(), key.encode()) for e in entries):
            raise KeysFileError(f"{path}: that key is already in the file under another name")
        if _is_json(path):
            _rewrite(path, _render_json([*entries, entry]))
        else:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            _rewrite(path, text + ("" if not text or text.endswith("\n") else "\n") + _line(entry))
    return key


def _line(entry: Entry) -> str:
    return f"{entry.name} {entry.key}{' admin' if entry.admin else ''}\n"


def list_keys(path: str) -> list[tuple[str, bool]]:
    """(name, admin) of every key: never the keys themselves."""
    return [(e.name, e.admin) for e in read_entries(path)]


def revoke_key(path: str, name: str) -> bool:
    """Remove the key named `name`; False when there is none. The gate refuses
    it from its next request on."""
    with _locked(path):
        entries = read_entries(path, lock=False)
        if not any(e.name == name for e in entries):
            return False
        if _is_json(path):
            _rewrite(path, _render_json([e for e in entries if e.name != name]))
        else:
            with open(path, encoding="utf-8") as handle:
                lines = handle.read().splitlines(keepends=True)
            kept = [line for line in lines if not (line.split() and line.split()[0] == name and not line.lstrip().startswith("#"))]
            _rewrite(path, "".join(kept))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m supervisor.keys", description="Manage the gate's API keys file.")
    parser.add_argument("--file", required=True, help="the keys file (created with mode 0600)")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add a random key under NAME and print it (once)")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="may also change the model store (create, delete, copy, pull, push, blobs)")
    commands.add_parser("list", help="the keys' names and roles (never the keys)")
    revoke = commands.add_parser("revoke", help="remove the key named NAME")
    revoke.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.command == "add":
            print(add_key(args.file, args.name, args.admin))
        elif args.command == "list":
            for name, admin in list_keys(args.file):
                print(f"{name}\t{'admin' if admin else 'user'}")
        elif not revoke_key(args.file, args.name):
            print(f"keys: error: {args.file}: no key named {args.name!r}", file=sys.stderr)
            return 1
    except KeysFileError as exc:
        print(f"keys: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
