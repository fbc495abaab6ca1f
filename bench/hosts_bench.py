"""Many workers, many hosts: throughput with 1, 2 and 3 worker processes against one local sandbox
host, and how long a host's builds take to move on when its machine dies.

    python -m bench hosts

Every role is a separate process, as in docs/deploy.md: a file-backed dev server, sandbox hosts
(`python -m sandbox_host`), workers (`genloop worker`), one migrated SQLite database file they share.

Throughput: for 1, 2, 3 workers on one host, and a split pair (`--only workflows` + `--only
activities`), BUILDS real template builds started at once; builds/s from the first start to the last
READY, and the p50 time to READY.

Failover: hosts a and b, one worker paired with each (tests.reliability.worker_with_doubles: each
build's app binds its port LATE_S after its first launch in a sandbox, so builds sit in CHECKS long
enough to be caught there). BUILDS builds start; once some are in DEPS/CHECKS on b, b's worker and
host are SIGKILLed and b's sandboxes reaped, as when a machine dies. Per moved build: kill → its new
sandbox recorded on host a (detection and a new sandbox), and kill → READY (which includes the app's
LATE_S start-up in the new sandbox). Detection is bounded by the heartbeat timeout of the activity
that was running (workflows.build.HOST_HEARTBEAT_TIMEOUT) plus the host queue's schedule-to-start timeout
(workflows.build.HOST_SCHEDULE_TO_START), plus, for a build whose workflow the dead worker ran last,
the wait on that worker's sticky queue (worker.sticky_schedule_to_start_s): measured with genloop's
setting and with the SDK's default (10 s), side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from temporalio.client import Client

from bench import common
from migrations.apply import upgrade
from persistence.repository import JobRepository
from sandbox_host.testing import REPO_ROOT, RunningHost, running_host
from workflows.build import HOST_HEARTBEAT_TIMEOUT, HOST_SCHEDULE_TO_START
from workflows.types import WORKFLOW_NAME, BuildRequest, BuildResult

BUILDS = max(6, int(30 * float(os.environ.get("BENCH_SCALE", "1"))))
LATE_S = 5
READY_TIMEOUT_S = 60


class Fleet:
    """One dev server, one database, hosts and worker processes on one task queue."""

    def __init__(self, client: Client, target: str, tmp: Path, db_url: str, repo: JobRepository) -> None:
        self.client, self.target, self.tmp, self.db_url, self.repo = client, target, tmp, db_url, repo
        self.task_queue = f"bench-hosts-{uuid.uuid4().hex[:8]}"
        self.workers: list[asyncio.subprocess.Process] = []

    async def start_worker(self, host: RunningHost, module: tuple[str, ...] = ("genloop.cli", "worker"),
                           only: str | None = None, **settings: str):
        n = len(self.workers) + 1
        log = self.tmp / f"worker-{n}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GENLOOP_", "TEMPORAL_", "E2B_"))}
        env.update(
            TEMPORAL_ADDRESS=self.target, GENLOOP_TEMPORAL_TASK_QUEUE=self.task_queue,
            GENLOOP_DATABASE_URL=self.db_url, GENLOOP_SANDBOX_API_URL=host.url,
            GENLOOP_SANDBOX_API_KEY=host.api_key, GENLOOP_DATA_DIR=str(self.tmp / f"worker-{n}"),
            GENLOOP_WORKER_SWEEP_INTERVAL_S="0", GENLOOP_TEST_LATE_BINDING_S=str(LATE_S),
        )
        env.update(settings)
        with open(log, "ab") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", *module, *(["--only", only] if only else []),
                cwd=REPO_ROOT, env=env, stdout=out, stderr=out,
                stdin=asyncio.subprocess.DEVNULL,
            )
        self.workers.append(proc)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "worker polling" not in log.read_text(errors="replace"):
            if proc.returncode is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {n} did not start:\n{log.read_text(errors='replace')[-2000:]}")
            await asyncio.sleep(0.1)
        return proc

    async def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 30)
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        self.workers.clear()

    async def start_build(self, runner: str = "template") -> str:
        build_id = f"b-{uuid.uuid4().hex[:12]}"
        req = BuildRequest(build_id=build_id, project_id=f"p-{uuid.uuid4().hex[:6]}", goal="a todo list", runner=runner)
        await self.client.start_workflow(WORKFLOW_NAME, req, id=build_id, task_queue=self.task_queue)
        return build_id

    async def result(self, build_id: str) -> BuildResult:
        return await self.client.get_workflow_handle(build_id, result_type=BuildResult).result()


@contextlib.asynccontextmanager
async def fleet() -> AsyncIterator[Fleet]:
    async with common.temp_dir("bench-hosts-") as tmp, common.dev_server(tmp) as env:
        db_url = f"sqlite+aiosqlite:///{tmp / 'genloop.db'}"
        await upgrade(db_url)
        repo = JobRepository.from_url(db_url)
        f = Fleet(env.client, env.client.service_client.config.target_host, tmp, db_url, repo)
        try:
            yield f
        finally:
            await f.stop_workers()
            await repo.aclose()


async def throughput(workers: list[str | None]) -> tuple[float, float]:
    async with fleet() as f, running_host(f.tmp / "host", max_sandboxes=BUILDS + 10, default_timeout_s=600) as host:
        for only in workers:
            await f.start_worker(host, only=only)
        started = time.monotonic()
        build_ids = [await f.start_build() for _ in range(BUILDS)]

        async def timed(build_id: str) -> float:
            result = await f.result(build_id)
            assert result.status == "ready", result
            return time.monotonic() - started

        times = await asyncio.gather(*(timed(b) for b in build_ids))
        return BUILDS / max(times), common.percentile(times, 0.5)


async def failover(sticky_s: float | None = None) -> list[tuple[float, float]]:
    """(kill → new sandbox on host a, kill → READY) per build caught on the dying host. `sticky_s`:
    the workers' worker.sticky_schedule_to_start_s (None: genloop's default)."""
    sticky = {"GENLOOP_WORKER_STICKY_SCHEDULE_TO_START_S": str(sticky_s)} if sticky_s is not None else {}
    doubles = ("tests.reliability.worker_with_doubles",)
    async with fleet() as f, running_host(f.tmp / "host-a", default_timeout_s=600) as host_a, \
            running_host(f.tmp / "host-b", default_timeout_s=600) as host_b:
        id_a, id_b = (await host_a.health())["host_id"], (await host_b.health())["host_id"]
        await f.start_worker(host_a, doubles, **sticky)
        worker_b = await f.start_worker(host_b, doubles, **sticky)
        build_ids = [await f.start_build("late-binding") for _ in range(BUILDS)]
        caught: list[str] = []
        deadline = time.monotonic() + 300
        while len(caught) < 2 and time.monotonic() < deadline:
            jobs = [await f.repo.get(b) for b in build_ids]
            caught = [j.id for j in jobs if j and j.sandbox_host == id_b and j.status in ("deps", "checks")]
            await asyncio.sleep(0.05)
        worker_b.kill()
        await worker_b.wait()
        await host_b.kill()
        await host_b.reap()
        killed = time.monotonic()
        moved_at: dict[str, float] = {}
        ready_at: dict[str, float] = {}
        while len(ready_at) < len(caught) and time.monotonic() < killed + 300:
            for build_id in caught:
                job = await f.repo.get(build_id)
                if build_id not in moved_at and job.sandbox_host == id_a:
                    moved_at[build_id] = time.monotonic() - killed
                if build_id not in ready_at and job.status == "ready":
                    ready_at[build_id] = time.monotonic() - killed
            await asyncio.sleep(0.05)
        results = await asyncio.gather(*(f.result(b) for b in build_ids))
        assert all(r.status == "ready" for r in results), [r.status for r in results]
        return [(moved_at[b], ready_at[b]) for b in caught]


async def run() -> None:
    print(common.machine())
    rows = []
    for label, workers in (
        ("1 worker", [None]), ("2 workers", [None, None]), ("3 workers", [None, None, None]),
        ("--only workflows + --only activities", ["workflows", "activities"]),
    ):
        rate, p50 = await throughput(workers)
        rows.append((label, f"{rate:.2f}", common.ms(p50)))
    common.print_table(f"{BUILDS} template builds at once, one local sandbox host",
                       ("worker processes", "builds/s", "p50 to READY"), rows)
    for label, sticky_s in ((f"sticky {common.settings().worker.sticky_schedule_to_start_s:g} s (genloop)", None),
                            ("sticky 10 s (the SDK's default)", 10.0)):
        moves = await failover(sticky_s)
        common.print_table(
            f"host killed mid-build, {label} (heartbeat timeout {HOST_HEARTBEAT_TIMEOUT.total_seconds():.0f} s, host "
            f"queue schedule-to-start {HOST_SCHEDULE_TO_START.total_seconds():.0f} s; the app starts {LATE_S} s "
            "after launch)",
            ("build", "kill → new sandbox on the other host", "kill → READY"),
            [(n + 1, f"{moved:.1f} s", f"{ready:.1f} s") for n, (moved, ready) in enumerate(moves)],
        )


def main() -> int:
    asyncio.run(run())
    return 0
