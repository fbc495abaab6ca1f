"""Build log throughput: an app that prints 50,000 lines during CHECKS, side by side with the same
build logging nothing, in one run.

    python -m bench logs

The real stack (bench.real_stack: file-backed dev server, sandbox host, SQLite, the real activities)
plus the API in this process (create_app behind uvicorn, RequestGuard in front) with one SSE client
on `/events?logs=1` per build. CHATTY builds run LoggingAppRunnerDouble: the app prints its lines
(unbuffered) before it binds its port; QUIET builds run the template app, which prints nothing.
Builds alternate (chatty, quiet, ...) so both see the same machine. The log cap is raised to 16 MiB
for the run so every line is kept (the default 2 MiB would truncate at ~30k of these lines).

- stored lines/s: app lines stored / (time the last was stored - time the first reached the worker),
  the last from polling the build's log counter every 20 ms;
- delivered lines/s: app lines the SSE client received / (last received - first received);
- time to preview: start -> preview answers 200; "added" is the p50 difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import time
import uuid

import httpx
import uvicorn

from activities.build import BuildActivities
from activities.logs import LogPolicy
from api.app import create_app
from bench import common
from bench.real_stack import RealStack, real_stack
from genloop.http import preview_client
from genloop.settings import load_settings
from sandbox_host.testing import free_port
from tests.helpers.doubles import LoggingAppRunnerDouble
from workflows.build import BuildWorkflow
from workflows.types import WORKFLOW_NAME, BuildRequest, BuildResult

LINES = int(os.environ.get("BENCH_LOG_LINES", "50000"))
BUILDS = max(2, int(5 * float(os.environ.get("BENCH_SCALE", "1"))))
CAP_BYTES = 16 * 1024 * 1024


@contextlib.asynccontextmanager
async def api_server(stack: RealStack, tmp: str):
    settings = load_settings(environ={"GENLOOP_DATA_DIR": tmp})
    app = create_app(settings, client=stack.client, repo=stack.repo)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def sse_client(api_url: str, build_id: str, received: list[float]) -> None:
    """Counts the CHECKS lines of one build's event stream, with the time each arrived."""
    async with httpx.AsyncClient(base_url=api_url, timeout=httpx.Timeout(30, read=None)) as http:
        while (await http.get(f"/v1/builds/{build_id}")).status_code == 404:
            await asyncio.sleep(0.01)
        async with http.stream("GET", f"/v1/builds/{build_id}/events", params={"logs": "1"}) as response:
            event = ""
            async for line in response.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "build.log":
                    if json.loads(line[5:])["text"].startswith("line "):
                        received.append(time.perf_counter())
                elif line.startswith("data:") and event in ("build.ready", "build.failed"):
                    return


async def store_poller(stack: RealStack, build_id: str, stored: list[tuple[float, int]]) -> None:
    while True:
        job = await stack.repo.get(build_id)
        if job is not None:
            stored.append((time.time(), job.log_seq))
        await asyncio.sleep(0.02)


async def start_on(stack: RealStack, task_queue: str, runner: str):
    build_id = f"b-{uuid.uuid4().hex[:12]}"
    req = BuildRequest(build_id=build_id, project_id=f"p-{uuid.uuid4().hex[:6]}", goal="an app", runner=runner)
    handle = await stack.client.start_workflow(WORKFLOW_NAME, req, id=build_id, task_queue=task_queue,
                                               result_type=BuildResult)
    return build_id, handle


async def one(stack: RealStack, api_url: str, http, *, chatty: bool, task_queue: str | None = None) -> dict[str, float]:
    t0 = time.perf_counter()
    build_id, handle = await start_on(stack, task_queue or stack.task_queue, "chatty" if chatty else "template")
    received: list[float] = []
    stored: list[tuple[float, int]] = []
    client = asyncio.create_task(sse_client(api_url, build_id, received))
    poller = asyncio.create_task(store_poller(stack, build_id, stored))
    result = await handle.result()
    assert result.status == "ready", result
    while (await http.get(result.preview_url)).status_code != 200:
        await asyncio.sleep(0.01)
    to_preview = time.perf_counter() - t0
    await asyncio.wait_for(client, 120)
    poller.cancel()
    out = {"to_preview": to_preview}
    if chatty and task_queue is None:
        rows, after = [], 0
        while page := await stack.repo.list_logs(build_id, stage="checks", after=after, limit=5000):
            rows, after = rows + page, page[-1].seq
        app_lines = [r for r in rows if r.text.startswith("line ")]
        # From the first line reaching the worker (its `at`) to the last one committed.
        last_stored = next(t for t, seq in stored if seq >= app_lines[-1].seq)
        out.update(
            stored=len(app_lines),
            stored_rate=len(app_lines) / max(last_stored - app_lines[0].at.timestamp(), 1e-3),
            delivered=len(received),
            delivered_rate=len(received) / max(received[-1] - received[0], 1e-3),
            checks=(await stack.stage_times(build_id))["ready"].timestamp()
            - (await stack.stage_times(build_id))["checks"].timestamp(),
        )
    else:
        times = await stack.stage_times(build_id)
        out["checks"] = times["ready"].timestamp() - times["checks"].timestamp()
    await stack.sandboxes.kill(result.sandbox_id)
    return out


