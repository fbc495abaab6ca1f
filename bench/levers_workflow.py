"""Workflow-side levers off, for `bench levers`: the module-attribute toggles of bench.levers cannot
reach workflow code (the workflow sandbox imports workflows.build afresh for every run), so a lever's
"before" is a subclass on a worker of its own. Sandbox-safe: it imports workflow code only."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from workflows.types.build import WORKFLOW_NAME, BuildRequest, BuildResult

from workflows.build import BuildWorkflow


@workflow.defn(name=WORKFLOW_NAME)
class BuildWorkflowScaffoldActivity(BuildWorkflow):
    """A new app's SCAFFOLD work in an activity of its own (create_initial_state), after the start write."""

    start_scaffolds = False

    @workflow.run
    async def run(self, req: BuildRequest) -> BuildResult:
        return await super().run(req)


@workflow.defn(name=WORKFLOW_NAME)
class BuildWorkflowTwoStartWrites(BuildWorkflow):
    """STARTING and SCAFFOLD in two local writes, ProjectId and BuildVersion upserted on their own."""

    start_scaffolds = False
    one_start_write = False

    @workflow.run
    async def run(self, req: BuildRequest) -> BuildResult:
        return await super().run(req)
