"""`genloop` command line: run the services, trigger and inspect builds, debug and replay."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import httpx

from genloop.settings import ConfigError, Settings, get_settings

log = logging.getLogger("genloop")

EXIT_FAILED = 1
EXIT_USAGE = 2


def _api_url(settings: Settings) -> str:
    return f"http://{settings.api.host}:{settings.api.port}"


def _api_client(settings: Settings, base_url: str | None = None) -> httpx.AsyncClient:
    headers = {}
    token = settings.api.token.get_secret_value()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.AsyncClient(base_url=base_url or _api_url(settings), headers=headers, timeout=30)


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


async def _api(http: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    try:
        response = await http.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise CliError(f"cannot reach the genloop API at {http.base_url} ({exc}). Is `genloop up` running?") from None
    body = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if response.status_code >= 400:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        raise CliError(f"{response.status_code} {err.get('code', '')}: {err.get('message', response.text)}")
    return body


async def _events(http: httpx.AsyncClient, build_id: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Server-sent events of one build: (event type, data)."""
    async with http.stream("GET", f"/v1/builds/{build_id}/events", timeout=None) as response:
        if response.status_code >= 400:
            await response.aread()
            raise CliError(f"events: {response.status_code} {response.text}")
        event, data = "message", []
        async for line in response.aiter_lines():
            if line == "":
                if data:
                    yield event, json.loads("\n".join(data))
                event, data = "message", []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())


async def run_build(settings: Settings, goal: str, project: str, *, wait: bool, base_url: str | None = None,
                    out=sys.stdout) -> int:
    async with _api_client(settings, base_url) as http:
        created = await _api(http, "POST", f"/v1/projects/{project}/builds", json={"goal": goal})
        build_id = created["build_id"]
        print(f"build {build_id} started", file=out, flush=True)
        if not wait:
            return 0
        async for event, data in _events(http, build_id):
            if event == "build.stage.started":
                print(f"  {data.get('label') or data.get('stage')}", file=out, flush=True)
        final = await _api(http, "GET", f"/v1/builds/{build_id}")
    web_ui = final.get("web_ui") or (final.get("links") or {}).get("web_ui", "")
    if final.get("stage") == "ready":
        print(f"Preview:  {final['preview_url']}", file=out)
        print(f"Version:  {final.get('build_version')}", file=out)
        print(f"Web UI:   {web_ui}", file=out, flush=True)
        return 0
    print(f"Build {final.get('stage')}: {final.get('error_message') or final.get('message') or ''}", file=out)
    if final.get("debug_id"):
        print(f"debug_id: {final['debug_id']}  (genloop debug {final['debug_id']})", file=out)
    print(f"Web UI:   {web_ui}", file=out, flush=True)
    return EXIT_FAILED


