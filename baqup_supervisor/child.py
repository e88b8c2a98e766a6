"""The child process: spawning it, signalling its group, reaping, and the process tree.

Owns INTERFACE.md section 2: the child runs in its own process group with the job's
environment, the write end of the control pipe at `$BAQUP_CONTROL_FD`, default signal
dispositions and an empty signal mask, behind the launcher that arms its parent-death
signal (launcher.py); its stdout and stderr are pipes unless told otherwise. baqup-run
makes itself a child subreaper (PR_SET_CHILD_SUBREAPER), so orphaned descendants are
re-parented to it: `Reaper` collects every zombie (as tini does when it is PID 1) while
keeping the main child's exit status and reporting its stops, and `descendants` lists
every process the job started, whatever its group or session. `Terminal` is baqup-run's
controlling terminal, whose foreground the child's group gets.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .contract import ExitCode
from .errors import JobFailed, UsageError
from .launcher import launch_argv, resolve_command

PR_SET_CHILD_SUBREAPER = 36
# Whatever baqup-run inherited or set (Python ignores SIGPIPE and SIGXFSZ), the child starts
# with every signal at its default disposition.
DEFAULT_IN_CHILD = frozenset(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}


def set_child_subreaper() -> bool:
    """Become the reaper of orphaned descendants (Linux >= 3.4); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


@dataclass
class Child:
    """A spawned child; the supervisor owns its pipes' parent ends."""

    pid: int
    argv: Sequence[str]
    control_fd: int | None = None
    stdout_fd: int | None = None
    stderr_fd: int | None = None
    stdin_fd: int | None = None
    status: int | None = None  # raw wait status, once reaped
    fds: list[int] = field(default_factory=list)

    @property
    def pgid(self) -> int:
        return self.pid

    @property
    def exited(self) -> bool:
        return self.status is not None

    @property
    def exit_code(self) -> int | None:
        """The exit code, or minus the signal number that killed it, once reaped."""
        return None if self.status is None else os.waitstatus_to_exitcode(self.status)

    def signal_group(self, signum: int) -> bool:
        """Send `signum` to the child's whole process group; False once it is empty."""
        try:
            os.killpg(self.pgid, signum)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return False

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def signal_all(self, signum: int) -> list[int]:
        """`signum` to the child's group and to every descendant of baqup-run, wherever its
        group or session (a `setsid` daemon is out of the group's reach); the pids reached."""
        self.signal_group(signum)
        return signal_descendants(signum)

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


def spawn(
    argv: Sequence[str],
    environ: Mapping[str, str],
    *,
    control_fd: int,
    capture_stdout: bool = True,
    pipe_stdin: bool = False,
    terminal: bool = False,
) -> Child:
    """Start argv in its own process group with the control pipe at `control_fd`, behind the
    launcher that gives it its parent-death signal (launcher.py); with `terminal`, its group
    takes the terminal's foreground before the command runs."""
    if not argv:
        raise UsageError("no command to run")
    executable = resolve_command(argv[0], environ)
    launch = launch_argv(executable, argv, terminal=terminal)
    parent_fds: list[int] = []
    child_fds: list[int] = []
    actions: list[tuple[int, ...]] = []

    def pipe() -> tuple[int, int]:
        return os.pipe2(os.O_CLOEXEC)

    try:
        control_read, control_write = pipe()
        parent_fds.append(control_read)
        child_fds.append(control_write)
        stdin_write = None
        if pipe_stdin:
            stdin_read, stdin_write = pipe()
            parent_fds.append(stdin_write)
            child_fds.append(stdin_read)
            actions.append((os.POSIX_SPAWN_DUP2, stdin_read, 0))
        stdout_read = None
        if capture_stdout:
            stdout_read, stdout_write = pipe()
            parent_fds.append(stdout_read)
            child_fds.append(stdout_write)
            actions.append((os.POSIX_SPAWN_DUP2, stdout_write, 1))
        stderr_read, stderr_write = pipe()
        parent_fds.append(stderr_read)
        child_fds.append(stderr_write)
        actions.append((os.POSIX_SPAWN_DUP2, stderr_write, 2))
        actions.append((os.POSIX_SPAWN_DUP2, control_write, control_fd))
        # dup2 of a descriptor onto itself may keep CLOEXEC (libc-dependent): move it first.
        for index, action in enumerate(actions):
            if action[1] == action[2]:
                moved = os.dup(action[1])
                os.set_inheritable(moved, False)
                child_fds.append(moved)
                actions[index] = (os.POSIX_SPAWN_DUP2, moved, action[2])
        try:
            pid = os.posix_spawn(
                launch[0],
                launch,
                dict(environ),
                file_actions=actions,
                setpgroup=0,
                setsigmask=(),
                setsigdef=DEFAULT_IN_CHILD,
            )
        except OSError as exc:  # the launcher itself (resolve_command vouched for the command)
            raise JobFailed(
                f"cannot start {argv[0]}: {launch[0]}: {exc.strerror}",
                code="COMMAND_NOT_EXECUTABLE",
            ) from None
    except BaseException:
        for fd in parent_fds:
            os.close(fd)
        raise
    finally:
        for fd in child_fds:
            os.close(fd)
    for fd in parent_fds:
        os.set_blocking(fd, False)
        _widen_pipe(fd)
    return Child(
        pid=pid,
        argv=list(argv),
        control_fd=control_read,
        stdout_fd=stdout_read,
        stderr_fd=stderr_read,
        stdin_fd=stdin_write,
        fds=list(parent_fds),
    )


