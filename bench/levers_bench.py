"""Proposed worker-side changes, measured: BuildWorkflow (instant doubles) throughput and CPU.

    python -m bench levers

One dev server (file+wal); one worker per variant, each on its own task queue and SQLite file;
batches of BATCH at concurrency 50, variants interleaved round-robin for ROUNDS rounds. CPU is
per workflow: the worker's main thread (the one event loop that runs workflow activations,
activities and the SDK's payload handling), the whole worker process, the dev server.

Variants (prototypes in bench.levers; none of them is in genloop yet):
  * genloop as is;
  * one SSL context per process for preview_client (genloop/http.py);
  * UnsandboxedWorkflowRunner (workflow sandbox off; shown for its size, NOT proposed: the sandbox
    is what catches non-deterministic code);
  * both;
  * one SSL context, and the repository replaced by an in-memory double: not a proposal, it
    measures what the SQLite writes (7 local activities, blob store) cost the worker.
The raw 6-activity workflow runs as a reference row.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from temporalio.worker import UnsandboxedWorkflowRunner

from bench import common, levers
from bench.overhead_bench import CONCURRENCY, WARMUP, pair_stack

SCALE = float(os.environ.get("BENCH_SCALE", "1"))
ROUNDS = 2
BATCH = max(10, int(75 * SCALE))
VARIANTS = (
    ("genloop as is", {}),
    ("+ one SSL context per process", dict(activities_cls=levers.CachedSslActivities)),
    ("unsandboxed workflow runner (not proposed)", dict(workflow_runner=UnsandboxedWorkflowRunner())),
    ("both", dict(activities_cls=levers.CachedSslActivities, workflow_runner=UnsandboxedWorkflowRunner())),
    ("+ SSL context, repository in memory (attribution only)", dict(activities_cls=levers.MemoryRepoActivities)),
)


async def run() -> None:
    with common.WarningCounter() as warnings:
        async with common.temp_dir("bench-levers-") as tmp, common.dev_server(common.PRODUCTION_MODE, tmp) as env, \
                contextlib.AsyncExitStack() as stack:
            pairs = []
            for i, (_, options) in enumerate(VARIANTS):
                sub = tmp / f"v{i}"
                sub.mkdir()
                pairs.append(await stack.enter_async_context(pair_stack(env.client, sub, **options)))
            for pair in pairs:
                await common.run_batch(pair.genloop, WARMUP, WARMUP)
            await common.run_batch(pairs[0].raw, WARMUP, WARMUP)
            server = common.dev_server_pid()
            runs = [("raw 6-activity workflow (reference)", pairs[0].raw)] + [
                (label, pair.genloop) for (label, _), pair in zip(VARIANTS, pairs)
            ]
            batches = {label: common.Batch() for label, _ in runs}
            cpu = {label: common.CpuMeter(server) for label, _ in runs}
            for _ in range(ROUNDS):
                for label, one in runs:
                    with cpu[label]:
                        batches[label].add(await common.run_batch(one, BATCH, CONCURRENCY))

    n = ROUNDS * BATCH
    base = batches[VARIANTS[0][0]]
    rows = []
    for label, _ in runs:
        b, c = batches[label], cpu[label]
        rows.append([label, f"{b.throughput:.1f}", f"{b.throughput / base.throughput:.2f}x", common.ms(b.p50),
                     common.ms(c.main_s / n), common.ms(c.process_s / n), common.ms(c.server_s / n)])
    common.print_table(
        f"worker-side levers: {n} BuildWorkflow runs per variant at concurrency {CONCURRENCY} (round-robin batches of {BATCH})",
        ["variant", "wf/s", "vs as is", "p50", "main thread CPU/wf", "worker CPU/wf", "dev server CPU/wf"],
        rows,
    )
    print(warnings.summary())


def main() -> int:
    asyncio.run(run())
    return 0
