"""`farm doctor`: check the database, broker, storage, models and CUDA, and say in plain words what is wrong.
`farm config`: the effective settings.

Every line either prints goes through `scrub`, which masks URL passwords, secret query parameters
(`?password=`, `?token=`, …) and the values of secret variables, so the report can be pasted into an issue as it is.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

import click

from farm.cli.common import settings_of
from farm.secrets import redact
from farm.settings import Settings

CONNECT_TIMEOUT_S = 5


class Level(StrEnum):
    """OK: works. WARN: works, with a caveat worth knowing. FAIL: the farm cannot run like this."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """The outcome of one check, in words a user can act on."""

    name: str
    level: Level
    detail: str
    hint: str = ""

    def line(self) -> str:
        hint = f" — {self.hint}" if self.hint else ""
        return f"{self.level.value:<4}  {self.name:<8}  {self.detail}{hint}"


def run_checks(settings: Settings) -> list[Check]:
    """Every check, in the order a render flows through them; one failing never stops the others."""
    checks: list[tuple[str, Callable[[Settings], Check]]] = [
        ("database", check_database),
        ("broker", check_broker),
        ("storage", check_storage),
        ("models", check_models),
        ("cuda", check_cuda),
    ]
    results = []
    for name, check in checks:
        try:
            results.append(check(settings))
        except Exception as exc:  # a diagnosis reports every failure instead of stopping at the first
            results.append(Check(name, Level.FAIL, f"the check itself failed: {_first_line(exc)}"))
    return results


# ---- database ---------------------------------------------------------------------------------------


def check_database(settings: Settings) -> Check:
    """Connect, and compare the schema revision with the one this code ships."""
    from alembic.script import ScriptDirectory
    from sqlalchemy.exc import SQLAlchemyError

    import migrations
    from farm.store.engine import current_revision, head_revision, make_engine

    where = redact(settings.database_url)
    extra = {} if settings.embedded else {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_S}}
    engine = make_engine(settings.database_url, **extra)
    try:
        current = current_revision(engine)
    except SQLAlchemyError as exc:
        hint = (
            "check that FARM_HOME is writable"
            if settings.embedded
            else f"is PostgreSQL running at {_host_port(settings.database_url)}? check FARM_DATABASE_URL"
        )
        return Check("database", Level.FAIL, f"cannot reach {where}: {_first_line(exc)}", hint)
    finally:
        engine.dispose()
    head = head_revision()
    if current == head:
        return Check("database", Level.OK, f"{where} at schema revision {head} (current)")
    if settings.embedded:
        state = "empty" if current is None else f"at revision {current}"
        return Check("database", Level.OK, f"{where} {state}; every command upgrades the embedded one to {head}")
    known = {rev.revision for rev in ScriptDirectory(str(Path(migrations.__file__).parent)).walk_revisions()}
    if current is not None and current not in known:
        return Check(
            "database",
            Level.FAIL,
            f"{where} is at revision {current}, which this farm does not know (a newer farm upgraded it)",
            "install the same farm version everywhere",
        )
    return Check(
        "database",
        Level.FAIL,
        f"{where} is at revision {current or 'none (empty)'}, this farm needs {head}",
        "run `farm db upgrade`",
    )


# ---- broker -----------------------------------------------------------------------------------------


def check_broker(settings: Settings) -> Check:
    """Open one connection to the broker, with a single quick retry."""
    from farm.dispatch.broker import make_celery
    from farm.errors import ConfigError

    where = redact(settings.broker_url)
    try:
        app = make_celery(settings)
    except ConfigError as exc:  # a URL kombu cannot parse: no connection to try
        return Check("broker", Level.FAIL, _first_line(exc), "check FARM_BROKER_URL")
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=CONNECT_TIMEOUT_S)
    except Exception as exc:  # kombu wraps some errors and not others (auth, TLS); any of them is a FAIL
        return Check("broker", Level.FAIL, f"cannot reach {where}: {_first_line(exc)}", _broker_hint(settings))
    return Check("broker", Level.OK, f"{where} reachable (queue {settings.queue!r})")


def _broker_hint(settings: Settings) -> str:
    scheme = urlsplit(settings.broker_url).scheme
    where = _host_port(settings.broker_url)
    if scheme in ("redis", "rediss"):
        return f"is Redis running at {where}, with this password? check FARM_BROKER_URL"
    if scheme in ("amqp", "amqps"):
        return f"is RabbitMQ running at {where}, with these credentials? check FARM_BROKER_URL"
    return "check FARM_BROKER_URL and that FARM_HOME is writable"


# ---- storage ----------------------------------------------------------------------------------------


def check_storage(settings: Settings) -> Check:
    """Write, read back and delete a small probe object, as a worker's upload would."""
    from farm.errors import ConfigError, StorageError
    from farm.storage import storage_for

    try:
        storage = storage_for(settings, max_attempts=1)
    except (ConfigError, StorageError) as exc:
        return Check("storage", Level.FAIL, _first_line(exc), "check FARM_STORAGE_URL")
    token = secrets.token_hex(8)
    key = "/".join(part for part in (storage.prefix, "_doctor", f"probe-{token}") if part)
    data = f"farm doctor probe {token}\n".encode()
    hint = (
        "check the bucket exists, FARM_S3_ENDPOINT_URL, and the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY pair"
        if settings.storage_url.startswith("s3:")
        else "check that the folder exists and is writable"
    )
    step = "write"
    try:
        storage.put(key, data, content_type="text/plain")
        step = "read back"
        if storage.get(key) != data:
            return Check("storage", Level.FAIL, f"{storage.describe()}: the probe read back differently", hint)
        step = "delete"
        storage.delete(key)
        if storage.head(key) is not None:
            return Check("storage", Level.FAIL, f"{storage.describe()}: the probe is still there after delete", hint)
    except StorageError as exc:
        return Check("storage", Level.FAIL, f"{storage.describe()}: cannot {step} a probe: {_first_line(exc)}", hint)
    return Check("storage", Level.OK, f"{storage.describe()}: wrote, read back and deleted a probe object")


