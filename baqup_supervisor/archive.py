"""`baqup archive SRC`: a tar stream of a source tree, walked under the contract's rules.

The file agent's snapshot: the walker (walker.py) decides what goes in (symlink
policy, excludes, limits), and this module writes a POSIX (pax) tar of it to stdout
or a file, one file at a time, never holding a file list. A file that changes size
while it is read is stored with exactly the size its header announced (truncated,
or padded with zeros) and reported as `FILE_CHANGED`, so the stream stays valid.
Under baqup-run, events and progress go to the control channel.
"""

from __future__ import annotations

import os
import stat
import tarfile
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from .staging import io_error
from .walker import Entry, Walker

PROGRESS_EVERY = 1.0

Emit = Callable[[dict[str, Any]], None]


class _Exact:
    """Reads exactly `size` bytes from `source`: truncates growth, pads shrinkage."""

    def __init__(self, source: IO[bytes], size: int) -> None:
        self.source = source
        self.remaining = size
        self.changed = False

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self.remaining:
            size = self.remaining
        data = self.source.read(size) if size else b""
        if len(data) < size:
            self.changed = True
            data += bytes(size - len(data))
        self.remaining -= size
        if self.remaining == 0 and not self.changed and self.source.read(1):
            self.changed = True
        return data


def write_archive(
    root: str,
    out: IO[bytes],
    *,
    policy: str = "shallow",
    exclude: Sequence[str] = (),
    max_files: int = 0,
    max_depth: int = 0,
    emit: Emit | None = None,
) -> dict[str, int]:
    """Write the tar of `root` to `out`; the walk's statistics."""

    def on_event(code: str, severity: str, message: str, path: str | None) -> None:
        if emit is not None:
            event: dict[str, Any] = {
                "type": "event",
                "code": code,
                "severity": severity,
                "message": message,
            }
            if path is not None:
                event["path"] = path
            emit(event)

    walker = Walker(
        root,
        policy=policy,
        exclude=exclude,
        max_files=max_files,
        max_depth=max_depth,
        on_event=on_event,
    )
    last_progress = time.monotonic()
    current = ""
    try:
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for entry in walker:
                current = entry.relative
                _add(tar, walker.root, entry, on_event)
                now = time.monotonic()
                if emit is not None and now - last_progress >= PROGRESS_EVERY:
                    last_progress = now
                    emit(
                        {
                            "type": "progress",
                            "files_processed": walker.stats.files,
                            "bytes_processed": walker.stats.bytes,
                            "current_file": entry.relative,
                        }
                    )
    except OSError as exc:  # a full disk or a failing read is an I/O error (74), not a crash
        raise io_error(exc, f"archiving {current or root!r}") from None
    stats = walker.stats
    result = {
        "files": stats.files,
        "directories": stats.directories,
        "symlinks": stats.symlinks,
        "excluded": stats.excluded,
        "bytes": stats.bytes,
    }
    if emit is not None:
        emit(
            {
                "type": "progress",
                "percent_complete": 100,
                "files_processed": stats.files,
                "bytes_processed": stats.bytes,
            }
        )
        emit(
            {
                "type": "metadata",
                "source_metadata": {
                    "type": "filesystem",
                    "path": root,
                    "files_included": stats.files,
                    "files_excluded": stats.excluded,
                    "total_bytes_source": stats.bytes,
                },
            }
        )
    return result


def _add(
    tar: tarfile.TarFile,
    root: str,
    entry: Entry,
    on_event: Callable[[str, str, str, str | None], None],
) -> None:
    path = os.path.join(root, entry.relative)
    if entry.kind == "file":
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            on_event("FILE_VANISHED", "warn", "vanished before it was read", entry.relative)
            return
        except PermissionError:
            on_event("PERMISSION_DENIED", "warn", "not readable", entry.relative)
            return
        with handle:
            info = tar.gettarinfo(arcname=entry.relative, fileobj=handle)
            exact = _Exact(handle, info.size)
            tar.addfile(info, exact)
            if exact.changed:
                on_event("FILE_CHANGED", "warn", "changed size while it was read", entry.relative)
        return
    if entry.kind == "symlink":
        info = tar.gettarinfo(name=path, arcname=entry.relative)
        info.linkname = entry.link_target or info.linkname
        tar.addfile(info)
        return
    info = tarfile.TarInfo(entry.relative)  # a directory (maybe reached through a symlink)
    info.type = tarfile.DIRTYPE
    info.mode = stat.S_IMODE(entry.stat.st_mode)
    info.mtime = int(entry.stat.st_mtime)
    info.uid, info.gid = entry.stat.st_uid, entry.stat.st_gid
    tar.addfile(info)
