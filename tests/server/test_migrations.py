"""The Alembic migrations build exactly the models' schema, idempotently, from several processes."""

from __future__ import annotations

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Integer, MetaData, Table, inspect

from server.database import Database, alembic_config
from server.models import Base
from tests.server.conftest import Harness


def schema_differences(db: Database, metadata: MetaData) -> list[object]:
    with db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))


def test_migrated_schema_equals_the_models(harness: Harness) -> None:
    assert schema_differences(harness.db, Base.metadata) == []
    # the comparison has teeth: a column the migrations do not create is found
    changed = MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    Table("devices", changed, Column("extra", Integer), extend_existing=True)
    assert schema_differences(harness.db, changed) != []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_runs_in_wal_mode(harness: Harness) -> None:
    assert harness.db.dialect == "sqlite"
    with harness.db.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    assert (harness.settings.data_dir / "data.db").exists()


def test_migration_is_at_head_and_idempotent(harness: Harness) -> None:
    harness.db.migrate()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with harness.db.engine.connect() as connection:
        assert MigrationContext.configure(connection).get_current_revision() == head
    tables = set(inspect(harness.db.engine).get_table_names())
    assert set(Base.metadata.tables) <= tables


def test_concurrent_first_starts_migrate_once(harness: Harness) -> None:
    # a fresh database, migrated by several "processes" at the same moment
    with harness.db.engine.begin() as connection:
        Base.metadata.drop_all(connection)
        connection.exec_driver_sql("DROP TABLE alembic_version")
    errors: list[BaseException] = []
    databases = [Database(harness.settings.database_url) for _ in range(3)]

    def migrate(db: Database) -> None:
        try:
            db.migrate()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=migrate, args=(db,)) for db in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for db in databases:
        db.dispose()
    assert errors == []
    assert schema_differences(harness.db, Base.metadata) == []
