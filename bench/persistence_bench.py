"""What one build's persistence costs the worker's event loop: the repository calls a template build
makes (doubles' sizes: 5 files, 3 log lines), on the real SQLite repository, and decoding the
activity inputs the workflow sends.

    python -m bench persistence

1. per repository call: the main thread's CPU time around each awaited call, ROUNDS builds one
   after another (nothing else on the loop), and the SQL statements and transactions per build;
2. DTO decoding: the SDK's JSON converter decoding a SandboxInput with 5 files, genloop's dataclass
   against the same module compiled again with `from __future__ import annotations` (string
   annotations, which the workflow DTO modules no longer use; see workflows/types/__init__.py).

Compare commits by running it on each (the numbers in docs/benchmarks.md §9 are such a pair).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import os
import sys
import time
import timeit
import types
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import event
from temporalio.converter import DataConverter

import workflows.types.build
from bench import common
from persistence.repository import JobRepository, LogLine
from workflows.stages import Stage
from workflows.types import FileManifestEntry, SandboxInput

SCALE = float(os.environ.get("BENCH_SCALE", "1"))
ROUNDS = max(50, int(400 * SCALE))
WARMUP = 20
FILES = [(f"app/f{i}.py", (f"print({i})\n" * 20).encode()) for i in range(5)]
T = TypeVar("T")


class _Meter:
    def __init__(self) -> None:
        self.cpu: dict[str, float] = collections.defaultdict(float)

    async def __call__(self, name: str, call: Awaitable[T]) -> T:
        started = time.thread_time()
        result = await call
        self.cpu[name] += time.thread_time() - started
        return result


async def _one_build(repo: JobRepository, meter: _Meter) -> None:
    """The calls of one template build, in order (activities.build; the doubles' sizes)."""
    build_id, now = f"b-{uuid.uuid4().hex[:12]}", datetime.now(UTC)
    await meter("start: job row", repo.ensure_job(build_id, "p-bench", "goal", workflow_id=build_id, run_id="r"))
    await meter(
        "start: STARTING, SCAFFOLD",
        repo.advance(build_id, Stage.STARTING, at=now, run_id="r", then=Stage.SCAFFOLD),
    )
    await meter("transition (x3: CODE, DEPS, CHECKS)", repo.advance(build_id, Stage.CODE, at=now, run_id="r"))
    listed = await meter("store_files", repo.store_files(build_id, FILES))
    lines = [LogLine("code", 1, "stdout", "runner", i, f"line {i}", now) for i in range(3)]
    await meter("append_logs", repo.append_logs(build_id, lines, cap_bytes=2_000_000))
    await meter("transition (x3: CODE, DEPS, CHECKS)", repo.advance(build_id, Stage.DEPS, at=now, run_id="r"))
    await meter("set_sandbox", repo.set_sandbox(build_id, "sbx", "/home/user/project", host="h"))
    await meter("get_blobs", repo.get_blobs([digest for _, digest, _ in listed]))
    await meter("transition (x3: CODE, DEPS, CHECKS)", repo.advance(build_id, Stage.CHECKS, at=now, run_id="r"))
    await meter(
        "finish_ready",
        repo.finish_ready(build_id, sandbox_id="sbx", preview_url="http://x", workspace_path="/w", at=now),
    )


async def _repository() -> tuple[dict[str, float], dict[str, int]]:
    counts: collections.Counter[str] = collections.Counter()
    async with common.temp_dir("bench-persistence-") as tmp, common.sqlite_repo(tmp) as repo:
        engine = repo._sessions.kw["bind"].sync_engine  # noqa: SLF001 - counting only

        @event.listens_for(engine, "before_cursor_execute")
        def _statement(*_args: Any) -> None:
            counts["statements"] += 1

        @event.listens_for(engine, "commit")
        def _commit(*_args: Any) -> None:
            counts["write transactions"] += 1

        meter = _Meter()
        for _ in range(WARMUP):
            await _one_build(repo, meter)
        meter = _Meter()
        counts.clear()
        for _ in range(ROUNDS):
            await _one_build(repo, meter)
    return dict(meter.cpu), dict(counts)


def _decode_us(cls: type, entry: type) -> float:
    converter = DataConverter.default.payload_converter
    value = cls(build_id="b", project_id="p", workspace_path="/w", files=[entry("app.py", "d" * 64, 10)] * 5)
    payloads = converter.to_payloads([value])
    n = 2000
    return timeit.timeit(lambda: converter.from_payloads(payloads, [cls]), number=n) / n * 1e6


def main() -> int:
    cpu, counts = asyncio.run(_repository())
    total = sum(cpu.values())
    rows = [[name, f"{seconds / ROUNDS * 1000:.2f} ms"] for name, seconds in cpu.items()]
    rows.append(["total per build", f"{total / ROUNDS * 1000:.2f} ms"])
    common.print_table(
        f"repository calls of one build: main-thread CPU per build ({ROUNDS} builds, one at a time, SQLite)",
        ["call", "CPU per build"],
        rows,
    )
    print(", ".join(f"{n / ROUNDS:.1f} {what}" for what, n in counts.items()) + " per build")

    # workflows/types/build.py itself, with its annotations as strings.
    strings = types.ModuleType("bench_string_annotated")
    sys.modules[strings.__name__] = strings  # dataclasses and get_type_hints resolve names in it
    source = "from __future__ import annotations\n" + inspect.getsource(workflows.types.build)
    exec(compile(source, strings.__name__, "exec"), strings.__dict__)  # noqa: S102 - our own module's source
    common.print_table(
        "decoding a SandboxInput with 5 files (the SDK's JSON converter)",
        ["dataclass", "µs per decode"],
        [
            ["workflows.types (annotations as types)", f"{_decode_us(SandboxInput, FileManifestEntry):.0f}"],
            [
                "the same, annotations as strings",
                f"{_decode_us(strings.SandboxInput, strings.FileManifestEntry):.0f}",
            ],
        ],
    )
    return 0