# ---- models -----------------------------------------------------------------------------------------


def check_models(settings: Settings) -> Check:
    """Where each profile would load from; FAIL only when the default model cannot load at all."""
    from farm.profiles import HUB_ID, PROFILES

    default = settings.default_model
    others = [
        f"{name} {_availability(p.name, p.hub_id, settings).split(' (')[0]}"
        for name, p in PROFILES.items()
        if name != default
    ]
    profile = PROFILES.get(default)
    if profile is not None:
        state = _availability(profile.name, profile.hub_id, settings)
    elif Path(default).expanduser().is_dir():
        ok = (Path(default).expanduser() / "model_index.json").is_file()
        state = "local" if ok else "a folder without model_index.json"
    elif HUB_ID.fullmatch(default):
        state = "in the Hugging Face cache" if _hub_cached(default) else f"needs a download of {default}"
    else:
        state = "not a profile, folder or hub id"
    line = f"default {default!r}: {state}; other profiles: {', '.join(others)}"
    if state.startswith(("local", "in the Hugging Face cache")):
        return Check("models", Level.OK, line)
    if state.startswith("needs a download"):
        return Check(
            "models",
            Level.WARN,
            line,
            f"workers need the hub on first use; offline, copy the weights to {settings.models_dir / default}",
        )
    hint = (
        "run `farm models make-tiny`"
        if default == "tiny"
        else f"put a diffusers folder at {settings.models_dir / default} or set FARM_DEFAULT_MODEL"
    )
    return Check("models", Level.FAIL, line, hint)


