"""Static checks of docker/: the compose file and the worker Dockerfile (no Docker engine needed)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile.worker"

WORKERS = ("worker-int8", "worker-fp16")
WORKER_IMAGE_SERVICES = ("migrate", *WORKERS)
EXPECTED_SERVICES = {"redis", "postgres", "minio", "minio-init", "flower", *WORKER_IMAGE_SERVICES}

# `${NAME:-default}` / `${NAME-default}` → default, as compose interpolates with nothing set.
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def _defaults(value: str) -> str:
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: _defaults(str(v)) for k, v in env.items()}


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


# ---- compose.yaml ---------------------------------------------------------------------------------------


def test_compose_uses_the_spec_format_and_has_every_service(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the compose spec has no `version:` key"
    assert set(compose["services"]) == EXPECTED_SERVICES
    assert "x-farm-env" in compose, "shared settings live in the x-farm-env anchor"


def test_worker_image_services_build_the_worker_dockerfile_from_the_repo_root(services: dict[str, Any]) -> None:
    images = set()
    for name in WORKER_IMAGE_SERVICES:
        build = services[name].get("build")
        assert isinstance(build, dict), f"{name} has no build section"
        assert build.get("context") == "..", f"{name}: the build context must be the repo root"
        assert build.get("dockerfile") == "docker/Dockerfile.worker", name
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        images.add(services[name].get("image"))
    assert len(images) == 1 and None not in images, f"one shared image name expected, got {images}"
    # Any other service naming that image must build it the same way.
    for name, service in services.items():
        if service.get("image") in images:
            assert name in WORKER_IMAGE_SERVICES, f"{name} uses the worker image but is not checked"


def test_workers_reserve_one_distinct_nvidia_gpu_each(services: dict[str, Any]) -> None:
    seen: dict[str, str] = {}
    for name in WORKERS:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, f"{name}: one process per GPU"
        device = devices[0]
        assert device["driver"] == "nvidia"
        assert "gpu" in device["capabilities"]
        assert "count" not in device, f"{name}: device_ids and count are mutually exclusive"
        ids = device["device_ids"]
        assert len(ids) == 1 and all(isinstance(i, str) for i in ids), f"{name}: {ids}"
        assert ids[0] not in seen, f"{name} and {seen.get(ids[0])} both reserve GPU {ids[0]}"
        seen[ids[0]] = name
    assert set(seen) == {"0", "1"}


def test_worker_settings_point_at_the_compose_services(services: dict[str, Any]) -> None:
    for name in WORKER_IMAGE_SERVICES:
        env = _env(services[name])
        broker = urlsplit(env["FARM_BROKER_URL"])
        assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379), name

        db = urlsplit(env["FARM_DATABASE_URL"])
        assert db.scheme == "postgresql+psycopg", name
        assert db.hostname == "postgres" and db.port == 5432, name
        postgres_env = _env(services["postgres"])
        assert db.username == postgres_env["POSTGRES_USER"] and db.path == "/" + postgres_env["POSTGRES_DB"]
        assert db.password == postgres_env["POSTGRES_PASSWORD"], f"{name}: database password differs from postgres'"

        storage = urlsplit(env["FARM_STORAGE_URL"])
        assert (storage.scheme, storage.netloc) == ("s3", "farm"), name
        assert env["FARM_S3_ENDPOINT_URL"] == "http://minio:9000", name
        minio_env = _env(services["minio"])
        assert env["AWS_ACCESS_KEY_ID"] == minio_env["MINIO_ROOT_USER"], name
        assert env["AWS_SECRET_ACCESS_KEY"] == minio_env["MINIO_ROOT_PASSWORD"], name
        assert env["HF_HOME"] == "/models", name


def test_worker_settings_pass_farms_own_validation(services: dict[str, Any]) -> None:
    from farm.settings import load_settings

    for name in WORKERS:
        settings = load_settings(_env(services[name]))
        assert settings.queue == "render"
        assert settings.s3_endpoint_url == "http://minio:9000"
    assert load_settings(_env(services["worker-fp16"])).dtype == "float16"


def test_the_bucket_workers_upload_to_is_created_by_minio_init(services: dict[str, Any]) -> None:
    bucket = urlsplit(_env(services["worker-int8"])["FARM_STORAGE_URL"]).netloc
    command = services["minio-init"]["command"]
    script = " ".join(command) if isinstance(command, list) else command
    assert re.search(rf"mc mb\b.*\b\w+/{re.escape(bucket)}\b", script), script
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["minio"]["command"][:2] == ["server", "/data"]


def test_workers_wait_for_migrations_the_broker_and_the_bucket(services: dict[str, Any]) -> None:
    for name in WORKERS:
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_healthchecks_exist_where_dependents_wait_for_health(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}, which has none"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])


def test_pools_differ_and_share_the_model_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    assert _env(services["worker-int8"])["FARM_QUEUE"] == "render"
    assert _env(services["worker-fp16"])["FARM_DTYPE"] == "float16"
    for name in WORKERS:
        assert "models:/models" in services[name]["volumes"], name
    assert {"models", "pgdata", "miniodata"} <= set(compose["volumes"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])
    assert any(v.endswith(":/data") for v in services["minio"]["volumes"])


def test_flower_watches_the_same_broker(services: dict[str, Any]) -> None:
    flower = services["flower"]
    assert flower["image"].startswith("mher/flower")
    broker = _env(services["worker-int8"])["FARM_BROKER_URL"]
    assert f"--broker={broker}" in flower["command"]


def test_postgres_password_comes_from_the_environment(services: dict[str, Any]) -> None:
    raw = services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert raw.startswith("${POSTGRES_PASSWORD"), raw


# ---- Dockerfile.worker ----------------------------------------------------------------------------------


def test_dockerfile_runs_as_a_non_root_user_before_the_entrypoint() -> None:
    steps = _instructions()
    names = [name for name, _ in steps]
    assert names[0] == "FROM" or names[:2] == ["ARG", "FROM"]
    base = dict(steps)["FROM"]
    assert ":" in base and not base.endswith(":latest"), f"pin the base image tag: {base}"
    users = [i for i, (name, _) in enumerate(steps) if name == "USER"]
    entrypoint = names.index("ENTRYPOINT")
    assert users and users[-1] < entrypoint, "USER must come before ENTRYPOINT"
    user = steps[users[-1]][1].split(":")[0]
    assert user not in ("root", "0"), user
    assert "farm" in dict(steps)["ENTRYPOINT"]


def test_dockerfile_pins_torch_and_installs_the_render_extra() -> None:
    runs = [args for name, args in _instructions() if name == "RUN"]
    torch_specs = [w for args in runs for w in shlex.split(args) if re.match(r"torch\b", w)]
    assert torch_specs == ["torch==2.13.0"], torch_specs
    assert any(".[render]" in args and "pip install" in args for args in runs)
    for args in runs:
        if "pip install" in args:
            assert "--no-cache-dir" in args, args
        if "apt-get install" in args:
            assert "rm -rf /var/lib/apt/lists/*" in args, "clean the apt lists in the same layer"


def test_dockerfile_keeps_the_model_cache_in_a_volume() -> None:
    steps = _instructions()
    env = " ".join(args for name, args in steps if name == "ENV")
    home = re.search(r"\bHF_HOME=(\S+)", env)
    assert home, "HF_HOME is not set"
    volumes = [args.strip('[]" ') for name, args in steps if name == "VOLUME"]
    assert home.group(1) in volumes, f"no VOLUME for HF_HOME={home.group(1)}"
    assert re.search(r"\bFARM_HOME=/var/lib/farm\b", env)


def test_dockerfile_bakes_in_no_secrets() -> None:
    for number, line in enumerate(DOCKERFILE.read_text(encoding="utf-8").splitlines(), 1):
        assert "AWS_SECRET" not in line.upper(), f"line {number}: {line}"
        assert not re.search(r"PASSWORD\s*[=:]\s*\S", line, re.IGNORECASE), f"line {number}: {line}"
        assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", line), f"line {number}: credentials in a URL: {line}"


def test_every_copy_source_exists_in_the_repo() -> None:
    copies = [args for name, args in _instructions() if name in ("COPY", "ADD")]
    assert copies
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        assert len(words) >= 2, args
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repo (build context is the repo root)"


def test_the_8gb_pool_runs_the_low_memory_recipe(services: dict[str, Any]) -> None:
    assert "--low-memory" in services["worker-int8"]["command"]
    assert "--low-memory" not in services["worker-fp16"]["command"]
    for name in WORKERS:  # each pool exposes its Prometheus metrics
        assert "--metrics-port" in services[name]["command"]
