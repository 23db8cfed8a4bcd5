"""The Docker engine restarted under a running stack: it comes back by its
restart policy. Marked `restarts_engine`: the conftest runs it after every
other test, whatever the file names.

The engine is restarted the way it was started, found out at run time from
the running dockerd itself, whatever installed it (.ci/install-docker.sh,
Docker's own packages, Debian's docker.io): the systemd unit whose main
process it is; the `service docker` script whose start-stop-daemon pid file
names it; or, for a daemon started in the background by hand or by a script
(install-docker.sh's `nohup setsid dockerd ...`), the same binary with the
same command line, environment, working directory, umask, limits and output
files, rehearsed (`dockerd ... --validate`) before anything is stopped.
Nothing is installed or downloaded. When none of those is certain, the test
fails before it stops anything; whatever happens after the engine is
stopped, it is started again and `docker info` has to answer.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import pytest

from tests.engine.conftest import TinyStack, docker

pytestmark = [pytest.mark.engine, pytest.mark.restarts_engine]

STOP_SECONDS = 120  # dockerd stops every container first (10 s each by default), in parallel
START_SECONDS = 120
# Processes that, as dockerd's parent, may start it again on their own.
SUPERVISORS = {"systemd", "supervisord", "runsv", "runsvdir", "s6-supervise", "s6-svscan", "supervise-daemon", "monit"}
# /proc/PID/limits' rows and Linux's RLIMIT_* numbers, in order (Python's resource module lacks RLIMIT_LOCKS).
RLIMITS = {
    name: number
    for number, name in enumerate(
        ["Max cpu time", "Max file size", "Max data size", "Max stack size", "Max core file size", "Max resident set",
         "Max processes", "Max open files", "Max locked memory", "Max address space", "Max file locks",
         "Max pending signals", "Max msgqueue size", "Max nice priority", "Max realtime priority", "Max realtime timeout"]
    )
}


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name: [state, ppid, ...]."""
    return _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()


def _identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time): a pid the kernel may reuse, made unique; None once it is gone."""
    try:
        fields = _stat(pid)
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else (pid, fields[19])


def _engine_answers(timeout: int = 10) -> bool:
    try:
        return subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _socket_path() -> str:
    """The unix socket the docker CLI talks to (DOCKER_HOST, else the current context)."""
    host = os.environ.get("DOCKER_HOST") or docker("context", "inspect", "--format", "{{.Endpoints.docker.Host}}").stdout.strip()
    if host.startswith("ssh://"):
        pytest.skip(f"the engine is on another machine ({host}): it cannot be restarted from here")
    if not host.startswith("unix://"):
        pytest.fail(f"the docker CLI talks to {host}: this test finds the dockerd to restart only by its unix socket; nothing was stopped")
    return host[len("unix://"):]


def _serving_dockerd(socket_path: str) -> int | None:
    """The live dockerd holding the listening socket at socket_path."""
    want = os.path.realpath(socket_path)
    inodes = set()
    for line in _read("/proc/net/unix").splitlines()[1:]:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 is __SO_ACCEPTCON (listening)
        if len(fields) >= 8 and int(fields[3], 16) & 0x10000 and os.path.realpath(fields[7]) == want:
            inodes.add(f"socket:[{fields[6]}]")
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if _read(f"/proc/{entry}/comm").strip() != "dockerd" or _identity(int(entry)) is None:
                continue
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{entry}/fd")):
                found.add(int(entry))
        except OSError:
            continue
    assert len(found) <= 1, f"several dockerd processes hold {socket_path}: {sorted(found)}"
    return found.pop() if found else None


def _rlimits(pid: int) -> dict[int, tuple[int, int]]:
    limits = {}
    for line in _read(f"/proc/{pid}/limits").splitlines()[1:]:
        name, soft, hard, *_ = re.split(r"\s{2,}", line.strip()) + [""]
        if name in RLIMITS:
            value = lambda v: resource.RLIM_INFINITY if v == "unlimited" else int(v)  # noqa: E731
            limits[RLIMITS[name]] = (value(soft), value(hard))
    return limits


def _output_target(pid: int, fd: int) -> str | None:
    """The file dockerd's fd writes to, if it is one a new process can open again."""
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return target if target.startswith("/") and not target.endswith(" (deleted)") and os.path.exists(target) else None