def _availability(name: str, hub_id: str | None, settings: Settings) -> str:
    local = settings.models_dir / name
    if (local / "model_index.json").is_file():
        return f"local ({local})"
    if hub_id is None:
        return f"not made ({local} is missing)"
    if _hub_cached(hub_id):
        return "in the Hugging Face cache"
    from farm.profiles import PROFILES

    size = PROFILES[name].download_gb if name in PROFILES else None
    return f"needs a download of {hub_id}" + (f" (≈ {size:g} GB)" if size else "")


def _hub_cached(repo_id: str) -> bool:
    """True when the Hugging Face cache holds a snapshot of `repo_id` (read from disk: no network, no import)."""
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    cache = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return any((snap / "model_index.json").is_file() for snap in snapshots.glob("*")) if snapshots.is_dir() else False


# ---- CUDA -------------------------------------------------------------------------------------------


def check_cuda(settings: Settings) -> Check:
    """Whether torch sees a GPU; torch is imported here only, so the control plane never needs it."""
    wants_cuda = settings.device.startswith("cuda")
    try:
        import torch
    except ImportError:
        level = Level.FAIL if wants_cuda else Level.WARN
        return Check(
            "cuda",
            level,
            "torch is not installed here (the control plane does not need it; workers do)",
            "on a worker machine: pip install torch==2.13.0 && pip install '.[render]'",
        )
    if not torch.cuda.is_available():
        detail = f"torch {torch.__version__} sees no CUDA device"
        if wants_cuda:
            return Check("cuda", Level.FAIL, detail, f"FARM_DEVICE={settings.device} needs a GPU and a CUDA build")
        return Check("cuda", Level.WARN, f"{detail}: workers here render on the CPU (slow)", "fine for tests and demos")
    count = torch.cuda.device_count()
    names = []
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        names.append(f"cuda:{index} {props.name} ({props.total_memory / 2**30:.0f} GiB)")
    detail = f"torch {torch.__version__}, CUDA {torch.version.cuda}: " + ", ".join(names)
    if settings.device.startswith("cuda:"):
        wanted = int(settings.device.split(":", 1)[1] or 0)
        if wanted >= count:
            return Check("cuda", Level.FAIL, detail, f"FARM_DEVICE={settings.device} but only {count} device(s)")
    return Check("cuda", Level.OK, detail)


# ---- helpers ----------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    """The first line of an error (drivers add multi-line advice), passwords in URLs masked."""
    from farm.errors import FarmError

    text = str(getattr(exc, "orig", None) or exc).strip()
    line = text.splitlines()[0] if text else ""
    if isinstance(exc, FarmError) and line:
        return redact(line)  # our own errors are already written in plain words
    return redact(f"{exc.__class__.__name__}: {line}" if line else exc.__class__.__name__)


def _host_port(url: str) -> str:
    try:
        parts = urlsplit(url)
        return f"{parts.hostname or 'localhost'}:{parts.port}" if parts.port else parts.hostname or "localhost"
    except ValueError:
        return "the configured host"


@click.command()
@click.pass_context
def doctor(ctx: click.Context) -> None:
    """Check the database, broker, storage, models and CUDA; exit 1 if any check fails. Prints no secret."""
    from farm.secrets import scrub, secrets_of

    settings = settings_of(ctx)
    hidden = secrets_of(settings)
    results = run_checks(settings)
    for check in results:
        click.echo(scrub(check.line(), hidden=hidden))
    failed = [check.name for check in results if check.level is Level.FAIL]
    if failed:
        click.echo(f"{len(failed)} of {len(results)} checks failed: {', '.join(failed)}")
        ctx.exit(1)
    click.echo("the farm can run here")


@click.command("config")
@click.pass_context
def show_config(ctx: click.Context) -> None:
    """Print the effective settings, secrets masked."""
    from farm.secrets import scrub, secrets_of

    settings = settings_of(ctx)
    hidden = secrets_of(settings)  # describe() redacts each URL; this also catches a secret redact cannot parse
    for key, value in settings.describe().items():
        click.echo(scrub(f"{key} = {value}", hidden=hidden))
