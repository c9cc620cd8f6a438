"""farm.settings: defaults, precedence (overrides > FARM_* > farm.toml > defaults), validation and redaction."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from farm.errors import ConfigError
from farm.secrets import redact
from farm.settings import Settings, load_settings, with_overrides


@pytest.fixture(autouse=True)
def _no_local_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # load_settings picks up ./farm.toml; run every test where there is none.
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "farm.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_live_under_farm_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    s = load_settings({"FARM_HOME": str(home)})
    assert s.home == home
    assert s.database_url == f"sqlite:///{home / 'farm.db'}"
    assert s.broker_url == f"sqla+sqlite:///{home / 'broker.db'}"
    assert s.storage_url == (home / "images").as_uri()
    assert s.storage_url.startswith("file://")
    assert s.embedded
    assert s.models_dir == home / "models"
    assert s.default_model == "pixart-lcm-1024"  # the release; the demo and the tests name tiny
    assert (s.max_attempts, s.lease_s, s.batch_size) == (3, 600, 8)


def test_default_home_is_dot_farm_in_the_working_directory() -> None:
    s = load_settings({})
    assert s.home == Path.cwd() / ".farm"
    assert s.database_url.endswith("/.farm/farm.db")


def test_env_overrides_toml_which_overrides_defaults(tmp_path: Path) -> None:
    config = _toml(
        tmp_path,
        'lease_s = 120\nbatch_size = 6\nqueue = "from-toml"\ndefault_model = "pixart-lcm-1024"\n',
    )
    env = {"FARM_HOME": str(tmp_path / "h"), "FARM_LEASE_S": "90", "FARM_QUEUE": "from-env"}
    s = load_settings(env, config_file=config)
    assert s.lease_s == 90  # env beats toml
    assert s.queue == "from-env"
    assert s.batch_size == 6  # toml beats default (8)
    assert s.default_model == "pixart-lcm-1024"
    assert s.max_attempts == 3  # default untouched


def test_explicit_overrides_beat_env(tmp_path: Path) -> None:
    env = {"FARM_HOME": str(tmp_path / "env-home"), "FARM_BATCH_SIZE": "2"}
    s = load_settings(env, home=str(tmp_path / "cli-home"), batch_size=16)
    assert s.home == tmp_path / "cli-home"
    assert s.batch_size == 16


def test_empty_env_value_is_ignored(tmp_path: Path) -> None:
    s = load_settings({"FARM_HOME": str(tmp_path), "FARM_LEASE_S": ""})
    assert s.lease_s == 600


def test_farm_table_in_toml_is_accepted(tmp_path: Path) -> None:
    config = _toml(tmp_path, "[farm]\nmax_attempts = 7\n")
    assert load_settings({"FARM_HOME": str(tmp_path)}, config_file=config).max_attempts == 7


def test_farm_config_env_points_at_the_file(tmp_path: Path) -> None:
    config = _toml(tmp_path, "retry_backoff_s = 9\n")
    s = load_settings({"FARM_HOME": str(tmp_path), "FARM_CONFIG": str(config)})
    assert s.retry_backoff_s == 9


def test_farm_config_pointing_nowhere_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FARM_CONFIG"):
        load_settings({"FARM_CONFIG": str(tmp_path / "missing.toml")})


def test_unknown_toml_key_is_an_error(tmp_path: Path) -> None:
    config = _toml(tmp_path, "lease_s = 60\nbatchsize = 8\n")
    with pytest.raises(ConfigError, match="batchsize"):
        load_settings({"FARM_HOME": str(tmp_path)}, config_file=config)


def test_malformed_toml_is_an_error(tmp_path: Path) -> None:
    config = _toml(tmp_path, "lease_s = = 3\n")
    with pytest.raises(ConfigError, match="cannot read settings"):
        load_settings({}, config_file=config)


def test_bad_integer_names_field_and_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"FARM_HOME": str(tmp_path), "FARM_LEASE_S": "ten"})
    assert "lease_s" in str(info.value)
    assert "'ten'" in str(info.value)


def test_bad_integer_in_toml_names_field_and_value(tmp_path: Path) -> None:
    config = _toml(tmp_path, 'batch_size = "many"\n')
    with pytest.raises(ConfigError, match=r"batch_size must be an integer, got 'many'"):
        load_settings({"FARM_HOME": str(tmp_path)}, config_file=config)


def test_integer_below_minimum_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_attempts must be at least 1, got 0"):
        load_settings({"FARM_HOME": str(tmp_path), "FARM_MAX_ATTEMPTS": "0"})


@pytest.mark.parametrize("url", ["mysql://u:pw@h/db", "http://h/db", "farm.db"])
def test_bad_database_scheme_is_an_error(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match="database_url"):
        load_settings({"FARM_HOME": str(tmp_path), "FARM_DATABASE_URL": url})


def test_bad_database_scheme_error_does_not_leak_password(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"FARM_HOME": str(tmp_path), "FARM_DATABASE_URL": "mysql://u:hunter2@h/db"})
    assert "hunter2" not in str(info.value)
    assert "mysql://u:***@h/db" in str(info.value)


def test_bad_broker_and_storage_schemes_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="broker_url"):
        load_settings({"FARM_HOME": str(tmp_path), "FARM_BROKER_URL": "kafka://h"})
    with pytest.raises(ConfigError, match="storage_url"):
        load_settings({"FARM_HOME": str(tmp_path), "FARM_STORAGE_URL": "gs://bucket"})


def test_production_urls_are_accepted(tmp_path: Path) -> None:
    s = load_settings(
        {
            "FARM_HOME": str(tmp_path),
            "FARM_DATABASE_URL": "postgresql+psycopg://farm:pw@db/farm",
            "FARM_BROKER_URL": "redis://:pw@redis:6379/0",
            "FARM_STORAGE_URL": "s3://bucket/prefix",
        }
    )
    assert not s.embedded
    assert s.storage_url == "s3://bucket/prefix"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:pw@h", "redis://:***@h"),
        ("redis://:s3cret@redis.example:6380/0", "redis://:***@redis.example:6380/0"),
        ("postgresql+psycopg://u:pw@h/db", "postgresql+psycopg://u:***@h/db"),
        ("amqp://guest:guest@rabbit:5672//", "amqp://guest:***@rabbit:5672//"),
    ],
)
def test_redact_masks_passwords(url: str, expected: str) -> None:
    assert redact(url) == expected


@pytest.mark.parametrize(
    "text",
    [
        "redis://h:6379/0",
        "postgresql+psycopg://u@h/db",
        "sqlite:////tmp/farm.db",
        "file:///tmp/images",
        "s3://bucket/prefix",
        "not a url at all",
        "",
    ],
)
def test_redact_leaves_text_without_password_unchanged(text: str) -> None:
    assert redact(text) == text


def test_describe_never_contains_passwords(tmp_path: Path) -> None:
    s = load_settings(
        {
            "FARM_HOME": str(tmp_path),
            "FARM_DATABASE_URL": "postgresql+psycopg://farm:db-secret@db/farm",
            "FARM_BROKER_URL": "redis://:broker-secret@redis:6379/0",
        }
    )
    described = s.describe()
    text = "\n".join(f"{k}={v}" for k, v in described.items())
    assert "db-secret" not in text
    assert "broker-secret" not in text
    assert described["database_url"] == "postgresql+psycopg://farm:***@db/farm"
    assert described["broker_url"] == "redis://:***@redis:6379/0"
    assert described["s3_endpoint_url"] == ""  # None prints as empty, not "None"
    assert set(described) == {f.name for f in dataclasses.fields(Settings)}


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = load_settings({"FARM_HOME": str(tmp_path)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lease_s = 1  # type: ignore[misc]


def test_with_overrides_copies_and_validates(tmp_path: Path) -> None:
    s = load_settings({"FARM_HOME": str(tmp_path)})
    changed = with_overrides(s, queue="gpu", device=None)
    assert changed.queue == "gpu"
    assert changed.device == s.device
    assert s.queue == "render"  # the original is untouched
    with pytest.raises(ConfigError, match="lease_s"):
        with_overrides(s, lease_s=1)


@pytest.mark.parametrize("value", ["-1", "nan", "61", "250"])
def test_record_group_s_out_of_range_is_an_error(tmp_path: Path, value: str) -> None:
    """0 to 60 s, and at most a third of the lease (here 600 s: 60 binds; with FARM_LEASE_S=30, 10 s)."""
    with pytest.raises(ConfigError, match=f"record_group_s must be between 0 and 60 .*got {value}"):
        load_settings({"FARM_RECORD_GROUP_S": value}, home=str(tmp_path))
    with pytest.raises(ConfigError, match="record_group_s must be between 0 and 10"):
        load_settings({"FARM_RECORD_GROUP_S": "11", "FARM_LEASE_S": "30"}, home=str(tmp_path))
    assert load_settings({"FARM_RECORD_GROUP_S": "0.5"}, home=str(tmp_path)).record_group_s == 0.5