class Engine:
    """The running engine and the certain way to stop it and start it again."""

    def __init__(self) -> None:
        self.socket = _socket_path()
        pid = _serving_dockerd(self.socket)
        assert pid, f"`docker info` answers but no dockerd on this machine holds {self.socket}; nothing was stopped"
        init = _read("/proc/1/cmdline").replace("\0", " ").strip()
        if pid == 1 or "dockerd" in init:
            # e.g. docker:dind, or `tini -- dockerd`: PID 1 ends, and the machine with it, when dockerd does.
            pytest.skip(f"dockerd is this machine's (container's) PID 1 or what PID 1 runs ({init}): stopping it would end the machine, so it cannot be restarted safely")
        self.pid = pid
        self.identity = _identity(pid)
        self.cmdline = _read(f"/proc/{pid}/cmdline").split("\0")[:-1]
        self.log = "dockerd's log"
        self.manager, self.how = self._how_started()
        self.stopped = False

    # -- how it was started -------------------------------------------------

    def _how_started(self) -> tuple[str, str]:
        pid = self.pid
        status = _read(f"/proc/{pid}/status")
        uid = re.search(r"^Uid:\s+(\d+)", status, re.M).group(1)
        if uid != "0" or os.geteuid() != 0:
            pytest.fail(f"dockerd (pid {pid}) runs as uid {uid} and this test as uid {os.geteuid()}: it restarts only a root engine, as root; nothing was stopped")

        if os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
            units = re.findall(r"/([^/\s]+\.service)(?:/|$)", _read(f"/proc/{pid}/cgroup"))
            if units:
                unit = units[-1]
                main = subprocess.run(["systemctl", "show", "--property=MainPID", "--value", unit], capture_output=True, text=True).stdout.strip()
                if main == str(pid):
                    self.unit, self.log = unit, f"journalctl -u {unit}"
                    return "systemd", f"systemd unit {unit}"
                pytest.fail(f"dockerd (pid {pid}) runs in {unit}, whose main process is {main or 'unknown'}, not dockerd: unknown how to restart it; nothing was stopped")

        for ssd in ("/run/docker-ssd.pid", "/var/run/docker-ssd.pid"):
            try:
                named = int(_read(ssd).strip())
            except (OSError, ValueError):
                continue
            if named == pid and os.access("/etc/init.d/docker", os.X_OK):
                status_ = self._service("status", check=False)
                if status_.returncode != 0:
                    pytest.fail(f"{ssd} names dockerd (pid {pid}) but `service docker status` says: {status_.stdout}{status_.stderr}; nothing was stopped")
                self.log = "/var/log/docker.log, or DOCKER_LOGFILE in /etc/default/docker"
                return "service", f"the `service docker` script ({ssd} names pid {pid})"

        ppid = int(_stat(pid)[1])
        parent = _read(f"/proc/{ppid}/comm").strip() if ppid > 0 else "?"
        if ppid != 1:
            pytest.fail(
                f"dockerd (pid {pid}) is a child of {parent} (pid {ppid}), no systemd unit or service script: that parent may start it "
                "again itself, so this test does not know a certain way to restart it; nothing was stopped"
            )
        if parent in SUPERVISORS or (parent == "init" and "dockerd" in (_read("/etc/inittab") if os.path.exists("/etc/inittab") else "")):
            pytest.fail(f"dockerd (pid {pid}) runs under PID 1 {parent}, which may supervise it: unknown how to restart it; nothing was stopped")

        exe = os.readlink(f"/proc/{pid}/exe")
        if exe.endswith(" (deleted)") or not os.access(exe, os.X_OK):
            pytest.fail(f"dockerd (pid {pid}) runs {exe}, no longer on disk: its command line would start another binary; nothing was stopped")
        self.exe = exe
        self.setsid = shutil.which("setsid")
        if self.setsid is None:
            pytest.fail("no setsid (util-linux) to start dockerd detached again; nothing was stopped")
        self.env = dict(line.split("=", 1) for line in _read(f"/proc/{pid}/environ").split("\0") if "=" in line)
        self.cwd = os.readlink(f"/proc/{pid}/cwd")
        if not os.path.isdir(self.cwd):
            self.cwd = "/"
        self.umask = int(re.search(r"^Umask:\s+([0-7]+)", status, re.M).group(1), 8)
        self.limits = _rlimits(pid)
        fallback = os.path.join(tempfile.gettempdir(), "dockerd-restarted-by-tests.log")
        self.stdout = _output_target(pid, 1) or fallback
        self.stderr = _output_target(pid, 2) or fallback
        self.log = self.stderr
        # setsid execs argv[0] through the daemon's own PATH: it has to be the binary that runs now.
        program = self.cmdline[0] if "/" in self.cmdline[0] else shutil.which(self.cmdline[0], path=self.env.get("PATH", os.defpath))
        if not program or os.path.realpath(os.path.join(self.cwd, program)) != os.path.realpath(exe):
            pytest.fail(f"dockerd (pid {pid}) runs {exe} but its argv[0] {self.cmdline[0]!r} now names {program}; nothing was stopped")
        # Rehearse the launch, down to parsing the flags and the daemon configuration, before stopping anything.
        supports_validate = "--validate" in subprocess.run([exe, "--help"], capture_output=True, text=True).stdout
        rehearsal = self._launch([*self.cmdline, "--validate" if supports_validate else "--version"], capture=True)
        out, err = rehearsal.communicate(timeout=60)
        print(f"rehearsal: {(out + err).strip()}")
        if rehearsal.returncode != 0:
            pytest.fail(f"`{' '.join(self.cmdline)}` would not start again ({err.strip() or out.strip()}); nothing was stopped")
        return "process", f"{exe} as a detached process, same command line, environment, umask and limits (stdout to {self.stdout})"

    def _service(self, action: str, check: bool = True) -> subprocess.CompletedProcess:
        # `service` runs the script with a clean environment, as at boot; the script itself otherwise.
        argv = ["service", "docker", action] if shutil.which("service") else ["/etc/init.d/docker", action]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=STOP_SECONDS + 30)
        if check:
            assert result.returncode == 0, f"`{' '.join(argv)}` failed: {result.stdout}{result.stderr}"
        return result

    def _launch(self, argv: list[str], capture: bool = False) -> subprocess.Popen:
        """argv run as the daemon ran: its binary, environment, working directory, umask, limits and
        output files. For real (not capture), through `setsid -f`, so that like install-docker.sh's
        `nohup setsid dockerd ... &` it leaves this process at once and belongs to PID 1."""

        def prepare() -> None:
            os.umask(self.umask)
            for limit, values in self.limits.items():
                resource.setrlimit(limit, values)

        if capture:
            out = err = subprocess.PIPE
        else:
            out = open(self.stdout, "ab")
            err = out if self.stderr == self.stdout else open(self.stderr, "ab")
        try:
            if not capture:
                argv = [self.setsid, "-f", *argv]
            return subprocess.Popen(
                argv, executable=self.exe if capture else self.setsid, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                preexec_fn=prepare, start_new_session=True, close_fds=True, text=capture,
            )
        finally:
            if not capture:
                out.close()
                if err is not out:
                    err.close()

    # -- stop, start --------------------------------------------------------

    def _wait_gone(self) -> bool:
        deadline = time.time() + STOP_SECONDS
        while _identity(self.pid) == self.identity:
            if time.time() > deadline:
                return False
            time.sleep(0.5)
        return True

    def stop(self) -> None:
        self.stopped = True  # from here on, whatever happens, start() brings it back
        if self.manager == "systemd":
            result = subprocess.run(["systemctl", "stop", self.unit], capture_output=True, text=True, timeout=STOP_SECONDS + 30)
            assert result.returncode == 0, f"systemctl stop failed: {result.stderr}"
        elif self.manager == "service":
            self._service("stop")
        else:
            os.kill(self.pid, signal.SIGTERM)
        assert self._wait_gone(), f"dockerd (pid {self.pid}) did not stop within {STOP_SECONDS} s"

    def start(self) -> None:
        if not self.stopped:
            return
        assert self._wait_gone(), f"dockerd (pid {self.pid}) is still stopping; not starting a second one"
        if self.manager == "systemd":
            result = subprocess.run(["systemctl", "start", self.unit], capture_output=True, text=True, timeout=START_SECONDS)
            assert result.returncode == 0, f"systemctl start failed: {result.stderr}"
        elif self.manager == "service":
            self._service("start")
        else:
            launcher = self._launch(self.cmdline)
            assert launcher.wait(timeout=30) == 0, f"`setsid -f {' '.join(self.cmdline)}` failed ({launcher.returncode})"
        self.stopped = False

    def wait_up(self) -> None:
        deadline = time.time() + START_SECONDS
        while not _engine_answers():
            assert time.time() < deadline, f"`docker info` did not answer within {START_SECONDS} s of starting the engine ({self.how}; its log: {self.log})"
            time.sleep(1)

    def ensure_up(self) -> None:
        """Start the engine again if this test stopped it, and wait until `docker info` answers."""
        try:
            self.start()
        finally:
            self.wait_up()
        assert _engine_answers(), "the engine is not up"


