"""The baqup-run benchmark suite (run it through `benchmarks/run`).

Every figure is measured side by side with its peer in the same invocation: the
variants of a benchmark run interleaved (their order rotated each round), after a
warm-up, and the figure is the median over the measured rounds, reported as a ratio
to the peer where there is one. Inputs are created in a temporary directory; the bus
is a private redis-server on a free 127.0.0.1 port (and the file bus where noted),
stopped by PID at the end. Results: a table on stdout and benchmarks/results/latest.json.

The exit code is 0 even when a target is missed; it is 1 only when a benchmark
crashed (a job that failed, a tool that is missing, an exception).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HELPERS = HERE / "helpers"
RESULTS = HERE / "results"
PY = sys.executable
BAQUP_RUN = str(Path(PY).parent / "baqup-run")
CHILD_PY = [PY, "-S", "-I"]  # children written in Python start without site (fast)
MB = 1_000_000
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEVNULL = subprocess.DEVNULL
TIME_BIN = Path("/usr/bin/time") if Path("/usr/bin/time").exists() else None

HASH_SNIPPET = """
import json, sys, time
from baqup_supervisor.checksum import hash_file
start = time.perf_counter()
digest = hash_file(sys.argv[1], sys.argv[2])
print(json.dumps({"digest": digest, "seconds": time.perf_counter() - start}))
"""
EXEC_WRAPPER = "import os, sys; os.execv(sys.argv[1], sys.argv[1:])"
IDLE_CHILD = 'echo x > "$BAQUP_WORK_DIR/a"; while [ ! -e "$1" ]; do sleep 0.1; done'


class BenchError(Exception):
    """A benchmark could not produce its figure (a crash, not a missed target)."""


@dataclass(frozen=True)
class Sizes:
    quick: bool
    runs: int  # measured rounds per figure (after one warm-up round)
    small_files: int
    large_files: int
    large_file_size: int
    startup_runs: int
    signals: int
    control_lines: int
    memory_small: int
    memory_repeat: int  # the large artifact is the input this many times over
    events_many: int
    fleet: int
    fleet_steps: int
    fleet_step_seconds: float
    input_size: int


FULL = Sizes(
    quick=False,
    runs=5,
    small_files=50_000,
    large_files=4,
    large_file_size=128 * MIB,
    startup_runs=20,
    signals=1000,
    control_lines=1_000_000,
    memory_small=10 * MB,
    memory_repeat=5,
    events_many=1_000_000,
    fleet=200,
    fleet_steps=4,
    fleet_step_seconds=5.0,
    input_size=1 << 30,
)
QUICK = Sizes(
    quick=True,
    runs=3,
    small_files=2_000,
    large_files=2,
    large_file_size=4 * MIB,
    startup_runs=5,
    signals=200,
    control_lines=50_000,
    memory_small=10 * MB,
    memory_repeat=3,
    events_many=50_000,
    fleet=20,
    fleet_steps=3,
    fleet_step_seconds=2.0,
    input_size=64 * MIB,
)


@dataclass
class Figure:
    bench: str
    name: str
    value: float | None
    unit: str
    target: str = ""
    ok: bool | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        if self.ok is None:
            return "info"
        return "PASS" if self.ok else "MISS"


@dataclass
class Ran:
    wall: float
    rc: int
    maxrss_kb: int
    hwm_kb: int
    spawn_ns: int
    stderr: str

    @property
    def rss_mb(self) -> float:
        return (self.maxrss_kb or self.hwm_kb) / 1024


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return float(ordered[index])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def first_child(pid: int) -> int | None:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def vm_hwm_kb(pid: int) -> int:
    try:
        for row in Path(f"/proc/{pid}/status").read_text().splitlines():
            if row.startswith("VmHWM:"):
                return int(row.split()[1])
    except OSError:
        pass
    return 0


def log(message: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


class LoadMonitor:
    """CPU used by processes that are not this run's (other work on the machine).

    Every second, /proc is read: the CPU ticks gained by every user-space process that
    does not descend from this harness (kernel threads excluded) are summed. A result
    taken while other work shares the CPUs is reported with that load beside it.
    """

    def __init__(self) -> None:
        self.root = os.getpid()
        self.foreign_ticks = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last: dict[int, int] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def snapshot() -> dict[int, tuple[int, int]]:
        out = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                text = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = text.rsplit(")", 1)[1].split()
            out[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        return out

    def _foreign(self, snap: dict[int, tuple[int, int]]) -> dict[int, int]:
        ours: dict[int, bool] = {}

        def mine(pid: int) -> bool:
            chain = []
            while pid not in ours:
                if pid == self.root:
                    ours[pid] = True
                    break
                if pid <= 2 or pid not in snap:
                    ours[pid] = False
                    break
                chain.append(pid)
                pid = snap[pid][0]
            verdict = ours[pid]
            for item in chain:
                ours[item] = verdict
            return verdict

        return {
            pid: ticks
            for pid, (ppid, ticks) in snap.items()
            if pid != 2 and ppid != 2 and not mine(pid)
        }

    def _run(self) -> None:
        self._last = self._foreign(self.snapshot())
        while not self._stop.wait(1.0):
            now = self._foreign(self.snapshot())
            gained = sum(t - self._last.get(pid, 0) for pid, t in now.items())
            with self._lock:
                self.foreign_ticks += max(0, gained)
            self._last = now

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def ticks(self) -> int:
        with self._lock:
            return self.foreign_ticks


class RedisServer:
    """A private redis-server on a free loopback port, stopped by its PID."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=0, socket_timeout=30)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.port = free_port()
            self.proc = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.directory),
                    "--maxclients",
                    "4000",
                    "--logfile",
                    str(self.directory / "redis.log"),
                ],
                stdin=DEVNULL,
                stdout=DEVNULL,
                stderr=DEVNULL,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(redis.RedisError, OSError):
                    if self.client().ping():
                        return
                time.sleep(0.05)
            self.stop()
        raise BenchError("redis-server did not start (see its log in the temp dir)")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


