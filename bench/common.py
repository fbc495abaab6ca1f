"""Shared pieces of the benchmarks: dev servers, the SQLite repository, the worker, timing, tables."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import platform
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from temporalio.client import Client
from temporalio.runtime import LogForwardingConfig, LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from genloop.cli.worker import build_worker
from genloop.devserver import temporal_binary
from genloop.settings import Settings, load_settings

# Dev server persistence modes the `modes` scenario compares: (file-backed?, extra args). Spelled out
# on purpose (a comparison needs fixed definitions); every other scenario runs the server the stack
# runs, STACK_MODE, whose flags come from settings (temporal-dev.yaml) via dev_server_args().
WAL_PRAGMAS = ("--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal")
# The history service reads its transfer queue at most 20 times/s per shard by default, so every
# task dispatched after the first few waits up to ~50 ms; temporal-dev.yaml raises the limit.
TRANSFER_POLL_RPS = ("--dynamic-config-value", "history.transferProcessorMaxPollRPS=1000")
MODES: dict[str, tuple[bool, tuple[str, ...]]] = {
    "memory": (False, ()),
    "file": (True, ()),
    "file+wal": (True, WAL_PRAGMAS),  # what `genloop up` ran before the levers were applied
    "file+wal+rps": (True, (*WAL_PRAGMAS, *TRANSFER_POLL_RPS)),
}
STACK_MODE = "stack"  # file-backed, settings().temporal.dev_server_args(): what `genloop up` runs


def mode_args(mode: str) -> tuple[bool, list[str]]:
    """(file-backed?, flags) of a dev server mode: STACK_MODE or a key of MODES."""
    if mode == STACK_MODE:
        return True, settings().temporal.dev_server_args(file_backed=True)
    file_backed, args = MODES[mode]
    return file_backed, list(args)


def stack_equivalent() -> str | None:
    """The MODES entry whose flags equal what the stack runs (for labels), if any."""
    stack = mode_args(STACK_MODE)
    return next((m for m in MODES if mode_args(m) == stack), None)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def settings() -> Settings:
    return load_settings()


@contextlib.asynccontextmanager
async def temp_dir(prefix: str) -> AsyncIterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        path = Path(tmp)
        path.chmod(0o711)  # the sandbox host's unprivileged uids must traverse it
        yield path


@contextlib.asynccontextmanager
async def dev_server(tmp: Path, mode: str = STACK_MODE) -> AsyncIterator[WorkflowEnvironment]:
    """A dev server of our own (free port), search attributes registered; by default with the flags
    the stack runs, else one of MODES. Its banner and log go to /dev/null instead of our stdout/stderr."""
    from workflows.build import SEARCH_ATTRIBUTES

    file_backed, args = mode_args(mode)
    with _stdout_to_devnull():
        env = await WorkflowEnvironment.start_local(
            dev_server_existing_path=temporal_binary(),
            dev_server_database_filename=str(tmp / f"temporal-{mode}.db") if file_backed else None,
            dev_server_extra_args=args,
            search_attributes=SEARCH_ATTRIBUTES,
        )
    try:
        yield env
    finally:
        await env.shutdown()


@contextlib.contextmanager
def _stdout_to_devnull():
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def dev_server_pid() -> int | None:
    """The newest `temporal` child of this process (the dev server start_local launched)."""
    found = [p for p in psutil.Process().children() if p.name() == "temporal"]
    return max(found, key=lambda p: p.create_time()).pid if found else None


@contextlib.asynccontextmanager
async def sqlite_repo(tmp: Path) -> AsyncIterator[Any]:
    from migrations.apply import upgrade
    from persistence.repository import JobRepository

    url = f"sqlite+aiosqlite:///{tmp / 'genloop.db'}"
    await upgrade(url)
    repo = JobRepository.from_url(url)
    try:
        yield repo
    finally:
        await repo.aclose()


def worker(client: Client, workflows: list[type], activities: list[Any], **overrides: Any) -> tuple[Worker, str]:
    """genloop's worker (build_worker: settings.worker tuning) on a fresh task queue."""
    task_queue = f"bench-{uuid.uuid4().hex[:12]}"
    w = build_worker(client, settings(), activities, task_queue=task_queue, workflows=workflows, **overrides)
    return w, task_queue


