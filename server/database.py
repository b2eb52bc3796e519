"""The database: one engine, read and write transactions, and schema migrations.

SQLite (the embedded default) and PostgreSQL behave alike here:

- a *write* transaction takes the database's write lock when it begins (SQLite
  ``BEGIN IMMEDIATE``), or serializes on row locks and advisory locks (PostgreSQL), so two
  server processes never interleave a read-modify-write such as appending to the audit chain;
- SQLite runs in WAL mode, so readers are never blocked by the one writer, and waits up to
  ``BUSY_TIMEOUT_S`` for the write lock instead of failing at once;
- the schema is brought to the newest Alembic revision at startup, under a lock, so several
  processes starting together migrate once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from server.errors import MigrationError, SettingsError

log = logging.getLogger("server")
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
BUSY_TIMEOUT_S = 30.0
# PostgreSQL advisory lock keys (any 64-bit numbers, fixed forever): one for migrations, one
# that serializes appends to the audit chain.
MIGRATION_LOCK = 0x6D66_0001
AUDIT_CHAIN_LOCK = 0x6D66_0002
_WRITE = "fleet_write"
# The database holds token hashes and the audit trail: for the server's user alone. SQLite gives
# its journal, WAL and shared-memory files the mode of the database file.
SQLITE_FILE_MODE = 0o600
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


T = TypeVar("T")


async def finish_in_thread(func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` in a worker thread, for a background task: cancelling the task (the
    server shutting down) waits for the call to end before the cancellation goes on, since a
    thread cannot be stopped midway; its transaction ends before the engine is disposed."""
    call = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):  # its failure is of no use to a shutdown
            await call
        raise


class Database:
    """The server's database at ``url``; :meth:`read` and :meth:`write` give sessions."""

    def __init__(self, url: str) -> None:
        """Create the engine (no connection is made yet).

        Raises:
            SettingsError: the URL cannot be parsed or its driver is not installed.
        """
        self.url = url
        try:
            if url.startswith("sqlite"):
                self.engine = _sqlite_engine(url)
                _secure_sqlite_files(self.engine.url.database)
            else:
                self.engine = create_engine(url, pool_pre_ping=True)
        except (SQLAlchemyError, ImportError, ValueError) as err:
            raise SettingsError(f"database: {err}") from err
        self._write_engine = self.engine.execution_options(**{_WRITE: True})

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reading; nothing it changes is committed."""
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A session whose changes are committed when the block ends without an exception.

        On SQLite the write lock is taken when the transaction begins, so the block sees the
        newest committed state and no other writer can interleave with it.
        """
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    def lock(self, session: Session, key: int) -> None:
        """Hold a transaction-scoped lock named ``key`` until ``session`` commits.

        PostgreSQL: an advisory lock. SQLite: nothing to do, a write transaction already
        excludes every other writer.
        """
        if self.dialect == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

    def ping(self) -> bool:
        """Whether the database answers a trivial query."""
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except SQLAlchemyError:
            return False
        return True

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` (the newest by default; an older one downgrades);
        safe to run from several processes at once.

        Raises:
            MigrationError: the database is unreachable or a migration failed.
        """
        try:
            if revision == "head" and self._at_head():
                return  # every start of the server and of a command: nothing to do, no lock
            with self.migration_connection() as connection:
                config = alembic_config()
                config.attributes["connection"] = connection
                if revision == "head":
                    command.upgrade(config, revision)
                else:
                    command.downgrade(config, revision)
        except SQLAlchemyError as err:
            raise MigrationError(f"database {self.safe_url}: cannot migrate: {err}") from err

    def _at_head(self) -> bool:
        """Whether the schema is at the newest revision already (read without any lock: a
        process that finds it behind migrates under the lock, where Alembic reads it again)."""
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        with self.engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision() == head

    @contextmanager
    def migration_connection(self) -> Iterator[Connection]:
        """A connection in a transaction fit for migrations, committed when the block ends.

        PostgreSQL: the migration lock is held. SQLite: foreign keys are off meanwhile, as
        SQLite's own procedure for changing a table says, because a batch migration rebuilds a
        table (copy, drop, rename) and dropping a table that others refer to ON DELETE CASCADE
        would empty them; the references are checked before the commit instead.

        Raises:
            MigrationError: a reference left dangling (SQLite).
        """
        with self._write_engine.connect() as connection:
            sqlite = self.dialect == "sqlite"
            if sqlite:  # outside any transaction: inside one, SQLite ignores this pragma
                _driver_pragma(connection, "foreign_keys=OFF")
            try:
                with connection.begin():
                    if self.dialect == "postgresql":
                        connection.execute(
                            text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
                        )
                    yield connection
                    if sqlite:
                        dangling = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                        if dangling:
                            raise MigrationError(
                                f"database {self.safe_url}: the migration leaves "
                                f"{len(dangling)} row(s) referring to nothing, first in table "
                                f"{dangling[0][0]}: rolled back"
                            )
            finally:
                if sqlite:
                    _driver_pragma(connection, "foreign_keys=ON")

    @property
    def safe_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()


def _driver_pragma(connection: Connection, pragma: str) -> None:
    """Run ``PRAGMA pragma`` on the sqlite3 connection itself: through SQLAlchemy, a statement
    would begin a transaction first."""
    driver = connection.connection.driver_connection
    if not isinstance(driver, sqlite3.Connection):
        raise TypeError("a SQLite pragma on a connection that is not SQLite's")
    driver.execute(f"PRAGMA {pragma}")


def alembic_config() -> Config:
    """The Alembic configuration of the server's migrations (no ini file needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _secure_sqlite_files(database: str | None) -> None:
    """Create the SQLite database file 0600 before SQLite does (it would follow the umask),
    and tighten the files of an existing one; nothing for an in-memory database. A file that
    cannot be created is left for SQLite to report when it connects; one whose mode cannot be
    changed (another user's) is logged."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    with contextlib.suppress(OSError):
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SQLITE_FILE_MODE))
    for suffix in SQLITE_SUFFIXES:
        path = Path(database + suffix)
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode != SQLITE_FILE_MODE:
                path.chmod(SQLITE_FILE_MODE)
                log.warning("database file %s had mode %04o; now 0600", path, mode)
        except FileNotFoundError:
            continue
        except OSError as err:
            log.warning("database file %s: cannot make it private: %s", path, err.strerror)


def _sqlite_engine(url: str) -> Engine:
    engine = create_engine(
        url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        # The sqlite3 module's own transaction handling starts transactions late and never
        # for SELECT; turn it off and issue BEGIN ourselves (in _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        # FULL: a committed transaction survives a power cut, not only a crash.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        immediate = connection.get_execution_options().get(_WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine
