"""Alembic environment: runs on a connection handed in by labcommons, or on sqlalchemy.url."""

from alembic import context
from sqlalchemy import create_engine

import labcommons.models  # noqa: F401  (fills the metadata)
from labcommons.config import get_settings
from labcommons.db import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = config.get_main_option("sqlalchemy.url") or get_settings().database_url
    engine = create_engine(url)
    with engine.connect() as conn:
        _run(conn)
        conn.commit()