def worker_tuning() -> str:
    w = settings().worker
    return (
        f"max_concurrent_workflow_tasks={w.max_concurrent_workflow_tasks}, "
        f"max_concurrent_activities={w.max_concurrent_activities}, "
        f"max_concurrent_local_activities={w.max_concurrent_local_activities}"
    )


@dataclass
class Batch:
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def add(self, other: Batch) -> None:
        self.wall_s += other.wall_s
        self.latencies += other.latencies

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else float("nan")

    @property
    def p50(self) -> float:
        return percentile(self.latencies, 0.5)

    @property
    def p95(self) -> float:
        return percentile(self.latencies, 0.95)


async def run_batch(one: Callable[[], Awaitable[None]], count: int, concurrency: int) -> Batch:
    """`count` calls of `one` (start a workflow and await its result), at most `concurrency` in flight."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def timed() -> None:
        async with gate:
            started = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(timed() for _ in range(count)))
    return Batch(time.perf_counter() - started, latencies)


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants (bytes)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print()
    print(title)
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def machine() -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({cpu}), {psutil.virtual_memory().total / 2**30:.1f} GiB RAM"


SLOW_TASK = "TMPRL1104"  # the SDK core's warning: a workflow task took over 5 s (a saturated worker)


def forward_core_logs() -> None:
    """The SDK core (Rust) writes its warnings to stderr; forward them to the `temporalio.core`
    logger instead, so WarningCounter counts them. Before the first client of the process."""
    telemetry = TelemetryConfig(
        logging=LoggingConfig(
            filter=TelemetryFilter(core_level="WARN", other_level="ERROR"),
            forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")),
        )
    )
    Runtime.set_default(Runtime(telemetry=telemetry), error_if_already_set=False)


class WarningCounter(logging.Handler):
    """Counts WARNING+ records from the SDK's loggers, the core's included (failed activity
    attempts are retried and logged, so a benchmark that 'succeeded' through retries shows it;
    TMPRL1104 says a workflow task took over 5 s)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0
        self.slow_by_workflow: collections.Counter[str] = collections.Counter()
        self.first_slow: str | None = None
        self.first: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if SLOW_TASK in message:
            fields = getattr(getattr(record, "temporal_log", None), "fields", None) or {}
            self.slow_by_workflow[str(fields.get("workflow_type", "?"))] += 1
            if self.first_slow is None:
                self.first_slow = f"{message} {fields}"[:400]
            return
        self.count += 1
        if self.first is None:
            self.first = message[:300]

    @property
    def slow_tasks(self) -> int:
        return sum(self.slow_by_workflow.values())

    def __enter__(self) -> WarningCounter:
        forward_core_logs()
        logging.getLogger("temporalio").addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("temporalio").removeHandler(self)

    def summary(self) -> str:
        return (f"{self.slow_tasks} {SLOW_TASK} (workflow task over 5 s); {self.count} other SDK warnings"
                + (f"; first: {self.first}" if self.first else ""))


def run_counting_warnings(run: Callable[[], Awaitable[None]]) -> int:
    """A scenario's main(): run it, then say how many SDK warnings (retried attempts) it caused."""
    with WarningCounter() as warnings:
        asyncio.run(run())
    print(warnings.summary())
    return 0


def thread_cpu() -> dict[int, float]:
    """CPU seconds (user+sys) per thread of this process."""
    return {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}


@dataclass
class CpuMeter:
    """CPU used during a block: this process's main thread, the whole process, the dev server."""

    server_pid: int | None
    main_s: float = 0.0
    process_s: float = 0.0
    server_s: float = 0.0

    def __enter__(self) -> CpuMeter:
        self._t = thread_cpu()
        self._p = sum(psutil.Process().cpu_times()[:2])
        self._s = sum(psutil.Process(self.server_pid).cpu_times()[:2]) if self.server_pid else 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        pid = os.getpid()
        self.main_s += thread_cpu().get(pid, 0.0) - self._t.get(pid, 0.0)
        self.process_s += sum(psutil.Process().cpu_times()[:2]) - self._p
        if self.server_pid:
            self.server_s += sum(psutil.Process(self.server_pid).cpu_times()[:2]) - self._s
