"""The Alembic migrations build exactly the models' schema, idempotently, from several processes."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Integer, MetaData, Table, func, inspect, select
from sqlalchemy import table as table_named

from server.database import Database, alembic_config
from server.models import Base
from tests.server.conftest import FakeDevice, Harness


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


def test_every_downgrade_keeps_the_rows_of_the_tables_it_keeps(
    harness: Harness, enrolled: Callable[..., FakeDevice], make_bundle: Callable[..., Path]
) -> None:
    """Step by step from the head down to the first revision and back up: no table loses a row
    it keeps (on SQLite, a batch operation that copies a table drops the old one, and with
    foreign keys on, its ON DELETE CASCADE empties every table that refers to it)."""
    assert harness.upload(make_bundle(version="2.0.0")).status_code == 201
    for n in range(3):
        device = enrolled(hostname=f"cam-{n}")
        assert device.events(("install.started", 1)).status_code == 204
    started = harness.client.post(
        "/api/v1/rollouts", json={"version": "2.0.0", "stages": [100]}, headers=harness.operator
    )
    assert started.status_code == 201, started.text

    def counts() -> dict[str, int]:
        with harness.db.engine.connect() as connection:
            names = set(inspect(connection).get_table_names()) - {"alembic_version"}
            return {
                name: connection.execute(
                    select(func.count()).select_from(table_named(name))
                ).scalar_one()
                for name in names
            }

    before = counts()
    assert all(before[name] > 0 for name in ("devices", "device_sessions", "rollout_devices"))
    script = ScriptDirectory.from_config(alembic_config())
    revisions = [r.revision for r in script.walk_revisions()]  # head first
    for target in revisions[1:]:
        harness.db.migrate(target)
        now = counts()
        kept = {name: now[name] for name in now if name in before}
        assert kept == {name: before[name] for name in kept}, f"down to {target}"
    lowest = counts()  # what the first revision has: kept all the way down and back up
    harness.db.migrate()
    again = counts()
    assert {name: again[name] for name in lowest} == {name: before[name] for name in lowest}
    assert set(again) == set(before)
    if harness.db.dialect == "sqlite":  # the pooled connection has its foreign keys back
        with harness.db.write() as session:
            assert session.connection().exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_a_schema_at_its_head_is_not_locked_or_checked_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every start of the server and of a --data-dir command migrates: at the head, that is a
    read (no write lock, no foreign-key scan of every table)."""

    def no_migration() -> None:
        raise AssertionError("a schema at its head was migrated")

    monkeypatch.setattr(harness.db, "migration_connection", no_migration)
    harness.db.migrate()
