"""`python -m api` / `genloop api`: serve the API with uvicorn on settings.api.host:port."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import uvicorn
from pydantic import ValidationError

from api.app import create_app
from genloop.settings import ApiSettings, ConfigError, load_settings

# Open event streams never end by themselves: give them this long after SIGTERM, then close them.
GRACEFUL_SHUTDOWN_S = 5
EXIT_CONFIG_ERROR = 2
EXIT_STARTUP_FAILED = 3


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="genloop api", description="Serve the genloop HTTP API.")
    parser.add_argument("--host", help="bind address (default: settings api.host)")
    parser.add_argument("--port", type=int, help="port (default: settings api.port)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    try:
        settings = load_settings()
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        if overrides:
            api = ApiSettings.model_validate({**settings.api.model_dump(), **overrides})
            settings = settings.model_copy(update={"api": api})
        settings.check_api_binding()
    except ConfigError as err:
        print(f"genloop api: {err}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except ValidationError as err:
        problems = "; ".join(f"--{e['loc'][0]}: {e['msg']}" for e in err.errors())
        print(f"genloop api: {problems}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    # A no-op when `genloop api` has configured logging already; the level applies either way.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(args.log_level.upper())
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings),
            host=settings.api.host,
            port=settings.api.port,
            log_level=args.log_level,
            lifespan="on",
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    )
    server.run()
    return 0 if server.started else EXIT_STARTUP_FAILED
