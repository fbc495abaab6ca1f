"""build logs: one row per output line, and the per-build counters that number and cap them

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JOB_COLUMNS = [
    sa.Column("log_seq", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("log_bytes", sa.Integer(), nullable=False, server_default="0"),
]


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in _JOB_COLUMNS:
            batch.add_column(column._copy())
    op.create_table(
        "build_logs",
        sa.Column("build_id", sa.String(255), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stage", sa.String(20), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("stream", sa.String(10), nullable=False),
        sa.Column("source", sa.String(100), nullable=False),
        sa.Column("line_no", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["build_id"], ["jobs.id"], name="fk_build_logs_build_id_jobs", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("build_id", "seq"),
        sa.UniqueConstraint("build_id", "source", "line_no", name="uq_build_logs_build_id_source_line_no"),
    )


def downgrade() -> None:
    op.drop_table("build_logs")
    with op.batch_alter_table("jobs") as batch:
        for column in reversed(_JOB_COLUMNS):
            batch.drop_column(column.name)
