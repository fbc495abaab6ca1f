"""The log sink every activity writes command output through: lines are redacted, escaped and split
here, buffered, and written to `build_logs` in batches (every `batch_interval_s`, or sooner once
`batch_bytes` wait), a side channel beside Temporal's history.

Retries: each line is keyed by its source (stage, fix attempt, command, stream) and its line number
there, and the repository skips keys it has stored. A retried activity replays its command (the
install runs again, the app starts again) and its output lines land on the same keys, so what the
dead attempt wrote is not written twice; the rest continues where it stopped. The activity's own
attempt number is deliberately not part of the key (it would make every retry a duplicate). A
crashed worker loses at most its unflushed batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from genloop.errors import GenloopError, redact_secrets
from persistence.models import utcnow
from persistence.repository import JobRepository, LogLine

log = logging.getLogger("genloop.activities.logs")

LINE_MAX_CHARS = 2000  # a longer line is stored as several (a minified bundle, a progress bar without newlines)
# Control characters other than tab (binary output, terminal escapes) are stored as \xNN text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_NEWLINES = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class LogPolicy:
    """settings.logs, as the sink needs it."""

    cap_bytes: int = 2 * 1024 * 1024
    batch_interval_s: float = 0.2
    batch_bytes: int = 64 * 1024

    @classmethod
    def from_settings(cls, settings: Any) -> LogPolicy:
        logs = settings.logs
        return cls(cap_bytes=logs.cap_bytes, batch_interval_s=logs.batch_interval_s, batch_bytes=logs.batch_bytes)


def printable(text: str | bytes) -> str:
    """Output as storable text: bytes decoded (invalid UTF-8 as \\xNN), control characters escaped."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="backslashreplace")
    if not _CONTROL.search(text):
        return text
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def split_long(line: str) -> list[str]:
    if len(line) <= LINE_MAX_CHARS:
        return [line]
    return [line[i : i + LINE_MAX_CHARS] for i in range(0, len(line), LINE_MAX_CHARS)]


class LogSink:
    """One activity's writer for one build, stage and fix attempt. Use as `async with`: the exit
    flushes what is buffered (also when the activity fails: a crash's traceback is the point)."""

    def __init__(self, repo: JobRepository, build_id: str, stage: str, attempt: int, policy: LogPolicy,
                 *, scope: str = "") -> None:
        self.repo = repo
        self.build_id = build_id
        self.stage = stage
        self.attempt = attempt
        self.policy = policy
        self.scope = scope  # another run of the same stage and attempt (a version served again): its own keys
        self.truncated = False
        self._next: dict[str, int] = {}  # source -> its next line number
        self._partial: dict[str, str] = {}  # source -> text after its last newline
        self._partial_stream: dict[str, str] = {}
        self._pending: list[LogLine] = []
        self._pending_bytes = 0
        self._full = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LogSink:
        self._task = asyncio.create_task(self._flush_periodically(), name=f"log-sink-{self.build_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for source in list(self._partial):
            self._end_partial(source)
        # Bounded: a database that is down must not hold up the activity's own result or failure.
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self.flush(final=True), timeout=10)

    # --- writing (synchronous: e2b's on_stdout/on_stderr callbacks and runner progress call these) ---

    def writer(self, command: str, stream: str):
        """A callback for e2b's on_stdout / on_stderr: chunks of `command`'s `stream` output."""
        source = self._source(command, stream)
        return lambda chunk: self.write(source, stream, chunk)

    def line(self, text: str, *, command: str = "genloop", stream: str = "system") -> None:
        """One whole line (a command being run, a runner's progress or summary, a note from genloop)."""
        source = self._source(command, stream)
        for part in _NEWLINES.split(text):
            self._add(source, stream, part)

    def write(self, source: str, stream: str, chunk: str | bytes) -> None:
        if self.truncated:
            return
        if isinstance(chunk, bytes):
            chunk = chunk.decode("utf-8", errors="backslashreplace")
        text = self._partial.pop(source, "") + chunk
        held = text.endswith("\r")  # maybe the first half of a \r\n split across chunks
        *complete, rest = _NEWLINES.split(text[:-1] if held else text)
        if held:
            rest += "\r"
        for part in complete:
            self._add(source, stream, part)
        if len(rest) > LINE_MAX_CHARS + 1:  # no newline in sight: store what is there
            keep = len(rest) % LINE_MAX_CHARS or LINE_MAX_CHARS
            self._add(source, stream, rest[:-keep])
            rest = rest[-keep:]
        if rest:
            self._partial[source] = rest
            self._partial_stream[source] = stream

    def _source(self, command: str, stream: str) -> str:
        scope = f"{self.scope}/" if self.scope else ""
        return f"{self.stage}/{self.attempt}/{scope}{command}/{stream}"[:100]

    def _end_partial(self, source: str) -> None:
        rest = self._partial.pop(source, "").removesuffix("\r")
        if rest:
            self._add(source, self._partial_stream.get(source, "stdout"), rest)

    def _add(self, source: str, stream: str, text: str) -> None:
        if self.truncated:
            return
        # Redacted before splitting, so a secret across a split point is still found.
        for piece in split_long(redact_secrets(printable(text))):
            n = self._next.get(source, 0)
            self._next[source] = n + 1
            self._pending.append(LogLine(self.stage, self.attempt, stream, source, n, piece, utcnow()))
            self._pending_bytes += len(piece) + 1
        if self._pending_bytes >= self.policy.batch_bytes:
            self._full.set()

    # --- flushing ---

    async def _flush_periodically(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self.policy.batch_interval_s)
            self._full.clear()
            await self.flush()

    async def flush(self, *, final: bool = False) -> None:
        if not self._pending:
            return
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        try:
            result = await self.repo.append_logs(self.build_id, batch, cap_bytes=self.policy.cap_bytes)
        except asyncio.CancelledError:
            # Cancelled mid-write (the sink is closing): the batch may or may not have committed.
            # Writing it again is safe, its keys are skipped if stored.
            self._pending[:0] = batch
            raise
        except Exception as err:  # noqa: BLE001 - logs never fail a build
            # Keep the batch for the next flush while what waits stays within the cap (a database
            # that is down for long must not grow this without bound); drop it at the end.
            size = sum(len(line.text) + 1 for line in batch)
            kept = not final and self._pending_bytes + size <= self.policy.cap_bytes
            log.warning("build %s: could not store %d log lines (%s); %s", self.build_id, len(batch),
                        err if isinstance(err, GenloopError) else repr(err), "will retry" if kept else "dropped")
            if kept:
                self._pending[:0] = batch
                self._pending_bytes += size
            return
        if result.truncated:
            self.truncated = True
            self._pending.clear()
