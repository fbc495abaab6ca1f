"""The repository functions activities and the API call. Every method is one short transaction.

Writes run under a lock on the job row (`SELECT ... FOR UPDATE` on PostgreSQL; on SQLite every
write transaction starts with BEGIN IMMEDIATE, which serializes writers), so a read-validate-write
never interleaves with another writer. Connection trouble surfaces as
`GenloopError(DATABASE_UNAVAILABLE)`, which callers retry.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from genloop.errors import ErrorKind, GenloopError
from genloop.http import version_label
from persistence.db import WRITE_TRANSACTION, database_errors, describe_url, make_engine, make_session_factory
from persistence.models import Blob, BuildAttempt, BuildCounter, BuildFile, BuildLog, Job, JobTransition, utcnow
from workflows.stages import Stage, is_allowed

MAX_PAGE_SIZE = 200
_LINEAGE_COLUMNS = frozenset(
    {"kind", "runner", "stack", "base_build_id", "base_version", "change_request", "edited_paths", "request_digest"}
)
_TRANSITION_FIELDS = frozenset({"message", "at", "error_message", "error_detail", "debug_id", "run_id", "then"})
# Keeps IN (...) lists well under SQLite's and PostgreSQL's bound-parameter limits.
_BLOB_BATCH = 500
# Transitions as two Core statements instead of an ORM unit of work (bench levers toggles it off).
CORE_TRANSITIONS = True
# The stages a build may move to each stage from (the stage table, inverted).
_SOURCES = {target: [s.value for s in Stage if s is not target and is_allowed(s, target)] for target in Stage}

# The hot path's statements, built once: on the table (no ORM entity to load or refresh), with the
# SET columns given per call, so SQLAlchemy reuses one compiled form per column set.
_JOBS, _TRANSITIONS = Job.__table__, JobTransition.__table__
# Only matches a row in a stage allowed to move to the target: the validation and the row lock in one.
_MOVE = {
    target: update(_JOBS)
    .where(_JOBS.c.id == bindparam("b_id"), _JOBS.c.status.in_(_SOURCES[target]))
    .returning(_JOBS.c.id)
    for target in Stage
}
# Numbers itself: the UPDATE above holds the job's row lock, and every transition goes through it.
_INSERT_TRANSITION = insert(_TRANSITIONS).values(
    build_id=bindparam("b_id"),
    seq=select(func.coalesce(func.max(_TRANSITIONS.c.seq), 0) + 1)
    .where(_TRANSITIONS.c.build_id == bindparam("b_id"))
    .scalar_subquery(),
    stage=bindparam("t_stage"),
    message=bindparam("t_message"),
    at=bindparam("t_at"),
)
_SET_SANDBOX = update(_JOBS).where(_JOBS.c.id == bindparam("b_id")).returning(_JOBS.c.id)
_LOCK_JOB = select(_JOBS.c.id).where(_JOBS.c.id == bindparam("b_id")).with_for_update()
_LOG_COUNTERS = select(_JOBS.c.log_seq, _JOBS.c.log_bytes).where(_JOBS.c.id == bindparam("b_id")).with_for_update()
_SET_LOG_COUNTERS = update(_JOBS).where(_JOBS.c.id == bindparam("b_id"))
_DELETE_FILES = delete(BuildFile.__table__).where(BuildFile.__table__.c.build_id == bindparam("b_id"))
_INSERT_FILE = insert(BuildFile.__table__)


MAX_LOG_PAGE = 5000
TRUNCATED_SOURCE = "genloop/truncated"


@dataclass(frozen=True)
class LogLine:
    """A line on its way to `build_logs` (already redacted, escaped and split by the log sink)."""

    stage: str
    attempt: int
    stream: str
    source: str
    line_no: int
    text: str
    at: datetime


@dataclass(frozen=True)
class AppendResult:
    stored: int
    truncated: bool  # the build's log is at its cap: later lines are dropped


class JobRepository:
    def __init__(self, session_factory: async_sessionmaker[AsyncSession]) -> None:
        bind = session_factory.kw.get("bind")
        if bind is None:
            raise ValueError("the session factory must be bound to an engine")
        self._sessions = session_factory
        self._dialect = bind.dialect.name
        self._where = describe_url(bind.url)
        self._owned_engine: AsyncEngine | None = None
        # A concurrent or repeated create (activity retry) loses quietly instead of raising.
        self._insert_job_row = self._insert(_JOBS).on_conflict_do_nothing(index_elements=["id"]).returning(_JOBS.c.id)
        # Executed with a list of rows (executemany): one compiled statement for any number of rows.
        self._insert_blob = self._insert(Blob.__table__).on_conflict_do_nothing(index_elements=["digest"])
        self._insert_log = self._insert(BuildLog.__table__).on_conflict_do_nothing()

    @classmethod
    def from_url(cls, url: str) -> JobRepository:
        engine = make_engine(url)
        repo = cls(make_session_factory(engine))
        repo._owned_engine = engine
        return repo

    async def aclose(self) -> None:
        """Dispose of the engine if `from_url` created it; a caller-supplied engine is the caller's."""
        if self._owned_engine is not None:
            await self._owned_engine.dispose()

    # --- jobs and transitions -------------------------------------------------------------------

    async def create_job(
        self,
        build_id: str,
        project_id: str,
        goal: str,
        *,
        workflow_id: str | None = None,
        run_id: str | None = None,
        **lineage: Any,
    ) -> Job:
        """Insert the job as `queued` with its first transition. An existing job is returned as is.
        `lineage`: the request's columns (kind, runner, stack, base_build_id, base_version,
        change_request, edited_paths, request_digest)."""
        unknown = set(lineage) - _LINEAGE_COLUMNS
        if unknown:
            raise ValueError(f"not lineage columns: {sorted(unknown)}")
        async with self._write() as session:
            await self._insert_job(session, build_id, project_id, goal, workflow_id, run_id, lineage)
            return await self._locked_job(session, build_id)

    async def ensure_job(
        self, build_id: str, project_id: str, goal: str, *, workflow_id: str | None = None, run_id: str | None = None
    ) -> None:
        """create_job for a caller that does not need the row back (a build's start write)."""
        async with self._write() as session:
            await self._insert_job(session, build_id, project_id, goal, workflow_id, run_id, {})

    async def _insert_job(
        self, session: AsyncSession, build_id: str, project_id: str, goal: str, workflow_id: str | None,
        run_id: str | None, lineage: dict[str, Any],
    ) -> None:
        now = utcnow()
        conn = await session.connection()
        inserted = await conn.execute(
            self._insert_job_row,
            dict(
                id=build_id,
                project_id=project_id,
                goal=goal,
                status=Stage.QUEUED.value,
                status_message=Stage.QUEUED.label,
                workflow_id=workflow_id,
                run_id=run_id,
                created_at=now,
                updated_at=now,
                **lineage,
            ),
        )
        if inserted.scalar_one_or_none() is not None:
            await conn.execute(
                _INSERT_TRANSITION,
                {"b_id": build_id, "t_stage": Stage.QUEUED.value, "t_message": Stage.QUEUED.label, "t_at": now},
            )

    async def transition(
        self,
        build_id: str,
        stage: Stage,
        *,
        message: str = "",
        at: datetime | None = None,
        error_message: str | None = None,
        error_detail: str | None = None,
        debug_id: str | None = None,
        run_id: str | None = None,
        then: Stage | None = None,
    ) -> Job:
        """Move the build to `stage`, validated against the stage table, and record the transition;
        with `then`, on to that stage too in the same transaction (its label as the message).

        Re-applying the current stage is a no-op (an activity retried after its commit landed).
        """
        job = await self._transition(
            build_id,
            stage,
            dict(message=message, at=at, error_message=error_message, error_detail=error_detail,
                 debug_id=debug_id, run_id=run_id, then=then),
            load=True,
        )
        assert job is not None
        return job

    async def advance(self, build_id: str, stage: Stage, **fields: Any) -> None:
        """transition() (the same keywords) for a caller that does not need the row back (the
        activities): the hot path then loads no row at all."""
        await self._transition(build_id, stage, fields, load=False)

    async def _transition(self, build_id: str, stage: Stage, fields: dict[str, Any], *, load: bool) -> Job | None:
        unknown = set(fields) - _TRANSITION_FIELDS
        if unknown:
            raise TypeError(f"not transition fields: {sorted(unknown)}")
        message, at, then = fields.get("message") or "", fields.get("at"), fields.get("then")
        # Columns set with the move; None leaves a column as it is.
        extra = {
            column: fields[column]
            for column in ("error_message", "error_detail", "debug_id", "run_id")
            if fields.get(column) is not None
        }
        async with self._write() as session:
            moved = await self._move(session, build_id, Stage(stage), message, at, extra)
            if then is not None:
                moved = await self._move(session, build_id, then, then.label, at, {})
            if not load:
                return None
            if isinstance(moved, Job):
                return moved
            # The hot path wrote through the connection: the session has no row yet, or a stale one.
            return await session.get(Job, build_id, populate_existing=True)

    async def _move(
        self, session: AsyncSession, build_id: str, stage: Stage, message: str, at: datetime | None,
        extra: dict[str, str],
    ) -> Job | bool:
        """True when the hot path moved the row; else the row, moved (or already there) by the ORM."""
        if CORE_TRANSITIONS and await self._transition_in_two_statements(session, build_id, stage, message, at, extra):
            return True
        # Not found, the current stage again (a no-op), an illegal move, or the lever off.
        job = await self._locked_job(session, build_id)
        if job.stage is stage:
            return job
        _check_transition(job, stage)
        for field, value in extra.items():
            setattr(job, field, value)
        await self._record_transition(session, job, stage, message, at)
        await session.flush()  # a hot-path move after this one in the same transaction must see it
        return job

    async def _transition_in_two_statements(
        self, session: AsyncSession, build_id: str, stage: Stage, message: str, at: datetime | None,
        extra: dict[str, str],
    ) -> bool:
        """The hot path: an UPDATE that only matches a row in a stage allowed to move to `stage`
        (the row lock and the validation in one statement) and an INSERT that numbers the
        transition itself. False when nothing matched: the caller's slow path says why."""
        text, now = message or stage.label, utcnow()
        conn = await session.connection()
        moved = await conn.execute(
            _MOVE[stage], {"b_id": build_id, "status": stage.value, "status_message": text, "updated_at": now, **extra}
        )
        if moved.scalar_one_or_none() is None:
            return False
        await conn.execute(
            _INSERT_TRANSITION, {"b_id": build_id, "t_stage": stage.value, "t_message": text, "t_at": at or now}
        )
        return True

    async def set_sandbox(
        self, build_id: str, sandbox_id: str, workspace_path: str, *, host: str | None = None
    ) -> None:
        async with self._write() as session:
            updated = await (await session.connection()).execute(
                _SET_SANDBOX,
                {
                    "b_id": build_id,
                    "sandbox_id": sandbox_id,
                    "workspace_path": workspace_path,
                    "sandbox_host": host,
                    "updated_at": utcnow(),
                },
            )
            if updated.scalar_one_or_none() is None:
                raise GenloopError(ErrorKind.NOT_FOUND, f"build {build_id} not found")

    async def allocate_build_version(self, build_id: str, project_id: str) -> str:
        """`build_v0_N`, N one above the project's last; the same value again for the same build."""
        async with self._write() as session:
            job = await self._locked_job(session, build_id)
            if job.project_id != project_id:
                raise GenloopError(
                    ErrorKind.INVALID_INPUT,
                    f"build {build_id} belongs to project {job.project_id!r}, not {project_id!r}",
                )
            return await self._ensure_build_version(session, job)

    async def finish_ready(
        self,
        build_id: str,
        *,
        sandbox_id: str,
        preview_url: str,
        workspace_path: str,
        message: str = "",
        at: datetime | None = None,
        version_url: Callable[[str], str] | None = None,
    ) -> Job:
        """Version, sandbox columns and the `ready` transition in one transaction: all or nothing.
        `preview_url` is the sandbox's own URL; with `version_url` (label -> URL) the version also
        gets its stable URL, which becomes `preview_url` (the sandbox's stays in
        `sandbox_preview_url`)."""
        async with self._write() as session:
            job = await self._locked_job(session, build_id)
            if job.stage is Stage.READY:
                return job
            # Validate before allocating so an illegal finish consumes no version number.
            _check_transition(job, Stage.READY)
            await self._ensure_build_version(session, job)
            job.sandbox_id = sandbox_id
            job.sandbox_preview_url = preview_url
            job.preview_url = preview_url
            job.workspace_path = workspace_path
            if version_url is not None and job.version_number is not None:
                job.preview_label = version_label(job.project_id, job.version_number)
                job.preview_url = version_url(job.preview_label)
                job.preview_state = "live"
                job.preview_woken_at = at or utcnow()
            await self._record_transition(session, job, Stage.READY, message, at)
            return job

    async def get(self, build_id: str) -> Job | None:
        async with self._read() as session:
            return await session.get(Job, build_id)

    async def get_by_debug_id(self, debug_id: str) -> Job | None:
        async with self._read() as session:
            return (await session.execute(select(Job).where(Job.debug_id == debug_id).limit(1))).scalar_one_or_none()

    async def list_jobs(self, project_id: str, *, limit: int = 20, before: str | None = None) -> list[Job]:
        """A page of the project's jobs, newest first. `before` is the id of the last job of the
        previous page (keyset pagination: stable while new jobs arrive, no OFFSET scans)."""
        if not 1 <= limit <= MAX_PAGE_SIZE:
            raise GenloopError(ErrorKind.INVALID_INPUT, f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
        async with self._read() as session:
            query = select(Job).where(Job.project_id == project_id)
            if before is not None:
                cursor = await session.get(Job, before)
                if cursor is None or cursor.project_id != project_id:
                    raise GenloopError(ErrorKind.INVALID_INPUT, f"unknown cursor {before!r} for project {project_id!r}")
                # (created_at, id) is unique, so ties on created_at neither repeat nor skip rows.
                query = query.where(
                    or_(
                        Job.created_at < cursor.created_at,
                        and_(Job.created_at == cursor.created_at, Job.id < cursor.id),
                    )
                )
            query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
            return list((await session.execute(query)).scalars())

    async def list_transitions(self, build_id: str) -> list[JobTransition]:
        async with self._read() as session:
            query = select(JobTransition).where(JobTransition.build_id == build_id).order_by(JobTransition.seq)
            return list((await session.execute(query)).scalars())

    # --- lines of versions: lineage, files, attempts, usage -------------------------------------

    async def set_lineage(
        self, build_id: str, *, goal: str, base_build_id: str | None, base_version: str | None, note: str | None
    ) -> Job:
        """What a change build was resolved to build on (the project workflow may pick another base
        than the request named, when the previous change failed)."""
        async with self._write() as session:
            job = await self._locked_job(session, build_id)
            job.goal, job.base_build_id, job.base_version = goal, base_build_id, base_version
            job.lineage_note = note or None
            job.updated_at = utcnow()
            return job

    async def store_files(self, build_id: str, files: Sequence[tuple[str, bytes]]) -> list[tuple[str, str, int]]:
        """The contents into the blob store and `files` ((path, content)) as the build's file list, in
        one transaction; returns (path, digest, size) in order. Idempotent like its two halves."""
        listed = [(path, hashlib.sha256(content).hexdigest(), len(content)) for path, content in files]
        async with self._write() as session:
            await self._insert_blobs(
                session, {digest: content for (_, digest, _), (_, content) in zip(listed, files, strict=True)}
            )
            await self._replace_files(session, build_id, listed)
        return listed

    async def _replace_files(self, session: AsyncSession, build_id: str, files: Sequence[tuple[str, str, int]]) -> None:
        conn = await session.connection()
        if (await conn.execute(_LOCK_JOB, {"b_id": build_id})).one_or_none() is None:
            raise GenloopError(ErrorKind.NOT_FOUND, f"build {build_id} not found")
        await conn.execute(_DELETE_FILES, {"b_id": build_id})
        if files:
            await conn.execute(_INSERT_FILE, [dict(build_id=build_id, path=p, digest=d, size=n) for p, d, n in files])

    async def get_files(self, build_id: str) -> list[BuildFile]:
        async with self._read() as session:
            query = select(BuildFile).where(BuildFile.build_id == build_id).order_by(BuildFile.path)
            return list((await session.execute(query)).scalars())

    async def find_version(self, project_id: str, ref: str) -> Job | None:
        """A build of the project by build id or by build_version; None when there is none."""
        async with self._read() as session:
            query = select(Job).where(Job.project_id == project_id, or_(Job.id == ref, Job.build_version == ref))
            return (await session.execute(query.limit(1))).scalar_one_or_none()

    async def newest_ready(self, project_id: str) -> Job | None:
        async with self._read() as session:
            query = (
                select(Job)
                .where(Job.project_id == project_id, Job.status == Stage.READY.value)
                .order_by(Job.version_number.desc())
                .limit(1)
            )
            return (await session.execute(query)).scalar_one_or_none()

    async def project_builds(self, project_id: str, *, limit: int = MAX_PAGE_SIZE) -> list[Job]:
        """The project's builds in the order they were requested (oldest first)."""
        async with self._read() as session:
            query = select(Job).where(Job.project_id == project_id).order_by(Job.created_at, Job.id).limit(limit)
            return list((await session.execute(query)).scalars())

    # --- previews: a version's stable URL and its sandbox's life ------------------------------------

    async def find_by_label(self, label: str) -> Job | None:
        """The READY version whose stable URL has this host label."""
        async with self._read() as session:
            return (await session.execute(select(Job).where(Job.preview_label == label))).scalar_one_or_none()

    async def set_preview(
        self,
        build_id: str,
        state: str,
        *,
        sandbox_id: str | None = None,
        sandbox_preview_url: str | None = None,
        woken_at: datetime | None = None,
        sandbox_host: str | None = None,
    ) -> Job:
        """Record a version's preview state, and the sandbox that now serves it (after a re-serve)."""
        async with self._write() as session:
            job = await self._locked_job(session, build_id)
            job.preview_state = state
            if sandbox_id is not None:
                job.sandbox_id = sandbox_id
            if sandbox_preview_url is not None:
                job.sandbox_preview_url = sandbox_preview_url
            if woken_at is not None:
                job.preview_woken_at = woken_at
            if sandbox_host is not None:
                job.sandbox_host = sandbox_host
            job.updated_at = utcnow()
            return job

    async def among_newest_ready(self, build_id: str, newest: int) -> bool:
        """Whether the build is one of its project's `newest` READY versions (kept awake)."""
        if newest <= 0:
            return False
        async with self._read() as session:
            job = await session.get(Job, build_id)
            if job is None or job.version_number is None:
                return False
            query = (
                select(Job.id)
                .where(Job.project_id == job.project_id, Job.status == Stage.READY.value)
                .order_by(Job.version_number.desc())
                .limit(newest)
            )
            return build_id in set((await session.execute(query)).scalars())

    async def pending_changes(self, project_id: str) -> list[Job]:
        """The project's changes still waiting in its queue (not started), in order."""
        async with self._read() as session:
            query = (
                select(Job)
                .where(Job.project_id == project_id, Job.kind == "change", Job.status == Stage.QUEUED.value)
                .order_by(Job.created_at, Job.id)
            )
            return list((await session.execute(query)).scalars())

    async def record_attempt(
        self,
        build_id: str,
        *,
        attempt: int,
        stage: str,
        command: str,
        exit_code: int | None,
        output: str,
        max_attempts: int,
        at: datetime | None = None,
    ) -> None:
        """Record why attempt `attempt` failed and that the build is now on attempt + 1. Re-recording
        the same attempt (a retried activity) changes nothing."""
        async with self._write() as session:
            job = await self._locked_job(session, build_id)
            await session.execute(
                self._insert(BuildAttempt)
                .values(
                    build_id=build_id,
                    attempt=attempt,
                    stage=stage,
                    command=command,
                    exit_code=exit_code,
                    output=output,
                    at=at or utcnow(),
                )
                .on_conflict_do_nothing(index_elements=["build_id", "attempt"])
            )
            job.attempt = max(job.attempt, attempt + 1)  # the attempt now running
            job.max_attempts = max_attempts
            job.updated_at = utcnow()

    async def list_attempts(self, build_id: str) -> list[BuildAttempt]:
        async with self._read() as session:
            query = select(BuildAttempt).where(BuildAttempt.build_id == build_id).order_by(BuildAttempt.attempt)
            return list((await session.execute(query)).scalars())

    async def add_usage(self, build_id: str, *, tokens_in: int, tokens_out: int, calls: int, model: str) -> Job:
        async with self._write() as session:
            job = await self._locked_job(session, build_id)
            job.tokens_in += tokens_in
            job.tokens_out += tokens_out
            job.llm_calls += calls
            job.llm_model = model or job.llm_model
            job.updated_at = utcnow()
            return job

    async def set_status_message(self, build_id: str, message: str) -> None:
        """Progress within a stage ("writing code: 3.2k tokens"); the stage itself does not change."""
        async with self._write() as session:
            job = await self._locked_job(session, build_id)
            if not job.stage.terminal:
                job.status_message = message
                job.updated_at = utcnow()

    # --- build logs -----------------------------------------------------------------------------

    async def append_logs(self, build_id: str, lines: Sequence[LogLine], *, cap_bytes: int) -> AppendResult:
        """Store `lines` in order, numbered by the build's log seq. A line whose (source, line_no) is
        stored already is skipped: a retried activity replaying its command's output writes only what
        the dead attempt did not. Once the build's log reaches `cap_bytes` one truncation line is
        stored and every later line dropped."""
        if not lines:
            return AppendResult(0, False)
        async with self._write() as session:
            conn = await session.connection()
            counters = (await conn.execute(_LOG_COUNTERS, {"b_id": build_id})).one_or_none()
            if counters is None:
                raise GenloopError(ErrorKind.NOT_FOUND, f"build {build_id} not found")
            sources = sorted({line.source for line in lines})
            stored_upto = dict(
                (
                    await conn.execute(
                        select(BuildLog.source, func.max(BuildLog.line_no))
                        .where(BuildLog.build_id == build_id, BuildLog.source.in_(sources))
                        .group_by(BuildLog.source)
                    )
                ).all()
            )
            rows: list[dict[str, Any]] = []
            # Counted in locals and written back once, after the loop.
            seq, used = counters
            truncated = used >= cap_bytes
            for line in lines:
                if truncated:
                    break
                if line.line_no <= stored_upto.get(line.source, -1):
                    continue
                size = len(line.text.encode())
                if used + size > cap_bytes:
                    text = (
                        f"[genloop] log truncated: the build reached its {cap_bytes}-byte log cap; later output dropped"
                    )
                    line = LogLine(line.stage, line.attempt, "system", TRUNCATED_SOURCE, 0, text, line.at)
                    size, truncated = cap_bytes - used + len(text.encode()), True
                seq += 1
                used += size
                rows.append(
                    dict(
                        build_id=build_id,
                        seq=seq,
                        at=line.at,
                        stage=line.stage,
                        attempt=line.attempt,
                        stream=line.stream,
                        source=line.source,
                        line_no=line.line_no,
                        text=line.text,
                    )
                )
            if rows:
                await conn.execute(_SET_LOG_COUNTERS, {"b_id": build_id, "log_seq": seq, "log_bytes": used})
                # Core executemany on the table: one cached statement for any batch size (a VALUES
                # list per batch is compiled anew each time; the ORM's bulk path costs per row).
                await conn.execute(self._insert_log, rows)
            return AppendResult(len(rows), truncated)

    async def list_logs(
        self,
        build_id: str,
        *,
        after: int = 0,
        limit: int = 1000,
        stage: str | None = None,
        tail: int | None = None,
        contains: str | None = None,
    ) -> list[BuildLog]:
        """The build's lines with seq > `after`, oldest first; with `tail`, the last `tail` of them;
        with `contains`, only lines containing that text (case-insensitive)."""
        async with self._read() as session:
            query = select(BuildLog).where(BuildLog.build_id == build_id, BuildLog.seq > after)
            if stage is not None:
                query = query.where(BuildLog.stage == stage)
            if contains:
                pattern = contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                query = query.where(BuildLog.text.ilike(f"%{pattern}%", escape="\\"))
            if tail is not None:
                newest = query.order_by(BuildLog.seq.desc()).limit(min(tail, MAX_LOG_PAGE))
                return list(reversed((await session.execute(newest)).scalars().all()))
            query = query.order_by(BuildLog.seq).limit(min(limit, MAX_LOG_PAGE))
            return list((await session.execute(query)).scalars())

    async def log_truncated(self, build_id: str) -> bool:
        async with self._read() as session:
            query = select(BuildLog.seq).where(
                BuildLog.build_id == build_id, BuildLog.source == TRUNCATED_SOURCE, BuildLog.line_no == 0
            )
            return (await session.execute(query)).first() is not None

    async def logs_after(self, cursors: dict[str, int], *, limit: int = 2000) -> dict[str, list[BuildLog]]:
        """For each build id, up to `limit` lines with seq > its cursor (the event feed's tick)."""
        found: dict[str, list[BuildLog]] = {}
        async with self._read() as session:
            for build_id, after in cursors.items():
                query = (
                    select(BuildLog)
                    .where(BuildLog.build_id == build_id, BuildLog.seq > after)
                    .order_by(BuildLog.seq)
                    .limit(limit)
                )
                found[build_id] = list((await session.execute(query)).scalars())
        return found

    async def delete_logs_before(self, cutoff: datetime) -> int:
        """Delete the logs of builds created before `cutoff` (retention); returns the rows deleted."""
        async with self._write() as session:
            old = select(Job.id).where(Job.created_at < cutoff)
            result = await session.execute(delete(BuildLog).where(BuildLog.build_id.in_(old)))
            return result.rowcount or 0

    # --- blobs ----------------------------------------------------------------------------------

    async def put_blob(self, content: bytes) -> str:
        return (await self.put_blobs([content]))[0]

    async def put_blobs(self, contents: Sequence[bytes]) -> list[str]:
        """Store contents by sha256 in one transaction (idempotent); returns the digests in order."""
        digests = [hashlib.sha256(c).hexdigest() for c in contents]
        if digests:
            async with self._write() as session:
                await self._insert_blobs(session, dict(zip(digests, contents, strict=True)))
        return digests

    async def _insert_blobs(self, session: AsyncSession, rows: dict[str, bytes]) -> None:
        if rows:
            now = utcnow()
            await (await session.connection()).execute(
                self._insert_blob, [dict(digest=d, size=len(c), content=c, created_at=now) for d, c in rows.items()]
            )

    async def get_blob(self, digest: str) -> bytes:
        return (await self.get_blobs([digest]))[digest]

    async def get_blobs(self, digests: Iterable[str]) -> dict[str, bytes]:
        """All requested blobs by digest; NOT_FOUND names any that are missing."""
        wanted = list(dict.fromkeys(digests))
        found: dict[str, bytes] = {}
        async with self._read() as session:
            for start in range(0, len(wanted), _BLOB_BATCH):
                batch = wanted[start : start + _BLOB_BATCH]
                rows = await session.execute(select(Blob.digest, Blob.content).where(Blob.digest.in_(batch)))
                found.update((digest, bytes(content)) for digest, content in rows)
        missing = [d for d in wanted if d not in found]
        if missing:
            raise GenloopError(ErrorKind.NOT_FOUND, f"blobs not found: {', '.join(missing)}")
        return found

    # --- internals ------------------------------------------------------------------------------

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncSession]:
        with database_errors(self._where):
            async with self._sessions() as session, session.begin():
                # Procure the connection with the write marker before anything runs, so SQLite
                # starts this transaction with BEGIN IMMEDIATE.
                await session.connection(execution_options=WRITE_TRANSACTION)
                yield session

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncSession]:
        with database_errors(self._where):
            async with self._sessions() as session:
                yield session

    def _insert(self, model: type[Any]) -> Any:
        # Both dialects' INSERT support ON CONFLICT (SQLite >= 3.24) and RETURNING (>= 3.35).
        return (postgresql if self._dialect == "postgresql" else sqlite).insert(model)

    async def _locked_job(self, session: AsyncSession, build_id: str) -> Job:
        job = (await session.execute(select(Job).where(Job.id == build_id).with_for_update())).scalar_one_or_none()
        if job is None:
            raise GenloopError(ErrorKind.NOT_FOUND, f"build {build_id} not found")
        return job

    async def _ensure_build_version(self, session: AsyncSession, job: Job) -> str:
        if job.build_version is not None:
            return job.build_version
        # One atomic statement: the upsert's row lock serializes concurrent builds of a project, so
        # no two get the same N (unlike reading max() and writing max()+1).
        bumped = await session.execute(
            self._insert(BuildCounter)
            .values(project_id=job.project_id, last_n=1)
            .on_conflict_do_update(index_elements=["project_id"], set_={"last_n": BuildCounter.last_n + 1})
            .returning(BuildCounter.last_n)
        )
        job.version_number = bumped.scalar_one()
        job.build_version = f"build_v0_{job.version_number}"
        job.updated_at = utcnow()
        return job.build_version

    async def _record_transition(
        self, session: AsyncSession, job: Job, stage: Stage, message: str, at: datetime | None
    ) -> None:
        # Safe without a sequence: the caller holds the job row lock, and every transition of a
        # build goes through it. The (build_id, seq) unique constraint backs this up.
        text = message or stage.label
        job.status = stage.value
        job.status_message = text
        job.updated_at = utcnow()
        await (await session.connection()).execute(
            _INSERT_TRANSITION,
            {"b_id": job.id, "t_stage": stage.value, "t_message": text, "t_at": at or job.updated_at},
        )

    # --- API: health and the event feed --------------------------------------------------------

    # Two bound parameters per build: well under SQLite's and PostgreSQL's limits.
    _FEED_BATCH = 250

    async def ping(self) -> None:
        """A round trip to the database; DATABASE_UNAVAILABLE when it cannot be reached."""
        async with self._read() as session:
            await session.execute(select(1))

    async def transitions_after(self, cursors: dict[str, int]) -> dict[str, list[JobTransition]]:
        """For each build id, its transitions with seq > the cursor, in seq order (one query for
        all builds, so a poller serving many streams costs one round trip per tick)."""
        found: dict[str, list[JobTransition]] = {build_id: [] for build_id in cursors}
        items = list(cursors.items())
        async with self._read() as session:
            for start in range(0, len(items), self._FEED_BATCH):
                batch = items[start : start + self._FEED_BATCH]
                query = (
                    select(JobTransition)
                    .where(or_(*(and_(JobTransition.build_id == b, JobTransition.seq > c) for b, c in batch)))
                    .order_by(JobTransition.build_id, JobTransition.seq)
                )
                for row in (await session.execute(query)).scalars():
                    found[row.build_id].append(row)
        return found


def _check_transition(job: Job, target: Stage) -> None:
    if not is_allowed(job.stage, target):
        raise GenloopError(
            ErrorKind.ILLEGAL_TRANSITION, f"build {job.id}: {job.stage.value} -> {target.value} is not allowed"
        )
