"""A streaming walk of a source tree under the contract's path rules (spec section 7).

Owns the boundary and symlink policy of `BAQUP_SOURCE_FOLLOW_SYMLINKS`:

- `follow`: follow symlinks whose resolved target stays inside the root; skip the
  others (`SYMLINK_EXTERNAL`) and loops;
- `skip`: leave every symlink out (`SYMLINK_SKIPPED`);
- `fail`: abort on the first symlink (`SECURITY_VIOLATION`, exit 65);
- `shallow` (default): keep symlinks that stay inside the root as symlinks, with the
  same target; leave out the others (`SYMLINK_EXTERNAL`).

It honours `BAQUP_SOURCE_EXCLUDE` (fnmatch patterns on the relative path or the
name), `BAQUP_SOURCE_MAX_FILES` (90% warns, over aborts) and `BAQUP_SOURCE_MAX_DEPTH`
(deeper directories are not entered), reports unreadable directories
(`PERMISSION_DENIED`) and, at the end, pathological trees (`ANOMALY_DETECTED`). The
walk holds one open directory per level and never a list of files; directories are
opened relative to their parent's descriptor, so depth is not bounded by PATH_MAX.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import resource
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from .errors import DataError, ResourceUnavailable, SecurityViolation
from .resources import Limit, ResourceLimitExceeded

POLICIES = ("follow", "skip", "fail", "shallow")
EventSink = Callable[[str, str, str, str | None], None]  # code, severity, message, path


class _Entries(Iterator[os.DirEntry[str]], Protocol):
    def close(self) -> None: ...


# an open directory on the walk: (fd, its entries, relative path, depth, (dev, ino) on the path)
_Frame = tuple[int, _Entries, str, int, frozenset[tuple[int, int]]]


@dataclass(frozen=True)
class Entry:
    """One thing in the tree: `relative` to the root, POSIX separators."""

    relative: str
    kind: str  # "file", "dir" or "symlink"
    stat: os.stat_result
    depth: int
    link_target: str | None = None

    @property
    def size(self) -> int:
        return self.stat.st_size if self.kind == "file" else 0


@dataclass
class WalkStats:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    excluded: int = 0
    empty_files: int = 0
    bytes: int = 0


MAX_LINK_HOPS = 40  # as the kernel's ELOOP limit


def _lexically_inside(relative: str, target: str) -> bool:
    """A relative target that, read as text from the link's directory, stays in the root."""
    if os.path.isabs(target):
        return False
    depth = len(relative.split("/")) - 1
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return False
        elif part not in ("", "."):
            depth += 1
    return True


def _too_many_open_files(depth: int, relative: str) -> ResourceUnavailable:
    return ResourceUnavailable(
        f"too many open files at depth {depth} ({relative}): raise the open-files limit or "
        "set BAQUP_SOURCE_MAX_DEPTH",
        code="RESOURCE_LIMIT_EXCEEDED",
    )


