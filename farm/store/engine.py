"""Engines and schema upgrades for the job store (SQLite embedded, PostgreSQL in production)."""

from __future__ import annotations

import fcntl
import sqlite3
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from farm.errors import ConfigError, DatabaseUnavailable
from farm.secrets import redact, scrub, secrets_in, secrets_of
from farm.store.revisions import head_revision as head_revision
from farm.store.revisions import known_revisions as known_revisions


def normalize_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL, whatever spelling the user gave."""
    for prefix in ("postgresql://", "postgres://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine tuned for the farm's access pattern: many short guarded UPDATEs from several processes."""
    url = normalize_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # pre_ping: a worker survives a database restart by reconnecting instead of failing its next job.
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # busy_timeout first: writers wait for each other instead of failing.
    cursor.execute("PRAGMA busy_timeout=30000")
    # WAL lets `farm status` read while a worker writes. The mode is stored in the file, so only the first
    # connection to a new database switches it; that switch takes an exclusive lock and does not wait on the
    # busy timeout, so processes starting together on a fresh FARM_HOME retry it.
    if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        for attempt in range(100):
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.02 * (1 + attempt % 10))
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["engine"] = engine
    return config


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None for an empty database): alembic's version table, read without
    importing alembic (half of a short command's start-up), since every command checks it."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(rows) > 1:  # several heads: alembic says what is wrong
        from alembic.runtime.migration import MigrationContext

        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    return str(rows[0]) if rows else None


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to `revision` (`farm db upgrade`)."""
    from alembic import command

    try:
        command.upgrade(_alembic_config(engine), revision)
    except OperationalError as exc:  # the database is away (or refused us), not a wrong migration
        raise DatabaseUnavailable(
            _scrubbed(engine, f"cannot reach the job database {_where(engine)}: {_first_line(exc)}")
        ) from exc
    except SQLAlchemyError as exc:
        raise ConfigError(_scrubbed(engine, f"cannot upgrade {_where(engine)}: {exc.__class__.__name__}")) from exc


def ensure_schema(engine: Engine, *, auto_upgrade: bool) -> None:
    """Make sure the schema is current: the embedded default upgrades itself, production says what to run."""
    try:
        current = current_revision(engine)
    except SQLAlchemyError as exc:
        message = f"cannot reach the job database {_where(engine)}: {_first_line(exc)}"
        raise DatabaseUnavailable(_scrubbed(engine, message)) from exc
    if current == head_revision():
        return
    if current is not None and current not in known_revisions():
        # A newer farm upgraded the store: this code would write without the newer rules (fencing, …).
        raise ConfigError(
            f"the job database is at revision {current}, newer than this farm knows (it ships up to "
            f"{head_revision()}): upgrade the farm on this machine before running it against that database"
        )
    if auto_upgrade:
        with _upgrade_lock(engine):
            # Another process (a worker and a `farm status` starting together) may have upgraded meanwhile.
            if current_revision(engine) != head_revision():
                upgrade(engine)
        return
    raise ConfigError(
        f"the job database is at revision {current or 'none'}, this farm needs {head_revision()}: run `farm db upgrade`"
    )


def _upgrade_lock(engine: Engine) -> AbstractContextManager[None]:
    """An exclusive file lock beside a SQLite database, so two processes never migrate it at once."""
    return sqlite_file_lock(engine.url.database if engine.dialect.name == "sqlite" else None)


@contextmanager
def sqlite_file_lock(database: str | None) -> Iterator[None]:
    """An exclusive lock on a file beside a SQLite database file (none for another or an in-memory database):
    what the job store's and the embedded broker's first users take to create their tables one at a time."""
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.upgrade-lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _where(engine: Engine) -> str:
    """The engine's URL for messages. SQLAlchemy's hide_password masks the userinfo only; redact also masks
    `?password=` (which libpq accepts) and the other secret query parameters."""
    return redact(engine.url.render_as_string(hide_password=True))


def _scrubbed(engine: Engine, text: str) -> str:
    """``text`` without the engine URL's secrets (a driver message may quote them) or the secret variables."""
    url = engine.url.render_as_string(hide_password=False)
    return scrub(text, hidden=secrets_in(url) | set(secrets_of()))


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc)
    return redact(text.strip().splitlines()[0] if text.strip() else exc.__class__.__name__)


def open_store(settings: Any) -> Engine:
    """The job database for these settings, schema checked (and created, for the embedded default)."""
    engine = make_engine(settings.database_url)
    ensure_schema(engine, auto_upgrade=settings.embedded)
    return engine
