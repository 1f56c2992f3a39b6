"""catalogue and booking core

Revision ID: 0001
Revises:
Create Date: 2026-11-23 08:20:42.789938

Also creates what the ORM cannot express portably: the no-overlap guarantee for bookings (a PostgreSQL
exclusion constraint; SQLite triggers inside serialised write transactions), the full-text indexes, and
the taxonomy reference data.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from labcommons.catalog.reference import taxonomy_rows
from labcommons.db import UTCDateTime

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "category",
        sa.Column("code", sa.String(length=32), nullable=False),
        sa.Column("parent_code", sa.String(length=32), nullable=True),
        sa.Column("name_zh", sa.String(length=100), nullable=False),
        sa.Column("name_en", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(["parent_code"], ["category.code"], name=op.f("fk_category_parent_code_category")),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_category")),
    )
    op.create_table(
        "region",
        sa.Column("code", sa.String(length=16), nullable=False),
        sa.Column("name_zh", sa.String(length=100), nullable=False),
        sa.Column("name_en", sa.String(length=100), nullable=False),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_region")),
    )
    op.create_table(
        "institution",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=40), nullable=False),
        sa.Column("region_code", sa.String(length=16), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "university",
                "laboratory",
                "hospital",
                "company",
                "government",
                name="institution_kind",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("name_zh", sa.String(length=200), nullable=False),
        sa.Column("name_en", sa.String(length=200), nullable=False),
        sa.ForeignKeyConstraint(["region_code"], ["region.code"], name=op.f("fk_institution_region_code_region")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_institution")),
        sa.UniqueConstraint("code", name=op.f("uq_institution_code")),
    )
    with op.batch_alter_table("institution", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_institution_region_code"), ["region_code"], unique=False)

    op.create_table(
        "facility",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=40), nullable=False),
        sa.Column("institution_id", sa.Integer(), nullable=False),
        sa.Column("name_zh", sa.String(length=200), nullable=False),
        sa.Column("name_en", sa.String(length=200), nullable=False),
        sa.Column("description_zh", sa.Text(), nullable=False),
        sa.Column("description_en", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["institution_id"], ["institution.id"], name=op.f("fk_facility_institution_id_institution")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_facility")),
        sa.UniqueConstraint("code", name=op.f("uq_facility_code")),
    )
    with op.batch_alter_table("facility", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_facility_institution_id"), ["institution_id"], unique=False)

    op.create_table(
        "user_account",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("email", sa.String(length=254), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("institution_id", sa.Integer(), nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=True),
        sa.Column("locale", sa.String(length=10), nullable=True),
        sa.Column("timezone", sa.String(length=64), nullable=True),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["institution_id"], ["institution.id"], name=op.f("fk_user_account_institution_id_institution")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user_account")),
        sa.UniqueConstraint("email", name=op.f("uq_user_account_email")),
    )
    with op.batch_alter_table("user_account", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_user_account_institution_id"), ["institution_id"], unique=False)

    op.create_table(
        "api_token",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=True),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["user_account.id"], name=op.f("fk_api_token_user_id_user_account"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_token")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_token_token_hash")),
    )
    with op.batch_alter_table("api_token", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_token_user_id"), ["user_id"], unique=False)

    op.create_table(
        "idempotency_record",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("response_body", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["user_account.id"],
            name=op.f("fk_idempotency_record_user_id_user_account"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_record")),
        sa.UniqueConstraint("user_id", "key", name="uq_idempotency_record_user_key"),
    )
    op.create_table(
        "instrument",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=40), nullable=False),
        sa.Column("facility_id", sa.Integer(), nullable=False),
        sa.Column("institution_id", sa.Integer(), nullable=False),
        sa.Column("region_code", sa.String(length=16), nullable=False),
        sa.Column("name_zh", sa.String(length=200), nullable=False),
        sa.Column("name_en", sa.String(length=200), nullable=False),
        sa.Column("description_zh", sa.Text(), nullable=False),
        sa.Column("description_en", sa.Text(), nullable=False),
        sa.Column("manufacturer", sa.String(length=120), nullable=False),
        sa.Column("model", sa.String(length=120), nullable=False),
        sa.Column("category_code", sa.String(length=32), nullable=False),
        sa.Column("location_zh", sa.String(length=200), nullable=False),
        sa.Column("location_en", sa.String(length=200), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "active",
                "maintenance",
                "retired",
                name="instrument_status",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("slot_minutes", sa.Integer(), nullable=False),
        sa.Column("min_booking_minutes", sa.Integer(), nullable=False),
        sa.Column("max_booking_minutes", sa.Integer(), nullable=False),
        sa.Column(
            "open_to",
            sa.Enum(
                "institution",
                "region",
                "everyone",
                name="open_to",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("search_name", sa.Text(), nullable=False),
        sa.Column("search_body", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(
            "min_booking_minutes > 0 AND min_booking_minutes <= max_booking_minutes",
            name=op.f("ck_instrument_booking_bounds"),
        ),
        sa.CheckConstraint("slot_minutes > 0", name=op.f("ck_instrument_slot_positive")),
        sa.ForeignKeyConstraint(
            ["category_code"], ["category.code"], name=op.f("fk_instrument_category_code_category")
        ),
        sa.ForeignKeyConstraint(["facility_id"], ["facility.id"], name=op.f("fk_instrument_facility_id_facility")),
        sa.ForeignKeyConstraint(
            ["institution_id"], ["institution.id"], name=op.f("fk_instrument_institution_id_institution")
        ),
        sa.ForeignKeyConstraint(["region_code"], ["region.code"], name=op.f("fk_instrument_region_code_region")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instrument")),
        sa.UniqueConstraint("code", name=op.f("uq_instrument_code")),
    )
    with op.batch_alter_table("instrument", schema=None) as batch_op:
        batch_op.create_index("ix_instrument_category_status", ["category_code", "status"], unique=False)
        batch_op.create_index(batch_op.f("ix_instrument_facility_id"), ["facility_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_instrument_institution_id"), ["institution_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_instrument_region_code"), ["region_code"], unique=False)

    op.create_table(
        "service",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=40), nullable=False),
        sa.Column("facility_id", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum(
                "testing",
                "rnd",
                "consultation",
                name="service_kind",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("name_zh", sa.String(length=200), nullable=False),
        sa.Column("name_en", sa.String(length=200), nullable=False),
        sa.Column("description_zh", sa.Text(), nullable=False),
        sa.Column("description_en", sa.Text(), nullable=False),
        sa.Column("category_code", sa.String(length=32), nullable=False),
        sa.Column("turnaround_days", sa.Integer(), nullable=True),
        sa.Column("list_price_fen", sa.Integer(), nullable=True),
        sa.CheckConstraint("list_price_fen IS NULL OR list_price_fen >= 0", name=op.f("ck_service_price")),
        sa.ForeignKeyConstraint(["category_code"], ["category.code"], name=op.f("fk_service_category_code_category")),
        sa.ForeignKeyConstraint(["facility_id"], ["facility.id"], name=op.f("fk_service_facility_id_facility")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service")),
        sa.UniqueConstraint("code", name=op.f("uq_service_code")),
    )
    with op.batch_alter_table("service", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_service_facility_id"), ["facility_id"], unique=False)

    op.create_table(
        "web_session",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["user_account.id"], name=op.f("fk_web_session_user_id_user_account"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_session")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_web_session_token_hash")),
    )
    with op.batch_alter_table("web_session", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_web_session_user_id"), ["user_id"], unique=False)

    op.create_table(
        "booking",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instrument_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("starts_at", UTCDateTime(), nullable=False),
        sa.Column("ends_at", UTCDateTime(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "confirmed",
                "cancelled",
                "completed",
                name="booking_status",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("purpose", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("cancelled_at", UTCDateTime(), nullable=True),
        sa.CheckConstraint("ends_at > starts_at", name=op.f("ck_booking_ends_after_start")),
        sa.ForeignKeyConstraint(["instrument_id"], ["instrument.id"], name=op.f("fk_booking_instrument_id_instrument")),
        sa.ForeignKeyConstraint(["user_id"], ["user_account.id"], name=op.f("fk_booking_user_id_user_account")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_booking")),
    )
    with op.batch_alter_table("booking", schema=None) as batch_op:
        batch_op.create_index("ix_booking_ends_at", ["ends_at"], unique=False)
        batch_op.create_index("ix_booking_instrument_starts", ["instrument_id", "starts_at"], unique=False)
        batch_op.create_index("ix_booking_user_starts", ["user_id", "starts_at"], unique=False)

    category = sa.table(
        "category",
        sa.column("code", sa.String),
        sa.column("parent_code", sa.String),
        sa.column("name_zh", sa.String),
        sa.column("name_en", sa.String),
    )
    op.bulk_insert(category, taxonomy_rows())

    if op.get_bind().dialect.name == "postgresql":
        _upgrade_postgresql()
    else:
        _upgrade_sqlite()


ACTIVE = "('pending', 'confirmed')"


def _upgrade_postgresql() -> None:
    op.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")
    # The invariant itself: two active bookings of one instrument never share an instant. Half-open ranges
    # let one booking end exactly when the next starts.
    op.execute(
        "ALTER TABLE booking ADD CONSTRAINT ex_booking_no_overlap EXCLUDE USING gist "
        "(instrument_id WITH =, tstzrange(starts_at, ends_at, '[)') WITH &&) "
        f"WHERE (status IN {ACTIVE})"
    )
    op.execute(
        "ALTER TABLE instrument ADD COLUMN search_vector tsvector GENERATED ALWAYS AS ("
        "setweight(to_tsvector('simple', search_name), 'A') || "
        "setweight(to_tsvector('simple', search_body), 'B')) STORED"
    )
    op.execute("CREATE INDEX ix_instrument_search_vector ON instrument USING gin (search_vector)")
    op.execute(f"CREATE INDEX ix_booking_active_ends ON booking (ends_at) WHERE status IN {ACTIVE}")


def _upgrade_sqlite() -> None:
    # SQLite serialises writers, so a trigger that looks for an overlapping active booking before every
    # insert or update is race-free: the check and the write happen under the same database lock.
    for event, when in (("INSERT", ""), ("UPDATE", "OF instrument_id, starts_at, ends_at, status ")):
        op.execute(
            f"CREATE TRIGGER tr_booking_no_overlap_{event.lower()} BEFORE {event} {when}ON booking "
            f"WHEN NEW.status IN {ACTIVE} BEGIN "
            "SELECT RAISE(ABORT, 'overlapping_booking') FROM booking b "
            "WHERE b.instrument_id = NEW.instrument_id AND b.id IS NOT NEW.id "
            f"AND b.status IN {ACTIVE} AND b.starts_at < NEW.ends_at AND NEW.starts_at < b.ends_at; END"
        )
    op.execute(
        "CREATE VIRTUAL TABLE instrument_fts USING fts5(search_name, search_body, "
        "content='instrument', content_rowid='id', tokenize='unicode61 remove_diacritics 2')"
    )
    op.execute(
        "CREATE TRIGGER tr_instrument_fts_insert AFTER INSERT ON instrument BEGIN "
        "INSERT INTO instrument_fts(rowid, search_name, search_body) "
        "VALUES (new.id, new.search_name, new.search_body); END"
    )
    op.execute(
        "CREATE TRIGGER tr_instrument_fts_delete AFTER DELETE ON instrument BEGIN "
        "INSERT INTO instrument_fts(instrument_fts, rowid, search_name, search_body) "
        "VALUES ('delete', old.id, old.search_name, old.search_body); END"
    )
    op.execute(
        "CREATE TRIGGER tr_instrument_fts_update AFTER UPDATE OF search_name, search_body ON instrument BEGIN "
        "INSERT INTO instrument_fts(instrument_fts, rowid, search_name, search_body) "
        "VALUES ('delete', old.id, old.search_name, old.search_body); "
        "INSERT INTO instrument_fts(rowid, search_name, search_body) "
        "VALUES (new.id, new.search_name, new.search_body); END"
    )
    op.execute(f"CREATE INDEX ix_booking_active_ends ON booking (ends_at) WHERE status IN {ACTIVE}")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TABLE IF EXISTS instrument_fts")
        for name in ("tr_booking_no_overlap_insert", "tr_booking_no_overlap_update"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.execute("DROP INDEX IF EXISTS ix_booking_active_ends")
    with op.batch_alter_table("booking", schema=None) as batch_op:
        batch_op.drop_index("ix_booking_user_starts")
        batch_op.drop_index("ix_booking_instrument_starts")
        batch_op.drop_index("ix_booking_ends_at")

    op.drop_table("booking")
    with op.batch_alter_table("web_session", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_web_session_user_id"))

    op.drop_table("web_session")
    with op.batch_alter_table("service", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_service_facility_id"))

    op.drop_table("service")
    with op.batch_alter_table("instrument", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instrument_region_code"))
        batch_op.drop_index(batch_op.f("ix_instrument_institution_id"))
        batch_op.drop_index(batch_op.f("ix_instrument_facility_id"))
        batch_op.drop_index("ix_instrument_category_status")

    op.drop_table("instrument")
    op.drop_table("idempotency_record")
    with op.batch_alter_table("api_token", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_token_user_id"))

    op.drop_table("api_token")
    with op.batch_alter_table("user_account", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_user_account_institution_id"))

    op.drop_table("user_account")
    with op.batch_alter_table("facility", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_facility_institution_id"))

    op.drop_table("facility")
    with op.batch_alter_table("institution", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_institution_region_code"))

    op.drop_table("institution")
    op.drop_table("region")
    op.drop_table("category")
