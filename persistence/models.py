"""SQLModel tables. The schema is owned by Alembic (`migrations/`); a test asserts no drift."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import DateTime, ForeignKeyConstraint, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

from workflows.stages import Stage


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend. SQLite has no time zones: values are stored as UTC and
    read back naive, so the UTC tzinfo is re-attached here."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware value")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Job(SQLModel, table=True):
    __tablename__: ClassVar[str] = "jobs"
    __table_args__: ClassVar[tuple[Any, ...]] = (
        # NULL build_versions (builds not yet ready) never collide with each other.
        UniqueConstraint("project_id", "build_version", name="uq_jobs_project_id_build_version"),
        # Serves newest-first listing per project (scanned backwards).
        Index("ix_jobs_project_id_created_at", "project_id", "created_at"),
    )

    id: str = Field(sa_type=String(255), primary_key=True)  # the build id (= workflow id)
    # Indexed by ix_jobs_project_id_created_at (leading column); a separate index would be redundant.
    project_id: str = Field(sa_type=String(255))
    goal: str = Field(sa_type=Text)
    status: str = Field(default=Stage.QUEUED.value, sa_type=String(20))
    status_message: str = Field(default="", sa_type=Text)
    error_message: str | None = Field(default=None, sa_type=Text)  # friendly, shown to users
    error_detail: str | None = Field(default=None, sa_type=Text)  # internal, never shown to users
    debug_id: str | None = Field(default=None, sa_type=String(64), index=True)
    sandbox_id: str | None = Field(default=None, sa_type=String(255))
    preview_url: str | None = Field(default=None, sa_type=Text)
    build_version: str | None = Field(default=None, sa_type=String(50))
    workspace_path: str | None = Field(default=None, sa_type=String(500))
    workflow_id: str | None = Field(default=None, sa_type=String(255))
    run_id: str | None = Field(default=None, sa_type=String(255))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    # --- lineage: a project is a line of versions (0004) ---
    kind: str = Field(default="new", sa_type=String(20), sa_column_kwargs={"server_default": "new"})  # new | change
    version_number: int | None = Field(default=None, sa_type=Integer)  # N of build_v0_N: orders versions
    runner: str | None = Field(default=None, sa_type=String(50))
    stack: str = Field(default="python", sa_type=String(20), sa_column_kwargs={"server_default": "python"})
    base_build_id: str | None = Field(default=None, sa_type=String(255))  # the build this one started from
    base_version: str | None = Field(default=None, sa_type=String(50))
    change_request: str | None = Field(default=None, sa_type=Text)  # the user's change text, capped
    edited_paths: str | None = Field(default=None, sa_type=Text)  # JSON: [{"path", "op": "write"|"delete"}]
    lineage_note: str | None = Field(default=None, sa_type=Text)  # why this base (e.g. the previous change failed)
    request_digest: str | None = Field(default=None, sa_type=String(64))  # Idempotency-Key reuse check
    # --- fix attempts and model usage (0004) ---
    attempt: int = Field(default=0, sa_type=Integer, sa_column_kwargs={"server_default": "0"})
    max_attempts: int = Field(default=0, sa_type=Integer, sa_column_kwargs={"server_default": "0"})
    tokens_in: int = Field(default=0, sa_type=Integer, sa_column_kwargs={"server_default": "0"})
    tokens_out: int = Field(default=0, sa_type=Integer, sa_column_kwargs={"server_default": "0"})
    llm_calls: int = Field(default=0, sa_type=Integer, sa_column_kwargs={"server_default": "0"})
    llm_model: str | None = Field(default=None, sa_type=String(100))
    # --- previews that never die (0005) ---
    # The sandbox's own URL (preview_url is the version's stable one).
    sandbox_preview_url: str | None = Field(default=None, sa_type=Text)
    preview_label: str | None = Field(
        default=None, sa_type=String(63), unique=True, index=True
    )  # host label of preview_url
    preview_state: str | None = Field(default=None, sa_type=String(20))  # live | paused | waking | removed | failed
    preview_woken_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    sandbox_host: str | None = Field(default=None, sa_type=String(255))  # which sandbox host has the sandbox
    # --- build logs (0006): the last seq handed out and the bytes stored, bumped under the row lock ---
    log_seq: int = Field(default=0, sa_type=Integer, sa_column_kwargs={"server_default": "0"})
    log_bytes: int = Field(default=0, sa_type=Integer, sa_column_kwargs={"server_default": "0"})

    @property
    def stage(self) -> Stage:
        return Stage(self.status)


class JobTransition(SQLModel, table=True):
    """One row per persisted stage change, numbered per build by `seq` (1 = queued)."""

    __tablename__: ClassVar[str] = "job_transitions"
    __table_args__: ClassVar[tuple[Any, ...]] = (
        ForeignKeyConstraint(["build_id"], ["jobs.id"], name="fk_job_transitions_build_id_jobs", ondelete="CASCADE"),
        # Also the index for lookups by build_id (its leading column).
        UniqueConstraint("build_id", "seq", name="uq_job_transitions_build_id_seq"),
    )

    id: int | None = Field(default=None, primary_key=True)
    build_id: str = Field(sa_type=String(255))
    seq: int
    stage: str = Field(sa_type=String(20))
    message: str = Field(default="", sa_type=Text)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class BuildCounter(SQLModel, table=True):
    """The last build_v0_N handed out per project: bumped by an atomic upsert, never max()+1."""

    __tablename__: ClassVar[str] = "build_counters"

    project_id: str = Field(sa_type=String(255), primary_key=True)
    last_n: int


class Blob(SQLModel, table=True):
    """Claim-check store for generated files: content-addressed by sha256, so puts are idempotent."""

    __tablename__: ClassVar[str] = "blobs"

    digest: str = Field(sa_type=String(64), primary_key=True)
    size: int
    content: bytes = Field(sa_type=LargeBinary)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class BuildFile(SQLModel, table=True):
    """One file of a build (its manifest): content in `blobs` by digest. Written when the build's
    files are decided (after CODE, and again after each fix attempt)."""

    __tablename__: ClassVar[str] = "build_files"
    __table_args__: ClassVar[tuple[Any, ...]] = (
        ForeignKeyConstraint(["build_id"], ["jobs.id"], name="fk_build_files_build_id_jobs", ondelete="CASCADE"),
    )

    build_id: str = Field(sa_type=String(255), primary_key=True)
    path: str = Field(sa_type=String(255), primary_key=True)
    digest: str = Field(sa_type=String(64))
    size: int


class BuildAttempt(SQLModel, table=True):
    """Why one attempt of a build failed, as the fix loop saw it (the tail, bounded and redacted)."""

    __tablename__: ClassVar[str] = "build_attempts"
    __table_args__: ClassVar[tuple[Any, ...]] = (
        ForeignKeyConstraint(["build_id"], ["jobs.id"], name="fk_build_attempts_build_id_jobs", ondelete="CASCADE"),
        UniqueConstraint("build_id", "attempt", name="uq_build_attempts_build_id_attempt"),
    )

    id: int | None = Field(default=None, primary_key=True)
    build_id: str = Field(sa_type=String(255))
    attempt: int
    stage: str = Field(sa_type=String(20))
    command: str = Field(sa_type=Text)
    exit_code: int | None = None
    output: str = Field(sa_type=Text)
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class BuildLog(SQLModel, table=True):
    """One line of a build's output, numbered per build by `seq` (the API's cursor). `source` names
    the command that wrote it in one stage attempt ("deps/0/install/stdout") and `line_no` its line
    there: a retried activity that replays the same output finds its lines stored and skips them."""

    __tablename__: ClassVar[str] = "build_logs"
    __table_args__: ClassVar[tuple[Any, ...]] = (
        ForeignKeyConstraint(["build_id"], ["jobs.id"], name="fk_build_logs_build_id_jobs", ondelete="CASCADE"),
        UniqueConstraint("build_id", "source", "line_no", name="uq_build_logs_build_id_source_line_no"),
    )

    build_id: str = Field(sa_type=String(255), primary_key=True)
    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    stage: str = Field(sa_type=String(20))
    attempt: int = Field(default=0)  # the build's fix attempt (0: the first try)
    stream: str = Field(sa_type=String(10))  # stdout | stderr | system
    source: str = Field(sa_type=String(100))
    line_no: int
    text: str = Field(sa_type=Text)
