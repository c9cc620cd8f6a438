"""`farm doctor`: passes where the farm can run, names a stopped service with a hint, and never prints a secret."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from farm.cli.doctor import Level, check_database, check_models
from farm.secrets import scrub, secrets_of
from farm.settings import load_settings
from tests.support.processes import farm_env, run_farm
from tests.support.s3 import S3Server, free_port

CHECKS = ("database", "broker", "storage", "models", "cuda")


def _lines(output: str) -> dict[str, str]:
    """check name → its line, from doctor's output."""
    found = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in {level.value for level in Level}:
            found[words[1]] = line
    return found


def _home_with_tiny(tmp_path: Path, tiny_model: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(tiny_model, home / "models" / "tiny")
    return home


def test_doctor_passes_on_the_embedded_default(tmp_path: Path, tiny_model: Path) -> None:
    home = _home_with_tiny(tmp_path, tiny_model)
    result = run_farm(["doctor"], farm_env(FARM_HOME=str(home)))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = _lines(result.stdout)
    assert set(lines) == set(CHECKS), result.stdout
    for name in ("database", "broker", "storage"):
        assert lines[name].startswith("OK"), lines[name]
    # The default model is the release, whose weights this machine does not have: a warning with the download's
    # size (workers fetch it on first use), not a failure.
    assert lines["models"].startswith("WARN"), lines["models"]
    assert "needs a download of PixArt-alpha/PixArt-LCM-XL-2-1024-MS (≈ 21.8 GB)" in lines["models"]
    assert "tiny local" in lines["models"]
    assert lines["cuda"].startswith(("OK", "WARN")), lines["cuda"]  # no GPU here is a warning, not a failure
    assert "wrote, read back and deleted" in lines["storage"]
    assert not list((home / "images").rglob("probe-*")), "the probe object was left behind"
    assert "the farm can run here" in result.stdout


def test_doctor_reports_stopped_services_and_prints_no_secret(
    tmp_path: Path, tiny_model: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    home = _home_with_tiny(tmp_path, tiny_model)
    redis_port, pg_port = free_port(), free_port()
    secrets = ("broker-Secret-pw1", "db-Secret-pw2", "farm-test-secret")  # the last is s3_bucket's AWS secret
    env = farm_env(
        FARM_HOME=str(home),
        FARM_BROKER_URL=f"redis://:{secrets[0]}@127.0.0.1:{redis_port}/0",
        FARM_DATABASE_URL=f"postgresql+psycopg://farm:{secrets[1]}@127.0.0.1:{pg_port}/farm",
        FARM_STORAGE_URL="s3://no-such-bucket-here/renders",
        FARM_S3_ENDPOINT_URL=s3_server.endpoint_url,
    )
    result = run_farm(["doctor"], env, timeout_s=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    lines = _lines(result.stdout)
    assert lines["database"].startswith("FAIL") and f"PostgreSQL running at 127.0.0.1:{pg_port}" in lines["database"]
    assert "Connection refused" in lines["database"] or "connection" in lines["database"].lower()
    assert lines["broker"].startswith("FAIL") and f"Redis running at 127.0.0.1:{redis_port}" in lines["broker"]
    assert lines["storage"].startswith("FAIL") and "bucket" in lines["storage"]
    assert lines["models"].startswith("WARN")  # the release default is not on this machine: a download, not a fault
    assert "3 of 5 checks failed: database, broker, storage" in result.stdout
    assert "redis://:***@127.0.0.1" in lines["broker"]
    for secret in secrets:
        assert secret not in output


def test_doctor_passes_against_postgres_redis_and_s3(
    tmp_path: Path, tiny_model: Path, pg_url: str, redis_url: str, s3_server: S3Server, s3_bucket: str
) -> None:
    home = _home_with_tiny(tmp_path, tiny_model)
    env = farm_env(
        FARM_HOME=str(home),
        FARM_DATABASE_URL=pg_url,
        FARM_BROKER_URL=redis_url,
        FARM_STORAGE_URL=f"s3://{s3_bucket}/renders",
        FARM_S3_ENDPOINT_URL=s3_server.endpoint_url,
    )
    result = run_farm(["doctor"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = _lines(result.stdout)
    assert lines["database"].startswith("OK") and "(current)" in lines["database"]
    assert lines["broker"].startswith("OK") and lines["storage"].startswith("OK")
    assert f"S3 bucket '{s3_bucket}'" in lines["storage"]
    listed = s3_server.client().list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    assert listed == [], "the probe object was left behind"


def test_production_database_behind_the_code_says_to_upgrade(tmp_path: Path, pg_url: str) -> None:
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    name = f"farm_doctor_{uuid.uuid4().hex[:8]}"
    conninfo = f"host={url.host} port={url.port or 5432} user={url.username} dbname={url.database}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        settings = load_settings(
            {}, home=str(tmp_path), database_url=url.set(database=name).render_as_string(hide_password=False)
        )
        check = check_database(settings)
        assert check.level is Level.FAIL and "farm db upgrade" in check.hint, check
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_missing_tiny_model_fails_with_the_command_that_makes_it(tmp_path: Path) -> None:
    check = check_models(load_settings({}, home=str(tmp_path), default_model="tiny"))
    assert check.level is Level.FAIL and check.hint == "run `farm models make-tiny`"
    hub = check_models(load_settings({}, home=str(tmp_path), default_model="pixart-lcm-1024"))
    assert hub.level in (Level.OK, Level.WARN)  # a hub model is usable, with a download when not cached


@pytest.mark.parametrize("password", ["p%40ss:word", "plain-pass"])
def test_scrub_masks_url_passwords_raw_and_decoded(tmp_path: Path, password: str) -> None:
    settings = load_settings(
        {}, home=str(tmp_path), broker_url=f"redis://:{password}@h:6379/0", database_url="sqlite:///x.db"
    )
    hidden = secrets_of(settings, {"AWS_SECRET_ACCESS_KEY": "aws-key-value"})
    text = f"failed: {password} / p@ss:word / aws-key-value"
    cleaned = scrub(text, hidden=hidden)
    assert "aws-key-value" not in cleaned and password not in cleaned
    if "%40" in password:
        assert "p@ss:word" not in cleaned
