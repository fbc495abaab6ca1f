"""Commands that run genloop's services: `up` (the whole local stack) and `worker`."""

from __future__ import annotations

import argparse
import asyncio
import signal

from genloop.cli.client import run_build
from genloop.settings import Settings


async def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from genloop.cli.stack import Stack

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


async def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from genloop.cli.worker import run_worker

    await run_worker(settings)
    return 0
