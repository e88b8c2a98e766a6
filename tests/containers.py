"""The container harness (not a test module): the images built and run for real, with podman.

There is no Docker engine on these machines; Debian's podman with runc builds and runs OCI
images as root. Everything here stays out of /etc and out of the repository:

- `Podman`: the engine with a private configuration (`CONTAINERS_CONF`: podman's default
  ulimits cannot be applied here, crun refuses the hybrid cgroup layout, so runc) and a
  private image store under the cache dir, so a stand-in tagged with a real image's name
  never reaches the machine's own store. `CACHE` is `$BAQUP_TEST_CACHE`, else
  `$XDG_CACHE_HOME/baqup-supervisor-tests`, else `~/.cache/baqup-supervisor-tests`.
- `python_base(podman)`: the image Dockerfile.base is built FROM. The pinned digest when it
  is in the store or can be pulled; else a stand-in: a Debian bookworm rootfs from
  `mmdebstrap` (python3, venv, pip; about a minute or two, cached by its package list and
  mirror), imported, with pip made usable the way the real image has it, tagged as the real
  name. The same rootfs is tagged `debian:bookworm-slim` for the Rust agent's build stage.
- `build_images(podman)`: the base and the agents from the checkout, each under a tag of
  this checkout (`localhost/baqup-test/NAME:KEY`); agent-fs and agent-postgres through
  their own build.sh (so their labels are the ones a release gets). Run by image ID, so a
  second test session building from another checkout cannot swap an image under a test.
  `build_rust(podman, images)`: examples/rust-agent's image, labels from `baqup labels`.
- `container_args(...)` and `start_container(...)`: `podman run` lines the way the
  controller starts an agent (`IMAGE ROLE`), and a background run as a `tests.jobs.Job`;
  `owned_by_agent(*dirs)`: host directories the image's UID 1000 may write.

Builds and the stand-in are serialized across sessions by a file lock in the cache dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import PYTHON, REPO
from tests.jobs import Job

__all__ = [
    "CACHE",
    "ContainerError",
    "Images",
    "Podman",
    "build_images",
    "build_rust",
    "container_args",
    "owned_by_agent",
    "python_base",
    "start_container",
]

CACHE = (
    Path(os.environ["BAQUP_TEST_CACHE"])
    if os.environ.get("BAQUP_TEST_CACHE")
    else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "baqup-supervisor-tests"
) / "containers"
# runroot holds the store's locks and must be shared by every session using the store
RUNROOT = Path("/run/baqup-supervisor-tests/containers")
VENV_BIN = Path(PYTHON).parent

CONTAINERS_CONF = """\
# written by tests/containers.py; never /etc's
[containers]
# the defaults raise RLIMIT_NOFILE past the hard limit, which these machines refuse
default_ulimits = []

[engine]
# no systemd as PID 1, no journald
cgroup_manager = "cgroupfs"
events_logger = "file"
"""

SUITE = "bookworm"
VARIANT = "apt"
PACKAGES = ("python3", "python3-venv", "python3-pip")
STANDIN_PYTHON = "docker.io/library/python:3.12-slim-bookworm"
STANDIN_DEBIAN = "docker.io/library/debian:bookworm-slim"
STANDIN_LABEL = "baqup-tests.standin"  # inherited by every image: not io.baqup.*
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# What the real python image has and a Debian rootfs lacks: pip allowed to install into the
# system Python (PEP 668 marker removed), `python` and `pip` on PATH, and the CA bundle pip
# needs to reach the package index from inside a build (the host's: its proxy's CA included).
# Bookworm's Python is 3.11.2, and redis needs async-timeout below 3.11.3; the real image's
# 3.12 does not, so the lock rightly leaves it out and the stand-in brings it (hashed).
STANDIN_CONTAINERFILE = """\
ARG ROOTFS
FROM ${ROOTFS}
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
RUN rm -f /usr/lib/python3*/EXTERNALLY-MANAGED \\
 && ln -sf /usr/bin/python3 /usr/local/bin/python \\
 && ln -sf /usr/bin/pip3 /usr/local/bin/pip \\
 && echo 'async-timeout==4.0.3 --hash=sha256:\\
