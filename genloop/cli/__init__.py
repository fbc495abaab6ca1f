"""`genloop` command line: run the services, trigger and inspect builds, debug and replay.

One module per command group (`client`: builds through the API; `versions`: a project's line of
versions; `services`: the stack and the worker; `ops`: debug, replay, sweep, migrate), plus the
stack supervisor and the worker assembly. This
package is the roof: it may import every layer, and nothing below imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from genloop.cli import client, ops, services, versions
from genloop.cli.client import EXIT_USAGE, CliError
from genloop.settings import ConfigError, get_settings

log = logging.getLogger("genloop")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genloop", description="Describe an app; get a running preview.",
        epilog="--debug (anywhere): full logs on the console.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the local stack (Temporal, sandbox host, worker, API)")
    up.add_argument("--build", metavar="GOAL", help="run one build once the stack is up")
    up.add_argument("--project", default="demo")
    up.add_argument("--exit-after-build", action="store_true", help="stop the stack after the build")

    w = sub.add_parser("worker", help="run the Temporal worker")
    w.add_argument("--only", choices=["workflows", "activities"],
                   help="run one half: workflow tasks (with their local activities) or activity tasks")
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
    sw = sub.add_parser("sweep", help="kill sandboxes whose build is gone (--all: every genloop sandbox)")
    sw.add_argument("--all", action="store_true", help="also the sandboxes of live previews")
    versions.add_parsers(sub)
    return p


_COMMANDS = {
    "up": services.cmd_up, "worker": services.cmd_worker, "migrate": ops.cmd_migrate, "build": client.cmd_build,
    "status": client.cmd_status, "cancel": client.cmd_cancel, "list": client.cmd_list, "debug": ops.cmd_debug,
    "replay": ops.cmd_replay, "sweep": ops.cmd_sweep, **versions.COMMANDS,
}


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SERVICES = frozenset({"worker", "api", "sandbox-host"})  # their output is their log: everything at INFO


class _QuietLibraries(logging.Filter):
    """On a person's console: genloop's own INFO lines, and only warnings from libraries (alembic,
    httpx, the Temporal SDK); the log files keep everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name == "genloop" or record.name.startswith("genloop.")


def _configure_logging(command: str | None, debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=LOG_FORMAT)
    if command not in SERVICES and not debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_QuietLibraries())


def _log_to_file(settings) -> None:
    """`genloop up` keeps its full log (libraries included) beside the services' logs."""
    logs = settings.resolve("logs")
    logs.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(logs / "genloop-up.log")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if "temporalio.bridge" in sys.modules and argv is None:
        # The Temporal SDK's native threads can abort the interpreter while it finalizes (after a
        # failed connect in particular); everything this process started is stopped by now.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    _configure_logging(argv[0] if argv else None, debug)
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
        if args.command == "up":
            _log_to_file(settings)
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
