"""Commands that talk to the genloop API: build, status, cancel, list."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx

from genloop.settings import Settings

EXIT_FAILED = 1
EXIT_USAGE = 2


def _api_url(settings: Settings) -> str:
    return f"http://{settings.api.host}:{settings.api.port}"


def api_client(settings: Settings, base_url: str | None = None) -> httpx.AsyncClient:
    headers = {}
    token = settings.api.token.get_secret_value()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.AsyncClient(base_url=base_url or _api_url(settings), headers=headers, timeout=30)


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit code `code` (no traceback)."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code

    def __repr__(self) -> str:
        return f"CliError({str(self)!r}, code={self.code})"


async def api_call(http: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
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
    async with api_client(settings, base_url) as http:
        created = await api_call(http, "POST", f"/v1/projects/{project}/builds", json={"goal": goal})
        build_id = created["build_id"]
        print(f"build {build_id} started", file=out, flush=True)
        if not wait:
            return 0
        return await follow_build(http, build_id, out)


async def follow_build(http: httpx.AsyncClient, build_id: str, out) -> int:
    """Follow a build's stages until it ends; print its preview (or its failure and debug_id)."""
    async for event, data in _events(http, build_id):
        if event == "build.stage.started":
            print(f"  {data.get('label') or data.get('stage')}", file=out, flush=True)
    final = await api_call(http, "GET", f"/v1/builds/{build_id}")
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


async def cmd_build(settings: Settings, args: argparse.Namespace) -> int:
    return await run_build(settings, args.goal, args.project, wait=args.wait)


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    async with api_client(settings) as http:
        print(json.dumps(await api_call(http, "GET", f"/v1/builds/{args.build_id}"), indent=2))
    return 0


async def cmd_cancel(settings: Settings, args: argparse.Namespace) -> int:
    async with api_client(settings) as http:
        await api_call(http, "POST", f"/v1/builds/{args.build_id}/cancel", json={"reason": args.reason})
    print(f"cancel requested for {args.build_id}")
    return 0


async def cmd_list(settings: Settings, args: argparse.Namespace) -> int:
    async with api_client(settings) as http:
        page = await api_call(http, "GET", f"/v1/projects/{args.project}/builds", params={"limit": args.limit})
    for b in page.get("builds", []):
        print(f"{b['build_id']}  {b['stage']:<10} {b.get('build_version') or '-':<12} {b.get('preview_url') or ''}")
    return 0
