"""Settings: one typed, frozen object built from FARM_* variables and an optional farm.toml."""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from farm.errors import ConfigError
from farm.secrets import redact

# Each setting: (field, environment variable, type). The toml file uses the field names.
_INT_FIELDS = {
    "max_attempts",
    "lease_s",
    "batch_size",
    "retry_backoff_s",
    "retry_backoff_max_s",
    "dispatch_window",
    "control_image_max_bytes",
    "max_line_bytes",
}
_FLOAT_FIELDS = {"render_deadline_s", "shutdown_grace_s", "peak_tflops", "record_group_s"}
# What `--renderer` / FARM_RENDERER accept; the first is the default.
RENDERERS = ("pixart", "null")
# Fields that only the config file sets (tables, and which file it was), never a FARM_* variable.
_FROM_FILE = {"pools", "config_file"}


@dataclass(frozen=True)
class Settings:
    """Where the farm keeps its state and how workers behave; passed explicitly, never global."""

    home: Path
    database_url: str
    broker_url: str
    storage_url: str
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # The PixArt-δ release; the demo and the tests name the random-weight `tiny` model explicitly.
    default_model: str = "pixart-lcm-1024"
    queue: str = "render"
    max_attempts: int = 3
    lease_s: int = 600
    batch_size: int = 8
    retry_backoff_s: int = 2
    retry_backoff_max_s: int = 60
    # Wall-clock seconds one pipeline call may take, checked after each denoising step (0: no deadline).
    # Celery's time limits do nothing on the solo and threads pools the workers use.
    render_deadline_s: float = 900.0
    device: str = "auto"
    dtype: str = "auto"
    # The GPU fast path each loaded pipeline gets (models/fastpath.py, README "Fast path"): comma-separated items on
    # top of the device's safe defaults, e.g. "compile=max-autotune"; "none" is plain eager.
    fast_path: str = "default"
    # Where torch.compile keeps compiled code, so a machine compiles once; empty: FARM_HOME/models/compile-cache.
    compile_cache: str = ""
    # The bf16 peak (TFLOP/s) a worker's MFU is measured against; 0: models/flops.py's table by GPU name.
    peak_tflops: float = 0.0
    # The most queued jobs a broker queue holds: its window is sized from the live workers that consume it
    # (farm/dispatch/routing.py, Router.window), and the control loop tops it up as they drain it.
    dispatch_window: int = 1024
    # On SIGTERM a worker finishes what fits in this many seconds, hands the rest back, and exits.
    shutdown_grace_s: float = 30.0
    # Group commit: a worker records the batches it stores within this many seconds (up to RECORD_GROUP_JOBS jobs)
    # in one transaction instead of one each, for fleets whose workers finish many small batches a second; 0 (the
    # default) records each batch as soon as it is stored. Results wait that long for their row.
    record_group_s: float = 0.0
    # Submit refuses a control image larger than this, and a prompt-file line longer than this.
    control_image_max_bytes: int = 64 << 20
    max_line_bytes: int = 1 << 20
    # The HED network's weights (ControlNetHED.pth) for `--condition hed`; empty: under FARM_HOME/models/hed/.
    hed_weights: str = ""
    # What a worker renders with: "pixart" (the model), or "null", a stand-in that makes synthetic images at once
    # (models/null.py) to measure the farm itself. Only `--renderer null`, FARM_RENDERER or a pool choose it.
    renderer: str = "pixart"
    # The scorer profile (farm/profiles.py) of lines whose acceptance rules need scores, unless `--scorer` names one.
    default_scorer: str = "clip-l14"
    # `[pools.NAME]` tables of farm.toml: pool name → the options it sets (POOL_KEYS), read with everything else.
    pools: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, hash=False)
    config_file: Path | None = None  # the farm.toml the settings and pools came from, if any

    @property
    def embedded(self) -> bool:
        """True when the job database is the SQLite file under FARM_HOME."""
        return self.database_url.startswith("sqlite")

    @property
    def models_dir(self) -> Path:
        """Where `farm models make-tiny` writes by default and where profiles look for local copies."""
        return self.home / "models"

    @property
    def compile_cache_path(self) -> Path:
        """Where torch.compile's cache lives: FARM_COMPILE_CACHE, or FARM_HOME/models/compile-cache (the models
        volume), so every worker on the machine reuses what the first one compiled."""
        if self.compile_cache:
            return Path(self.compile_cache).expanduser()
        return self.models_dir / "compile-cache"

    @property
    def hed_weights_path(self) -> Path:
        """Where this machine keeps the HED weights: FARM_HED_WEIGHTS, or FARM_HOME/models/hed/ControlNetHED.pth."""
        if self.hed_weights:
            return Path(self.hed_weights).expanduser()
        return self.models_dir / "hed" / "ControlNetHED.pth"

    def describe(self) -> dict[str, str]:
        """The settings as text, with every secret masked: safe for logs and `farm doctor`."""
        described = {
            f.name: redact(str(getattr(self, f.name))) if getattr(self, f.name) is not None else ""
            for f in fields(self)
            if f.name not in _FROM_FILE
        }
        described["pools"] = ", ".join(sorted(self.pools))
        described["config_file"] = str(self.config_file or "")
        return described

    def pool(self, name: str) -> dict[str, Any]:
        """The options of pool NAME (`farm worker --pool NAME`), from `[pools.NAME]` in farm.toml."""
        if name not in self.pools:
            if self.config_file is None:
                raise ConfigError(f"pool {name!r}: no farm.toml here (or FARM_CONFIG) to read [pools.{name}] from")
            known = ", ".join(sorted(self.pools)) or "none"
            raise ConfigError(f"{self.config_file}: no [pools.{name}] table (pools configured: {known})")
        return dict(self.pools[name])