class Bench:
    def __init__(self, sizes: Sizes, tmp: Path) -> None:
        self.sizes = sizes
        self.tmp = tmp
        self.staging = tmp / "staging"
        self.staging.mkdir()
        self.filebus = tmp / "filebus"
        self.figures: list[Figure] = []
        self.crashes: list[dict[str, str]] = []
        self.extra: dict[str, Any] = {}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.redis = RedisServer(tmp / "redis")
        self.input = tmp / "input.sql"
        self.keep = False
        self.tini = shutil.which("tini")

    # --- plumbing -----------------------------------------------------------------

    def add(self, bench: str, name: str, value: float | None, unit: str, **kw: Any) -> Figure:
        figure = Figure(bench, name, value, unit, **kw)
        self.figures.append(figure)
        shown = "-" if value is None else f"{value:.4g} {unit}"
        log(f"{bench}: {name} = {shown} {figure.target} {figure.verdict}")
        return figure

    def job_env(
        self,
        bus: str | None = None,
        *,
        prefix: str = "bench:",
        agent_id: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> tuple[dict[str, str], Path]:
        """A job's environment (fresh uuid4 job id) and its job dir."""
        job_id = str(uuid.uuid4())
        env = {k: v for k, v in os.environ.items() if not k.startswith("BAQUP_")}
        env.update(
            BAQUP_JOB_ID=job_id,
            BAQUP_STAGING_DIR=str(self.staging),
            BAQUP_BUS_URL=bus or self.redis.url,
            BAQUP_BUS_KEY_PREFIX=prefix,
            BAQUP_AGENT_LOG_LEVEL="warn",
            BAQUP_BUS_FALLBACK_DIR=str(self.tmp / "fallback"),
        )
        if agent_id:
            env["BAQUP_AGENT_ID"] = agent_id
        env.update(extra or {})
        return env, self.staging / job_id

    @property
    def file_bus(self) -> str:
        return f"file://{self.filebus}"

    def spawn(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("stdin", DEVNULL)
        kw.setdefault("stdout", DEVNULL)
        proc = subprocess.Popen(list(argv), **kw)
        self.procs[proc.pid] = proc
        return proc

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        self.procs.pop(proc.pid, None)

    def run(
        self,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        *,
        timeout: float = 900,
        poll_rss: bool = False,
        check: bool = True,
    ) -> Ran:
        """Run to the end: wall time, exit code and, with `poll_rss`, peak RSS.

        Peak RSS comes from GNU time's %M (wait4's ru_maxrss of a process that time
        forked itself) and from VmHWM polled every 50 ms as a cross-check. wait4 on a
        process spawned from this (large) harness is not used: Linux charges the
        harness's own high-water mark, inherited through vfork, to the child.
        """
        timed = poll_rss and TIME_BIN is not None
        with (
            tempfile.TemporaryFile(dir=self.tmp) as err,
            tempfile.NamedTemporaryFile(dir=self.tmp, mode="r") as rss_file,
        ):
            if timed:
                argv = [str(TIME_BIN), "-f", "%M", "-o", rss_file.name, *argv]
            spawn_ns = time.time_ns()
            started = time.perf_counter()
            proc = self.spawn(argv, env=env, stderr=err)
            hwm = [0]
            target = [proc.pid]
            done = threading.Event()

            def watch() -> None:
                while not done.wait(0.05):
                    if timed and target[0] == proc.pid:
                        target[0] = first_child(proc.pid) or proc.pid
                    if target[0] != proc.pid or not timed:
                        hwm[0] = max(hwm[0], vm_hwm_kb(target[0]))

            watcher = threading.Thread(target=watch, daemon=True) if poll_rss else None
            if watcher:
                watcher.start()
            killer = threading.Timer(timeout, self._kill_pids, (target, proc))
            killer.start()
            try:
                _, status, _ = os.wait4(proc.pid, 0)
            finally:
                killer.cancel()
                done.set()
            wall = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)
            self.forget(proc)
            if watcher:
                watcher.join()
            err.seek(0)
            text = err.read()[-4000:].decode("utf-8", "replace")
            maxrss = 0
            if timed:
                rows = rss_file.read().split()
                maxrss = int(rows[-1]) if rows and rows[-1].isdigit() else 0
        ran = Ran(wall, proc.returncode, maxrss, hwm[0], spawn_ns, text)
        if check and ran.rc != 0:
            raise BenchError(f"{' '.join(map(str, argv[:8]))} exited {ran.rc}: {text[-1500:]}")
        return ran

    def _kill_pids(self, target: list[int], proc: subprocess.Popen[bytes]) -> None:
        for pid in {target[0], proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)

    def cleanup_processes(self) -> None:
        """End every process this run started and that is still running, by PID."""
        alive = [p for p in self.procs.values() if p.poll() is None]
        for proc in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in alive:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill(proc)
                proc.wait()
        self.procs.clear()

    def rounds(
        self,
        variants: dict[str, Callable[[], dict[str, Any]]],
        runs: int,
        warmup: dict[str, Callable[[], dict[str, Any]]] | None = None,
        label: str = "",
    ) -> dict[str, list[dict[str, Any]]]:
        """One warm-up round, then `runs` rounds of every variant, the order rotated."""
        for name, fn in (warmup or variants).items():
            log(f"{label} warm-up {name}")
            fn()
        names = list(variants)
        out: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for index in range(runs):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                result = variants[name]()
                out[name].append(result)
                shown = {k: round(v, 4) for k, v in result.items() if isinstance(v, float)}
                log(f"{label} round {index + 1}/{runs} {name}: {shown}")
        return out

    @staticmethod
    def med(results: list[dict[str, Any]], key: str) -> float:
        return median([r[key] for r in results])

    def remove_job(self, job_dir: Path) -> None:
        shutil.rmtree(job_dir, ignore_errors=True)

    # --- inputs -------------------------------------------------------------------

    def make_input(self) -> None:
        size = self.sizes.input_size
        log(f"generating {size / MIB:.0f} MiB of pseudo-SQL input")
        self.run([PY, str(HELPERS / "gensql.py"), str(self.input), str(size)], timeout=1800)
        with self.input.open("rb") as src, (self.tmp / "input-small.sql").open("wb") as dst:
            dst.write(src.read(self.sizes.memory_small))

    def make_tree(self) -> Path:
        tree = self.tmp / "tree"
        s = self.sizes
        with self.input.open("rb") as handle:
            blob = handle.read(8 * MIB)
        for index in range(s.small_files):
            directory = tree / f"d{index // 100:04d}"
            if index % 100 == 0:
                directory.mkdir(parents=True)
            size = 200 + (index * 7919) % 3900
            offset = (index * 4099) % (len(blob) - size)
            (directory / f"f{index:05d}.txt").write_bytes(blob[offset : offset + size])
        large = tree / "large"
        large.mkdir()
        with self.input.open("rb") as handle:
            for index in range(s.large_files):
                (large / f"blob{index}.bin").write_bytes(handle.read(s.large_file_size))
        return tree

    # --- 1. whole job ---------------------------------------------------------------

    def bench_job(self) -> None:
        s = self.sizes
        tree = self.make_tree()
        tree_bytes = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())
        peer_tar = self.tmp / "peer.tar"

        def ours() -> dict[str, Any]:
            env, job_dir = self.job_env()
            work = job_dir / ".staging"
            ran = self.run(
                [BAQUP_RUN, "--", "tar", "-cf", f"{work}/x.tar", "-C", str(tree), "."], env
            )
            if not (job_dir / "manifest.json").exists():
                raise BenchError("baqup-run exited 0 without a manifest")
            self.remove_job(job_dir)
            os.sync()
            return {"wall": ran.wall, "rss_mb": ran.rss_mb}

        def shell(script: str) -> Callable[[], dict[str, Any]]:
            def variant() -> dict[str, Any]:
                ran = self.run(["sh", "-c", script, "sh", str(peer_tar), str(tree)])
                peer_tar.unlink()
                os.sync()
                return {"wall": ran.wall}

            return variant

        bare = 'tar -cf "$1" -C "$2" . && sha256sum "$1" >/dev/null'
        synced = 'tar -cf "$1" -C "$2" . && sha256sum "$1" >/dev/null && sync "$1"'
        res = self.rounds(
            {"baqup-run": ours, "tar+sha256sum": shell(bare), "tar+sha256sum+sync": shell(synced)},
            s.runs,
            label="1.job",
        )
        o, p, ps = (self.med(res[k], "wall") for k in res)
        detail = {
            "files": s.small_files + s.large_files,
            "tree_bytes": tree_bytes,
            "runs": res,
        }
        ratio = o / p
        self.add(
            "1.job",
            "whole job wall time, baqup-run / (tar; sha256sum)",
            ratio,
            "x",
            target="<= 1.05",
            ok=ratio <= 1.05,
            detail=detail,
        )
        self.add("1.job", "baqup-run -- tar (wall)", o, "s")
        self.add("1.job", "tar; sha256sum (wall)", p, "s")
        self.add("1.job", "baqup-run / (tar; sha256sum; sync FILE)", o / ps, "x")
        shutil.rmtree(tree, ignore_errors=True)

    # --- 2. start-up ------------------------------------------------------------------

    def bench_startup(self) -> None:
        s = self.sizes
        stamp = self.tmp / "stamp"
        probe = [*CHILD_PY, str(HELPERS / "stamp.py")]

        def wrapped(prefix: list[str]) -> Callable[[], dict[str, Any]]:
            def variant() -> dict[str, Any]:
                ran = self.run([*prefix, *probe, str(stamp)])
                first = int(stamp.read_text())
                stamp.unlink()
                return {"start_ms": (first - ran.spawn_ns) / 1e6, "wall_ms": ran.wall * 1e3}

            return variant

        def job(bus: str) -> Callable[[], dict[str, Any]]:
            def variant() -> dict[str, Any]:
                env, job_dir = self.job_env(bus)
                ran = self.run([BAQUP_RUN, "--", *probe, f"{job_dir}/.staging/t0"], env)
                first = int((job_dir / "t0").read_text())
                self.remove_job(job_dir)
                return {"start_ms": (first - ran.spawn_ns) / 1e6, "wall_ms": ran.wall * 1e3}

            return variant

        def wall(argv: list[str]) -> Callable[[], dict[str, Any]]:
            def variant() -> dict[str, Any]:
                return {"wall_ms": self.run(argv).wall * 1e3}

            return variant

        variants = {
            "direct": wrapped([]),
            "env": wrapped(["env"]),
            "python exec wrapper": wrapped([PY, "-c", EXEC_WRAPPER]),
            "baqup-run file bus": job(self.file_bus),
            "baqup-run redis": job(self.redis.url),
            "baqup-run --help": wall([BAQUP_RUN, "--help"]),
            "python -c pass": wall([PY, "-c", "pass"]),
        }
        if self.tini:
            variants["tini"] = wrapped([self.tini, "-s", "--"])
        else:
            self.extra["tini"] = "not installed: tini figure skipped"
        res = self.rounds(variants, s.startup_runs, label="2.startup")
        base = self.med(res["direct"], "start_ms")
        added = {k: self.med(v, "start_ms") - base for k, v in res.items() if "start_ms" in v[0]}
        detail = {"direct_start_ms": base, "runs": res}
        for name in ("baqup-run file bus", "baqup-run redis"):
            value = added[name]
            self.add(
                "2.startup",
                f"start-up added, {name.split(' ', 1)[1]} (vs direct exec)",
                value,
                "ms",
                target="< 150 ms",
                ok=value < 150,
                detail=detail if name.endswith("redis") else {},
            )
        for name in ("python exec wrapper", "env", "tini"):
            if name in added:
                self.add("2.startup", f"start-up added, {name}", added[name], "ms")
        self.add(
            "2.startup",
            "baqup-run (redis) added / python exec wrapper added",
            added["baqup-run redis"] / max(added["python exec wrapper"], 1e-3),
            "x",
        )
        self.add(
            "2.startup",
            "no-op job end to end, redis (wall)",
            self.med(res["baqup-run redis"], "wall_ms"),
            "ms",
        )
        help_ms = self.med(res["baqup-run --help"], "wall_ms")
        pass_ms = self.med(res["python -c pass"], "wall_ms")
        self.add(
            "2.startup", "baqup-run --help (wall)", help_ms, "ms", target="< 60 ms", ok=help_ms < 60
        )
        self.add("2.startup", "python -c pass (wall)", pass_ms, "ms")
        self.add("2.startup", "--help / python -c pass", help_ms / pass_ms, "x")

    # --- 3. SIGUSR1 -> heartbeat in Redis ----------------------------------------------

    def signal_latencies(self, pid: int, key: str, count: int, warm: int = 20) -> dict[str, Any]:
        client = self.redis.client()
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(f"__keyspace@0__:{key}")
        settle = time.monotonic() + 0.3
        while time.monotonic() < settle:
            pubsub.get_message(timeout=0.05)
        latencies: list[float] = []
        missed = 0
        for index in range(warm + count):
            started = time.perf_counter()
            os.kill(pid, signal.SIGUSR1)
            deadline = started + 2.0
            seen = False
            while not seen:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                message = pubsub.get_message(timeout=left)
                seen = bool(message and message["type"] == "message")
            took = (time.perf_counter() - started) * 1e3
            if index >= warm:
                latencies.append(took)
                missed += not seen
            time.sleep(0.002)
        pubsub.close()
        client.close()
        return {
            "p50_ms": median(latencies),
            "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies),
            "missed": missed,
        }

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise BenchError(f"timed out waiting for {what}")
            time.sleep(0.02)

    def bench_heartbeat(self) -> None:
        s = self.sizes
        client = self.redis.client()
        client.config_set("notify-keyspace-events", "Kh")
        flood = str(HELPERS / "flood.py")

        def ours(loaded: bool, count: int) -> dict[str, Any]:
            agent = f"hb-{uuid.uuid4().hex[:8]}"
            env, job_dir = self.job_env(
                agent_id=agent, extra={"BAQUP_AGENT_HEARTBEAT_INTERVAL": "600"}
            )
            stop = self.tmp / f"stop-{agent}"
            if loaded:
                child = [*CHILD_PY, flood, "until", "0", str(self.tmp / "flood-hb.json"), str(stop)]
            else:
                child = ["sh", "-c", IDLE_CHILD, "sh", str(stop)]
            key = f"bench:heartbeat:{agent}"
            with tempfile.TemporaryFile(dir=self.tmp) as err:
                proc = self.spawn([BAQUP_RUN, "--", *child], env=env, stderr=err)
                try:
                    self.wait_for(lambda: client.hget(key, "state") == b"running", "RUNNING")
                    time.sleep(0.3)
                    result = self.signal_latencies(proc.pid, key, count)
                finally:
                    stop.touch()
                    code = proc.wait(timeout=60)
                    self.forget(proc)
                if code != 0:
                    err.seek(0)
                    raise BenchError(f"heartbeat job exited {code}: {err.read()[-1500:]!r}")
            self.remove_job(job_dir)
            stop.unlink()
            return result

        def peer(count: int) -> dict[str, Any]:
            key = f"peer:heartbeat:{uuid.uuid4().hex[:8]}"
            proc = self.spawn([PY, str(HELPERS / "hb_peer.py"), self.redis.url, key])
            try:
                self.wait_for(lambda: client.exists(key) == 1, "the peer's first heartbeat")
                return self.signal_latencies(proc.pid, key, count)
            finally:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
                self.forget(proc)

        n = s.signals
        res = self.rounds(
            {
                "baqup-run idle": lambda: ours(False, n),
                "python peer": lambda: peer(n),
                "baqup-run under load": lambda: ours(True, n),
            },
            s.runs,
            warmup={
                "baqup-run idle": lambda: ours(False, 50),
                "python peer": lambda: peer(50),
            },
            label="3.heartbeat",
        )
        idle, peer_res, loaded = (
            res["baqup-run idle"],
            res["python peer"],
            res["baqup-run under load"],
        )
        p99 = self.med(idle, "p99_ms")
        detail = {"signals_per_run": n, "runs": res}
        self.add(
            "3.heartbeat",
            f"SIGUSR1 -> heartbeat visible, p99 ({n} signals)",
            p99,
            "ms",
            target="< 20 ms",
            ok=p99 < 20 and sum(r["missed"] for r in idle) == 0,
            detail=detail,
        )
        self.add("3.heartbeat", "SIGUSR1 -> heartbeat visible, p50", self.med(idle, "p50_ms"), "ms")
        self.add(
            "3.heartbeat",
            "python peer (sigwait + redis-py), p99",
            self.med(peer_res, "p99_ms"),
            "ms",
        )
        self.add("3.heartbeat", "python peer, p50", self.med(peer_res, "p50_ms"), "ms")
        self.add(
            "3.heartbeat", "p99 baqup-run / python peer", p99 / self.med(peer_res, "p99_ms"), "x"
        )
        self.add(
            "3.heartbeat",
            "p99 while the child floods the control channel",
            self.med(loaded, "p99_ms"),
            "ms",
        )
        self.add(
            "3.heartbeat",
            "p50 while the child floods the control channel",
            self.med(loaded, "p50_ms"),
            "ms",
        )
        self.add(
            "3.heartbeat",
            "signals without a visible heartbeat within 2 s",
            float(sum(r["missed"] for r in idle + loaded)),
            "",
        )
        client.close()

    # --- 4. control channel --------------------------------------------------------------

    def flood_job(self, mode: str, count: int, *, commands: bool = False) -> dict[str, Any]:
        client = self.redis.client()
        result = self.tmp / "flood.json"
        env, job_dir = self.job_env()
        if commands:
            client.config_resetstat()
        ran = self.run(
            [BAQUP_RUN, "--", *CHILD_PY, str(HELPERS / "flood.py"), mode, str(count), str(result)],
            env,
            poll_rss=True,
        )
        out: dict[str, Any] = {"wall": ran.wall, "rss_mb": ran.rss_mb}
        if commands:
            stats = client.info("commandstats")
            calls = sum(
                int(v["calls"])
                for k, v in stats.items()
                if k not in ("cmdstat_info", "cmdstat_config")
            )
            out.update(commands=calls, commands_per_1000=calls / count * 1000)
        child = json.loads(result.read_text())
        out.update(
            lines_per_s=child["lines"] / child["seconds"],
            max_write_ms=child["max_write_ms"],
            writes_over_1ms=child["writes_over_1ms"],
            writes_over_10ms=child["writes_over_10ms"],
        )
        result.unlink()
        self.remove_job(job_dir)
        client.close()
        return out

    def bench_control(self) -> None:
        s = self.sizes
        n = s.control_lines
        result = self.tmp / "flood-peer.json"

        def peer() -> dict[str, Any]:
            script = '"$0" -S -I "$1" mixed "$2" "$3" 3>&1 >/dev/null | cat >/dev/null'
            ran = self.run(["sh", "-c", script, PY, str(HELPERS / "flood.py"), str(n), str(result)])
            child = json.loads(result.read_text())
            return {
                "wall": ran.wall,
                "lines_per_s": child["lines"] / child["seconds"],
                "max_write_ms": child["max_write_ms"],
                "writes_over_1ms": child["writes_over_1ms"],
                "writes_over_10ms": child["writes_over_10ms"],
            }

        res = self.rounds(
            {"baqup-run": lambda: self.flood_job("mixed", n, commands=True), "raw pipe": peer},
            s.runs,
            label="4.control",
        )
        ours, raw = res["baqup-run"], res["raw pipe"]
        rate = self.med(ours, "lines_per_s")
        worst = self.med(ours, "max_write_ms")
        detail = {"lines": n, "runs": res}
        self.add(
            "4.control",
            f"lines/s consumed ({n} progress+event lines)",
            rate,
            "lines/s",
            detail=detail,
        )
        self.add(
            "4.control",
            "raw pipe (cat >/dev/null) lines/s",
            self.med(raw, "lines_per_s"),
            "lines/s",
        )
        self.add(
            "4.control", "lines/s baqup-run / raw pipe", rate / self.med(raw, "lines_per_s"), "x"
        )
        self.add(
            "4.control",
            "child's max blocked write",
            worst,
            "ms",
            target="<= 10 ms",
            ok=worst <= 10,
            detail={"worst_run_ms": max(r["max_write_ms"] for r in ours)},
        )
        self.add("4.control", "raw pipe max blocked write", self.med(raw, "max_write_ms"), "ms")
        for name, rows in (("baqup-run", ours), ("raw pipe", raw)):
            for limit in (10, 1):
                self.add(
                    "4.control",
                    f"{name}: writes blocked > {limit} ms (count)",
                    self.med(rows, f"writes_over_{limit}ms"),
                    "",
                )
        self.add(
            "4.control",
            "Redis commands per 1,000 lines",
            self.med(ours, "commands_per_1000"),
            "cmds",
        )
        self.add("4.control", "baqup-run job wall time", self.med(ours, "wall"), "s")

    # --- 5. memory -------------------------------------------------------------------------

    def capture(self, sources: list[str], *, extra: dict[str, str] | None = None) -> dict[str, Any]:
        env, job_dir = self.job_env(
            extra={
                "BAQUP_ARTIFACT_COMPRESS_ALGORITHM": "zstd",
                "BAQUP_ARTIFACT_COMPRESS_LEVEL": "3",
                "BAQUP_ARTIFACT_CHECKSUM_ALGORITHM": "sha256",
                **(extra or {}),
            }
        )
        ran = self.run(
            [BAQUP_RUN, "--stdout-artifact", "dump.sql", "--", "cat", *sources], env, poll_rss=True
        )
        manifest = json.loads((job_dir / "manifest.json").read_text())
        artifact = manifest["artifacts"][0]
        raw = sum(os.path.getsize(p) for p in sources)
        return {
            "wall": ran.wall,
            "rss_mb": ran.rss_mb,
            "time_maxrss_mb": ran.maxrss_kb / 1024,
            "vmhwm_mb": ran.hwm_kb / 1024,
            "raw_bytes": raw,
            "stored_bytes": artifact["size_bytes"],
            "mb_per_s": raw / ran.wall / MB,
            "job_dir": str(job_dir),
            "checksum": artifact["checksum"]["value"],
        }

    def bench_memory(self) -> None:
        s = self.sizes
        small = str(self.tmp / "input-small.sql")
        big = [str(self.input)] * s.memory_repeat

        def cap(sources: list[str]) -> Callable[[], dict[str, Any]]:
            def variant() -> dict[str, Any]:
                out = self.capture(sources)
                self.remove_job(Path(out.pop("job_dir")))
                os.sync()
                return out

            return variant

        res = self.rounds(
            {
                "artifact small": cap([small]),
                "artifact large": cap(big),
                "events few": lambda: self.flood_job("events", 10),
                "events many": lambda: self.flood_job("events", s.events_many),
            },
            s.runs,
            warmup={
                "artifact small": cap([small]),
                "events few": lambda: self.flood_job("events", 10),
            },
            label="5.memory",
        )
        large_bytes = os.path.getsize(self.input) * s.memory_repeat
        label_small = f"{s.memory_small / MB:.0f} MB"
        label_large = (
            f"{large_bytes / (1 << 30):.2f} GiB"
            if large_bytes >= 1 << 30
            else (f"{large_bytes / MB:.0f} MB")
        )
        rows = [
            ("artifact small", f"peak RSS, --stdout-artifact of {label_small}"),
            ("artifact large", f"peak RSS, --stdout-artifact of {label_large}"),
            ("events few", "peak RSS, 10 events"),
            ("events many", f"peak RSS, {s.events_many:,} events"),
        ]
        for key, name in rows:
            value = self.med(res[key], "rss_mb")
            self.add(
                "5.memory",
                name,
                value,
                "MB",
                target="< 100 MB",
                ok=value < 100,
                detail={"runs": res[key]} if key.endswith("large") else {},
            )
        for a, b, what in (
            ("artifact large", "artifact small", "artifact"),
            ("events many", "events few", "events"),
        ):
            ratio = self.med(res[a], "rss_mb") / self.med(res[b], "rss_mb")
            self.add(
                "5.memory",
                f"flatness: RSS {a} / {b}",
                ratio,
                "x",
                target="<= 1.10 (flat)",
                ok=ratio <= 1.10,
                detail={"what": what},
            )
        self.add(
            "5.memory",
            f"capture throughput at {label_large}",
            self.med(res["artifact large"], "mb_per_s"),
            "MB/s",
        )

    # --- 6. fleet ----------------------------------------------------------------------------

    def fleet_run(self, count: int, steps: int, step_seconds: float) -> dict[str, Any]:
        """`count` concurrent jobs: launched at once, released together, heartbeats watched.

        Every heartbeat key is polled (one pipelined HMGET of `sequence` and `timestamp`
        per key, every 0.25 s): gaps are taken between the senders' own timestamps of
        consecutive observed sequences, so a slow harness cannot make a beat look late,
        and a beat missed between two polls only makes a gap look longer, never shorter.
        Keyspace notifications of HSET, stamped on arrival, give a second view (when each
        beat became visible). The jobs' children wait for a GO file until every job is
        RUNNING, then each reports STEPS progress lines STEP_SECONDS apart: that span,
        all jobs up, is the steady state where Redis load is measured. Redis commands are
        counted from INFO commandstats without the harness's own (INFO, CONFIG, HGET, HMGET).
        """
        client = self.redis.client()
        client.config_set("notify-keyspace-events", "Kh")
        interval = 2.0
        prefix = f"fleet{uuid.uuid4().hex[:6]}:"
        agents = [f"agent-{i:04d}" for i in range(count)]
        keys = [f"{prefix}heartbeat:{a}" for a in agents]
        arrivals: dict[str, list[float]] = defaultdict(list)
        stamped: dict[int, dict[int, float]] = defaultdict(dict)  # agent -> sequence -> ts
        stop = threading.Event()
        ready = threading.Event()

        def listen() -> None:
            sub = self.redis.client().pubsub()
            sub.psubscribe(f"__keyspace@0__:{prefix}heartbeat:*")
            ready.set()
            while not stop.is_set():
                message = sub.get_message(timeout=0.2)
                if message and message["type"] == "pmessage" and message["data"] == b"hset":
                    agent = message["channel"].decode().rsplit(":", 1)[1]
                    arrivals[agent].append(time.monotonic())
            sub.close()

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        ready.wait(10)
        time.sleep(0.3)
        logs = self.tmp / "fleet-logs"
        logs.mkdir(exist_ok=True)
        go = self.tmp / f"go-{prefix[:-1]}"
        procs: list[subprocess.Popen[bytes]] = []
        job_dirs = []
        samples: list[dict[str, Any]] = []
        harness = {"cmdstat_info", "cmdstat_config", "cmdstat_hget", "cmdstat_hmget"}

        def poll() -> list[bytes | None]:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, "sequence", "timestamp", "state")
            states = []
            for index, (seq, stamp, state) in enumerate(pipe.execute()):
                if seq is not None and stamp is not None:
                    stamped[index][int(seq)] = datetime.datetime.fromisoformat(
                        stamp.decode().replace("Z", "+00:00")
                    ).timestamp()
                states.append(state)
            return states

        def sample() -> None:
            stats = client.info("commandstats")
            alive = [p for p in procs if p.poll() is None]
            samples.append(
                {
                    "t": time.monotonic(),
                    "redis_ticks": cpu_ticks(self.redis.pid),
                    "commands": sum(int(v["calls"]) for k, v in stats.items() if k not in harness),
                    "alive": len(alive),
                    "agent_ticks": sum(cpu_ticks(p.pid) for p in alive),
                }
            )

        child = [*CHILD_PY, str(HELPERS / "fleet_child.py"), str(go)]
        sample()
        launched_at = time.monotonic()
        try:
            for index, agent in enumerate(agents):
                env, job_dir = self.job_env(
                    prefix=prefix,
                    agent_id=agent,
                    extra={"BAQUP_AGENT_HEARTBEAT_INTERVAL": str(int(interval))},
                )
                job_dirs.append(job_dir)
                with (logs / f"{index}.log").open("wb") as err:
                    procs.append(
                        self.spawn(
                            [BAQUP_RUN, "--", *child, str(steps), str(step_seconds)],
                            env=env,
                            stderr=err,
                        )
                    )
                if index % 10 == 9:
                    poll()
            launch_seconds = time.monotonic() - launched_at
            deadline = time.monotonic() + 600
            while not all(state == b"running" for state in poll()):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise BenchError("the fleet's jobs did not all reach RUNNING")
                sample()
                time.sleep(0.25)
            all_running = time.monotonic()
            until = all_running + interval  # one whole interval with every job up
            while time.monotonic() < until:
                poll()
                sample()
                time.sleep(0.25)
            go.touch()
            released = time.monotonic()
            deadline = released + steps * step_seconds + 300
            while any(p.poll() is None for p in procs):
                if time.monotonic() > deadline:
                    raise BenchError("fleet jobs did not finish in time")
                poll()
                sample()
                time.sleep(0.25)
            poll()
            last_exit = time.monotonic()
        finally:
            stop.set()
            listener.join(5)
            for proc in procs:
                if proc.poll() is not None:  # the rest are ended by cleanup_processes
                    self.forget(proc)
            with contextlib.suppress(OSError):
                go.unlink()
        failed = [i for i, p in enumerate(procs) if p.returncode != 0]
        if failed:
            text = (logs / f"{failed[0]}.log").read_text(errors="replace")[-1500:]
            raise BenchError(f"{len(failed)} fleet jobs failed, e.g. #{failed[0]}: {text}")
        for job_dir in job_dirs:
            self.remove_job(job_dir)
        if not self.keep:
            shutil.rmtree(logs, ignore_errors=True)
        # The steady window in the senders' clock (wall) and in ours (monotonic).
        offset = time.time() - time.monotonic()
        window = (all_running, released + steps * step_seconds - 0.5)
        wall_window = (window[0] + offset, window[1] + offset)
        gaps_all: list[float] = []
        gaps_steady: list[float] = []
        arrival_gaps: list[float] = []
        unobserved = 0
        for index, agent in enumerate(agents):
            seen = sorted(stamped[index].items())
            if seen:
                unobserved += seen[-1][0] - len(seen)
            for (_, a), (_, b) in itertools.pairwise(seen):
                gaps_all.append(b - a)
                if a >= wall_window[0] and b <= wall_window[1]:
                    gaps_steady.append(b - a)
            arrival_gaps.extend(b - a for a, b in itertools.pairwise(arrivals.get(agent, [])))
        inside = [x for x in samples if window[0] <= x["t"] <= window[1] and x["alive"] == count]
        if len(inside) < 2 or not gaps_all:
            raise BenchError("no steady window with every job running")
        a, b = inside[0], inside[-1]
        span = b["t"] - a["t"]
        ops = (b["commands"] - a["commands"]) / span
        redis_cpu = (b["redis_ticks"] - a["redis_ticks"]) / CLK_TCK / span * 100
        agent_cpu = (b["agent_ticks"] - a["agent_ticks"]) / CLK_TCK / span / count * 1e3
        client.close()
        late_limit = interval + 1.0
        return {
            "max_late_s": max(gaps_all) - interval,
            "max_late_steady_s": max(gaps_steady) - interval if gaps_steady else float("nan"),
            "late_beats": sum(1 for g in gaps_all if g > late_limit),
            "late_beats_steady": sum(1 for g in gaps_steady if g > late_limit),
            "max_arrival_gap_late_s": max(arrival_gaps) - interval,
            "beats_observed": sum(len(v) for v in stamped.values()),
            "beats_between_polls": unobserved,
            "notifications": sum(len(v) for v in arrivals.values()),
            "launch_seconds": launch_seconds,
            "all_running_after_s": all_running - launched_at,
            "window_s": span,
            "ops_per_s": ops,
            "redis_cpu_pct": redis_cpu,
            "per_agent_cmds_per_s": ops / count,
            "agent_cpu_ms_per_s": agent_cpu,
            "whole_run_s": last_exit - launched_at,
        }

    def bench_fleet(self) -> None:
        s = self.sizes
        res = self.rounds(
            {"fleet": lambda: self.fleet_run(s.fleet, s.fleet_steps, s.fleet_step_seconds)},
            s.runs,
            warmup={"fleet": lambda: self.fleet_run(QUICK.fleet, 2, 1.0)},
            label="6.fleet",
        )["fleet"]
        n = s.fleet
        detail = {"runs": res, "jobs": n, "interval_s": 2}
        late = self.med(res, "max_late_s")
        self.add(
            "6.fleet",
            f"{n} jobs: worst heartbeat lateness beyond the 2 s interval (whole life)",
            late,
            "s",
            target="<= 1 s",
            ok=late <= 1.0,
            detail=detail,
        )
        steady = self.med(res, "max_late_steady_s")
        self.add(
            "6.fleet",
            "worst lateness, steady state (all jobs running)",
            steady,
            "s",
            target="<= 1 s",
            ok=steady <= 1.0,
        )
        worst = max(r["max_late_s"] for r in res)
        self.add("6.fleet", "worst lateness in any round (whole life)", worst, "s")
        for key, name in (
            ("late_beats", "late heartbeats, gap > 3 s (whole life)"),
            ("late_beats_steady", "late heartbeats, gap > 3 s (steady state)"),
        ):
            value = self.med(res, key)
            self.add("6.fleet", name, value, "", target="0", ok=value == 0)
        self.add(
            "6.fleet",
            "worst lateness as seen by a keyspace-notification subscriber",
            self.med(res, "max_arrival_gap_late_s"),
            "s",
        )
        self.add(
            "6.fleet",
            "launch to every job RUNNING",
            self.med(res, "all_running_after_s"),
            "s",
        )
        ops = self.med(res, "ops_per_s")
        cpu = self.med(res, "redis_cpu_pct")
        per_agent = self.med(res, "per_agent_cmds_per_s")
        self.add("6.fleet", "Redis ops/s (steady state)", ops, "ops/s")
        self.add("6.fleet", "Redis CPU (steady state)", cpu, "% of a core")
        self.add("6.fleet", "Redis commands/s per agent", per_agent, "cmds/s")
        self.add(
            "6.fleet",
            "commands per agent per 2 s interval (floor: 1 write)",
            per_agent * 2.0,
            "x",
        )
        self.add(
            "6.fleet",
            "baqup-run CPU per running job",
            self.med(res, "agent_cpu_ms_per_s"),
            "ms/s",
        )
        scale = 10_000 / n
        self.add(
            "6.fleet", "extrapolated to 10,000 agents: Redis ops/s", per_agent * 10_000, "ops/s"
        )
        self.add("6.fleet", "extrapolated to 10,000 agents: Redis CPU", cpu * scale, "% of a core")
        self.extra["fleet_extrapolation"] = {
            "agents": 10_000,
            "measured_agents": n,
            "per_agent_commands_per_s": per_agent,
            "redis_ops_per_s": per_agent * 10_000,
            "redis_cpu_pct_of_one_core": cpu * scale,
            "method": "linear in the number of agents, from the measured steady state "
            "(every job running, heartbeat interval 2 s, one progress line per 5 s)",
        }

    # --- 7. streaming capture -------------------------------------------------------------

    def bench_capture(self) -> None:
        s = self.sizes
        src = str(self.input)
        size = os.path.getsize(src)
        out = self.tmp / "peer.zst"
        checked = [False]

        def ours() -> dict[str, Any]:
            result = self.capture([src])
            job_dir = Path(result.pop("job_dir"))
            if not checked[0]:
                self.verify_capture(job_dir / "dump.sql.zst", result["checksum"])
                checked[0] = True
            self.remove_job(job_dir)
            os.sync()
            return result

        def ours_small() -> dict[str, Any]:
            result = self.capture([str(self.tmp / "input-small.sql")])
            self.remove_job(Path(result.pop("job_dir")))
            os.sync()
            return result

        def shell(script: str) -> Callable[[], dict[str, Any]]:
            def variant() -> dict[str, Any]:
                ran = self.run(["sh", "-c", script, "sh", src, str(out)])
                stored = out.stat().st_size
                out.unlink()
                os.sync()
                return {"wall": ran.wall, "mb_per_s": size / ran.wall / MB, "stored_bytes": stored}

            return variant

        pipeline = 'cat "$1" | zstd -3 -T0 | tee "$2" | sha256sum >/dev/null'
        cli = 'exec zstd -3 -T0 -q -f "$1" -o "$2"'
        cli_sync = 'zstd -3 -T0 -q -f "$1" -o "$2" && sync "$2"'
        res = self.rounds(
            {
                "baqup-run": ours,
                "pipeline": shell(pipeline),
                "zstd": shell(cli),
                "zstd+sync": shell(cli_sync),
                "baqup-run 10 MB": ours_small,
            },
            s.runs,
            label="7.capture",
        )
        o = self.med(res["baqup-run"], "mb_per_s")
        p = self.med(res["pipeline"], "mb_per_s")
        z = self.med(res["zstd"], "mb_per_s")
        zs = self.med(res["zstd+sync"], "mb_per_s")
        label = f"{size / MIB:.0f} MiB"
        self.add(
            "7.capture",
            f"baqup-run --stdout-artifact, {label} (throughput)",
            o,
            "MB/s",
            detail={"input_bytes": size, "runs": res},
        )
        self.add("7.capture", "cat | zstd -3 -T0 | tee | sha256sum (throughput)", p, "MB/s")
        self.add("7.capture", "zstd -3 -T0 input -o OUT (throughput)", z, "MB/s")
        self.add(
            "7.capture",
            "throughput baqup-run / pipeline",
            o / p,
            "x",
            target=">= 1.3",
            ok=o / p >= 1.3,
        )
        self.add(
            "7.capture",
            "throughput baqup-run / zstd CLI",
            o / z,
            "x",
            target=">= 0.95",
            ok=o / z >= 0.95,
        )
        self.add("7.capture", "throughput baqup-run / (zstd CLI; sync OUT)", o / zs, "x")
        ours_size = self.med(res["baqup-run"], "stored_bytes")
        cli_size = self.med(res["zstd"], "stored_bytes")
        delta = (ours_size / cli_size - 1) * 100
        self.add(
            "7.capture",
            "compressed size vs zstd CLI",
            delta,
            "%",
            target="within +-1 %",
            ok=abs(delta) <= 1,
            detail={"ours_ratio": ours_size / size, "zstd_ratio": cli_size / size},
        )
        rss = self.med(res["baqup-run"], "rss_mb")
        rss_small = self.med(res["baqup-run 10 MB"], "rss_mb")
        self.add(
            "7.capture", f"peak RSS, {label} artifact", rss, "MB", target="< 100 MB", ok=rss < 100
        )
        self.add(
            "7.capture",
            "peak RSS, 10 MB artifact",
            rss_small,
            "MB",
            target="< 100 MB",
            ok=rss_small < 100,
        )
        self.bench_checksum()

    def verify_capture(self, artifact: Path, checksum: str) -> None:
        """Once: the artifact's sha256 is the manifest's, and it decompresses to the input."""
        ran = subprocess.run(["sha256sum", str(artifact)], capture_output=True, check=True)
        if ran.stdout.split()[0].decode() != checksum:
            raise BenchError("the captured artifact's sha256 is not the manifest's")
        script = 'zstd -dc "$1" | cmp -s - "$2"'
        if (
            subprocess.run(
                ["sh", "-c", script, "sh", str(artifact), str(self.input)], check=False
            ).returncode
            != 0
        ):
            raise BenchError("the captured artifact does not decompress to the input")

    def bench_checksum(self) -> None:
        s = self.sizes
        path = str(self.input)
        size = os.path.getsize(path)

        def ours(algorithm: str) -> Callable[[], dict[str, Any]]:
            def variant() -> dict[str, Any]:
                ran = subprocess.run(
                    [PY, "-c", HASH_SNIPPET, path, algorithm], capture_output=True, check=True
                )
                data = json.loads(ran.stdout)
                return {"seconds": data["seconds"], "digest": data["digest"]}

            return variant

        def cli(argv: list[str]) -> Callable[[], dict[str, Any]]:
            def variant() -> dict[str, Any]:
                started = time.perf_counter()
                ran = subprocess.run([*argv, path], capture_output=True, check=True)
                seconds = time.perf_counter() - started
                text = ran.stdout.decode()
                digest = text.rsplit("= ", 1)[-1].strip() if "= " in text else text.split()[0]
                return {"seconds": seconds, "digest": digest}

            return variant

        res = self.rounds(
            {
                "hash_file sha256": ours("sha256"),
                "openssl dgst -sha256": cli(["openssl", "dgst", "-sha256"]),
                "hash_file blake3": ours("blake3"),
                "b3sum": cli(["b3sum"]),
            },
            s.runs,
            label="7.checksum",
        )
        if len({r["digest"] for r in res["hash_file sha256"] + res["openssl dgst -sha256"]}) != 1:
            raise BenchError("hash_file sha256 and openssl disagree")
        if len({r["digest"] for r in res["hash_file blake3"] + res["b3sum"]}) != 1:
            raise BenchError("hash_file blake3 and b3sum disagree")
        label = f"{size / MIB:.0f} MiB"
        pairs = (
            ("hash_file sha256", "openssl dgst -sha256", 0.95),
            ("hash_file blake3", "b3sum", 0.9),
        )
        for ours_name, peer_name, floor in pairs:
            mine = self.med(res[ours_name], "seconds")
            theirs = self.med(res[peer_name], "seconds")
            self.add(
                "7.capture",
                f"{ours_name}, {label}",
                size / mine / MB,
                "MB/s",
                detail={"runs": res[ours_name]},
            )
            self.add("7.capture", f"{peer_name}, {label}", size / theirs / MB, "MB/s")
            self.add(
                "7.capture",
                f"throughput {ours_name} / {peer_name}",
                theirs / mine,
                "x",
                target=f">= {floor}",
                ok=theirs / mine >= floor,
            )


