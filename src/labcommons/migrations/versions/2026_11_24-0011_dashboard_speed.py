"""dashboard speed: `stat_region_day` (the facility-day statistics summed per region, filled from them here) and an
index on the instrument's id, status and placement, so the platform's and the regions' dashboards read a few hundred
rows for their charts and rank, count and list instruments from a narrow index instead of the wide instrument rows

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-24 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY = ("region_code", "day", "user_region_code", "internal")
MEASURES = ("bookings", "booked_min", "effective_min", "maintenance_min", "no_shows",
            *(f"h{i}" for i in range(24)), *(f"lead{i}" for i in range(8)))


def upgrade() -> None:
    op.create_table(
        "stat_region_day",
        sa.Column("region_code", sa.String(length=16), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("user_region_code", sa.String(length=16), nullable=False),
        sa.Column("internal", sa.Integer(), nullable=False),
        sa.Column("weekday", sa.Integer(), nullable=False),
        *(sa.Column(name, sa.Integer(), nullable=False) for name in MEASURES),
        sa.PrimaryKeyConstraint(*KEY, name=op.f("pk_stat_region_day")),
    )
    # Derived data: fill it from the facility-days at once, so no rebuild is needed after upgrading.
    columns = ", ".join((*KEY, "weekday", *MEASURES))
    sums = ", ".join(f"SUM({name})" for name in MEASURES)
    op.execute(f"INSERT INTO stat_region_day ({columns}) SELECT {', '.join(KEY)}, MIN(weekday), {sums} "
               f"FROM stat_facility_day GROUP BY {', '.join(KEY)}")
    op.create_index("ix_instrument_placement", "instrument",
                    ["id", "status", "region_code", "institution_id", "facility_id"])


def downgrade() -> None:
    op.drop_index("ix_instrument_placement", table_name="instrument")
    op.drop_table("stat_region_day")
