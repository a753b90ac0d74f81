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
#: Variables the processes read besides config.settings (gunicorn, Flower, the Procfile).
PROCESS_VARIABLES = {"API_BIND", "API_PORT", "FLOWER_BASIC_AUTH"}


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text()))


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
        "events",
        "beat",
        "flower",
    }
    for store in ("postgres", "redis", "cache"):
        assert services[store]["healthcheck"]["test"]
    # The broker never evicts; the caches' Redis is bounded and evicts, and is used.
    assert "noeviction" in services["redis"]["command"]
    assert "--maxmemory-policy allkeys-lru" in services["cache"]["command"]
    assert "@cache:6379/" in services["web"]["environment"]["CACHE_URL"]
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in (
        "web",
        "worker-saga",
        "worker-default",
        "worker-batch",
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
        "events",
        "beat",
        "flower",
    }
    assert "python -m workers.events" in lines["events"]
    assert "'workers.web:create_app()'" in lines["web"]
    assert "-Q ${SAGA_LANE:-saga.high}" in lines["worker_saga"]
    assert "-Q ${DEFAULT_LANE:-default}" in lines["worker_default"]
    assert "nice -n 10 celery" in lines["worker_batch"]  # batch yields the CPU
    for name in ("worker_saga", "worker_default", "worker_batch", "beat", "flower"):
        assert "celery -A workers.app" in lines[name]
    assert "--address=${FLOWER_ADDRESS:-127.0.0.1}" in lines["flower"]
    assert "--basic-auth" in lines["flower"]
    check = subprocess.run([str(BIN / "honcho"), "check"], cwd=ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make run" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
