"""Property tests of `extract()`: whatever the member names, types and link targets.

Hypothesis builds small tar archives in memory from names and link targets made of
'/', '.', '..', '\\', empty segments, a leading '/', and NUL-free unicode, with files,
directories, symlinks and hard links, and extracts each into a fresh DEST inside a fresh
parent directory that also holds a sentinel sibling. Two properties, tested separately so
that a failure names the one that broke:

- containment: after the attempt (whatever its outcome), every path under DEST, and the
  target of every symlink there, resolves inside DEST, and nothing outside DEST changed;
- all or nothing: the outcome is a clean success, or a refusal (SecurityViolation or
  DataError) with DEST absent or empty; never another exception, never half an archive.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from baqup_supervisor.errors import DataError, SecurityViolation
from baqup_supervisor.extract import extract

KINDS = ("file", "dir", "symlink", "hardlink")


@dataclass(frozen=True)
class Member:
    name: str
    kind: str
    linkname: str = ""
    data: bytes = b""


# Short, colliding names make members meet (a link, then a path through it); the odd
# segments and free text cover what a hostile archive may spell.
SIMPLE = st.sampled_from(["a", "b", ".", ".."])
SEGMENTS = st.sampled_from(["c", "", "\\", "..\\..", "é", "a b", "…", "...", "a\\..\\b"])
FREE_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\0"),
    min_size=0,
    max_size=6,
)


@st.composite
def hostile_paths(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(SIMPLE, SEGMENTS, FREE_TEXT), min_size=1, max_size=4))
    lead = draw(st.sampled_from(["", "/", "./", "//"]))
    return lead + "/".join(parts)


CLEAN_PATHS = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map("/".join)
# Mostly clean names, so that most archives get past validation and members meet each
# other on disk; a hostile name now and then.
PATHS = st.one_of(CLEAN_PATHS, CLEAN_PATHS, CLEAN_PATHS, hostile_paths())


@st.composite
def member_lists(draw: st.DrawFn) -> list[Member]:
    """1 to 6 members; a link target is a free path, or one that goes through the name of
    a member before it (`x/..`, `x/../..`): links chained through links."""
    items: list[Member] = []
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        kind = draw(st.sampled_from(KINDS))
        name = draw(PATHS)
        if kind in ("symlink", "hardlink"):
            earlier = [m.name for m in items]
            linkname = draw(st.one_of(st.just("."), PATHS))
            through_earlier = draw(st.booleans())
            if earlier and through_earlier:
                tail = draw(st.sampled_from(["/..", "/../..", "", "/.", "/a"]))
                linkname = draw(st.sampled_from(earlier)) + tail
            items.append(Member(name, kind, linkname=linkname))
        elif kind == "file":
            items.append(Member(name, kind, data=draw(st.binary(max_size=16))))
        else:
            items.append(Member(name, kind))
    return items


def build(items: Sequence[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in items:
            info = tarfile.TarInfo(m.name)
            info.type = {
                "file": tarfile.REGTYPE,
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
            }[m.kind]
            info.mode = 0o755 if m.kind == "dir" else 0o644
            info.linkname = m.linkname
            info.size = len(m.data)
            tar.addfile(info, io.BytesIO(m.data) if m.kind == "file" else None)
    return buf.getvalue()


def snapshot(root: Path, skip: Path) -> dict[str, tuple[Any, ...]]:
    """Everything under root except `skip` (DEST): type, mode, mtime, links, content."""
    out: dict[str, tuple[Any, ...]] = {}
    for current, dirs, files in os.walk(root):
        if Path(current) == skip.parent and skip.name in dirs:
            dirs.remove(skip.name)
        for name in [*dirs, *files]:
            path = os.path.join(current, name)
            info = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(info.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(info.st_mode):
                out[rel] = ("file", info.st_nlink, hashlib.sha256(Path(path).read_bytes()).digest())
            elif Path(path) == skip.parent:  # DEST's parent: only DEST may appear in it
                out[rel] = ("dir", info.st_mode, tuple(sorted(set(os.listdir(path)) - {skip.name})))
            else:
                out[rel] = ("dir", info.st_mode, info.st_mtime_ns, tuple(sorted(os.listdir(path))))
    return out


@dataclass
class Box:
    """base/{sentinel/victim, parent/{sibling, dest}}: DEST is parent/dest."""

    base: Path
    parent: Path
    dest: Path
    archive: Path


@contextmanager
def fresh_box(raw: bytes) -> Iterator[Box]:
    base = Path(tempfile.mkdtemp(prefix="baqup-prop-"))
    try:
        (base / "sentinel").mkdir()
        (base / "sentinel" / "victim").write_bytes(b"victim")
        parent = base / "parent"
        parent.mkdir()
        (parent / "sibling").write_bytes(b"sibling")
        archive = base / "a.tar"
        archive.write_bytes(raw)
        yield Box(base, parent, parent / "dest", archive)
    finally:
        shutil.rmtree(base)


def resolve(path: str, hops: int = 40) -> str | None:
    """Where the kernel's path walk takes `path`: symlinks followed (at most `hops`, as
    Linux's MAXSYMLINKS), a missing component taken as it is; None for a symlink loop.

    (os.path.realpath is not used: on some loops it returns a path that has nothing to
    do with where the walk goes, e.g. '/a' for `a -> a//a`.)
    """
    parts = deque(p for p in os.path.abspath(path).split("/") if p)
    resolved = "/"
    while parts:
        part = parts.popleft()
        if part == ".":
            continue
        if part == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, part)
        if os.path.islink(candidate):
            hops -= 1
            if hops < 0:
                return None
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = "/"
            parts.extendleft(reversed([p for p in target.split("/") if p]))
            continue
        resolved = candidate
    return resolved


def escapes(dest: Path) -> list[str]:
    """Paths under DEST that resolve outside it (through their symlinks or their own)."""
    if not dest.exists():
        return []
    dest_real = resolve(str(dest))
    assert dest_real is not None
    found = []
    for current, dirs, files in os.walk(dest):
        for name in [*dirs, *files]:
            path = os.path.join(current, name)
            real = resolve(path)
            if real is not None and real != dest_real and not real.startswith(dest_real + "/"):
                target = os.readlink(path) if os.path.islink(path) else ""
                found.append(f"{os.path.relpath(path, dest)} -> {target} ({real})")
    return found


MEMBER_LISTS = member_lists()
PROPERTY_SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@PROPERTY_SETTINGS
@given(MEMBER_LISTS)
@example([Member("s", "symlink", linkname="/"), Member("s/etc/x", "file", data=b"x")])
@example([Member("a", "symlink", linkname="../.."), Member("a/x", "file", data=b"x")])
@example([Member("x", "symlink", linkname="."), Member("y", "symlink", linkname="x/..")])
@example([Member("h", "hardlink", linkname="../sibling")])
def test_nothing_lands_or_points_outside_dest(items: list[Member]) -> None:
    with fresh_box(build(items)) as box:
        before = snapshot(box.base, box.dest)
        try:
            extract(box.archive, box.dest)
        except Exception:
            pass
        leaving = escapes(box.dest)
        assert not leaving, f"entries of DEST resolve outside it: {leaving}"
        assert snapshot(box.base, box.dest) == before, "something outside DEST changed"


@PROPERTY_SETTINGS
@given(MEMBER_LISTS)
@example([Member("a", "file", data=b"1"), Member("h", "hardlink", linkname="missing")])
@example([Member("a", "file", data=b"1"), Member("a/b", "file", data=b"2")])
def test_an_archive_is_extracted_whole_or_refused_before_a_byte_lands(
    items: list[Member],
) -> None:
    with fresh_box(build(items)) as box:
        refusal: DataError | None = None
        try:
            report = extract(box.archive, box.dest)
        except (SecurityViolation, DataError) as exc:
            refusal = exc
        if refusal is not None:
            assert refusal.exit_code == 65
            left = sorted(os.listdir(box.dest)) if box.dest.exists() else []
            assert left == [], f"refused ({refusal.message}) after writing {left}"
            return
        assert box.dest.is_dir()
        assert report.members == len(items)