@pytest.fixture
def engine(docker_engine, tiny_stack: TinyStack):
    """Set up after tiny_stack, so torn down before it: the stack's `down` needs the engine up."""
    found = Engine()
    print(f"engine: dockerd pid {found.pid}, started by {found.how}")
    yield found
    found.ensure_up()  # if the test itself could not: the engine is never left down


def test_stack_comes_back_after_an_engine_restart(tiny_stack: TinyStack, engine: Engine) -> None:
    tiny_stack.write_model()
    assert tiny_stack.builder("up").returncode == 0
    try:
        engine.stop()
        assert _identity(engine.pid) is None, "dockerd is still running"
    finally:
        engine.ensure_up()
    assert _engine_answers(), "`docker info` does not answer after the restart"
    new_pid = _serving_dockerd(engine.socket)
    assert new_pid and new_pid != engine.pid, "the engine was not restarted"
    assert _read(f"/proc/{new_pid}/cmdline").split("\0")[:-1] == engine.cmdline, "the engine came back with another command line"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{tiny_stack.url}/api/tags", timeout=5) as response:
                if [m["name"] for m in json.loads(response.read())["models"]] == ["tiny:latest"]:
                    break
        except OSError:
            pass
        assert time.time() < deadline, "the stack did not come back after the engine restarted"
        time.sleep(1)
    state = json.loads(docker("inspect", tiny_stack.container("serve")).stdout)[0]["State"]
    assert state["Running"] is True
    # One-shot steps stay done: they are not run again by the restart policy.
    assert json.loads(docker("inspect", tiny_stack.container("merge")).stdout)[0]["State"]["Status"] == "exited"
