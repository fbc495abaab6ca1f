"""Orchestration overhead: BuildWorkflow (instant doubles) against a raw 6-activity workflow.

    python -m bench overhead

One dev server (file-backed, with the flags `genloop up` runs: settings().temporal.dev_server_args()),
one worker in this process with genloop's tuning (`build_worker`, settings.worker) registering both
workflows, so both run on the same server, worker and event loop. BuildWorkflow runs with the real
activities, the real SQLite repository (migrated, in a temp dir) and TemplateRunner (pure string
formatting), against
`bench.doubles.InstantSandboxClient` (no sandbox host; start_and_check's health probe answers
200 at once from an in-process HTTP server). The raw workflow is `bench.raw_workflow.RawWorkflow`.

1. single run (concurrency 1): SINGLE runs of each, interleaved;
2. throughput: TOTAL runs of each at concurrency CONCURRENCY, in alternating batches of BATCH
   (A B B A ...) so drift on a shared machine hits both alike; then again at HIGH_CONCURRENCY.
   TMPRL1104 (the SDK core's "workflow task over 5 s") is counted per pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client

from activities.build import BuildActivities
from activities.runners import TemplateRunner
from activities.sandbox import SandboxConfig
from bench import common
from bench.doubles import AlwaysOkServer, InstantSandboxClient
from bench.raw_workflow import RAW_WORKFLOW_NAME, RawWorkflow, noop
from workflows.build import BuildWorkflow
from workflows.types import WORKFLOW_NAME, BuildRequest, BuildResult

SCALE = float(os.environ.get("BENCH_SCALE", "1"))  # e.g. 0.25 for a quick look
TOTAL = max(10, int(200 * SCALE))
CONCURRENCY = 50
HIGH_CONCURRENCY = 100  # a second throughput pass: the no-TMPRL1104 target holds at both
BATCH = max(10, int(100 * SCALE))
SINGLE = max(5, int(20 * SCALE))
WARMUP = 10


@dataclass
class Pair:
    """Start-and-await callables for the two workflows on one worker."""

    raw: Callable[[], Awaitable[None]]
    genloop: Callable[[], Awaitable[None]]
    last_ids: dict[str, str]


@contextlib.asynccontextmanager
async def pair_stack(
    client: Client,
    tmp: Path,
    activities_cls: type[BuildActivities] = BuildActivities,
    build_workflow: type = BuildWorkflow,
    **worker_overrides,
) -> AsyncIterator[Pair]:
    async with common.sqlite_repo(tmp) as repo, AlwaysOkServer() as ok:
        config = SandboxConfig(api_key="bench", api_url="http://127.0.0.1:9", template="base", timeout_s=3600)
        acts = activities_cls(repo, InstantSandboxClient(config, ok.port), {"template": TemplateRunner()})
        worker, task_queue = common.worker(
            client, [build_workflow, RawWorkflow], [*acts.all(), noop], **worker_overrides
        )

        last_ids: dict[str, str] = {}

        async def raw() -> None:
            name = f"raw-{uuid.uuid4().hex[:12]}"
            last_ids["raw"] = name
            assert (
                await client.execute_workflow(RAW_WORKFLOW_NAME, name, id=name, task_queue=task_queue, result_type=str)
                == name
            )

        async def genloop() -> None:
            build_id = f"b-{uuid.uuid4().hex[:12]}"
            last_ids["genloop"] = build_id
            req = BuildRequest(build_id=build_id, project_id=f"p-{uuid.uuid4().hex[:6]}", goal="a bench app")
            result = await client.execute_workflow(
                WORKFLOW_NAME, req, id=build_id, task_queue=task_queue, result_type=BuildResult
            )
            assert result.status == "ready", result

        async with worker:
            yield Pair(raw, genloop, last_ids)


async def throughput(
    pair: Pair, total: int, batch: int, concurrency: int, cpu: dict[str, common.CpuMeter] | None = None
) -> tuple[common.Batch, common.Batch, list[str]]:
    """Alternating batches A B B A A B ... until each kind ran `total`."""
    results = {"raw": common.Batch(), "genloop": common.Batch()}
    notes: list[str] = []
    order = ["raw", "genloop"]
    done = 0
    while done < total:
        n = min(batch, total - done)
        for kind in order:
            with cpu[kind] if cpu else contextlib.nullcontext():
                b = await common.run_batch(getattr(pair, kind), n, concurrency)
            results[kind].add(b)
            notes.append(f"{kind} {n}: {b.throughput:.1f}/s")
        order.reverse()
        done += n
    return results["raw"], results["genloop"], notes


async def single_runs(pair: Pair, count: int) -> tuple[common.Batch, common.Batch]:
    raw, gen = common.Batch(), common.Batch()
    for _ in range(count):
        raw.add(await common.run_batch(pair.raw, 1, 1))
        gen.add(await common.run_batch(pair.genloop, 1, 1))
    return raw, gen


async def history_size(client: Client, workflow_id: str) -> tuple[int, int]:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return len(history.events), len(history.to_json())


async def run() -> None:
    with common.WarningCounter() as warnings:
        await _measure(warnings)


async def _measure(warnings: common.WarningCounter) -> None:
    async with common.temp_dir("bench-overhead-") as tmp, common.dev_server(tmp) as env:
        async with pair_stack(env.client, tmp) as pair:
            await common.run_batch(pair.raw, WARMUP, WARMUP)
            await common.run_batch(pair.genloop, WARMUP, WARMUP)
            raw1, gen1 = await single_runs(pair, SINGLE)
            server = common.dev_server_pid()
            cpu = {"raw": common.CpuMeter(server), "genloop": common.CpuMeter(server)}
            before = warnings.slow_by_workflow.copy()
            raw, gen, notes = await throughput(pair, TOTAL, BATCH, CONCURRENCY, cpu)
            slow_at = {CONCURRENCY: warnings.slow_by_workflow - before}
            before = warnings.slow_by_workflow.copy()
            raw_high, gen_high, _ = await throughput(pair, TOTAL, BATCH, HIGH_CONCURRENCY)
            slow_at[HIGH_CONCURRENCY] = warnings.slow_by_workflow - before
            sizes = {kind: await history_size(env.client, wid) for kind, wid in pair.last_ids.items()}

    print(
        f"\norchestration overhead — dev server {common.stack_equivalent() or 'as the stack runs'}, "
        f"worker: {common.worker_tuning()}"
    )
    common.print_table(
        f"throughput: {TOTAL} runs each, concurrency {CONCURRENCY}, alternating batches of {BATCH}",
        ["workflow", "workflows/s", "p50", "p95"],
        [
            ["raw (6 no-op activities)", f"{raw.throughput:.1f}", common.ms(raw.p50), common.ms(raw.p95)],
            ["BuildWorkflow (doubles)", f"{gen.throughput:.1f}", common.ms(gen.p50), common.ms(gen.p95)],
            [
                "genloop / raw",
                f"{gen.throughput / raw.throughput:.2f}x",
                f"{gen.p50 / raw.p50:.2f}x",
                f"{gen.p95 / raw.p95:.2f}x",
            ],
        ],
    )
    print("batches: " + ", ".join(notes))
    common.print_table(
        f"throughput at concurrency {HIGH_CONCURRENCY}: {TOTAL} runs each, alternating batches of {BATCH}",
        ["workflow", "workflows/s", "p50", "p95"],
        [
            [
                "raw (6 no-op activities)",
                f"{raw_high.throughput:.1f}",
                common.ms(raw_high.p50),
                common.ms(raw_high.p95),
            ],
            ["BuildWorkflow (doubles)", f"{gen_high.throughput:.1f}", common.ms(gen_high.p50), common.ms(gen_high.p95)],
            [
                "genloop / raw",
                f"{gen_high.throughput / raw_high.throughput:.2f}x",
                f"{gen_high.p50 / raw_high.p50:.2f}x",
                f"{gen_high.p95 / raw_high.p95:.2f}x",
            ],
        ],
    )
    for c, slow in slow_at.items():
        other = {k: n for k, n in slow.items() if k not in (RAW_WORKFLOW_NAME, WORKFLOW_NAME)}
        print(
            f"{common.SLOW_TASK} at concurrency {c}: raw {slow[RAW_WORKFLOW_NAME]}, "
            f"BuildWorkflow {slow[WORKFLOW_NAME]}" + (f", other {other}" if other else "")
        )
    print(warnings.summary())
    if warnings.first_slow:
        print(f"first {common.SLOW_TASK}: {warnings.first_slow}")
    per = lambda kind, attr: common.ms(getattr(cpu[kind], attr) / TOTAL)  # noqa: E731
    common.print_table(
        "what one workflow costs (CPU per workflow during the throughput batches; history of one run)",
        ["workflow", "worker main thread", "worker process", "dev server", "history events", "history JSON"],
        [
            [
                "raw (6 no-op activities)",
                per("raw", "main_s"),
                per("raw", "process_s"),
                per("raw", "server_s"),
                sizes["raw"][0],
                f"{sizes['raw'][1] / 1024:.1f} KiB",
            ],
            [
                "BuildWorkflow (doubles)",
                per("genloop", "main_s"),
                per("genloop", "process_s"),
                per("genloop", "server_s"),
                sizes["genloop"][0],
                f"{sizes['genloop'][1] / 1024:.1f} KiB",
            ],
        ],
    )
    common.print_table(
        f"single run (concurrency 1): {SINGLE} runs each, interleaved",
        ["workflow", "p50", "p95"],
        [
            ["raw (6 no-op activities)", common.ms(raw1.p50), common.ms(raw1.p95)],
            ["BuildWorkflow (doubles)", common.ms(gen1.p50), common.ms(gen1.p95)],
            ["genloop / raw", f"{gen1.p50 / raw1.p50:.2f}x", f"{gen1.p95 / raw1.p95:.2f}x"],
        ],
    )


def main() -> int:
    asyncio.run(run())
    return 0
