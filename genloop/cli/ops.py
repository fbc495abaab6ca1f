"""Operator commands: debug, replay, sweep, migrate."""

from __future__ import annotations

import argparse
from pathlib import Path

from genloop.cli.client import EXIT_FAILED, CliError
from genloop.settings import Settings


async def cmd_debug(settings: Settings, args: argparse.Namespace) -> int:
    from persistence.repository import JobRepository

    repo = JobRepository.from_url(settings.database_url)
    try:
        job = await repo.get_by_debug_id(args.debug_id)
        if job is None:
            raise CliError(f"no build has debug_id {args.debug_id}")
        transitions = await repo.list_transitions(job.id)
    finally:
        await repo.aclose()
    ns = settings.temporal.namespace
    print(f"build:        {job.id} (project {job.project_id})")
    print(f"status:       {job.status}")
    print(f"user saw:     {job.error_message}")
    print(f"error detail: {job.error_detail}")
    print(f"sandbox:      {job.sandbox_id or '-'}")
    print("transitions:  " + " -> ".join(f"{t.stage}@{t.at:%H:%M:%S}" for t in transitions))
    print(f"workflow:     {job.workflow_id} run {job.run_id}")
    print(f"Web UI:       {settings.temporal.workflow_url(job.workflow_id, job.run_id)}")
    print(f"history:      temporal workflow show -w {job.workflow_id} -r {job.run_id} "
          f"--address {settings.temporal.target} --namespace {ns}")
    return 0


async def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    from temporalio.client import WorkflowHistory
    from temporalio.worker import Replayer

    from workflows.build import BuildWorkflow
    from workflows.preview import PreviewWorkflow
    from workflows.project import ProjectWorkflow

    target = Path(args.target)
    if target.is_file():
        history = WorkflowHistory.from_json(target.stem, target.read_text())
    else:
        from genloop.temporal import connect

        client = await connect(settings)
        history = await client.get_workflow_handle(args.target).fetch_history()
    replayer = Replayer(workflows=[BuildWorkflow, ProjectWorkflow, PreviewWorkflow])
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    if result.replay_failure is not None:
        print(f"replay FAILED for {history.workflow_id}: {result.replay_failure}")
        return EXIT_FAILED
    print(f"replay OK: {history.workflow_id} ({len(history.events)} events) is deterministic with this code")
    return 0


async def cmd_sweep(settings: Settings, args: argparse.Namespace) -> int:
    from activities.sandbox import SandboxClient, SandboxConfig, close_sdk_transports
    from activities.sweep import sweep_logs, sweep_orphans
    from genloop.temporal import connect
    from persistence.repository import JobRepository

    repo = JobRepository.from_url(settings.database_url)
    try:
        report = await sweep_orphans(
            SandboxClient(SandboxConfig.from_settings(settings)), repo, await connect(settings), include_live=args.all
        )
        deleted = await sweep_logs(repo, settings.logs.retention_days)
    finally:
        await repo.aclose()
        await close_sdk_transports()
    print(f"sandboxes checked: {report.checked}, killed: {len(report.killed)} {' '.join(report.killed)}")
    print(f"log lines deleted (builds older than {settings.logs.retention_days:g} days): {deleted}")
    return 0


async def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from migrations.apply import downgrade, upgrade

    if args.downgrade:
        await downgrade(settings.database_url, args.downgrade)
    else:
        await upgrade(settings.database_url, args.revision)
    print("migrations done")
    return 0
