"""Commands that run genloop's services: `up` (the whole local stack) and `worker`."""

from __future__ import annotations

import argparse
import asyncio
import signal

from genloop.cli.client import CliError, run_build
from genloop.settings import Settings


async def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from genloop.cli.stack import Stack, StackError

    stack = Stack(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    try:
        try:
            await stack.start()
            await stack.wait_api_healthy()
        except StackError as err:
            raise CliError(str(err)) from None
        print(
            f"genloop is up.\n"
            f"  API:        {stack.api_url}\n"
            f"  Web UI:     {settings.temporal.web_ui_url}\n"
            f"  Sandboxes:  {await stack.sandbox_mode()}\n"
            f"  Data:       {settings.data_dir} (logs in {settings.resolve('logs')})",
            flush=True,
        )
        if args.build:
            code = await run_build(settings, args.build, args.project, wait=True)
        if not args.exit_after_build:
            print("Press Ctrl-C to stop.", flush=True)
            await stop.wait()
    finally:
        left = await _sandboxes_left(settings) if stack.children else 0
        stopped = await stack.stop()
        if stopped:
            print(_stop_message(stopped, left, stack.local_sandbox_host), flush=True)
    return code


async def _sandboxes_left(settings: Settings) -> int:
    """How many sandboxes outlive this stop (they end at their TTL); 0 when that cannot be known."""
    from activities.sandbox import SandboxClient, SandboxConfig, close_sdk_transports
    from genloop.settings import ConfigError

    try:
        return len(await asyncio.wait_for(SandboxClient(SandboxConfig.from_settings(settings)).list(), 5))
    except (ConfigError, TimeoutError, OSError, Exception):  # noqa: BLE001 - a courtesy count, never a failure
        return 0
    finally:
        await close_sdk_transports()


def _stop_message(stopped: list[str], left: int, local_host: bool) -> str:
    message = f"Stopped: {', '.join(stopped)}."
    if left:
        where = "the next `genloop up` adopts them" if local_host else "E2B ends them"
        message += (f"\nLeft running: {left} sandbox{'es' if left != 1 else ''} (live previews end at their timeout; "
                    f"{where}). To remove them now: genloop sweep --all")
    return message


async def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from genloop.cli.worker import run_worker

    await run_worker(settings, only=args.only)
    return 0
