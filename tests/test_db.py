"""Job store: migrations match the models, the embedded default upgrades itself, production is told."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from farm.errors import ConfigError
from farm.store.engine import current_revision, ensure_schema, head_revision, make_engine, normalize_url
from farm.store.schema import Base
from tests.support.processes import farm_env, run_farm
from tests.support.s3 import free_port


def test_the_migration_creates_exactly_the_models_schema_on_sqlite(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    ensure_schema(engine, auto_upgrade=True)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert current_revision(engine) == head_revision()


@pytest.mark.integration
def test_the_migration_creates_exactly_the_models_schema_on_postgresql(pg_url: str) -> None:
    engine = make_engine(pg_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    indexes = {ix["name"] for ix in inspect(engine).get_indexes("jobs")}
    assert {"ix_jobs_dataset_status", "ix_jobs_dataset_finished", "ix_jobs_status_created"} <= indexes


def test_production_database_behind_is_refused_with_the_command_to_run(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'prod.db'}")
    with pytest.raises(ConfigError, match="run `farm db upgrade`"):
        ensure_schema(engine, auto_upgrade=False)


def test_postgres_spellings_use_psycopg3() -> None:
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:///x.db") == "sqlite:///x.db"


def test_unreachable_database_is_a_plain_error_without_the_password(tmp_path: Path) -> None:
    url = f"postgresql+psycopg://farm:sup3r-secret@127.0.0.1:{free_port()}/farm"
    result = run_farm(["status"], farm_env(FARM_HOME=str(tmp_path), FARM_DATABASE_URL=url))
    assert result.returncode == 3  # a service that cannot be reached
    assert "cannot reach the job database" in result.stderr
    assert "Traceback" not in result.stderr
    assert "sup3r-secret" not in result.stdout + result.stderr


def test_upgrading_a_0001_store_keeps_its_jobs_as_plain_jobs(tmp_path: Path) -> None:
    from sqlalchemy import text

    from farm.store.engine import upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(engine, "0001")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO datasets (id, name, created_at) VALUES (1, 'd', '2026-01-01 00:00:00')"))
        conn.execute(
            text(
                "INSERT INTO jobs (id, dataset_id, prompt, seed, width, height, num_inference_steps, guidance_scale,"
                " model, status, attempts, created_at) VALUES ('j1', 1, 'p', 1, 128, 128, 4, 0.0, 'tiny', 'pending',"
                " 0, '2026-01-01 00:00:00')"
            )
        )
    upgrade(engine)
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT id, controlnet, conditioning_scale, control_sha256, control_uri, quantize FROM jobs")
        ).one()
    assert tuple(row) == ("j1", None, None, None, None, None)
    assert current_revision(engine) == head_revision() == "0011"
    with engine.connect() as conn:  # and the dataset survived the later migrations, unpaused
        assert tuple(conn.execute(text("SELECT name, paused FROM datasets")).one()) == ("d", 0)
        assert tuple(conn.execute(text("SELECT claim_seq, queue, queued_at, source_file FROM jobs")).one()) == (
            0,
            None,
            None,
            None,
        )


def test_a_store_newer_than_this_code_is_refused_not_written(tmp_path: Path) -> None:
    # An old worker must not write unfenced during a rolling upgrade: it refuses a store it does not know.
    from sqlalchemy import text

    from farm.errors import ConfigError

    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    ensure_schema(engine, auto_upgrade=True)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    for auto_upgrade in (True, False):
        with pytest.raises(ConfigError, match="revision 0099, newer than this farm knows"):
            ensure_schema(engine, auto_upgrade=auto_upgrade)
    assert current_revision(engine) == "0099"


def _open_at_once(url: str, barrier: Any) -> None:
    engine = make_engine(url)
    barrier.wait()  # every process reaches the empty database at the same moment
    ensure_schema(engine, auto_upgrade=True)


def test_processes_starting_together_on_a_fresh_home_upgrade_it_once(tmp_path: Path) -> None:
    """A worker and `farm status` started at the same moment must not both try to create the tables."""
    import multiprocessing

    url = f"sqlite:///{tmp_path / 'farm.db'}"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(6)
    procs = [context.Process(target=_open_at_once, args=(url, barrier)) for _ in range(6)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0] * 6
    assert current_revision(make_engine(url)) == head_revision()


def test_the_revisions_read_without_alembic_are_alembic_s() -> None:
    """Every command checks the schema revision; engine.py reads the scripts' text instead of importing alembic."""
    from alembic.script import ScriptDirectory

    import migrations
    from farm.store.engine import known_revisions

    script = ScriptDirectory(str(Path(migrations.__file__).parent))
    assert head_revision() == script.get_current_head()
    assert known_revisions() == {rev.revision for rev in script.walk_revisions()}
