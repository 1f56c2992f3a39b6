"""service orders

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 16:20:50.194456
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import labcommons.db

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _service_columns() -> list[sa.Column[object]]:
    # Added in place (no table copy on SQLite), hence server defaults and no foreign keys.
    return [
        sa.Column("price_unit", sa.String(length=20), server_default="sample", nullable=False),
        sa.Column("sample_requirements_zh", sa.Text(), server_default="", nullable=False),
        sa.Column("sample_requirements_en", sa.Text(), server_default="", nullable=False),
        sa.Column("institution_id", sa.Integer(), nullable=True),
        sa.Column("region_code", sa.String(length=16), nullable=True),
        sa.Column("is_active", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.Column("search_name", sa.Text(), server_default="", nullable=False),
        sa.Column("search_body", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", labcommons.db.UTCDateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", labcommons.db.UTCDateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    ]


def _backfill_services() -> None:
    """Copy region and institution onto existing services and build their search text."""
    from labcommons.catalog.text import index_tokens

    bind = op.get_bind()
    rows = bind.execute(
        sa.text(
            "SELECT s.id, s.code, s.name_zh, s.name_en, s.description_zh, s.description_en, s.category_code, "
            "c.name_zh, c.name_en, f.name_zh, f.name_en, i.id, i.region_code, i.name_zh, i.name_en "
            "FROM service s JOIN facility f ON f.id = s.facility_id JOIN institution i ON i.id = f.institution_id "
            "JOIN category c ON c.code = s.category_code"
        )
    ).all()
    for r in rows:
        name = index_tokens(r[2], r[3], r[1])
        body = index_tokens(r[4], r[5], r[7], r[8], r[6].replace(".", " "), r[9], r[10], r[13], r[14])
        bind.execute(
            sa.text(
                "UPDATE service SET institution_id = :i, region_code = :r, search_name = :n, search_body = :b "
                "WHERE id = :id"
            ),
            {"i": r[11], "r": r[12], "n": name, "b": body, "id": r[0]},
        )


# An accepted quote is a contract: the database refuses to change it or its lines (a change is a new version).
# Offered quotes change only their status (accept, decline, supersede, withdraw); lines never change at all.
_QUOTE_FROZEN = "quote_frozen"


def _upgrade_postgresql() -> None:
    op.execute(
        "ALTER TABLE service ADD COLUMN search_vector tsvector GENERATED ALWAYS AS ("
        "setweight(to_tsvector('simple', search_name), 'A') || "
        "setweight(to_tsvector('simple', search_body), 'B')) STORED"
    )
    op.execute("CREATE INDEX ix_service_search_vector ON service USING gin (search_vector)")
    op.execute(
        "CREATE FUNCTION quote_frozen() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF TG_OP = 'DELETE' THEN "
        f"  IF OLD.status = 'accepted' THEN RAISE EXCEPTION '{_QUOTE_FROZEN}'; END IF; RETURN OLD; END IF; "
        f"IF OLD.status = 'accepted' THEN RAISE EXCEPTION '{_QUOTE_FROZEN}'; END IF; "
        "IF NEW.total_fen <> OLD.total_fen OR NEW.valid_until <> OLD.valid_until OR NEW.version <> OLD.version "
        f"OR NEW.order_id <> OLD.order_id OR NEW.note <> OLD.note THEN RAISE EXCEPTION '{_QUOTE_FROZEN}'; END IF; "
        "RETURN NEW; END $$"
    )
    op.execute(
        "CREATE TRIGGER tr_quote_frozen BEFORE UPDATE OR DELETE ON quote FOR EACH ROW EXECUTE FUNCTION quote_frozen()"
    )
    op.execute(
        "CREATE FUNCTION quote_line_frozen() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF TG_OP = 'INSERT' THEN "
        "  IF EXISTS (SELECT 1 FROM quote q WHERE q.id = NEW.quote_id AND q.status <> 'offered') THEN "
        f"    RAISE EXCEPTION '{_QUOTE_FROZEN}'; END IF; RETURN NEW; END IF; "
        "IF TG_OP = 'DELETE' AND NOT EXISTS (SELECT 1 FROM quote q WHERE q.id = OLD.quote_id) THEN RETURN OLD; "
        f"END IF; RAISE EXCEPTION '{_QUOTE_FROZEN}'; END $$"
    )
    op.execute(
        "CREATE TRIGGER tr_quote_line_frozen BEFORE INSERT OR UPDATE OR DELETE ON quote_line "
        "FOR EACH ROW EXECUTE FUNCTION quote_line_frozen()"
    )


def _upgrade_sqlite() -> None:
    op.execute(
        "CREATE VIRTUAL TABLE service_fts USING fts5(search_name, search_body, "
        "content='service', content_rowid='id', tokenize='unicode61 remove_diacritics 2')"
    )
    op.execute("INSERT INTO service_fts(service_fts) VALUES ('rebuild')")
    op.execute(
        "CREATE TRIGGER tr_service_fts_insert AFTER INSERT ON service BEGIN "
        "INSERT INTO service_fts(rowid, search_name, search_body) "
        "VALUES (new.id, new.search_name, new.search_body); END"
    )
    op.execute(
        "CREATE TRIGGER tr_service_fts_delete AFTER DELETE ON service BEGIN "
        "INSERT INTO service_fts(service_fts, rowid, search_name, search_body) "
        "VALUES ('delete', old.id, old.search_name, old.search_body); END"
    )
    op.execute(
        "CREATE TRIGGER tr_service_fts_update AFTER UPDATE OF search_name, search_body ON service BEGIN "
        "INSERT INTO service_fts(service_fts, rowid, search_name, search_body) "
        "VALUES ('delete', old.id, old.search_name, old.search_body); "
        "INSERT INTO service_fts(rowid, search_name, search_body) "
        "VALUES (new.id, new.search_name, new.search_body); END"
    )
    op.execute(
        "CREATE TRIGGER tr_quote_frozen BEFORE UPDATE ON quote "
        "WHEN OLD.status = 'accepted' OR NEW.total_fen IS NOT OLD.total_fen OR NEW.valid_until IS NOT OLD.valid_until "
        "OR NEW.version IS NOT OLD.version OR NEW.order_id IS NOT OLD.order_id OR NEW.note IS NOT OLD.note "
        f"BEGIN SELECT RAISE(ABORT, '{_QUOTE_FROZEN}'); END"
    )
    op.execute(
        "CREATE TRIGGER tr_quote_line_frozen_insert BEFORE INSERT ON quote_line "
        "WHEN EXISTS (SELECT 1 FROM quote q WHERE q.id = NEW.quote_id AND q.status <> 'offered') "
        f"BEGIN SELECT RAISE(ABORT, '{_QUOTE_FROZEN}'); END"
    )
    op.execute(
        f"CREATE TRIGGER tr_quote_line_frozen_update BEFORE UPDATE ON quote_line "
        f"BEGIN SELECT RAISE(ABORT, '{_QUOTE_FROZEN}'); END"
    )
    op.execute(
        "CREATE TRIGGER tr_quote_line_frozen_delete BEFORE DELETE ON quote_line "
        "WHEN EXISTS (SELECT 1 FROM quote q WHERE q.id = OLD.quote_id) "
        f"BEGIN SELECT RAISE(ABORT, '{_QUOTE_FROZEN}'); END"
    )


def upgrade() -> None:
    # ### commands auto generated by Alembic - please adjust! ###
    op.create_table(
        "service_accreditation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("service_id", sa.Integer(), nullable=False),
        sa.Column("scheme", sa.String(length=20), nullable=False),
        sa.Column("certificate_no", sa.String(length=80), nullable=False),
        sa.Column("valid_until", sa.Date(), nullable=True),
        sa.ForeignKeyConstraint(
            ["service_id"], ["service.id"], name=op.f("fk_service_accreditation_service_id_service"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_accreditation")),
        sa.UniqueConstraint("service_id", "scheme", name="uq_service_accreditation_scheme"),
    )
    with op.batch_alter_table("service_accreditation", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_service_accreditation_service_id"), ["service_id"], unique=False)

    op.create_table(
        "service_instrument",
        sa.Column("service_id", sa.Integer(), nullable=False),
        sa.Column("instrument_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["instrument_id"],
            ["instrument.id"],
            name=op.f("fk_service_instrument_instrument_id_instrument"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["service_id"], ["service.id"], name=op.f("fk_service_instrument_service_id_service"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("service_id", "instrument_id", name=op.f("pk_service_instrument")),
    )
    op.create_table(
        "service_order",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("number", sa.String(length=32), nullable=True),
        sa.Column("service_id", sa.Integer(), nullable=False),
        sa.Column("facility_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "draft",
                "submitted",
                "quoted",
                "accepted",
                "samples_received",
                "in_progress",
                "results_delivered",
                "closed",
                "rejected",
                "cancelled",
                "on_hold",
                name="order_status",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column(
            "held_from",
            sa.Enum(
                "draft",
                "submitted",
                "quoted",
                "accepted",
                "samples_received",
                "in_progress",
                "results_delivered",
                "closed",
                "rejected",
                "cancelled",
                "on_hold",
                name="order_held_from",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=True,
        ),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("title", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("sample_count", sa.Integer(), nullable=False),
        sa.Column("sample_description", sa.Text(), nullable=False),
        sa.Column("wanted_by", sa.Date(), nullable=True),
        sa.Column("contact_phone", sa.String(length=40), nullable=False),
        sa.Column("created_at", labcommons.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", labcommons.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("submitted_at", labcommons.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("closed_at", labcommons.db.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint("sample_count >= 0", name=op.f("ck_service_order_sample_count")),
        sa.CheckConstraint("version >= 1", name=op.f("ck_service_order_version")),
        sa.ForeignKeyConstraint(["facility_id"], ["facility.id"], name=op.f("fk_service_order_facility_id_facility")),
        sa.ForeignKeyConstraint(["service_id"], ["service.id"], name=op.f("fk_service_order_service_id_service")),
        sa.ForeignKeyConstraint(["user_id"], ["user_account.id"], name=op.f("fk_service_order_user_id_user_account")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_order")),
        sa.UniqueConstraint("number", name=op.f("uq_service_order_number")),
    )
    with op.batch_alter_table("service_order", schema=None) as batch_op:
        batch_op.create_index("ix_service_order_facility_status", ["facility_id", "status"], unique=False)
        batch_op.create_index(batch_op.f("ix_service_order_service_id"), ["service_id"], unique=False)
        batch_op.create_index("ix_service_order_user_created", ["user_id", "created_at"], unique=False)

    op.create_table(
        "order_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "from_status",
            sa.Enum(
                "draft",
                "submitted",
                "quoted",
                "accepted",
                "samples_received",
                "in_progress",
                "results_delivered",
                "closed",
                "rejected",
                "cancelled",
                "on_hold",
                name="order_event_from",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=True,
        ),
        sa.Column(
            "to_status",
            sa.Enum(
                "draft",
                "submitted",
                "quoted",
                "accepted",
                "samples_received",
                "in_progress",
                "results_delivered",
                "closed",
                "rejected",
                "cancelled",
                "on_hold",
                name="order_event_to",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("actor_id", sa.Integer(), nullable=True),
        sa.Column("at", labcommons.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["actor_id"], ["user_account.id"], name=op.f("fk_order_event_actor_id_user_account")),
        sa.ForeignKeyConstraint(
            ["order_id"], ["service_order.id"], name=op.f("fk_order_event_order_id_service_order"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_order_event")),
        sa.UniqueConstraint("order_id", "version", name="uq_order_event_order_version"),
    )
    with op.batch_alter_table("order_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_order_event_order_id"), ["order_id"], unique=False)

    op.create_table(
        "order_message",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=False),
        sa.Column("author_id", sa.Integer(), nullable=False),
        sa.Column("from_staff", sa.Boolean(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", labcommons.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["author_id"], ["user_account.id"], name=op.f("fk_order_message_author_id_user_account")
        ),
        sa.ForeignKeyConstraint(
            ["order_id"], ["service_order.id"], name=op.f("fk_order_message_order_id_service_order"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_order_message")),
    )
    with op.batch_alter_table("order_message", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_order_message_order_id"), ["order_id"], unique=False)

    op.create_table(
        "order_rating",
        sa.Column("order_id", sa.Integer(), nullable=False),
        sa.Column("service_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("score", sa.Integer(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("created_at", labcommons.db.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("score BETWEEN 1 AND 5", name=op.f("ck_order_rating_score")),
        sa.ForeignKeyConstraint(
            ["order_id"], ["service_order.id"], name=op.f("fk_order_rating_order_id_service_order"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["service_id"], ["service.id"], name=op.f("fk_order_rating_service_id_service")),
        sa.ForeignKeyConstraint(["user_id"], ["user_account.id"], name=op.f("fk_order_rating_user_id_user_account")),
        sa.PrimaryKeyConstraint("order_id", name=op.f("pk_order_rating")),
    )
    with op.batch_alter_table("order_rating", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_order_rating_service_id"), ["service_id"], unique=False)

    op.create_table(
        "quote",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "offered",
                "accepted",
                "declined",
                "superseded",
                "withdrawn",
                name="quote_status",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("total_fen", sa.BigInteger(), nullable=False),
        sa.Column("valid_until", sa.Date(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_by_id", sa.Integer(), nullable=True),
        sa.Column("created_at", labcommons.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("decided_by_id", sa.Integer(), nullable=True),
        sa.Column("decided_at", labcommons.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column("decision_note", sa.Text(), nullable=False),
        sa.CheckConstraint("total_fen >= 0", name=op.f("ck_quote_total")),
        sa.ForeignKeyConstraint(
            ["created_by_id"], ["user_account.id"], name=op.f("fk_quote_created_by_id_user_account")
        ),
        sa.ForeignKeyConstraint(
            ["decided_by_id"], ["user_account.id"], name=op.f("fk_quote_decided_by_id_user_account")
        ),
        sa.ForeignKeyConstraint(
            ["order_id"], ["service_order.id"], name=op.f("fk_quote_order_id_service_order"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quote")),
        sa.UniqueConstraint("order_id", "version", name="uq_quote_order_version"),
    )
    with op.batch_alter_table("quote", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_quote_order_id"), ["order_id"], unique=False)

    op.create_table(
        "result_file",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=False),
        sa.Column(
            "kind",
            sa.Enum("report", "data", name="result_kind", native_enum=False, create_constraint=True, length=20),
            nullable=False,
        ),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("content_type", sa.String(length=120), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("storage_key", sa.String(length=300), nullable=False),
        sa.Column("uploaded_by_id", sa.Integer(), nullable=True),
        sa.Column("uploaded_at", labcommons.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("withdrawn_at", labcommons.db.UTCDateTime(timezone=True), nullable=True),
        sa.CheckConstraint("size_bytes >= 0", name=op.f("ck_result_file_size")),
        sa.ForeignKeyConstraint(
            ["order_id"], ["service_order.id"], name=op.f("fk_result_file_order_id_service_order"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["uploaded_by_id"], ["user_account.id"], name=op.f("fk_result_file_uploaded_by_id_user_account")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_result_file")),
        sa.UniqueConstraint("storage_key", name=op.f("uq_result_file_storage_key")),
    )
    with op.batch_alter_table("result_file", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_result_file_order_id"), ["order_id"], unique=False)

    op.create_table(
        "sample",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("order_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(length=48), nullable=False),
        sa.Column("description", sa.String(length=300), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "expected",
                "received",
                "stored",
                "consumed",
                "returned",
                "disposed",
                name="sample_status",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("location", sa.String(length=200), nullable=False),
        sa.Column("created_at", labcommons.db.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["order_id"], ["service_order.id"], name=op.f("fk_sample_order_id_service_order"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sample")),
        sa.UniqueConstraint("code", name=op.f("uq_sample_code")),
        sa.UniqueConstraint("order_id", "position", name="uq_sample_order_position"),
    )
    with op.batch_alter_table("sample", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sample_order_id"), ["order_id"], unique=False)

    op.create_table(
        "quote_line",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("quote_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("description", sa.String(length=300), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("unit_price_fen", sa.BigInteger(), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount_fen = quantity * unit_price_fen", name=op.f("ck_quote_line_amount")),
        sa.CheckConstraint("quantity > 0", name=op.f("ck_quote_line_quantity")),
        sa.CheckConstraint("unit_price_fen >= 0", name=op.f("ck_quote_line_unit_price")),
        sa.ForeignKeyConstraint(
            ["quote_id"], ["quote.id"], name=op.f("fk_quote_line_quote_id_quote"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_quote_line")),
        sa.UniqueConstraint("quote_id", "position", name="uq_quote_line_position"),
    )
    with op.batch_alter_table("quote_line", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_quote_line_quote_id"), ["quote_id"], unique=False)

    op.create_table(
        "sample_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column(
            "event",
            sa.Enum(
                "received",
                "stored",
                "consumed",
                "returned",
                "disposed",
                name="custody_event",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("actor_id", sa.Integer(), nullable=True),
        sa.Column("at", labcommons.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("location", sa.String(length=200), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["actor_id"], ["user_account.id"], name=op.f("fk_sample_event_actor_id_user_account")),
        sa.ForeignKeyConstraint(
            ["sample_id"], ["sample.id"], name=op.f("fk_sample_event_sample_id_sample"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sample_event")),
    )
    with op.batch_alter_table("sample_event", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sample_event_sample_id"), ["sample_id"], unique=False)

    for column in _service_columns():
        op.add_column("service", column)
    op.create_index("ix_service_institution_id", "service", ["institution_id"])
    op.create_index("ix_service_region_code", "service", ["region_code"])
    _backfill_services()
    if op.get_bind().dialect.name == "postgresql":
        _upgrade_postgresql()
    else:
        _upgrade_sqlite()
    # ### end Alembic commands ###


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS tr_quote_frozen ON quote")
        op.execute("DROP TRIGGER IF EXISTS tr_quote_line_frozen ON quote_line")
        op.execute("DROP FUNCTION IF EXISTS quote_frozen()")
        op.execute("DROP FUNCTION IF EXISTS quote_line_frozen()")
        op.execute("DROP INDEX IF EXISTS ix_service_search_vector")
        op.execute("ALTER TABLE service DROP COLUMN IF EXISTS search_vector")
    else:
        op.execute("DROP TABLE IF EXISTS service_fts")
        for name in (
            "tr_service_fts_insert",
            "tr_service_fts_delete",
            "tr_service_fts_update",
            "tr_quote_frozen",
            "tr_quote_line_frozen_update",
            "tr_quote_line_frozen_delete",
            "tr_quote_line_frozen_insert",
        ):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_index("ix_service_region_code", "service")
    op.drop_index("ix_service_institution_id", "service")
    with op.batch_alter_table("service", schema=None) as batch_op:
        for column in reversed(_service_columns()):
            batch_op.drop_column(column.name)

    with op.batch_alter_table("sample_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sample_event_sample_id"))

    op.drop_table("sample_event")
    with op.batch_alter_table("quote_line", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_quote_line_quote_id"))

    op.drop_table("quote_line")
    with op.batch_alter_table("sample", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sample_order_id"))

    op.drop_table("sample")
    with op.batch_alter_table("result_file", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_result_file_order_id"))

    op.drop_table("result_file")
    with op.batch_alter_table("quote", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_quote_order_id"))

    op.drop_table("quote")
    with op.batch_alter_table("order_rating", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_order_rating_service_id"))

    op.drop_table("order_rating")
    with op.batch_alter_table("order_message", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_order_message_order_id"))

    op.drop_table("order_message")
    with op.batch_alter_table("order_event", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_order_event_order_id"))

    op.drop_table("order_event")
    with op.batch_alter_table("service_order", schema=None) as batch_op:
        batch_op.drop_index("ix_service_order_user_created")
        batch_op.drop_index(batch_op.f("ix_service_order_service_id"))
        batch_op.drop_index("ix_service_order_facility_status")

    op.drop_table("service_order")
    op.drop_table("service_instrument")
    with op.batch_alter_table("service_accreditation", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_service_accreditation_service_id"))

    op.drop_table("service_accreditation")
    # ### end Alembic commands ###
