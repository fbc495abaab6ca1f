"""versions that never die: the stable URL's label, the raw sandbox URL, the preview's state; the sandbox's host

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JOB_COLUMNS = [
    sa.Column("sandbox_preview_url", sa.Text(), nullable=True),
    sa.Column("preview_label", sa.String(63), nullable=True),
    sa.Column("preview_state", sa.String(20), nullable=True),
    sa.Column("preview_woken_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("sandbox_host", sa.String(255), nullable=True),
]


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        for column in _JOB_COLUMNS:
            batch.add_column(column._copy())
        batch.create_index("ix_jobs_preview_label", ["preview_label"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_preview_label")
        for column in reversed(_JOB_COLUMNS):
            batch.drop_column(column.name)
