"""Commands that talk to the genloop API: build, status, cancel, list, logs."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from collections import deque
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


_RECONNECTS = 5  # a dropped event stream is resumed this many times (Last-Event-ID) before giving up
FAILURE_TAIL_LINES = 30  # log lines shown under a failed build's message


async def _events(http: httpx.AsyncClient, build_id: str, *, logs: bool = False,
                  path: str | None = None) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Server-sent events of one build: (event type, data). A dropped connection is resumed from
    the last event id, so nothing is missed or repeated."""
    last_id: str | None = None
    params = {"logs": "1"} if logs and path is None else {"follow": "app"} if path else {}
    for attempt in range(_RECONNECTS + 1):
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            async with http.stream("GET", path or f"/v1/builds/{build_id}/events", params=params, headers=headers,
                                   timeout=httpx.Timeout(30, read=None)) as response:
                if response.status_code == 204:
                    return
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
                    elif line.startswith("id:"):
                        last_id = line[3:].strip()
                return
        except (httpx.TransportError, httpx.RemoteProtocolError):
            if attempt == _RECONNECTS or path is not None:  # follow=app is live only: nothing to resume
                raise CliError(f"lost the event stream of {build_id}") from None
            await asyncio.sleep(min(2**attempt * 0.2, 5))


async def run_build(settings: Settings, goal: str, project: str, *, wait: bool, base_url: str | None = None,
                    out=sys.stdout) -> int:
    async with api_client(settings, base_url) as http:
        created = await api_call(http, "POST", f"/v1/projects/{project}/builds", json={"goal": goal})
        build_id = created["build_id"]
        print(f"build {build_id} started", file=out, flush=True)
        if not wait:
            return 0
        return await follow_build(http, build_id, out)


class StageProgress:
    """One line per stage. On a terminal: the current stage's line is redrawn in place (stage,
    elapsed, the last log line) and kept with its duration when the next stage starts. Piped:
    plain lines, one per stage, nothing redrawn."""

    def __init__(self, out) -> None:
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.label = ""
        self.started = time.monotonic()
        self.last_line = ""
        self.drawn_at = 0.0

    def stage(self, label: str) -> None:
        if self.tty and self.label:
            self._draw(final=True)
        self.label, self.started, self.last_line = label, time.monotonic(), ""
        if self.tty:
            self._draw()
        else:
            print(f"  {label}", file=self.out, flush=True)

    def log(self, text: str) -> None:
        self.last_line = text
        if self.tty and time.monotonic() - self.drawn_at >= 0.1:  # a chatty build must not flood the terminal
            self._draw()

    def tick(self) -> None:
        if self.tty and self.label:
            self._draw()

    def end(self) -> None:
        if self.tty and self.label:
            self._draw(final=True)
            self.label = ""

    def _draw(self, *, final: bool = False) -> None:
        self.drawn_at = time.monotonic()
        elapsed = self.drawn_at - self.started
        head = f"  {self.label} {elapsed:5.1f}s"
        if final:
            self.out.write(f"\r\033[K{head}\n")
        else:
            width = shutil.get_terminal_size((100, 20)).columns
            tail = self.last_line.replace("\t", " ")[: max(0, width - len(head) - 3)]
            self.out.write(f"\r\033[K{head}  {tail}" if tail else f"\r\033[K{head}")
        self.out.flush()


async def follow_build(http: httpx.AsyncClient, build_id: str, out) -> int:
    """Follow a build's stages until it ends; print its preview, or its failure, debug_id and the
    last log lines."""
    progress = StageProgress(out)
    recent: deque[str] = deque(maxlen=FAILURE_TAIL_LINES)

    async def redraw() -> None:
        while True:
            await asyncio.sleep(0.5)
            progress.tick()

    ticker = asyncio.create_task(redraw())
    try:
        async for event, data in _events(http, build_id, logs=True):
            if event == "build.log":
                recent.append(f"[{data.get('stage')}] {data.get('text', '')}")
                progress.log(data.get("text", ""))
            elif event == "build.stage.started":
                progress.stage(data.get("label") or data.get("stage"))
    finally:
        ticker.cancel()
        progress.end()
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
    if recent:
        print(f"Last {len(recent)} log lines (genloop logs {build_id}):", file=out)
        for line in recent:
            print(f"  {line}", file=out)
    print(f"Web UI:   {web_ui}", file=out, flush=True)
    return EXIT_FAILED


async def cmd_logs(settings: Settings, args: argparse.Namespace) -> int:
    """`genloop logs BUILD [-f] [--stage S] [--grep TEXT]`: the stored lines; with -f, new ones as they come and,
    once the build is READY, the running app's output until interrupted."""
    async with api_client(settings) as http:
        if not args.follow:
            after = 0
            while True:
                params: dict[str, Any] = {"after": after, "limit": 1000}
                if args.stage:
                    params["stage"] = args.stage
                if args.grep:
                    params["q"] = args.grep
                page = await api_call(http, "GET", f"/v1/builds/{args.build_id}/logs", params=params)
                for line in page["lines"]:
                    print(_log_line(line), flush=False)
                if not page["lines"]:
                    break
                after = page["next_after"]
            sys.stdout.flush()
            return 0
        async for event, data in _events(http, args.build_id, logs=True):
            wanted = (not args.stage or data.get("stage") == args.stage) and (
                not args.grep or args.grep.lower() in data.get("text", "").lower())
            if event == "build.log" and wanted:
                print(_log_line(data), flush=True)
            elif event in ("build.ready", "build.failed", "build.cancelled"):
                print(f"-- build {data.get('stage')}: {data.get('error_message') or data.get('message') or ''}",
                      flush=True)
                if event != "build.ready" or args.stage:
                    return 0 if event == "build.ready" else EXIT_FAILED
        print("-- the app's output (Ctrl-C to stop)", flush=True)
        path = f"/v1/builds/{args.build_id}/logs"
        async for _event, data in _events(http, args.build_id, path=path):
            print(f"app   {data.get('text', '')}", flush=True)
    return 0


def _log_line(line: dict[str, Any]) -> str:
    marker = "!" if line.get("stream") == "stderr" else " "
    return f"{line.get('stage', ''):<6}{marker} {line.get('text', '')}"


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
