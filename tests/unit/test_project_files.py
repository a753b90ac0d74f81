"""The files that run the system elsewhere (compose, Procfile, CI) stay correct."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
#: Variables the processes read besides config.settings (gunicorn, Flower, the Procfile,
#: the migrations).
PROCESS_VARIABLES = {"API_BIND", "API_PORT", "FLOWER_BASIC_AUTH", "DB_APP_ROLE"}
#: The compose file's secrets, each from the environment.
SECRETS = (
    "POSTGRES_PASSWORD",
    "OWNER_DB_PASSWORD",
    "APP_DB_PASSWORD",
    "REDIS_PASSWORD",
    "CACHE_PASSWORD",
    "FLOWER_BASIC_AUTH",
    "GRAFANA_ADMIN_PASSWORD",
)
#: Every service that runs the system's code, the migration excepted.
APP_SERVICES = (
    "web",
    "worker-saga",
    "worker-default",
    "worker-batch",
    "worker-housekeeping",
    "worker-webhooks",
    "events",
    "beat",
    "flower",
)


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


def command_line(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return command if isinstance(command, str) else " ".join(command)


def settings_variables() -> set[str]:
    source = (ROOT / "config" / "settings.py").read_text()
    return set(re.findall(r'"([A-Z][A-Z_]+)"', source))


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    result = subprocess.run(
        [
            str(BIN / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_every_process_after_healthy_stores_and_the_migration() -> None:
    services = compose()["services"]
    assert set(services) == {
        "postgres",
        "redis",
        "cache",
        "migrate",
        "web",
        "worker-saga",
        "worker-default",
        "worker-batch",
        "worker-housekeeping",
        "worker-webhooks",
        "events",
        "beat",
        "flower",
        "prometheus",  # these two only with --profile monitoring
        "grafana",
    }
    for store in ("postgres", "redis", "cache"):
        assert services[store]["healthcheck"]["test"]
    # The broker never evicts; the caches' Redis is bounded and evicts, and is used.
    assert "noeviction" in command_line(services["redis"])
    assert "--maxmemory-policy allkeys-lru" in command_line(services["cache"])
    assert "@cache:6379/" in services["web"]["environment"]["CACHE_URL"]
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in (
        "web",
        "worker-saga",
        "worker-default",
        "worker-batch",
        "worker-housekeeping",
        "worker-webhooks",
        "events",
        "beat",
        "flower",
    ):
        deps = services[name]["depends_on"]
        for store in ("postgres", "redis", "cache"):
            assert deps[store]["condition"] == "service_healthy", (name, store)
        assert deps["migrate"]["condition"] == "service_completed_successfully"
    published = [port for s in services.values() for port in s.get("ports", [])]
    assert published and all(port.startswith("127.0.0.1:") for port in published)


def test_compose_sets_only_variables_the_code_reads() -> None:
    known = settings_variables() | PROCESS_VARIABLES
    for name in ("web", "worker-saga", "worker-default", "beat", "flower", "migrate"):
        assert set(compose()["services"][name]["environment"]) <= known, name


def test_procfile_runs_the_api_a_worker_per_lane_the_consumers_beat_and_flower() -> None:
    lines = dict(
        line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line
    )
    assert set(lines) == {
        "web",
        "worker_saga",
        "worker_default",
        "worker_batch",
        "worker_housekeeping",
        "worker_webhooks",
        "events",
        "beat",
        "flower",
    }
    assert "python -m workers.events" in lines["events"]
    assert "'workers.web:create_app()'" in lines["web"]
    assert "-Q ${SAGA_LANE:-saga.high}" in lines["worker_saga"]
    assert "-Q ${DEFAULT_LANE:-default}" in lines["worker_default"]
    assert "nice -n 10 celery" in lines["worker_batch"]  # batch yields the CPU
    # The long checks have a worker of their own, never ahead of the relay.
    assert "-Q ${HOUSEKEEPING_LANE:-housekeeping}" in lines["worker_housekeeping"]
    # Slow receivers wait on a worker of their own, never in front of a saga.
    assert "-Q ${WEBHOOKS_LANE:-webhooks}" in lines["worker_webhooks"]
    for name in (
        "worker_saga",
        "worker_default",
        "worker_batch",
        "worker_housekeeping",
        "worker_webhooks",
        "beat",
        "flower",
    ):
        assert "celery -A workers.app" in lines[name]
    assert "--address=${FLOWER_ADDRESS:-127.0.0.1}" in lines["flower"]
    # Flower reads its password from FLOWER_BASIC_AUTH, required, never from argv.
    assert "${FLOWER_BASIC_AUTH:?" in lines["flower"]
    assert "--basic-auth" not in lines["flower"]
    assert "exec celery" in lines["flower"].split("&&")[-1]
    check = subprocess.run([str(BIN / "honcho"), "check"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make run" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_compose_puts_no_secret_on_a_command_line() -> None:
    """A command line is anyone's to read (``ps``, ``docker inspect``): every secret
    reaches its process through the environment."""
    interpolated = re.compile(r"(?<!\$)\$\{?(" + "|".join(SECRETS) + r")\b")
    for name, service in compose()["services"].items():
        line = command_line(service)
        assert not interpolated.search(line), (name, line)
        for flag in ("--requirepass", "--basic-auth", "--password"):
            assert flag not in line, (name, flag)
        healthcheck = " ".join(service.get("healthcheck", {}).get("test", []))
        assert not interpolated.search(healthcheck), name
    assert "API_KEYS" not in (ROOT / "docker-compose.yml").read_text()


def test_compose_connects_the_system_as_the_application_role_and_migrates_as_the_owner() -> None:
    services = compose()["services"]
    for name in APP_SERVICES:
        environment = services[name]["environment"]
        assert environment["DATABASE_URL"].startswith(
            "postgresql+psycopg2://orders_app:${APP_DB_PASSWORD:?"
        ), name
        assert not any("OWNER_DB_PASSWORD" in str(v) for v in environment.values()), name
        assert not any("POSTGRES_PASSWORD" in str(v) for v in environment.values()), name
    migrate = services["migrate"]["environment"]
    assert migrate["DATABASE_URL"].startswith("postgresql+psycopg2://orders:${OWNER_DB_PASSWORD:?")
    assert migrate["DB_APP_ROLE"] == "orders_app"
    # The superuser is not the owner; the roles are made on the first start.
    postgres = services["postgres"]
    assert postgres["environment"]["POSTGRES_USER"] != "orders"
    assert "--auth=scram-sha-256" in postgres["environment"]["POSTGRES_INITDB_ARGS"]
    assert "./config/postgres:/docker-entrypoint-initdb.d:ro" in postgres["volumes"]
    init = "".join(p.read_text() for p in sorted((ROOT / "config" / "postgres").glob("*.sql")))
    assert "CREATE ROLE orders_app" in init and "REVOKE CREATE ON SCHEMA public" in init
    assert ":'app_password'" in init  # from the environment, not the file
    # Each Redis has a password of its own.
    assert services["redis"]["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD:?")
    assert services["cache"]["environment"]["REDISCLI_AUTH"].startswith("${CACHE_PASSWORD:?")
    assert "${CACHE_PASSWORD:?" in services["web"]["environment"]["CACHE_URL"]
    assert "${REDIS_PASSWORD:?" in services["web"]["environment"]["REDIS_URL"]


def test_the_sentinel_option_points_every_process_at_the_sentinels() -> None:
    path = ROOT / "docker-compose.sentinel.yml"
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    override = yaml.safe_load(path.read_text())["services"]
    known = settings_variables() | PROCESS_VARIABLES
    for name in APP_SERVICES:
        env = override[name]["environment"]
        assert set(env) <= known, name
        assert env["REDIS_URL"].count("sentinel://") == 3
        assert env["REDIS_SENTINEL_PASSWORD"] == "${SENTINEL_PASSWORD:?set SENTINEL_PASSWORD}"
        assert {"sentinel-1", "sentinel-2", "sentinel-3"} <= set(override[name]["depends_on"])
    assert set(APP_SERVICES) <= set(compose()["services"])
    for sentinel in ("sentinel-1", "sentinel-2", "sentinel-3"):
        assert "--sentinel" in command_line(override[sentinel])
        assert override[sentinel]["healthcheck"]["test"]
    assert "noeviction" in command_line(override["redis-replica"])
