"""add sandbox columns to jobs

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode: SQLite cannot add a constraint in place, so the table is rebuilt there.
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.add_column(sa.Column("sandbox_id", sa.String(255), nullable=True))
        batch_op.add_column(sa.Column("preview_url", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("build_version", sa.String(50), nullable=True))
        batch_op.add_column(sa.Column("workspace_path", sa.String(500), nullable=True))
        # Backstop for the atomic counter (0003): a version is never shared within a project.
        batch_op.create_unique_constraint("uq_jobs_project_id_build_version", ["project_id", "build_version"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_constraint("uq_jobs_project_id_build_version", type_="unique")
        batch_op.drop_column("workspace_path")
        batch_op.drop_column("build_version")
        batch_op.drop_column("preview_url")
        batch_op.drop_column("sandbox_id")
