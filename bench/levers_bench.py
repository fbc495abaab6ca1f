"""Worker-side levers, before vs now: BuildWorkflow (instant doubles) throughput and CPU.

    python -m bench levers

One dev server (the stack's flags); one worker per variant, each on its own task queue and SQLite
file; batches of BATCH at concurrency 50, variants interleaved round-robin for ROUNDS rounds. A
variant's batches run inside its toggle (bench.levers: module attributes of the real code patched
for the block). CPU is per workflow: the worker's main thread (the one event loop that runs
workflow activations, activities and the SDK's payload handling), the whole worker process, the
dev server.

Variants:
  * before: a fresh SSL context per preview client and /health every 200 ms (levers.worker_levers_off;
    with the instant doubles the first probe answers, so only the SSL context costs here);
  * now: genloop as is;
  * now with transitions as ORM units of work (levers.orm_transitions), now with CODE, DEPS and
    CHECKS recorded by local activities (levers.transitions_as_local_activities), now with a new
    app's SCAFFOLD work in an activity of its own, and now with STARTING and SCAFFOLD written apart
    and ProjectId/BuildVersion upserted on their own (bench.levers_workflow: workflow subclasses,
    the patches' old paths), and now with 100 workflow-task slots (settings.worker's old default):
    each lever off alone;
  * UnsandboxedWorkflowRunner (workflow sandbox off; shown for its size, NOT proposed: the sandbox
    is what catches non-deterministic code);
  * now with the repository replaced by an in-memory double: not a proposal, it measures what the
    SQLite writes (7 local activities, blob store) cost the worker.
The raw 6-activity workflow runs as a reference row.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from temporalio.worker import UnsandboxedWorkflowRunner

from bench import common, levers
from bench.levers_workflow import BuildWorkflowScaffoldActivity, BuildWorkflowTwoStartWrites
from bench.overhead_bench import CONCURRENCY, WARMUP, pair_stack

SCALE = float(os.environ.get("BENCH_SCALE", "1"))
ROUNDS = 2
BATCH = max(10, int(75 * SCALE))
# (label, pair_stack options, toggle around the variant's batches)
VARIANTS = (
    ("before: SSL context per client, 200 ms poll", {}, levers.worker_levers_off),
    ("now (genloop as is)", {}, contextlib.nullcontext),
    ("now with ORM transitions (before the Core lever)", {}, levers.orm_transitions),
    ("now with CODE/DEPS/CHECKS as local activities (before)", {}, levers.transitions_as_local_activities),
    (
        "now with SCAFFOLD's work in an activity of its own (before)",
        {"build_workflow": BuildWorkflowScaffoldActivity},
        contextlib.nullcontext,
    ),
    (
        "now with STARTING, SCAFFOLD in two writes, 3 more upserts (before)",
        {"build_workflow": BuildWorkflowTwoStartWrites},
        contextlib.nullcontext,
    ),
    (
        "now with 100 workflow-task slots (before)",
        {"max_concurrent_workflow_tasks": 100},
        contextlib.nullcontext,
    ),
    (
        "now + unsandboxed workflow runner (not proposed)",
        {"workflow_runner": UnsandboxedWorkflowRunner()},
        contextlib.nullcontext,
    ),
    (
        "now, repository in memory (attribution only)",
        {"activities_cls": levers.MemoryRepoActivities},
        contextlib.nullcontext,
    ),
)
BASE = 1  # the "vs now" column divides by this variant


async def run() -> None:
    with common.WarningCounter() as warnings:
        async with (
            common.temp_dir("bench-levers-") as tmp,
            common.dev_server(tmp) as env,
            contextlib.AsyncExitStack() as stack,
        ):
            pairs = []
            for i, (_, options, _toggle) in enumerate(VARIANTS):
                sub = tmp / f"v{i}"
                sub.mkdir()
                pairs.append(await stack.enter_async_context(pair_stack(env.client, sub, **options)))
            for pair, (_, _, toggle) in zip(pairs, VARIANTS, strict=True):
                with toggle():
                    await common.run_batch(pair.genloop, WARMUP, WARMUP)
            await common.run_batch(pairs[BASE].raw, WARMUP, WARMUP)
            server = common.dev_server_pid()
            runs = [("raw 6-activity workflow (reference)", pairs[BASE].raw, contextlib.nullcontext)] + [
                (label, pair.genloop, toggle) for (label, _, toggle), pair in zip(VARIANTS, pairs, strict=True)
            ]
            batches = {label: common.Batch() for label, _, _ in runs}
            cpu = {label: common.CpuMeter(server) for label, _, _ in runs}
            slow = dict.fromkeys(batches, 0)  # TMPRL1104 logged while the variant's batches ran
            for _ in range(ROUNDS):
                for label, one, toggle in runs:
                    before = warnings.slow_tasks
                    with toggle(), cpu[label]:
                        batches[label].add(await common.run_batch(one, BATCH, CONCURRENCY))
                    slow[label] += warnings.slow_tasks - before

    n = ROUNDS * BATCH
    base = batches[VARIANTS[BASE][0]]
    rows = []
    for label, _, _ in runs:
        b, c = batches[label], cpu[label]
        rows.append(
            [
                label,
                f"{b.throughput:.1f}",
                f"{b.throughput / base.throughput:.2f}x",
                common.ms(b.p50),
                common.ms(c.main_s / n),
                common.ms(c.process_s / n),
                common.ms(c.server_s / n),
                str(slow[label]),
            ]
        )
    common.print_table(
        f"worker-side levers, before vs now: {n} BuildWorkflow runs per variant at concurrency {CONCURRENCY} "
        f"(round-robin batches of {BATCH})",
        ["variant", "wf/s", "vs now", "p50", "main thread CPU/wf", "worker CPU/wf", "dev server CPU/wf", "TMPRL1104"],
        rows,
    )
    print(warnings.summary())


def main() -> int:
    asyncio.run(run())
    return 0
