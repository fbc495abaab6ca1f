"""Commands for a project's line of versions: change, versions, diff, files (through the API)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from genloop.cli.client import EXIT_USAGE, CliError, api_call, api_client, follow_build
from genloop.settings import Settings


def change_body(args: argparse.Namespace) -> dict[str, Any]:
    """The request for `genloop change`: a change text, edits from local files, deletions, a base.
    Nothing but `--base` is a restore of that version."""
    body: dict[str, Any] = {}
    if args.text:
        body["change"] = args.text
    edits: list[dict[str, Any]] = []
    for spec in args.edit or []:
        path, sep, local = spec.partition("=")
        if not sep or not path or not local:
            raise CliError(f"--edit {spec!r}: expected PATH=LOCALFILE", EXIT_USAGE)
        try:
            content = Path(local).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"--edit {spec!r}: cannot read {local} as UTF-8 text ({exc})", EXIT_USAGE) from None
        edits.append({"path": path, "content": content})
    edits += [{"path": path, "delete": True} for path in args.delete or []]
    if edits:
        body["edits"] = edits
    if args.base:
        body["base"] = args.base
    if not body:
        raise CliError("nothing to do: give a change TEXT, --edit PATH=FILE, --delete PATH, or --base V to restore",
                       EXIT_USAGE)
    if args.runner:
        body["runner"] = args.runner
    return body


async def cmd_change(settings: Settings, args: argparse.Namespace) -> int:
    body = change_body(args)
    async with api_client(settings) as http:
        created = await api_call(http, "POST", f"/v1/projects/{args.project}/builds", json=body)
        build_id = created["build_id"]
        print(f"change {build_id} queued for project {args.project}", flush=True)
        if not args.wait:
            return 0
        return await follow_build(http, build_id, sys.stdout)


async def cmd_versions(settings: Settings, args: argparse.Namespace) -> int:
    async with api_client(settings) as http:
        project = await api_call(http, "GET", f"/v1/projects/{args.project}")
    newest = (project.get("newest_ready") or {}).get("build_version")
    print(f"project {project['project_id']}: {project.get('goal') or ''}")
    for v in project["versions"]:
        lineage = v["lineage"]
        if lineage["kind"] == "change":
            what = lineage.get("change") or ", ".join(
                f"{'-' if e['op'] == 'delete' else ''}{e['path']}" for e in lineage["edited_paths"]
            ) or "restore"
            origin = f"from {lineage.get('base_version') or lineage.get('base_build_id') or 'newest'}: {what}"
        else:
            origin = "new app"
        marker = "*" if v.get("build_version") and v["build_version"] == newest else " "
        preview = f"{v.get('preview_url') or ''} {v.get('preview_state') or ''}".strip()
        print(f"{marker} {v.get('build_version') or '-':<12} {v['build_id']}  {v['stage']:<10} {_clip(origin, 50):<50} "
              f"{preview}")
        if lineage.get("note"):
            print(f"      note: {lineage['note']}")
    if project["pending"]:
        print("waiting: " + " ".join(project["pending"]))
    return 0


async def cmd_diff(settings: Settings, args: argparse.Namespace) -> int:
    params = {"against": args.against} if args.against else None
    async with api_client(settings) as http:
        response = await http.get(f"/v1/builds/{args.build_id}/diff", params=params)
        text = await _text(response)
    sys.stdout.write(text)
    return 0


async def cmd_files(settings: Settings, args: argparse.Namespace) -> int:
    async with api_client(settings) as http:
        if args.path:
            response = await http.get(f"/v1/builds/{args.build_id}/files/{args.path}")
            if response.status_code >= 400:
                await _text(response)
            sys.stdout.buffer.write(response.content)
            return 0
        listing = await api_call(http, "GET", f"/v1/builds/{args.build_id}/files")
    for f in listing["files"]:
        print(f"{f['size']:>9}  {f['sha256'][:12]}  {f['path']}")
    return 0


async def _text(response: Any) -> str:
    if response.status_code >= 400:
        try:
            error = response.json().get("error", {})
        except ValueError:
            error = {}
        raise CliError(f"{response.status_code} {error.get('code', '')}: {error.get('message', response.text)}")
    return response.text


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


async def cmd_preview(settings: Settings, args: argparse.Namespace) -> int:
    async with api_client(settings) as http:
        result = await api_call(http, "POST", f"/v1/builds/{args.build_id}/preview/{args.action}", json={})
    print(f"{result['build_id']}: {result['state']}  {result.get('preview_url') or ''}")
    if result.get("message"):
        print(f"  {result['message']}" + (f" (debug_id {result['debug_id']})" if result.get("debug_id") else ""))
    return 0 if result["state"] in ("live", "paused") else 1


def add_parsers(sub: Any) -> None:
    c = sub.add_parser("change", help="build the next version of a project: a change, file edits, or a restore")
    c.add_argument("project")
    c.add_argument("text", nargs="?", help="what to change, in plain words (needs a runner that writes code)")
    c.add_argument("--base", help="the version to start from (build_v0_N or a build id; default: the newest ready)")
    c.add_argument("--edit", action="append", metavar="PATH=LOCALFILE", help="write PATH with LOCALFILE's content")
    c.add_argument("--delete", action="append", metavar="PATH", help="delete PATH")
    c.add_argument("--runner", help="the runner to use (default: the server's)")
    c.add_argument("--wait", action="store_true", help="follow the build and print its preview URL")
    v = sub.add_parser("versions", help="a project's versions, their lineage and the changes waiting")
    v.add_argument("project")
    d = sub.add_parser("diff", help="a unified diff of a build against its base (or --against V)")
    d.add_argument("build_id")
    d.add_argument("--against", metavar="V")
    f = sub.add_parser("files", help="a build's files, or one file's content")
    f.add_argument("build_id")
    f.add_argument("path", nargs="?")
    p = sub.add_parser("preview", help="wake or pause a version's preview by hand")
    p.add_argument("action", choices=["wake", "pause"])
    p.add_argument("build_id")


COMMANDS = {"change": cmd_change, "versions": cmd_versions, "diff": cmd_diff, "files": cmd_files,
            "preview": cmd_preview}
