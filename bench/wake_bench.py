"""Previews that never die: waking paused versions, serving them again, and what a paused one costs.

    python -m bench previews

Part A, the real genloop stack: a dev server (the stack's flags), a sandbox host subprocess, SQLite,
a worker in this process (BuildWorkflow + PreviewWorkflow, the real activities, TemplateRunner) and
an API process whose gateway serves every READY version at its stable URL. VERSIONS template builds,
then (every request a GET of the version URL through genloop.http.preview_client):

- pause: `POST /v1/builds/{id}/preview/pause` (the preview workflow's pause update: the SDK's
  `pause()` against the host) until it answers, WAKES times, round robin over the versions;
- wake: after each pause, the first request to the paused version until its 200 (the gateway holds
  it while the workflow resumes the sandbox and starts the app again);
- re-serve: the version's sandbox killed behind genloop's back, then the first request until its
  200 (a new sandbox from the stored files: upload, DEPS, start, /health), RESERVES times;
- all at once: VERSIONS paused versions, one request each at the same moment, ROUNDS rounds.

Part B, the sandbox host alone through the SDK: AWAKE sandboxes serving the template app, then
sandboxes like a served version (the template app's files written, the app started and answering),
each paused, PAUSED_STEP at a time up to PAUSED_MAX or until PAUSED_BUDGET_S has passed; after
each step the memory of the host's process tree (the host and every sandbox process), the
machine's Shmem (tmpfs) and used memory, and the processes of the host's sandbox uids. The slope of
memory against the number of paused sandboxes is fitted by least squares.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import psutil
from e2b import AsyncSandbox

from activities.build import BuildActivities
from activities.preview import PreviewActivities
from activities.runners import TemplateRunner
from activities.runners.template import _APP_PY
from activities.sandbox import SandboxClient, SandboxConfig, close_sdk_transports
from bench import common
from genloop.http import preview_client
from sandbox_host.isolation import UID_BLOCK_SIZE, uid_block
from sandbox_host.testing import RunningHost, free_port, running_host
from workflows.build import BuildWorkflow
from workflows.preview import PreviewWorkflow
from workflows.types import WORKFLOW_NAME, BuildRequest, BuildResult, PreviewPolicy

SCALE = float(os.environ.get("BENCH_SCALE", "1"))
VERSIONS = 20
WAKES = max(10, int(100 * SCALE))
RESERVES = max(5, int(20 * SCALE))
ROUNDS = max(1, int(3 * SCALE))
AWAKE = max(10, int(100 * SCALE))
PAUSED_MAX = max(100, int(1000 * SCALE))
PAUSED_STEP = max(10, PAUSED_MAX // 10)
PAUSED_BUDGET_S = 600 * SCALE
CONCURRENCY = 4
REPO_ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


# ------------------------------------------------------------------------------------ part A
@contextlib.asynccontextmanager
async def api_process(tmp: Path, port: int, env_settings: dict[str, str]) -> AsyncIterator[str]:
    """The API (and its preview gateway) as its own process, as `genloop up` runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENLOOP_", "TEMPORAL_", "E2B_"))}
    env.update(GENLOOP_API_HOST="127.0.0.1", GENLOOP_API_PORT=str(port), GENLOOP_DATA_DIR=str(tmp), **env_settings)
    with open(tmp / "api.log", "wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "api", cwd=REPO_ROOT, env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(600):
                with contextlib.suppress(httpx.TransportError):
                    await http.get(f"{url}/healthz", timeout=5)
                    break
                if process.returncode is not None:
                    raise RuntimeError((tmp / "api.log").read_text()[-3000:])
                await asyncio.sleep(0.05)
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


async def build_version(client, task_queue: str, repo) -> tuple[str, str]:
    """One template build to READY: (build id, its stable version URL)."""
    build_id = f"b-{uuid.uuid4().hex[:12]}"
    req = BuildRequest(
        build_id=build_id, project_id=f"p-{uuid.uuid4().hex[:6]}", goal=f"version {build_id}", runner="template"
    )
    handle = await client.start_workflow(
        WORKFLOW_NAME, req, id=build_id, task_queue=task_queue, result_type=BuildResult
    )
    result = await handle.result()
    assert result.status == "ready", result
    job = await repo.get(build_id)
    return build_id, job.preview_url


async def timed_get(http: httpx.AsyncClient, url: str, expect: str) -> float:
    started = time.perf_counter()
    page = await http.get(url)
    elapsed = time.perf_counter() - started
    assert page.status_code == 200 and expect in page.text, (page.status_code, page.text[:300])
    return elapsed


async def pause(api: httpx.AsyncClient, build_id: str) -> float:
    started = time.perf_counter()
    answer = await api.post(f"/v1/builds/{build_id}/preview/pause", json={})
    elapsed = time.perf_counter() - started
    assert answer.status_code == 200 and answer.json()["state"] == "paused", answer.text
    return elapsed


async def part_a() -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"pause": [], "wake": [], "reserve": [], "at once": []}
    async with common.temp_dir("bench-wake-") as tmp:
        async with (
            common.dev_server(tmp) as env,
            running_host(tmp, max_sandboxes=VERSIONS + 10, default_timeout_s=3600) as host,
            common.sqlite_repo(tmp) as repo,
        ):
            api_port = free_port()
            sandboxes = SandboxClient(
                SandboxConfig(api_key=host.api_key, api_url=host.url, template="base", timeout_s=3600)
            )
            policy = PreviewPolicy(idle_pause_s=3600, retry_failed_s=60)  # paused by hand only
            acts = BuildActivities(
                repo,
                sandboxes,
                {"template": TemplateRunner()},
                version_url=lambda label: f"http://{label}.localhost:{api_port}",
                preview=policy,
            )
            worker, task_queue = common.worker(
                env.client, [BuildWorkflow, PreviewWorkflow], acts.all() + PreviewActivities(repo, sandboxes).all()
            )
            db_url = f"sqlite+aiosqlite:///{tmp / 'genloop.db'}"
            settings = {
                "TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
                "GENLOOP_TEMPORAL_TASK_QUEUE": task_queue,
                "GENLOOP_DATABASE_URL": db_url,
                "GENLOOP_PREVIEW_IDLE_PAUSE_S": "3600",
                "GENLOOP_PREVIEW_WAKE_HOLD_S": "60",
            }
            try:
                async with (
                    worker,
                    api_process(tmp, api_port, settings) as api_url,
                    httpx.AsyncClient(base_url=api_url, timeout=60) as api,
                    preview_client(timeout=60) as http,
                ):
                    versions = [await build_version(env.client, task_queue, repo) for _ in range(VERSIONS)]
                    for build_id, url in versions:  # warm: each version answers once while live
                        await timed_get(http, url, build_id)
                    for i in range(WAKES):
                        build_id, url = versions[i % len(versions)]
                        out["pause"].append(await pause(api, build_id))
                        out["wake"].append(await timed_get(http, url, build_id))
                    for i in range(RESERVES):
                        build_id, url = versions[i % len(versions)]
                        await sandboxes.kill((await repo.get(build_id)).sandbox_id)
                        out["reserve"].append(await timed_get(http, url, build_id))
                    for _ in range(ROUNDS):
                        await asyncio.gather(*(pause(api, build_id) for build_id, _ in versions))
                        out["at once"] += await asyncio.gather(*(timed_get(http, url, b) for b, url in versions))
            finally:
                with contextlib.suppress(Exception):
                    for sandbox in await sandboxes.list():
                        await sandboxes.kill(sandbox.sandbox_id)
                await close_sdk_transports()
    return out