BENCHMARKS = {
    "job": Bench.bench_job,
    "startup": Bench.bench_startup,
    "heartbeat": Bench.bench_heartbeat,
    "control": Bench.bench_control,
    "memory": Bench.bench_memory,
    "fleet": Bench.bench_fleet,
    "capture": Bench.bench_capture,
}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                cpu = row.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    versions = {}
    for tool, argv in {
        "redis-server": ["redis-server", "--version"],
        "zstd": ["zstd", "--version"],
        "b3sum": ["b3sum", "--version"],
        "openssl": ["openssl", "version"],
        "tini": ["tini", "--version"],
    }.items():
        try:
            done = subprocess.run(argv, capture_output=True, check=False, timeout=10)
            versions[tool] = (done.stdout or done.stderr).decode().strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            versions[tool] = "not installed"
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            check=True,
        )
        commit = head.stdout.decode().strip() + (" (modified)" if dirty.stdout.strip() else "")
    return {
        "commit": commit,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": round(memory / (1 << 30), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tools": versions,
    }


def table(figures: list[Figure]) -> Iterator[str]:
    head = ("bench", "figure", "value", "target", "result")
    rows = []
    for f in figures:
        value = "-" if f.value is None else f"{f.value:,.4g} {f.unit}".strip()
        rows.append((f.bench, f.name, value, f.target or "-", f.verdict))
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    yield line(head)
    yield line(["-" * w for w in widths])
    for row in rows:
        yield line(row)


