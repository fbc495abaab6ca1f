"""Concurrency: BUILDS real template builds started at once on one worker.

    python -m bench concurrency

The real stack (bench.real_stack). Reports the wall time from the first start_workflow to the last
READY, that every build reached READY and its preview answers, and memory: the worker (this
process: client + worker + SDK), the sandbox host's process tree (the host plus every sandbox's
bubblewrap/agent/app processes), sampled every 0.25 s for the peak, and per sandbox once all are
serving. Afterwards every sandbox is killed and the host is asked to confirm none is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import psutil

from bench import common
from bench.real_stack import real_stack
from genloop.http import preview_client
from sandbox_host.isolation import UID_BLOCK_SIZE, uid_block

BUILDS = max(10, int(100 * float(os.environ.get("BENCH_SCALE", "1"))))
MIB = 1024 * 1024


def sandbox_processes(state_dir) -> tuple[int, int, int]:
    """(processes, RSS, PSS) of every process running as one of the host's sandbox uids."""
    base = uid_block(state_dir)
    count = rss = pss = 0
    for proc in psutil.process_iter(["uids"]):
        uids = proc.info["uids"]
        if uids and base <= uids.real < base + UID_BLOCK_SIZE:
            with contextlib.suppress(psutil.Error):
                info = proc.memory_full_info()
                count += 1
                rss += info.rss
                pss += info.pss
    return count, rss, pss


async def run() -> None:
    me = psutil.Process()
    async with real_stack("bench-concurrency-", max_sandboxes=BUILDS + 20) as stack, preview_client(timeout=30) as http:
        # warm the worker (first workflow instance, SDK transports) outside the measurement
        _, handle = await stack.start()
        warm = await handle.result()
        await stack.sandboxes.kill(warm.sandbox_id)

        peaks = {"worker": me.memory_info().rss, "host": common.tree_rss(stack.host.pid)}
        base = dict(peaks)
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                peaks["worker"] = max(peaks["worker"], me.memory_info().rss)
                peaks["host"] = max(peaks["host"], common.tree_rss(stack.host.pid))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.25)

        sampler = asyncio.create_task(sample())
        cpu0 = me.cpu_times()
        t0 = time.perf_counter()
        handles = await asyncio.gather(*(stack.start(goal=f"app number {i}") for i in range(BUILDS)))
        started = time.perf_counter() - t0
        results = await asyncio.gather(*(h.result() for _, h in handles), return_exceptions=True)
        wall = time.perf_counter() - t0
        cpu1 = me.cpu_times()
        ready = [r for r in results if not isinstance(r, BaseException) and r.status == "ready"]
        answering = 0
        for r in ready:
            with contextlib.suppress(Exception):
                answering += (await http.get(r.preview_url)).status_code == 200
        await asyncio.sleep(0.5)
        stop.set()
        await sampler
        worker_now = me.memory_info().rss
        host_now = common.tree_rss(stack.host.pid)
        host_proc_rss = psutil.Process(stack.host.pid).memory_info().rss
        procs, sb_rss, sb_pss = sandbox_processes(stack.host.state_dir)

        t_kill = time.perf_counter()
        await asyncio.gather(*(stack.sandboxes.kill(r.sandbox_id) for r in ready))
        kill_s = time.perf_counter() - t_kill
        left = len(await stack.sandboxes.list())
        await asyncio.sleep(1)
        procs_after, _, _ = sandbox_processes(stack.host.state_dir)

    failures = [repr(r)[:200] for r in results if isinstance(r, BaseException) or r.status != "ready"]
    common.print_table(
        f"concurrency: {BUILDS} real template builds started at once (one worker, {common.worker_tuning()})",
        ["metric", "value"],
        [
            ["all start_workflow calls returned", common.ms(started)],
            ["wall time, first start → last READY", f"{wall:.1f} s"],
            ["READY / preview answering 200", f"{len(ready)}/{BUILDS} / {answering}/{BUILDS}"],
            ["builds per second", f"{len(ready) / wall:.1f}"],
            ["worker process CPU (user+sys) per build", common.ms((sum(cpu1[:2]) - sum(cpu0[:2])) / BUILDS)],
            [
                "worker RSS: before / peak / after",
                f"{base['worker'] / MIB:.0f} / {peaks['worker'] / MIB:.0f} / {worker_now / MIB:.0f} MiB",
            ],
            [
                "sandbox host tree RSS: before / peak / serving",
                f"{base['host'] / MIB:.0f} / {peaks['host'] / MIB:.0f} / {host_now / MIB:.0f} MiB",
            ],
            ["  of which the host process itself", f"{host_proc_rss / MIB:.0f} MiB"],
            [
                f"per sandbox (uid-owned processes / {len(ready)})",
                f"{procs / max(1, len(ready)):.1f} procs, RSS {sb_rss / MIB / max(1, len(ready)):.1f} MiB, "
                f"PSS {sb_pss / MIB / max(1, len(ready)):.1f} MiB",
            ],
            [
                "host tree RSS per sandbox (serving − before) / n",
                f"{(host_now - base['host']) / MIB / max(1, len(ready)):.1f} MiB",
            ],
            ["kill all sandboxes", f"{common.ms(kill_s)}; left on host: {left}, sandbox processes left: {procs_after}"],
        ],
    )
    for f in failures[:5]:
        print("failed:", f)


def main() -> int:
    return common.run_counting_warnings(run)
