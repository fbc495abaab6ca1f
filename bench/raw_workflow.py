"""The baseline: a raw Temporal workflow of 6 sequential no-op activities.

Kept in its own module with nothing but temporalio imported, so the workflow sandbox (which
re-imports the module defining a workflow on every run) pays no more for it than it must.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow

RAW_WORKFLOW_NAME = "BenchRawWorkflow"
STEPS = 6


@activity.defn(name="bench_noop")
async def noop(step: int) -> int:
    return step


@workflow.defn(name=RAW_WORKFLOW_NAME)
class RawWorkflow:
    @workflow.run
    async def run(self, name: str) -> str:
        for step in range(STEPS):
            await workflow.execute_activity(noop, step, start_to_close_timeout=timedelta(seconds=30))
        return name