# ------------------------------------------------------------------------------------ part B
APP = _APP_PY.replace("{goal_html}", repr("a paused version"))


async def served_sandbox(host: RunningHost, http: httpx.AsyncClient) -> AsyncSandbox:
    """A sandbox like a served version: the template app's files, the app started and answering."""
    sb = await AsyncSandbox.create(timeout=3600, **host.sdk_options())
    await sb.files.write_files(
        [
            {"path": "/home/user/project/app.py", "data": APP},
            {"path": "/home/user/project/Procfile", "data": "web: python3 app.py\n"},
        ]
    )
    await sb.commands.run("cd /home/user/project && PORT=8080 exec python3 app.py", background=True, timeout=0)
    url = f"http://{sb.get_host(8080)}/health"
    for _ in range(400):
        with contextlib.suppress(httpx.HTTPError):
            if (await http.get(url)).status_code == 200:
                return sb
        await asyncio.sleep(0.025)
    raise RuntimeError(f"the app in {sb.sandbox_id} never answered")


def sandbox_processes(host: RunningHost) -> int:
    base = uid_block(host.state_dir)
    return sum(
        1
        for p in psutil.process_iter(["uids"])
        if p.info["uids"] and base <= p.info["uids"].real < base + UID_BLOCK_SIZE
    )


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    return out