class Terminal:
    """baqup-run's controlling terminal, held while baqup-run is in its foreground.

    The child's group is made the foreground group (by the launcher, before the command
    runs), so a prompt reads the keyboard and Ctrl-C reaches the command, as under tini.
    While the command is stopped, baqup-run takes the foreground back so that the keyboard
    (Ctrl-C) reaches baqup-run, which is not stopped; it gives it back when the command
    goes on, and takes it back for good at the end. Never steals a terminal it was not in
    the foreground of (started with `&`). tcsetpgrp from the background is allowed because
    SIGTTOU is blocked (signals.py).
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.own = os.getpgrp()

    @classmethod
    def foreground(cls) -> Terminal | None:
        """The controlling terminal when baqup-run's group is its foreground group."""
        try:
            fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            return None  # no controlling terminal (a container without -t, a service)
        try:
            if os.tcgetpgrp(fd) == os.getpgrp():
                return cls(fd)
        except OSError:
            pass
        os.close(fd)
        return None

    def holder(self) -> int:
        try:
            return os.tcgetpgrp(self.fd)
        except OSError:
            return -1

    def give(self, pgid: int) -> bool:
        try:
            os.tcsetpgrp(self.fd, pgid)
            return True
        except OSError:
            return False  # the group is gone, or the terminal hung up

    def take_back(self, pgid: int) -> bool:
        """Make baqup-run's group the foreground again if `pgid` (the child's) holds it."""
        holder = self.holder()
        if holder == self.own or holder not in (pgid, -1):
            return False
        return self.give(self.own)

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


PIPE_SIZE = 1024 * 1024


def _widen_pipe(fd: int) -> None:
    """A 1 MiB pipe (64 KiB by default): fewer wake-ups, and a child that writes fast
    (a dump, a burst of control lines) blocks less often. Best effort."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except (OSError, AttributeError):
        pass


def descendants(root: int | None = None) -> list[int]:
    """Every live process below `root` (default: baqup-run), read from /proc.

    As a subreaper (or PID 1) baqup-run is the ancestor of every process the job started,
    including a daemon that left the child's group or session (setsid), so this tree is
    the whole of what may still write. Zombies are left out: they write nothing.
    """
    root = os.getpid() if root is None else root
    below: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue  # gone between the listing and the read
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 2 or fields[0] in (b"Z", b"X"):
            continue
        below.setdefault(int(fields[1]), []).append(int(name))
    found: list[int] = []
    pending = list(below.get(root, ()))
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(below.get(pid, ()))
    return found


def signal_descendants(signum: int) -> list[int]:
    """Send `signum` to every descendant of baqup-run; the pids it reached."""
    reached = []
    for pid in descendants():
        try:
            os.kill(pid, signum)
            reached.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return reached


@dataclass(frozen=True)
class ChildChange:
    """The main child stopped (by `signum`) or continued: worth an event, not an exit."""

    stopped: bool
    signum: int = 0


class Reaper:
    """Collects exit statuses: the main child's is kept, orphans' are just reaped.

    Also tells whether baqup-run still has any child at all (`has_children`): as a
    subreaper every orphan of the job is re-parented here, so "no child left" means no
    process the job started is alive. Stops and continuations of the main child are
    returned for the supervisor to report (WUNTRACED | WCONTINUED).
    """

    def __init__(self, reap_all: bool) -> None:
        self.reap_all = reap_all
        self.orphans_reaped = 0
        self.has_children = True

    def reap(self, child: Child | None) -> list[ChildChange]:
        changes: list[ChildChange] = []
        if not self.reap_all:
            if child is not None and child.status is None:
                self._wait_one(child, changes)
            self.has_children = child is not None and child.status is None
            return changes
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED | os.WCONTINUED)
            except ChildProcessError:
                self.has_children = False
                return changes
            if pid == 0:
                self.has_children = True
                return changes
            if child is not None and pid == child.pid:
                _record(child, status, changes)
            elif not (os.WIFSTOPPED(status) or os.WIFCONTINUED(status)):
                self.orphans_reaped += 1

    @staticmethod
    def _wait_one(child: Child, changes: list[ChildChange]) -> None:
        while child.status is None:
            try:
                pid, status = os.waitpid(child.pid, os.WNOHANG | os.WUNTRACED | os.WCONTINUED)
            except ChildProcessError:
                child.status = 0
                return
            if pid != child.pid:
                return
            _record(child, status, changes)


def _record(child: Child, status: int, changes: list[ChildChange]) -> None:
    if os.WIFSTOPPED(status):
        changes.append(ChildChange(stopped=True, signum=os.WSTOPSIG(status)))
    elif os.WIFCONTINUED(status):
        changes.append(ChildChange(stopped=False))
    else:
        child.status = status


def describe_exit(code: int) -> tuple[ExitCode, str, str]:
    """A child's exit code as (our exit code, error code, message) per INTERFACE.md 7."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return ExitCode.GENERAL_FAILURE, "CHILD_KILLED", f"the command was killed by {name}"
    passed = ExitCode(code) if code in _TAXONOMY else ExitCode.GENERAL_FAILURE
    return passed, "CHILD_FAILED", f"the command exited with code {code}"


_TAXONOMY = frozenset(int(c) for c in ExitCode)
