"""How a command is started: execvp semantics and a parent-death signal (INTERFACE.md 13).

Owns resolving a command as execvp would (PATH search, a script without `#!` run by /bin/sh,
a missing interpreter named as such) and the launcher placed in front of it, so that the
child gets `PR_SET_PDEATHSIG` (SIGKILL) and never outlives baqup-run:

- util-linux `setpriv --pdeathsig KILL -- CMD` (Debian's Essential util-linux): one extra exec,
  about 1.3 ms a spawn; its execvp gives the /bin/sh fallback. Chosen whenever it is there.
- else a Python trampoline (`sys.executable -I -S -c ...`, about 15 ms a spawn): sets the
  death signal, checks that baqup-run is still its parent (closing the window between the
  spawn and the prctl, which setpriv leaves open), resets what Python's start changed, execs.
  It is also the launcher when the child must take the terminal's foreground before it
  runs (tini's way: no moment in the background in which a prompt would stop it).

Both are started by `posix_spawn` (child.py), never `fork`: forking a threaded Python process
is unsafe, and `posix_spawn` cannot set a death signal itself. The death signal is tied to
the *thread* that spawned the child, so spawning is only ever done by the main thread,
which lives as long as baqup-run. Must never run Python code in a forked child.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
from collections.abc import Mapping, Sequence
from functools import lru_cache

from .errors import BaqupError, JobFailed, UsageError

HEADER_SIZE = 256  # enough of a script's first line to read its `#!` interpreter

TRAMPOLINE = r"""
import ctypes, errno, os, signal, sys
parent, terminal = int(sys.argv[1]), sys.argv[2] == "tty"
executable, argv = sys.argv[3], sys.argv[4:]
if ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
    os.write(2, b"baqup-run: cannot set the parent-death signal\n")
    os._exit(126)
if os.getppid() != parent:  # baqup-run died before the death signal was armed
    os._exit(137)
if terminal:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        os.tcsetpgrp(fd, os.getpgrp())
        os.close(fd)
    except OSError:
        pass
for s in signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}:
    if signal.getsignal(s) is signal.SIG_IGN:  # Python's start ignores SIGPIPE and SIGXFSZ
        signal.signal(s, signal.SIG_DFL)
signal.pthread_sigmask(signal.SIG_SETMASK, ())
try:
    os.execv(executable, argv)
except OSError as exc:
    if exc.errno == errno.ENOEXEC:  # no #! line: execvp runs it with /bin/sh
        try:
            os.execv("/bin/sh", ["/bin/sh", executable, *argv[1:]])
        except OSError as again:
            exc = again
    os.write(2, f"baqup-run: cannot execute {executable}: {exc.strerror}\n".encode())
    os._exit(127 if exc.errno == errno.ENOENT else 126)
"""


class CommandNotFound(UsageError):
    default_code = "COMMAND_NOT_FOUND"


class CommandNotExecutable(JobFailed):
    default_code = "COMMAND_NOT_EXECUTABLE"


def resolve_command(argv0: str, environ: Mapping[str, str]) -> str:
    """The executable for argv[0], searched on the child's PATH as execvp would; a script
    whose `#!` interpreter is missing is "command not found" naming the interpreter."""
    path = environ.get("PATH", os.defpath)
    if "/" in argv0:
        if not os.path.exists(argv0):
            raise CommandNotFound(f"command not found: {argv0}")
        if os.path.isdir(argv0) or not os.access(argv0, os.X_OK):
            raise CommandNotExecutable(f"command is not executable: {argv0}")
        found: str | None = argv0
    else:
        found = shutil.which(argv0, path=path)
    if found is None:
        for directory in path.split(os.pathsep):
            candidate = os.path.join(directory or ".", argv0)
            if os.path.exists(candidate) and not os.path.isdir(candidate):
                raise CommandNotExecutable(f"command is not executable: {candidate}")
        raise CommandNotFound(f"command not found: {argv0} (PATH={path})")
    missing = missing_interpreter(found, path)
    if missing is not None:
        raise CommandNotFound(
            f"command not found: the interpreter {missing} of {found} is missing "
            f"(its first line names it)"
        )
    return found


def missing_interpreter(executable: str, path: str) -> str | None:
    """The interpreter a `#!` script names when it is not there (execve would say only
    "No such file or directory", as if the script itself were missing); else None."""
    try:
        with open(executable, "rb") as handle:
            header = handle.read(HEADER_SIZE)
    except OSError:
        return None
    if not header.startswith(b"#!"):
        return None
    words = header[2:].split(b"\n", 1)[0].split()
    if not words:
        return None
    interpreter = os.fsdecode(words[0])
    if not os.path.exists(interpreter):
        return interpreter
    if os.path.basename(interpreter) == "env" and len(words) > 1:
        # `#!/usr/bin/env python3`: the real interpreter is looked up on PATH by env.
        name = os.fsdecode(words[1])
        if not name.startswith("-") and "=" not in name and shutil.which(name, path=path) is None:
            return f"{name} (run by {interpreter}, not on PATH)"
    return None


@lru_cache(maxsize=1)
def setpriv() -> str | None:
    """util-linux setpriv with --pdeathsig (2.33+), found on baqup-run's own PATH; None when
    absent or another implementation (busybox's has no --pdeathsig)."""
    found = shutil.which("setpriv")
    if found is None:
        return None
    try:
        with open(os.path.realpath(found), "rb") as handle:
            # The option's name is in the binary's getopt table: no process to spawn to ask.
            binary = handle.read(4 << 20)
    except OSError:
        return None
    return found if b"pdeathsig" in binary else None


def launch_argv(executable: str, argv: Sequence[str], *, terminal: bool) -> list[str]:
    """The argv to posix_spawn: the launcher that arms the death signal, then the command."""
    if threading.current_thread() is not threading.main_thread():
        # The death signal fires when the spawning thread exits, not the process.
        raise BaqupError("the child must be spawned by baqup-run's main thread")
    helper = None if terminal else setpriv()
    if helper is not None:
        # setpriv's execvp resolves argv[0] on the child's PATH as resolve_command did, and
        # the child sees argv[0] as it was given.
        return [helper, "--pdeathsig", "KILL", "--", *argv]
    mode = "tty" if terminal else "-"
    return [sys.executable, "-I", "-S", "-c", TRAMPOLINE, str(os.getpid()), mode, executable, *argv]