def _raise_open_files_limit() -> None:
    """Deep trees hold one directory open per level: allow as many as the hard limit."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def _noop(code: str, severity: str, message: str, path: str | None) -> None:
    """The default event sink: events are dropped."""


class Walker:
    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        policy: str = "shallow",
        exclude: Sequence[str] = (),
        max_files: int = 0,
        max_depth: int = 0,
        on_event: EventSink = _noop,
        anomaly_min_files: int = 1000,
        anomaly_empty_ratio: float = 0.99,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown symlink policy {policy!r}")
        self.root = os.path.realpath(root)
        self.policy = policy
        self.exclude = tuple(exclude)
        self.max_depth = max_depth
        self.files_limit = Limit("files", max_files) if max_files else None
        self.on_event = on_event
        self.anomaly_min_files = anomaly_min_files
        self.anomaly_empty_ratio = anomaly_empty_ratio
        self.stats = WalkStats()
        self.root_key: tuple[int, int] = (-1, -1)
        self._followed: set[tuple[int, int]] = set()
        _raise_open_files_limit()

    # --- rules -------------------------------------------------------------------------

    def excluded(self, relative: str, name: str) -> bool:
        return any(
            fnmatch.fnmatchcase(relative, p) or fnmatch.fnmatchcase(name, p) for p in self.exclude
        )

    def _count_file(self, entry: Entry) -> None:
        self.stats.files += 1
        self.stats.bytes += entry.size
        self.stats.empty_files += entry.size == 0
        if self.files_limit is not None:
            verdict, message = self.files_limit.check(self.stats.files)
            if verdict == "approaching":
                self.on_event("RESOURCE_LIMIT_APPROACHING", "warn", message, None)
            elif verdict == "exceeded":
                self.on_event("RESOURCE_LIMIT_EXCEEDED", "error", message, None)
                raise ResourceLimitExceeded(f"{message} (BAQUP_SOURCE_MAX_FILES)")

    # --- the walk ------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Entry]:
        try:
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise DataError(f"cannot open the source {self.root}: {exc.strerror}") from None
        root_stat = os.fstat(root_fd)
        self.root_key = (root_stat.st_dev, root_stat.st_ino)
        stack: list[_Frame] = [
            (root_fd, os.scandir(root_fd), "", 0, frozenset({(root_stat.st_dev, root_stat.st_ino)}))
        ]
        try:
            while stack:
                fd, entries, prefix, depth, ancestors = stack[-1]
                entry = next(entries, None)
                if entry is None:
                    entries.close()
                    os.close(fd)
                    stack.pop()
                    continue
                relative = f"{prefix}/{entry.name}" if prefix else entry.name
                if self.excluded(relative, entry.name):
                    self.stats.excluded += 1
                    continue
                yield from self._visit(entry.name, relative, fd, depth + 1, ancestors, stack)
        finally:
            for fd, entries, *_ in stack:
                entries.close()
                os.close(fd)
        self._check_anomaly()

    def _visit(
        self,
        name: str,
        relative: str,
        parent_fd: int,
        depth: int,
        ancestors: frozenset[tuple[int, int]],
        stack: list[_Frame],
    ) -> Iterator[Entry]:
        try:
            info = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            self.on_event("FILE_VANISHED", "warn", "vanished during the walk", relative)
            return
        except PermissionError:
            self.on_event("PERMISSION_DENIED", "warn", "cannot stat", relative)
            return
        if stat.S_ISLNK(info.st_mode):
            yield from self._symlink(name, relative, parent_fd, depth, ancestors, stack, info)
            return
        if stat.S_ISDIR(info.st_mode):
            yield from self._directory(name, relative, parent_fd, depth, ancestors, stack, info)
            return
        if stat.S_ISREG(info.st_mode):
            entry = Entry(relative, "file", info, depth)
            self._count_file(entry)
            yield entry
            return
        self.on_event(
            "ANOMALY_DETECTED", "warn", "special file (device, FIFO or socket) left out", relative
        )

    def _directory(
        self,
        name: str,
        relative: str,
        parent_fd: int,
        depth: int,
        ancestors: frozenset[tuple[int, int]],
        stack: list[_Frame],
        info: os.stat_result,
        *,
        follow: bool = False,
    ) -> Iterator[Entry]:
        key = (info.st_dev, info.st_ino)
        if key in ancestors:
            self.on_event("SYMLINK_SKIPPED", "info", "symlink loop left out", relative)
            return
        self.stats.directories += 1
        yield Entry(relative, "dir", info, depth)
        if self.max_depth and depth >= self.max_depth:
            self.on_event(
                "RESOURCE_LIMIT_EXCEEDED",
                "warn",
                f"deeper than BAQUP_SOURCE_MAX_DEPTH={self.max_depth}: not entered",
                relative,
            )
            return
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
        try:
            fd = os.open(name, flags, dir_fd=parent_fd)
        except PermissionError:
            self.on_event("PERMISSION_DENIED", "warn", "directory not readable", relative)
            return
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _too_many_open_files(depth, relative) from None
            self.on_event("FILE_VANISHED", "warn", f"cannot open: {exc.strerror}", relative)
            return
        try:
            entries = os.scandir(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                raise _too_many_open_files(depth, relative) from None
            self.on_event("PERMISSION_DENIED", "warn", "directory not readable", relative)
            return
        stack.append((fd, entries, relative, depth, ancestors | {key}))

    def _symlink(
        self,
        name: str,
        relative: str,
        parent_fd: int,
        depth: int,
        ancestors: frozenset[tuple[int, int]],
        stack: list[_Frame],
        info: os.stat_result,
    ) -> Iterator[Entry]:
        target = os.readlink(name, dir_fd=parent_fd)
        if self.policy == "fail":
            raise SecurityViolation(
                f"symlink {relative} -> {target} refused (BAQUP_SOURCE_FOLLOW_SYMLINKS=fail)",
                code="SYMLINK_REFUSED",
            )
        if self.policy == "skip":
            self.on_event("SYMLINK_SKIPPED", "info", f"symlink to {target} left out", relative)
            return
        inside = self._target_inside(parent_fd, name)
        if inside is None:
            if self.policy != "shallow" or not _lexically_inside(relative, target):
                self.on_event(
                    "SYMLINK_SKIPPED",
                    "info",
                    f"symlink to {target} is dangling or a loop",
                    relative,
                )
                return
            inside = True  # dangling, but it names a place in the source: kept as it is
        if not inside:
            self.on_event(
                "SYMLINK_EXTERNAL", "warn", f"symlink to {target} leaves the source", relative
            )
            return
        if self.policy == "shallow":
            if os.path.isabs(target):  # inside, but absolute: relative, so it restores anywhere
                if not target.startswith(self.root + os.sep):
                    self.on_event(
                        "SYMLINK_EXTERNAL",
                        "warn",
                        f"absolute symlink to {target} is not under the source path",
                        relative,
                    )
                    return
                link_dir = os.path.dirname(os.path.join(self.root, relative))
                target = os.path.relpath(target, link_dir)
            self.stats.symlinks += 1
            yield Entry(relative, "symlink", info, depth, link_target=target)
            return
        try:
            followed = os.stat(name, dir_fd=parent_fd, follow_symlinks=True)
        except OSError:
            self.on_event("SYMLINK_SKIPPED", "info", f"dangling symlink to {target}", relative)
            return
        if stat.S_ISDIR(followed.st_mode):
            key = (followed.st_dev, followed.st_ino)
            if key in ancestors:
                self.on_event("SYMLINK_SKIPPED", "info", "symlink loop left out", relative)
                return
            if key in self._followed:  # fan-out: each directory is walked once via links
                self.on_event(
                    "SYMLINK_SKIPPED",
                    "info",
                    "directory already walked through another symlink",
                    relative,
                )
                return
            self._followed.add(key)
            yield from self._directory(
                name, relative, parent_fd, depth, ancestors, stack, followed, follow=True
            )
        elif stat.S_ISREG(followed.st_mode):
            entry = Entry(relative, "file", followed, depth)
            self._count_file(entry)
            yield entry

    # --- where a symlink really leads, by descriptors (no path length limit) -------------

    def _target_inside(self, parent_fd: int, name: str) -> bool | None:
        """Whether the symlink `name` ends inside the root; None if dangling or a loop."""
        flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            dir_fd = os.open(".", flags, dir_fd=parent_fd)
        except OSError:
            return None
        try:
            component = name
            for _ in range(MAX_LINK_HOPS):
                try:
                    info = os.stat(component, dir_fd=dir_fd, follow_symlinks=False)
                except OSError:
                    return None
                if not stat.S_ISLNK(info.st_mode):
                    break
                link = os.readlink(component, dir_fd=dir_fd)
                head, tail = os.path.split(link)
                if head:
                    try:
                        moved = os.open(head, flags, dir_fd=dir_fd)
                    except OSError:
                        return None
                    os.close(dir_fd)
                    dir_fd = moved
                component = tail or "."
            else:
                return None  # a loop of symlinks
            if stat.S_ISDIR(info.st_mode):
                try:
                    return self._under_root(os.open(component, flags, dir_fd=dir_fd))
                except OSError:
                    return None
            return self._under_root(os.dup(dir_fd))
        finally:
            os.close(dir_fd)

    def _under_root(self, fd: int) -> bool:
        """Walk `..` up from a directory descriptor (closed here) looking for the root."""
        flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
        try:
            while True:
                here = os.fstat(fd)
                key = (here.st_dev, here.st_ino)
                if key == self.root_key:
                    return True
                up = os.open("..", flags, dir_fd=fd)
                above = os.fstat(up)
                os.close(fd)
                fd = up
                if (above.st_dev, above.st_ino) == key:  # "/" is its own parent
                    return False
        finally:
            os.close(fd)

    def _check_anomaly(self) -> None:
        s = self.stats
        pathological = s.empty_files >= self.anomaly_empty_ratio * s.files
        if s.files >= self.anomaly_min_files and pathological:
            message = f"{s.empty_files} of {s.files} files are empty"
            self.on_event("ANOMALY_DETECTED", "warn", message, None)
            raise DataError(f"{message}: refusing a pathological source", code="ANOMALY_DETECTED")