async def run() -> None:
    chatty_runs: list[dict[str, float]] = []
    unstored_runs: list[dict[str, float]] = []
    quiet_runs: list[dict[str, float]] = []
    activities = functools.partial(BuildActivities, logs=LogPolicy(cap_bytes=CAP_BYTES))
    runners = {"chatty": LoggingAppRunnerDouble(lines=LINES, dependency=False)}
    async with common.temp_dir("bench-logs-api-") as api_tmp, \
            real_stack("bench-logs-", runners=runners, activities_cls=activities) as stack, \
            api_server(stack, str(api_tmp)) as api_url, preview_client(timeout=10) as http:
        # The same app on a second worker whose log cap is the minimum: its sink drops the app's
        # lines after the first few KB, so it shows what printing costs without storing it.
        unstored = BuildActivities(stack.repo, stack.sandboxes, runners, logs=LogPolicy(cap_bytes=4096))
        worker, unstored_queue = common.worker(stack.client, [BuildWorkflow], unstored.all())
        async with worker:
            await one(stack, api_url, http, chatty=False)  # warm-up
            for _ in range(BUILDS):
                chatty_runs.append(await one(stack, api_url, http, chatty=True))
                unstored_runs.append(await one(stack, api_url, http, chatty=True, task_queue=unstored_queue))
                quiet_runs.append(await one(stack, api_url, http, chatty=False))

    def p50(runs: list[dict[str, float]], key: str) -> float:
        return common.percentile([r[key] for r in runs], 0.5)

    print(f"\nmachine: {common.machine()}")
    common.print_table(
        f"build logs: an app printing {LINES:,} lines during CHECKS, {BUILDS} builds (p50)",
        ["measure", "p50", "min", "max"],
        [_row(chatty_runs, label, key) for label, key in (
            ("lines stored (of printed)", "stored"), ("stored lines/s", "stored_rate"),
            ("lines delivered to the SSE client", "delivered"), ("delivered lines/s (SSE)", "delivered_rate"),
        )],
    )
    common.print_table(
        f"time to preview, {BUILDS} builds each, interleaved",
        ["builds", "start → preview 200 (p50)", "CHECKS → READY (p50)"],
        [
            [f"app prints {LINES:,} lines, all stored", common.ms(p50(chatty_runs, "to_preview")),
             common.ms(p50(chatty_runs, "checks"))],
            [f"app prints {LINES:,} lines, not stored (cap 4 KiB)", common.ms(p50(unstored_runs, "to_preview")),
             common.ms(p50(unstored_runs, "checks"))],
            ["app prints nothing", common.ms(p50(quiet_runs, "to_preview")), common.ms(p50(quiet_runs, "checks"))],
            ["added by storing the lines (stored - not stored)",
             common.ms(p50(chatty_runs, "to_preview") - p50(unstored_runs, "to_preview")),
             common.ms(p50(chatty_runs, "checks") - p50(unstored_runs, "checks"))],
            ["added by printing and storing them (stored - nothing)",
             common.ms(p50(chatty_runs, "to_preview") - p50(quiet_runs, "to_preview")),
             common.ms(p50(chatty_runs, "checks") - p50(quiet_runs, "checks"))],
        ],
    )


def _row(runs: list[dict[str, float]], label: str, key: str) -> list[str]:
    values = [r[key] for r in runs]
    return [label, *(f"{v:,.0f}" for v in (common.percentile(values, 0.5), min(values), max(values)))]


def main() -> int:
    return common.run_counting_warnings(run)
