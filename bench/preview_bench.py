"""Time-to-preview: real template builds, start_workflow → READY → the preview answering.

    python -m bench preview

The real stack (bench.real_stack): TemplateRunner, the e2b SDK against a local sandbox host, SQLite,
a file-backed dev server with WAL pragmas. BUILDS builds one after another, each timed from
`client.start_workflow` to the first 200 from its preview URL (GET through
genloop.http.preview_client()), broken down by stage with the persisted transition times
(repo.list_transitions). A transition's time is workflow.now() of the workflow task that entered
the stage, so "CODE → DEPS" is the CODE work plus the Temporal round trip into DEPS. Each build's
sandbox is killed after it is measured.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timezone

from bench import common, levers
from bench.real_stack import RealStack, real_stack
from genloop.http import preview_client

BUILDS = max(5, int(20 * float(os.environ.get("BENCH_SCALE", "1"))))
WARMUP = 2
SEGMENTS = (
    ("start_workflow → STARTING", None, "starting"),
    ("STARTING → SCAFFOLD", "starting", "scaffold"),
    ("SCAFFOLD → CODE (create_initial_state)", "scaffold", "code"),
    ("CODE → DEPS (generate_code)", "code", "deps"),
    ("DEPS → CHECKS (provision + install)", "deps", "checks"),
    ("CHECKS → READY (start app, /health)", "checks", "ready"),
    ("READY → preview 200 at the client", "ready", None),
)


async def one_build(stack: RealStack, http) -> tuple[float, dict[str, float]]:
    wall0 = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    build_id, handle = await stack.start()
    result = await handle.result()
    assert result.status == "ready", result
    while (await http.get(result.preview_url)).status_code != 200:
        await asyncio.sleep(0.01)
    total = time.perf_counter() - t0
    wall1 = datetime.now(timezone.utc)
    at = await stack.stage_times(build_id)
    at_or = lambda key, default: at[key] if key else default  # noqa: E731
    parts = {label: (at_or(b, wall1) - at_or(a, wall0)).total_seconds() for label, a, b in SEGMENTS}
    await stack.sandboxes.kill(result.sandbox_id)
    return total, parts


async def measure(builds: int, **stack_options) -> tuple[list[float], dict[str, list[float]]]:
    totals: list[float] = []
    parts: dict[str, list[float]] = {label: [] for label, _, _ in SEGMENTS}
    async with real_stack("bench-preview-", **stack_options) as stack, preview_client(timeout=10) as http:
        for i in range(WARMUP + builds):
            total, p = await one_build(stack, http)
            if i < WARMUP:
                continue
            totals.append(total)
            for label, value in p.items():
                parts[label].append(value)
    return totals, parts


def report(title: str, totals: list[float], parts: dict[str, list[float]]) -> None:
    rows = [[label, common.ms(common.percentile(v, 0.5)), common.ms(common.percentile(v, 0.95)),
             common.ms(sum(v) / len(v))] for label, v in parts.items()]
    rows.append(["total: start_workflow → preview 200", common.ms(common.percentile(totals, 0.5)),
                 common.ms(common.percentile(totals, 0.95)), common.ms(sum(totals) / len(totals))])
    common.print_table(title, ["segment", "p50", "p95", "mean"], rows)


# Proposed changes, cumulative (bench.levers prototypes them without editing genloop).
VARIANTS = (
    ("genloop as is", {}),
    ("+ dev server transferProcessorMaxPollRPS=1000", dict(dev_server_args=common.TRANSFER_POLL_RPS)),
    ("+ one SSL context per process (preview_client)",
     dict(dev_server_args=common.TRANSFER_POLL_RPS, activities_cls=levers.CachedSslActivities)),
    ("+ /health polled every 25 ms (not 200 ms)",
     dict(dev_server_args=common.TRANSFER_POLL_RPS, activities_cls=levers.FastPollActivities)),
    ("+ no set_timeout round trip after create",
     dict(dev_server_args=common.TRANSFER_POLL_RPS, activities_cls=levers.AllLeversActivities)),
)


async def run() -> None:
    rows = []
    for i, (label, options) in enumerate(VARIANTS):
        totals, parts = await measure(BUILDS, **options)
        if i == 0:
            report(f"time to preview: {BUILDS} sequential template builds (real sandbox host, SQLite, file+wal dev server)",
                   totals, parts)
            p50 = common.percentile(totals, 0.5)
            print(f"target p50 ≤ 1000 ms: {'met' if p50 <= 1.0 else 'MISSED'} ({p50 * 1000:.0f} ms)")
        seg = lambda key: common.ms(common.percentile(parts[key], 0.5))  # noqa: E731
        rows.append([label, common.ms(common.percentile(totals, 0.5)), common.ms(common.percentile(totals, 0.95)),
                     seg(SEGMENTS[4][0]), seg(SEGMENTS[5][0])])
    common.print_table(
        f"time to preview with proposed changes (cumulative; {BUILDS} builds each)",
        ["variant", "total p50", "total p95", "DEPS → CHECKS p50", "CHECKS → READY p50"],
        rows,
    )


def main() -> int:
    with common.WarningCounter() as warnings:
        asyncio.run(run())
    print(warnings.summary())
    return 0
