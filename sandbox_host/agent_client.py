"""Host side of the agent protocol (see agent.py): one unix connection per operation."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from typing import Any


class AgentUnavailable(Exception):
    """The agent could not be reached: the sandbox is gone or going."""


class AgentCallError(Exception):
    """The agent refused the operation; `code` is one of agent.AgentError's codes."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def open_socket_path(path: str) -> int:
    """An O_PATH descriptor for a unix socket the sandbox created, refusing anything else.

    The run directory is writable from inside the sandbox, so a sandbox could swap a socket for a
    symlink to some host socket. Connecting through /proc/self/fd/N of a descriptor opened with
    O_NOFOLLOW and checked to be a socket cannot be redirected that way.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        raise AgentUnavailable(f"{path} is not a socket")
    return fd


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


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
    def __init__(self, socket_fd: int):
        self._socket_fd = socket_fd

    async def open(self, op: str, **fields: Any) -> AgentStream:
        try:
            reader, writer = await asyncio.open_unix_connection(fd_path(self._socket_fd), limit=2**20)
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
