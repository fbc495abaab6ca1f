"""`python -m sandbox_host` / `genloop sandbox-host`: run the local E2B-compatible sandbox host."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import resource
import socket
import sys

import uvicorn
from pydantic import SecretStr, ValidationError

from genloop.settings import ConfigError, Settings, get_settings
from sandbox_host import isolation
from sandbox_host.app import HostApp
from sandbox_host.config import HostConfig
from sandbox_host.isolation import IsolationUnavailable, check_bubblewrap
from sandbox_host.sandboxes import SandboxManager

log = logging.getLogger("sandbox_host")

# Streams of background commands stay open for as long as their clients keep them; a stop must
# not wait for them.
GRACEFUL_SHUTDOWN_S = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="sandbox-host",
        description="Local E2B-compatible sandbox host: point e2b.AsyncSandbox's api_url and sandbox_url at it.",
    )
    parser.add_argument("--host", help="address to bind (default: settings sandbox_host.host, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port for the API, envd and previews (default: 49983)")
    parser.add_argument("--state-dir", help="where sandboxes live (relative: under data_dir)")
    parser.add_argument(
        "--api-key", help="the control plane's key (default: generated once into data_dir/sandbox-host.key)"
    )
    parser.add_argument(
        "--unsafe-no-isolation",
        action="store_true",
        default=None,
        help="run sandboxes without bubblewrap (no filesystem, process or network isolation)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def apply_overrides(settings: Settings, args: argparse.Namespace) -> Settings:
    updates: dict[str, object] = {}
    if args.host is not None:
        updates["host"] = args.host
    if args.port is not None:
        updates["port"] = args.port
    if args.state_dir is not None:
        updates["state_dir"] = args.state_dir
    if args.api_key is not None:
        updates["api_key"] = SecretStr(args.api_key)
    if args.unsafe_no_isolation:
        updates["unsafe_no_isolation"] = True
    current = settings.sandbox_host
    try:
        section = type(current).model_validate({**current.model_dump(), **updates})  # validates the flags too
    except ValidationError as exc:
        raise ConfigError("; ".join(e["msg"] for e in exc.errors())) from None
    return settings.model_copy(update={"sandbox_host": section})


def raise_fd_limit() -> None:
    """Every sandbox connection (preview, egress, envd) is a descriptor: use all the kernel allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


MODE_DESCRIPTIONS = {
    isolation.PER_UID: "as uids of their own",
    isolation.ROOTLESS: "as this user, in namespaces of their own",
    isolation.UNSAFE: "WITHOUT isolation",
}


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything else starts, so a taken port is one clear line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def refuse(message: str) -> int:
    """Every expected start-up failure: one line (the last the host logs), exit code 2."""
    log.error("refusing to start: %s.", message)
    return 2


async def serve(config: HostConfig, log_level: str) -> int:
    raise_fd_limit()
    key_source = "configured" if config.api_key else f"in {config.key_file}"
    try:
        config = config.with_api_key()
    except (ConfigError, OSError) as exc:
        return refuse(str(exc))
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(config.state_dir, 0o711 if isolation.can_use_own_uids() else 0o700)
    except OSError as exc:
        return refuse(
            f"cannot use the state directory {config.state_dir} ({exc.strerror}): choose another with --state-dir"
        )
    try:
        config = config.with_host_id()
    except (ConfigError, OSError) as exc:
        return refuse(f"cannot keep the host id in {config.state_dir}: {exc}")
    if config.isolated:
        try:
            await asyncio.to_thread(check_bubblewrap, config.state_dir, config.limits.disk_bytes, config.mode)
        except IsolationUnavailable as exc:
            return refuse(str(exc))
        if config.mode == isolation.ROOTLESS and not isolation.nproc_per_namespace():
            log.warning(
                "Linux %s counts processes per user, not per user namespace: in rootless mode sandboxes get no "
                "process cap (max_processes); Linux 5.14 or later restores it",
                os.uname().release,
            )
    else:
        log.warning("!" * 88)
        log.warning("UNSAFE: sandboxes run WITHOUT isolation. Their commands can read and write whatever")
        log.warning("their uid can reach on this machine, share its network and ports, and see its processes.")
        log.warning("Use only with trusted code, on a machine where bubblewrap cannot run.")
        log.warning("!" * 88)
    try:
        listener = bind_socket(config.host, config.port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return refuse(
                f"port {config.port} on {config.host} is in use (another sandbox host?): stop it, or choose another "
                "port with --port or GENLOOP_SANDBOX_HOST_PORT"
            )
        return refuse(f"cannot listen on {config.host}:{config.port} ({exc.strerror})")
    manager = SandboxManager(config)
    try:
        await manager.start()
    except (OSError, IsolationUnavailable) as exc:
        listener.close()
        return refuse(f"cannot prepare {config.state_dir}: {exc}")
    server = uvicorn.Server(
        uvicorn.Config(
            HostApp(manager, config),
            lifespan="off",
            log_level=log_level,
            access_log=log_level == "debug",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    )
    log.info(
        "sandbox host on http://%s:%d (mode %s: sandboxes run %s; state %s, %d sandboxes adopted, %d paused, "
        "API key %s, host id %s)",
        config.host,
        config.port,
        config.mode,
        MODE_DESCRIPTIONS[config.mode],
        config.state_dir,
        len(manager.sandboxes),
        len(manager.paused),
        key_source,
        config.host_id,
    )
    try:
        await server.serve(sockets=[listener])
    finally:
        # Sandboxes keep running under their own deadlines; the next start adopts them.
        await manager.shutdown()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the preview proxy's upstream requests
    try:
        settings = apply_overrides(get_settings(), args)
        config = HostConfig.from_settings(settings)
    except (ConfigError, ValueError) as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    return asyncio.run(serve(config, args.log_level))
