"""Sandbox host benchmark: time to a first preview response, and memory per live sandbox.

    python -m bench sandbox-host

1. create → write 5 files → start a server → first 200 through the preview URL, 20 times (p50/p95);
2. 50 live sandboxes (idle, and each serving HTTP): RSS (and PSS) of their process trees / 50.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from e2b import AsyncSandbox

from genloop.http import preview_client
from sandbox_host.isolation import UID_BLOCK_SIZE, uid_block
from sandbox_host.testing import RunningHost, running_host

RUNS = 20
LIVE = 50
SERVER = (
    "import http.server\n"
    "http.server.ThreadingHTTPServer(('0.0.0.0', 8080), http.server.SimpleHTTPRequestHandler).serve_forever()\n"
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def first_preview(host: RunningHost, client: httpx.AsyncClient) -> tuple[float, float, AsyncSandbox]:
    started = time.perf_counter()
    sb = await AsyncSandbox.create(**host.sdk_options())
    created = time.perf_counter() - started
    files = [{"path": f"/home/user/project/file{i}.txt", "data": f"file {i}\n" * 100} for i in range(4)]
    files.append({"path": "/home/user/project/server.py", "data": SERVER})
    await sb.files.write_files(files)
    await sb.commands.run("cd /home/user/project && python3 server.py", background=True, timeout=0)
    url = f"http://{sb.get_host(8080)}/file0.txt"
    while True:
        try:
            if (await client.get(url)).status_code == 200:
                return created, time.perf_counter() - started, sb
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.01)


def sandbox_memory(host: RunningHost) -> tuple[int, int, int]:
    """(processes, RSS bytes, PSS bytes) of every process running as one of the host's sandbox uids."""
    base = uid_block(host.state_dir)
    count = rss = pss = 0
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info["uids"]
        if uids and base <= uids.real < base + UID_BLOCK_SIZE:
            try:
                info = proc.memory_full_info()
            except psutil.Error:
                continue
            count += 1
            rss += info.rss
            pss += info.pss
    return count, rss, pss


async def run() -> None:
    with tempfile.TemporaryDirectory(prefix="sandbox-host-bench-") as tmp:
        Path(tmp).chmod(0o711)
        async with running_host(tmp, max_sandboxes=LIVE + 10, default_timeout_s=600) as host:
            creates, totals = [], []
            async with preview_client(timeout=5) as client:
                for _ in range(RUNS):
                    created, total, sb = await first_preview(host, client)
                    creates.append(created)
                    totals.append(total)
                    await sb.kill()

            live = await asyncio.gather(*(AsyncSandbox.create(**host.sdk_options()) for _ in range(LIVE)))
            await asyncio.sleep(1)
            idle = sandbox_memory(host)
            await asyncio.gather(*(sb.files.write("/home/user/project/server.py", SERVER) for sb in live))
            await asyncio.gather(
                *(
                    sb.commands.run("cd /home/user/project && python3 server.py", background=True, timeout=0)
                    for sb in live
                )
            )
            await asyncio.sleep(2)
            serving = sandbox_memory(host)
            await asyncio.gather(*(sb.kill() for sb in live))

    mib = 1024 * 1024
    print()
    print(f"sandbox host benchmark ({RUNS} runs, {LIVE} live sandboxes, {psutil.cpu_count()} CPUs)")
    print(f"{'metric':<52}{'p50':>10}{'p95':>10}")
    for label, values in (
        ("create (AsyncSandbox.create)", creates),
        ("create → 5 files → server → first 200 on preview", totals),
    ):
        print(f"{label:<52}{percentile(values, 0.5) * 1000:>8.0f}ms{percentile(values, 0.95) * 1000:>8.0f}ms")
    print()
    print(f"{'memory per live sandbox':<40}{'processes':>10}{'RSS':>12}{'PSS':>12}")
    for label, (count, rss, pss) in (("idle (agent only)", idle), ("serving HTTP (python http.server)", serving)):
        print(f"{label:<40}{count / LIVE:>10.1f}{rss / LIVE / mib:>10.1f}MB{pss / LIVE / mib:>10.1f}MB")


def main() -> int:
    asyncio.run(run())
    return 0
