"""Alembic environment: runs the migrations on the connection the server hands over.

``Database.migrate`` passes its connection (inside a transaction that holds the migration lock)
as ``config.attributes["connection"]``. For writing a new revision by hand, run Alembic with
``-c server/alembic.ini -x url=<database URL>``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from server.models import Base


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        compare_type=True,
        # SQLite cannot ALTER most things: later revisions rebuild tables in batch mode.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("give the database with: alembic -x url=<database URL> ...")
    engine = create_engine(url)
    with engine.connect() as own_connection:
        run(own_connection)
        own_connection.commit()


main()