def load_settings(
    env: Mapping[str, str] | None = None, *, config_file: Path | None = None, **overrides: Any
) -> Settings:
    """Build settings: defaults, then farm.toml, then FARM_* variables, then explicit overrides."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_file or _config_path(env)
    pools: dict[str, dict[str, Any]] = {}
    if path is not None:
        table, pools = _read_toml(path)
        values.update(table)
    for f in fields(Settings):
        if f.name in _FROM_FILE:
            continue
        key = f"FARM_{f.name.upper()}"
        if key in env and env[key] != "":
            values[f.name] = env[key]
    values.update({k: v for k, v in overrides.items() if v is not None})

    home = Path(values.pop("home", ".farm")).expanduser().absolute()
    values.setdefault("database_url", f"sqlite:///{home / 'farm.db'}")
    values.setdefault("broker_url", f"sqla+sqlite:///{home / 'broker.db'}")
    values.setdefault("storage_url", (home / "images").as_uri())
    for name in _INT_FIELDS:
        if name in values:
            values[name] = _as_int(name, values[name])
    for name in _FLOAT_FIELDS:
        if name in values:
            values[name] = _as_float(name, values[name])
    unknown = set(values) - {f.name for f in fields(Settings)} | (_FROM_FILE & set(values))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    settings = Settings(home=home, pools=pools, config_file=path, **values)
    _validate(settings)
    return settings


def with_overrides(settings: Settings, **changes: Any) -> Settings:
    """A copy with some fields replaced (CLI options), validated again."""
    updated = replace(settings, **{k: v for k, v in changes.items() if v is not None})
    _validate(updated)
    return updated


def _config_path(env: Mapping[str, str]) -> Path | None:
    explicit = env.get("FARM_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"FARM_CONFIG points to {path}, which is not a file")
        return path
    local = Path("farm.toml")
    return local if local.is_file() else None


def _read_toml(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The settings table (top-level keys or a [farm] table) and the `[pools.NAME]` tables, validated."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read settings: {exc}") from exc
    table = data.get("farm", data)
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [farm] must be a table")
    pools = data.get("pools", table.get("pools", {}))
    if not isinstance(pools, dict):
        raise ConfigError(f"{path}: [pools] must hold tables like [pools.NAME]")
    for name, options in pools.items():
        _check_pool(path, name, options)
    return {k: v for k, v in table.items() if not isinstance(v, dict)}, pools


# `[pools.NAME]` keys in farm.toml: the `farm worker` options each one sets, then what the pool can serve
# (farm/dispatch/routing.py; a missing key means "any").
POOL_KEYS: dict[str, type] = {
    "device": str,
    "dtype": str,
    "queue": str,
    "max_batch": int,
    "io_threads": int,
    "low_memory": bool,
    "metrics_port": int,
    "models": list,
    "controlnets": list,
    "max_pixels": int,
    "quantize": list,
    "task_jobs": int,
    "fast_path": str,
    "renderer": str,  # "null" only for benchmarks (models/null.py)
    "scorers": list,  # the scorer profiles this pool's workers load; without the key a pool scores nothing
}


def _check_pool(path: Path, name: str, options: Any) -> None:
    if not isinstance(options, dict):
        raise ConfigError(f"{path}: [pools.{name}] must be a table")
    for key, value in options.items():
        kind = POOL_KEYS.get(key)
        if kind is None:
            raise ConfigError(f"{path}: [pools.{name}] unknown key {key!r} (allowed: {', '.join(POOL_KEYS)})")
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: [pools.{name}] {key} must be {kind.__name__}, got {value!r}")
        if isinstance(value, list) and not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{path}: [pools.{name}] {key} must be a list of strings, got {value!r}")


def _as_int(name: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def _as_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None


def _validate(s: Settings) -> None:
    # Other PostgreSQL spellings are accepted and mapped to psycopg 3 by farm.store.engine.normalize_url.
    db_schemes = ("sqlite", "postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2")
    if urlsplit(s.database_url).scheme not in db_schemes:
        raise ConfigError(
            f"database_url must start with sqlite:// or postgresql+psycopg://, got {redact(s.database_url)}"
        )
    broker_schemes = ("sqla+sqlite", "sqla+postgresql", "redis", "rediss", "amqp", "amqps", "memory")
    if urlsplit(s.broker_url).scheme not in broker_schemes:
        raise ConfigError(
            f"broker_url must be redis://, rediss://, amqp:// or sqla+sqlite://, got {redact(s.broker_url)}"
        )
    if urlsplit(s.storage_url).scheme not in ("file", "s3"):
        raise ConfigError(f"storage_url must be file:///path or s3://bucket/prefix, got {redact(s.storage_url)}")
    for name, low in (
        ("max_attempts", 1),
        ("lease_s", 5),
        ("batch_size", 1),
        ("retry_backoff_s", 0),
        ("dispatch_window", 1),
        ("control_image_max_bytes", 1),
        ("max_line_bytes", 64),
    ):
        if getattr(s, name) < low:
            raise ConfigError(f"{name} must be at least {low}, got {getattr(s, name)}")
    if not (math.isfinite(s.record_group_s) and 0 <= s.record_group_s <= min(60.0, s.lease_s / 3)):
        raise ConfigError(
            f"record_group_s must be between 0 and {min(60.0, s.lease_s / 3):g} (60 s, and a third of lease_s: "
            f"results must reach their rows long before a lease could lapse), got {s.record_group_s}"
        )
    if not (math.isfinite(s.shutdown_grace_s) and s.shutdown_grace_s >= 0):
        raise ConfigError(f"shutdown_grace_s must be at least 0, got {s.shutdown_grace_s}")
    if not (math.isfinite(s.render_deadline_s) and s.render_deadline_s >= 0):
        raise ConfigError(f"render_deadline_s must be at least 0 (0: no deadline), got {s.render_deadline_s}")
    if not (math.isfinite(s.peak_tflops) and s.peak_tflops >= 0):
        raise ConfigError(f"peak_tflops must be at least 0 (0: by GPU name), got {s.peak_tflops}")
    if s.renderer not in RENDERERS:
        raise ConfigError(f"renderer must be one of {', '.join(RENDERERS)}, got {s.renderer!r}")