async def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from genloop.stack import Stack

    stack = Stack(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        await stack.start()
        await stack.wait_api_healthy()
        print(f"genloop is up.\n  API:    {stack.api_url}\n  Web UI: {settings.temporal.web_ui_url}", flush=True)
        if args.build:
            code = await run_build(settings, args.build, args.project, wait=True)
        if not args.exit_after_build:
            print("Press Ctrl-C to stop.", flush=True)
            await stop.wait()
    finally:
        await stack.stop()
    return code


async def cmd_build(settings: Settings, args: argparse.Namespace) -> int:
    return await run_build(settings, args.goal, args.project, wait=args.wait)


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    async with _api_client(settings) as http:
        print(json.dumps(await _api(http, "GET", f"/v1/builds/{args.build_id}"), indent=2))
    return 0


async def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    async with _api_client(settings) as http:
        await _api(http, "POST", f"/v1/builds/{args.build_id}/cancel", json={"reason": args.reason})
    print(f"cancel requested for {args.build_id}")
    return 0


async def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    async with _api_client(settings) as http:
        page = await _api(http, "GET", f"/v1/projects/{args.project}/builds", params={"limit": args.limit})
    for b in page.get("builds", []):
        print(f"{b['build_id']}  {b['stage']:<10} {b.get('build_version') or '-':<12} {b.get('preview_url') or ''}")
    return 0


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

    target = Path(args.target)
    if target.is_file():
        history = WorkflowHistory.from_json(target.stem, target.read_text())
    else:
        from genloop.temporal import connect

        client = await connect(settings)
        history = await client.get_workflow_handle(args.target).fetch_history()
    result = await Replayer(workflows=[BuildWorkflow]).replay_workflow(history, raise_on_replay_failure=False)
    if result.replay_failure is not None:
        print(f"replay FAILED for {history.workflow_id}: {result.replay_failure}")
        return EXIT_FAILED
    print(f"replay OK: {history.workflow_id} ({len(history.events)} events) is deterministic with this code")
    return 0


async def cmd_sweep(settings: Settings, args: argparse.Namespace) -> int:
    from activities.sandbox import SandboxClient, SandboxConfig, close_sdk_transports
    from activities.sweep import sweep_orphans
    from genloop.temporal import connect
    from persistence.repository import JobRepository

    repo = JobRepository.from_url(settings.database_url)
    try:
        report = await sweep_orphans(SandboxClient(SandboxConfig.from_settings(settings)), repo, await connect(settings))
    finally:
        await repo.aclose()
        await close_sdk_transports()
    print(f"sandboxes checked: {report.checked}, killed: {len(report.killed)} {' '.join(report.killed)}")
    return 0


async def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from persistence.migrate import downgrade, upgrade

    if args.downgrade:
        await downgrade(settings.database_url, args.downgrade)
    else:
        await upgrade(settings.database_url, args.revision)
    print("migrations done")
    return 0


async def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from genloop.temporal import run_worker

    await run_worker(settings)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genloop", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the local stack (Temporal, sandbox host, worker, API)")
    up.add_argument("--build", metavar="GOAL", help="run one build once the stack is up")
    up.add_argument("--project", default="demo")
    up.add_argument("--exit-after-build", action="store_true", help="stop the stack after the build")

    sub.add_parser("worker", help="run the Temporal worker")
    sub.add_parser("api", help="serve the HTTP API")
    sub.add_parser("sandbox-host", help="serve the local E2B-compatible sandbox host", add_help=False)
    mig = sub.add_parser("migrate", help="run database migrations")
    mig.add_argument("--revision", default="head")
    mig.add_argument("--downgrade", metavar="REVISION")

    b = sub.add_parser("build", help="start a build through the API")
    b.add_argument("goal")
    b.add_argument("--project", required=True)
    b.add_argument("--wait", action="store_true", help="follow the stages and print the preview URL")

    for name, helptext in (("status", "show a build"), ("cancel", "cancel a build")):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("build_id")
        if name == "cancel":
            c.add_argument("--reason", default="cancelled from the CLI")
    ls = sub.add_parser("list", help="list a project's builds, newest first")
    ls.add_argument("--project", required=True)
    ls.add_argument("--limit", type=int, default=20)
    d = sub.add_parser("debug", help="find a failed build by its debug_id")
    d.add_argument("debug_id")
    r = sub.add_parser("replay", help="replay a workflow history (id on the server, or a JSON export)")
    r.add_argument("target", metavar="WORKFLOW_ID|FILE")
    sub.add_parser("sweep", help="kill sandboxes whose build is gone")
    return p


_COMMANDS = {
    "up": cmd_up, "worker": cmd_worker, "migrate": cmd_migrate, "build": cmd_build, "status": cmd_status,
    "cancel": cmd_cancel, "list": cmd_list, "debug": cmd_debug, "replay": cmd_replay, "sweep": cmd_sweep,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Services with their own argument parsers.
    if argv[:1] == ["sandbox-host"]:
        from sandbox_host.server import main as host_main

        return host_main(argv[1:]) or 0
    if argv[:1] == ["api"]:
        from api.server import main as api_main

        return api_main(argv[1:]) or 0
    args = _parser().parse_args(argv)
    try:
        settings = get_settings()
        return asyncio.run(_COMMANDS[args.command](settings, args))
    except ConfigError as exc:
        print(f"genloop: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"genloop: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
