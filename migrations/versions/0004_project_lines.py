"""projects as lines of versions: lineage, request digest, fix attempts, token usage, each build's files

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JOB_COLUMNS = [
    sa.Column("kind", sa.String(20), nullable=False, server_default="new"),
    sa.Column("version_number", sa.Integer(), nullable=True),
    sa.Column("runner", sa.String(50), nullable=True),
    sa.Column("stack", sa.String(20), nullable=False, server_default="python"),
    sa.Column("base_build_id", sa.String(255), nullable=True),
    sa.Column("base_version", sa.String(50), nullable=True),
    sa.Column("change_request", sa.Text(), nullable=True),
    sa.Column("edited_paths", sa.Text(), nullable=True),
    sa.Column("lineage_note", sa.Text(), nullable=True),
    sa.Column("request_digest", sa.String(64), nullable=True),
    sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("tokens_in", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("tokens_out", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("llm_calls", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("llm_model", sa.String(100), nullable=True),
]


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in _JOB_COLUMNS:
            batch.add_column(column._copy())
    op.create_table(
        "build_files",
        sa.Column("build_id", sa.String(255), nullable=False),
        sa.Column("path", sa.String(255), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("build_id", "path"),
        sa.ForeignKeyConstraint(["build_id"], ["jobs.id"], name="fk_build_files_build_id_jobs", ondelete="CASCADE"),
    )
    op.create_table(
        "build_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("build_id", sa.String(255), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(20), nullable=False),
        sa.Column("command", sa.Text(), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("output", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["build_id"], ["jobs.id"], name="fk_build_attempts_build_id_jobs", ondelete="CASCADE"),
        sa.UniqueConstraint("build_id", "attempt", name="uq_build_attempts_build_id_attempt"),
    )


def downgrade() -> None:
    op.drop_table("build_attempts")
    op.drop_table("build_files")
    with op.batch_alter_table("jobs") as batch:
        for column in reversed(_JOB_COLUMNS):
            batch.drop_column(column.name)