def sample(host: RunningHost, paused: int) -> dict[str, float]:
    info = meminfo()
    disk = sum(f.stat().st_size for f in host.state_dir.glob("*/files.tar"))
    return {
        "paused": paused,
        "tree": common.tree_rss(host.pid),
        "shmem": info["Shmem"],
        "used": info["MemTotal"] - info["MemAvailable"],
        "processes": sandbox_processes(host),
        "disk": disk,
    }


def slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else float("nan")


async def part_b() -> tuple[list[dict[str, float]], list[float], float]:
    samples: list[dict[str, float]] = []
    pauses: list[float] = []
    async with (
        common.temp_dir("bench-paused-") as tmp,
        running_host(tmp, max_sandboxes=AWAKE + CONCURRENCY + 10, default_timeout_s=3600) as host,
        preview_client(timeout=30) as http,
    ):
        gate = asyncio.Semaphore(CONCURRENCY)

        async def awake_one() -> None:
            async with gate:
                await served_sandbox(host, http)

        async def paused_one() -> None:
            async with gate:
                sb = await served_sandbox(host, http)
                started = time.perf_counter()
                assert await sb.pause() is True
                pauses.append(time.perf_counter() - started)

        await asyncio.gather(*(awake_one() for _ in range(AWAKE)))
        await asyncio.sleep(2)
        samples.append(sample(host, 0))
        started = time.monotonic()
        paused = 0
        while paused < PAUSED_MAX and time.monotonic() - started < PAUSED_BUDGET_S:
            await asyncio.gather(*(paused_one() for _ in range(PAUSED_STEP)))
            paused += PAUSED_STEP
            await asyncio.sleep(1)
            samples.append(sample(host, paused))
            print(
                f"  {paused} paused: host tree {samples[-1]['tree'] / MIB:.0f} MiB, "
                f"{samples[-1]['processes']} sandbox processes",
                flush=True,
            )
        elapsed = time.monotonic() - started
        await close_sdk_transports()
    return samples, pauses, elapsed


# ------------------------------------------------------------------------------------ report
async def run() -> None:
    print(f"machine: {common.machine()}", flush=True)
    a = await part_a()
    measures = [  # (label, samples key, target)
        (f"pause (API pause route → workflow → host), {len(a['pause'])} pauses", "pause", "p95 ≤ 1 s"),
        (f"wake: first request to a paused version → 200, {len(a['wake'])} wakes", "wake", "p50 ≤ 400 ms, p95 ≤ 1 s"),
        (f"re-serve from stored files → 200, {len(a['reserve'])} times", "reserve", "p50 ≤ 1.5 s"),
        (f"{VERSIONS} paused versions woken at once → all 200, {ROUNDS} rounds", "at once", "p95 ≤ 3 s"),
    ]
    rows = [
        [label, common.ms(common.percentile(a[key], 0.5)), common.ms(common.percentile(a[key], 0.95)), target]
        for label, key, target in measures
    ]
    common.print_table(
        "previews: pause, wake, re-serve (genloop stack, template app, local sandbox host)",
        ["measure", "p50", "p95", "target"],
        rows,
    )

    samples, pauses, elapsed = await part_b()
    xs = [s["paused"] for s in samples]
    rows = [
        [
            int(s["paused"]),
            f"{s['tree'] / MIB:.0f} MiB",
            f"{s['used'] / MIB:.0f} MiB",
            f"{s['shmem'] / MIB:.0f} MiB",
            int(s["processes"]),
            f"{s['disk'] / MIB:.1f} MiB",
        ]
        for s in samples
    ]
    common.print_table(
        f"{AWAKE} awake sandboxes plus paused ones ({elapsed:.0f} s to create and pause them)",
        ["paused", "host tree RSS", "machine used", "Shmem", "sandbox processes", "files.tar on disk"],
        rows,
    )
    per = {key: slope(xs, [s[key] for s in samples]) for key in ("tree", "used", "shmem", "processes", "disk")}
    print(
        f"slope per paused sandbox: host tree RSS {per['tree'] / MIB:.3f} MiB, "
        f"machine used {per['used'] / MIB:.3f} MiB (shared machine: noisy), "
        f"Shmem {per['shmem'] / MIB:.3f} MiB, processes {per['processes']:.3f}, "
        f"disk {per['disk'] / 1024:.1f} KiB (target ≤ 0.5 MiB, 0 processes)"
    )
    print(
        f"host-level pause (SDK pause() → 204), {len(pauses)} pauses: p50 {common.ms(common.percentile(pauses, 0.5))}, "
        f"p95 {common.ms(common.percentile(pauses, 0.95))}"
    )


def main() -> int:
    return common.run_counting_warnings(run)