def markdown(document: dict[str, Any]) -> Iterator[str]:
    """A results JSON as a Markdown table (for the README)."""
    yield "| bench | figure | value | target | result |"
    yield "|---|---|---|---|---|"
    for f in document["figures"]:
        value = "-" if f["value"] is None else f"{f['value']:,.4g} {f['unit']}".strip()
        result = f"**{f['result']}**" if f["result"] == "MISS" else f["result"]
        name = f["figure"].replace("|", "\\|")
        yield f"| {f['bench']} | {name} | {value} | {f['target'] or '-'} | {result} |"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run)")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--tmpdir", default=None, help="where the temp dir is made")
    parser.add_argument("--output", default=str(RESULTS / "latest.json"))
    parser.add_argument(
        "--markdown", metavar="JSON", help="print a results file as a Markdown table and exit"
    )
    args = parser.parse_args(argv)
    if args.markdown:
        for row in markdown(json.loads(Path(args.markdown).read_text())):
            print(row)
        return 0
    sizes = QUICK if args.quick else FULL
    chosen = [b.strip() for b in args.only.split(",") if b.strip()] or list(BENCHMARKS)
    unknown = [b for b in chosen if b not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    tmp = Path(tempfile.mkdtemp(prefix="baqup-bench-", dir=args.tmpdir))
    bench = Bench(sizes, tmp)
    bench.keep = args.keep
    monitor = LoadMonitor()
    monitor.start()
    started = time.monotonic()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    interrupted = False
    try:
        bench.redis.start()
        log(f"redis-server pid {bench.redis.pid} on {bench.redis.url}; temp dir {tmp}")
        bench.make_input()
        for name in chosen:
            log(f"=== {name}")
            begun = time.monotonic()
            ticks = monitor.ticks()
            try:
                bench.redis.client().flushall()
                BENCHMARKS[name](bench)
            except Exception as exc:  # noqa: BLE001 - one crash must not hide the others
                log(f"{name} CRASHED: {exc}")
                bench.crashes.append(
                    {
                        "bench": name,
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(),
                    }
                )
                bench.cleanup_processes()
            took = time.monotonic() - begun
            bench.extra.setdefault("seconds", {})[name] = round(took, 1)
            foreign = (monitor.ticks() - ticks) / CLK_TCK / max(took, 1e-3)
            bench.extra.setdefault("foreign_cpu_cores", {})[name] = round(foreign, 3)
            if foreign > 0.1:
                log(f"warning: other processes used {foreign:.2f} CPUs during {name}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted")
    except Exception as exc:  # noqa: BLE001 - set-up failure is a crash too
        bench.crashes.append(
            {
                "bench": "setup",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        )
    finally:
        monitor.stop()
        bench.cleanup_processes()
        bench.redis.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    document = {
        "date": stamp,
        "mode": "quick" if sizes.quick else "full",
        "sizes": sizes.__dict__,
        "machine": machine(),
        "seconds": round(time.monotonic() - started, 1),
        "figures": [
            {
                "bench": f.bench,
                "figure": f.name,
                "value": f.value,
                "unit": f.unit,
                "target": f.target or None,
                "result": f.verdict,
                "detail": f.detail,
            }
            for f in bench.figures
        ],
        "extra": bench.extra,
        "crashes": bench.crashes,
        "interrupted": interrupted,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(
        f"\nbaqup-run benchmarks ({document['mode']}, {stamp}, {document['machine']['cpu']}, "
        f"{document['machine']['cpus']} CPUs), {document['seconds']} s"
    )
    for row in table(bench.figures):
        print(row)
    busy = {k: v for k, v in bench.extra.get("foreign_cpu_cores", {}).items() if v > 0.1}
    if busy:
        shown = ", ".join(f"{k} {v:.2f}" for k, v in busy.items())
        print(f"\nWARNING: other processes shared the CPUs (average CPUs used: {shown})")
    missed = sum(1 for f in bench.figures if f.ok is False)
    print(f"\n{missed} target(s) missed; results in {output}")
    for crash in bench.crashes:
        print(f"CRASH in {crash['bench']}: {crash['error']}")
    return 1 if bench.crashes or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
