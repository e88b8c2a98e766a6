"""Descriptor-relative file operations that never follow a symlink.

The job dir and its work dir are shared with a child that may be hostile: it can swap
a directory for a symlink, plant a symlink or a hard link where baqup-run will write.
Everything here works relative to directory descriptors baqup-run opened itself
(`O_DIRECTORY | O_NOFOLLOW`), so a name is only ever resolved one component at a time
inside a directory baqup-run holds, and a symlink met on the way is an error, never a
path taken. Owns no policy (which names are allowed): staging.py and capture.py do.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress

from .errors import SecurityViolation

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

Identity = tuple[int, int]


def identity(st: os.stat_result) -> Identity:
    return st.st_dev, st.st_ino


def lstat_at(name: str, dir_fd: int) -> os.stat_result | None:
    """The entry `name` in `dir_fd` itself (a symlink is not followed); None when absent."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def open_dir(name: str, dir_fd: int | None, *, what: str, create: bool = False) -> int:
    """An owned descriptor on directory `name` in `dir_fd` (made first with `create`).

    A symlink (or anything but a directory) there is a SecurityViolation: it is never
    followed.
    """
    if create:
        with suppress(FileExistsError):
            os.mkdir(name, dir_fd=dir_fd)
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SecurityViolation(
                f"{what} is a symlink or not a directory; baqup-run never follows one"
            ) from None
        raise


def open_parent(root_fd: int, parts: Iterable[str], *, what: str, create: bool = False) -> int:
    """An owned descriptor on the directory `parts` names below `root_fd`, walked one
    component at a time without following a symlink."""
    fd = os.dup(root_fd)
    walked: list[str] = []
    try:
        for part in parts:
            walked.append(part)
            child = open_dir(part, fd, what=f"{what}: {'/'.join(walked)!r}", create=create)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def closing_fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def create_exclusive(name: str, dir_fd: int, mode: int = 0o644) -> int:
    """A new file `name` in `dir_fd` for writing; an existing name (a file, a planted
    symlink or hard link) is FileExistsError, never opened."""
    return os.open(name, NEW_FILE_FLAGS, mode, dir_fd=dir_fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def replace_atomic(name: str, data: bytes, dir_fd: int, *, tmp_fd: int | None = None) -> None:
    """`name` in `dir_fd` becomes `data` whole or not at all: a fresh temp file (O_EXCL,
    in `tmp_fd` or `dir_fd`), fsync, rename over `name`, fsync the directory. The rename
    replaces a planted symlink itself; nothing is written through it."""
    tmp_dir = dir_fd if tmp_fd is None else tmp_fd
    tmp = f".baqup-tmp.{os.getpid()}.{secrets.token_hex(6)}"
    fd = create_exclusive(tmp, tmp_dir)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=tmp_dir, dst_dir_fd=dir_fd)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp, dir_fd=tmp_dir)
        raise
    os.fsync(dir_fd)


def remove_contents(dir_fd: int) -> None:
    """Delete everything inside the directory `dir_fd` (not the directory), descending
    into subdirectories by descriptor: a symlink is unlinked, never followed."""
    stack: list[tuple[int, str | None]] = [(os.dup(dir_fd), None)]
    try:
        while stack:
            fd, name = stack[-1]
            subdir = None
            for entry in os.listdir(fd):
                st = lstat_at(entry, fd)
                if st is None:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    subdir = entry
                    break
                os.unlink(entry, dir_fd=fd)
            if subdir is not None:
                stack.append((open_dir(subdir, fd, what="a directory being removed"), subdir))
                continue
            stack.pop()
            os.close(fd)
            if name is not None:
                os.rmdir(name, dir_fd=stack[-1][0])
    finally:
        for fd, _ in stack:
            with suppress(OSError):
                os.close(fd)