7405140ff1230c310e51dc27b3145b9092d659ce68ff733fb0cefe3ee42be028' >/tmp/standin.txt \\
 && pip install --no-cache-dir --no-deps --require-hashes -r /tmp/standin.txt \\
 && rm /tmp/standin.txt
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
CMD ["python3"]
"""
BUILD_TIMEOUT = 900.0
RUN_TIMEOUT = 120.0


class ContainerError(AssertionError):
    """A podman or mmdebstrap step failed: the command and the tail of its output."""


def checkout_key() -> str:
    """Tags per checkout: sessions in two worktrees never build over each other's images."""
    return hashlib.sha256(str(REPO).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Podman:
    """podman with the private configuration and store; every call has a deadline."""

    home: Path = CACHE

    @property
    def prefix(self) -> list[str]:
        return [
            "podman",
            "--runtime",
            "runc",
            "--root",
            str(self.home / "storage"),
            "--runroot",
            str(RUNROOT),
        ]

    @property
    def env(self) -> dict[str, str]:
        conf = self.home / "containers.conf"
        if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
            self.home.mkdir(parents=True, exist_ok=True)
            partial = conf.with_suffix(".tmp")
            partial.write_text(CONTAINERS_CONF)
            partial.replace(conf)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BAQUP_", "CONTAINERS_"))}
        env["CONTAINERS_CONF"] = str(conf)
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def argv(self, *args: str) -> list[str]:
        return [*self.prefix, *args]

    def run(
        self,
        args: Sequence[str],
        *,
        timeout: float = RUN_TIMEOUT,
        check: bool = True,
        input_text: str | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.argv(*args),
            env=self.env,
            cwd=cwd,
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise ContainerError(failure(self.argv(*args), result))
        return result

    def ok(self, args: Sequence[str], timeout: float = RUN_TIMEOUT) -> bool:
        try:
            return self.run(args, timeout=timeout, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def inspect(self, reference: str) -> dict[str, Any]:
        result = self.run(["image", "inspect", reference])
        (image,) = json.loads(result.stdout)
        found: dict[str, Any] = image
        return found

    def labels(self, reference: str) -> dict[str, str]:
        labels: dict[str, str] = self.inspect(reference).get("Labels") or {}
        return labels

    def size(self, reference: str) -> int:
        return int(self.inspect(reference)["Size"])

    def image_id(self, reference: str) -> str | None:
        """The full ID (hex, as `build` returns it), or None when there is no such image."""
        result = self.run(["image", "inspect", "--format", "{{.Id}}", reference], check=False)
        return result.stdout.strip() if result.returncode == 0 else None

    def build(self, args: Sequence[str], *, context: Path = REPO) -> str:
        """`podman build --network host ARGS CONTEXT`; the new image's ID."""
        with tempfile.TemporaryDirectory(prefix="baqup-iid-") as scratch:
            iidfile = Path(scratch) / "iid"
            self.run(
                ["build", "--network", "host", "--iidfile", str(iidfile), *args, str(context)],
                timeout=BUILD_TIMEOUT,
                cwd=REPO,
            )
            return iidfile.read_text().strip().removeprefix("sha256:")

    def retire(self, old: str | None, new: str) -> None:
        """Remove the image a tag held before a rebuild (kept if still in use)."""
        if old and old != new:
            self.run(["rmi", old], check=False)


def failure(argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit {result.returncode}: {shlex.join(argv)[:300]}\n"
        f"stdout tail:\n{result.stdout[-2000:]}\nstderr tail:\n{result.stderr[-3000:]}"
    )


@contextlib.contextmanager
def cache_lock() -> Iterator[None]:
    """One builder at a time per cache dir (another session waits, then finds the cache)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- the base image: the real one, or the stand-in ------------------------------------------


def pinned_base() -> str:
    """Dockerfile.base's PYTHON_BASE default (the digest a release is built from)."""
    match = re.search(r"^ARG PYTHON_BASE=(\S+)$", (REPO / "Dockerfile.base").read_text(), re.M)
    if match is None:
        raise ContainerError("Dockerfile.base declares no ARG PYTHON_BASE=IMAGE")
    return match.group(1)


def qualified(reference: str) -> str:
    """A Docker Hub short name as podman must be told it (podman does not guess registries)."""
    first = reference.split("/", 1)[0]
    if "/" not in reference:
        return f"docker.io/library/{reference}"
    if "." in first or ":" in first or first == "localhost":
        return reference
    return f"docker.io/{reference}"


def debian_mirror() -> str:
    """The machine's Debian mirror (the first `bookworm` main source apt is configured with)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for path in sources:
        for stanza in path.read_text().split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith(("#", " ")):
                    fields[key.strip().lower()] = value.strip()
            if (
                SUITE in fields.get("suites", "").split()
                and "main" in fields.get("components", "").split()
            ):
                return fields["uris"].split()[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            words = line.split("#", 1)[0].split()
            if words[:1] == ["deb"] and SUITE in words and "main" in words:
                return next(w for w in words[1:] if "://" in w)
    return "http://deb.debian.org/debian"


def rootfs_key() -> str:
    """What the rootfs is made of: the suite, the variant, the package list, the mirror."""
    spec = {"suite": SUITE, "variant": VARIANT, "packages": PACKAGES, "mirror": debian_mirror()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def rootfs_tar() -> Path:
    """The mmdebstrap rootfs, built once per package list and kept in the cache."""
    key = rootfs_key()
    tar = CACHE / f"rootfs-{SUITE}-{key}.tar"
    if tar.exists():
        return tar
    for stale in CACHE.glob(f"rootfs-{SUITE}-*.tar"):
        stale.unlink()  # another package list's: it is never used again
    partial = tar.with_suffix(".partial.tar")
    argv = [
        "mmdebstrap",
        f"--variant={VARIANT}",
        f"--include={','.join(PACKAGES)}",
        SUITE,
        str(partial),
        debian_mirror(),
    ]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ContainerError(failure(argv, result))
    partial.replace(tar)
    return tar


def standin_key() -> str:
    """The rootfs, the finishing Containerfile and the CA bundle it copies."""
    ca = hashlib.sha256(HOST_CA_BUNDLE.read_bytes()).hexdigest()
    text = "\n".join([rootfs_key(), STANDIN_CONTAINERFILE, ca])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def standin(podman: Podman) -> str:
    """The stand-in python image (and debian:bookworm-slim), built unless already current."""
    key = standin_key()
    current = (
        podman.ok(["image", "exists", STANDIN_PYTHON])
        and podman.ok(["image", "exists", STANDIN_DEBIAN])
        and podman.labels(STANDIN_PYTHON).get(STANDIN_LABEL) == key
    )
    if current:
        return STANDIN_PYTHON
    rootfs = f"localhost/baqup-test/{SUITE}-rootfs:{rootfs_key()}"
    if not podman.ok(["image", "exists", rootfs]):
        podman.run(["import", str(rootfs_tar()), rootfs], timeout=BUILD_TIMEOUT)
    podman.run(["tag", rootfs, STANDIN_DEBIAN])
    with tempfile.TemporaryDirectory(prefix="baqup-standin-") as scratch:
        context = Path(scratch)
        (context / "Containerfile").write_text(STANDIN_CONTAINERFILE)
        shutil.copyfile(HOST_CA_BUNDLE, context / "ca-certificates.crt")
        podman.build(
            [
                "--build-arg",
                f"ROOTFS={rootfs}",
                "--label",
                f"{STANDIN_LABEL}={key}",
                "-t",
                STANDIN_PYTHON,
            ],
            context=context,
        )
    return STANDIN_PYTHON


def python_base(podman: Podman) -> str:
    """The real pinned base where the store has it or a registry gives it, else the stand-in."""
    real = qualified(pinned_base())
    if podman.ok(["image", "exists", real]) or podman.ok(["pull", "-q", real], timeout=120):
        return real
    return standin(podman)


# --- the images of the checkout ---------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    """Image IDs built from this checkout, and what they were built from."""

    python: str  # the reference Dockerfile.base was built FROM
    base: str
    base_tag: str
    fs: str
    postgres: str


def tag_of(name: str) -> str:
    return f"localhost/baqup-test/{name}:{checkout_key()}"


def require_tools() -> None:
    missing = [tool for tool in ("podman", "runc", "mmdebstrap") if shutil.which(tool) is None]
    if missing:
        raise ContainerError(
            f"{', '.join(missing)} not installed: run ./tests/run as root (it installs them)"
        )


def build_images(podman: Podman) -> Images:
    require_tools()
    with cache_lock():
        python = python_base(podman)
        base_tag = tag_of("agent-base")
        old = podman.image_id(base_tag)
        base = podman.build(
            ["-f", "Dockerfile.base", "--build-arg", f"PYTHON_BASE={python}", "-t", base_tag]
        )
        agents = {}
        for agent in ("agent-fs", "agent-postgres"):
            previous = podman.image_id(tag_of(agent))
            agents[agent] = build_script(podman, agent, tag_of(agent), base_tag)
            podman.retire(previous, agents[agent])
        podman.retire(old, base)
    return Images(python, base, base_tag, agents["agent-fs"], agents["agent-postgres"])


def build_rust(podman: Podman, images: Images) -> str:
    """examples/rust-agent's image: cargo in a debian:bookworm-slim stage, then the base."""
    tag = tag_of("agent-rust")
    with cache_lock():
        old = podman.image_id(tag)
        image = podman.build(
            [
                "-f",
                "examples/rust-agent/Dockerfile",
                "--build-arg",
                f"BASE={images.base_tag}",
                *label_args(REPO / "examples" / "rust-agent" / "agent-schema.json"),
                "-t",
                tag,
            ]
        )
        podman.retire(old, image)
    return image


def build_script(podman: Podman, agent: str, tag: str, base: str) -> str:
    """docker/AGENT/build.sh --build with podman as the engine; the image's ID."""
    with tempfile.TemporaryDirectory(prefix="baqup-iid-") as scratch:
        iidfile = Path(scratch) / "iid"
        env = podman.env
        env.update(DOCKER=shlex.join(podman.prefix), TAG=tag)
        argv = [
            str(REPO / "docker" / agent / "build.sh"),
            "--build",
            "--network",
            "host",
            "--build-arg",
            f"BASE={base}",
            "--iidfile",
            str(iidfile),
        ]
        result = subprocess.run(
            argv,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise ContainerError(failure(argv, result))
        return iidfile.read_text().strip().removeprefix("sha256:")


def label_args(schema: Path) -> list[str]:
    """`--label KEY=VALUE` for every io.baqup.* label `baqup labels` derives from a schema."""
    result = subprocess.run(
        [str(VENV_BIN / "baqup"), "labels", "--schema", str(schema), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    labels: dict[str, str] = json.loads(result.stdout)
    return [w for key, value in labels.items() for w in ("--label", f"{key}={value}")]


# --- running images ---------------------------------------------------------------------------


def container_args(
    image: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    volumes: Sequence[tuple[Path, str]] = (),
    network: str = "none",
    name: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """`run --rm --read-only` with the job's variables, as the controller starts an agent.

    A volume is (host path, "CONTAINER_PATH[:ro]").
    """
    line = ["run", "--rm", "--read-only", "--network", network]
    if name is not None:
        line += ["--name", name]
    for host, inside in volumes:
        line += ["-v", f"{host}:{inside}"]
    for key, value in env.items():
        line += ["-e", f"{key}={value}"]
    return [*line, *extra, image, *args]


def start_container(podman: Podman, args: Sequence[str], workdir: Path, name: str) -> Job:
    """`podman ARGS` in the background, its output in files under `workdir` (a Job)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = workdir / f"{name}.out", workdir / f"{name}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        process = subprocess.Popen(
            podman.argv(*args), env=podman.env, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
    return Job(process, out_path, err_path)


def owned_by_agent(*paths: Path) -> None:
    """Host directories the container's UID 1000 writes into."""
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, 1000, 1000)
