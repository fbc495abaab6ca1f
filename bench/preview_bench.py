"""Time-to-preview: real template builds, start_workflow → READY → the preview answering.

    python -m bench preview

The real stack (bench.real_stack): TemplateRunner, the e2b SDK against a local sandbox host, SQLite,
a file-backed dev server with the stack's flags. BUILDS builds one after another, each timed from
`client.start_workflow` to the first 200 from its preview URL (GET through
genloop.http.preview_client()), broken down by stage with the persisted transition times
(repo.list_transitions). A transition's time is workflow.now() of the workflow task that entered
the stage, so "CODE → DEPS" is the CODE work plus the Temporal round trip into DEPS. Each build's
sandbox is killed after it is measured.

Before vs now: on the stack's server, builds alternate between genloop as is and the worker-side
levers toggled off (bench.levers.worker_levers_off: SSL context per client, /health every 200 ms);
then, on a server without transferProcessorMaxPollRPS (common.MODES["file+wal"], what `genloop up`
ran before), BUILDS builds with the worker levers off: everything as before the levers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from datetime import UTC, datetime

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
    wall0 = datetime.now(UTC)
    t0 = time.perf_counter()
    build_id, handle = await stack.start()
    result = await handle.result()
    assert result.status == "ready", result
    while (await http.get(result.preview_url)).status_code != 200:
        await asyncio.sleep(0.01)
    total = time.perf_counter() - t0
    wall1 = datetime.now(UTC)
    at = await stack.stage_times(build_id)
    at_or = lambda key, default: at[key] if key else default  # noqa: E731
    parts = {label: (at_or(b, wall1) - at_or(a, wall0)).total_seconds() for label, a, b in SEGMENTS}
    await stack.sandboxes.kill(result.sandbox_id)
    return total, parts


async def measure(
    builds: int,
    toggles: dict[str, Callable[[], ContextManager[None]]],
    dev_server_mode: str = common.STACK_MODE,
) -> dict[str, tuple[list[float], dict[str, list[float]]]]:
    """`builds` builds per toggle on one stack, the toggles taking turns build by build."""
    out = {name: ([], {label: [] for label, _, _ in SEGMENTS}) for name in toggles}
    async with (
        real_stack("bench-preview-", dev_server_mode=dev_server_mode) as stack,
        preview_client(timeout=10) as http,
    ):
        for i in range(WARMUP + builds):
            for name, toggle in toggles.items():
                with toggle():
                    total, p = await one_build(stack, http)
                if i < WARMUP:
                    continue
                totals, parts = out[name]
                totals.append(total)
                for label, value in p.items():
                    parts[label].append(value)
    return out


def report(title: str, totals: list[float], parts: dict[str, list[float]]) -> None:
    rows = [
        [label, common.ms(common.percentile(v, 0.5)), common.ms(common.percentile(v, 0.95)), common.ms(sum(v) / len(v))]
        for label, v in parts.items()
    ]
    rows.append(
        [
            "total: start_workflow → preview 200",
            common.ms(common.percentile(totals, 0.5)),
            common.ms(common.percentile(totals, 0.95)),
            common.ms(sum(totals) / len(totals)),
        ]
    )
    common.print_table(title, ["segment", "p50", "p95", "mean"], rows)


async def run() -> None:
    now = await measure(BUILDS, {"now": contextlib.nullcontext, "worker levers off": levers.worker_levers_off})
    before = await measure(BUILDS, {"before": levers.worker_levers_off}, dev_server_mode="file+wal")
    totals, parts = now["now"]
    report(
        f"time to preview: {BUILDS} sequential template builds (real sandbox host, SQLite, the stack's dev server)",
        totals,
        parts,
    )
    p50 = common.percentile(totals, 0.5)
    print(f"target p50 ≤ 1000 ms: {'met' if p50 <= 1.0 else 'MISSED'} ({p50 * 1000:.0f} ms)")
    variants = (
        (
            "before: dev server without transferProcessorMaxPollRPS, SSL context per client, 200 ms poll",
            before["before"],
        ),
        ("stack's dev server, worker levers off (interleaved with now)", now["worker levers off"]),
        ("now (genloop as is)", now["now"]),
    )
    rows = []
    for label, (totals, parts) in variants:
        p50 = [common.ms(common.percentile(parts[SEGMENTS[i][0]], 0.5)) for i in (4, 5)]
        rows.append(
            [label, common.ms(common.percentile(totals, 0.5)), common.ms(common.percentile(totals, 0.95)), *p50]
        )
    common.print_table(
        f"time to preview, before vs now ({BUILDS} builds each)",
        ["variant", "total p50", "total p95", "DEPS → CHECKS p50", "CHECKS → READY p50"],
        rows,
    )


def main() -> int:
    return common.run_counting_warnings(run)
