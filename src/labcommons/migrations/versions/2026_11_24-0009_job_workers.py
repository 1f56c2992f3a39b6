"""job workers: registrations and heartbeats, so a dead worker's jobs are given back within seconds

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24 09:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import labcommons.db

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_worker",
        sa.Column("worker_id", sa.String(length=100), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", labcommons.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", labcommons.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", labcommons.db.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("worker_id", name=op.f("pk_job_worker")),
    )


def downgrade() -> None:
    op.drop_table("job_worker")
