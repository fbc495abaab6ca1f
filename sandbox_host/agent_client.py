"""Host side of the agent protocol (see agent.py): one unix connection per operation.

The agent's socket is a file the host itself bound in the sandbox's host-only directory
(state_dir/<id>/, mode 0700, never mounted into a sandbox), so nothing a sandbox writes can change
what the host connects to. After a restart the host re-adopts an agent only once it has answered a
fresh nonce with HMAC-SHA256 of the sandbox's secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import socket
from pathlib import Path
from typing import Any

AGENT_SOCKET = "agent.sock"


class AgentUnavailable(Exception):
    """The agent could not be reached: the sandbox is gone or going."""


class AgentCallError(Exception):
    """The agent refused the operation; `code` is one of agent.AgentError's codes."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"AgentCallError({self.code!r}, {self.message!r})"


def listen_socket(path: Path) -> socket.socket:
    """Bind the agent's listening socket (its fd is handed to the agent) at a host-only path."""
    if path.is_socket() or path.is_symlink():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


def expected_mac(secret: bytes, nonce: str) -> str:
    return hmac.new(secret, nonce.encode(), hashlib.sha256).hexdigest()


class AgentStream:
    """An open operation: the request was sent, replies are read line by line or as raw bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    async def read_message(self) -> dict[str, Any] | None:
        line = await self.reader.readline()
        if not line:
            return None
        message = json.loads(line)
        if "error" in message:
            raise AgentCallError(message["error"]["code"], message["error"]["message"])
        return message

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class AgentClient:
    def __init__(self, socket_path: Path, secret: bytes):
        self.socket_path = socket_path
        self._secret = secret

    def __repr__(self) -> str:  # never show the secret
        return f"AgentClient({str(self.socket_path)!r})"

    async def open(self, op: str, **fields: Any) -> AgentStream:
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.socket_path), limit=2**20)
        except OSError as exc:
            raise AgentUnavailable(str(exc)) from None
        stream = AgentStream(reader, writer)
        try:
            await stream.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        except OSError as exc:
            await stream.close()
            raise AgentUnavailable(str(exc)) from None
        return stream

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        stream = await self.open(op, **fields)
        try:
            reply = await stream.read_message()
        except (OSError, ValueError) as exc:
            raise AgentUnavailable(str(exc)) from None
        finally:
            await stream.close()
        if reply is None:
            raise AgentUnavailable("agent closed the connection")
        return reply

    async def verify(self) -> dict[str, Any]:
        """Ping with a fresh nonce; raise AgentUnavailable unless the answer proves the secret."""
        nonce = secrets.token_hex(16)
        reply = await self.call("ping", nonce=nonce)
        if not hmac.compare_digest(str(reply.get("mac", "")), expected_mac(self._secret, nonce)):
            raise AgentUnavailable(f"the agent at {self.socket_path} failed the secret handshake")
        return reply
