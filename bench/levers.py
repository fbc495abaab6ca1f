"""Toggles that put the real code back to its behaviour before the measured levers were applied
(commit "Apply the measured benchmark levers"), so "before" and "now" run side by side in one
process on one server. They patch module attributes of this process only, for the duration of a
`with` block; nothing here copies activity code.

Dev-server side, the "before" server is `common.MODES["file+wal"]` (no transferProcessorMaxPollRPS).
"""

from __future__ import annotations

import contextlib
import hashlib
import ssl
from collections.abc import Iterator
from typing import Any

import activities.build
import genloop.http
import persistence.repository
from activities.build import BuildActivities
from persistence.repository import AppendResult

OLD_HEALTH_POLL_S = 0.2


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    if not hasattr(module, name):  # fail loudly if the production code moved
        raise AttributeError(f"{module.__name__}.{name} is gone; update bench/levers.py")
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def tls_context_per_client() -> contextlib.AbstractContextManager[None]:
    """genloop.http before: a fresh ssl.create_default_context() (CA bundle load) per preview client."""
    return _patched(genloop.http, "_tls_context", ssl.create_default_context)


def slow_health_poll() -> contextlib.AbstractContextManager[None]:
    """activities.build before: start_and_check polled /health every 200 ms."""
    return _patched(activities.build, "HEALTH_POLL_S", OLD_HEALTH_POLL_S)


def orm_transitions() -> contextlib.AbstractContextManager[None]:
    """persistence.repository before: a transition as an ORM unit of work (SELECT ... FOR UPDATE,
    SELECT max(seq), UPDATE and INSERT at flush) instead of two Core statements."""
    return _patched(persistence.repository, "CORE_TRANSITIONS", False)


def transitions_as_local_activities() -> contextlib.AbstractContextManager[None]:
    """activities.build before: CODE, DEPS and CHECKS each recorded by a local activity before the
    stage's first activity (the worker tells the workflow in ScaffoldState, so the toggle reaches the
    workflow through its history)."""
    return _patched(activities.build, "TRANSITIONS_IN_ACTIVITIES", False)


@contextlib.contextmanager
def worker_levers_off() -> Iterator[None]:
    """Both worker-side levers back to their old behaviour."""
    with tls_context_per_client(), slow_health_poll():
        yield


class _MemoryJob:
    def __init__(self, build_version: str) -> None:
        self.build_version = build_version
        self.preview_label = self.preview_url = None  # no stable URL: no preview workflow either


class MemoryRepositoryDouble:
    """Attribution only (not a proposal): the JobRepository methods the activities call, in memory,
    so the difference to the SQLite run is what persistence costs the worker."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    async def ensure_job(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def advance(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def set_sandbox(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def set_status_message(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def add_usage(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def get(self, build_id: str) -> None:
        return None  # the log sink's read of the job: attempt 1

    async def append_logs(self, build_id: str, lines: Any, **kwargs: Any) -> AppendResult:
        return AppendResult(len(lines), False)

    async def finish_ready(self, *args: Any, **kwargs: Any) -> _MemoryJob:
        return _MemoryJob("build_v0_1")

    async def put_blobs(self, contents: list[bytes]) -> list[str]:
        digests = []
        for content in contents:
            digest = hashlib.sha256(content).hexdigest()
            self.blobs[digest] = content
            digests.append(digest)
        return digests

    async def store_files(self, build_id: str, files: list[tuple[str, bytes]]) -> list[tuple[str, str, int]]:
        digests = await self.put_blobs([content for _, content in files])
        return [(path, digest, len(content)) for (path, content), digest in zip(files, digests, strict=True)]

    async def get_blobs(self, digests: Any) -> dict[str, bytes]:
        return {d: self.blobs[d] for d in digests}


class MemoryRepoActivities(BuildActivities):
    """The real BuildActivities over MemoryRepositoryDouble (attribution of the persistence cost)."""

    def __init__(self, repo: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(MemoryRepositoryDouble(), *args, **kwargs)
