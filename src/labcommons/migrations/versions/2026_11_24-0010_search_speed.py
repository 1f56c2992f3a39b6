"""search speed: an index on the instruments' slot grid for the earliest free slot

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-24 09:20:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The earliest-slot search asks each grid dividing the booking length for its lowest free ids: this index
    # answers an unused grid with one probe, lists the grids in use by a loose scan, and walks a grid in id
    # order so a LIMIT stops early.
    # A plain CREATE INDEX: a batch operation could rebuild the SQLite table and lose its full-text triggers.
    op.create_index("ix_instrument_slot_id", "instrument", ["slot_minutes", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_instrument_slot_id", table_name="instrument")
